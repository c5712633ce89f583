"""Where a benchmark ran, recorded beside its numbers: one definition for every script here."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict:
    """CPU, cores, torch and its threads, the GPU (None without one), Python, the commit and the
    1-minute load average when called (call it before any work: the load of other jobs)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:
        commit = None
    return {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_avg_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "commit": commit, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version()}
