"""Graded exercises: generate the student versions, check them, and grade a folder of submissions.

The exercises are nbgrader (https://nbgrader.readthedocs.io) master notebooks in ``solutions/``,
one folder per assignment: ``solutions/<assignment>/<notebook>.ipynb``. Solution code sits
between ``### BEGIN SOLUTION`` / ``### END SOLUTION``, hidden tests between
``### BEGIN HIDDEN TESTS`` / ``### END HIDDEN TESTS``, and every cell carries nbgrader metadata
(grade / solution / locked / points / grade_id). Three commands use them, all configured here in
code (there is no nbgrader_config.py) and all working in temporary course folders, so the
instructor's files are only ever read:

    python -m course_utils.grading generate          # solutions/ -> exercises/ (student versions)
    python -m course_utils.grading validate          # masters pass, exercises fail, in sync
    python -m course_utils.grading SUBMISSIONS [--out DIR]   # grade -> DIR/grades.csv + feedback

``generate`` runs ``nbgrader generate_assignment`` and rewrites each Colab badge from
``.../solutions/...`` to ``.../exercises/...`` (a preprocessor placed before the checksums), so
every notebook's badge points at its own path.

Submissions: one folder per student, ``SUBMISSIONS/<student>/<notebook>.ipynb`` (or
``SUBMISSIONS/<student>/<assignment>/<notebook>.ipynb``, nbgrader's layout). A notebook is
recognised by its file name, also when a download renamed it ("Copy of …", "… (1)").

Grading runs ``nbgrader autograde`` then ``generate_feedback`` for one student and one
assignment at a time, each in a subprocess of its own, in a course folder of its own:

* a per-cell time limit (an infinite loop costs that cell, not the batch), a limit for the whole
  notebook (the subprocess group is killed), an output cap per cell and a file-size cap;
* inside the kernel a Python audit hook refuses writes and deletions outside the kernel's own
  working folder, starting processes, signalling others, ``os._exit``, and reading the
  solutions, the gradebook or other learners' notebooks;
* a submission whose editor dropped nbgrader's cell metadata, or whose learner deleted a test
  cell, is repaired from the released version first (see :func:`repair_submission`);
* before the batch every submission is copied, and after each student the instructor's folders
  (solutions, exercises, submissions) are compared with a snapshot and restored if they changed.

This isolates mistakes and mischief from learners; it is not a security boundary against a
determined attacker (a C extension can bypass an audit hook): grade untrusted code from
strangers in a container or a virtual machine.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .assets import CACHE_VARIABLE, cache_dir

__all__ = [
    "CSV_FIELDS",
    "Exercise",
    "GradeRow",
    "check_exercises",
    "generate_exercises",
    "grade_submissions",
    "install_sandbox",
    "list_exercises",
    "main",
    "normalise_notebook",
    "repair_submission",
    "validate_notebook",
]

ROOT = Path(__file__).resolve().parent.parent
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
_BADGE = re.compile(
    r"(https://colab\.research\.google\.com/github/[^/\s)]+/[^/\s)]+/blob/[^/\s)]+/)solutions/"
)
_STUDENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$")


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_dir(path: object, name: str, must_exist: bool = True) -> Path:
    """Return ``path`` as a resolved Path, else raise a helpful error."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{name} must be a path (str or Path), got {type(path).__name__}.")
    resolved = Path(path).expanduser().resolve()
    if must_exist and not resolved.is_dir():
        raise ValueError(f"{name} {str(path)!r} is not a folder; pass an existing folder.")
    return resolved


def _check_seconds(value: object, name: str) -> float:
    """Return ``value`` if it is a positive number of seconds, else raise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}.")
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}; e.g. {name}=60.")
    return value


def _check_positive_int(value: object, name: str) -> int:
    """Return ``value`` if it is a positive int, else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}.")
    return value


# --------------------------------------------------------------------------------------------
# The exercises: what solutions/ holds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exercise:
    """One graded test cell of a master notebook."""

    assignment: str
    notebook: str  # file stem, e.g. "02_lora_math_exercises"
    grade_id: str
    points: float


def _assignments(solutions: Path) -> dict[str, list[Path]]:
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
    import nbformat

    solutions = _check_dir(solutions, "solutions")
    exercises = []
    for assignment, notebooks in _assignments(solutions).items():
        for path in notebooks:
            for cell in nbformat.read(path, as_version=4).cells:
                meta = cell.metadata.get("nbgrader", {})
                if meta.get("grade"):
                    exercises.append(
                        Exercise(assignment, path.stem, meta["grade_id"], meta.get("points", 0))
                    )
    return exercises


# --------------------------------------------------------------------------------------------
# nbgrader configuration, in code
# --------------------------------------------------------------------------------------------


def _badge_preprocessor():
    """A preprocessor that points Colab badges at exercises/ instead of solutions/."""
    from nbgrader.preprocessors import NbGraderPreprocessor

    class PointBadgeAtExercises(NbGraderPreprocessor):
        """Rewrite ``…/blob/<branch>/solutions/…`` badge URLs to ``…/exercises/…``."""

        def preprocess_cell(self, cell, resources, index):
            """Rewrite the badge URLs of one cell."""
            cell.source = _BADGE.sub(r"\1exercises/", cell.source)
            return cell, resources

    return PointBadgeAtExercises


def _capped_execute(max_output_bytes: int):
    """nbgrader's Execute preprocessor with a cap on the output bytes kept per cell."""
    from nbgrader.preprocessors import Execute

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


