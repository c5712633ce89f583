"""ACLUS: anatomy-level contrastive learning + anatomy context prediction.

One module holds the whole method (online and target networks, region sampling,
mask pooling, losses); ``pretrain_aclus.py`` is a plain training loop around it.
Which parts run is declared by the method (:mod:`models.methods`):

* ``aclus``    = DetCon-B InfoNCE on 4 scales + context prediction on the crops' overlap
* ``detcon``   = the same without the context term
* ``byol``     = classic BYOL: global-average-pooled C5 of a plain ResNet-18
* ``byol_fpn`` = BYOL's loss on one whole-image region at the 4 scales
* ``lightly_byol`` = classic BYOL with lightly's heads and loss (the study's reference
  implementation of BYOL, written by nobody here); ``lightly_byol_x2`` the same with its
  loss doubled, i.e. our ``byol``'s gradient scale

Per step: the online and the target networks see view 1 and view 2 batched into
one pass. For ``aclus`` they also see the overlap of the two crops, damaged
(online) and clean (target), in a second pass whose BatchNorm layers normalise by
that pass's own batch statistics and leave the running statistics untouched, so that
damaged images never enter the clean views' batch statistics nor the running
statistics of the exported encoder (``context_batchnorm="running"``, inference mode,
made the term trivial: a target from another image scored as well,
``benchmarks/measure_context_task.py``). ``update_target`` is called once per
optimizer step by the training loop.

No step reads a value back from the device but one (which images' crops overlap, for the
context pass with batch statistics; none with ``context_batchnorm="running"``): label ids are bounded by ``num_ids``
(``data.max_mask_ids``; the loader numbers each image's ids 0..n-1 and refuses masks
with more, :func:`pretraining.data.relabel_mask`), so every shape is known on the host.
On CUDA the encoders may run in channels-last memory format (:meth:`ACLUS.set_channels_last`).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from models.backbone import C5_DIM, FPN_DIM, MLP, SCALES, MultiScaleEncoder
from models.losses import (byol_loss, context_loss, detcon_infonce, label_grids, mask_pool, region_present,
                           sample_region_ids)
from models.methods import get_method

if TYPE_CHECKING:
    from pretraining.config import PretrainConfig


@contextmanager
def batchnorm_inference(*modules: nn.Module):
    """BatchNorm layers of ``modules`` use (and do not update) their running statistics."""
    bns = [m for module in modules for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [bn.training for bn in bns]
    for bn in bns:
        bn.train(False)
    try:
        yield
    finally:
        for bn, mode in zip(bns, modes):
            bn.train(mode)


@contextmanager
def batchnorm_batch_statistics(*modules: nn.Module):
    """BatchNorm layers of ``modules`` normalise by the batch's statistics and do not update
    (nor count into) their running statistics."""
    bns = [m for module in modules for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    states = [(bn.training, bn.track_running_stats) for bn in bns]
    for bn in bns:
        bn.train(True)
        bn.track_running_stats = False      # torch then passes no running buffers to the kernel
    try:
        yield
    finally:
        for bn, (mode, track) in zip(bns, states):
            bn.train(mode)
            bn.track_running_stats = track


CONTEXT_BATCHNORM = {"batch": batchnorm_batch_statistics, "running": batchnorm_inference}


class ACLUS(nn.Module):
    def __init__(self, method: str = "aclus", pretrained: bool = False, proj_hidden: int = 1024,
                 proj_dim: int = 256, pred_hidden: int = 4096, num_rois: int = 16,
                 temperature: float = 0.1, sample_by_area: bool = False, include_background: bool = True,
                 context_weight: float = 1.0, context_loss: str = "cosine", num_ids: int = 64,
                 context_batchnorm: str = "batch"):
        super().__init__()
        self.spec = get_method(method)
        self.method = method
        self.num_rois = 1 if self.spec.whole_image else num_rois
        self.temperature = temperature
        self.sample_by_area = sample_by_area
        # a whole-image region is id 0: it must stay eligible
        self.include_background = include_background or self.spec.whole_image
        self.context_weight = context_weight
        self.context_loss = context_loss
        if context_batchnorm not in CONTEXT_BATCHNORM:
            raise ValueError(f"context_batchnorm {context_batchnorm!r}: expected one of {list(CONTEXT_BATCHNORM)}")
        self.context_batchnorm = context_batchnorm
        # the bound on label ids per image (whole-image methods: the one id 0)
        self.num_ids = 1 if self.spec.whole_image else num_ids
        self.memory_format = torch.contiguous_format
        regions = self.spec.pooling == "regions"

        self.encoder = MultiScaleEncoder(pretrained, fpn=regions)
        if self.spec.heads == "lightly":
            from lightly.loss import NegativeCosineSimilarity
            from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

            self.projector_c5 = BYOLProjectionHead(C5_DIM, proj_hidden, proj_dim)
            self.predictor = BYOLPredictionHead(proj_dim, pred_hidden, proj_dim)
            self.lightly_criterion = NegativeCosineSimilarity()
        else:
            self.projector_c5 = MLP(C5_DIM, proj_hidden, proj_dim)
            self.predictor = MLP(proj_dim, pred_hidden, proj_dim)
        # shared by P4, P3, P2; not built for the global method (DDP needs every parameter used)
        self.projector_fpn = MLP(FPN_DIM, proj_hidden, proj_dim) if regions else None

        self.target_encoder = copy.deepcopy(self.encoder)
        self.target_projector_c5 = copy.deepcopy(self.projector_c5)
        self.target_projector_fpn = copy.deepcopy(self.projector_fpn)
        for p in self.target_parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ EMA
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target) module pairs; the target is the EMA of the online one."""
        pairs = [(self.encoder, self.target_encoder), (self.projector_c5, self.target_projector_c5)]
        if self.projector_fpn is not None:
            pairs.append((self.projector_fpn, self.target_projector_fpn))
        return pairs

    def target_parameters(self):
        for _, target in self.momentum_pairs():
            yield from target.parameters()

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target <- m * target + (1 - m) * online; buffers (BN statistics) are copied."""
        online_p, target_p, online_b, target_b = [], [], [], []
        for online, target in self.momentum_pairs():
            online_p += list(online.parameters())
            target_p += list(target.parameters())
            online_b += list(online.buffers())
            target_b += list(target.buffers())
        torch._foreach_copy_(target_b, online_b)  # one multi-tensor launch instead of one per buffer
        torch._foreach_lerp_(target_p, online_p, 1.0 - momentum)

    # ------------------------------------------------------------------ encoders
    def set_channels_last(self, enabled: bool = True) -> ACLUS:
        """Online and target encoders (and their inputs) in channels-last memory format:
        NHWC convolutions on tensor cores, without the layout transposes that NCHW costs."""
        self.memory_format = torch.channels_last if enabled else torch.contiguous_format
        for enc in (self.encoder, self.target_encoder):
            enc.to(memory_format=self.memory_format)
        return self

    def _encode(self, encoder: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return encoder(x.contiguous(memory_format=self.memory_format))

    # ------------------------------------------------------------------ heads
    def _project(self, scale: str, pooled: torch.Tensor, target: bool) -> torch.Tensor:
        if scale == "c5":
            head = self.target_projector_c5 if target else self.projector_c5
        else:
            head = self.target_projector_fpn if target else self.projector_fpn
        return head(pooled)

    def _heads(self, scale: str, pooled_on: torch.Tensor, pooled_tg: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Online prediction and target projection of pooled features (..., C) -> (..., D)."""
        pred = self.predictor(self._project(scale, pooled_on, target=False))
        with torch.no_grad():
            proj = self._project(scale, pooled_tg, target=True)
        return pred, proj

    # ------------------------------------------------------------------ regions
    def region_masks(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Label maps of view 1, view 2 (and the overlap view): all zeros for whole-image methods."""
        keys = ["mask1", "mask2"] + (["ctx_mask"] if self.spec.context else [])
        masks = [batch[k] for k in keys]
        return [torch.zeros_like(m) for m in masks] if self.spec.whole_image else masks

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, torch.Tensor],
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the training loss of one batch.

        Args:
            batch: ``view1``, ``view2``: (B, 3, S, S) float images; ``mask1``, ``mask2``:
                (B, S, S) int64 label maps (same geometry as their views). For ``aclus``
                also ``ctx_damaged``, ``ctx_clean``: (B, 3, S, S) the overlap of the two
                crops, damaged / clean; ``ctx_mask``: (B, S, S); ``ctx_valid``: (B,) bool,
                False where the crops do not overlap.
            generator: random generator for the region draws.

        Returns:
            loss: scalar; stats: detached per-term, per-scale values for logging.
        """
        if self.spec.heads == "lightly":
            return self._forward_lightly(batch)
        if self.spec.pooling == "global":
            return self._forward_global(batch)
        return self._forward_regions(batch, generator)

    def _forward_global(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        views = torch.cat([batch["view1"], batch["view2"]])                 # 2B x 3 x S x S
        pooled_on = self._encode(self.encoder, views)["c5"].mean(dim=(2, 3))[:, None]     # 2B x 1 x 512
        with torch.no_grad():
            pooled_tg = self._encode(self.target_encoder, views)["c5"].mean(dim=(2, 3))[:, None]
        pred, proj = self._heads("c5", pooled_on, pooled_tg)                 # 2B x 1 x D
        pred_a, pred_b = pred.chunk(2)
        proj_a, proj_b = proj.chunk(2)
        loss = byol_loss(pred_a, pred_b, proj_a, proj_b, torch.ones_like(pred_a[..., 0]))
        return loss, {"regression/global": loss.detach(), "loss": loss.detach()}

    def _forward_lightly(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """lightly's BYOL step: its heads on pooled C5, ``0.5 * (NCS(p0, z1) + NCS(p1, z0))``
        (negative cosine similarity, in [-1, 1]; ours is its ``2 + 2 x``, so twice the gradient),
        times the method's ``loss_scale``."""
        views = torch.cat([batch["view1"], batch["view2"]])                 # 2B x 3 x S x S
        pred = self.predictor(self.projector_c5(self._encode(self.encoder, views)["c5"].mean(dim=(2, 3))))
        with torch.no_grad():                                                # 2B x D each
            proj = self.target_projector_c5(self._encode(self.target_encoder, views)["c5"].mean(dim=(2, 3)))
        p0, p1 = pred.chunk(2)
        z0, z1 = proj.chunk(2)
        loss = self.spec.loss_scale * 0.5 * (self.lightly_criterion(p0, z1) + self.lightly_criterion(p1, z0))
        return loss, {"regression/global": loss.detach(), "loss": loss.detach()}

    def _forward_regions(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        spec = self.spec
        b = batch["view1"].shape[0]
        masks = self.region_masks(batch)
        labels = torch.cat(masks)                                           # V*B x S x S
        num_ids = self.num_ids
        # a device-side check (no synchronisation): the loader keeps ids below the bound
        torch._assert_async((labels.max() < num_ids) & (labels.min() >= 0))

        views = torch.cat([batch["view1"], batch["view2"]])                 # 2B x 3 x S x S
        online = self._encode(self.encoder, views)
        with torch.no_grad():
            target = self._encode(self.target_encoder, views)

        sizes = [tuple(online[s].shape[-2:]) for s in SCALES]
        order = sorted(range(len(SCALES)), key=lambda i: -sizes[i][0] * sizes[i][1])  # finest first
        grids_sorted, areas = label_grids(labels, [sizes[i] for i in order], num_ids, return_areas=True)
        grids = {SCALES[i]: g for i, g in zip(order, grids_sorted)}         # V*B x h x w each
        # ids drawn once per image among those of both views, from the pixel areas of the full
        # maps (= id_areas of mask1 / mask2, which label_grids counted already)
        ids, roi_w = sample_region_ids(areas[:b], areas[b:2 * b], self.num_rois, self.sample_by_area,
                                       self.include_background, generator)  # B x K
        ids_views = ids.repeat(2, 1)                                        # 2B x K

        pair_name = "contrast" if spec.pair_loss == "infonce" else "regression"
        stats: dict[str, torch.Tensor] = {}
        total = online["c5"].new_zeros((), dtype=torch.float32)
        for s in SCALES:
            g = grids[s][:2 * b]                                            # 2B x h x w
            present = region_present(g, ids_views, num_ids)                 # 2B x K
            w = roi_w * (present[:b] & present[b:])                         # B x K
            pred, proj = self._heads(s, mask_pool(online[s], g, ids_views), mask_pool(target[s], g, ids_views))
            pred_a, pred_b = pred.chunk(2)                                  # B x K x D each
            proj_a, proj_b = proj.chunk(2)
            if spec.pair_loss == "infonce":
                loss_s = detcon_infonce(pred_a, pred_b, proj_a, proj_b, ids, w, self.temperature)
            else:
                loss_s = byol_loss(pred_a, pred_b, proj_a, proj_b, w)
            stats[f"{pair_name}/{s}"] = loss_s.detach()
            stats[f"regions/{s}"] = (w > 0).float().mean().detach()  # share of draws kept at this scale
            total = total + loss_s

        if spec.context:
            terms = self._context_terms(batch, b, ids, roi_w, grids, num_ids)
            for s in SCALES:
                if terms is None:   # skipped, not zero-filled: too few images of the batch take part
                    stats[f"context/{s}"] = total.new_zeros(())
                    continue
                stats[f"context/{s}"] = terms[s].detach()
                total = total + self.context_weight * terms[s]
        stats["loss"] = total.detach()
        return total, stats

    def _context_terms(self, batch: dict[str, torch.Tensor], b: int, ids: torch.Tensor, roi_w: torch.Tensor,
                       grids: dict[str, torch.Tensor], num_ids: int) -> dict[str, torch.Tensor] | None:
        """The context term of every scale (with its graph), or None when the batch has too few
        overlapping images for batch statistics."""
        # damaged images stay out of the clean views' BatchNorm batch and of every running
        # statistic: this pass normalises by its own batch (damaged online, clean target)
        valid = batch["ctx_valid"]
        keep = slice(None)
        if self.context_batchnorm == "batch":
            # an image whose crops do not overlap must not enter this pass's batch
            # statistics: the pass takes the overlapping images only (one host read);
            # batch statistics need two images at least
            keep = valid.nonzero().squeeze(1)
            # under DDP every rank runs the pass (SyncBatchNorm is a collective that pools the
            # counts of all ranks, so a rank with 0 or 1 overlapping images is fine)
            if keep.shape[0] < 2 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                return None
        with CONTEXT_BATCHNORM[self.context_batchnorm](self):
            online_c = self._encode(self.encoder, batch["ctx_damaged"][keep])       # B' x 3 x S x S
            with torch.no_grad():
                target_c = self._encode(self.target_encoder, batch["ctx_clean"][keep])
            ids_c, w_c = ids[keep], (roi_w * valid[:, None])[keep]                  # B' x K
            terms = {}
            for s in SCALES:
                g = grids[s][2 * b:][keep]                                          # B' x h x w
                w = w_c * region_present(g, ids_c, num_ids)
                pred, proj = self._heads(s, mask_pool(online_c[s], g, ids_c), mask_pool(target_c[s], g, ids_c))
                terms[s] = context_loss(pred, proj, w, self.context_loss)
        return terms


def build_model(cfg: PretrainConfig) -> ACLUS:
    """Build the model of a loaded config; its head sizes were checked by ``pretraining.config``
    (the projection takes the FPN width, the predictor maps the projection's size to itself)."""
    m, loss = cfg.model, cfg.loss
    return ACLUS(
        method=m.method, pretrained=m.backbone.pretrained,
        proj_hidden=m.projection.hidden_dim, proj_dim=m.projection.output_dim,
        pred_hidden=m.predictor.hidden_dim, num_rois=loss.mask_rois,
        temperature=loss.temperature, sample_by_area=loss.sample_by == "area",
        include_background=loss.include_background, context_weight=loss.context_weight,
        context_loss=loss.context_loss, num_ids=cfg.data.max_mask_ids,
        context_batchnorm=loss.context_batchnorm,
    )
