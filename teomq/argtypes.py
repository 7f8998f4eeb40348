"""Option helpers shared by the CLI and ``teomq bench``: both flag forms, typed values."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any


def flag(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """Register ``-name`` and ``--name`` for one option."""
    parser.add_argument(f"-{name}", f"--{name}", **kwargs)


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            limit = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be {limit}")
        return value

    return parse


def float_value(*, positive: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"{text!r} must be a {'positive' if positive else 'non-negative'} number")
        return value

    return parse
