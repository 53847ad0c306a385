"""Grading a folder of submissions: right scores, clear reasons, and a batch nothing can break.

The main test grades a hostile batch in one run: a solved notebook, an untouched one, a partial
one, and students whose answers raise, hang, flood their output, end the kernel, or try to delete
the instructor's files. The instructor's folders are copies in a temporary folder (so that a bug
in the sandbox could never hurt the repository), and they must come out byte-identical.
"""

import copy
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from course_tools import grading

ROOT = Path(__file__).resolve().parents[2]
LORA = "02_lora_math/02_lora_math_exercises.ipynb"
QUANT = "03_quantization/03_quantization_exercises.ipynb"
WHY = "01_why_finetune/01_why_finetune_exercises.ipynb"
DATA = "04_data_preparation/04_data_preparation_exercises.ipynb"
#: The labs whose fourth exercise trains or loads a tiny model through TRL or transformers.
LIBRARY_LABS = (
    "05_lora_lab/05_lora_lab_exercises.ipynb",
    "06_qlora_lab/06_qlora_lab_exercises.ipynb",
    "10_preference_tuning/10_preference_tuning_exercises.ipynb",
)
CELL_TIMEOUT = 10


def _tree_digest(*folders: Path) -> dict[str, str]:
    """sha256 of every file under the folders (to prove they were not touched)."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for folder in folders
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


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


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Grade the hostile batch once; return (rows by student, out folder, digests, seconds)."""
    tmp = tmp_path_factory.mktemp("grading")
    solutions, exercises = tmp / "course" / "solutions", tmp / "course" / "exercises"
    shutil.copytree(ROOT / "solutions", solutions)
    shutil.copytree(ROOT / "exercises", exercises)
    submissions = tmp / "submissions"
    alice = submissions / "alice" / "02_lora_math_exercises.ipynb"
    ids = list(_answers(solutions / LORA))
    solved = dict.fromkeys(ids, "SOLVED")
    delete = f"""
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

attempts = [
    lambda: shutil.rmtree({str(exercises)!r}),
    lambda: os.remove({str(alice)!r}),
    lambda: open({str(alice)!r}, "w").write("overwritten"),
    lambda: shutil.rmtree(Path.cwd().parent.parent),
    lambda: sqlite3.connect(str(Path.cwd().parents[2] / "gradebook.db")).execute("delete from grade"),
    lambda: subprocess.run(["rm", "-rf", {str(solutions)!r}]),
    lambda: os.kill(os.getppid(), 9),
    lambda: open({str(solutions / LORA)!r}).read(),
    lambda: open({str(alice)!r}).read(),
]
for attempt in attempts:
    try:
        attempt()
    except PermissionError as error:
        print(error)
shutil.rmtree({str(solutions)!r})
SOLVED"""
    students = {
        "alice": solved,
        "bob": {},
        "carol": {ids[0]: "SOLVED"},
        "raiser": {**solved, ids[1]: 'raise RuntimeError("boom")\nSOLVED'},
        "hanger": {**solved, ids[0]: "while True:\n    pass\nSOLVED"},
        "flooder": {**solved, ids[0]: 'for _ in range(20):\n    print("x" * 1_000_000)\nSOLVED'},
        "crasher": {**solved, ids[1]: "import os\n\nos._exit(1)\nSOLVED"},
        "deleter": {**solved, ids[0]: delete},
    }
    for name, answers in students.items():
        target = submissions / name / "02_lora_math_exercises.ipynb"
        target.parent.mkdir(parents=True)
        nbformat.write(_submission(exercises / LORA, solutions / LORA, answers), target)
    # carol also hands in lesson 03, solved, under the name a browser download gives it
    renamed = submissions / "carol" / "Copy of 03_quantization_exercises (1).ipynb"
    all_03 = dict.fromkeys(_answers(solutions / QUANT), "SOLVED")
    nbformat.write(_submission(exercises / QUANT, solutions / QUANT, all_03), renamed)

    watched = (solutions, exercises, submissions, ROOT / "solutions", ROOT / "exercises")
    before = _tree_digest(*watched)
    started = time.monotonic()
    out = tmp / "out"
    rows = grading.grade_submissions(
        submissions,
        out,
        solutions=solutions,
        exercises=exercises,
        cell_timeout=CELL_TIMEOUT,
        student_timeout=240,
        jobs=2,
    )
    seconds = time.monotonic() - started
    by_student: dict[str, dict[str, grading.GradeRow]] = {}
    for row in rows:
        by_student.setdefault(row.student, {})[f"{row.assignment}/{row.exercise}"] = row
    return by_student, out, before, _tree_digest(*watched), seconds


