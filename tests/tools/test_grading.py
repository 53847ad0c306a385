"""Grading a folder of submissions: every assignment's model answers, a notebook that will not
stop, the in-kernel guard on its own, and the small parts (file names, repair, arguments).

The batch of honest, misbehaving and hostile students is graded once, in
tests/tools/test_grading_sandbox.py.
"""

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from course_tools import grading

ROOT = Path(__file__).resolve().parents[2]
LORA = "02_lora_math/02_lora_math_exercises.ipynb"
WHY = "01_why_finetune/01_why_finetune_exercises.ipynb"
DATA = "04_data_preparation/04_data_preparation_exercises.ipynb"
#: The labs whose fourth exercise trains or loads a tiny model through TRL or transformers.
LIBRARY_LABS = (
    "05_lora_lab/05_lora_lab_exercises.ipynb",
    "06_qlora_lab/06_qlora_lab_exercises.ipynb",
    "13_preference_tuning/13_preference_tuning_exercises.ipynb",
)


def _answers(master: Path) -> dict[str, str]:
    """{grade_id: solution source} of a master notebook."""
    cells = nbformat.read(master, as_version=4).cells
    return {
        c.metadata["nbgrader"]["grade_id"]: c.source
        for c in cells
        if c.metadata.get("nbgrader", {}).get("solution")
    }


def _submission(exercise: Path, master: Path, answers: dict[str, str]) -> nbformat.NotebookNode:
    """The student version with some answers filled in; SOLVED stands for the model answer."""
    notebook = nbformat.read(exercise, as_version=4)
    model = _answers(master)
    for cell in notebook.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if cell.metadata.get("nbgrader", {}).get("solution") and grade_id in answers:
            cell.source = answers[grade_id].replace("SOLVED", model[grade_id])
    return notebook


def test_a_notebook_that_ignores_interrupts_is_killed_with_its_kernel(tmp_path):
    """The per-notebook limit: nothing of the stubborn notebook survives, the batch goes on."""
    import psutil

    stubborn = (
        "def lora_forward(x, W, A, B, alpha, r):\n    import signal\n\n"
        "    signal.signal(signal.SIGINT, signal.SIG_IGN)\n    while True:\n        pass\n"
    )
    ids = list(_answers(ROOT / "solutions" / LORA))
    target = tmp_path / "submissions" / "mule" / "02_lora_math_exercises.ipynb"
    target.parent.mkdir(parents=True)
    notebook = _submission(ROOT / "exercises" / LORA, ROOT / "solutions" / LORA, {ids[0]: stubborn})
    nbformat.write(notebook, target)
    rows = grading.grade_submissions(
        tmp_path / "submissions", tmp_path / "out", cell_timeout=5, student_timeout=20
    )
    assert {r.status for r in rows} == {"error"} and sum(r.score for r in rows) == 0
    assert all("grading stopped after 20 s" in r.reason for r in rows)
    time.sleep(1)
    leftovers = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if "mule__02_lora_math" in " ".join(p.info["cmdline"] or [])
    ]
    assert leftovers == [], "the stubborn kernel must be killed"


def _grade_solved(tmp_path, student: str, relatives) -> dict[str, int]:
    """Grade `student`'s fully solved copies of `relatives`; every cell passes; points per assignment."""
    submissions = tmp_path / "submissions"
    for relative in relatives:
        model = dict.fromkeys(_answers(ROOT / "solutions" / relative), "SOLVED")
        target = submissions / student / Path(relative).name
        target.parent.mkdir(parents=True, exist_ok=True)
        notebook = _submission(ROOT / "exercises" / relative, ROOT / "solutions" / relative, model)
        nbformat.write(notebook, target)
    totals: dict[str, int] = {}
    for row in grading.grade_submissions(submissions, tmp_path / "out", jobs=2):
        totals[row.assignment] = totals.get(row.assignment, 0) + row.score
        assert row.status == "passed", row
    return totals


def test_solved_lesson_01_and_04_exercises_score_full_marks(tmp_path):
    """The two newer assignments grade like the others; 04 loads the course tokenizer offline."""
    totals = _grade_solved(tmp_path, "dana", (WHY, DATA))
    assert totals == {"01_why_finetune": 10, "04_data_preparation": 10}


def test_solved_trainer_exercises_score_full_marks_in_the_sandbox(tmp_path):
    """TRL's SFTTrainer and DPOTrainer and a 4-bit load train and run inside the grader's
    sandbox (no processes, no writes outside the kernel's folder) without a word on stderr."""
    totals = _grade_solved(tmp_path, "erin", LIBRARY_LABS)
    assert totals == {"05_lora_lab": 13, "06_qlora_lab": 13, "13_preference_tuning": 13}


