"""One run per run folder: a lock file naming its owner.

``run.lock`` holds the owner's pid, host and start time. A second run on the same folder is
refused in one line (two runs would interleave their logs and rotate each other's
checkpoints). A lock left by a process that is gone (killed with ``kill -9``, a crashed
node) is taken over with a note: on the lock's own host the pid is checked (with its start
time, so a recycled pid is not mistaken for the owner); a lock of another host is never
judged from here and is named, so that the user can delete it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

from utils.io import DataError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat``
    field 22), or None where it cannot be read (no such process, no ``/proc``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after "(comm)": state is field 3


def owner_alive(owner: dict) -> bool:
    """Whether the process that wrote ``owner`` still runs (asked on its own host only)."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    started = owner.get("proc_start")
    return started is None or process_start(pid) in (None, started)


def describe(owner: dict) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('started')}"


FRESH_S = 10.0  # an empty lock younger than this belongs to a run that is filling it


class RunLock:
    """``with RunLock(run_dir):`` owns ``run_dir`` for the block (raises DataError if another
    live run owns it). The lock is removed on leaving, if it is still this process's."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        pid = os.getpid()
        self.owner = {"pid": pid, "host": socket.gethostname(), "proc_start": process_start(pid),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def _create(self) -> bool:
        """Write the lock with its contents in one step (a link of a complete temporary
        file: no reader sees it half-written); False if a lock exists. On a file system
        without hard links (some network and FUSE mounts) the lock is created exclusively
        and then filled: a reader may see it empty for an instant, and takes a fresh empty
        lock for a run that is starting, never for a stale one."""
        fd, tmp = tempfile.mkstemp(prefix=".run.lock.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                raise
            except OSError:  # no hard links here (EPERM, ENOTSUP, EXDEV ...)
                return self._create_exclusive()
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _create_exclusive(self) -> bool:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # FileExistsError if taken
        with os.fdopen(fd, "w") as f:
            json.dump(self.owner, f)
        return True

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return float("inf")

    def _read(self) -> dict:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) else {}
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> "RunLock":
        for _ in range(2):
            if self._create():
                return self
            owner = self._read()
            if not owner and self._age() < FRESH_S:
                raise DataError(f"{self.path}: another run is starting on this folder (its lock is "
                                f"{self._age():.0f} s old and not yet filled)")
            if owner.get("host") not in (None, self.owner["host"]) or owner_alive(owner):
                raise DataError(f"{self.path.parent}: another run owns this folder ({describe(owner)}; "
                                f"{self.path}); wait for it to end, or delete {self.path.name} if that "
                                "run is gone")
            log.warning("%s: took over a stale lock (%s: that process is gone)", self.path, describe(owner))
            self.path.unlink(missing_ok=True)
        raise DataError(f"{self.path}: could not take the lock (another run keeps taking it)")

    def __exit__(self, *exc) -> None:
        if self._read().get("pid") == self.owner["pid"]:
            self.path.unlink(missing_ok=True)
