"""One-line feedback for an exercise check (the exercise notebooks of lessons 01-07, 10 and
12-14).

`exercise(number, answer)` decorates a check: what the check raises becomes one line, ✅ / ❌ /
⏳ (not answered yet), printed in a learner's kernel and raised as ``AssertionError`` under
nbgrader. `expect(condition, message)` is how a check says what is wrong (the message ends with
"Hint: ..."). The comparison functions a check uses are bound here when the module is imported,
before a learner's code runs (``torch.allclose`` replaced later in the kernel does not change them).
"""

from __future__ import annotations

import functools
import math
import os
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["Wrong", "allclose", "equal", "exercise", "expect", "isclose", "under_grader"]

#: Bound at import: the checks compare with these, not with what the kernel's names say later.
allclose = torch.allclose
equal = torch.equal
isclose = math.isclose
_COURSE_CODE = str(Path(__file__).resolve().parents[1])
_TENSORS = (torch.Tensor, torch.nn.Parameter)


class Wrong(AssertionError):
    """An answer does not pass: the message says what is wrong and gives a hint."""


def expect(condition: object, message: str) -> None:
    """Raise `Wrong(message)` unless `condition` holds."""
    if not condition:
        raise Wrong(message)


def under_grader() -> bool:
    """True while nbgrader validates or autogrades the notebook (it sets NBGRADER_EXECUTION)."""
    return bool(os.environ.get("NBGRADER_EXECUTION"))


def _where(error: BaseException) -> str:
    """' (your code, line N: `...`)' for the learner's line that raised, or ''."""
    frames = [
        f
        for f in traceback.extract_tb(error.__traceback__)
        if not f.filename.startswith(_COURSE_CODE) and "site-packages" not in f.filename
    ]
    if not frames or not frames[-1].line:
        return ""
    return f" (in {frames[-1].name}, line {frames[-1].lineno}: `{frames[-1].line.strip()}`)"


def _raised(error: BaseException) -> str:
    """'KeyError: 'x' (in f, line 2: `...`)': the exception, its first line and where."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}{': ' + message if message else ''}{_where(error)}"


def _say(line: str, passed: bool) -> None:
    """Print the verdict in a learner's kernel; raise it under nbgrader when it is not a pass."""
    if not passed and under_grader():
        raise AssertionError(line)
    print(line)


def _learners_class(kind: type) -> bool:
    """True if `kind`, a class it inherits from or one of their methods was written in the notebook.

    A notebook's code runs in the module ``__main__``: its classes and functions say so.
    """
    for klass in kind.__mro__:
        methods = (getattr(v, "__func__", v) for v in vars(klass).values())
        if klass.__module__ == "__main__" or any(
            getattr(m, "__module__", None) == "__main__" for m in methods
        ):
            return True
    return False


def _vet(value: object, name: str, depth: int = 0) -> None:
    """Raise Wrong if `value` (or what it holds) could lie to a comparison."""
    kind = type(value)
    if isinstance(value, torch.Tensor):
        expect(
            kind in _TENSORS,
            f"`{name}` returned a {kind.__name__}, a subclass of torch.Tensor. "
            "Hint: return a plain tensor, as the operations on torch.Tensor give it.",
        )
        return
    expect(
        not _learners_class(kind),
        f"`{name}` returned an object of the class {kind.__name__} written in the notebook. "
        "Hint: return the value itself (a number, a tensor, a dict, ...), not an object of your own.",
    )
    if depth < 3 and kind in (tuple, list, set, frozenset):
        for item in value:
            _vet(item, name, depth + 1)
    elif depth < 3 and kind is dict:
        for key, item in value.items():
            _vet(key, name, depth + 1)
            _vet(item, name, depth + 1)


def _vetted(function: object) -> object:
    """`function`, whose results are vetted (_vet) before the check sees them."""
    if not callable(function) or isinstance(function, type):
        return function

    @functools.wraps(function)
    def call(*args, **kwargs):
        result = function(*args, **kwargs)
        _vet(result, getattr(function, "__name__", "your function"))
        return result

    return call


def _names(answers: tuple[str, ...]) -> str:
    """`a`, `a` and `b`, `a`, `b` and `c`."""
    quoted = [f"`{name}`" for name in answers]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def exercise(number: int, *answers: str) -> Callable:
    """Decorate the check of exercise `number`, whose answer is the function(s) named `answers`.

    The check is called with the learner's function(s), and `cases=...` for the grader's hidden
    cases; it raises `Wrong` (via `expect`) when an answer is wrong and may return a short report
    shown under the ✅ line of the visible test.
    """
    if not isinstance(number, int) or number < 1:
        raise ValueError(f"number must be the exercise's number (1, 2, ...), got {number!r}.")
    if not answers or not all(isinstance(a, str) and a for a in answers):
        raise ValueError("name the function(s) the exercise asks for, e.g. exercise(1, 'f').")

    def decorate(check: Callable) -> Callable:
        @functools.wraps(check)
        def run(*args, **kwargs) -> None:
            hidden = "cases" in kwargs
            try:
                mine = [_vetted(a) for a in args[: len(answers)]]  # the learner's functions
                report = check(*mine, *args[len(answers) :], **kwargs)
            except NotImplementedError as error:
                if str(error):  # torch's "... not implemented for 'Float'": the code ran
                    _say(f"❌ Exercise {number}: your code raised {_raised(error)}.", False)
                else:  # the stub's bare `raise NotImplementedError()`
                    line = (
                        f"⏳ Exercise {number} is not answered yet: write {_names(answers)} above."
                    )
                    _say(line, False)
            except Wrong as wrong:
                _say(f"❌ Exercise {number}: {wrong}", False)
            except Exception as error:  # the learner's code raised: say what and where
                _say(f"❌ Exercise {number}: your code raised {_raised(error)}.", False)
            else:
                tests = "the grader's further cases" if hidden else "the tests"
                verb = "passes" if len(answers) == 1 else "pass"
                _say(f"✅ Exercise {number}: {_names(answers)} {verb} {tests}.", True)
                if report and not hidden:
                    print(report)

        return run

    return decorate
