"""The graded exercises: masters pass nbgrader's checks, student versions are stubs and in sync.

`solutions/<assignment>/<notebook>.ipynb` are nbgrader master notebooks; `exercises/` is generated
from them by `python -m course_tools.grading generate` and must never be edited by hand.
"""

import ast
import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from course_tools import grading

ROOT = Path(__file__).resolve().parents[2]
MASTERS = sorted((ROOT / "solutions").glob("*/*.ipynb"))
STUDENT_VERSIONS = sorted((ROOT / "exercises").glob("*/*.ipynb"))
#: The heading of an exercise: its difficulty as a mark and a word (a font without emoji still
#: says it), then its points.
DIFFICULTY = re.compile(
    r"^## Exercise \d+ (🐢 easy|🐕 medium|🦁 hard) — .+ \((\d+) points?\)$", re.MULTILINE
)
INSTALL_CELL = nbformat.read(ROOT / "notebooks" / "00_start_here.ipynb", as_version=4).cells[1]


def _ids(paths):
    return [p.relative_to(ROOT).as_posix() for p in paths]


def _nbgrader(cell) -> dict:
    return cell.metadata.get("nbgrader", {})


ASSIGNMENTS = (
    "01_why_finetune",
    "02_lora_math",
    "03_quantization",
    "04_data_preparation",
    "05_lora_lab",
    "06_qlora_lab",
    "07_full_finetuning_lab",
    "10_unsloth_lab",
    "12_lora_zoo",
    "13_preference_tuning",
    "14_merge_and_deploy",
)


def test_the_assignments_exist_with_their_student_versions():
    assignments = {p.parent.name for p in MASTERS}
    assert set(ASSIGNMENTS) <= assignments
    assert [p.relative_to(ROOT / "exercises") for p in STUDENT_VERSIONS] == [
        p.relative_to(ROOT / "solutions") for p in MASTERS
    ]


@pytest.mark.parametrize("path", MASTERS, ids=_ids(MASTERS))
def test_master_notebook_is_well_formed(path):
    notebook = nbformat.read(path, as_version=4)
    cells = notebook.cells
    assert [c.id for c in cells] == [f"cell-{i:02d}" for i in range(len(cells))]
    assert all(c.get("outputs", []) == [] for c in cells if c.cell_type == "code")
    assert cells[1].source == INSTALL_CELL.source, "copy the Colab install cell of notebook 00"
    grade_ids = [_nbgrader(c)["grade_id"] for c in cells if _nbgrader(c)]
    assert len(grade_ids) == len(set(grade_ids)), "every nbgrader cell needs its own grade_id"

    headings = [m for c in cells if c.cell_type == "markdown" for m in DIFFICULTY.findall(c.source)]
    tests = [c for c in cells if _nbgrader(c).get("grade")]
    solutions = [c for c in cells if _nbgrader(c).get("solution")]
    assert len(headings) == len(tests) == len(solutions) >= 3, "one heading, answer and test each"
    assert {level for level, _ in headings} == {"🐢 easy", "🐕 medium", "🦁 hard"}
    for (_, points), test in zip(headings, tests, strict=True):
        meta = _nbgrader(test)
        assert meta["locked"] and meta["points"] == int(points), (test.id, meta)
        assert "### BEGIN HIDDEN TESTS" in test.source and "### END HIDDEN TESTS" in test.source
        visible = test.source.split("### BEGIN HIDDEN TESTS")[0].strip().splitlines()
        # One call into the lesson's check module, under the learner's eyes; the code is there.
        assert len(visible) <= 3 and any(line.startswith("check.") for line in visible), visible
    for cell in solutions:
        assert "### BEGIN SOLUTION" in cell.source and "### END SOLUTION" in cell.source
    setup = next(c for c in cells if _nbgrader(c).get("grade_id") == "setup")
    module = check_module(path)
    assert f"from course_utils.exercise_checks import {module} as check" in setup.source
    assert "check." in [c for c in cells if c.cell_type == "code"][-1].source


def check_module(master: Path) -> str:
    """The check module of an assignment: 02_lora_math -> lora_math."""
    return master.parent.name.split("_", 1)[1]


