"""Label-efficient segmentation downstream: a pre-trained ResNet-18 under a semantic FPN decoder.

The CLI is ``evaluation_segmentation.py``; this module holds its parts, free of I/O where
they can be:

* data: one data set of a SAMUS-layout root (``<root>/<Dataset>/{img,label}``,
  ``MainPatient/{train,val,test}.txt``, ``class.json``), each image once with its whole index
  map (a split lists an image once per class it shows), letterboxed to the input size with
  the label by nearest neighbour (:func:`load_split`);
* label subsets: per seed, fixed, nested and class-balanced shares of the training images
  (:func:`label_subsets`);
* model: the pre-training trunk itself (``models.backbone.MultiScaleEncoder``: ResNet-18 +
  torchvision's FPN), its ResNet loaded through the evaluation's loader, the FPN new, and a
  semantic-FPN head (Kirillov et al., 2019: every level to 1/4, summed, one 3x3 conv, 1x1 to
  the classes, upsampled x4) (:class:`SegNet`); ``frozen`` trains the FPN and head only
  (the ResNet's BatchNorm statistics frozen too), ``finetune`` everything;
* training with model selection on the validation split's mean Dice, and Dice / IoU / HD95
  per class and their mean on the test split (``SAM.seg_metrics.MetricTable``; an image
  without a class does not enter that class's means).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.backbone import C5_DIM, FPN_DIM, MultiScaleEncoder
from models.encoder_io import NORM_MEAN, NORM_STD
from SAM.samus_data import check_files, letterbox, read_class_json, read_split
from SAM.seg_metrics import MetricTable, dice_iou
from utils.io import DataError, read_image, read_label

VARIANTS = ("frozen", "finetune")
#: data sets that also train A-SAM (SAM/config.py tasks HC18, USGRA): a leak for the *_asam arms
ASAM_TRAINING_SETS = ("FetalHead-HC18", "Nerve-USGRA")
FRACTIONS = (0.1, 0.25, 1.0)


# --------------------------------------------------------------------------- #
# data
# --------------------------------------------------------------------------- #
@dataclass
class SegSplit:
    """``X``: N x 3 x S x S uint8 (letterboxed), ``Y``: N x S x S int64 (0 = background; -1 =
    padding, ignored), ``names``: the image names."""
    X: np.ndarray
    Y: np.ndarray
    names: list[str]


def load_split(root: str | Path, split: str, dataset: str, size: int) -> SegSplit:
    """Every image of ``dataset`` that ``MainPatient/<split>.txt`` names, once, with its label."""
    root = Path(root)
    lines = check_files(root, read_split(root, split, (dataset,)), f"{root}/MainPatient/{split}.txt")
    names = list(dict.fromkeys(line.name for line in lines))       # an image is listed once per class
    num_classes = read_class_json(root)[dataset]
    X, Y = [], []
    for name in names:
        img = read_image(root / dataset / "img" / f"{name}.png", "rgb")
        lab = read_label(root / dataset / "label" / f"{name}.png")
        if lab.shape != img.shape[:2]:
            raise DataError(f"{root / dataset / 'label' / name}.png: label {lab.shape} and image "
                            f"{img.shape[:2]} differ in size")
        if lab.max() >= num_classes:
            raise DataError(f"{root / dataset / 'label' / name}.png: label value {lab.max()} outside "
                            f"0..{num_classes - 1} (class.json)")
        x, (h, w) = letterbox(img, size)
        y, _ = letterbox(lab.astype(np.int16), size, nearest=True)
        y = y.astype(np.int64)
        y[h:, :], y[:, w:] = -1, -1                                     # padding is no class
        X.append(x.transpose(2, 0, 1))
        Y.append(y)
    return SegSplit(np.stack(X), np.stack(Y), names)


def strata(Y: np.ndarray) -> list[str]:
    """The stratum of each label map: the set of foreground classes it shows ("1+2", "" = none)."""
    return ["+".join(str(c) for c in np.unique(y) if c > 0) for y in Y]


def label_subsets(groups: list[str], fractions: tuple[float, ...], seed: int) -> dict[float, np.ndarray]:
    """Indices of the training images kept at each fraction: within each stratum one seeded
    order, of which the first ceil(fraction * n) are kept (at least one). So every subset keeps
    each stratum's share (class-balanced), a smaller fraction's subset lies inside a larger one's
    (nested), and a seed fixes them all."""
    rng = np.random.default_rng(seed)
    order = {g: rng.permutation(np.flatnonzero(np.array(groups) == g)) for g in sorted(set(groups))}
    return {f: np.sort(np.concatenate([idx[:max(1, math.ceil(f * len(idx)))] for idx in order.values()]))
            for f in fractions}


# --------------------------------------------------------------------------- #
# model
# --------------------------------------------------------------------------- #
class SegNet(nn.Module):
    """ResNet-18 + FPN (the pre-training trunk) + a semantic-FPN head.

    ``forward(x)``: (N, 3, S, S) -> logits (N, num_classes, S, S)."""

    def __init__(self, num_classes: int, state: dict[str, torch.Tensor] | None = None, width: int = 128):
        super().__init__()
        self.encoder = MultiScaleEncoder(pretrained=False, fpn=True)
        if state is not None:
            self.encoder.resnet.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")},
                                                strict=False)
        self.lateral = nn.ModuleDict({s: nn.Conv2d(C5_DIM if s == "c5" else FPN_DIM, width, 1)
                                      for s in ("c5", "p4", "p3", "p2")})
        self.head = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.Conv2d(width, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        p2 = feats["p2"]                                                # N x 256 x S/4
        fused = sum(F.interpolate(self.lateral[s](f), size=p2.shape[-2:], mode="bilinear", align_corners=False)
                    for s, f in feats.items())                          # N x width x S/4
        return F.interpolate(self.head(fused), size=x.shape[-2:], mode="bilinear", align_corners=False)


def trainable(model: SegNet, variant: str) -> list[nn.Parameter]:
    """``frozen``: the ResNet's weights and BatchNorm statistics stay as loaded (call
    :func:`set_train` for the mode); ``finetune``: everything trains."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}; expected one of {VARIANTS}")
    frozen = variant == "frozen"
    for p in model.encoder.resnet.parameters():
        p.requires_grad_(not frozen)
    return [p for p in model.parameters() if p.requires_grad]


