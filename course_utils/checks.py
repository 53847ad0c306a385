"""Argument checks shared by the course's modules: each failure says, in one sentence, what to pass.

Lessons 00-15 meet them through every helper they call.

Lesson helpers validate what a learner hands them before any work starts, so a typo costs one
line of error, never a traceback from deep inside a library.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

__all__ = ["WrongType", "flag", "fraction", "one_of", "positive_int", "positive_number"]


class WrongType(TypeError, ValueError):
    """An argument of the wrong type: a TypeError, and a ValueError for code that catches those."""


def positive_int(value: object, name: str, example: str) -> int:
    """Return `value` as an int if it is an integer > 0 (NumPy's too), else raise saying what to pass."""
    message = f"{name} must be a positive integer (got {value!r}); try {example}."
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise WrongType(message)
    if value <= 0:
        raise ValueError(message)
    return int(value)


def positive_number(value: object, name: str, example: str) -> float:
    """Return `value` as a float if it is a finite number > 0, else raise saying what to pass."""
    message = f"{name} must be a positive number (got {value!r}); try {example}."
    if isinstance(value, bool) or not isinstance(value, Real):
        raise WrongType(message)
    if not value > 0:
        raise ValueError(message)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite (got {value!r}); try {example}.")
    return float(value)


def one_of(value: object, name: str, choices: object) -> object:
    """Return `value` if it is one of `choices`, else raise naming them."""
    try:
        known = value in choices
    except TypeError:  # an unhashable value is in no dict or set of names
        known = False
    if not known:
        shown = sorted(choices) if isinstance(choices, set | frozenset | dict) else list(choices)
        raise ValueError(f"{name} must be one of {shown} (got {value!r}).")
    return value


def fraction(value: object, name: str, example: str) -> float:
    """Return `value` as a float if it lies in [0, 1), else raise saying what to pass."""
    message = f"{name} must be a number in [0, 1) (got {value!r}); try {example}."
    if isinstance(value, bool) or not isinstance(value, Real):
        raise WrongType(message)
    if not 0 <= value < 1:
        raise ValueError(message)
    return float(value)


def flag(value: object, name: str) -> bool:
    """Return `value` if it is True or False, else raise."""
    if not isinstance(value, bool):
        raise WrongType(f"{name} must be True or False (got {value!r}); pass {name}=False.")
    return value
