"""Argument checks shared by the course's modules: each failure says, in one sentence, what to pass.

Lesson helpers validate what a learner hands them before any work starts, so a typo costs one
line of error, never a traceback from deep inside a library.
"""

from __future__ import annotations

import math

__all__ = ["positive_int", "positive_number"]


def positive_int(value: object, name: str, example: str) -> int:
    """Return `value` if it is an integer > 0, else raise saying what to pass (`example`)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer (got {value!r}); try {example}.")
    return value


def positive_number(value: object, name: str, example: str) -> float:
    """Return `value` as a float if it is a finite number > 0, else raise saying what to pass."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number (got {value!r}); try {example}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite (got {value!r}); try {example}.")
    return float(value)
