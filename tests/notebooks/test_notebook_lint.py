"""Every notebook passes the course lint, and the lint catches what it claims to catch."""

import copy
from pathlib import Path

import nbformat
import pytest
from notebook_lint import ROOT, badge_url, is_training_lab, lint_notebook, wrapper_calls

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
    (tmp_path / "notebooks" / "images").mkdir(parents=True)
    badge = ROOT / "notebooks" / "images" / "colab-badge.svg"
    (tmp_path / "notebooks" / "images" / badge.name).write_text(badge.read_text())
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


def test_lint_catches_a_badge_image_fetched_from_the_web_or_missing(good):
    web = "https://colab.research.google.com/assets/colab-badge.svg"
    _rewrite(
        good,
        lambda nb: setattr(
            nb.cells[0], "source", nb.cells[0].source.replace("images/colab-badge.svg", web)
        ),
    )
    [problem] = lint_notebook(good, root=good.parent.parent)
    assert "use the local copy" in problem
    (good.parent / "images" / "colab-badge.svg").unlink()
    _rewrite(
        good,
        lambda nb: setattr(
            nb.cells[0], "source", nb.cells[0].source.replace(web, "images/colab-badge.svg")
        ),
    )
    assert "use the local copy" in lint_notebook(good, root=good.parent.parent)[0]


def test_lint_catches_an_install_cell_that_may_build_from_source(good):
    _rewrite(
        good,
        lambda nb: setattr(
            nb.cells[1], "source", nb.cells[1].source.replace("--only-binary=:all:", "")
        ),
    )
    [problem] = lint_notebook(good, root=good.parent.parent)
    assert "wheels only" in problem


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
    assert any("claims.report()" in p for p in lint_notebook(good, root=good.parent.parent))
    broken = tmp_path / "notebooks" / "01_broken.ipynb"
    broken.write_text("{ not json")
    assert lint_notebook(broken, root=tmp_path)[0].startswith("not a valid notebook")


def test_every_training_lab_writes_the_libraries_calls_and_no_wrapper():
    labs = [p for p in NOTEBOOKS if is_training_lab(p)]
    assert [p.name[:2] for p in labs] == [f"{n:02d}" for n in range(5, 16)]
    for lab in labs:
        assert wrapper_calls(lab) == [], lab.name
    source = "\n".join("".join(c.source) for lab in labs for c in nbformat.read(lab, 4).cells)
    for call in (
        "LoraConfig(",
        "get_peft_model(",
        "SFTConfig(",
        "SFTTrainer(",
        "from_pretrained(",
        "BitsAndBytesConfig(",
        "prepare_model_for_kbit_training(",
        "DPOConfig(",
        "DPOTrainer(",
        "FastLanguageModel.from_pretrained(",
        "FastLanguageModel.get_peft_model(",
    ):
        assert call in source, f"no training lab shows {call}"


def test_the_lint_catches_a_training_lab_that_calls_a_wrapper(tmp_path):
    (tmp_path / "notebooks").mkdir()
    target = tmp_path / "notebooks" / "05_lora_lab.ipynb"
    target.write_text((ROOT / "notebooks" / "05_lora_lab.ipynb").read_text())

    def change(nb):
        wrapped = nbformat.v4.new_code_cell(
            "from course_tools.train import prepare_model\n"
            "model = train.prepare_model(assets.load_model(), 'lora')\n"
            "result = train.train(model, tokenizer, examples, method='lora', steps=4)"
        )
        nb.cells.insert(len(nb.cells) - 1, wrapped)

    _rewrite(target, change)
    problems = lint_notebook(target, root=tmp_path)
    wrappers = [p for p in problems if "not a course wrapper" in p]
    assert len(wrappers) == 4, problems
    assert any("train.train(...)" in p for p in wrappers)
    assert any("assets.load_model(...)" in p for p in wrappers)
    assert any("import prepare_model" in p for p in wrappers)
    # the same calls in a lesson that does not train (00-04) are not the lint's business
    other = tmp_path / "notebooks" / "00_start_here.ipynb"
    target.rename(other)
    assert wrapper_calls(other) and not any(
        "course wrapper" in p for p in lint_notebook(other, root=tmp_path)
    )
