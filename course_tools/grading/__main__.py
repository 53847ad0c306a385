"""``python -m course_tools.grading generate|validate|SUBMISSIONS``: the exercises and the grading.

python -m course_tools.grading generate          # solutions/ -> exercises/ (student versions)
python -m course_tools.grading validate          # masters pass, exercises fail, in sync
python -m course_tools.grading SUBMISSIONS [--out DIR]   # grade -> DIR/grades.csv + feedback
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .batch import grade_submissions, worker
from .config import (
    DEFAULT_CELL_TIMEOUT,
    DEFAULT_MAX_OUTPUT_BYTES,
    DEFAULT_OUT,
    DEFAULT_STUDENT_TIMEOUT,
    EXERCISES_DIR,
    SOLUTIONS_DIR,
)
from .generate import check_exercises, generate_exercises, validate_notebook


def _grade_parser() -> argparse.ArgumentParser:
    """Arguments of the default command: grading a folder of submissions."""
    parser = argparse.ArgumentParser(
        prog="python -m course_tools.grading",
        description=(
            "Grade a folder of submissions (SUBMISSIONS/<student>/<notebook>.ipynb) into "
            "OUT/grades.csv and OUT/feedback/. Other commands: 'generate' (solutions/ -> "
            "exercises/) and 'validate' (masters pass, exercises fail, exercises in sync)."
        ),
    )
    parser.add_argument("submissions", help="folder with one sub-folder per student")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where grades.csv goes")
    parser.add_argument("--solutions", default=str(SOLUTIONS_DIR), help="the master notebooks")
    parser.add_argument("--exercises", default=str(EXERCISES_DIR), help="the student versions")
    parser.add_argument(
        "--assignment", action="append", help="grade only this assignment (repeatable)"
    )
    parser.add_argument("--cell-timeout", type=float, default=DEFAULT_CELL_TIMEOUT)
    parser.add_argument("--student-timeout", type=float, default=DEFAULT_STUDENT_TIMEOUT)
    parser.add_argument("--max-output-bytes", type=int, default=DEFAULT_MAX_OUTPUT_BYTES)
    parser.add_argument("--jobs", type=int, default=1, help="students graded at the same time")
    parser.add_argument(
        "--isolation",
        choices=("auto", "on", "off"),
        default="auto",
        help="each kernel in the OS sandbox (bubblewrap): auto = wherever it works",
    )
    return parser


def _generate(argv: list[str]) -> int:
    """``generate``: solutions/ -> exercises/ (the student versions)."""
    parser = argparse.ArgumentParser(prog="python -m course_tools.grading generate")
    parser.add_argument("--solutions", default=str(SOLUTIONS_DIR))
    parser.add_argument("--exercises", default=str(EXERCISES_DIR))
    args = parser.parse_args(argv)
    for path in generate_exercises(args.solutions, args.exercises):
        print(f"generated {path}")
    return 0


def _validate(argv: list[str]) -> int:
    """``validate``: the masters pass, the exercises fail, exercises/ is in sync."""
    parser = argparse.ArgumentParser(
        prog="python -m course_tools.grading validate",
        description="Without paths: every master passes, every exercise fails, in sync.",
    )
    parser.add_argument("paths", nargs="*", help="notebooks to validate")
    parser.add_argument("--invert", action="store_true", help="the tests must fail")
    parser.add_argument("--solutions", default=str(SOLUTIONS_DIR))
    parser.add_argument("--exercises", default=str(EXERCISES_DIR))
    args = parser.parse_args(argv)
    checks = [(Path(p), args.invert) for p in args.paths]
    if not checks:
        checks = [(p, False) for p in sorted(Path(args.solutions).glob("*/*.ipynb"))]
        checks += [(p, True) for p in sorted(Path(args.exercises).glob("*/*.ipynb"))]
    failed = 0
    for path, invert in checks:
        problems = validate_notebook(path, invert=invert)
        print(f"{'FAIL' if problems else 'ok  '} {path}{' (--invert)' if invert else ''}")
        for problem in problems:
            print(f"     {problem}")
        failed += bool(problems)
    if not args.paths:
        drift = check_exercises(args.solutions, args.exercises)
        print("FAIL exercises/ is out of date:" if drift else "ok   exercises/ is in sync")
        for problem in drift:
            print(f"     {problem}  (run: python -m course_tools.grading generate)")
        failed += bool(drift)
    return 1 if failed else 0


def _worker_command(argv: list[str]) -> int:
    """``_worker``: one student's assignment, autograded in this process (batch starts it)."""
    parser = argparse.ArgumentParser(prog="python -m course_tools.grading _worker")
    parser.add_argument("root")
    parser.add_argument("assignment")
    parser.add_argument("student")
    parser.add_argument("--cell-timeout", type=float, default=DEFAULT_CELL_TIMEOUT)
    parser.add_argument("--max-output-bytes", type=int, default=DEFAULT_MAX_OUTPUT_BYTES)
    args = parser.parse_args(argv)
    return worker(
        Path(args.root), args.assignment, args.student, args.cell_timeout, args.max_output_bytes
    )


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"generate": _generate, "validate": _validate, "_worker": _worker_command}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    args = _grade_parser().parse_args(argv)
    rows = grade_submissions(
        args.submissions,
        args.out,
        solutions=args.solutions,
        exercises=args.exercises,
        assignments=args.assignment,
        cell_timeout=args.cell_timeout,
        student_timeout=args.student_timeout,
        max_output_bytes=args.max_output_bytes,
        jobs=args.jobs,
        isolate={"auto": None, "on": True, "off": False}[args.isolation],
    )
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
