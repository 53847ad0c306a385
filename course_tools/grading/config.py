"""Grading's configuration: where the masters and exercises are, the limits, nbgrader's settings in code.

There is no nbgrader_config.py: every nbgrader application the tools run is configured by
:func:`nbgrader_config` in a temporary course folder, so the instructor's files are only read.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbgrader.converters import Autograde, GenerateAssignment
from nbgrader.coursedir import CourseDirectory
from nbgrader.preprocessors import Execute, NbGraderPreprocessor
from nbgrader.utils import capture_log
from traitlets.config import Config

from .definitions import DefinitionsOnly

ROOT = Path(__file__).resolve().parents[2]


SOLUTIONS_DIR = ROOT / "solutions"


EXERCISES_DIR = ROOT / "exercises"


DEFAULT_OUT = Path("outputs") / "grading"


#: Columns of grades.csv, one row per student and exercise (graded test cell).
CSV_FIELDS = (
    "student",
    "assignment",
    "notebook",
    "exercise",
    "score",
    "max_score",
    "status",
    "reason",
)


DEFAULT_CELL_TIMEOUT = 60  # seconds per cell


DEFAULT_STUDENT_TIMEOUT = 900  # seconds for one student's assignment, everything included


DEFAULT_MAX_OUTPUT_BYTES = 200_000  # per cell, what a notebook keeps of its output


MAX_FILE_BYTES = 512 * 1024**2  # no file the grading processes write may grow beyond this


SANDBOX_WRITABLE = "COURSE_GRADING_WRITABLE"  # os.pathsep-separated folders the kernel may write


SANDBOX_HIDDEN = "COURSE_GRADING_HIDDEN"  # os.pathsep-separated paths the kernel may not read


SANDBOX_LOG = "COURSE_GRADING_LOG"  # the file where the kernel notes what it refused


SANDBOX_CHECKS = "COURSE_GRADING_CHECKS"  # the check module(s) the kernel imports before any cell


SANDBOX_SETTINGS = "COURSE_GRADING_SANDBOX"  # JSON for isolation.SandboxedKernelManager, or unset


_BADGE = re.compile(
    r"(https://colab\.research\.google\.com/github/[^/\s)]+/[^/\s)]+/blob/[^/\s)]+/)solutions/"
)


STUDENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$")


def check_dir(path: object, name: str, must_exist: bool = True) -> Path:
    """Return ``path`` as a resolved Path, else raise a helpful error."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{name} must be a path (str or Path), got {type(path).__name__}.")
    resolved = Path(path).expanduser().resolve()
    if must_exist and not resolved.is_dir():
        raise ValueError(f"{name} {str(path)!r} is not a folder; pass an existing folder.")
    return resolved


@dataclass(frozen=True)
class Exercise:
    """One graded test cell of a master notebook."""

    assignment: str
    notebook: str  # file stem, e.g. "02_lora_math_exercises"
    grade_id: str
    points: float


def list_assignments(solutions: Path) -> dict[str, list[Path]]:
    """``{assignment: [master notebooks]}`` for every folder of ``solutions`` with notebooks."""
    found = {}
    for folder in sorted(p for p in solutions.iterdir() if p.is_dir()):
        if folder.name.startswith("."):
            continue
        notebooks = sorted(folder.glob("*.ipynb"))
        if notebooks:
            found[folder.name] = notebooks
    if not found:
        raise ValueError(
            f"no master notebooks in {solutions}; put them at solutions/<assignment>/<name>.ipynb."
        )
    return found


def list_exercises(solutions: str | os.PathLike = SOLUTIONS_DIR) -> list[Exercise]:
    """Every graded test cell of every master notebook, in notebook order."""
    solutions = check_dir(solutions, "solutions")
    exercises = []
    for assignment, notebooks in list_assignments(solutions).items():
        for path in notebooks:
            for cell in nbformat.read(path, as_version=4).cells:
                meta = cell.metadata.get("nbgrader", {})
                if meta.get("grade"):
                    exercises.append(
                        Exercise(assignment, path.stem, meta["grade_id"], meta.get("points", 0))
                    )
    return exercises


def badge_preprocessor():
    """A preprocessor that points Colab badges at exercises/ instead of solutions/."""

    class PointBadgeAtExercises(NbGraderPreprocessor):
        """Rewrite ``…/blob/<branch>/solutions/…`` badge URLs to ``…/exercises/…``."""

        def preprocess_cell(self, cell, resources, index):
            """Rewrite the badge URLs of one cell."""
            cell.source = _BADGE.sub(r"\1exercises/", cell.source)
            return cell, resources

    return PointBadgeAtExercises


