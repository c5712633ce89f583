"""SAM's mask decoder re-associated for many prompt sets per image, and index maps from it.

The batched decoder of :mod:`SAM.segmenter` (``BatchedMaskDecoder``) decodes one prompt set
per image through segment-anything's modules; mask inference (``SAM/infer_masks.py``) decodes
K prompt sets (one per anatomy) for every image, and stage 2 (``SAM/train_auto_prompter.py``)
trains through one, where the same arithmetic can be reordered:

* :func:`decode_low_res`: (B, 256, g, g) embeddings and (B, K, T, 256) prompt tokens ->
  (B, K, 4 rows, 4 cols) single-mask low-res logits; the g x g image tokens are never
  projected (only the few prompt tokens are), and only the first ``rows`` x ``cols`` decoder
  pixels (the letterboxed content) are upscaled;
* :func:`predict_index_maps`: images -> one uint8 index map per image at its own size
  (0 background, k the most probable of K anatomies above a threshold);
* :func:`fast_decoder_applies`: whether a segmenter's decoder has the structure the fast
  path re-implements (otherwise the module itself is run).

The logits, and their gradients, equal the module's up to float rounding (~1e-5;
tests/test_benchmarks.py); weights the single-mask output never reads get no gradient.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.transformer import TwoWayTransformer
from torch import Tensor

from SAM.presence import PresenceRule, prob_scores

# SAM's two-way transformer lets ~7 tokens and the g x g image tokens (4096 for LiteMedSAM)
# attend to each other. Projecting the image tokens (C -> C/2, four times per layer) and
# re-laying them out dominates its cost; with few tokens the same scores and outputs come
# from projecting the tokens into image space instead:
#   tokens -> image:  (q Wq_h + bq_h)(Wk_h x + bk_h) = (Wk_h^T q_h) . x + const per query row
#                     (softmax ignores the constant);  softmax . (Wv_h x + bv_h) = Wv_h (softmax . x) + bv_h
#   image -> tokens:  (Wq_h x + bq_h) . k_h = x . (Wq_h^T k_h) + bq_h . k_h;
#                     sum_h A_h (v_h Wo_h^T) + bo, each head's weights summing to 1.
# Mathematically identical; logits differ from the module's by float rounding (~1e-5).
# The first layer reads each image once for all K anatomies (their query rows are stacked).

def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(..., N, H*d) -> (..., H, N, d)."""
    *lead, n, c = x.shape
    return x.view(*lead, n, heads, c // heads).transpose(-3, -2)


def _per_image_matmul(a: Tensor, m: Tensor) -> Tensor:
    """a (B, K, R, X) @ m (B, Kx, X, Y) -> (B, K, R, Y), where Kx is 1 (one matrix per image,
    shared by its K anatomies: their rows are stacked, the matrix is not copied) or K."""
    B, K, R, X = a.shape
    if m.shape[1] == 1:
        return (a.reshape(B, K * R, X) @ m[:, 0]).view(B, K, R, -1)
    return a @ m


def _tokens_to_image(attn: nn.Module, q: Tensor, kp: Tensor, v: Tensor) -> Tensor:
    """``attn(q, kp, v)`` of segment-anything's ``Attention`` for few queries q (B, K, N, C)
    over image tokens kp, v (B, Kx, M, C) -> (B, K, N, C), image tokens never projected."""
    H = attn.num_heads
    d = attn.internal_dim // H
    B, K, N, C = q.shape
    qh = _split_heads(attn.q_proj(q), H)                                     # B K H N d
    g = (qh @ attn.k_proj.weight.view(H, d, C)).mul_(1.0 / math.sqrt(d))     # B K H N C
    s = torch.softmax(_per_image_matmul(g.reshape(B, K, H * N, C), kp.transpose(-1, -2)), dim=-1)
    r = _per_image_matmul(s, v).view(B, K, H, N, C)
    out = r @ attn.v_proj.weight.view(H, d, C).transpose(-1, -2) + attn.v_proj.bias.view(H, 1, d)
    return attn.out_proj(out.transpose(-3, -2).reshape(B, K, N, H * d))


def _image_to_tokens(attn: nn.Module, xp: Tensor, tk: Tensor, tv: Tensor, residual: Tensor) -> Tensor:
    """``residual + attn(xp, tk, tv)`` for image queries xp (B, Kx, M, C) over tokens tk, tv
    (B, K, N, C) -> (B, K, M, C), image tokens never projected."""
    H = attn.num_heads
    d = attn.internal_dim // H
    B, K, N, C = tk.shape
    M = xp.shape[2]
    kh = _split_heads(attn.k_proj(tk), H).mul_(1.0 / math.sqrt(d))          # B K H N d
    vh = _split_heads(attn.v_proj(tv), H)
    m = (kh @ attn.q_proj.weight.view(H, d, C)).reshape(B, K, H * N, C)
    const = (kh @ attn.q_proj.bias.view(H, d, 1)).reshape(B, K, H * N, 1)
    scores = _per_image_matmul(m, xp.transpose(-1, -2)).add_(const)         # B K HN M
    a = torch.softmax(scores.view(B, K, H, N, M), dim=3).view(B, K, H * N, M)
    u = vh @ attn.out_proj.weight.view(C, H, d).permute(1, 2, 0) + attn.out_proj.bias / H
    return (a.transpose(-1, -2) @ u.reshape(B, K, H * N, C)).add_(residual)


def _two_way_block(layer: nn.Module, queries: Tensor, keys: Tensor, query_pe: Tensor,
                   key_pe: Tensor) -> tuple[Tensor, Tensor]:
    """segment-anything's ``TwoWayAttentionBlock.forward`` on (B, K, ...) queries and
    (B, Kx, M, C) keys."""
    B, K, N, C = queries.shape
    flat = queries.reshape(B * K, N, C)
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=flat, k=flat, v=flat).view(B, K, N, C)
    else:
        q = (queries + query_pe).reshape(B * K, N, C)
        queries = queries + layer.self_attn(q=q, k=q, v=flat).view(B, K, N, C)
    queries = layer.norm1(queries)
    kp = keys + key_pe
    queries = layer.norm2(queries + _tokens_to_image(layer.cross_attn_token_to_image,
                                                     queries + query_pe, kp, keys))
    queries = layer.norm3(queries + layer.mlp(queries))
    keys = layer.norm4(_image_to_tokens(layer.cross_attn_image_to_token, kp, queries + query_pe,
                                        queries, keys))
    return queries, keys


