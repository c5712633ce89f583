"""Numeric command-line flags: each script's ranges in one table, checked right after parsing.

Every stage script declares ``FLAG_RANGES = {"--batch_size": AT_LEAST_1, ...}`` beside its
parser and calls :func:`check_flag_ranges` before any work, so ``--batch_size 0``,
``--lr nan`` or ``--seed -1`` is one line (``--seed -1: must be in [0, 4294967295]``),
raised as the :class:`~utils.io.DataError` that every script prints as one line, never a
traceback from numpy or torch minutes later. A flag left at ``None`` (unset) is not checked.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Mapping

from utils.io import DataError


@dataclass(frozen=True)
class Range:
    """``[low, high]``; ``low_open`` / ``high_open`` exclude an end; ``high=None`` = no bound."""
    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if value < self.low or (self.low_open and value == self.low):
            return False
        return self.high is None or value < self.high or (not self.high_open and value == self.high)

    def __str__(self) -> str:
        high = "inf" if self.high is None else self.high
        return f"{'(' if self.low_open else '['}{self.low}, {high}{')' if self.high_open else ']'}"


AT_LEAST_0 = Range(0)                        # counts that may be 0 (workers, limits)
AT_LEAST_1 = Range(1)                        # sizes, epochs, batch sizes
POSITIVE = Range(0, low_open=True)           # learning rates, scales
PROBABILITY = Range(0, 1)                    # thresholds, filters, fractions that may be 0 or 1
OPEN_FRACTION = Range(0, 1, True, True)      # a share that leaves something on both sides
SEED = Range(0, 2 ** 32 - 1)                 # numpy's seed range (torch's is wider)


def check_flag_ranges(args: argparse.Namespace, ranges: Mapping[str, Range]) -> None:
    """Raise a one-line DataError for the first flag of ``ranges`` whose value lies outside."""
    for flag, span in ranges.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is not None and v not in span:
                raise DataError(f"{flag} {v}: must be in {span}")


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A stage script's parser: the first paragraph of its docstring as the description, the
    docstring's layout kept in ``--help``."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)


def exit_code(run, prog: str = "error") -> int:
    """``run()`` as a script's exit status: 0, or 2 with bad input (a :class:`DataError`) printed
    as one line ``<prog>: error: ...`` (``prog`` "error": just ``error: ...``), never a traceback."""
    import sys

    try:
        run()
    except DataError as e:
        print(f"{prog}: error: {e}" if prog != "error" else f"error: {e}", file=sys.stderr)
        return 2
    return 0

