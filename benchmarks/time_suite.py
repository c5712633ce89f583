"""Wall time of the default test suite at several commits, one after the other on this machine:

    python benchmarks/time_suite.py --commits 28bbec9,HEAD --out docs/results/suite_timing.json

Each commit is checked out into a temporary ``git worktree`` beside the repository (so that
``../shared/data`` resolves as it does from the repository), where ``python -m pytest -q -p
no:cacheprovider --durations=0 --durations-min=0`` runs (``.ci/run``'s command without its install step, with
per-test times); the worktree is removed afterwards. Per commit: wall seconds, the seconds and
counts pytest reports, its exit status, the load average before and after, the seconds of each
test (every phase, however short; docs/results/suite_timing.json was made before
``--durations-min=0``, so it holds only the phases of 0.005 s or more), and the seconds of the tests every commit has (a suite that grew can take longer and
still not be slower). Nothing else should run meanwhile: on 2 cores one
parallel job doubles every figure, so the load is recorded, and commits are compared as the
ratio of two runs made minutes apart on the same machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils.io import atomic_write  # noqa: E402

SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)")
SECONDS = re.compile(r" in ([0-9.]+)s")


def pytest_summary(output: str) -> dict:
    """Counts and seconds of pytest's last summary line, e.g. '497 passed, 11 skipped, 2 warnings
    in 634.13s (0:10:34)' -> {'passed': 497, 'skipped': 11, 'warnings': 2, 'seconds': 634.13}."""
    lines = [l for l in output.splitlines() if SECONDS.search(l) and SUMMARY.search(l)]
    if not lines:
        return {}
    out = {{"error": "errors", "warning": "warnings"}.get(kind, kind): int(n) for n, kind in SUMMARY.findall(lines[-1])}
    out["seconds"] = float(SECONDS.search(lines[-1]).group(1))
    return out


DURATION = re.compile(r"^([0-9.]+)s (setup|call|teardown) +(\S+)$")


def test_seconds(output: str) -> dict[str, float]:
    """Seconds per test id (setup + call + teardown) from ``pytest --durations=0`` output."""
    out: dict[str, float] = {}
    for line in output.splitlines():
        m = DURATION.match(line.strip())
        if m:
            out[m.group(3)] = out.get(m.group(3), 0.0) + float(m.group(1))
    return out


def by_name(seconds: dict[str, float]) -> dict[str, float]:
    """Seconds per test name (the id after its file: a test moved to another file keeps its name;
    tests of one name in several files are summed)."""
    out: dict[str, float] = {}
    for test_id, s in seconds.items():
        name = test_id.split("::", 1)[-1]
        out[name] = out.get(name, 0.0) + s
    return out


def shared_seconds(runs: list[dict[str, float]]) -> dict:
    """The test names every run has, and each run's seconds over them (a suite that only grew is
    not slower; a test moved between files still counts)."""
    names = [by_name(r) for r in runs]
    shared = set.intersection(*(set(r) for r in names)) if names else set()
    return {"tests": len(shared), "seconds": [round(sum(r[t] for t in shared), 2) for r in names]}


def summarise(runs: list[dict]) -> dict:
    return {"ratio_to_first": [round(r["wall_s"] / runs[0]["wall_s"], 3) for r in runs],
            "shared_tests": shared_seconds([r["test_seconds"] for r in runs])}


def git(*args: str) -> str:
    r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    if r.returncode:
        last = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise SystemExit(f"time_suite.py: error: git {' '.join(args)}: {last}")
    return r.stdout.strip()


def time_commit(commit: str, log_dir: Path) -> dict:
    sha = git("rev-parse", "--verify", f"{commit}^{{commit}}")
    tree = REPO.parent / f".time_suite_{sha[:12]}"
    if tree.exists():   # left by a killed run
        git("worktree", "remove", "--force", str(tree))
    git("worktree", "prune")
    git("worktree", "add", "--detach", "-f", str(tree), sha)
    try:
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0",
                               "--durations-min=0"],
                              cwd=tree,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        log = log_dir / f"pytest_{sha[:12]}.log"
        log.write_text(proc.stdout + proc.stderr)
    finally:
        git("worktree", "remove", "--force", str(tree))
    return {"commit": sha, "subject": git("log", "-1", "--format=%s", sha)[:120], "wall_s": round(wall, 1),
            "pytest": pytest_summary(proc.stdout), "returncode": proc.returncode,
            "load_avg_1min_before": load_before, "load_avg_1min_after": os.getloadavg()[0], "log": log.name,  # in --log_dir, never committed
            "test_seconds": test_seconds(proc.stdout)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--commits", default=None, help="comma list of commits, timed in this order")
    p.add_argument("--out", default=str(REPO / "docs/results/suite_timing.json"))
    p.add_argument("--log_dir", default="runs/time_suite", help="pytest's output per commit (not committed)")
    p.add_argument("--resummarise", action="store_true",
                   help="run nothing: recompute the ratios and shared-test seconds of --out from its runs")
    a = p.parse_args(argv)
    if a.resummarise:
        result = json.loads(Path(a.out).read_text())
        result.update(summarise(result["runs"]))
        atomic_write(Path(a.out), lambda f: f.write(json.dumps(result, indent=1).encode()))
        print(f"{a.out}: ratios {result['ratio_to_first']}, shared tests {result['shared_tests']}")
        return 0
    commits = [c.strip() for c in (a.commits or "").split(",") if c.strip()]
    if not commits:
        p.error("--commits: expected at least one commit")
    for c in commits:
        if subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "-q", f"{c}^{{commit}}"],
                          capture_output=True).returncode:
            p.error(f"--commits: {c!r} is not a commit of {REPO}")
    from benchmarks.machine import machine
    where = machine()  # the load average before any work
    log_dir = Path(a.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for c in commits:
        runs.append(time_commit(c, log_dir))
        r = runs[-1]
        print(f"{r['commit'][:7]}: {r['wall_s']:.0f} s wall, pytest {r['pytest']}, exit {r['returncode']}")
    result = {"what": "wall time of the default test suite (python -m pytest -q) per commit, run one after "
                      "the other in temporary worktrees", "runs": runs, **summarise(runs),
              "machine": where | {"load_avg_1min_now": os.getloadavg()[0]}}
    atomic_write(Path(a.out), lambda f: f.write(json.dumps(result, indent=1).encode()))
    print(f"wrote {a.out}; ratios to the first commit: {result['ratio_to_first']}; the "
          f"{result['shared_tests']['tests']} tests all share: {result['shared_tests']['seconds']} s")
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
