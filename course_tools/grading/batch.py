"""Grading a batch: every student's notebooks through nbgrader, one subprocess each, into grades.csv.

Submissions: one folder per student, ``SUBMISSIONS/<student>/<notebook>.ipynb`` (or
``SUBMISSIONS/<student>/<assignment>/<notebook>.ipynb``, nbgrader's layout). A notebook is
recognised by its file name, also when a download renamed it ("Copy of …", "… (1)").

Grading runs ``nbgrader autograde`` then ``generate_feedback`` for one student and one
assignment at a time, each in a subprocess of its own, in a course folder of its own:

* a per-cell time limit (an infinite loop costs that cell, not the batch), a limit for the whole
  notebook (the subprocess group is killed), an output cap per cell and a file-size cap;
* on Linux with bubblewrap, the kernel runs in an OS sandbox (``isolation``): a read-only
  system, its own scratch and notebook folders only, no network, its own PID namespace and user,
  memory, CPU, process and file-size limits;
* the learner's cells keep only their definitions (``definitions``): top-level code that could
  replace what the tests compare with is commented out, and what learner functions return is
  vetted by the checks (``course_utils.exercise_checks.feedback``);
* inside the kernel (``sandbox``) a Python audit hook refuses writes and deletions outside the kernel's own
  working folder, starting processes, signalling others, ``os._exit``, and reading the
  solutions, the gradebook or other learners' notebooks;
* a submission whose editor dropped nbgrader's cell metadata, or whose learner deleted a test
  cell, is repaired from the released version first (see :func:`repair_submission`);
* before the batch every submission is copied, and after each student the instructor's folders
  (solutions, exercises, submissions) are compared with a snapshot and restored if they changed.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from huggingface_hub import constants
from nbgrader.api import Gradebook, MissingEntry
from nbgrader.converters import Autograde, GenerateFeedback

from course_utils.assets import CACHE_VARIABLE, cache_dir
from course_utils.checks import positive_int, positive_number

from .config import (
    CSV_FIELDS,
    DEFAULT_CELL_TIMEOUT,
    DEFAULT_MAX_OUTPUT_BYTES,
    DEFAULT_OUT,
    DEFAULT_STUDENT_TIMEOUT,
    EXERCISES_DIR,
    SANDBOX_CHECKS,
    SANDBOX_HIDDEN,
    SANDBOX_LOG,
    SANDBOX_SETTINGS,
    SANDBOX_WRITABLE,
    SOLUTIONS_DIR,
    STUDENT_ID,
    Exercise,
    check_dir,
    list_exercises,
    nbgrader_config,
    run_app,
)
from .definitions import MARK
from .generate import generate_into
from .isolation import DEFAULT_LIMITS, Limits, available, readable_paths, settings_for
from .sandbox import kill_group, limit_resources, restore, snapshot_digest, take_snapshot


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
    skipped = 0  # lines of those cells the grader did not run (definitions)
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
            if skipped:
                parts.append(
                    f"the grader ran only the definitions of your cells: {skipped} line(s) "
                    f"not run, marked `{MARK.strip()}` in your feedback"
                )
            reasons[meta["grade_id"]] = "; ".join(parts)
            pending, skipped = [], 0
        else:
            pending.extend(errors)
            if cell.cell_type == "code":
                skipped += sum(line.startswith(MARK) for line in cell.source.splitlines())
    return reasons


def worker(root: Path, assignment: str, student: str, cell_timeout: float, max_output: int) -> int:
    """In a subprocess: autograde one student's assignment, make the feedback, write result.json."""
    config = nbgrader_config(
        root, cell_timeout=cell_timeout, max_output_bytes=max_output, sandbox=True
    )
    result: dict = {"autograde": run_app(Autograde, config, assignment, student)}
    print(result["autograde"].get("log", ""), result["autograde"].get("error") or "", flush=True)
    if result["autograde"]["success"]:
        result["feedback"] = run_app(GenerateFeedback, config, assignment, student)
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


@dataclass
class _Job:
    """One student's assignment to grade."""

    student: str  # as in the submissions folder
    student_id: str  # a safe nbgrader id
    assignment: str
    notebooks: dict[str, Path]  # stem -> staged copy
    notes: list[str] = field(default_factory=list)


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
        base = name if STUDENT_ID.match(name) else re.sub(r"[^A-Za-z0-9._@+-]", "_", name)
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
    return str(constants.HF_HUB_CACHE)


