"""Peak memory of ONE step of a pipeline stage, measured in a fresh process.

    python -m benchmarks.peak_memory <stage> <setting> <batch> [--device cpu|cuda]

stages: asam_stage1 | asam_stage2 | mask_inference | pretrain | evaluation
settings: demo (configs/synthetic_cpu.yaml, tiny ViT, the sizes run_pipeline.py uses) |
          paper (configs/example.yaml, A-SAM ViT-B at 256 px, evaluation at 224 px)

Prints one JSON line: peak RSS of the process (VmHWM), its RSS before the step (models,
optimizer and inputs built; python + torch imported), the step's increase, and on CUDA
torch.cuda.max_memory_allocated of the step. Weights are random: memory does not depend on
them. The parent (benchmarks/run_all.py) runs one process per measurement, so peaks of
different stages never mix.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

STAGES = ("asam_stage1", "asam_stage2", "mask_inference", "pretrain", "evaluation")
SETTINGS = ("demo", "paper")
CONFIGS = {"demo": REPO / "configs" / "synthetic_cpu.yaml", "paper": REPO / "configs" / "example.yaml"}
#: A-SAM sizes per setting: backbone, input side, prompts per image at inference
ASAM = {"demo": ("vit_tiny", 64, 4), "paper": ("vit_b", 256, 3)}
#: evaluation (finetune protocol) input side per setting
EVAL_SIZE = {"demo": 64, "paper": 224}


def configured_batch(stage: str, setting: str) -> int:
    """The batch size each stage runs with in that setting (its config / script default)."""
    if stage == "pretrain":
        from pretraining.config import load_config
        return load_config(CONFIGS[setting]).data.train_batch_size
    if stage == "evaluation":
        return 32                                   # evaluation_aclus.py --batch_size (paper: 32)
    if stage == "mask_inference":
        return 16 if setting == "demo" else 8       # run_pipeline.py / infer_masks.py default
    return 8                                        # SAM/config.py batch_size (run_pipeline.py too)


def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """Peak RSS of this process image (VmHWM). Not ru_maxrss: that one carries the high-water
    mark of the parent over fork + exec, so every child would report the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _asam_step(stage: str, setting: str, batch: int, device: torch.device) -> Callable[[], None]:
    from SAM.auto_prompter import AutoPrompter, prompter_grid
    from SAM.seg_metrics import asam_loss
    from SAM.segmenter import build_segmenter

    backbone, size, k = ASAM[setting]
    seg = build_segmenter(backbone, size, random_init=True).to(device)
    images = torch.rand(batch, 3, size, size, device=device)
    if stage == "asam_stage1":  # adapters + CNN branch train, click prompts (only_train_sam.py)
        enc = seg.image_encoder
        for name, p in seg.named_parameters():
            p.requires_grad = name.startswith("image_encoder.") and enc.stage1_trainable(name[len("image_encoder."):])
        opt = torch.optim.Adam([p for p in seg.parameters() if p.requires_grad], lr=5e-4)
        points = torch.full((batch, 1, 2), size / 2, device=device)
        labels = torch.ones(batch, 1, dtype=torch.int64, device=device)
        target = (torch.rand(batch, seg.low_res, seg.low_res, device=device) > 0.5).float()

        def step() -> None:
            loss = asam_loss(seg(images, points, labels), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step
    prompter = AutoPrompter(k, grid=prompter_grid(seg.grid)).to(device)
    if stage == "asam_stage2":  # prompter + mask decoder train, encoder frozen (train_auto_prompter.py)
        for name, p in seg.named_parameters():
            p.requires_grad = name.startswith("mask_decoder.")
        params = [p for p in seg.parameters() if p.requires_grad] + list(prompter.parameters())
        opt = torch.optim.Adam(params, lr=5e-4)
        idx = torch.randint(0, k, (batch,), device=device)
        target = (torch.rand(batch, seg.low_res, seg.low_res, device=device) > 0.5).float()

        def step() -> None:
            with torch.no_grad():
                emb = seg.embed(images)
            loss = asam_loss(seg.decode(emb, prompter(images, emb, idx)), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step
    from SAM.fast_decoder import predict_index_maps  # mask inference: all k anatomies per image
    seg.eval()
    prompter.eval()
    valid = [(size, size)] * batch

    def step() -> None:
        predict_index_maps(seg, prompter, images, list(range(k)), valid, [(size, size)] * batch)
    return step


def _pretrain_step(setting: str, batch: int, device: torch.device) -> Callable[[], None]:
    from benchmarks.bench_pretrain_step import make_step
    from pretraining.config import load_config

    cfg = load_config(CONFIGS[setting])
    return make_step(cfg.model.method, batch, cfg.data.resize_size, device, cfg)


def _evaluation_step(setting: str, batch: int, device: torch.device) -> Callable[[], None]:
    from models.encoder_io import build_resnet18

    size = EVAL_SIZE[setting]
    model = build_resnet18(3, None).to(device).train()
    for n, p in model.named_parameters():   # the paper protocol: layer4.1 + new head learn
        p.requires_grad_(n.startswith(("layer4.1.", "fc.")))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01, weight_decay=1e-4)
    x = torch.rand(batch, 3, size, size, device=device)
    y = torch.randint(0, 3, (batch,), device=device)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def build_step(stage: str, setting: str, batch: int, device: torch.device) -> Callable[[], None]:
    """Models, optimizer and inputs of one stage, ready for :func:`measure`."""
    if stage not in STAGES or setting not in SETTINGS:
        raise ValueError(f"stage must be one of {STAGES} and setting one of {SETTINGS}")
    if stage.startswith("asam") or stage == "mask_inference":
        return _asam_step(stage, setting, batch, device)
    if stage == "pretrain":
        return _pretrain_step(setting, batch, device)
    return _evaluation_step(setting, batch, device)


def measure(stage: str, setting: str, batch: int, device: torch.device) -> dict:
    """Build, then run one step; peak memory figures in MiB."""
    torch.manual_seed(0)
    step = build_step(stage, setting, batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = rss_mb()
    step()
    out = {"stage": stage, "setting": setting, "batch": batch, "device": str(device),
           "rss_before_step_mb": round(before, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}
    out["step_increase_mb"] = round(out["peak_rss_mb"] - before, 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=STAGES)
    p.add_argument("setting", choices=SETTINGS)
    p.add_argument("batch", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(json.dumps(measure(a.stage, a.setting, a.batch, torch.device(a.device))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
