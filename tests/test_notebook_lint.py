"""Every notebook passes the course lint, and the lint catches what it claims to catch."""

import copy
from pathlib import Path

import nbformat
import pytest
from notebook_lint import ROOT, badge_url, lint_notebook

from course_utils.course_map import LESSONS

NOTEBOOKS = sorted(
    p
    for folder in ("notebooks", "solutions", "exercises")
    for p in (ROOT / folder).rglob("*.ipynb")
    if ".ipynb_checkpoints" not in p.parts
)


def test_there_are_notebooks():
    assert (ROOT / "notebooks" / "00_start_here.ipynb") in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_notebook_is_clean(path):
    assert lint_notebook(path) == []


def test_every_lesson_notebook_is_on_the_course_map():
    names = {lesson.notebook for lesson in LESSONS}
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        assert path.name in names, f"{path.name} is not in course_utils.course_map.LESSONS"


@pytest.fixture
def good(tmp_path):
    """Copy notebook 00 to a scratch repo root so it can be broken on purpose."""
    (tmp_path / "notebooks").mkdir()
    target = tmp_path / "notebooks" / "00_start_here.ipynb"
    target.write_text((ROOT / "notebooks" / "00_start_here.ipynb").read_text())
    return target


def _rewrite(path: Path, change) -> None:
    notebook = nbformat.read(path, as_version=4)
    change(notebook)
    nbformat.write(notebook, path)


def test_lint_accepts_the_good_copy(good):
    assert lint_notebook(good, root=good.parent.parent) == []


def test_lint_catches_a_badge_pointing_elsewhere(good):
    def change(nb):
        nb.cells[0].source = nb.cells[0].source.replace("00_start_here", "01_why_finetune")

    _rewrite(good, change)
    [problem] = lint_notebook(good, root=good.parent.parent)
    assert "expected " + badge_url("notebooks/00_start_here.ipynb") in problem


def test_lint_catches_a_missing_install_cell_absolute_paths_and_big_outputs(good):
    def change(nb):
        nb.cells[1].source = "import sys"
        nb.cells[2].source += "\nSee /work/main/notebooks for more."
        nb.cells[3].outputs = [nbformat.v4.new_output("stream", text="x" * 200_000)]

    _rewrite(good, change)
    problems = lint_notebook(good, root=good.parent.parent)
    assert any("Colab install cell" in p for p in problems)
    assert any("absolute path '/work/main'" in p for p in problems)
    assert any("bytes of output" in p for p in problems)


def test_lint_catches_a_missing_check_cell_and_bad_json(good, tmp_path):
    def change(nb):
        nb.cells = copy.deepcopy(nb.cells[:-1])

    _rewrite(good, change)
    assert any("assert" in p for p in lint_notebook(good, root=good.parent.parent))
    broken = tmp_path / "notebooks" / "01_broken.ipynb"
    broken.write_text("{ not json")
    assert lint_notebook(broken, root=tmp_path)[0].startswith("not a valid notebook")
