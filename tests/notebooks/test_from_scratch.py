"""The code a lesson writes is the package's code: one source, compared, never two drifting copies.

Lessons 02, 03, 04 and 10 write what they teach in cells marked ``# @save <module>``; the package
holds the same definitions for later lessons and exercises. These tests read the notebooks (no
kernel) and compare every saved def and class with the module's, character for character.
"""

import ast

import nbformat
import pytest
import torch
from from_scratch import ROOT, compare_notebook, saved_cells, saved_definitions

#: What each lesson must write itself (a lesson that drops one of these cells fails).
EXPECTED = {
    "02_lora_math.ipynb": {"course_utils/lora.py": {"LoRALinear", "add_lora"}},
    "03_quantization.ipynb": {
        "course_utils/quant.py": {
            "absmax_encode",
            "absmax_decode",
            "zeropoint_encode",
            "zeropoint_decode",
            "pad_to_blocks",
            "blockwise_encode",
            "blockwise_decode",
            "nf4_code",
            "nf4_scale_blocks",
            "nf4_encode",
            "nf4_decode",
            "fake_quantize",
        }
    },
    "04_data_preparation.ipynb": {
        "course_utils/data.py": {"answer_spans", "assistant_only_labels", "cut_into_blocks"}
    },
    "10_unsloth_lab.ipynb": {"course_utils/fused_loss.py": {"chunked_cross_entropy"}},
}
NOTEBOOKS = sorted(EXPECTED)


def _read(name: str) -> nbformat.NotebookNode:
    """The lesson notebook `name`, as nbformat reads it."""
    return nbformat.read(ROOT / "notebooks" / name, as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_saved_code_of_the_lesson_is_the_package_code(name):
    problems = compare_notebook(_read(name))
    assert not problems, "\n\n".join(problems)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_lesson_writes_what_it_teaches(name):
    saved = saved_definitions(_read(name))
    for module, names in EXPECTED[name].items():
        missing = sorted(n for n in names if saved.get(n, (None,))[0] != module)
        assert not missing, f"{name} no longer writes {missing} in a `# @save {module}` cell"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_later_cells_use_the_lessons_own_definitions(name):
    """No cell imports, from the package, a name that the lesson writes itself."""
    notebook = _read(name)
    written = set(saved_definitions(notebook))
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("course_utils"):
                imported = {alias.asname or alias.name for alias in node.names} & written
                assert not imported, f"{name} cell {index} imports {imported} from the package"


def _edit_constant(source: str, node: ast.AST) -> str:
    """Change the first number inside the definition `node` (1 -> 2, 0.5 -> 1.5, ...)."""
    for child in ast.walk(node):
        value = getattr(child, "value", None)
        if isinstance(child, ast.Constant) and type(value) in (int, float):
            lines = source.splitlines(keepends=True)
            line = lines[child.lineno - 1]
            text = line[child.col_offset : child.end_col_offset]
            lines[child.lineno - 1] = (
                line[: child.col_offset]
                + repr(type(value)(value + 1))
                + line[child.end_col_offset :]
            )
            assert text != repr(type(value)(value + 1))
            return "".join(lines)
    raise AssertionError(f"{node.name} has no number to change")


def _add_line(source: str, node: ast.AST) -> str:
    """Add a statement after the last statement of the definition (inside its last method)."""
    last = node.body[-1]
    while isinstance(last, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        last = last.body[-1]
    lines = source.splitlines(keepends=True)
    lines[last.end_lineno - 1] = lines[last.end_lineno - 1].rstrip("\n") + "\n"
    lines.insert(last.end_lineno, " " * last.col_offset + "print('edited')\n")
    return "".join(lines)


EDITS = {"a constant changed": _edit_constant, "a line added": _add_line}


@pytest.mark.parametrize("edit", sorted(EDITS))
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_an_edited_cell_is_reported(name, edit, tmp_path):
    """Edit each saved definition in turn, in a copy of the notebook: the checker names it."""
    notebook = _read(name)
    assert not compare_notebook(notebook)
    edited_names = []
    for index, _, source in saved_cells(notebook):
        tree = ast.parse(source)
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef | ast.ClassDef):
                continue
            if edit == "a constant changed" and not any(
                isinstance(c, ast.Constant) and type(c.value) in (int, float)
                for c in ast.walk(node)
            ):
                continue  # nothing to change in this one; the added line covers it
            copy = nbformat.from_dict(notebook)
            copy.cells[index].source = EDITS[edit](source, node)
            path = tmp_path / f"{node.name}.ipynb"
            nbformat.write(copy, path)
            problems = compare_notebook(path)
            assert len(problems) == 1, problems
            assert problems[0].startswith(f"{node.name} differs"), problems[0]
            assert "notebook cell" in problems[0] and "\n+" in problems[0]  # a diff comes with it
            edited_names.append(node.name)
    assert edited_names, f"no saved definition of {name} could be edited"


def test_a_dropped_or_misnamed_saved_cell_is_reported():
    notebook = _read("02_lora_math.ipynb")
    index, module, source = saved_cells(notebook)[0]
    copy = nbformat.from_dict(notebook)
    copy.cells[index].source = source.replace("class LoRALinear(", "class LoraLinear(")
    assert any("which has no LoraLinear" in p for p in compare_notebook(copy))
    copy.cells[index].source = source.replace(module, "course_utils/nowhere.py", 1)
    assert any("names no file" in p for p in compare_notebook(copy))
    copy.cells[index].source = f"# @save {module}\nimport torch\n"
    assert any("defines nothing" in p for p in compare_notebook(copy))


def test_the_chunked_loss_lesson_10_writes_equals_the_fused_loss():
    from course_utils.fused_loss import chunked_cross_entropy, linear_cross_entropy

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(301, 16, generator=generator, dtype=torch.float64)
    weight = torch.randn(50, 16, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 50, (301,), generator=generator)
    labels[::3] = -100  # the prompt: not graded
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    chunked = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=64)
    fused = linear_cross_entropy(hidden, weight, labels, chunk_tokens=64).loss_sum
    torch.testing.assert_close(chunked.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(fused.double(), expected, rtol=1e-6, atol=0)