def set_train(model: SegNet, variant: str) -> None:
    model.train()
    if variant == "frozen":
        model.encoder.resnet.eval()                                     # BatchNorm statistics kept


# --------------------------------------------------------------------------- #
# training, selection, metrics
# --------------------------------------------------------------------------- #
_MEAN, _STD = torch.tensor(NORM_MEAN).view(1, 3, 1, 1), torch.tensor(NORM_STD).view(1, 3, 1, 1)


def to_input(X: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 N x 3 x S x S -> normalised as in pre-training and the classification evaluation."""
    return ((torch.from_numpy(X).float().div_(255) - _MEAN) / _STD).to(device)


def seg_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice over the foreground classes; label -1 (padding) ignored."""
    ce = F.cross_entropy(logits, y, ignore_index=-1)
    valid = (y >= 0).unsqueeze(1)
    prob = logits.softmax(1) * valid
    onehot = F.one_hot(y.clamp(min=0), logits.shape[1]).permute(0, 3, 1, 2) * valid
    inter = (prob * onehot).sum((0, 2, 3))[1:]
    denom = (prob + onehot).sum((0, 2, 3))[1:]
    return ce + (1 - (2 * inter + 1) / (denom + 1)).mean()


@torch.no_grad()
def predict(model: nn.Module, X: np.ndarray, device: torch.device, batch: int = 16) -> np.ndarray:
    model.eval()
    return np.concatenate([model(to_input(X[i:i + batch], device)).argmax(1).cpu().numpy()
                           for i in range(0, len(X), batch)])


def score(pred: np.ndarray, Y: np.ndarray, num_classes: int) -> dict:
    """Dice / IoU / HD95 per foreground class (keys "1".."C-1") and their mean, inside the content."""
    table = MetricTable()
    for p, y in zip(pred, Y):
        rows, cols = np.flatnonzero((y >= 0).any(1)), np.flatnonzero((y >= 0).any(0))
        p, y = p[:rows[-1] + 1, :cols[-1] + 1], y[:rows[-1] + 1, :cols[-1] + 1]
        for c in range(1, num_classes):
            table.add(str(c), p == c, y == c)
    return table.summary()


def image_dice(pred: np.ndarray, Y: np.ndarray, num_classes: int) -> list[dict[str, float]]:
    """Per image, the Dice of each foreground class its label shows ({"1": 0.91, ...}; a class
    the image lacks is left out, as in :func:`score`)."""
    out = []
    for p, y in zip(pred, Y):
        valid = y >= 0
        out.append({str(c): dice_iou((p == c) & valid, y == c)[0] for c in range(1, num_classes) if (y == c).any()})
    return out


def fit(model: SegNet, variant: str, train: SegSplit, val: SegSplit, num_classes: int, *, epochs: int,
        batch_size: int, lr: float, seed: int, device: torch.device) -> dict:
    """Train; keep the epoch with the best validation mean Dice (the first best). -> record."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(trainable(model, variant), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    best, best_state, curve = -1.0, None, []
    for epoch in range(epochs):
        set_train(model, variant)
        order, losses = rng.permutation(len(train.X)), []
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2 and len(order) >= 2:
                continue                                                # BatchNorm needs two images
            x, y = to_input(train.X[idx], device), torch.from_numpy(train.Y[idx]).to(device)
            if rng.random() < 0.5:                                      # horizontal flip
                x, y = x.flip(-1), y.flip(-1)
            loss = seg_loss(model(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite segmentation loss at epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
        dice = score(predict(model, val.X, device), val.Y, num_classes)["mean"]["dice"]
        curve.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None, "val_dice": dice})
        if dice > best:
            best, best_state = dice, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    selected = next((c["epoch"] for c in curve if c["val_dice"] == best), None)
    return {"selected_epoch": selected, "val_dice": best, "curve": curve}
