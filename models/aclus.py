"""ACLUS: anatomy-level contrastive learning + anatomy context prediction.

One module holds the whole method (online and target networks, mask pooling,
losses); ``pretrain_aclus.py`` is a plain training loop around it.

* ``aclus``  = DetCon-B InfoNCE on 4 scales + context prediction on the crops' overlap
* ``detcon`` = the same without the context term
* ``byol``   = one whole-image mask per view and BYOL's regression loss

Per step: the online network sees view 1, view 2 (and the damaged overlap view),
batched into one forward pass; the target network sees the same views (the
clean overlap view) without gradient. ``update_target`` is called once per
optimizer step by the training loop.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from models.backbone import C5_DIM, FPN_DIM, SCALES, MLP, MultiScaleEncoder
from models.losses import detcon_infonce, id_areas, label_grids, mask_pool, regression_loss, sample_mask_ids


class ACLUS(nn.Module):
    def __init__(self, method: str = "aclus", pretrained: bool = False, proj_hidden: int = 1024,
                 proj_dim: int = 256, pred_hidden: int = 4096, num_rois: int = 16,
                 temperature: float = 0.1, sample_by_area: bool = False, context_weight: float = 1.0):
        super().__init__()
        if method not in ("aclus", "detcon", "byol"):
            raise ValueError(f"unknown method {method!r}")
        self.method = method
        self.num_rois = 1 if method == "byol" else num_rois
        self.temperature = temperature
        self.sample_by_area = sample_by_area
        self.context_weight = context_weight

        self.encoder = MultiScaleEncoder(pretrained)
        self.projector_c5 = MLP(C5_DIM, proj_hidden, proj_dim)
        self.projector_fpn = MLP(FPN_DIM, proj_hidden, proj_dim)  # shared by P4, P3, P2
        self.predictor = MLP(proj_dim, pred_hidden, proj_dim)

        self.target_encoder = copy.deepcopy(self.encoder)
        self.target_projector_c5 = copy.deepcopy(self.projector_c5)
        self.target_projector_fpn = copy.deepcopy(self.projector_fpn)
        for p in self.target_parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ EMA
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target) module pairs; the target is the EMA of the online one."""
        return [(self.encoder, self.target_encoder),
                (self.projector_c5, self.target_projector_c5),
                (self.projector_fpn, self.target_projector_fpn)]

    def target_parameters(self):
        for _, target in self.momentum_pairs():
            yield from target.parameters()

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target <- m * target + (1 - m) * online; buffers (BN statistics) are copied."""
        online_p, target_p = [], []
        for online, target in self.momentum_pairs():
            online_p += list(online.parameters())
            target_p += list(target.parameters())
            for bo, bt in zip(online.buffers(), target.buffers()):
                bt.copy_(bo)
        torch._foreach_lerp_(target_p, online_p, 1.0 - momentum)

    # ------------------------------------------------------------------ forward
    def _project(self, scale: str, pooled: torch.Tensor, target: bool) -> torch.Tensor:
        if scale == "c5":
            head = self.target_projector_c5 if target else self.projector_c5
        else:
            head = self.target_projector_fpn if target else self.projector_fpn
        return head(pooled)

    def forward(self, batch: dict[str, torch.Tensor],
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the training loss of one batch.

        Args:
            batch: ``view1``, ``view2``: (B, 3, S, S) float images; ``mask1``, ``mask2``:
                (B, S, S) int64 label maps (same geometry as their views). For ``aclus``
                also ``ctx_damaged``, ``ctx_clean``: (B, 3, S, S) the overlap of the two
                crops, damaged / clean; ``ctx_mask``: (B, S, S); ``ctx_valid``: (B,) bool,
                False where the crops do not overlap.
            generator: random generator for the mask-id draws.

        Returns:
            loss: scalar; stats: detached per-term, per-scale values for logging.
        """
        use_ctx = self.method == "aclus"
        b = batch["view1"].shape[0]
        views = [batch["view1"], batch["view2"]]
        masks = [batch["mask1"], batch["mask2"]]
        if use_ctx:
            masks.append(batch["ctx_mask"])
        if self.method == "byol":
            masks = [torch.zeros_like(m) for m in masks]
        labels = torch.cat(masks)                                           # V*B x S x S

        online = self.encoder(torch.cat(views + ([batch["ctx_damaged"]] if use_ctx else [])))
        with torch.no_grad():
            target = self.target_encoder(torch.cat(views + ([batch["ctx_clean"]] if use_ctx else [])))

        num_ids = int(labels.max()) + 1
        sizes = [tuple(online[s].shape[-2:]) for s in SCALES]
        order = sorted(range(len(SCALES)), key=lambda i: -sizes[i][0] * sizes[i][1])  # finest first
        grids_sorted = label_grids(labels, [sizes[i] for i in order], num_ids)
        grids = {SCALES[i]: g for i, g in zip(order, grids_sorted)}

        stats: dict[str, torch.Tensor] = {}
        total = online["c5"].new_zeros((), dtype=torch.float32)
        for s in SCALES:
            g = grids[s].split(b)                                           # V x (B x h x w)
            areas = [id_areas(gi, num_ids) for gi in g]
            # ids present in both views, drawn once and used for both
            ids, w = sample_mask_ids(areas[0] * areas[1], self.num_rois, self.sample_by_area, generator)
            feats_on = online[s].split(b)
            feats_tg = target[s].split(b)
            pooled_on = torch.cat([mask_pool(feats_on[v], g[v], ids) for v in range(2)])  # 2B x K x C
            pooled_tg = torch.cat([mask_pool(feats_tg[v], g[v], ids) for v in range(2)])
            if use_ctx:
                ids_c, w_c = sample_mask_ids(areas[2], self.num_rois, self.sample_by_area, generator)
                w_c = w_c * batch["ctx_valid"][:, None].float()  # skip images without overlap
                pooled_on = torch.cat([pooled_on, mask_pool(feats_on[2], g[2], ids_c)])
                pooled_tg = torch.cat([pooled_tg, mask_pool(feats_tg[2], g[2], ids_c)])
            pred = self.predictor(self._project(s, pooled_on, target=False)).split(b)   # V x (B x K x D)
            with torch.no_grad():
                proj_tg = self._project(s, pooled_tg, target=True).split(b)

            if self.method == "byol":
                loss_s = 0.5 * (regression_loss(pred[0], proj_tg[1], w) + regression_loss(pred[1], proj_tg[0], w))
            else:
                loss_s = 0.5 * (detcon_infonce(pred[0], proj_tg[1], ids, w, self.temperature)
                                + detcon_infonce(pred[1], proj_tg[0], ids, w, self.temperature))
            stats[f"{'regression' if self.method == 'byol' else 'contrast'}/{s}"] = loss_s.detach()
            total = total + loss_s
            if use_ctx:
                loss_c = regression_loss(pred[2], proj_tg[2], w_c)
                stats[f"context/{s}"] = loss_c.detach()
                total = total + self.context_weight * loss_c
        stats["loss"] = total.detach()
        return total, stats


def build_model(cfg: dict) -> ACLUS:
    """Build the model from a validated config (see ``utils.config``)."""
    m, loss = cfg["model"], cfg["loss"]
    if m["projection"]["input_dim"] != FPN_DIM:
        raise ValueError(f"model.projection.input_dim must be {FPN_DIM} (the FPN width); "
                         f"got {m['projection']['input_dim']}")
    if m["predictor"]["input_dim"] != m["projection"]["output_dim"]:
        raise ValueError("model.predictor.input_dim must equal model.projection.output_dim")
    return ACLUS(
        method=m["method"], pretrained=m["backbone"]["pretrained"],
        proj_hidden=m["projection"]["hidden_dim"], proj_dim=m["projection"]["output_dim"],
        pred_hidden=m["predictor"]["hidden_dim"], num_rois=loss["mask_rois"],
        temperature=loss["temperature"], sample_by_area=loss["sample_by"] == "area",
        context_weight=loss["context_weight"],
    )
