"""Auto-prompter: learned sparse prompts that replace SAM's clicks and boxes (METHOD.md §1).

Task tokens are class-conditioned: one set of ``num_tokens`` 256-d tokens per prompt key
("<Dataset>/<class ID>"), so one model masks several anatomies (nerve and vessel, say).

Data flow for B images, grid g (the prompter's working grid, ≤ 32):

    image (B,3,S,S) --small CNN--> F (B, g², 256)
    SAM embedding (B,256,G,G) --avg-pool--> E (B, g², 256)
    tokens[prompt] (B, T, 256)
    4 x AlignmentBlock:  E <- LN(E + CrossAttn(E -> F));  T <- LN(T + CrossAttn(T + P -> E));
                         T <- LN(T + MLP(T))
    -> sparse prompt embeddings (B, T, 256); the dense prompt is SAM's no-mask embedding.
    presence head: mean of the T tokens -> LN -> MLP -> one logit per (image, prompt)

P, the task tokens themselves, is added to the token queries of every block, as SAM's
decoder re-adds its prompt embeddings, and the tokens start at unit scale: each block's
update is LayerNorm-scaled (norm ~16), so small tokens that are not re-added lose their
identity and different anatomies get the same prompt. ``keep_identity=False`` is the older
layout (std-0.02 tokens, no re-adding), kept so that checkpoints written with it load as
they were trained (docs/RESULTS.md: "Auto-prompter: anatomies kept apart").
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class AlignmentBlock(nn.Module):
    """Align SAM's embedding with CNN detail, then let the task tokens read the result."""

    def __init__(self, dim: int = 256, num_heads: int = 8, mlp_ratio: float = 2.0):
        super().__init__()
        self.img_to_cnn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_img = nn.LayerNorm(dim)
        self.tok_to_img = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_tok = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(),
                                 nn.Linear(int(dim * mlp_ratio), dim))
        self.norm_mlp = nn.LayerNorm(dim)

    def forward(self, emb: torch.Tensor, cnn: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor,
                tok_pe: torch.Tensor | float = 0.0):
        # emb, cnn: B x g² x D (pos: 1 x g² x D); tok: B x T x D; tok_pe: the task tokens again
        emb = self.norm_img(emb + self.img_to_cnn(emb + pos, cnn + pos, cnn, need_weights=False)[0])
        tok = self.norm_tok(tok + self.tok_to_img(tok + tok_pe, emb + pos, emb, need_weights=False)[0])
        tok = self.norm_mlp(tok + self.mlp(tok))
        return emb, tok


class AutoPrompter(nn.Module):
    """(images, SAM embeddings, prompt index) -> sparse prompt embeddings (B, T, dim)."""

    def __init__(self, num_prompts: int, num_tokens: int = 2, dim: int = 256, grid: int = 32,
                 depth: int = 4, num_heads: int = 8, cnn_width: int = 32, keep_identity: bool = True,
                 presence: bool = True):
        super().__init__()
        self.config = dict(num_prompts=num_prompts, num_tokens=num_tokens, dim=dim, grid=grid,
                           depth=depth, num_heads=num_heads, cnn_width=cnn_width,
                           keep_identity=keep_identity, presence=presence)
        self.grid = grid
        self.keep_identity = keep_identity
        self.tokens = nn.Parameter(torch.randn(num_prompts, num_tokens, dim) * (1.0 if keep_identity else 0.02))
        w = cnn_width
        self.cnn = nn.Sequential(
            nn.Conv2d(3, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(inplace=True),
            nn.Conv2d(4 * w, dim, 1))
        self.pos = nn.Parameter(torch.randn(1, grid * grid, dim) * 0.02)
        self.blocks = nn.ModuleList([AlignmentBlock(dim, num_heads) for _ in range(depth)])
        # "is this anatomy here at all?": one logit from the prompt's own tokens, which have
        # read the image; trained on the empty targets of negatives (SAM/presence.py)
        self.presence_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim // 4), nn.GELU(),
                                           nn.Linear(dim // 4, 1)) if presence else None

    def forward(self, images: torch.Tensor, embeddings: torch.Tensor,
                prompt_idx: torch.Tensor) -> torch.Tensor:
        """prompt_idx (B,) -> (B, T, D); or (B, K) -> (B, K, T, D), K anatomies of each image
        in one pass: the image stream does not depend on the tokens, and the tokens of
        different prompts never attend to each other (queries are independent), so
        concatenating them along the token axis gives exactly K separate runs."""
        g = self.grid
        cnn = F.adaptive_avg_pool2d(self.cnn(images), g).flatten(2).transpose(1, 2)        # B x g² x D
        emb = F.adaptive_avg_pool2d(embeddings, g).flatten(2).transpose(1, 2)              # B x g² x D
        tok = self.tokens[prompt_idx]                                   # B x T x D or B x K x T x D
        multi = prompt_idx.dim() == 2
        if multi:
            B, K, T, D = tok.shape
            tok = tok.reshape(B, K * T, D)
        tok_pe = tok if self.keep_identity else 0.0
        for blk in self.blocks:
            emb, tok = blk(emb, cnn, tok, self.pos, tok_pe)
        return tok.reshape(B, K, T, D) if multi else tok

    def presence(self, tokens: torch.Tensor) -> torch.Tensor:
        """Presence logits of prompt tokens: (..., T, D) -> (...); a model without the head
        (checkpoints written before it existed) raises."""
        if self.presence_head is None:
            raise ValueError("this auto-prompter has no presence head (trained before it existed)")
        return self.presence_head(tokens.mean(-2))[..., 0]


def prompter_grid(embedding_grid: int, cap: int = 32) -> int:
    """Working grid of the prompter: the embedding grid, capped at ``cap``. The alignment
    attention costs O(grid⁴): 16 instead of 32 makes a CPU stage-2 step about 2.5x faster."""
    if cap < 1:
        raise ValueError(f"prompter grid cap must be >= 1, got {cap}")
    return min(cap, embedding_grid)