def _job_folder(job: _Job, base: Path, work: Path) -> Path:
    """A course folder of the student's own: the released files, their notebooks, a scratch."""
    root = work / f"{job.student_id}__{job.assignment}"
    shutil.copytree(base, root)
    for sub in ("home", "tmp", "ipython", "mpl", "runtime", "cache"):
        (root / "scratch" / sub).mkdir(parents=True, exist_ok=True)
    submitted = root / "submitted" / job.student_id / job.assignment
    submitted.mkdir(parents=True)
    for stem, path in job.notebooks.items():
        shutil.copy2(path, submitted / f"{stem}.ipynb")
    return root


def _worker_env(
    scratch: Path, hidden: list[Path], work: Path, limits: Limits | None, sockets: Path
) -> dict[str, str]:
    """The worker's environment: every writable place in its scratch, the sandbox's settings.

    With `limits` the worker starts its kernel in the OS sandbox (isolation) with those limits.
    """
    isolated = {}
    if limits is not None:
        readable = readable_paths([cache_dir(), Path(_hub_cache())])
        isolated = {SANDBOX_SETTINGS: settings_for(scratch, sockets, readable, limits)}
    return {
        **os.environ,
        "HOME": str(scratch / "home"),
        "TMPDIR": str(scratch / "tmp"),
        "TEMP": str(scratch / "tmp"),
        "TMP": str(scratch / "tmp"),
        "IPYTHONDIR": str(scratch / "ipython"),
        "MPLCONFIGDIR": str(scratch / "mpl"),
        "JUPYTER_RUNTIME_DIR": str(scratch / "runtime"),
        "XDG_CACHE_HOME": str(scratch / "cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(scratch / "cache" / "torchinductor"),
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
        **isolated,
    }


def _run_worker(
    job: _Job, root: Path, env: dict, cell_timeout: float, student_timeout: float, max_output: int
) -> tuple[str, int | None]:
    """Run the `_worker` subprocess for one job; return (what went wrong or "", its exit code)."""
    command = [sys.executable, "-m", "course_tools.grading", "_worker", str(root)]
    command += [job.assignment, job.student_id, "--cell-timeout", str(cell_timeout)]
    command += ["--max-output-bytes", str(max_output)]
    failure = ""
    with open(root / "worker.log", "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=limit_resources if os.name == "posix" else None,
        )
        try:
            process.wait(timeout=student_timeout)
        except subprocess.TimeoutExpired:
            failure = (
                f"grading stopped after {student_timeout:g} s for the whole notebook "
                "(an endless loop that ignores interrupts?)"
            )
        finally:
            kill_group(process, root)
            process.wait()
    return failure, process.returncode


def _read_result(root: Path, failure: str, returncode: int | None) -> tuple[dict, str]:
    """The worker's result.json and what went wrong, if anything."""
    if failure:
        return {}, failure
    try:
        result = json.loads((root / "result.json").read_text())
    except (OSError, ValueError):
        tail = (root / "worker.log").read_bytes()[-2000:].decode(errors="replace").strip()
        lines = tail.splitlines()
        return {}, "the grader crashed: " + (lines[-1] if lines else f"exit code {returncode}")
    if not result["autograde"].get("success"):
        return result, "nbgrader could not grade it: " + _last_error(result["autograde"])
    return result, ""


def _keep_logs(job: _Job, root: Path, logs: Path) -> list[str]:
    """Keep the end of the worker's log and the feedback; return what the sandbox blocked."""
    log_path = root / "worker.log"
    with open(log_path, "rb") as log:  # the end of it: a flood may have gone there too
        log.seek(max(0, log_path.stat().st_size - 200_000))
        (logs / f"{job.student_id}__{job.assignment}.log").write_bytes(log.read())
    feedback = root / "feedback" / job.student_id / job.assignment
    if feedback.is_dir():
        target = logs.parent / "feedback" / job.student_id / job.assignment
        shutil.copytree(feedback, target, dirs_exist_ok=True)
    blocked_log = root / "scratch" / "blocked.log"
    if not blocked_log.is_file():
        return []
    lines = blocked_log.read_bytes()[:20_000].decode(errors="replace").splitlines()
    return list(dict.fromkeys(line.strip() for line in lines if line.strip()))


def _score_rows(
    job: _Job, mine: list[Exercise], result: dict, failure: str, blocked: list[str]
) -> list[GradeRow]:
    """One grades.csv row per exercise of the assignment, from the worker's result."""
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
    return rows


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
    limits: Limits | None,
) -> list[GradeRow]:
    """Grade one student's assignment in its own course folder and subprocess."""
    mine = [e for e in exercises if e.assignment == job.assignment]
    started = time.monotonic()
    root = _job_folder(job, base, work)
    sockets = Path(tempfile.mkdtemp(prefix="cg-"))  # short: a socket's path has 107 bytes at most
    env = _worker_env(root / "scratch", hidden, work, limits, sockets)
    env[SANDBOX_CHECKS] = job.assignment.split("_", 1)[-1]  # 02_lora_math: lora_math
    failure, code = _run_worker(job, root, env, cell_timeout, student_timeout, max_output)
    shutil.rmtree(sockets, ignore_errors=True)
    seconds = time.monotonic() - started
    result, failure = _read_result(root, failure, code)
    rows = _score_rows(job, mine, result, failure, _keep_logs(job, root, logs))
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
    isolate: bool | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> list[GradeRow]:
    """Grade every student folder in ``submissions``; write ``out``/grades.csv and feedback/.

    Returns the rows of grades.csv. Each student's assignment is graded in its own temporary
    course folder by its own subprocess (see the module docstring); a submission that raises,
    hangs, floods its output or touches files it should not gets zero for what failed and a
    reason, and the batch goes on. ``assignments`` limits grading to those assignments
    (default: every assignment at least one student handed a notebook in for).

    ``isolate``: run each kernel in the OS sandbox (bubblewrap, see ``isolation``) with
    ``limits``; None (the default) does so wherever bubblewrap works, and otherwise says once
    that the in-process guard alone does not isolate students from each other.
    """
    _check_numbers(cell_timeout, student_timeout, max_output_bytes, jobs)
    kernel_limits = _isolation(isolate, limits)
    submissions, solutions, exercises_dir, out = _checked_folders(
        submissions, solutions, exercises, out
    )
    protected = [solutions, exercises_dir, submissions]
    all_exercises = list_exercises(solutions)
    stems = {e.notebook: e.assignment for e in all_exercises}
    students, student_notes, notes = _collect(submissions, stems)
    wanted = _wanted_assignments(assignments, stems, students)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    guard = _Guard(protected)
    logs = _fresh_logs(out)
    hidden = [solutions, submissions] + [p for p in [solutions.parent / ".git"] if p.exists()]
    with tempfile.TemporaryDirectory(prefix="course-grading-") as tmp:
        work = Path(tmp)
        base = work / "base"
        base.mkdir()
        print(f"Preparing {', '.join(wanted) or 'nothing'} from {solutions} ...", flush=True)
        if wanted:
            generate_into(base, solutions, wanted)
        staged = _stage_jobs(students, student_notes, wanted, stems, work / "staged", base)

        def run(job: _Job) -> list[GradeRow]:
            """Grade one job, then put back any instructor's file it changed."""
            if not job.notebooks:
                return _ungraded_rows(job, all_exercises)
            timing = (cell_timeout, student_timeout, max_output_bytes)
            args = (job, base, work, all_exercises, hidden, *timing, logs, kernel_limits)
            return guard.check(_grade_job(*args))

        print(f"Grading {len(staged)} submission(s), {jobs} at a time:", flush=True)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            rows = [row for result in pool.map(run, staged) for row in result]
    _write_grades(out, rows)
    guard.check([])
    return rows


