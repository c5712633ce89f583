"""The quality filter of prompt-free A-SAM masks: SAM's predicted IoU and stability score.

References: segment_anything's own ``calculate_stability_score`` and its mask decoder module
(the fast decoder's IoU must equal the module's), and a hand-built case for the filter.
"""
from __future__ import annotations

import numpy as np
import torch
from segment_anything.utils.amg import calculate_stability_score

from SAM import fast_decoder
from SAM.segmenter import build_segmenter


def test_stability_score_matches_segment_anything():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(5, 4, 16, 16, generator=g)
    for t in (0.0, 0.7):
        ref = calculate_stability_score(logits, t, 1.0)
        torch.testing.assert_close(fast_decoder.stability_score(logits, t), ref.float())
    empty = torch.full((1, 8, 8), -5.0)                       # SAM gives nan here; we give 0
    assert float(fast_decoder.stability_score(empty)[0]) == 0.0


@torch.inference_mode()
def test_fast_decoder_predicted_iou_matches_the_module():
    torch.manual_seed(0)
    seg = build_segmenter("vit_tiny", 64, random_init=True).eval()
    B, K = 2, 3
    emb, sparse = torch.randn(B, 256, seg.grid, seg.grid), torch.randn(B, K, 2, 256)
    _, ref = seg.decode(emb.repeat_interleave(K, 0), sparse.flatten(0, 1), with_iou=True)
    _, iou = fast_decoder.decode_low_res(seg, emb, sparse, seg.grid, seg.grid, with_iou=True)
    torch.testing.assert_close(iou, ref[:, 0].view(B, K), atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_filtered_masks_leave_the_index_map_and_scores_say_why(tiny_asam_inputs):
    args = tiny_asam_inputs
    maps, scores = fast_decoder.predict_index_maps(*args, threshold=0.3, return_scores=True)
    assert all(np.array_equal(a, b) for a, b in zip(maps, fast_decoder.predict_index_maps(*args, threshold=0.3)))
    assert all(s["kept"] for per_image in scores for s in per_image)            # no threshold, no filter
    ious = sorted(s["pred_iou"] for per_image in scores for s in per_image)
    cut = (ious[2] + ious[3]) / 2                                               # removes the 3 lowest
    filtered, fscores = fast_decoder.predict_index_maps(*args, threshold=0.3, min_pred_iou=cut,
                                                        return_scores=True)
    for b in range(2):
        gone = [k + 1 for k, s in enumerate(fscores[b]) if not s["kept"]]
        assert all(s["kept"] == (s["pred_iou"] >= cut) for s in fscores[b])
        assert not np.isin(filtered[b], gone).any()                             # a filtered id never shows
        kept_ids = [k + 1 for k, s in enumerate(fscores[b]) if s["kept"]]
        same = np.isin(maps[b], kept_ids)                                       # kept anatomies where they won
        assert np.all(filtered[b][same] == maps[b][same])
    assert sum(not s["kept"] for per_image in fscores for s in per_image) == 3
