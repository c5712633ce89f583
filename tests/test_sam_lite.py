"""LiteMedSAM backbone (bundled weights) with ground-truth box prompts on real HC18 images."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from SAM.samus_data import SAMUSDataset, collate, prompt_keys, restore_logits
from SAM.seg_metrics import dice_iou
from SAM.segmenter import build_segmenter


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_lite_box_prompt_dice_on_hc18(shared_data):
    root = shared_data / "seg"
    if not (root / "FetalHead-HC18").is_dir():
        pytest.skip("seg/FetalHead-HC18 not present")
    datasets = ("FetalHead-HC18",)
    seg = build_segmenter("lite").eval()
    assert seg.grid == 64 and seg.low_res == 256
    ds = SAMUSDataset(root, "test", 256, seg.low_res, prompt_keys(root, datasets), datasets,
                      return_orig=True, max_items=20)
    dices = []
    for start in range(0, len(ds), 5):
        b = collate([ds[i] for i in range(start, min(start + 5, len(ds)))])
        with torch.inference_mode():
            logits = seg(b["image"], boxes=b["box"])                  # B x 1 x 256 x 256
        for k, gt in enumerate(b["orig_mask"]):
            up = restore_logits(logits[k], b["valid"][k].tolist(), 256, gt.shape)
            dices.append(dice_iou((up[0] > 0).numpy(), gt)[0])
    assert len(dices) == 20
    print(f"LiteMedSAM + GT box, 20 HC18 test images: Dice {np.mean(dices):.4f}")
    assert np.mean(dices) >= 0.85