def _strings(path: Path) -> list[str]:
    """Every string literal of a module, an f-string's {fields} replaced by a NUL."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.JoinedStr):
            found.append(
                "".join(v.value if isinstance(v, ast.Constant) else "\0" for v in node.values)
            )
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append(node.value)
    return found


def _squeeze(text: str) -> str:
    """Drop spaces, parentheses and backquotes: `(x @ A.T) @ B.T` and `x@A.T@B.T` compare equal."""
    return re.sub(r"[\s()`]", "", text)


def solution_expressions(master: Path) -> list[str]:
    """Each line of the masters' solution regions, as the expression right of `return` or `=`."""
    found = []
    for cell in nbformat.read(master, as_version=4).cells:
        region = re.findall(r"### BEGIN SOLUTION\n(.*?)### END SOLUTION", cell.source, re.S)
        for line in "\n".join(region).splitlines():
            line = line.split("#")[0].strip()
            if line.startswith(("def ", "for ", "if ", "elif ", "else", "with ", '"""', "import")):
                continue
            line = re.sub(r"^return\s+", "", line)
            line = re.split(r"(?<![=!<>])=(?!=)", line, maxsplit=1)[-1]
            if len(_squeeze(line)) >= 12 and not re.fullmatch(r"[\w.]+,?", _squeeze(line)):
                found.append(_squeeze(line))
    return found


@pytest.mark.parametrize("path", MASTERS, ids=_ids(MASTERS))
def test_the_hints_diagnose_without_giving_the_answer(path):
    """No string of the check module holds a line of the model answer (spaces, brackets aside)."""
    module = ROOT / "course_utils" / "exercise_checks" / f"{check_module(path)}.py"
    strings = [_squeeze(s) for s in _strings(module)]
    assert any("Hint:" in s for s in _strings(module)), "a failing check must say what to try"
    given = {e for e in solution_expressions(path) for s in strings if e in s}
    assert not given, f"hints that spell out the answer: {sorted(given)}"


def test_the_hint_check_catches_an_answer_in_a_hint(tmp_path):
    master = ROOT / "solutions" / "02_lora_math" / "02_lora_math_exercises.ipynb"
    expressions = solution_expressions(master)
    leaky = 'HINT = f"Hint: check the formula h = x @ W.T + (alpha / r) * (x @ A.T) @ B.T ({1})."'
    (tmp_path / "leaky.py").write_text(leaky)
    assert any(e in _squeeze(s) for e in expressions for s in _strings(tmp_path / "leaky.py"))


@pytest.mark.parametrize("path", STUDENT_VERSIONS, ids=_ids(STUDENT_VERSIONS))
def test_student_version_holds_no_solution_and_no_hidden_test(path):
    text = path.read_text()
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
        assert marker not in text
    notebook = nbformat.read(path, as_version=4)
    stubs = [c for c in notebook.cells if _nbgrader(c).get("solution")]
    assert stubs and all("raise NotImplementedError()" in c.source for c in stubs)


def test_exercises_are_in_sync_with_solutions():
    assert grading.check_exercises() == [], "run: python -m course_tools.grading generate"


def test_the_sync_check_catches_a_hand_edit(tmp_path):
    edited = tmp_path / "exercises"
    shutil.copytree(ROOT / "exercises", edited)
    target = sorted(edited.glob("*/*.ipynb"))[0]
    notebook = json.loads(target.read_text())
    notebook["cells"][0]["source"] = "edited by hand"
    target.write_text(json.dumps(notebook))
    (edited / "02_lora_math" / "notes.txt").write_text("stray")
    problems = grading.check_exercises(ROOT / "solutions", edited)
    assert any("differs from its generated version" in p for p in problems), problems
    assert any("notes.txt is not generated" in p for p in problems), problems


def test_generate_points_the_badge_at_the_student_version(tmp_path):
    [path] = [
        p for p in grading.generate_exercises(ROOT / "solutions", tmp_path) if "02_" in p.name
    ]
    first = nbformat.read(path, as_version=4).cells[0].source
    assert "/blob/main/exercises/02_lora_math/02_lora_math_exercises.ipynb" in first
    assert "/solutions/" not in first


