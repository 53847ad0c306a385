"""The learner's answers in my-work/ survive `make exercises`, the suite's checks and a course update."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from course_tools import my_work
from course_tools.grading import check_exercises

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = "02_lora_math/02_lora_math_exercises.ipynb"
ANSWER = "def lora_forward(x, W, A, B, alpha, r):\n    return 'my own answer'\n"


def _answer(path: Path) -> None:
    """Write an answer into exercise 1 of the lesson-02 notebook at `path`."""
    notebook = nbformat.read(path, as_version=4)
    cell = next(
        c for c in notebook.cells if c.metadata["nbgrader"]["grade_id"] == "ex1_lora_forward"
    )
    cell.source = ANSWER
    nbformat.write(notebook, path)


def _answered(path: Path) -> bool:
    notebook = nbformat.read(path, as_version=4)
    return any(c.source == ANSWER for c in notebook.cells)


def _git(folder: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=course", "-c", "user.email=course@example.org", *args]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, check=True).stdout


def test_update_copies_new_notebooks_and_never_replaces_one(tmp_path):
    exercises, work = tmp_path / "exercises", tmp_path / "my-work"
    (exercises / "01_a").mkdir(parents=True)
    (exercises / "01_a" / "01_a.ipynb").write_text("version 1")
    assert my_work.update(exercises, work) == ["new exercise: my-work/01_a/01_a.ipynb"]
    (work / "01_a" / "01_a.ipynb").write_text("my answers")
    assert my_work.update(exercises, work) == []
    (exercises / "01_a" / "01_a.ipynb").write_text("version 2")
    (exercises / "02_b").mkdir()
    (exercises / "02_b" / "02_b.ipynb").write_text("new")
    said = my_work.update(exercises, work)
    assert said[0].startswith("the course updated exercises/01_a/01_a.ipynb; your my-work/01_a")
    assert said[1] == "new exercise: my-work/02_b/02_b.ipynb"
    assert (work / "01_a" / "01_a.ipynb").read_text() == "my answers"
    assert json.loads((work / ".copied.json").read_text()).keys() == {
        "01_a/01_a.ipynb",
        "02_b/02_b.ipynb",
    }


def test_update_says_what_to_do_with_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="No exercise folder"):
        my_work.update(tmp_path / "nowhere", tmp_path / "my-work")
    (tmp_path / "exercises").mkdir()
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="move it away"):
        my_work.update(tmp_path / "exercises", tmp_path / "file")


def test_an_answer_survives_make_exercises_the_checks_and_git_pull(tmp_path):
    origin, learner = tmp_path / "origin", tmp_path / "learner"
    _git(tmp_path, "clone", "-q", str(ROOT), str(origin))
    _git(tmp_path, "clone", "-q", str(origin), str(learner))
    env = os.environ | {"PYTHONPATH": str(learner)}  # the clone's course_tools, writing the clone
    run = {"cwd": learner, "env": env, "check": True, "capture_output": True, "text": True}
    subprocess.run([sys.executable, "-m", "course_tools.my_work"], **run)
    mine = learner / "my-work" / NOTEBOOK
    _answer(mine)

    # `-o setup`: the clone borrows this checkout's environment and must not re-install into it
    make = ["make", "--no-print-directory", "-o", "setup", "exercises", f"VENV={ROOT / '.venv'}"]
    subprocess.run(make, **run)
    assert check_exercises(learner / "solutions", learner / "exercises") == []
    assert _answered(mine)
    assert _git(learner, "status", "--porcelain") == ""  # my-work/ is ignored by git

    upstream = origin / "exercises" / NOTEBOOK  # the course changes the notebook and adds one
    upstream.write_text(upstream.read_text().replace("graded exercises", "graded exercises (v2)"))
    (origin / "exercises" / "99_new").mkdir()
    (origin / "exercises" / "99_new" / "99_new_exercises.ipynb").write_text(upstream.read_text())
    _git(origin, "add", "-A")
    _git(origin, "commit", "-q", "-m", "a course update")
    _git(learner, "pull", "-q")
    said = subprocess.run([sys.executable, "-m", "course_tools.my_work"], **run).stdout
    assert f"the course updated exercises/{NOTEBOOK}" in said
    assert "new exercise: my-work/99_new/99_new_exercises.ipynb" in said
    assert _answered(mine)