def _check_numbers(cell_timeout, student_timeout, max_output_bytes, jobs) -> None:
    """The time limits, the output cap and the number of jobs are positive numbers."""
    positive_number(cell_timeout, "cell_timeout", "cell_timeout=60")
    positive_number(student_timeout, "student_timeout", "student_timeout=60")
    positive_int(max_output_bytes, "max_output_bytes", "max_output_bytes=200_000")
    positive_int(jobs, "jobs", "jobs=2")


def _isolation(isolate: bool | None, limits: Limits) -> Limits | None:
    """The kernels' limits when they run in the OS sandbox, or None (and why, said once)."""
    if not isinstance(limits, Limits):
        raise TypeError("limits must be a course_tools.grading.isolation.Limits(...).")
    works = available()
    if isolate and not works:
        raise RuntimeError(
            "The OS sandbox needs Linux with bubblewrap, prlimit and setpriv (Debian: sudo apt-get "
            "install bubblewrap util-linux); install them or grade with isolate=None."
        )
    if isolate is False or not works:
        print(
            "note: grading WITHOUT the OS sandbox (bubblewrap "
            + ("not used" if works else "not available here")
            + "): the in-process guard stops Python-level attempts only, and does not isolate "
            "students from each other (instructors/README.md, Grading safely).",
            file=sys.stderr,
        )
        return None
    print(
        f"Each kernel runs in the OS sandbox (bubblewrap, no network, limits: "
        f"{limits.memory_bytes / 1024**3:g} GiB, {limits.processes} processes).",
        flush=True,
    )
    return limits