def _config(
    root: Path,
    *,
    cell_timeout: float = DEFAULT_CELL_TIMEOUT,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    sandbox: bool = False,
):
    """The nbgrader configuration: course folder ``root`` with solutions/ and exercises/."""
    from nbgrader.converters import Autograde, GenerateAssignment
    from nbgrader.preprocessors import Execute
    from traitlets.config import Config

    c = Config()
    c.CourseDirectory.root = str(root)
    c.CourseDirectory.source_directory = "solutions"
    c.CourseDirectory.release_directory = "exercises"
    c.CourseDirectory.db_url = f"sqlite:///{root / 'gradebook.db'}"
    c.GenerateAssignment.preprocessors = [
        _badge_preprocessor(),
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
        code = "import course_utils.grading as _g; _g.install_sandbox(); del _g"
        c.Execute.extra_arguments = [
            "--HistoryManager.hist_file=:memory:",
            f"--IPKernelApp.exec_lines={code}",
        ]
        capped = _capped_execute(max_output_bytes)
        c.Autograde.autograde_preprocessors = [
            capped if pp is Execute else pp
            for pp in Autograde.class_traits()["autograde_preprocessors"].default()
        ]
    return c


def _with_own_scripts_on_path() -> None:
    """Put this Python's scripts folder on PATH: nbgrader runs `alembic` from there.

    Without it, `python -m course_utils.grading` from a virtual environment that is not
    activated (as `make` runs it) fails with "No such file or directory: 'alembic'".
    """
    scripts = str(Path(sys.executable).parent)
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


def _run_app(app_class, config, assignment: str, student: str | None = None) -> dict:
    """Run one nbgrader converter; return {"success", "log", "error"}."""
    from nbgrader.coursedir import CourseDirectory
    from nbgrader.utils import capture_log

    _with_own_scripts_on_path()
    config.CourseDirectory.assignment_id = assignment
    if student is not None:
        config.CourseDirectory.student_id = student
    app = app_class(coursedir=CourseDirectory(config=config), config=config)
    app.force = True
    return capture_log(app)


# --------------------------------------------------------------------------------------------
# Generating exercises/ from solutions/
# --------------------------------------------------------------------------------------------


def _generate_into(root: Path, solutions: Path, assignments: Iterable[str]) -> None:
    """Copy ``solutions`` into the course folder ``root`` and generate its exercises/ there."""
    from nbgrader.converters import GenerateAssignment

    shutil.copytree(solutions, root / "solutions", ignore=shutil.ignore_patterns(".*"))
    config = _config(root)
    for assignment in assignments:
        result = _run_app(GenerateAssignment, config, assignment)
        if not result["success"]:
            raise RuntimeError(
                f"nbgrader could not generate {assignment!r}; fix the master notebook:\n"
                f"{result.get('log', '')}\n{result.get('error', '')}"
            )


def generate_exercises(
    solutions: str | os.PathLike = SOLUTIONS_DIR, exercises: str | os.PathLike = EXERCISES_DIR
) -> list[Path]:
    """Regenerate the student versions in ``exercises`` from the masters; return the notebooks."""
    solutions = _check_dir(solutions, "solutions")
    exercises = _check_dir(exercises, "exercises", must_exist=False)
    if exercises == solutions or solutions in exercises.parents:
        raise ValueError("exercises must be a folder outside solutions; e.g. exercises/.")
    assignments = _assignments(solutions)
    with tempfile.TemporaryDirectory(prefix="course-generate-") as tmp:
        root = Path(tmp)
        _generate_into(root, solutions, assignments)
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
    solutions = _check_dir(solutions, "solutions")
    exercises = _check_dir(exercises, "exercises", must_exist=False)
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
    from nbgrader.validator import Validator

    path = Path(path).resolve()
    if not path.is_file() or path.suffix != ".ipynb":
        raise ValueError(f"{path} is not a notebook; pass a path to an .ipynb file.")
    _check_seconds(timeout, "timeout")
    with tempfile.TemporaryDirectory(prefix="course-validate-") as tmp:
        config = _config(Path(tmp), cell_timeout=timeout)
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


# --------------------------------------------------------------------------------------------
# The kernel sandbox (an audit hook)
# --------------------------------------------------------------------------------------------

_SPAWN_EVENTS = frozenset(
    {
        "subprocess.Popen",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.fork",
        "os.forkpty",
        "os.startfile",
        "pty.spawn",
    }
)
#: event -> [(index of a path argument, index of its dir_fd argument or None)]
_PATH_EVENTS = {
    "os.remove": [(0, 1)],
    "os.rmdir": [(0, 1)],
    "os.mkdir": [(0, 2)],
    "os.rename": [(0, 2), (1, 3)],
    "os.link": [(0, 2), (1, 3)],
    "os.symlink": [(1, 2)],
    "os.chmod": [(0, 2)],
    "os.chown": [(0, 3)],
    "os.utime": [(0, 3)],
    "os.truncate": [(0, None)],
    "os.chflags": [(0, None)],
    "os.lchflags": [(0, None)],
    "os.lchmod": [(0, None)],
    "os.setxattr": [(0, None)],
    "os.removexattr": [(0, None)],
    "os.mkfifo": [(0, None)],
    "os.mknod": [(0, None)],
    "shutil.rmtree": [(0, 1)],
    "shutil.move": [(0, None), (1, None)],
    "shutil.copyfile": [(1, None)],
    "shutil.copytree": [(1, None)],
    "shutil.chown": [(0, None)],
    "sqlite3.connect": [(0, None)],
}
#: events that remove or move their path: a writable folder itself may not be their target
_REMOVE_EVENTS = frozenset({"os.remove", "os.rmdir", "os.rename", "shutil.rmtree", "shutil.move"})
_READ_EVENTS = frozenset({"os.listdir", "os.scandir", "glob.glob", "os.walk"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _fd_path(fd: int) -> str | None:
    """The path an open file descriptor refers to, where the OS tells (Linux, macOS)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        pass
    try:
        import fcntl

        if hasattr(fcntl, "F_GETPATH"):
            raw = fcntl.fcntl(fd, fcntl.F_GETPATH, bytes(1024))
            return raw.split(b"\0", 1)[0].decode()
    except (OSError, ValueError):
        pass
    return None


def install_sandbox(
    writable: Sequence[str | os.PathLike] | None = None,
    hidden: Sequence[str | os.PathLike] | None = None,
) -> tuple[list[str], list[str]]:
    """Refuse, for the rest of this process, writes outside ``writable`` and reads of ``hidden``.

    Reading stays allowed inside ``writable`` even when a hidden folder contains it.

    Also refuses starting processes, signalling other processes and ``os._exit`` (a dead
    kernel would lose the whole notebook's grades). By default ``writable`` is
    the current folder plus the folders in $COURSE_GRADING_WRITABLE, and ``hidden`` the paths in
    $COURSE_GRADING_HIDDEN. The grader calls this at the start of every grading kernel. Deleting
    or renaming a writable folder itself (not just what is inside it) is refused too. Python
    cannot take an audit hook back, so this lasts until the process ends.
    """

    def from_env(name: str) -> list[str]:
        return [p for p in os.environ.get(name, "").split(os.pathsep) if p]

    for value, name in ((writable, "writable"), (hidden, "hidden")):
        if isinstance(value, str | bytes | os.PathLike) or not (
            value is None or isinstance(value, Sequence)
        ):
            raise TypeError(f"{name} must be a list of folders, got {value!r}; e.g. [os.getcwd()].")
    if writable is None:
        writable = [os.getcwd(), *from_env(SANDBOX_WRITABLE)]
    if hidden is None:
        hidden = from_env(SANDBOX_HIDDEN)
    log_path = os.environ.get(SANDBOX_LOG, "")
    roots = tuple(os.path.realpath(os.fspath(p)) for p in writable)
    secret = tuple(os.path.realpath(os.fspath(p)) for p in hidden)
    allowed_devices = ("/dev/null", "/dev/zero", "/dev/tty", "/dev/stdout", "/dev/stderr")
    busy = threading.local()
    own_pid = os.getpid()

    def within(path: str, folders: tuple[str, ...], strictly: bool) -> bool:
        for folder in folders:
            if path == folder:
                if not strictly:
                    return True
            elif path.startswith(folder.rstrip(os.sep) + os.sep):
                return True
        return False

    def resolve(path: object, dir_fd: object = None, follow: bool = True) -> str | None:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        elif isinstance(path, os.PathLike):
            path = os.fspath(path)
            path = os.fsdecode(path) if isinstance(path, bytes) else path
        if isinstance(path, int):
            return _fd_path(path)
        if not isinstance(path, str):
            return None
        if path == ":memory:" or path.startswith("file::memory:"):
            return ":memory:"
        if not os.path.isabs(path):
            no_fd = dir_fd is None or (isinstance(dir_fd, int) and dir_fd < 0)  # -1: none given
            base = os.getcwd() if no_fd else _fd_path(dir_fd)
            if base is None:
                return None
            path = os.path.join(base, path)
        if follow:
            return os.path.realpath(path)
        head, tail = os.path.split(os.path.abspath(path))
        return os.path.join(os.path.realpath(head), tail)

    def hidden_path(path: str | None) -> bool:
        """Inside a hidden folder and not inside a writable one (those stay readable)."""
        return bool(
            path
            and secret
            and within(path, secret, strictly=False)
            and not within(path, roots, strictly=False)
        )

    def refuse(what: str) -> None:
        if log_path:  # tell the grader even if the notebook catches the error
            try:
                with open(log_path, "a", encoding="utf-8") as log:
                    log.write(what.replace("\n", " ")[:300] + "\n")
            except OSError:
                pass
        raise PermissionError(f"the grader blocked {what}: graded notebooks may not do that.")

    def check_write(path: str | None, what: str, strictly: bool = False) -> None:
        if path == ":memory:" or (path in allowed_devices):
            return
        if path is None or not within(path, roots, strictly=strictly):
            refuse(f"{what} {path!r} (outside this notebook's folder)")

    def hook(event: str, args: tuple) -> None:
        if getattr(busy, "active", False):
            return
        busy.active = True
        try:
            if event in _SPAWN_EVENTS:
                refuse(f"starting a process ({event})")
            elif event in ("os.kill", "os.killpg", "signal.pthread_kill"):
                harmless = (0, signal.SIGINT)  # "are you alive?" and "interrupt yourself"
                own = event == "signal.pthread_kill" or (event == "os.kill" and args[0] == own_pid)
                if not (own and len(args) > 1 and args[1] in harmless):
                    refuse(f"sending a signal ({event}{tuple(args)})")
            elif event == "open":
                path, mode, flags = (tuple(args) + (None, None, 0))[:3]
                if isinstance(path, int):
                    return
                writing = bool(mode and any(c in str(mode) for c in "wax+")) or bool(
                    (flags or 0) & _WRITE_FLAGS
                )
                target = resolve(path)
                if hidden_path(target):
                    refuse(f"reading {target!r}")
                if writing:
                    if mode is None and isinstance(path, str | bytes) and not os.path.isabs(path):
                        refuse(f"os.open of the relative path {path!r} for writing")
                    check_write(target, "writing")
            elif event in _PATH_EVENTS:
                follow = event in ("sqlite3.connect", "os.truncate", "shutil.copyfile")
                for index, fd_index in _PATH_EVENTS[event]:
                    if index >= len(args):
                        continue
                    dir_fd = (
                        args[fd_index] if fd_index is not None and fd_index < len(args) else None
                    )
                    target = resolve(args[index], dir_fd, follow=follow)
                    check_write(target, event, strictly=event in _REMOVE_EVENTS)
            elif event in _READ_EVENTS and args:
                target = resolve(args[0])
                if hidden_path(target):
                    refuse(f"listing {target!r}")
        finally:
            busy.active = False

    sys.addaudithook(hook)

    real_exit = os._exit

    def refuse_exit(*args: object, **kwargs: object) -> None:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("ipykernel."):  # its parent poller ends an orphaned kernel
            real_exit(*args, **kwargs)
        refuse("ending the process with os._exit")

    os._exit = refuse_exit  # no audit event to catch: a killed kernel would lose every grade
    try:
        import posix

        posix._exit = refuse_exit
    except ImportError:  # pragma: no cover - Windows
        pass
    return list(roots), list(secret)


# --------------------------------------------------------------------------------------------
# Grading: one worker subprocess per student and assignment
# --------------------------------------------------------------------------------------------


@dataclass
class GradeRow:
    """One line of grades.csv."""

    student: str
    assignment: str
    notebook: str
    exercise: str
    score: float
    max_score: float
    status: str  # passed | failed | missing | error
    reason: str = ""

    def as_dict(self) -> dict:
        """The row as a dict keyed by CSV_FIELDS."""
        return {name: getattr(self, name) for name in CSV_FIELDS}


def _error_text(output: dict, cell_timeout: float) -> str:
    """A one-line description of an error output."""
    ename, evalue = output.get("ename", "Error"), str(output.get("evalue", ""))
    if ename in ("CellTimeoutError", "KeyboardInterrupt") or "Timeout" in ename:
        return f"the cell ran longer than {cell_timeout:g} s and was stopped (an endless loop?)"
    if ename == "NotImplementedError" and not evalue.strip():
        return "not answered yet (the answer still raises NotImplementedError)"
    first = evalue.strip().splitlines()[0] if evalue.strip() else ""
    text = f"{ename}: {first}" if first else ename
    return text if len(text) <= 300 else text[:297] + "..."


def _reasons(notebook, cell_timeout: float) -> dict[str, str]:
    """{test grade_id: why it did not pass} from an autograded notebook's error outputs."""
    reasons: dict[str, str] = {}
    pending: list[str] = []  # errors in the cells since the previous test cell
    for cell in notebook.cells:
        meta = cell.metadata.get("nbgrader", {})
        errors = [
            _error_text(out, cell_timeout)
            for out in cell.get("outputs", [])
            if out.get("output_type") == "error"
        ]
        if meta.get("grade") and cell.cell_type == "code":
            stderr = any(
                out.get("output_type") == "stream" and out.get("name") == "stderr"
                for out in cell.get("outputs", [])
            )
            if stderr and not errors:
                errors = ["the test cell wrote to stderr (a warning?), which counts as failed"]
            parts = [f"answer: {p}" for p in dict.fromkeys(pending)]
            parts += [f"tests: {p}" for p in dict.fromkeys(errors)]
            reasons[meta["grade_id"]] = "; ".join(parts)
            pending = []
        else:
            pending.extend(errors)
    return reasons


def _worker(root: Path, assignment: str, student: str, cell_timeout: float, max_output: int) -> int:
    """In a subprocess: autograde one student's assignment, make the feedback, write result.json."""
    import nbformat
    from nbgrader.api import Gradebook, MissingEntry
    from nbgrader.converters import Autograde, GenerateFeedback

    config = _config(root, cell_timeout=cell_timeout, max_output_bytes=max_output, sandbox=True)
    result: dict = {"autograde": _run_app(Autograde, config, assignment, student)}
    print(result["autograde"].get("log", ""), result["autograde"].get("error") or "", flush=True)
    if result["autograde"]["success"]:
        result["feedback"] = _run_app(GenerateFeedback, config, assignment, student)
    notebooks: dict[str, dict] = {}
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gradebook:
        for path in sorted((root / "solutions" / assignment).glob("*.ipynb")):
            graded = root / "autograded" / student / assignment / path.name
            reasons = {}
            if graded.is_file():
                try:
                    reasons = _reasons(nbformat.read(graded, as_version=4), cell_timeout)
                except Exception as error:  # noqa: BLE001 - a broken file is reported, not fatal
                    reasons = {"*": f"could not read the graded notebook: {error}"}
            scores = {}
            try:
                submission = gradebook.find_submission_notebook(path.stem, assignment, student)
                for grade in submission.grades:
                    scores[grade.name] = grade.score
            except MissingEntry:
                pass
            notebooks[path.stem] = {"scores": scores, "reasons": reasons}
    result["notebooks"] = notebooks
    (root / "result.json").write_text(json.dumps(result))
    return 0


def _limit_resources() -> None:
    """In the child before exec: cap the size of any file it writes; no core dumps."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):  # pragma: no cover - Windows, odd limits
        pass


def _kill_group(process: subprocess.Popen, root: Path) -> None:
    """Kill a worker, its process group, and the kernel it started (in a session of its own)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        process.kill()
    marker = str(root)  # the kernel's command line names its connection file under root
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with the Jupyter stack
        return
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != os.getpid() and marker in " ".join(proc.info["cmdline"] or []):
                proc.kill()
        except (psutil.Error, OSError):
            continue


@dataclass
class _Job:
    """One student's assignment to grade."""

    student: str  # as in the submissions folder
    student_id: str  # a safe nbgrader id
    assignment: str
    notebooks: dict[str, Path]  # stem -> staged copy
    notes: list[str] = field(default_factory=list)


def _snapshot(folders: Iterable[Path]) -> dict[Path, bytes | None]:
    """Every file (bytes) and folder (None) under ``folders``."""
    state: dict[Path, bytes | None] = {}
    for folder in folders:
        if not folder.exists():
            continue
        state[folder] = None
        for path in folder.rglob("*"):
            if path.is_symlink() or path.is_file():
                state[path] = path.read_bytes() if path.is_file() else b""
            elif path.is_dir():
                state[path] = None
    return state


def _digest(state: dict[Path, bytes | None]) -> str:
    """A hash of a snapshot, cheap to compare."""
    h = hashlib.sha256()
    for path in sorted(state):
        h.update(str(path).encode())
        h.update(b"D" if state[path] is None else hashlib.sha256(state[path]).digest())
    return h.hexdigest()


def _restore(state: dict[Path, bytes | None], folders: Iterable[Path]) -> list[str]:
    """Put the snapshot back; return what had changed."""
    changed = []
    current = _snapshot(folders)
    for path in sorted(set(current) - set(state), key=lambda p: len(p.parts), reverse=True):
        changed.append(f"{path} was added")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    for path in sorted(state, key=lambda p: len(p.parts)):
        content = state[path]
        if content is None:
            if not path.is_dir():
                changed.append(f"{path} was removed")
                path.mkdir(parents=True, exist_ok=True)
        elif current.get(path) != content:
            changed.append(f"{path} was {'changed' if path in current else 'removed'}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
    return changed


def _notebook_key(name: str, stems: Iterable[str]) -> str | None:
    """The master notebook a submitted file name stands for, allowing download renames."""
    stem = Path(name).stem
    stems = list(stems)
    if stem in stems:
        return stem
    lowered = re.sub(r"[\s-]+", "_", stem.lower())
    matches = [s for s in stems if s.lower() in lowered]
    return max(matches, key=len) if matches else None


def _collect(submissions: Path, stems: dict[str, str]) -> tuple[dict, dict, list[str]]:
    """Find SUBMISSIONS/<student>/[<assignment>/]<notebook>.ipynb.

    Returns ``({student: {stem: path}}, {student: [notes]}, [notes about the folder])``.
    """
    students: dict[str, dict[str, Path]] = {}
    student_notes: dict[str, list[str]] = {}
    notes = []
    for entry in sorted(submissions.iterdir()):
        if entry.name.startswith((".", "__")):
            continue
        if not entry.is_dir():
            if entry.suffix == ".ipynb":
                notes.append(
                    f"{entry.name} lies directly in {submissions}: put each student's notebooks "
                    "in a folder named after the student; it was not graded."
                )
            continue
        mine: list[str] = []
        found: dict[str, list[Path]] = {}
        for path in sorted(entry.rglob("*.ipynb")):
            if ".ipynb_checkpoints" in path.parts or len(path.relative_to(entry).parts) > 2:
                continue
            stem = _notebook_key(path.name, stems)
            if stem is None:
                mine.append(f"{path.name} is not one of the exercise notebooks")
                continue
            found.setdefault(stem, []).append(path)
        chosen = {}
        for stem, paths in found.items():
            exact = [p for p in paths if p.stem == stem]
            pick = exact[0] if exact else max(paths, key=lambda p: p.stat().st_mtime)
            if len(paths) > 1:
                mine.append(f"several files for {stem}; graded {pick.name}")
            chosen[stem] = pick
        students[entry.name] = chosen
        student_notes[entry.name] = mine
        notes.extend(f"{entry.name}: {note}" for note in mine)
    return students, student_notes, notes


def _grade_id(cell) -> str | None:
    """The nbgrader grade_id of a cell, or None."""
    return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")


def repair_submission(notebook, released) -> list[str]:
    """Give back nbgrader cells a submission lost, using the released version; return notes.

    Editors sometimes drop cell metadata, and learners delete cells. nbgrader finds the cells
    it grades by their metadata, so without this a correct answer could score zero. In place:
    cells without metadata get it back when their id matches, when their source equals a
    locked released cell, or (answer cells) when they are the only candidate between two
    known cells; locked cells that are gone (instructions, tests) are put back where they were.
    """
    import copy

    released_cells = [c for c in released.cells if _grade_id(c)]
    wanted = {_grade_id(c): c for c in released_cells}
    present = {_grade_id(c) for c in notebook.cells if _grade_id(c) in wanted}
    restored, inserted = 0, 0

    def adopt(cell, source_cell) -> None:
        nonlocal restored
        cell.metadata["nbgrader"] = copy.deepcopy(source_cell.metadata["nbgrader"])
        present.add(_grade_id(source_cell))
        restored += 1

    for cell in notebook.cells:  # 1. by cell id, or by the unchanged source of a locked cell
        if _grade_id(cell):
            continue
        same_id = [r for r in released_cells if r.get("id") and r.get("id") == cell.get("id")]
        same_text = [
            r
            for r in released_cells
            if r.metadata["nbgrader"].get("locked") and r.source.strip() == cell.source.strip()
        ]
        for candidate in same_id + same_text:
            if _grade_id(candidate) not in present and candidate.cell_type == cell.cell_type:
                adopt(cell, candidate)
                break
    order = [_grade_id(c) for c in released_cells]
    for index, gid in enumerate(order):  # 2. an answer cell alone between two known cells
        if gid in present or not wanted[gid].metadata["nbgrader"].get("solution"):
            continue
        before = next((g for g in reversed(order[:index]) if g in present), None)
        after = next((g for g in order[index + 1 :] if g in present), None)
        ids = [_grade_id(c) for c in notebook.cells]
        start = ids.index(before) + 1 if before else 0
        stop = ids.index(after) if after else len(ids)
        candidates = [
            c for c in notebook.cells[start:stop] if c.cell_type == "code" and not _grade_id(c)
        ]
        if len(candidates) == 1:
            adopt(candidates[0], wanted[gid])
    for index, gid in enumerate(order):  # 3. locked cells that are gone come back
        if gid in present or not wanted[gid].metadata["nbgrader"].get("locked"):
            continue
        before = next((g for g in reversed(order[:index]) if g in present), None)
        ids = [_grade_id(c) for c in notebook.cells]
        position = ids.index(before) + 1 if before else 0
        notebook.cells.insert(position, copy.deepcopy(wanted[gid]))
        present.add(gid)
        inserted += 1
    notes = []
    if restored:
        notes.append(f"gave {restored} cell(s) back their nbgrader metadata")
    if inserted:
        notes.append(f"put back {inserted} deleted instruction or test cell(s)")
    return notes


def _safe_ids(names: Iterable[str]) -> dict[str, str]:
    """An nbgrader-safe, unique id for every student folder name."""
    ids: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        base = name if _STUDENT_ID.match(name) else re.sub(r"[^A-Za-z0-9._@+-]", "_", name)
        base = base.lstrip("._-+@") or "student"
        candidate, n = base, 1
        while candidate in used:
            n += 1
            candidate = f"{base}_{n}"
        used.add(candidate)
        ids[name] = candidate
    return ids


def _hub_cache() -> str:
    """The instructor's Hugging Face hub cache folder (where a downloaded model would be)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _grade_job(
    job: _Job,
    base: Path,
    work: Path,
    exercises: list[Exercise],
    hidden: list[Path],
    cell_timeout: float,
    student_timeout: float,
    max_output: int,
    logs: Path,
) -> list[GradeRow]:
    """Grade one student's assignment in its own course folder and subprocess."""
    mine = [e for e in exercises if e.assignment == job.assignment]
    root = work / f"{job.student_id}__{job.assignment}"
    shutil.copytree(base, root)
    scratch = root / "scratch"
    for sub in ("home", "tmp", "ipython", "mpl", "runtime", "cache"):
        (scratch / sub).mkdir(parents=True, exist_ok=True)
    submitted = root / "submitted" / job.student_id / job.assignment
    submitted.mkdir(parents=True)
    for stem, path in job.notebooks.items():
        shutil.copy2(path, submitted / f"{stem}.ipynb")
    env = {
        **os.environ,
        "HOME": str(scratch / "home"),
        "TMPDIR": str(scratch / "tmp"),
        "TEMP": str(scratch / "tmp"),
        "TMP": str(scratch / "tmp"),
        "IPYTHONDIR": str(scratch / "ipython"),
        "MPLCONFIGDIR": str(scratch / "mpl"),
        "JUPYTER_RUNTIME_DIR": str(scratch / "runtime"),
        "XDG_CACHE_HOME": str(scratch / "cache"),
        # the instructor's model caches, read-only for the kernel: HOME moved, they did not
        CACHE_VARIABLE: str(cache_dir()),
        "HF_HUB_CACHE": _hub_cache(),
        "MPLBACKEND": "Agg",
        "HF_HUB_OFFLINE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        SANDBOX_WRITABLE: str(scratch),
        SANDBOX_LOG: str(scratch / "blocked.log"),
        # the solutions, the gradebook and other learners' notebooks; its own folders stay open
        SANDBOX_HIDDEN: os.pathsep.join(str(p) for p in [*hidden, work]),
    }
    command = [
        sys.executable,
        "-m",
        "course_utils.grading",
        "_worker",
        str(root),
        job.assignment,
        job.student_id,
        "--cell-timeout",
        str(cell_timeout),
        "--max-output-bytes",
        str(max_output),
    ]
    log_path = root / "worker.log"
    started = time.monotonic()
    failure = ""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_limit_resources if os.name == "posix" else None,
        )
        try:
            process.wait(timeout=student_timeout)
        except subprocess.TimeoutExpired:
            failure = (
                f"grading stopped after {student_timeout:g} s for the whole notebook "
                "(an endless loop that ignores interrupts?)"
            )
        finally:
            _kill_group(process, root)
            process.wait()
    seconds = time.monotonic() - started
    result = {}
    if not failure:
        try:
            result = json.loads((root / "result.json").read_text())
        except (OSError, ValueError):
            tail = log_path.read_bytes()[-2000:].decode(errors="replace").strip().splitlines()
            failure = "the grader crashed: " + (
                tail[-1] if tail else f"exit code {process.returncode}"
            )
    if result and not result["autograde"].get("success"):
        failure = "nbgrader could not grade it: " + _last_error(result["autograde"])
    with open(log_path, "rb") as log:  # the end of it: a flood may have gone there too
        log.seek(max(0, log_path.stat().st_size - 200_000))
        (logs / f"{job.student_id}__{job.assignment}.log").write_bytes(log.read())
    blocked_log = scratch / "blocked.log"
    blocked = []
    if blocked_log.is_file():
        lines = blocked_log.read_bytes()[:20_000].decode(errors="replace").splitlines()
        blocked = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    feedback = root / "feedback" / job.student_id / job.assignment
    rows = []
    for exercise in mine:
        notebook = result.get("notebooks", {}).get(exercise.notebook, {})
        if exercise.notebook not in job.notebooks:
            rows.append(_row(job, exercise, 0, "missing", "no notebook handed in"))
            continue
        score = notebook.get("scores", {}).get(exercise.grade_id)
        reason = notebook.get("reasons", {}).get(exercise.grade_id, "")
        reason = reason or notebook.get("reasons", {}).get("*", "")
        if failure or score is None:
            rows.append(_row(job, exercise, 0, "error", failure or reason or "not graded"))
        elif score >= exercise.points:
            rows.append(_row(job, exercise, score, "passed", ""))
        else:
            rows.append(_row(job, exercise, score, "failed", reason or "the tests did not pass"))
    if blocked:
        note = f"the grader blocked {len(blocked)} action(s): " + "; ".join(blocked[:3])
        for row in rows:
            row.reason = "; ".join(p for p in [row.reason, note] if p)
    if feedback.is_dir():
        target = logs.parent / "feedback" / job.student_id / job.assignment
        shutil.copytree(feedback, target, dirs_exist_ok=True)
    shutil.rmtree(root, ignore_errors=True)
    total = sum(r.score for r in rows)
    print(
        f"  {job.student:<20} {job.assignment:<20} {total:g}/{sum(e.points for e in mine):g}"
        f"  ({seconds:.1f} s){'  ' + failure if failure else ''}",
        flush=True,
    )
    return rows


def _last_error(result: dict) -> str:
    """What went wrong, from an nbgrader error or log, in one line."""
    text = (result.get("error") or "") + "\n" + (result.get("log") or "")
    if "DeadKernelError" in text or "Kernel died" in text:
        return "the kernel died while running the notebook (os._exit, a crash, or out of memory)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    line = (errors or lines or ["unknown error"])[-1]
    return line[:300]


def _row(job: _Job, exercise: Exercise, score: float, status: str, reason: str) -> GradeRow:
    """A GradeRow for one exercise of one job, with the job's notes appended to the reason."""
    reason = "; ".join(p for p in [reason, *job.notes] if p)
    return GradeRow(
        job.student,
        exercise.assignment,
        exercise.notebook,
        exercise.grade_id,
        float(score),
        float(exercise.points),
        status,
        reason,
    )


def grade_submissions(
    submissions: str | os.PathLike,
    out: str | os.PathLike = DEFAULT_OUT,
    *,
    solutions: str | os.PathLike = SOLUTIONS_DIR,
    exercises: str | os.PathLike = EXERCISES_DIR,
    assignments: Sequence[str] | None = None,
    cell_timeout: float = DEFAULT_CELL_TIMEOUT,
    student_timeout: float = DEFAULT_STUDENT_TIMEOUT,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    jobs: int = 1,
) -> list[GradeRow]:
    """Grade every student folder in ``submissions``; write ``out``/grades.csv and feedback/.

    Returns the rows of grades.csv. Each student's assignment is graded in its own temporary
    course folder by its own subprocess (see the module docstring); a submission that raises,
    hangs, floods its output or touches files it should not gets zero for what failed and a
    reason, and the batch goes on. ``assignments`` limits grading to those assignments
    (default: every assignment at least one student handed a notebook in for).
    """
    submissions = _check_dir(submissions, "submissions")
    solutions = _check_dir(solutions, "solutions")
    exercises_dir = _check_dir(exercises, "exercises", must_exist=False)
    out = _check_dir(out, "out", must_exist=False)
    _check_seconds(cell_timeout, "cell_timeout")
    _check_seconds(student_timeout, "student_timeout")
    _check_positive_int(max_output_bytes, "max_output_bytes")
    _check_positive_int(jobs, "jobs")
    protected = [solutions, exercises_dir, submissions]
    for folder in protected:
        if out == folder or folder in out.parents:
            raise ValueError(f"out must not lie inside {folder}; e.g. --out outputs/grading.")

    all_exercises = list_exercises(solutions)
    stems = {e.notebook: e.assignment for e in all_exercises}
    students, student_notes, notes = _collect(submissions, stems)
    if assignments is None:
        wanted = sorted({stems[s] for found in students.values() for s in found})
    else:
        unknown = sorted(set(assignments) - set(stems.values()))
        if unknown:
            raise ValueError(
                f"unknown assignments {unknown}; choose from {sorted(set(stems.values()))}."
            )
        wanted = sorted(set(assignments))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    snapshot = _snapshot(protected)
    digest = _digest(snapshot)
    lock = threading.Lock()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    for old in (logs, out / "feedback"):
        shutil.rmtree(old, ignore_errors=True)
    logs.mkdir()
    hidden = [solutions, submissions]
    git = solutions.parent / ".git"
    if git.exists():
        hidden.append(git)

    with tempfile.TemporaryDirectory(prefix="course-grading-") as tmp:
        work = Path(tmp)
        base = work / "base"
        base.mkdir()
        print(f"Preparing {', '.join(wanted) or 'nothing'} from {solutions} ...", flush=True)
        if wanted:
            _generate_into(base, solutions, wanted)
        staged = work / "staged"
        ids = _safe_ids(students)
        jobs_list = []
        for student, found in students.items():
            for assignment in wanted:
                mine = {}
                job_notes = list(student_notes[student])
                for stem, path in found.items():
                    if stems[stem] != assignment:
                        continue
                    target = staged / ids[student] / f"{stem}.ipynb"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target)
                    problem = _unreadable(target)
                    if problem:
                        job_notes.append(f"{path.name} is not a valid notebook ({problem})")
                        continue
                    job_notes += _repair_file(target, base / "exercises" / assignment / target.name)
                    mine[stem] = target
                if student != ids[student]:
                    job_notes.append(f"graded as {ids[student]!r}")
                jobs_list.append(_Job(student, ids[student], assignment, mine, job_notes))
        rows: list[GradeRow] = []

        def run(job: _Job) -> list[GradeRow]:
            if not job.notebooks:
                invalid = any("not a valid notebook" in note for note in job.notes)
                status = "error" if invalid else "missing"
                reason = "" if invalid else "no notebook handed in"
                mine = [e for e in all_exercises if e.assignment == job.assignment]
                return [_row(job, e, 0, status, reason) for e in mine]
            result = _grade_job(
                job,
                base,
                work,
                all_exercises,
                hidden,
                cell_timeout,
                student_timeout,
                max_output_bytes,
                logs,
            )
            with lock:
                if _digest(_snapshot(protected)) != digest:
                    changed = _restore(snapshot, protected)
                    warning = (
                        "WARNING: the instructor's files changed while this notebook was graded "
                        f"and were restored ({'; '.join(changed[:3])})"
                    )
                    for row in result:
                        row.reason = "; ".join(p for p in [row.reason, warning] if p)
            return result

        print(f"Grading {len(jobs_list)} submission(s), {jobs} at a time:", flush=True)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for result in pool.map(run, jobs_list):
                rows.extend(result)

    rows.sort(key=lambda r: (r.student, r.assignment, r.notebook))
    with open(out / "grades.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row.as_dict())
    if _digest(_snapshot(protected)) != digest:  # pragma: no cover - the per-job check restores
        _restore(snapshot, protected)
    print(f"Wrote {out / 'grades.csv'} ({len(rows)} rows) and feedback in {out / 'feedback'}.")
    return rows


def _repair_file(path: Path, released: Path) -> list[str]:
    """Repair a staged submission in place against its released version; return notes."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    notes = repair_submission(notebook, nbformat.read(released, as_version=4))
    if notes:
        nbformat.write(notebook, path)
    return notes


def _unreadable(path: Path) -> str:
    """Why a file is not a notebook nbformat can read ('' if it is fine)."""
    import nbformat

    try:
        nbformat.read(path, as_version=4)
    except Exception as error:  # noqa: BLE001 - any parse failure is the finding
        return f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
    return ""


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _grade_parser() -> argparse.ArgumentParser:
    """Arguments of the default command: grading a folder of submissions."""
    parser = argparse.ArgumentParser(
        prog="python -m course_utils.grading",
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "generate":
        parser = argparse.ArgumentParser(prog="python -m course_utils.grading generate")
        parser.add_argument("--solutions", default=str(SOLUTIONS_DIR))
        parser.add_argument("--exercises", default=str(EXERCISES_DIR))
        args = parser.parse_args(argv[1:])
        for path in generate_exercises(args.solutions, args.exercises):
            print(f"generated {path}")
        return 0
    if argv and argv[0] == "validate":
        parser = argparse.ArgumentParser(
            prog="python -m course_utils.grading validate",
            description="Without paths: every master passes, every exercise fails, in sync.",
        )
        parser.add_argument("paths", nargs="*", help="notebooks to validate")
        parser.add_argument("--invert", action="store_true", help="the tests must fail")
        parser.add_argument("--solutions", default=str(SOLUTIONS_DIR))
        parser.add_argument("--exercises", default=str(EXERCISES_DIR))
        args = parser.parse_args(argv[1:])
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
                print(f"     {problem}  (run: python -m course_utils.grading generate)")
            failed += bool(drift)
        return 1 if failed else 0
    if argv and argv[0] == "_worker":
        parser = argparse.ArgumentParser(prog="python -m course_utils.grading _worker")
        parser.add_argument("root")
        parser.add_argument("assignment")
        parser.add_argument("student")
        parser.add_argument("--cell-timeout", type=float, default=DEFAULT_CELL_TIMEOUT)
        parser.add_argument("--max-output-bytes", type=int, default=DEFAULT_MAX_OUTPUT_BYTES)
        args = parser.parse_args(argv[1:])
        return _worker(
            Path(args.root), args.assignment, args.student, args.cell_timeout, args.max_output_bytes
        )
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
    )
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
