"""benchmarks/run_all.py in --quick mode, and the fast mask decoder (SAM/fast_decoder.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import peak_memory, run_all
from SAM import fast_decoder
from SAM.auto_prompter import AutoPrompter, prompter_grid
from SAM.samus_data import restore_logits
from SAM.segmenter import build_segmenter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_run_all_quick_writes_json_markdown_and_figures(tmp_path):
    res = run_all.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "benchmarks.json").read_text())
    assert set(saved["pretrain"]["methods"]) == {"byol", "detcon", "aclus"}
    assert saved["loader"]["loader_img_per_s"] > 0 and saved["masks"]["pipeline_img_per_s"] > 0
    assert saved["memory"][0]["peak_rss_mb"] >= saved["memory"][0]["rss_before_step_mb"] > 0
    md = (tmp_path / "benchmarks.md").read_text()
    assert "| aclus |" in md and "Overhead of the pipeline" in md and "Peak memory" in md
    assert res["figures"] and all((tmp_path / f).stat().st_size > 0 for f in res["figures"])
    run_all.main(["--render_only", "--out", str(tmp_path)])    # the same report from the JSON
    assert (tmp_path / "benchmarks.md").read_text() == md


def test_render_only_without_results_names_the_file(tmp_path):
    with pytest.raises(SystemExit, match="benchmarks.json: cannot read the results to render"):
        run_all.main(["--render_only", "--out", str(tmp_path)])


def test_extrapolation_is_linear_in_batch():
    a = {"batch": 1, "peak_rss_mb": 1000.0, "step_increase_mb": 100.0, "rss_before_step_mb": 900.0}
    b = {"batch": 2, "peak_rss_mb": 1100.0, "step_increase_mb": 180.0, "rss_before_step_mb": 920.0}
    out = run_all.extrapolate(a, b, 8)
    assert out["peak_rss_mb"] == 1700.0 and out["step_increase_mb"] == 660.0
    assert out["extrapolated_from"] == [1, 2]


def test_configured_batches_follow_configs():
    assert peak_memory.configured_batch("pretrain", "paper") == 32
    assert peak_memory.configured_batch("pretrain", "demo") == 16
    assert peak_memory.configured_batch("mask_inference", "paper") == 8


@torch.inference_mode()
def test_fast_decoder_matches_the_module():
    """decode_low_res == seg.decode per (image, anatomy), also when cropped to the content."""
    torch.manual_seed(0)
    seg = build_segmenter("vit_tiny", 64, random_init=True).eval()
    assert fast_decoder.fast_decoder_applies(seg)
    B, K, T = 3, 4, 2
    emb = torch.randn(B, 256, seg.grid, seg.grid)
    sparse = torch.randn(B, K, T, 256)
    ref = seg.decode(emb.repeat_interleave(K, 0), sparse.flatten(0, 1))[:, 0]
    ref = ref.view(B, K, seg.low_res, seg.low_res)
    full = fast_decoder.decode_low_res(seg, emb, sparse, seg.grid, seg.grid)
    torch.testing.assert_close(full, ref, atol=1e-4, rtol=1e-4)
    crop = fast_decoder.decode_low_res(seg, emb, sparse, 5, 8)            # 20 x 32 logits
    torch.testing.assert_close(crop, ref[..., :20, :32], atol=1e-4, rtol=1e-4)


def test_fast_decoder_trains_like_the_module():
    """Stage 2 trains through decode_low_res: its loss, the prompt tokens' gradient and every
    decoder weight's gradient equal the module's. Weights the single-mask output never reads
    (the other masks' hypernetworks, the IoU head, key biases that softmax cancels) get no
    gradient on the fast path and an all-zero (or rounding-size) one through the module.
    Bugs caught: a detached image stream, an in-place op autograd cannot see through."""
    torch.manual_seed(2)
    seg = build_segmenter("vit_tiny", 64, random_init=True).train()
    B, T = 3, 2
    emb = torch.randn(B, 256, seg.grid, seg.grid)
    target = torch.rand(B, 1, seg.low_res, seg.low_res)
    grads = []
    for fast in (False, True):
        seg.zero_grad(set_to_none=True)
        sparse = torch.randn(B, T, 256, generator=torch.Generator().manual_seed(3)).requires_grad_()
        logits = (fast_decoder.decode_low_res(seg, emb, sparse[:, None], seg.grid, seg.grid) if fast
                  else seg.decode(emb, sparse))                              # B x 1 x L x L
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        loss.backward()
        grads.append((loss.detach(), sparse.grad,
                      {n: p.grad for n, p in seg.mask_decoder.named_parameters() if p.grad is not None}))
    (ref_loss, ref_tok, ref), (loss, tok, fast) = grads
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tok, ref_tok, atol=1e-6, rtol=1e-3)
    unread = set(ref) - set(fast)
    assert unread and all(ref[n].abs().max() < 1e-6 for n in unread), sorted(unread)
    assert "output_hypernetworks_mlps.0.layers.0.weight" in fast and "iou_token.weight" in fast
    for n, g in fast.items():
        if not n.endswith("k_proj.bias"):                                  # softmax cancels it: ~0 both ways
            torch.testing.assert_close(g, ref[n], atol=1e-6, rtol=1e-3, msg=n)


@torch.inference_mode()
def test_index_maps_match_the_reference_up_to_ties():
    """predict_index_maps == sigmoid(restore_logits(seg.decode(...))).max(0) of the module,
    except where two anatomies' probabilities tie to float precision."""
    torch.manual_seed(1)
    seg = build_segmenter("vit_tiny", 64, random_init=True).eval()
    prompter = AutoPrompter(3, grid=prompter_grid(seg.grid)).eval()
    images = torch.rand(2, 3, 64, 64)
    images[1, :, 40:] = 0                                                  # letterboxed
    valid, sizes = [(64, 64), (40, 64)], [(100, 90), (50, 80)]
    maps = fast_decoder.predict_index_maps(seg, prompter, images, [0, 1, 2], valid, sizes, threshold=0.3)
    emb = seg.embed(images)
    sparse = prompter(images, emb, torch.arange(3).expand(2, 3))
    logits = seg.decode(emb.repeat_interleave(3, 0), sparse.flatten(0, 1))[:, 0].view(2, 3, 32, 32)
    for b in range(2):
        prob = torch.sigmoid(restore_logits(logits[b], valid[b], 64, sizes[b]))
        best, arg = prob.max(0)
        ref = torch.where(best > 0.3, arg + 1, 0).numpy()
        assert maps[b].shape == sizes[b] and maps[b].dtype == np.uint8
        differ = maps[b] != ref
        p = prob.numpy()
        top = np.sort(p, axis=0)
        tie = ((top[-1] - top[-2]) < 1e-5) | (np.abs(best.numpy() - 0.3) < 1e-5)
        assert np.all(tie[differ])
        assert differ.mean() < 1e-3


def test_bench_asam_negative_rates_and_table():
    from benchmarks import bench_asam

    a = bench_asam.parse_args(["--seg_root", "x", "--negative_rates", "0,0.5"])
    assert a.negative_rates == [0.0, 0.5]
    for bad in ("0,-1", "a", ","):
        with pytest.raises(SystemExit):
            bench_asam.parse_args(["--seg_root", "x", "--negative_rates", bad])
    box = {"A/1": {"n": 3, "dice": 0.9}, "mean": {"n": 3, "dice": 0.9}}
    runs = {"0": {"test": {"A/1": {"dice": 0.8, "fp_rate": 1.0}}},
            "0.5": {"test": {"A/1": {"dice": 0.7, "fp_rate": 0.25}}}}
    table = bench_asam.results_table(box, runs, ["A/1"]).splitlines()
    assert table[0].count("FP rate") == 2 and len(table) == 4
    assert table[2] == "| A/1 | 3 | 0.900 | 0.800 | 1.000 | 0.700 | 0.250 |"
    assert table[3] == "| mean | 3 | 0.900 | - | - | - | - |"
    from pathlib import Path

    assert bench_asam.stage2_dir(Path("w"), 0.5, "all") == Path("w/stage2_neg0.5")          # the committed runs
    assert bench_asam.stage2_dir(Path("w"), 0.5, "present") == Path("w/stage2_neg0.5_present")


def test_time_suite_reads_pytest_summary_line():
    """The counts and seconds of pytest's last summary line, singular kinds in their plural key; an
    output without one gives nothing. Breaks if an earlier line or a progress line is read."""
    from benchmarks.time_suite import pytest_summary

    out = "....  [ 50%]\nFAILED x\n= 1 failed, 2 passed in 3.00s =\n... 497 passed, 11 skipped, 1 error, 2 warnings in 634.13s (0:10:34)\n"
    assert pytest_summary(out) == {"passed": 497, "skipped": 11, "errors": 1, "warnings": 2, "seconds": 634.13}
    assert pytest_summary("........ [ 14%]\n") == {}
    assert pytest_summary("= 5 passed, 3 deselected in 1.50s =") == {"passed": 5, "deselected": 3, "seconds": 1.5}


def test_time_suite_sums_phases_per_test_and_compares_shared_tests():
    """--durations lines sum setup + call + teardown per test id; the shared-test seconds cover only
    the test names every run has, wherever the file. Breaks if a phase is dropped, a test only one
    run has is counted, or a moved test is left out."""
    from benchmarks.time_suite import shared_seconds, test_seconds

    out = "2.00s call     tests/a.py::t\n0.50s setup    tests/a.py::t\n1.25s call     tests/b.py::u\nnot a line\n"
    a = test_seconds(out)
    assert a == {"tests/a.py::t": 2.5, "tests/b.py::u": 1.25}
    assert shared_seconds([a, {"tests/a.py::t": 3.0, "tests/c.py::v": 9.0}]) == {"tests": 1, "seconds": [2.5, 3.0]}
    # a test moved to another file is still the same test
    assert shared_seconds([a, {"tests/moved.py::u": 1.0, "tests/c.py::v": 9.0}]) == {"tests": 1, "seconds": [1.25, 1.0]}