def _checked_folders(submissions, solutions, exercises, out) -> tuple[Path, Path, Path, Path]:
    """The four folders as resolved paths; `out` may not lie inside the others."""
    submissions = check_dir(submissions, "submissions")
    solutions = check_dir(solutions, "solutions")
    exercises = check_dir(exercises, "exercises", must_exist=False)
    out = check_dir(out, "out", must_exist=False)
    for folder in (solutions, exercises, submissions):
        if out == folder or folder in out.parents:
            raise ValueError(f"out must not lie inside {folder}; e.g. --out outputs/grading.")
    return submissions, solutions, exercises, out


def _wanted_assignments(assignments, stems: dict[str, str], students: dict) -> list[str]:
    """The assignments to grade: those asked for, or every one somebody handed a notebook in for."""
    if assignments is None:
        return sorted({stems[s] for found in students.values() for s in found})
    unknown = sorted(set(assignments) - set(stems.values()))
    if unknown:
        raise ValueError(
            f"unknown assignments {unknown}; choose from {sorted(set(stems.values()))}."
        )
    return sorted(set(assignments))


def _fresh_logs(out: Path) -> Path:
    """Make `out`, empty its logs/ and feedback/, and return logs/."""
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    for old in (logs, out / "feedback"):
        shutil.rmtree(old, ignore_errors=True)
    logs.mkdir()
    return logs


def _stage_jobs(students, student_notes, wanted, stems, staged: Path, base: Path) -> list[_Job]:
    """Copy each student's notebooks per assignment, repaired from the released version."""
    ids = _safe_ids(students)
    jobs = []
    for student, found in students.items():
        for assignment in wanted:
            mine = {}
            notes = list(student_notes[student])
            for stem, path in found.items():
                if stems[stem] != assignment:
                    continue
                target = staged / ids[student] / f"{stem}.ipynb"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
                problem = _unreadable(target)
                if problem:
                    notes.append(f"{path.name} is not a valid notebook ({problem})")
                    continue
                notes += _repair_file(target, base / "exercises" / assignment / target.name)
                mine[stem] = target
            if student != ids[student]:
                notes.append(f"graded as {ids[student]!r}")
            jobs.append(_Job(student, ids[student], assignment, mine, notes))
    return jobs


def _ungraded_rows(job: _Job, exercises: list[Exercise]) -> list[GradeRow]:
    """Rows for an assignment with no readable notebook: missing, or an error if unreadable."""
    invalid = any("not a valid notebook" in note for note in job.notes)
    status = "error" if invalid else "missing"
    reason = "" if invalid else "no notebook handed in"
    mine = [e for e in exercises if e.assignment == job.assignment]
    return [_row(job, e, 0, status, reason) for e in mine]


class _Guard:
    """The instructor's folders as they were before the batch, restored whenever they change."""

    def __init__(self, folders: list[Path]) -> None:
        self.folders = folders
        self.snapshot = take_snapshot(folders)
        self.digest = snapshot_digest(self.snapshot)
        self.lock = threading.Lock()

    def check(self, rows: list[GradeRow]) -> list[GradeRow]:
        """Restore any change and add a warning to the rows of the job that made it."""
        with self.lock:
            if snapshot_digest(take_snapshot(self.folders)) == self.digest:
                return rows
            changed = restore(self.snapshot, self.folders)
        warning = (
            "WARNING: the instructor's files changed while this notebook was graded "
            f"and were restored ({'; '.join(changed[:3])})"
        )
        for row in rows:
            row.reason = "; ".join(p for p in [row.reason, warning] if p)
        return rows


def _write_grades(out: Path, rows: list[GradeRow]) -> None:
    """Write grades.csv, sorted by student, assignment and notebook."""
    rows.sort(key=lambda r: (r.student, r.assignment, r.notebook))
    with open(out / "grades.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row.as_dict())
    print(f"Wrote {out / 'grades.csv'} ({len(rows)} rows) and feedback in {out / 'feedback'}.")


def _repair_file(path: Path, released: Path) -> list[str]:
    """Repair a staged submission in place against its released version; return notes."""
    notebook = nbformat.read(path, as_version=4)
    notes = repair_submission(notebook, nbformat.read(released, as_version=4))
    if notes:
        nbformat.write(notebook, path)
    return notes


def _unreadable(path: Path) -> str:
    """Why a file is not a notebook nbformat can read ('' if it is fine)."""
    try:
        nbformat.read(path, as_version=4)
    except Exception as error:  # noqa: BLE001 - any parse failure is the finding
        return f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
    return ""