#: Masters whose model answers a grading test grades to full marks (autograde runs every test
#: cell, hidden ones included, as validate does): validating them too ran the same cells twice.
GRADED_IN_FULL = {
    "01_why_finetune": "tests/tools/test_grading.py",
    "02_lora_math": "tests/tools/test_grading_sandbox.py",
    "03_quantization": "tests/tools/test_grading_sandbox.py",
    "04_data_preparation": "tests/tools/test_grading.py",
    "05_lora_lab": "tests/tools/test_grading.py",
    "06_qlora_lab": "tests/tools/test_grading.py",
    "13_preference_tuning": "tests/tools/test_grading.py",
}
VALIDATED = [p for p in MASTERS if p.parent.name not in GRADED_IN_FULL]


@pytest.mark.parametrize("path", VALIDATED, ids=_ids(VALIDATED))
def test_master_passes_nbgrader_validate(path):
    assert grading.validate_notebook(path) == []


def test_every_other_master_is_graded_in_full_by_a_grading_test():
    assert len(VALIDATED) + len(GRADED_IN_FULL) == len(MASTERS)
    for lesson, test_file in GRADED_IN_FULL.items():
        assert f"{lesson}/{lesson}_exercises.ipynb" in (ROOT / test_file).read_text(), lesson


def test_a_student_version_fails_nbgrader_validate_invert():
    """Under nbgrader every test cell of a stub notebook fails (its checks raise there)."""
    assert grading.validate_notebook(STUDENT_VERSIONS[1], invert=True) == []


@pytest.mark.parametrize("path", STUDENT_VERSIONS, ids=_ids(STUDENT_VERSIONS))
def test_run_all_on_a_fresh_exercise_notebook_reaches_the_end(path, monkeypatch):
    """As a learner runs it: no cell raises, and each exercise says it is not answered yet.

    One "not answered yet" per test cell also means that no exercise is handed out solved
    (nbgrader's --invert, checked on one notebook above, would fail each of them).
    """
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, timeout=900, kernel_name="python3", allow_errors=True,
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()  # fmt: skip
    errors = [
        f"cell {c.id}: {o.ename}: {o.evalue}"
        for c in notebook.cells
        for o in c.get("outputs", [])
        if o.output_type == "error"
    ]
    assert errors == []
    tests = [c for c in notebook.cells if _nbgrader(c).get("grade")]
    for number, cell in enumerate(tests, start=1):
        said = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        assert said.startswith(f"⏳ Exercise {number} is not answered yet: write `"), (
            cell.id,
            said,
        )
        assert said.count("\n") == 1, (cell.id, said)


def test_validate_invert_catches_a_solved_notebook():
    problems = grading.validate_notebook(MASTERS[0], invert=True)
    assert problems and all("passes although" in p for p in problems)


#: The labs whose learners also write the libraries' own calls from a description in words, in a
#: fourth exercise worth 3 points: TRL's SFTTrainer (05), transformers' BitsAndBytesConfig (06)
#: and TRL's DPOTrainer (13).
LIBRARY_CALL_EXERCISES = {
    "05_lora_lab": "ex4_sft_trainer_tests",
    "06_qlora_lab": "ex4_bnb_config_tests",
    "13_preference_tuning": "ex4_dpo_trainer_tests",
}
#: The assignments with a fourth exercise worth 3 points: those labs, and lesson 03's fake
#: quantization with the straight-through estimator (QAT). Every other one has three exercises.
FOURTH_EXERCISES = {**LIBRARY_CALL_EXERCISES, "03_quantization": "ex4_fake_quantize_ste_tests"}


def test_list_exercises_reads_points_from_the_masters():
    exercises = grading.list_exercises()
    by_assignment = {}
    for exercise in exercises:
        by_assignment.setdefault(exercise.assignment, []).append(exercise)
    for assignment in ASSIGNMENTS:
        points = [e.points for e in by_assignment[assignment]]
        if assignment in FOURTH_EXERCISES:
            assert points == [2, 3, 5, 3], assignment
            assert by_assignment[assignment][-1].grade_id == FOURTH_EXERCISES[assignment]
        else:
            assert points == [2, 3, 5], assignment
    with pytest.raises(ValueError, match="not a folder"):
        grading.list_exercises(ROOT / "no_such_folder")
