"""A-SAM stage 2 learns on synthetic scans: prompt-free masks overlap their anatomy and
each anatomy prompt finds its own anatomy (LiteMedSAM backbone, cached embeddings, CPU).

Bugs caught: an auto-prompter whose prompts lose their anatomy's identity (a trained
USGRA model once gave the nerve and the vessel the same mask on every test image, IoU
1.000), a decoder that is not trained, masks scored against the wrong labels.
"""
from __future__ import annotations

import json

import pytest
import torch

from SAM import train_auto_prompter
from SAM.checkpoint import load_checkpoint, prompter_from_checkpoint, segmenter_from_checkpoint
from SAM.samus_data import SAMUSDataset
from utils.synthetic_us import write_samus_layout

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

RIB, PLEURA = "SynLung-Anatomy/1", "SynLung-Anatomy/2"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("asam_learns")
    root = write_samus_layout(tmp / "seg", n_images=30, size=128, seed=0)
    out = tmp / "s2"
    train_auto_prompter.main(["--task", "SynLung", "--data_root", str(root), "--datasets", "SynLung-Anatomy",
                              "--backbone", "lite", "--img_size", "256", "--epochs", "14", "--batch_size", "8",
                              "--workers", "0", "--prompter_grid", "16", "--balance_prompts", "true",
                              "--cache_dir", str(tmp / "cache"), "--out_dir", str(out), "--eval_test",
                              "--seed", "0"])
    return {"root": root, "out": out}


def test_prompt_free_dice_is_well_above_zero(trained):
    summary = json.loads((trained["out"] / "test_metrics.json").read_text())
    dice = {k: v["dice"] for k, v in summary.items()}
    # 14 short CPU epochs: rib 0.26, pleura 0.37, consolidation 0.75 (best.pt, chosen on 3
    # validation images); an untrained decoder or a prompter that ignores the image stays near 0
    assert min(dice[k] for k in summary if k != "mean") > 0.1, dice
    assert dice["mean"] > 0.3, dice


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()).clamp(min=1))


def test_each_anatomy_prompt_finds_its_own_anatomy(trained):
    """The rib prompt's mask overlaps the rib better than the pleura, and the pleura prompt's
    the pleura better than the rib, pooled over the test images that hold both. Identical
    masks for both prompts cannot pass both halves. last.pt (the end of training), not best.pt:
    best is chosen on 3 validation images and can be an early epoch (epoch 8 of 14 when
    written, whose rib prompt still overlapped the pleura as much as the rib).
    Measured when written: rib prompt 0.48 on rib / 0.08 on pleura; pleura 0.44 / 0.09."""
    ck = load_checkpoint(trained["out"] / "last.pt", ("asam_stage2",))
    seg, prompter = segmenter_from_checkpoint(ck).eval(), prompter_from_checkpoint(ck).eval()
    keys = ck["prompt_keys"]
    ds = SAMUSDataset(trained["root"], "test", seg.img_size, seg.low_res, keys, ["SynLung-Anatomy"])
    lines = {}                                                       # image name -> {anatomy: line index}
    for i, line in enumerate(ds.lines):
        if line.prompt is None and line.prompt_key in (RIB, PLEURA):
            lines.setdefault(line.name, {})[line.prompt_key] = i
    both = [d for d in lines.values() if len(d) == 2]
    assert len(both) >= 4, lines
    images = torch.stack([ds[d[RIB]]["image"] for d in both])
    truth = {k: torch.stack([ds[d[k]]["low_mask"] for d in both]).bool() for k in (RIB, PLEURA)}  # N x L x L
    with torch.no_grad():
        emb = seg.embed(images)
        pred = {k: seg.decode(emb, prompter(images, emb, torch.full((len(images),), keys.index(k))))[:, 0] > 0
                for k in (RIB, PLEURA)}                              # N x L x L each
    assert pred[RIB].shape == truth[RIB].shape
    dice = {(p, t): _dice(pred[p], truth[t]) for p in (RIB, PLEURA) for t in (RIB, PLEURA)}
    assert dice[RIB, RIB] > dice[RIB, PLEURA] + 0.1, dice
    assert dice[PLEURA, PLEURA] > dice[PLEURA, RIB] + 0.1, dice
