"""Loading a ResNet-18 encoder from whatever file a user hands us.

Accepted, all read with ``torch.load(weights_only=True)``:

* a pre-training checkpoint written by ``pretrain_aclus.py`` (``kind == 'aclus_pretrain'``):
  the ONLINE encoder is taken (the EMA target is for training only);
* an exported encoder from ``pretrain_aclus.py`` (``encoder_resnet18.pth``): a plain
  torchvision ``resnet18`` state dict without ``fc``;
* any plain torchvision ResNet-18 state dict (``fc`` optional), also nested under
  ``state_dict``/``model`` and with a DDP ``module.`` prefix.

Anything else raises :class:`utils.io.DataError` saying what was found.
"""
from __future__ import annotations

import os

import torch
import torchvision

from utils.checkpoint import nonfinite_entries, safe_torch_load
from utils.io import DataError

#: prefix of the online ResNet-18 inside the ACLUS model's state dict
ONLINE_RESNET_PREFIX = "encoder.resnet."
#: input normalisation of every encoder here: the paper's evaluation protocol (Normalize(0.5, 0.25)),
#: used by pre-training too, so that an exported encoder sees the same statistics in both
NORM_MEAN = (0.5, 0.5, 0.5)
NORM_STD = (0.25, 0.25, 0.25)
PRETRAIN_KIND = "aclus_pretrain"


def resnet18_shapes() -> dict[str, tuple[int, ...]]:
    """Every entry of a torchvision ResNet-18 state dict but ``fc``, with its shape."""
    return {k: tuple(v.shape) for k, v in torchvision.models.resnet18().state_dict().items()
            if not k.startswith("fc.")}


def resnet18_keys(with_fc: bool = False) -> set[str]:
    keys = set(torchvision.models.resnet18().state_dict().keys())
    return keys if with_fc else {k for k in keys if not k.startswith("fc.")}


def _strip_prefix(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def extract_resnet18_state(obj, source: str = "<object>") -> dict[str, torch.Tensor]:
    """Return a torchvision ResNet-18 state dict (without ``fc``) from a loaded object.

    Args:
        obj: what ``torch.load`` returned.
        source: file name used in error messages.
    """
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a checkpoint dict or a state dict, found {type(obj).__name__}")
    kind = obj.get("kind")
    if kind == PRETRAIN_KIND:
        if not isinstance(obj.get("model"), dict):
            raise DataError(f"{source}: a '{PRETRAIN_KIND}' checkpoint without its 'model' entry")
        sd = _strip_prefix(obj["model"], ONLINE_RESNET_PREFIX)
    elif isinstance(kind, str):
        raise DataError(f"{source}: this is a '{kind}' checkpoint, not a ResNet-18 encoder "
                        f"(expected a '{PRETRAIN_KIND}' checkpoint, an exported encoder, "
                        "or a torchvision resnet18 state dict)")
    else:
        sd = obj
        for nest in ("state_dict", "model"):
            if isinstance(sd.get(nest), dict):
                sd = sd[nest]
        if any(k.startswith("module.") for k in sd):
            sd = _strip_prefix(sd, "module.")
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    expected = resnet18_keys()
    missing, unexpected = expected - sd.keys(), sd.keys() - expected
    if missing or unexpected:
        example = sorted(unexpected)[:3] or sorted(missing)[:3]
        raise DataError(f"{source}: not a ResNet-18 encoder ({len(missing)} ResNet-18 keys missing, "
                        f"{len(unexpected)} unexpected keys, e.g. {example})")
    shapes = resnet18_shapes()
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise DataError(f"{source}: entry '{k}' is a {type(v).__name__}, not a tensor")
        if tuple(v.shape) != shapes[k]:
            hint = " (a first convolution for another number of input channels)" if k == "conv1.weight" else ""
            raise DataError(f"{source}: entry '{k}' has shape {tuple(v.shape)}, a ResNet-18 here has "
                            f"{shapes[k]}{hint}")
    bad = nonfinite_entries(sd)
    if bad:
        raise DataError(f"{source}: holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]!r}); "
                        "the run that wrote it diverged")
    return sd


def load_resnet18_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read ``path`` safely and return a ResNet-18 state dict without ``fc``."""
    return extract_resnet18_state(safe_torch_load(path, "checkpoint"), str(path))


def build_resnet18(num_classes: int = 1000, state: dict[str, torch.Tensor] | None = None) -> torchvision.models.ResNet:
    """A torchvision ResNet-18 with a fresh ``fc`` and, optionally, encoder weights ``state``
    (as returned by :func:`load_resnet18_state`; None = random init)."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) == {"fc.weight", "fc.bias"}, (missing, unexpected)
    return model
