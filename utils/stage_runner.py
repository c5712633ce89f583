"""Run the pipeline's stage scripts as subprocesses: the one runner of ``run_pipeline.py``
(the demo) and ``study_real_data.py`` (the real-data study).

* :func:`run_command`: one stage, output to the console or appended to a log file; a
  stage that cannot start or exits non-zero is a :class:`StageFailed` naming it.
* :class:`ResumableStages`: the same, recorded in ``<out>/stages/<name>.json``; a stage
  that finished before with the same command and whose outputs exist is skipped, so an
  interrupted run is continued by running it again.
"""
from __future__ import annotations

import datetime as dt
import json
import resource
import shlex
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class StageFailed(RuntimeError):
    """A stage could not start, exited non-zero or did not write its output; the message names it."""


def child_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_command(name: str, cmd: list[str], env: dict[str, str], log_path: Path | None = None,
                cwd: Path = REPO) -> tuple[float, float]:
    """Run one stage script; returns (wall seconds, CPU seconds of the stage's processes).

    Args:
        log_path: append the stage's output there (with a header line); None = the console.
    """
    t, cpu = time.time(), child_cpu_seconds()
    try:
        if log_path is None:
            rc = subprocess.run(cmd, cwd=cwd, env=env).returncode
        else:
            with open(log_path, "a") as log:
                log.write(f"\n### {dt.datetime.now().isoformat(timespec='seconds')} $ {shlex.join(cmd)}\n")
                log.flush()
                rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    except OSError as e:
        raise StageFailed(f"stage '{name}' could not start: {e}") from None
    wall = time.time() - t
    if rc != 0:
        if log_path is None:
            raise StageFailed(f"stage '{name}' failed with exit status {rc} "
                              "(its error is printed above; the command line is above it)")
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise StageFailed(f"stage '{name}' failed with exit status {rc} after {wall:.1f} s; log {log_path}\n"
                          + "\n".join("    " + line for line in tail))
    return wall, child_cpu_seconds() - cpu


def need(path: Path, stage: str) -> Path:
    """A file a stage should have written; its absence fails that stage by name."""
    if not path.exists():
        raise StageFailed(f"stage '{stage}' finished but did not write {path}")
    return path


def _fmt_seconds(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s"


class ResumableStages:
    """Runs stage commands, logs each to ``<out>/logs/<stage>.log``, records them in ``<out>/stages``."""

    def __init__(self, out: Path, env: dict[str, str]):
        self.out, self.env = out, env
        self.records: dict[str, dict] = {}
        (out / "stages").mkdir(parents=True, exist_ok=True)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        for f in sorted((out / "stages").glob("*.json")):  # earlier invocations
            try:
                rec = json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise StageFailed(f"{f}: not valid JSON ({e})") from None
            if not isinstance(rec, dict) or "cmd" not in rec:
                raise StageFailed(f"{f}: not a stage record (no 'cmd')")
            self.records[f.stem] = rec

    def done(self, name: str, cmd: list[str], outputs: list[Path]) -> bool:
        """True when ``name`` finished before with the same command and its outputs exist.

        A finished stage whose command changed (another budget, another checkpoint) is an
        error: its outputs would silently mix two settings in one folder.
        """
        rec = self.records.get(name)
        if rec is None or not all(p.exists() for p in outputs):
            return False
        if rec["cmd"] != cmd:
            raise StageFailed(f"stage '{name}' was run in {self.out} with another command:\n    "
                              f"{shlex.join(rec['cmd'])}\n  now:\n    {shlex.join(cmd)}\n"
                              f"  use another --out, or delete {self.out / 'stages' / (name + '.json')} "
                              "and that stage's outputs")
        return True

    def run(self, name: str, cmd: list[str], outputs: list[Path], note: str = "") -> dict:
        """Run ``cmd`` unless ``name`` finished before and its ``outputs`` exist."""
        from utils.io import atomic_write

        if self.done(name, cmd, outputs):
            print(f"[skip] {name}: done before ({_fmt_seconds(self.records[name]['wall_s'])})", flush=True)
            return self.records[name]
        log_path = self.out / "logs" / f"{name}.log"
        print(f"[run ] {name}{' (' + note + ')' if note else ''}\n       $ {shlex.join(cmd)}", flush=True)
        wall, _ = run_command(name, cmd, self.env, log_path)
        wall = round(wall, 1)
        for p in outputs:
            try:
                need(p, name)
            except StageFailed as e:
                raise StageFailed(f"{e}; log {log_path}") from None
        rec = {"stage": name, "cmd": cmd, "wall_s": wall, "log": str(log_path),
               "finished": dt.datetime.now().isoformat(timespec="seconds"), "note": note}
        self.records[name] = rec
        atomic_write(self.out / "stages" / f"{name}.json", lambda f: f.write(json.dumps(rec, indent=2).encode()))
        print(f"[done] {name}: {_fmt_seconds(wall)}", flush=True)
        return rec