def fast_decoder_applies(seg: nn.Module) -> bool:
    """True when the segmenter's mask decoder has SAM's structure (what decode_low_res
    re-implements); otherwise the module itself is run."""
    dec = getattr(seg, "mask_decoder", None)
    up = getattr(dec, "output_upscaling", None)
    return (isinstance(getattr(dec, "transformer", None), TwoWayTransformer)
            and isinstance(up, nn.Sequential) and len(up) == 5
            and isinstance(up[0], nn.ConvTranspose2d) and isinstance(up[1], LayerNorm2d)
            and isinstance(up[3], nn.ConvTranspose2d)
            and all(c.kernel_size == (2, 2) and c.stride == (2, 2) and c.padding == (0, 0)
                    for c in (up[0], up[3])))


def decode_low_res(seg: nn.Module, emb: Tensor, sparse: Tensor, rows: int, cols: int,
                   with_iou: bool = False):
    """Single-mask low-res logits of K prompt sets per image: emb (B, 256, g, g), sparse
    (B, K, T, 256) -> (B, K, 4 rows, 4 cols), the top-left part of
    ``seg.decode(emb.repeat_interleave(K, 0), sparse.flatten(0, 1))[:, 0]`` (the dense prompt is
    SAM's no-mask embedding). Logit pixel (y, x) depends on decoder pixel (y // 4, x // 4)
    only, so the upscaling runs on the first ``rows`` x ``cols`` decoder pixels alone.
    With ``with_iou`` also SAM's predicted IoU of each mask, (B, K)."""
    B, K, T, C = sparse.shape
    g = emb.shape[-1]
    if not fast_decoder_applies(seg):
        L = seg.low_res
        logits, iou = seg.decode(emb.repeat_interleave(K, 0), sparse.flatten(0, 1), with_iou=True)
        logits = logits[:, 0].view(B, K, L, L)[:, :, :L * rows // g, :L * cols // g]
        return (logits, iou[:, 0].view(B, K)) if with_iou else logits
    dec, pe_enc = seg.mask_decoder, seg.prompt_encoder
    tr = dec.transformer
    out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    tokens = torch.cat((out_tokens.expand(B, K, -1, -1), sparse), dim=2)       # B K N C
    keys = (emb.permute(0, 2, 3, 1) + pe_enc.no_mask_embed.weight.view(1, 1, 1, C)).reshape(B, 1, g * g, C)
    pe = pe_enc.get_dense_pe().permute(0, 2, 3, 1).reshape(1, 1, g * g, C)
    queries = tokens
    for layer in tr.layers:
        queries, keys = _two_way_block(layer, queries, keys, tokens, pe)
    queries = tr.norm_final_attn(queries + _tokens_to_image(tr.final_attn_token_to_image,
                                                            queries + tokens, keys + pe, keys))
    hyper = dec.output_hypernetworks_mlps[0](queries[:, :, 1])                # B K C/8
    up = dec.output_upscaling
    x = keys.expand(B, K, -1, -1).reshape(B * K, g, g, C)[:, :rows, :cols]
    x = up[0](x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last))
    x = nn.functional.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), up[1].weight, up[1].bias, up[1].eps)
    x = up[4](up[3](up[2](x).permute(0, 3, 1, 2))).permute(0, 2, 3, 1)      # BK x 4r x 4c x C/8
    x = x.reshape(B, K, -1, x.shape[-1]) @ hyper.unsqueeze(-1)
    logits = x.view(B, K, 4 * rows, 4 * cols)
    if not with_iou:
        return logits
    return logits, dec.iou_prediction_head(queries[:, :, 0])[..., 0]         # B K: the single-mask output's IoU


