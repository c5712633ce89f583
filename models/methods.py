"""The pre-training methods, each described once as data.

The data set, the model and the training script read a :class:`Method` instead of
branching on its name, so a variant is one new entry in :data:`METHODS`.
"""
from __future__ import annotations

from dataclasses import dataclass

POOLINGS = ("regions", "global")
PAIR_LOSSES = ("infonce", "regression")
HEADS = ("aclus", "lightly")


@dataclass(frozen=True)
class Method:
    name: str
    #: "regions": features mask-pooled at the 4 scales of ResNet-18 + FPN (C5, P4, P3, P2);
    #: "global": global average pool of C5 only (plain ResNet-18, no FPN is built)
    pooling: str
    #: one region = the whole view; the anatomy masks are neither read nor needed
    whole_image: bool
    #: loss between the two views: "infonce" (DetCon-B) or "regression" (BYOL, 2 - 2 cos)
    pair_loss: str
    #: anatomy context prediction on the damaged overlap of the two crops (ACLUS)
    context: bool
    summary: str
    #: whose projection / prediction heads and pair loss: "aclus" (models/backbone.MLP and
    #: models/losses) or "lightly" (lightly's BYOL heads and NegativeCosineSimilarity: the
    #: reference implementation the study's own BYOL is compared with)
    heads: str = "aclus"
    #: factor on lightly's BYOL loss (lightly heads only; 1: its own loss). ``lightly_byol_x2`` sets 2:
    #: lightly's loss is ``-cos`` where ours is ``2 - 2 cos``, so with 2 its gradient is our byol's
    loss_scale: float = 1.0

    def __post_init__(self):
        if not self.loss_scale > 0:
            raise ValueError(f"method {self.name!r}: loss_scale={self.loss_scale!r}, expected a positive number")
        if self.loss_scale != 1.0 and self.heads != "lightly":
            raise ValueError(f"method {self.name!r}: loss_scale scales lightly's BYOL loss only (heads='lightly')")
        for key, value, allowed in (("pooling", self.pooling, POOLINGS), ("pair_loss", self.pair_loss, PAIR_LOSSES),
                                    ("heads", self.heads, HEADS)):
            if value not in allowed:
                raise ValueError(f"method {self.name!r}: {key}={value!r}, expected one of {list(allowed)}")
        if self.heads == "lightly" and (self.pooling, self.pair_loss, self.context) != ("global", "regression", False):
            raise ValueError(f"method {self.name!r}: lightly's heads exist for global BYOL only")
        if self.context and self.pooling != "regions":
            raise ValueError(f"method {self.name!r}: the context term needs region pooling")


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("aclus", "regions", False, "infonce", True,
           "DetCon-B InfoNCE on anatomy masks at 4 scales + anatomy context prediction"),
    Method("detcon", "regions", False, "infonce", False,
           "DetCon-B InfoNCE on anatomy masks at 4 scales"),
    Method("byol", "global", True, "regression", False,
           "classic BYOL: global-average-pooled C5 of a plain ResNet-18"),
    Method("byol_fpn", "regions", True, "regression", False,
           "BYOL's loss on one whole-image region at the 4 scales of ResNet-18 + FPN"),
    Method("lightly_byol", "global", True, "regression", False,
           "classic BYOL with lightly's projection / prediction heads and loss (our data, views, "
           "optimizer, schedule, EMA)", heads="lightly"),
    Method("lightly_byol_x2", "global", True, "regression", False,
           "lightly_byol with its loss doubled: the gradient of our byol's 2 - 2 cos (does the loss scale "
           "explain the byol / lightly_byol gap?)", heads="lightly", loss_scale=2.0),
)}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; expected one of {list(METHODS)}") from None
