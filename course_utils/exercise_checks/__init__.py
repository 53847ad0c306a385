"""The checks behind the graded exercises' test cells.

The exercise notebooks of lessons 01-07, 10 and 12-14 call them.

An exercise's visible test cell is one line, for example ``check.lora_forward(lora_forward)``,
and the checking code lives here, one module per exercise notebook, named for its lesson
(``lora_math`` for lesson 02). A check answers in one line:

    ✅ Exercise 1: lora_forward passes the tests.
    ❌ Exercise 1: lora_forward gives wrong values for r=2, alpha=4.0 (...). Hint: ...
    ⏳ Exercise 1 is not answered yet: write `lora_forward` above.

In a learner's kernel a check prints that line and never raises, so Run All reaches the end of a
notebook; under nbgrader (``NBGRADER_EXECUTION`` is set while it validates and autogrades) a check
that does not pass raises ``AssertionError`` with the same line, and the cell earns no points.
The hidden tests of the masters in ``solutions/`` call the same checks on other cases.
"""

import importlib
import pkgutil


def import_all(names: str | None = None) -> None:
    """Import the check modules (all, or the comma-separated `names`) and their feedback.

    The grader does so before a student's code runs, so the references the checks compare with
    are bound before anything could replace them.
    """
    known = [m.name for m in pkgutil.iter_modules(__path__)]
    wanted = [n for n in names.split(",") if n in known] if names else known
    for name in ["feedback", *wanted]:
        importlib.import_module(f"{__name__}.{name}")
