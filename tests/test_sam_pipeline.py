"""End to end on synthetic SAMUS data with a tiny ViT: stage 1 -> stage 2 -> inference."""
from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from SAM import infer_masks, only_train_sam, train_auto_prompter
from SAM.checkpoint import load_checkpoint
from utils.io import DataError
from utils.synthetic_us import write_samus_layout

COMMON = ["--task", "SynLung", "--img_size", "64", "--workers", "0", "--batch_size", "4"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Stage 1 (1 epoch, then resumed to 2) and stage 2 (2 epochs + test) once per module."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("asam")
    root = write_samus_layout(tmp / "seg", n_images=10, size=96, seed=0)
    s1, s2 = tmp / "s1", tmp / "s2"
    data = COMMON + ["--data_root", str(root)]
    only_train_sam.main(data + ["--backbone", "vit_tiny", "--epochs", "1", "--out_dir", str(s1)])
    only_train_sam.main(data + ["--backbone", "vit_tiny", "--epochs", "2", "--out_dir", str(s1), "--resume",
                               "--amp", "true"])           # --amp is a no-op on a CPU
    result = train_auto_prompter.main(data + ["--sam_ckpt", str(s1 / "best.pt"), "--epochs", "2",
                                              "--out_dir", str(s2), "--eval_test",
                                              "--cache_dir", str(tmp / "cache"),
                                              "--prompter_grid", "4", "--balance_prompts", "true"])
    return {"tmp": tmp, "root": root, "s1": s1, "s2": s2, "result": result}


def test_stage1_resume_and_checkpoints(run):
    epochs = [json.loads(l)["epoch"] for l in (run["s1"] / "log.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]                      # the resumed run continued at epoch 1
    ck = load_checkpoint(run["s1"] / "last.pt", ("asam_stage1",))
    assert ck["epoch"] == 1 and "optimizer" in ck and "prompter" not in ck and "scaler" not in ck
    assert ck["prompt_keys"] == ["SynLung-Anatomy/1", "SynLung-Anatomy/2", "SynLung-Anatomy/3",
                                 "SynLung-Pleura/1"]
    assert (run["s1"] / "tb").is_dir()


def test_stage2_freezes_everything_but_prompter_and_decoder(run):
    s1 = load_checkpoint(run["s1"] / "best.pt", ("asam_stage1",))["model"]
    s2 = load_checkpoint(run["s2"] / "last.pt", ("asam_stage2",))
    assert set(s1) == set(s2["model"])
    changed = [k for k in s1 if not torch.equal(s1[k], s2["model"][k])]
    assert changed and all(k.startswith("mask_decoder.") for k in changed)
    # encoder (incl. BatchNorm buffers of the CNN branch) and prompt encoder bit-identical
    assert all(torch.equal(s1[k], s2["model"][k]) for k in s1
               if k.startswith(("image_encoder.", "prompt_encoder.")))
    assert "prompter" in s2 and s2["prompter"]["tokens"].shape == (4, 2, 256)
    assert s2["prompter_args"]["grid"] == 4      # --prompter_grid 4 caps the 8x8 embedding grid
    test = json.loads((run["s2"] / "test_metrics.json").read_text())
    assert {"SynLung-Pleura/1", "mean"} <= set(test) and 0 <= test["mean"]["dice"] <= 1


def test_stage2_encoder_lr_fine_tunes_the_encoder_too(run):
    """--encoder_lr > 0 (a deliberate departure from METHOD.md) trains the image encoder at
    its own rate; the prompt encoder still stays bit-identical, and a cache is refused."""
    data = COMMON + ["--data_root", str(run["root"]), "--sam_ckpt", str(run["s1"] / "best.pt"),
                     "--prompter_grid", "4", "--out_dir", str(run["tmp"] / "s2_enc")]
    with pytest.raises(SystemExit):
        train_auto_prompter.parse_args(data + ["--encoder_lr", "1e-4", "--cache_embeddings", "true"])
    assert train_auto_prompter.parse_args(data + ["--encoder_lr", "1e-4"]).cache_embeddings is False
    train_auto_prompter.main(data + ["--encoder_lr", "1e-4", "--epochs", "1"])
    s1 = load_checkpoint(run["s1"] / "best.pt", ("asam_stage1",))["model"]
    s2 = load_checkpoint(run["tmp"] / "s2_enc" / "last.pt", ("asam_stage2",))["model"]
    changed = {k.split(".")[0] for k in s1 if not torch.equal(s1[k], s2[k])}
    assert changed == {"image_encoder", "mask_decoder"}
    # resuming with the encoder frozen again cannot reuse the optimizer: a clear error
    with pytest.raises(DataError, match="last.pt: its optimizer does not match"):
        train_auto_prompter.main(data + ["--epochs", "2", "--resume"])


def test_stage2_refuses_wrong_checkpoint_kind(run):
    with pytest.raises(DataError, match="'asam_stage2' checkpoint; expected kind asam_stage1"):
        train_auto_prompter.main(COMMON + ["--data_root", str(run["root"]), "--sam_ckpt",
                                           str(run["s2"] / "best.pt"), "--out_dir", str(run["tmp"] / "x")])


def test_infer_masks_writes_resumes_shards_and_skips_bad(run, monkeypatch):
    data = run["tmp"] / "unlabeled"
    (data / "Video1" / "img").mkdir(parents=True)
    for i, src in enumerate(sorted((run["root"] / "SynLung-Pleura" / "img").glob("*.png"))[:5]):
        img = cv2.imread(str(src))
        if i % 2:  # any size, gray or RGB
            img = cv2.resize(img, (70 + i, 50))[..., 0]
        cv2.imwrite(str(data / "Video1" / "img" / f"v1_f{i}.png"), img)
    (data / "Video1" / "img" / "broken.png").write_bytes(b"not a png")
    args = ["--ckpt", str(run["s2"] / "best.pt"), "--data_dir", str(data), "--workers", "0",
            "--batch_size", "2"]

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    r1 = infer_masks.main(args)                      # odd-numbered files of 6 sorted ones
    assert r1["written"] + len(r1["bad"]) == 3
    monkeypatch.setenv("RANK", "0")
    r0 = infer_masks.main(args)
    assert r0["written"] + len(r0["bad"]) == 3 and len(r0["bad"] + r1["bad"]) == 1
    labels = sorted((data / "Video1" / "label").glob("*.png"))
    assert [p.name for p in labels] == [f"v1_f{i}.png" for i in range(5)]
    for i, p in enumerate(labels):
        lab = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        img = cv2.imread(str(data / "Video1" / "img" / p.name), cv2.IMREAD_UNCHANGED)
        assert lab.shape == img.shape[:2] and lab.dtype == np.uint8 and lab.max() <= 4
    assert (data / "asam_montage.png").is_file()
    assert json.loads((data / "asam_classes.json").read_text())["4"] == "SynLung-Pleura/1"
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    again = infer_masks.main(args)                   # resumable: nothing left but the bad file
    assert again["written"] == 0 and again["skipped_existing"] == 5
    # the quality and presence scores of every mask lie beside its label map; with no quality
    # filter a mask is left out only where the checkpoint's presence decision says "absent"
    rule = json.loads((data / "asam_settings.json").read_text())["presence"]
    for p in labels:
        scores = json.loads(p.with_suffix(".scores.json").read_text())
        assert set(scores) == {"1", "2", "3", "4"}
        assert all(0 <= s["stability"] <= 1 for s in scores.values())
        for k in range(4):                                  # the decision, recomputed from what was written
            s, t = scores[str(k + 1)], rule["threshold"][k]
            named = {"head": s["presence"], "pred_iou": s["pred_iou"], "max_prob": s["max_prob"], "area": s["area"]}
            value = sum(w * named[f] for f, w in zip(rule["features"], rule["weight"][k])) + rule["bias"][k]
            assert s["kept"] == s["present"]
            if t is None or abs(value - t) > 1e-2 * (1 + sum(map(abs, rule["weight"][k]))):  # written rounded
                assert s["present"] == (t is None or value >= t)
    # a filter nothing passes removes every mask, counted, and the maps are empty
    strict = infer_masks.main(["--ckpt", str(run["s2"] / "best.pt"), "--data_dir", str(data), "--workers", "0",
                               "--out_dir", str(run["tmp"] / "strict"), "--min_stability", "1.01"])
    assert strict["removed"]["stability"] == strict["removed"]["either"] == strict["removed"]["masks"] == 4 * 5
    assert all(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).max() == 0
               for p in (run["tmp"] / "strict" / "Video1" / "label").glob("*.png"))
    with pytest.raises(DataError, match="expected kind asam_stage2"):
        infer_masks.main(["--ckpt", str(run["s1"] / "best.pt"), "--data_dir", str(data)])


def test_scripts_run_from_repo_root(repo_root):
    """`python SAM/<script>.py` must import the top-level packages (not SAM/ shadows)."""
    for script in ("SAM/only_train_sam.py", "SAM/train_auto_prompter.py", "SAM/infer_masks.py"):
        out = subprocess.run([sys.executable, script, "--help"], cwd=repo_root, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "usage" in out.stdout
    out = subprocess.run([sys.executable, "SAM/only_train_sam.py", "--task", "Nope"], cwd=repo_root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_infer_masks_missing_checkpoint_is_one_line(repo_root, tmp_path):
    bad = tmp_path / "missing.pt"
    out = subprocess.run([sys.executable, "SAM/infer_masks.py", "--ckpt", str(bad), "--data_dir",
                          str(tmp_path)], cwd=repo_root, capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0] == f"infer_masks.py: error: {bad}: A-SAM checkpoint not found"


def test_stage2_with_a_negative_set_counts_its_images_as_absent_cases(run, tmp_path, monkeypatch):
    """A negative set (issue 27) in the root: stage 2 trains with its images as negatives and the test
    split's false-positive rate of the prompt it lacks counts its test images; the other prompt's
    does not (the set does not lack it). --eval_test decodes each test line once, though it reports
    the masks with and without the presence decision (it decoded them three times)."""
    import shutil

    decoded, passes = [0], []                  # rows through the mask decoder; (dataset, rows) per pass
    decode = train_auto_prompter.decode_low_res

    def counting_decode(seg, emb, *args, **kw):
        decoded[0] += emb.shape[0]
        return decode(seg, emb, *args, **kw)

    def counted(fn):
        def wrapped(predict, loader, *args, **kw):
            before = decoded[0]
            out = fn(predict, loader, *args, **kw)
            passes.append((loader.dataset, decoded[0] - before, kw.get("desc")))
            return out
        return wrapped

    monkeypatch.setattr(train_auto_prompter, "decode_low_res", counting_decode)
    monkeypatch.setattr(train_auto_prompter, "evaluate", counted(train_auto_prompter.evaluate))
    monkeypatch.setattr(train_auto_prompter, "presence_rows", counted(train_auto_prompter.presence_rows))

    from SAM.samus_data import add_negative_set, read_split

    root = tmp_path / "seg"
    shutil.copytree(run["root"], root)
    frames = []
    for i in range(6):
        frames.append(tmp_path / "frames" / f"v{i}_f0.png")
        frames[-1].parent.mkdir(exist_ok=True)
        cv2.imwrite(str(frames[-1]), np.full((50, 70), 40 * i, np.uint8))
    add_negative_set(root, "Neg-Frames", {"train": frames[:3], "val": frames[3:4], "test": frames[4:]},
                     lacks=["SynLung-Pleura"])
    out = tmp_path / "s2_neg"
    train_auto_prompter.main(COMMON + ["--data_root", str(root), "--sam_ckpt", str(run["s1"] / "best.pt"),
                                       "--epochs", "1", "--out_dir", str(out), "--eval_test", "--prompter_grid", "4",
                                       "--negative_rate", "0.5", "--mask_loss_on", "present"])
    report = json.loads((out / "test_presence.json").read_text())
    raw, decided = report["without_decision"], json.loads((out / "test_metrics.json").read_text())
    for k, rates in report["presence"].items():    # a mask survives only on lines the decision passes
        if rates["fpr"] is not None:
            assert decided[k]["fp_rate"] <= rates["fpr"] + 1e-9
    test = read_split(root, "test")
    images = {d: {l.name for l in test if l.dataset == d} for d in ("SynLung-Anatomy", "SynLung-Pleura")}
    assert raw["SynLung-Pleura/1"]["n_without"] == len(images["SynLung-Anatomy"]) + 2   # + the 2 frames
    assert raw["SynLung-Anatomy/1"]["n_without"] == len(images["SynLung-Pleura"])
    test_ds = {id(ds): ds for ds, _, desc in passes if desc == "test"}
    assert len(test_ds) == 1 and sum(1 for ds, _, _ in passes if id(ds) in test_ds) == 3
    assert sum(n for ds, n, _ in passes if id(ds) in test_ds) == len(next(iter(test_ds.values())))


def test_a_bf16_encoder_is_recorded_and_its_maps_are_compared_with_fp32(run, tmp_path):
    """--encoder_precision bf16 is part of what a folder's label maps mean (a fp32 re-run on it is
    refused); benchmarks/bench_infer_precision.py masks the same frames both ways and compares."""
    from benchmarks import bench_infer_precision

    data = tmp_path / "frames"
    (data / "V" / "img").mkdir(parents=True)
    for src in sorted((run["root"] / "SynLung-Pleura" / "img").glob("*.png"))[:3]:
        cv2.imwrite(str(data / "V" / "img" / src.name), cv2.imread(str(src)))
    args = ["--ckpt", str(run["s2"] / "best.pt"), "--data_dir", str(data), "--workers", "0",
            "--out_dir", str(tmp_path / "bf16")]
    infer_masks.main(args + ["--encoder_precision", "bf16"])
    assert json.loads((tmp_path / "bf16" / "asam_settings.json").read_text())["encoder_precision"] == "bf16"
    (data / "V" / "img" / "extra.png").write_bytes((data / "V" / "img" / src.name).read_bytes())
    with pytest.raises(DataError, match="encoder_precision was 'bf16'"):
        infer_masks.main(args)
    res = bench_infer_precision.main(["--ckpt", str(run["s2"] / "best.pt"), "--frames", str(data), "--n", "4",
                                      "--out", str(tmp_path / "p.json")])
    assert set(res["runs"]) == {"fp32", "bf16"} and res["settings"]["frames"] == 4
    assert 0.5 < res["agreement"]["pixel_agreement"] <= 1.0


def test_compare_maps_by_hand():
    from benchmarks.bench_infer_precision import compare_maps

    a = [np.array([[1, 1], [0, 2]]), np.array([[0, 0], [0, 0]])]
    b = [np.array([[1, 0], [0, 0]]), np.array([[0, 0], [2, 0]])]
    r = compare_maps(a, b, 2)
    assert r["pixel_agreement"] == 5 / 8                 # 2 of frame 1, 3 of frame 2
    assert r["per_prompt"][1] == {"same_call": 1.0, "iou": 0.5, "frames_both": 1, "frames_a": 1, "frames_b": 1}
    assert r["per_prompt"][2] == {"same_call": 0.0, "iou": None, "frames_both": 0, "frames_a": 1, "frames_b": 1}


def test_cache_rounding_decodes_the_embedding_it_is_given(run, tmp_path):
    """benchmarks/measure_cache_rounding.py: its float32 pass is predict_index_maps itself (a wrapper
    that handed over another embedding, or broke the segmenter, would differ), its rounded pass reads
    the embedding rounded to float16, and the script counts one decision per frame and prompt."""
    from benchmarks import measure_cache_rounding as mcr
    from SAM.checkpoint import prompter_from_checkpoint, segmenter_from_checkpoint
    from SAM.fast_decoder import predict_index_maps
    from SAM.infer_masks import presence_decision

    ck = load_checkpoint(run["s2"] / "best.pt", ("asam_stage2",))
    seg, prompter = segmenter_from_checkpoint(ck).eval(), prompter_from_checkpoint(ck).eval()
    keys = ck["prompt_keys"]
    presence, _ = presence_decision(ck, keys, "checkpoint")
    assert presence is not None
    torch.manual_seed(0)
    images = torch.rand(2, 3, seg.img_size, seg.img_size)
    valid, sizes = [(seg.img_size, seg.img_size)] * 2, [(80, 96), (64, 64)]
    ids = list(range(len(keys)))
    (m32, s32), (m16, s16) = mcr.decode_both(seg, prompter, images, ids, valid, sizes, presence)
    with torch.no_grad():
        ref_maps, ref_scores = predict_index_maps(seg, prompter, images, ids, valid, sizes, return_scores=True,
                                                  presence=presence)
        emb16 = seg.embed(images).half().float()
        r16_maps, _ = predict_index_maps(mcr.with_fixed_embedding(seg, emb16), prompter, images, ids, valid, sizes,
                                         return_scores=True, presence=presence)
    assert all(np.array_equal(a, b) for a, b in zip(m32, ref_maps)) and s32 == ref_scores
    assert all(np.array_equal(a, b) for a, b in zip(m16, r16_maps))
    assert not torch.equal(emb16, seg.embed(images))          # the rounding is real

    data = tmp_path / "frames"
    (data / "V" / "img").mkdir(parents=True)
    for src in sorted((run["root"] / "SynLung-Pleura" / "img").glob("*.png"))[:3]:
        cv2.imwrite(str(data / "V" / "img" / src.name), cv2.imread(str(src)))
    res = mcr.main(["--ckpt", str(run["s2"] / "best.pt"), "--frames", str(data), "--n", "3",
                    "--out", str(tmp_path / "r.json")])
    assert res["presence_decisions"] == 3 * len(keys) and set(res["presence_flips"]) == set(keys)
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["frames"] == 3
