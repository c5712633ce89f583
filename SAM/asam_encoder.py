"""A-SAM image encoder: segment-anything's ``ImageEncoderViT`` adapted to 256 px ultrasound.

METHOD.md §1, as in SAMUS:

* the 16×16 patch kernel runs with stride 8, so a 256 px image gives 32×32 tokens;
* the absolute position embedding lives on that 32×32 grid (resized from the checkpoint);
* the relative-position tables of the global-attention blocks are sized for the 32×32 grid
  (interpolated from the checkpoint); windowed blocks keep theirs;
* a small CNN branch feeds every global block through a cross-attention ("space") adapter;
* a bottleneck MLP adapter (ratio 0.25, scale 0.5) sits beside the MLP of every block.

Every new branch ends in a zero-initialised projection, so before training the encoder
computes exactly what the resized SAM computes: stage 1 starts from SAM, not from noise.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from segment_anything.modeling.image_encoder import (Block, ImageEncoderViT, window_partition,
                                                     window_unpartition)


class MLPAdapter(nn.Module):
    """Bottleneck adapter: (B, H, W, D) -> (B, H, W, D), D -> ratio·D -> D."""

    def __init__(self, dim: int, ratio: float = 0.25):
        super().__init__()
        hidden = max(1, int(dim * ratio))
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)  # identity-preserving start
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class CrossAttentionAdapter(nn.Module):
    """ViT tokens attend to CNN-branch tokens in a narrow space.

    x: (B, H, W, D) ViT tokens; cnn: (B, h, w, C) CNN tokens -> (B, H, W, D) update.
    """

    def __init__(self, dim: int, cnn_dim: int, hidden: int, num_heads: int = 4):
        super().__init__()
        self.q = nn.Linear(dim, hidden)
        self.kv = nn.Linear(cnn_dim, 2 * hidden)
        self.attn = nn.MultiheadAttention(hidden, num_heads, batch_first=True)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, cnn: torch.Tensor) -> torch.Tensor:
        B, H, W, D = x.shape
        q = self.q(x.reshape(B, H * W, D))                       # B x HW x d
        k, v = self.kv(cnn.reshape(B, -1, cnn.shape[-1])).chunk(2, dim=-1)  # B x hw x d
        y, _ = self.attn(q, k, v, need_weights=False)
        return self.out(y).reshape(B, H, W, D)


class CNNBranch(nn.Module):
    """Image (B, 3, S, S) -> local-detail tokens (B, S/8, S/8, C): three stride-2 conv stages."""

    def __init__(self, out_dim: int = 128, in_chans: int = 3):
        super().__init__()
        chans = [in_chans, 32, 64, out_dim]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).permute(0, 2, 3, 1)


class AdaptedBlock(Block):
    """SAM ``Block`` plus an MLP adapter and, in global blocks, a CNN cross-attention adapter.

    Parameter names of the SAM part are unchanged, so SAM checkpoints load into it.
    """

    def __init__(self, *args, adapter_ratio: float = 0.25, adapter_scale: float = 0.5,
                 cnn_dim: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        dim = self.norm1.normalized_shape[0]
        self.adapter_scale = adapter_scale
        self.mlp_adapter = MLPAdapter(dim, adapter_ratio)
        self.space_adapter = (CrossAttentionAdapter(dim, cnn_dim, max(8, int(dim * adapter_ratio)))
                              if cnn_dim is not None else None)

    def forward(self, x: torch.Tensor, cnn: torch.Tensor | None = None) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (H, W))
        x = shortcut + x
        if self.space_adapter is not None and cnn is not None:
            x = x + self.space_adapter(x, cnn)
        xn = self.norm2(x)
        # adapter in parallel with the frozen MLP (AdaptFormer style), scaled by 0.5
        return x + self.mlp(xn) + self.adapter_scale * self.mlp_adapter(xn)


class ASAMImageEncoder(ImageEncoderViT):
    """A-SAM ViT: images (B, 3, S, S) normalised like SAM -> embeddings (B, out_chans, S/8, S/8)."""

    def __init__(self, img_size: int = 256, patch_size: int = 16, patch_stride: int = 8,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 global_attn_indexes: Sequence[int] = (2, 5, 8, 11), window_size: int = 14,
                 out_chans: int = 256, adapter_ratio: float = 0.25, adapter_scale: float = 0.5,
                 cnn_dim: int = 128, mlp_ratio: float = 4.0):
        # patch_size=patch_stride gives pos_embed and the global rel-pos tables the S/8 grid
        super().__init__(img_size=img_size, patch_size=patch_stride, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         out_chans=out_chans, qkv_bias=True, use_rel_pos=True,
                         window_size=window_size, global_attn_indexes=tuple(global_attn_indexes))
        # 16x16 kernel at stride 8; padding (16-8)/2 keeps exactly S/8 tokens per side
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_stride,
                                          padding=(patch_size - patch_stride) // 2)
        grid = img_size // patch_stride
        self.global_attn_indexes = tuple(global_attn_indexes)
        self.blocks = nn.ModuleList([
            AdaptedBlock(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                         use_rel_pos=True, window_size=0 if i in self.global_attn_indexes else window_size,
                         input_size=(grid, grid), adapter_ratio=adapter_ratio,
                         adapter_scale=adapter_scale,
                         cnn_dim=cnn_dim if i in self.global_attn_indexes else None)
            for i in range(depth)])
        self.cnn_branch = CNNBranch(cnn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cnn = self.cnn_branch(x)                 # B x S/8 x S/8 x C
        x = self.patch_embed(x)                  # B x S/8 x S/8 x D
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x, cnn)
        return self.neck(x.permute(0, 3, 1, 2))  # B x out_chans x S/8 x S/8

    def stage1_trainable(self, name: str) -> bool:
        """Whether parameter ``name`` (relative to this module) trains in stage 1.

        New parts only (METHOD.md §1): CNN branch, position embedding, adapters and the
        relative-position tables of the global blocks; SAM's own weights stay frozen.
        """
        if name.startswith("cnn_branch.") or name == "pos_embed" or "adapter" in name:
            return True
        parts = name.split(".")
        return (parts[0] == "blocks" and int(parts[1]) in self.global_attn_indexes
                and parts[-1] in ("rel_pos_h", "rel_pos_w"))
