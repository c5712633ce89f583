"""The training step's fast path on the CPU: batched on-device augmentation against the
per-sample reference (the damage's: tests/test_context_damage.py), mixed precision, no host
synchronisation, the frame cache and the fixed id bound.

Each test names in its docstring the defect that breaks it. The statistical tests draw
thousands of small images; their tolerances are about 4 standard errors of the shares tested.
"""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

import pretrain_aclus
from models.aclus import ACLUS
from models.losses import draw_categorical, id_areas, label_grids
from pretraining import augment as ga
from pretraining.data import (AnatomyPairDataset, TooManyIds, load_pairs, make_crops, make_views, photometric,
                              relabel_mask)
from pretraining.optim import build_optimizer
from pretraining.precision import Precision, compile_encoders, prepare_model
from pretraining.step import NonFiniteWatch, train_step
from tests.host_sync import HostSyncGuard
from utils.io import DataError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _colour_image(side: int = 16, seed: int = 0) -> torch.Tensor:
    """(3, S, S) uint8 with saturated colours (grayscale is visible in the output)."""
    g = _gen(seed)
    return (torch.rand(3, side, side, generator=g) * 255).round().to(torch.uint8)


def _share(x: torch.Tensor) -> float:
    return x.float().mean().item()


# --------------------------------------------------------------------------- #
# photometric ops: the batched op equals torchvision's per image (float images)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name, tv, factors", [
    ("adjust_brightness", TF.adjust_brightness, [0.6, 1.0, 1.4]),
    ("adjust_contrast", TF.adjust_contrast, [0.6, 1.0, 1.4]),
    ("adjust_saturation", TF.adjust_saturation, [0.8, 1.0, 1.2]),
    ("adjust_hue", TF.adjust_hue, [-0.1, 0.03, 0.1]),
])
def test_batched_colour_ops_equal_torchvision_per_image(name, tv, factors):
    """Breaks if a batched op's formula, or its per-image factor, differs from torchvision's."""
    img = torch.rand(3, 3, 12, 12, generator=_gen(1))
    out = getattr(ga, name)(img, torch.tensor(factors))
    for i, f in enumerate(factors):
        torch.testing.assert_close(out[i], tv(img[i], f), atol=2e-6, rtol=0)