def _total(rows: dict, assignment: str = "02_lora_math") -> float:
    return sum(r.score for key, r in rows.items() if key.startswith(assignment + "/"))


def test_the_batch_fits_in_one_csv_with_a_row_per_student_and_exercise(batch):
    by_student, out, *_ = batch
    with open(out / "grades.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert tuple(table[0]) == grading.CSV_FIELDS
    names = {"alice", "bob", "carol", "raiser", "hanger", "flooder", "crasher", "deleter"}
    assert {row["student"] for row in table} == names == set(by_student)
    assert len(table) == len(names) * 6  # 3 exercises in each of the 2 graded assignments
    for row in table:
        assert 0 <= float(row["score"]) <= float(row["max_score"])
        assert row["status"] in ("passed", "failed", "missing", "error")
        assert row["status"] == "passed" or row["reason"], row


def test_a_solved_notebook_scores_full_marks(batch):
    alice = batch[0]["alice"]
    assert _total(alice) == 10
    assert all(r.status == "passed" for k, r in alice.items() if k.startswith("02_"))
    # lesson 03 was not handed in: zero, and the CSV says why
    assert {r.status for k, r in alice.items() if k.startswith("03_")} == {"missing"}


def test_an_untouched_exercise_scores_zero_and_says_it_is_not_answered(batch):
    bob = batch[0]["bob"]
    assert _total(bob) == 0
    for key, row in bob.items():
        if key.startswith("02_"):
            assert row.status == "failed" and "not answered" in row.reason


def test_a_partial_notebook_scores_in_between_and_a_renamed_download_is_recognised(batch):
    carol = batch[0]["carol"]
    assert 0 < _total(carol) < 10
    assert _total(carol, "03_quantization") == 10


def test_an_answer_that_raises_costs_only_its_exercise(batch):
    raiser = batch[0]["raiser"]
    assert _total(raiser) == 10 - 3
    assert "RuntimeError: boom" in raiser["02_lora_math/ex2_lora_param_counts_tests"].reason


def test_an_endless_loop_is_stopped_after_the_cell_timeout(batch):
    hanger = batch[0]["hanger"]
    row = hanger["02_lora_math/ex1_lora_forward_tests"]
    assert row.score == 0 and f"longer than {CELL_TIMEOUT} s" in row.reason
    assert _total(hanger) == 10 - 2


def test_a_flood_of_output_is_cut_and_does_not_cost_points(batch):
    by_student, out, *_ = batch
    assert _total(by_student["flooder"]) == 10
    [page] = (out / "feedback" / "flooder").rglob("*.html")
    assert page.stat().st_size < 2_000_000
    assert "the grader cut this cell" in page.read_text()


def test_ending_the_kernel_costs_only_its_exercise(batch):
    crasher = batch[0]["crasher"]
    assert _total(crasher) == 10 - 3
    assert "os._exit" in crasher["02_lora_math/ex2_lora_param_counts_tests"].reason


def test_deleting_the_instructors_files_is_blocked_and_reported(batch):
    deleter = batch[0]["deleter"]
    row = deleter["02_lora_math/ex1_lora_forward_tests"]
    assert row.score == 0 and "the grader blocked" in row.reason
    assert _total(deleter) == 10 - 2


def test_the_instructors_files_are_byte_identical_afterwards(batch):
    *_, before, after, _seconds = batch
    assert before == after


def test_every_graded_student_gets_a_feedback_page(batch):
    by_student, out, *_ = batch
    for student in by_student:
        pages = list((out / "feedback" / student / "02_lora_math").glob("*.html"))
        assert len(pages) == 1, student


def test_the_batch_takes_reasonable_time(batch):
    print(f"hostile batch graded in {batch[-1]:.0f} s")
    assert batch[-1] < 600


def test_a_notebook_that_ignores_interrupts_is_killed_with_its_kernel(tmp_path):
    """The per-notebook limit: nothing of the stubborn notebook survives, the batch goes on."""
    import psutil

    stubborn = (
        "import signal\n\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass"
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
    assert totals == {"05_lora_lab": 13, "06_qlora_lab": 13, "10_preference_tuning": 13}


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
