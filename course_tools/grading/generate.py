"""The exercises from their masters: ``solutions/`` -> ``exercises/`` (``make exercises``), and checks.

``generate`` runs ``nbgrader generate_assignment`` and rewrites each Colab badge from
``.../solutions/...`` to ``.../exercises/...``; ``validate`` checks that every master passes its
tests, every student version fails them, and ``exercises/`` is in sync with ``solutions/``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from nbgrader.converters import GenerateAssignment
from nbgrader.validator import Validator

from course_utils.checks import positive_number

from .config import (
    EXERCISES_DIR,
    SOLUTIONS_DIR,
    check_dir,
    list_assignments,
    nbgrader_config,
    run_app,
)


def generate_into(root: Path, solutions: Path, assignments: Iterable[str]) -> None:
    """Copy ``solutions`` into the course folder ``root`` and generate its exercises/ there."""
    shutil.copytree(solutions, root / "solutions", ignore=shutil.ignore_patterns(".*"))
    config = nbgrader_config(root)
    for assignment in assignments:
        result = run_app(GenerateAssignment, config, assignment)
        if not result["success"]:
            raise RuntimeError(
                f"nbgrader could not generate {assignment!r}; fix the master notebook:\n"
                f"{result.get('log', '')}\n{result.get('error', '')}"
            )


def generate_exercises(
    solutions: str | os.PathLike = SOLUTIONS_DIR, exercises: str | os.PathLike = EXERCISES_DIR
) -> list[Path]:
    """Regenerate the student versions in ``exercises`` from the masters; return the notebooks."""
    solutions = check_dir(solutions, "solutions")
    exercises = check_dir(exercises, "exercises", must_exist=False)
    if exercises == solutions or solutions in exercises.parents:
        raise ValueError("exercises must be a folder outside solutions; e.g. exercises/.")
    assignments = list_assignments(solutions)
    with tempfile.TemporaryDirectory(prefix="course-generate-") as tmp:
        root = Path(tmp)
        generate_into(root, solutions, assignments)
        exercises.mkdir(parents=True, exist_ok=True)
        for stale in exercises.iterdir():  # exercises/ is generated: nothing else belongs there
            if stale.is_dir() and not stale.name.startswith(".") and stale.name not in assignments:
                shutil.rmtree(stale)
        for assignment in assignments:
            target = exercises / assignment
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(root / "exercises" / assignment, target)
    return sorted(exercises.glob("*/*.ipynb"))


def normalise_notebook(path: str | os.PathLike) -> dict:
    """A notebook's JSON without what may legitimately vary between runs (for comparisons)."""
    notebook = json.loads(Path(path).read_text(encoding="utf-8"))
    notebook.get("metadata", {}).pop("widgets", None)
    for cell in notebook.get("cells", []):
        if isinstance(cell.get("source"), list):
            cell["source"] = "".join(cell["source"])
        cell.get("metadata", {}).pop("execution", None)
    return notebook


def check_exercises(
    solutions: str | os.PathLike = SOLUTIONS_DIR, exercises: str | os.PathLike = EXERCISES_DIR
) -> list[str]:
    """Differences between ``exercises`` and a fresh generation from ``solutions`` (empty if in sync)."""
    solutions = check_dir(solutions, "solutions")
    exercises = check_dir(exercises, "exercises", must_exist=False)
    with tempfile.TemporaryDirectory(prefix="course-check-") as tmp:
        fresh = Path(tmp) / "exercises"
        generate_exercises(solutions, fresh)
        problems = []
        expected = {p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file()}
        actual = (
            {p.relative_to(exercises) for p in exercises.rglob("*") if p.is_file()}
            if exercises.is_dir()
            else set()
        )
        actual = {p for p in actual if ".ipynb_checkpoints" not in p.parts}
        for missing in sorted(expected - actual):
            problems.append(f"exercises/{missing.as_posix()} is missing")
        for extra in sorted(actual - expected):
            problems.append(f"exercises/{extra.as_posix()} is not generated from solutions/")
        for both in sorted(expected & actual):
            if both.suffix == ".ipynb":
                same = normalise_notebook(fresh / both) == normalise_notebook(exercises / both)
            else:
                same = (fresh / both).read_bytes() == (exercises / both).read_bytes()
            if not same:
                problems.append(f"exercises/{both.as_posix()} differs from its generated version")
    return problems


def validate_notebook(
    path: str | os.PathLike, invert: bool = False, timeout: float = 120
) -> list[str]:
    """Run ``nbgrader validate`` (``--invert`` if asked) on one notebook; return the problems.

    A master must pass every test cell; with ``invert=True`` (for a student version) every test
    cell must fail, so that no exercise is handed out already solved.
    """
    path = Path(path).resolve()
    if not path.is_file() or path.suffix != ".ipynb":
        raise ValueError(f"{path} is not a notebook; pass a path to an .ipynb file.")
    positive_number(timeout, "timeout", "timeout=60")
    with tempfile.TemporaryDirectory(prefix="course-validate-") as tmp:
        config = nbgrader_config(Path(tmp), cell_timeout=timeout)
        validator = Validator(config=config)
        validator.invert = invert
        results = validator.validate(str(path))
    problems = []
    for kind in ("type_changed", "changed"):
        for cell in results.get(kind, []):
            problems.append(f"{kind} cell: {cell['source'][:80]!r}")
    for cell in results.get("failed", []):
        first = cell["source"].splitlines()[0] if cell["source"] else ""
        problems.append(f"a test cell fails ({first[:70]}): {cell.get('raw_error', '')[-400:]}")
    for cell in results.get("passed", []):
        first = cell["source"].splitlines()[0] if cell["source"] else ""
        problems.append(f"a test cell passes although the exercise is not solved: {first[:70]}")
    return problems