def test_batched_blur_solarize_grayscale_equal_torchvision_per_image():
    """Breaks if the blur's kernel (torchvision v2), its padding or its per-image sigma differs,
    or the solarisation threshold is not uint8's 128."""
    img = torch.rand(3, 3, 20, 20, generator=_gen(2))
    sigma = torch.tensor([0.1, 0.7, 2.0])
    k = 5
    out = ga.gaussian_blur(img, sigma, k)
    for i in range(3):
        ref = TF.gaussian_blur(img[i], [k, k], [float(sigma[i])] * 2)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)
    u8 = _colour_image(8)
    torch.testing.assert_close(ga.solarize(u8[None].float() / 255)[0] * 255, TF.solarize(u8, 128).float(),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(ga.grayscale(img)[:, 0], TF.rgb_to_grayscale(img)[:, 0], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- #
# photometric draws and outputs: the per-sample distributions
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("view", [1, 2])
def test_photometric_draws_have_the_per_sample_probabilities_and_ranges(view):
    """Breaks if a probability (jitter 0.8, gray 0.2, blur 1.0 / 0.1, solarise 0 / 0.2), a
    factor range (0.6-1.4, 0.6-1.4, 0.8-1.2, +-0.1), the sigma range (0.1-2) or the uniform
    random order of the jitter ops drifts from pretraining.data.photometric."""
    blur_p, sol_p = ((1.0, 0.0), (0.1, 0.2))[view - 1]
    n = 20000
    d = ga.draw_photometric(n, _gen(view), torch.device("cpu"), blur_p, sol_p)
    tol = 4 * math.sqrt(0.25 / n)
    assert abs(_share(d.jitter) - 0.8) < tol and abs(_share(d.gray) - 0.2) < tol
    assert abs(_share(d.blur) - blur_p) < tol and abs(_share(d.solarize) - sol_p) < tol
    for j, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        f = d.factors[:, j]
        assert lo <= f.min() and f.max() < hi and f.min() < lo + 0.01 and f.max() > hi - 0.01
        assert abs(f.mean().item() - (lo + hi) / 2) < 0.01 * (hi - lo)
    assert 0.1 <= d.sigma.min() and d.sigma.max() < 2.0 and abs(d.sigma.mean().item() - 1.05) < 0.02
    assert torch.equal(d.order.sort(dim=1).values, torch.arange(4).expand(n, 4))  # permutations
    for pos in range(4):
        counts = torch.bincount(d.order[:, pos], minlength=4).float() / n
        assert torch.all((counts - 0.25).abs() < tol), (pos, counts)


@pytest.mark.parametrize("blur_p, sol_p", [(1.0, 0.0), (0.1, 0.2)])
def test_photometric_outputs_match_the_per_sample_distribution(blur_p, sol_p):
    """Breaks if the batched augmentation of one image differs in distribution from
    pretraining.data.photometric's: the share of gray outputs, the mean and spread of the pixel
    values, their range."""
    n, side = 600, 16
    img = _colour_image(side)
    rng = np.random.default_rng(0)
    ref = torch.stack([photometric(img, rng, blur_p, sol_p) for _ in range(n)]).float() / 255
    out = ga.photometric_batch(img.float().expand(n, 3, side, side) / 255, _gen(3), blur_p, sol_p)
    assert out.min() >= 0 and out.max() <= 1

    def gray(x):
        return (x.amax(dim=1) - x.amin(dim=1)).amax(dim=(1, 2)) < 2 / 255

    tol = 4 * math.sqrt(0.16 / n)
    assert abs(_share(gray(ref)) - 0.2) < tol and abs(_share(gray(out)) - 0.2) < tol
    for stat in (lambda x: x.mean(dim=(1, 2, 3)), lambda x: x.std(dim=(1, 2, 3))):
        a, b = stat(ref), stat(out)
        # the means over n images agree within ~4 standard errors of their difference
        assert abs(a.mean() - b.mean()) < 4 * math.sqrt((a.var() + b.var()) / n) + 2 / 255
        assert 0.8 < b.std() / a.std() < 1.25


# --------------------------------------------------------------------------- #
# the step's entry point and the loader's crops
# --------------------------------------------------------------------------- #
def _crop_batch(b: int = 4, size: int = 32, context: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    from utils.synthetic_scan import make_scan

    items = []
    for i in range(b):
        image, label = make_scan(seed=seed + i, size=48, scan_class=i % 3)
        items.append(make_crops(np.repeat(image[..., None], 3, axis=2), relabel_mask(label),
                                np.random.default_rng(seed + i), size, (0.3, 1.0), context))
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def test_augment_batch_gives_the_models_batch():
    """Breaks if a key, dtype or shape of the model's batch changes, the clean overlap is
    augmented, or the draws do not follow the generator's seed."""
    batch = _crop_batch()
    out = ga.augment_batch(batch, _gen(0))
    assert set(out) == {"view1", "view2", "mask1", "mask2", "ctx_clean", "ctx_damaged", "ctx_mask", "ctx_valid"}
    for k in ("view1", "view2", "ctx_clean", "ctx_damaged"):
        assert out[k].shape == (4, 3, 32, 32) and out[k].dtype == torch.float32
        assert out[k].min() >= -2 and out[k].max() <= 2                       # [0, 1] normalised
    assert all(out[k].dtype == torch.int64 for k in ("mask1", "mask2", "ctx_mask"))
    assert torch.equal(out["mask1"], batch["mask1"].long())
    torch.testing.assert_close(out["ctx_clean"], (batch["ctx_crop"].float() / 255 - 0.5) / 0.25)
    again = ga.augment_batch(batch, _gen(0))
    assert all(torch.equal(out[k], again[k]) for k in out)
    assert not torch.equal(out["view1"], ga.augment_batch(batch, _gen(1))["view1"])


def test_crops_have_the_geometry_of_the_per_sample_views():
    """Breaks if make_crops draws its first box or flip otherwise than make_views."""
    from utils.synthetic_scan import make_scan

    image, label = make_scan(seed=3, size=64)
    rgb = np.repeat(image[..., None], 3, axis=2)
    for seed in range(5):
        crops = make_crops(image, label, np.random.default_rng(seed), 32, (0.2, 1.0), True)
        views = make_views(rgb, label, np.random.default_rng(seed), 32, (0.2, 1.0), True)
        assert torch.equal(crops["mask1"].long(), views["mask1"])
        assert crops["crop1"].dtype == torch.uint8 and crops["crop1"].shape == (3, 32, 32)
        assert torch.equal(crops["crop1"][0], crops["crop1"][2])              # a gray frame, expanded


# --------------------------------------------------------------------------- #
# ids: renumbering, the fixed bound, the grids and the draws
# --------------------------------------------------------------------------- #
def test_relabel_keeps_order_and_background_and_refuses_too_many_ids():
    """Breaks if renumbering reorders ids (the draws would change), moves the background off 0,
    or lets a mask with more ids than data.max_mask_ids through."""
    mask = np.array([[7, 7, 300], [12, 300, 7]], np.int32)
    assert relabel_mask(mask).tolist() == [[1, 1, 3], [2, 3, 1]]             # 0 stays free for background
    assert relabel_mask(np.array([[0, 5], [9, 5]])).tolist() == [[0, 1], [2, 1]]
    big = np.array([[0, 1_000_000], [70_000, 3]], np.int64)                   # the np.unique path
    assert relabel_mask(big).tolist() == [[0, 3], [2, 1]]
    with pytest.raises(TooManyIds, match=r"m.pkl: 4 label ids .* data.max_mask_ids is 3"):
        relabel_mask(np.arange(4).reshape(2, 2), 3, "m.pkl")


def test_scatter_label_grids_equal_the_one_hot_ones():
    """Breaks if the scatter path of label_grids disagrees with the one-hot + adaptive pooling
    it replaces (majority area, ties to the smaller id, coarser grids pooled), or its areas
    with id_areas."""
    g = _gen(15)
    labels = torch.randint(0, 5, (6, 32, 32), generator=g)
    labels[:, 8:24, 8:24] = 3                                                  # some large regions
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1)]
    grids, areas = label_grids(labels, sizes, 7, return_areas=True)
    one_hot = torch.nn.functional.one_hot(labels, 7).permute(0, 3, 1, 2).float()
    share = torch.nn.functional.adaptive_avg_pool2d(one_hot, sizes[0])
    for size, grid in zip(sizes, grids):
        ref = (share if size == sizes[0] else torch.nn.functional.adaptive_avg_pool2d(share, size)).argmax(dim=1)
        assert torch.equal(grid, ref), size
    assert torch.equal(areas, id_areas(labels, 7))
    odd, odd_areas = label_grids(labels[:, :30, :30], [(8, 8), (4, 4)], 7, return_areas=True)   # one-hot path
    assert odd[0].shape == (6, 8, 8) and torch.equal(odd_areas, id_areas(labels[:, :30, :30], 7))


def test_draw_categorical_has_multinomials_distribution():
    """Breaks if the sync-free draws differ in distribution from torch.multinomial, or draw an
    id of weight 0 (such as an id absent from one view)."""
    w = torch.tensor([[0.0, 1.0, 0.0, 3.0, 0.0], [2.0, 0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 5.0, 0.0, 0.0]])
    ids = draw_categorical(w, 20000, _gen(16))
    freq = torch.stack([torch.bincount(r, minlength=5) for r in ids]).float() / 20000
    torch.testing.assert_close(freq, w / w.sum(dim=1, keepdim=True), atol=0.015, rtol=0)
    assert torch.all(w.gather(1, ids) > 0)


def test_labels_beyond_the_id_bound_are_refused():
    """Breaks if the model silently pools a label >= its id bound (scatter_add would write
    into the next cell's counts)."""
    model = ACLUS("detcon", proj_hidden=16, proj_dim=8, pred_hidden=16, num_rois=4, num_ids=4)
    batch = {k: v for k, v in ga.augment_batch(_crop_batch(context=False), _gen(0)).items()}
    batch["mask1"] = batch["mask1"].clamp(max=3)
    batch["mask2"] = batch["mask2"].clamp(max=3)
    model(batch, _gen(0))                                                    # within the bound
    batch["mask1"][0, 0, 0] = 4
    with pytest.raises(RuntimeError):
        model(batch, _gen(0))


# --------------------------------------------------------------------------- #
# the frame cache
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("device_augment", [True, False])
def test_cached_items_equal_the_items_read_from_files(synthetic_pretrain_dir, device_augment):
    """Breaks if the in-memory cache changes a sample (gray frames stored as one channel, masks
    renumbered once) in either path."""
    pairs = load_pairs(synthetic_pretrain_dir)[:6]
    files = AnatomyPairDataset(pairs, size=32, seed=1, device_augment=device_augment, cache="none")
    cached = AnatomyPairDataset(pairs, size=32, seed=1, device_augment=device_augment, cache="memory")
    assert cached.cache is not None and all(f.ndim == 2 for f in cached.cache.frames)  # gray: one channel
    for key in [(0, 0), (3, 1), (5, 2)]:
        a, b = files[key], cached[key]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key


def test_cache_reports_unreadable_samples_once_and_refuses_too_many_ids(synthetic_pretrain_dir, tmp_path, caplog):
    """Breaks if the cache stops a run for one bad file, hides it, or turns a mask with too many
    ids (a setting) into a silently skipped sample."""
    pairs = load_pairs(synthetic_pretrain_dir)[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    pairs[0] = (broken, pairs[0][1])
    with caplog.at_level("WARNING"):
        ds = AnatomyPairDataset(pairs, size=32, cache="memory", device_augment=True)
        item = ds[(0, 0)]
    assert item["crop1"].shape == (3, 32, 32) and caplog.text.count("broken.png") == 1
    with pytest.raises(TooManyIds, match="data.max_mask_ids is 2"):
        AnatomyPairDataset(pairs[1:], size=32, cache="memory", max_ids=2)
    assert issubclass(TooManyIds, DataError)


# --------------------------------------------------------------------------- #
# mixed precision
# --------------------------------------------------------------------------- #
def _model(method: str = "aclus") -> ACLUS:
    torch.manual_seed(0)
    return ACLUS(method, proj_hidden=32, proj_dim=16, pred_hidden=32, num_rois=4)


def test_bf16_autocast_loss_matches_fp32_on_the_cpu():
    """Breaks if a loss term is computed in bf16 (the losses take .float() of their inputs) or
    autocast changes the method: on one batch the bf16 loss is within 3 % of fp32's (bf16 keeps
    8 bits of mantissa; measured: 0.04-0.8 % on three batches and three methods), and every term
    within 0.1 absolute (measured <= 0.05)."""
    batch = ga.augment_batch(_crop_batch(b=6), _gen(0))
    model = _model()
    ref_loss, ref_stats = copy.deepcopy(model)(batch, _gen(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = copy.deepcopy(model)(batch, _gen(1))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - ref_loss.item()) < 0.03 * abs(ref_loss.item())
    for k in ref_stats:
        assert abs(stats[k].item() - ref_stats[k].item()) < 0.1, k


def test_train_step_in_bf16_updates_fp32_weights():
    """Breaks if the bf16 step leaves the weights in bf16 or non-finite, or needs a GradScaler."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    precision = Precision("cpu", torch.bfloat16)
    scaler = torch.amp.GradScaler("cuda", enabled=precision.needs_scaler)
    before = model.encoder.resnet.conv1.weight.clone()
    loss, _ = train_step(model, model, opt, scaler, _crop_batch(), 0.1, 0.99, _gen(0), precision,
                                        _gen(1))
    w = model.encoder.resnet.conv1.weight
    assert torch.isfinite(loss) and w.dtype == torch.float32 and not torch.equal(w, before)


# --------------------------------------------------------------------------- #
# no host synchronisation in the step
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("method, context_bn, reads", [("aclus", "running", 0), ("aclus", "batch", 1),
                                                     ("byol_fpn", "batch", 0), ("byol", "batch", 0)])
def test_train_step_reads_nothing_back_from_the_device(method, context_bn, reads):
    """Breaks if the step reads a value back (int(labels.max()), loss.item(), a multinomial of
    one draw, boolean indexing, ...): the CPU proxy of tests/test_cuda.py's sync-debug test.
    ACLUS's context pass with batch statistics reads one thing, which images' crops overlap
    (so that the others stay out of that pass's statistics); nothing else may be read."""
    from pretraining.config import PretrainConfig

    cfg = PretrainConfig().with_values({"model.method": method, "model.projection.hidden_dim": 32,
                                        "model.projection.output_dim": 16, "model.predictor.input_dim": 16,
                                        "model.predictor.hidden_dim": 32, "model.predictor.output_dim": 16,
                                        "loss.mask_rois": 4, "loss.context_batchnorm": context_bn})
    from models.aclus import build_model
    model = build_model(cfg)
    optimizer, _, _ = build_optimizer(cfg, model, 4, 1)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    batch = _crop_batch(context=method == "aclus")
    args = (model, model, optimizer, scaler, batch, 0.1, 0.99, _gen(0), Precision(), _gen(1))
    train_step(*args)                         # first step: momentum buffers are created
    with HostSyncGuard() as guard:
        loss, stats = train_step(*args)
        watch = NonFiniteWatch(torch.device("cpu"))
        watch.update(loss, 1)
    assert len(guard.calls) == reads and len(guard.aten_calls) == reads, (guard.calls, guard.aten_calls)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and not loss.requires_grad


def test_host_sync_guard_sees_the_reads_it_is_meant_to():
    """Breaks if the proxy itself goes blind (then the test above would pass vacuously)."""
    x = torch.arange(4.0)
    with HostSyncGuard() as guard:
        x.sum().item()
        int(x.max())
        x[x > 1]
        torch.multinomial(x + 1, 1)
        if x.sum() > 0:
            pass
    assert [name for name, _ in guard.calls] == ["item", "__int__", "__getitem__", "multinomial", "__bool__"]
    assert all(where.endswith(".py:" + where.rsplit(":", 1)[1]) and "test_gpu_path" in where
               for _, where in guard.calls)                                 # the line that asked
    assert "aten._local_scalar_dense.default" in guard.aten_calls and "aten.multinomial.default" in guard.aten_calls
    with HostSyncGuard() as guard:
        torch.nn.functional.one_hot(x.long(), 5)         # the CPU kernel reads max() inside C++
    assert guard.calls == [] and guard.aten_calls
    with pytest.raises(RuntimeError, match="host synchronisation: tolist"):
        with HostSyncGuard(strict=True):
            x.tolist()


def test_loss_is_read_only_at_log_steps(tmp_path, synthetic_pretrain_dir, make_pretrain_config, monkeypatch):
    """Breaks if the loop reads the loss (or the watch) every step instead of at log steps."""
    checks = []
    original = NonFiniteWatch.check

    def counting(self, where=""):
        checks.append(where)
        return original(self, where)

    monkeypatch.setattr(NonFiniteWatch, "check", counting)
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, model={"method": "detcon"},
                               optimizer={"total_epochs": 1, "warmup_epochs": 0}, log={"log_step": 4})
    assert pretrain_aclus.main(["--cfg", str(cfg), "--device", "cpu"]) == 0
    logged = [json.loads(r)["step"] for r in (tmp_path / "run/log.jsonl").read_text().splitlines()
              if json.loads(r)["kind"] == "step"]
    assert logged == [0, 4, 5] and len(checks) == 3            # 6 steps: 0 and 4, and the epoch's last


def test_non_finite_loss_is_found_at_the_next_log_step_and_never_saved(
        tmp_path, synthetic_pretrain_dir, make_pretrain_config, monkeypatch, capsys):
    """Breaks if a non-finite loss between log steps goes unnoticed, is reported at the wrong
    step, or reaches a checkpoint."""
    original = ACLUS.forward
    calls = []

    def nan_at_step_1(self, batch, generator=None):
        loss, stats = original(self, batch, generator)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), stats

    monkeypatch.setattr(ACLUS, "forward", nan_at_step_1)
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, model={"method": "detcon"}, log={"log_step": 4})
    assert pretrain_aclus.main(["--cfg", str(cfg), "--device", "cpu"]) == 3
    err = capsys.readouterr().err
    assert "non-finite loss at step 1 (found at epoch 1, step 4)" in err
    assert len(calls) == 5 and not (tmp_path / "run/latest.pth").exists()


# --------------------------------------------------------------------------- #
# compile: off by default, a failure leaves the encoders eager
# --------------------------------------------------------------------------- #
def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    """Breaks if a torch.compile that cannot be set up stops the run, or leaves the encoder
    half-compiled."""
    def broken(self, *a, **k):
        raise RuntimeError("no compiler here")

    model = _model("detcon")
    monkeypatch.setattr(torch.nn.Module, "compile", broken)
    with caplog.at_level("WARNING"):
        assert compile_encoders(model) is False
    assert "no compiler here" in caplog.text and model.encoder._compiled_call_impl is None
    from pretraining.config import PretrainConfig
    on = prepare_model(model, PretrainConfig().amp, torch.device("cpu"))
    assert on == {"channels_last": False, "compile": False}
