"""One source for the code a lesson writes: a notebook cell and the package hold the same text.

A lesson that teaches by writing a function (02's `LoRALinear`, 03's NF4, ...) writes it in a
code cell whose first line names the module that keeps the same code for later lessons, d2l's
``#@save`` idea:

    # @save course_utils/lora.py
    class LoRALinear(nn.Module):
        ...

`saved_definitions(notebook)` reads such cells (no kernel) and returns each top-level ``def`` or
``class`` in them, decorators included; `compare_notebook(notebook)` checks every one against
the definition of the same name in the named module, character for character, and returns one
problem per difference, with a diff.
"""

from __future__ import annotations

import ast
import difflib
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[2]
SAVE = re.compile(r"^#\s*@save\s+(?P<module>\S+)\s*$")


@dataclass
class Definition:
    """One top-level def or class: its name, exact source, and where it was found."""

    name: str
    source: str
    where: str


def top_level_definitions(source: str, where: str) -> dict[str, Definition]:
    """Every top-level def and class of `source`, by name, with its exact text (decorators too)."""
    lines = source.splitlines()
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            text = "\n".join(lines[first - 1 : node.end_lineno])
            found[node.name] = Definition(node.name, text, f"{where}, line {first}")
    return found


def saved_cells(notebook: Path | nbformat.NotebookNode) -> list[tuple[int, str, str]]:
    """(cell index, module path, source) of each code cell that starts with `# @save <module>`."""
    if not isinstance(notebook, nbformat.NotebookNode):
        notebook = nbformat.read(Path(notebook), as_version=4)
    cells = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        match = SAVE.match(cell.source.splitlines()[0])
        if match:
            cells.append((index, match["module"], cell.source))
    return cells


def saved_definitions(notebook: Path | nbformat.NotebookNode) -> dict[str, tuple[str, Definition]]:
    """{name: (module path, definition)} of every def and class in the notebook's saved cells."""
    saved = {}
    for index, module, source in saved_cells(notebook):
        for name, definition in top_level_definitions(source, f"cell {index}").items():
            saved[name] = (module, definition)
    return saved


def compare_notebook(notebook: Path | nbformat.NotebookNode, root: Path = ROOT) -> list[str]:
    """One line (and a diff) per saved definition that differs from the module's, else []."""
    problems = []
    cells = saved_cells(notebook)
    modules: dict[str, dict[str, Definition]] = {}
    for index, module, source in cells:
        path = root / module
        if not path.is_file():
            problems.append(f"cell {index}: `# @save {module}` names no file of the repository")
            continue
        if module not in modules:
            modules[module] = top_level_definitions(path.read_text(), module)
        defined = top_level_definitions(source, f"cell {index}")
        if not defined:
            problems.append(f"cell {index}: `# @save {module}` but the cell defines nothing")
        for name, ours in defined.items():
            theirs = modules[module].get(name)
            if theirs is None:
                problems.append(f"{ours.where}: {name} is saved to {module}, which has no {name}")
            elif ours.source != theirs.source:
                diff = difflib.unified_diff(
                    theirs.source.splitlines(),
                    ours.source.splitlines(),
                    fromfile=theirs.where,
                    tofile=f"notebook {ours.where}",
                    lineterm="",
                )
                problems.append(
                    f"{name} differs between {module} and the notebook's {ours.where}:\n"
                    + "\n".join(diff)
                )
    return problems
