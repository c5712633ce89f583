"""argparse value types with ranges: a value out of range is argparse's one-line error naming the
flag (``error: argument --val_fraction: 1.5 is not in (0, 1)``), before any work starts."""
from __future__ import annotations

import argparse
import math
from typing import Callable

#: the largest seed numpy and torch both accept
MAX_SEED = 2 ** 32 - 1


def _number(kind: type, text: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def ranged(kind: type, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False) -> Callable[[str], int | float]:
    """A ``type=`` for argparse: ``kind`` (int or float) within ``[low, high]`` (an end is
    excluded with ``low_open`` / ``high_open``; None: unbounded)."""
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    span = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"

    def parse(text: str) -> int | float:
        value = _number(kind, text)
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            raise argparse.ArgumentTypeError(f"{text} is not in {span}")
        return value
    parse.__name__ = f"{kind.__name__} in {span}"
    return parse


positive_int = ranged(int, 1)
nonnegative_int = ranged(int, 0)
seed_int = ranged(int, 0, MAX_SEED)
positive_float = ranged(float, 0, low_open=True)
nonnegative_float = ranged(float, 0)
open_fraction = ranged(float, 0, 1, low_open=True, high_open=True)