def stability_score(logits: Tensor, threshold: float = 0.0, offset: float = 1.0) -> Tensor:
    """SAM's stability score: IoU of the masks thresholded at ``threshold + offset`` and
    ``threshold - offset`` (the first lies inside the second), (..., H, W) -> (...); 0 for a
    mask that is empty at the lower threshold."""
    inner = (logits > threshold + offset).flatten(-2).sum(-1)
    outer = (logits > threshold - offset).flatten(-2).sum(-1)
    return torch.where(outer > 0, inner / outer.clamp(min=1), torch.zeros_like(inner, dtype=torch.float32))


@torch.inference_mode()
def predict_index_maps(seg, prompter, images: torch.Tensor, prompt_ids: list[int],
                       valid: list[tuple[int, int]], sizes: list[tuple[int, int]],
                       threshold: float = 0.5, min_pred_iou: float | None = None,
                       min_stability: float | None = None,
                       return_scores: bool = False, presence: PresenceRule | None = None,
                       encoder_dtype: torch.dtype | None = None
                       ) -> list[np.ndarray] | tuple[list[np.ndarray], list[list[dict]]]:
    """images (B, 3, S, S) in [0, 1], letterboxed with content ``valid[b]`` -> B uint8 index
    maps (H_b x W_b): 0 background, k where the k-th prompt is the most probable anatomy and
    above ``threshold``.

    Quality filter (off when None): a prompt's mask whose predicted IoU (SAM's IoU head, not
    bounded to [0, 1] in an untrained model) is below ``min_pred_iou`` or whose stability score (:func:`stability_score` at the ``threshold``
    logit, offset 1, on the low-res logits inside the content) is below ``min_stability``
    is left out of that image's map. Presence decision (``presence``, its prompts in the order of
    ``prompt_ids``, e.g. :func:`SAM.presence.presence_rule` of the checkpoint; None: off): a
    prompt judged absent from the scores of its mask (the prompter's head, SAM's predicted IoU,
    the mask's highest probability and area at the image's size) marks nothing.
    With ``return_scores`` also one list per image of ``{"pred_iou", "stability", "kept"}``
    (and ``"presence"``, the head's logit, with a presence head; ``"max_prob"``, ``"area"`` and
    ``"present"``, the decision, with ``presence``) per prompt, in prompt order.
    ``encoder_dtype`` (e.g. ``torch.bfloat16``): the image encoder alone runs under autocast to that
    type (on a CPU with bf16 units about 1.7x faster for LiteMedSAM's encoder); the prompter and the
    decoder read its embeddings in float32."""
    B, K = images.shape[0], len(prompt_ids)
    with torch.autocast(images.device.type, dtype=encoder_dtype or torch.float32, enabled=encoder_dtype is not None):
        emb = seg.embed(images)                                           # B x 256 x g x g
    emb = emb.float()
    idx = torch.tensor(prompt_ids, device=images.device).expand(B, K)    # B x K
    sparse = prompter(images, emb, idx)                                   # B x K x T x 256
    L, g = seg.low_res, emb.shape[-1]
    scale = L // g
    content = [(max(1, round(h * L / seg.img_size)), max(1, round(w * L / seg.img_size))) for h, w in valid]
    rows = math.ceil(max(h for h, _ in content) / scale)
    cols = math.ceil(max(w for _, w in content) / scale)
    logits, pred_iou = decode_low_res(seg, emb, sparse, rows, cols, with_iou=True)  # B x K x 4r x 4c, B x K
    has_head = getattr(prompter, "presence_head", None) is not None
    head = prompter.presence(sparse) if has_head else None                              # B x K
    if presence is not None and not has_head:
        raise ValueError("a presence decision needs an auto-prompter with a presence head")
    logit_threshold = math.log(threshold / (1 - threshold)) if 0 < threshold < 1 else 0.0
    out, scores = [], []
    for b, size in enumerate(sizes):
        vh, vw = content[b]  # as restore_logits crops the full L x L logits
        stability = stability_score(logits[b, :, :vh, :vw], logit_threshold)        # K
        kept = torch.ones_like(stability, dtype=torch.bool)                             # K
        if min_pred_iou is not None:
            kept &= pred_iou[b] >= min_pred_iou
        if min_stability is not None:
            kept &= stability >= min_stability
        full = nn.functional.interpolate(logits[b, None, :, :vh, :vw], size=tuple(size),
                                         mode="bilinear", align_corners=False)[0]       # K x H x W
        prob = torch.sigmoid_(full)                                                     # K x H x W
        decided = {}
        if presence is not None:  # the scores presence_rows calibrated on: the mask's at the image's size
            named = {"head": head[b], "pred_iou": pred_iou[b], **prob_scores(prob)}
            present = presence.present(named)                                           # K
            kept &= present
            decided = {"max_prob": named["max_prob"], "area": named["area"], "present": present}
        # probabilities, not logits, are compared: sigmoid saturates (1.0 above ~17), and the
        # first of tied anatomies wins, as it always has; a filtered mask never wins
        prob = prob * kept[:, None, None]
        best, arg = prob.max(0)                                           # H x W
        out.append(torch.where(best > threshold, arg + 1, 0).to(torch.uint8).cpu().numpy())
        scores.append([{"pred_iou": round(float(i), 4), "stability": round(float(s), 4), "kept": bool(k)}
                       | ({"presence": round(float(head[b, j]), 4)} if has_head else {})
                       | ({"max_prob": round(float(decided["max_prob"][j]), 4),
                           "area": round(float(decided["area"][j]), 6),
                           "present": bool(decided["present"][j])} if decided else {})
                       for j, (i, s, k) in enumerate(zip(pred_iou[b], stability, kept))])
    return (out, scores) if return_scores else out