def capped_execute(max_output_bytes: int):
    """nbgrader's Execute preprocessor with a cap on the output bytes kept per cell."""

    class CappedExecute(Execute):
        """Execute that drops a cell's output beyond ``max_output_bytes`` (and says so)."""

        def output(self, outs, msg, display_id, cell_index):
            """Keep an output message only while the cell is under its byte budget.

            Errors are always kept (shortened): a test cell is graded by whether it has one.
            """
            budget = self.__dict__.setdefault("_grader_budget", {})
            content = msg.get("content", {})
            if msg.get("msg_type") == "error":
                content["evalue"] = str(content.get("evalue", ""))[:2000]
                content["traceback"] = [line[:2000] for line in content.get("traceback", [])[-100:]]
                return super().output(outs, msg, display_id, cell_index)
            used = budget.get(cell_index, 0)
            if used >= max_output_bytes:
                return None
            size = len(content.get("text", "")) + sum(
                len(str(value)) for value in content.get("data", {}).values()
            )
            budget[cell_index] = used + size
            if used + size > max_output_bytes:
                note = f"\n[the grader cut this cell's output at {max_output_bytes:,} bytes]\n"
                if msg.get("msg_type") == "stream":
                    content["text"] = content["text"][: max_output_bytes - used] + note
                else:
                    msg = {**msg, "msg_type": "stream", "content": {"name": "stdout", "text": note}}
            return super().output(outs, msg, display_id, cell_index)

    return CappedExecute


def nbgrader_config(
    root: Path,
    *,
    cell_timeout: float = DEFAULT_CELL_TIMEOUT,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    sandbox: bool = False,
):
    """The nbgrader configuration: course folder ``root`` with solutions/ and exercises/."""
    c = Config()
    c.CourseDirectory.root = str(root)
    c.CourseDirectory.source_directory = "solutions"
    c.CourseDirectory.release_directory = "exercises"
    c.CourseDirectory.db_url = f"sqlite:///{root / 'gradebook.db'}"
    c.GenerateAssignment.preprocessors = [
        badge_preprocessor(),
        *GenerateAssignment.class_traits()["preprocessors"].default(),
    ]
    c.Execute.timeout = max(1, round(cell_timeout))
    c.Execute.interrupt_on_timeout = True
    c.Execute.startup_timeout = 120
    c.Execute.iopub_timeout = 10
    c.Execute.raise_on_iopub_timeout = False
    c.LimitOutput.max_lines = 1000
    c.LimitOutput.max_traceback = 100
    c.HTMLExporter.sanitize_html = True  # feedback pages show learners' outputs: no scripts
    if sandbox:
        # the checks' comparisons are bound before any student code runs, then the audit guard
        code = (
            "import course_utils.exercise_checks as _c; "
            f"_c.import_all(__import__('os').environ.get('{SANDBOX_CHECKS}')); del _c; "
            "import course_tools.grading.sandbox as _g; _g.install_sandbox(); del _g"
        )
        if os.environ.get(SANDBOX_SETTINGS):  # the batch chose the OS sandbox (isolation)
            c.Execute.kernel_manager_class = "course_tools.grading.isolation.SandboxedKernelManager"
        c.Execute.extra_arguments = [
            "--HistoryManager.hist_file=:memory:",
            f"--IPKernelApp.exec_lines={code}",
        ]
        capped = capped_execute(max_output_bytes)
        c.DefinitionsOnly.masters = str(root / "solutions")
        c.Autograde.autograde_preprocessors = [
            DefinitionsOnly,  # the learner's cells keep their definitions only
            *(
                capped if pp is Execute else pp
                for pp in Autograde.class_traits()["autograde_preprocessors"].default()
            ),
        ]
    return c


def with_own_scripts_on_path() -> None:
    """Put this Python's scripts folder on PATH: nbgrader runs `alembic` from there.

    Without it, `python -m course_tools.grading` from a virtual environment that is not
    activated (as `make` runs it) fails with "No such file or directory: 'alembic'".
    """
    scripts = str(Path(sys.executable).parent)
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


def run_app(app_class, config, assignment: str, student: str | None = None) -> dict:
    """Run one nbgrader converter; return {"success", "log", "error"}."""
    with_own_scripts_on_path()
    config.CourseDirectory.assignment_id = assignment
    if student is not None:
        config.CourseDirectory.student_id = student
    app = app_class(coursedir=CourseDirectory(config=config), config=config)
    app.force = True
    return capture_log(app)