# ------------------------------------------------------------------------------------------
# Small, fast checks


def test_a_submitted_file_is_recognised_by_its_name():
    stems = ["02_lora_math_exercises", "03_quantization_exercises"]
    assert grading.batch._notebook_key("02_lora_math_exercises.ipynb", stems) == stems[0]
    assert (
        grading.batch._notebook_key("Copy of 03_quantization_exercises (2).ipynb", stems)
        == stems[1]
    )
    assert grading.batch._notebook_key("homework.ipynb", stems) is None


def test_repair_gives_back_lost_metadata_and_deleted_test_cells():
    released = nbformat.read(ROOT / "exercises" / LORA, as_version=4)
    damaged = copy.deepcopy(released)
    for index, cell in enumerate(damaged.cells):  # an editor that keeps neither metadata nor ids
        cell.metadata = {}
        cell.id = f"other-{index}"
    tests = [c for c in released.cells if c.metadata["nbgrader"].get("grade")]
    damaged.cells = [c for c in damaged.cells if c.source != tests[1].source]  # one test deleted
    notes = grading.repair_submission(damaged, released)
    assert [grading.batch._grade_id(c) for c in damaged.cells] == [
        grading.batch._grade_id(c) for c in released.cells
    ]
    assert len(notes) == 2 and "put back 1" in notes[1]
    assert grading.repair_submission(damaged, released) == []  # nothing left to repair


def test_grading_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        grading.grade_submissions(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="must not lie inside"):
        grading.grade_submissions(tmp_path, ROOT / "solutions" / "out")
    with pytest.raises(ValueError, match="positive"):
        grading.grade_submissions(tmp_path, tmp_path / "out", cell_timeout=0)
    with pytest.raises(TypeError, match="list of folders"):
        grading.install_sandbox(writable="/tmp")


def test_restore_puts_a_changed_folder_back(tmp_path):
    folder = tmp_path / "solutions"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "x.ipynb").write_text("original")
    state = grading.sandbox.take_snapshot([folder])
    (folder / "a" / "x.ipynb").write_text("changed")
    (folder / "new.txt").write_text("added")
    changed = grading.sandbox.restore(state, [folder])
    assert len(changed) == 2
    assert grading.sandbox.snapshot_digest(
        grading.sandbox.take_snapshot([folder])
    ) == grading.sandbox.snapshot_digest(state)


SANDBOX_PROBE = """
import json, os, shutil, subprocess, sys
from course_tools.grading.sandbox import install_sandbox

work, outside = sys.argv[1:3]
inside, other = os.path.join(work, "mine"), os.path.join(work, "other")
install_sandbox([inside], [work])
results = {}
def attempt(name, action):
    try:
        action()
        results[name] = "allowed"
    except PermissionError:
        results[name] = "blocked"
attempt("write inside", lambda: open(os.path.join(inside, "a.txt"), "w").write("x"))
attempt("read inside", lambda: open(os.path.join(inside, "a.txt")).read())
attempt("delete inside", lambda: os.remove(os.path.join(inside, "a.txt")))
attempt("write outside", lambda: open(os.path.join(outside, "f.txt"), "w").write("x"))
attempt("delete outside", lambda: os.remove(os.path.join(outside, "f.txt")))
attempt("rmtree outside", lambda: shutil.rmtree(outside))
attempt("rmtree the writable folder itself", lambda: shutil.rmtree(inside))
attempt("read a hidden file", lambda: open(os.path.join(other, "answer.txt")).read())
attempt("list a hidden folder", lambda: os.listdir(other))
attempt("start a process", lambda: subprocess.run(["true"]))
attempt("signal the parent", lambda: os.kill(os.getppid(), 0))
attempt("os._exit", lambda: os._exit(3))
print(json.dumps(results))
"""


def test_the_sandbox_blocks_what_a_graded_notebook_must_not_do(tmp_path):
    work, outside = tmp_path / "work", tmp_path / "outside"
    for folder in (work / "mine", work / "other", outside):
        folder.mkdir(parents=True)
    (outside / "f.txt").write_text("keep")
    (work / "other" / "answer.txt").write_text("42")
    result = subprocess.run(
        [sys.executable, "-c", SANDBOX_PROBE, str(work), str(outside)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=work / "mine",
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for allowed in ("write inside", "read inside", "delete inside"):
        assert results.pop(allowed) == "allowed", allowed
    assert set(results.values()) == {"blocked"}, results
    assert (outside / "f.txt").read_text() == "keep"


def test_the_command_line_explains_itself():
    result = subprocess.run(
        [sys.executable, "-m", "course_tools.grading", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert "grades.csv" in result.stdout and "generate" in result.stdout
