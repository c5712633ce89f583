"""Pre-training step time and peak CUDA memory per method at the paper settings, on one GPU.

    python -m utils.synthetic_us --out /tmp/syn --layouts pretrain --n 320 --size 256
    python utils/generate_masks_pkls.py --data_dir /tmp/syn
    python benchmarks/bench_pretrain_gpu.py --data /tmp/syn --out bench_gpu.json

Runs ``pretrain_aclus.py`` (``configs/example.yaml``: 224 px, 32 images per GPU, fp16
autocast) in this process for each method, twice: a step's time is the difference of the
two wall times divided by the difference of their step counts, so start-up, loader
warm-up and checkpoint writing cancel out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pretraining.config import load_config  # noqa: E402
from pretraining.loop import train  # noqa: E402

CONFIG = REPO / "configs" / "example.yaml"


def timed_run(data: str, method: str, steps: int, run_dir: Path) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    cfg = load_config(CONFIG, [f"data.image_dir={data}", f"model.method={method}", f"checkpoint.ckpt_path={run_dir}",
                               "checkpoint.resume_path=", "optimizer.total_epochs=10"])
    # pretrain_aclus.py's loop with the options its command line would give
    train(cfg, argparse.Namespace(device="cuda", resume=None, max_steps=steps, overwrite=True))
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="pre-training folder (pair list + mask pickles)")
    p.add_argument("--out", default="bench_pretrain_gpu.json")
    p.add_argument("--work_dir", default="/tmp/bench_pretrain_gpu", help="run folders")
    p.add_argument("--steps", type=int, nargs=2, default=(4, 24), help="short and long run")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_pretrain_gpu.py needs a CUDA GPU")
    short, long = args.steps
    data = load_config(CONFIG).data
    batch = data.train_batch_size
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": batch,
                 "size": data.resize_size}
    for method in ("byol", "detcon", "aclus"):
        torch.cuda.reset_peak_memory_stats()
        t = {n: timed_run(args.data, method, n, Path(args.work_dir) / f"{method}_{n}") for n in (short, long)}
        step = (t[long] - t[short]) / (long - short)
        res[method] = {"step_s": round(step, 4), "img_per_s": round(batch / step, 1),
                       "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        print(method, res[method], flush=True)
    for m in ("detcon", "aclus"):
        res[f"{m}/byol"] = round(res[m]["step_s"] / res["byol"]["step_s"], 2)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
