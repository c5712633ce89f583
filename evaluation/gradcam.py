"""Grad-CAM of the evaluation's classifiers: where a ResNet-18 looks, as a picture and a number.

The maps come from the maintained ``pytorch_grad_cam`` package (``GradCAM``, or
``GradCAMPlusPlus`` as ``gradcampp``) on the last block of ``layer4`` (``layer4[-1]``, the
last 512-channel feature map, 1/32 of the input side). This module only prepares the model
and the inputs and scores the maps; it holds no copy of the package's code.

Both evaluation protocols give one ``nn.Module`` to explain:

* ``finetune``: the trained torchvision ResNet-18 itself.
* ``linear``: :func:`linear_probe_classifier` -- the frozen encoder with the fitted
  ``StandardScaler`` + ``LogisticRegression`` folded into ``fc``, one ``nn.Linear``
  (:func:`probe_linear_layer`), whose logits equal scikit-learn's ``decision_function``.
  The scaler's mean is subtracted at ``layer4[-1]``'s output (:class:`CentredBlock`; the
  same logits, since the average pool is linear), so that the maps show evidence relative
  to the average training image: relative to zero activation, whole classes got empty
  maps on the synthetic set (every covid19 map of a random-init probe, for one).

A classifier of either protocol is thus a torchvision ResNet-18 state dict (plus the
buffer ``layer4.1.feature_mean`` for a linear probe), which is what
``evaluation_aclus.py --save_classifiers`` writes and ``gradcam_aclus.py`` reads.

The number (:mod:`evaluation.cam_shares`): the share of a map's energy (the sum of the non-negative map) that falls in a
region (:func:`evaluation.cam_shares.energy_share`). Regions:

* the ultrasound sector: :func:`~evaluation.cam_shares.sector_mask` of the image (real frames), or ``label != 0``
  on synthetic scans;
* on synthetic scans, the anatomy that defines the class (:func:`~evaluation.cam_shares.synthetic_class_region`):
  covid19 = pleura + B-line columns of the lung (B-lines and the irregular pleura are its
  findings); pneumonia = the consolidation; regular = pleura + A-lines (a smooth pleura
  and its reverberations). A uniform map scores the region's area share, which is stored
  beside it as the chance level.

The shares are of the map as the package returns it: ReLU of the weighted activations,
min-max scaled per image to [0, 1] and resized bilinearly to the input side.

Pure functions first; the classifier's writer and reader (:func:`save_classifier`,
:func:`load_classifier`) are at the end.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock

from utils.io import DataError

#: ``--cam`` choices -> the package's class name
CAM_METHODS = {"gradcam": "GradCAM", "gradcampp": "GradCAMPlusPlus"}
#: ``--cam_target`` choices: explain the true class, or the predicted one
CAM_TARGETS = ("true", "pred")
#: the smallest layer4 map that is a map: at 1x1 every Grad-CAM is flat
MIN_CAM_GRID = 2


class GradCamError(DataError):
    """A model or input Grad-CAM cannot explain; the message is one line."""


# --------------------------------------------------------------------------- #
# the model to explain
# --------------------------------------------------------------------------- #
def probe_linear_layer(pipeline, n_classes: int, centred: bool = False) -> nn.Linear:
    """``StandardScaler`` + ``LogisticRegression`` (a fitted sklearn pipeline) as one ``nn.Linear``.

    ``(f - mean) / scale @ coef.T + intercept`` = ``f @ (coef / scale).T + (intercept - coef @ (mean / scale))``,
    folded in float64 and stored as float32. With K >= 3 classes the K outputs equal
    ``pipeline.decision_function``; with 2, sklearn's one score ``s`` becomes the logits
    ``(-s/2, s/2)`` (same softmax as sklearn's ``predict_proba``; difference = ``s``), so
    each class has a gradient of its own. ``centred``: the layer expects ``f - mean``
    (the bias is then ``intercept``; see :func:`linear_probe_classifier`).

    Returns:
        ``nn.Linear(D, n_classes)``; ``D`` = the scaler's number of features (512 here).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    steps = [s for _, s in getattr(pipeline, "steps", [])]
    if len(steps) != 2 or not isinstance(steps[0], StandardScaler) or not isinstance(steps[1], LogisticRegression):
        raise GradCamError(f"expected a fitted StandardScaler + LogisticRegression pipeline, found "
                           f"{[type(s).__name__ for s in steps] or type(pipeline).__name__}")
    scaler, lr = steps
    if list(lr.classes_) != list(range(n_classes)):
        raise GradCamError(f"the logistic regression knows classes {list(lr.classes_)}, expected 0..{n_classes - 1}")
    coef = np.asarray(lr.coef_, np.float64)                         # K x D (1 x D for 2 classes)
    intercept = np.asarray(lr.intercept_, np.float64)               # K (1)
    weight = coef / _scaler_scale(scaler, coef.shape[1])
    bias = intercept if centred else intercept - weight @ _scaler_mean(scaler, coef.shape[1])
    if coef.shape[0] == 1:  # binary: sklearn keeps the positive class's score only
        weight, bias = np.concatenate([-weight / 2, weight / 2]), np.concatenate([-bias / 2, bias / 2])
    layer = nn.Linear(coef.shape[1], n_classes)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    return layer


def _scaler_mean(scaler, dim: int) -> np.ndarray:
    return np.zeros(dim) if scaler.mean_ is None else np.asarray(scaler.mean_, np.float64)


def _scaler_scale(scaler, dim: int) -> np.ndarray:
    return np.ones(dim) if scaler.scale_ is None else np.asarray(scaler.scale_, np.float64)


class CentredBlock(BasicBlock):
    """A ResNet ``BasicBlock`` whose output is relative to ``feature_mean`` (C, a buffer):
    ``block(x) - feature_mean[:, None, None]``. As ``layer4[-1]`` of the linear probe it moves
    the scaler's centring in front of the average pool (a linear step, so the logits do not
    change) and into the map Grad-CAM reads (see :func:`linear_probe_classifier`)."""

    def __init__(self, block: BasicBlock, feature_mean: torch.Tensor):
        planes = block.conv1.out_channels
        super().__init__(block.conv1.in_channels, planes, block.stride, block.downsample)
        self.load_state_dict(block.state_dict())
        self.register_buffer("feature_mean", feature_mean.detach().float().clone().reshape(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) - self.feature_mean.view(1, -1, 1, 1)


def linear_probe_classifier(encoder: nn.Module, pipeline, n_classes: int, centred: bool = True) -> nn.Module:
    """The linear protocol as ONE module: a copy of the frozen ResNet-18 ``encoder`` (``fc`` =
    ``Identity``, 512-d pooled features) with ``fc`` = :func:`probe_linear_layer`, in eval mode
    (the probe was fitted on eval-mode features). Its logits equal the pipeline's
    ``decision_function`` on the encoder's features.

    ``centred`` (default): the scaler's mean is subtracted from ``layer4[-1]``'s output
    (:class:`CentredBlock`) instead of inside ``fc``. Grad-CAM keeps only the positive part
    of ``sum_k w_ck A_k(x, y)`` and so measures evidence against zero activation; for a probe
    fitted on standardised features the neutral point is the training mean, and against zero
    the maps of a class whose features are below average (e.g. a darker scan) are empty
    everywhere. Centred, a map is the location-wise share of the probe's decision relative
    to the average training image.

    Returns:
        A torchvision ResNet-18: N x 3 x S x S normalised input -> N x ``n_classes`` logits.
    """
    fc = probe_linear_layer(pipeline, n_classes, centred)  # checks the pipeline
    model = copy.deepcopy(encoder)
    device = next(model.parameters()).device
    if centred:
        block = target_layer(model)
        if not isinstance(block, BasicBlock):
            raise GradCamError(f"a centred probe needs a ResNet-18 (BasicBlock layer4), found {type(block).__name__}")
        mean = torch.from_numpy(_scaler_mean(pipeline.steps[0][1], fc.in_features))
        model.layer4[-1] = CentredBlock(block, mean).to(device)
    model.fc = fc.to(device)
    return model.eval()


def target_layer(model: nn.Module) -> nn.Module:
    """``model.layer4[-1]``, the layer every map here is taken from; a one-line error if the
    model has none (not a torchvision ResNet)."""
    layer4 = getattr(model, "layer4", None)
    if not isinstance(layer4, nn.Sequential) or len(layer4) == 0:
        raise GradCamError(f"cannot explain a {type(model).__name__}: Grad-CAM here needs a ResNet "
                           "with a layer4 (its last block is the target layer)")
    return layer4[-1]


@torch.no_grad()
def cam_grid(model: nn.Module, img_size: int) -> int:
    """Side of the ``layer4[-1]`` map for an ``img_size`` input (one dry forward pass);
    a one-line error if it is below :data:`MIN_CAM_GRID` (every map would be flat)."""
    layer = target_layer(model)
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        model(torch.zeros(1, 3, img_size, img_size, device=device))
    finally:
        handle.remove()
        model.train(was_training)
    side = min(seen[0])
    if side < MIN_CAM_GRID:
        need = 32 * (MIN_CAM_GRID - 1) + 1
        raise GradCamError(f"--img_size {img_size}: layer4 is {seen[0][0]}x{seen[0][1]} there, so every "
                           f"Grad-CAM would be flat; use --img_size >= {need} (224 in the paper)")
    return side


def compute_cams(model: nn.Module, x: torch.Tensor, targets: Sequence[int], method: str = "gradcam",
                 batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM (``method`` in :data:`CAM_METHODS`) of ``model`` at ``layer4[-1]``.

    Args:
        model: a ResNet classifier; it is explained in eval mode and left as it was found.
        x: N x 3 x S x S float, normalised as the classifier's input.
        targets: N class ids to explain.

    Returns:
        cams: N x S x S float32 in [0, 1], the package's maps.
        logits: N x K float32, the model's output on ``x`` (its prediction = argmax).
    """
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if method not in CAM_METHODS:
        raise GradCamError(f"--cam {method}: expected one of {list(CAM_METHODS)}")
    if len(targets) != len(x):
        raise ValueError(f"{len(targets)} targets for {len(x)} images")
    layer = target_layer(model)
    was_training = model.training
    cam = getattr(pytorch_grad_cam, CAM_METHODS[method])(model=model, target_layers=[layer])
    cams, logits = [], []
    try:  # not `with cam`: the package's __exit__ swallows an IndexError
        with torch.enable_grad():
            for i in range(0, len(x), batch_size):
                # the input requires grad so that layer4's output does even when every weight
                # is frozen (the linear probe): the package reads the gradient from a hook on it
                xb = x[i:i + batch_size].detach().clone().requires_grad_(True)
                tb = [ClassifierOutputTarget(int(t)) for t in targets[i:i + batch_size]]
                cams.append(cam(input_tensor=xb, targets=tb))
                logits.append(cam.outputs.detach().float().cpu().numpy())
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)  # the package's backward leaves gradients on the weights
        model.train(was_training)
    if not cams:
        return np.zeros((0,) + tuple(x.shape[-2:]), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(cams).astype(np.float32), np.concatenate(logits)


# --------------------------------------------------------------------------- #
# a classifier on disk (I/O)
# --------------------------------------------------------------------------- #
CLASSIFIER_KIND = "aclus_classifier"


def save_classifier(model: nn.Module, path: str | os.PathLike, classes: Sequence[str], **meta) -> Path:
    """A weights-only file: ``{kind, state_dict (the ResNet-18 with its K-way fc, CPU), classes,
    **meta}`` with plain values only, readable by :func:`load_classifier` without code execution."""
    from utils.io import atomic_torch_save

    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"kind": CLASSIFIER_KIND, "state_dict": state, "classes": list(classes), **meta}
    atomic_torch_save(payload, path)
    return Path(path)


def load_classifier(path: str | os.PathLike) -> tuple[nn.Module, tuple[str, ...], dict]:
    """Read a :func:`save_classifier` file (``utils.checkpoint.safe_torch_load``).

    Returns:
        (ResNet-18 with a ``len(classes)``-way ``fc`` in eval mode, class names, the other entries).
    """
    import torchvision

    from utils.checkpoint import safe_torch_load

    obj = safe_torch_load(path, "classifier")
    if not isinstance(obj, dict) or obj.get("kind") != CLASSIFIER_KIND:
        found = obj.get("kind", "a dict without 'kind'") if isinstance(obj, dict) else type(obj).__name__
        raise GradCamError(f"{path}: expected a classifier saved by evaluation_aclus.py --save_classifiers "
                           f"('{CLASSIFIER_KIND}'), found {found!r}")
    classes, state = obj.get("classes"), obj.get("state_dict")
    if (not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes)
            or not isinstance(state, dict)):
        raise GradCamError(f"{path}: a classifier needs 'classes' (>= 2 names) and a 'state_dict'")
    if not any(k.startswith("layer4.") for k in state):
        raise GradCamError(f"{path}: cannot explain this classifier: its weights have no layer4 "
                           "(Grad-CAM here needs a ResNet-18)")
    model = torchvision.models.resnet18(num_classes=len(classes))
    centring = f"layer4.{len(model.layer4) - 1}.feature_mean"  # a centred linear probe (CentredBlock)
    try:
        if isinstance(state.get(centring), torch.Tensor):
            model.layer4[-1] = CentredBlock(model.layer4[-1], state[centring])
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GradCamError(f"{path}: not a ResNet-18 with {len(classes)} classes ({first})") from None
    meta = {k: v for k, v in obj.items() if k not in ("kind", "state_dict", "classes")}
    return model.eval(), tuple(classes), meta
