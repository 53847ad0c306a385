"""A lint for course notebooks: what every lesson and exercise must carry, checked the same way.

`lint_notebook(path)` returns a list of problems (empty when the notebook is clean).
"""

from __future__ import annotations

import ast
import json
import re
import tomllib
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[2]
MAX_OUTPUT_BYTES = 100_000  # per cell: a notebook is read in a diff, not a data dump
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:work|tmp|root|home|Users|content|mnt)/[\w.-]+")
NAME = re.compile(r"^\d\d_[a-z0-9_]+\.ipynb$")
#: The first lesson that trains a model: from here on the learner must see the libraries' calls.
FIRST_TRAINING_LAB = 5
#: Course wrappers that build a model, a config or a trainer out of sight (module -> names). A
#: training lab writes from_pretrained, LoraConfig, SFTConfig/SFTTrainer, BitsAndBytesConfig,
#: DPOConfig/DPOTrainer, FastLanguageModel itself; lab 12's one-line switch
#: (methods.apply_method) is the lesson and stays.
WRAPPERS = {
    "train": {"train", "prepare_model", "lora_config", "chat_dataset", "train_method"},
    "assets": {"load_model", "nf4_config"},
    "preference": {"dpo_trainer"},
    "unsloth_backend": {"load_model", "get_peft_model"},
}


def course_settings() -> dict:
    """Return [tool.course] from pyproject.toml (the GitHub repo the badges point at)."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["course"]


def badge_url(relative_path: str) -> str:
    """Return the Colab URL that the badge of the notebook at `relative_path` must carry."""
    settings = course_settings()
    return (
        f"https://colab.research.google.com/github/{settings['github_repo']}"
        f"/blob/{settings['branch']}/{relative_path}"
    )


def lint_notebook(path: Path, root: Path = ROOT) -> list[str]:
    """Return every problem found in one notebook."""
    path = Path(path)
    try:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
    except Exception as error:  # noqa: BLE001 - any parse/validation failure is the finding
        return [f"not a valid notebook: {error}"]
    problems = []
    if not NAME.match(path.name):
        problems.append("file name must look like NN_topic.ipynb")
    cells = notebook.cells
    relative = path.resolve().relative_to(root.resolve()).as_posix()
    urls = re.findall(r"https://colab\.research\.google\.com/github/[^\s)\"']+", _source(cells, 0))
    if not urls:
        problems.append("first cell must be a markdown cell with the Colab badge")
    elif urls[0] != badge_url(relative):
        problems.append(f"Colab badge points at {urls[0]}, expected {badge_url(relative)}")
    problems += _badge_image_problems(_source(cells, 0), path.parent)
    repo = f"https://github.com/{course_settings()['github_repo']}"
    install = [
        c for c in cells if c.cell_type == "code" and '"google.colab" in sys.modules' in c.source
    ]
    if not install:
        problems.append('no Colab install cell (`if "google.colab" in sys.modules:` + pip install)')
    elif "pip" not in install[0].source or repo not in install[0].source:
        problems.append(f"the Colab install cell must pip install the course package from {repo}")
    elif "--only-binary=:all:" not in install[0].source or "[colab]" in install[0].source:
        problems.append(
            "the Colab install cell installs wheels only (--only-binary=:all:), no extra"
        )
    text = path.read_text()
    for match in sorted(set(ABSOLUTE_PATH.findall(text))):
        problems.append(f"absolute path {match!r}: use a path relative to the notebook")
    for index, cell in enumerate(cells):
        size = len(json.dumps(cell.get("outputs", [])))
        if size > MAX_OUTPUT_BYTES:
            problems.append(
                f"cell {index} carries {size:,} bytes of output (limit {MAX_OUTPUT_BYTES:,})"
            )
    code = [c for c in cells if c.cell_type == "code"]
    is_lesson = path.parent.name == "notebooks"  # an exercise ends with its graded tests instead
    if not code or ("claims.report()" if is_lesson else "check.") not in code[-1].source:
        check = (
            "the lesson's claims with claims.report()"
            if is_lesson
            else "its answers with a check (check.<exercise>(...))"
        )
        problems.append(f"the last code cell must check {check}")
    if NAME.match(path.name) and is_training_lab(path):
        problems += [
            f"{call}: a training lab writes the library's own calls, not a course wrapper"
            for call in wrapper_calls(path)
        ]
    return problems


def _badge_image_problems(first_cell: str, folder: Path) -> list[str]:
    """The badge's image must be the local copy (it shows offline), at a path that exists."""
    images = re.findall(r"!\[Open In Colab\]\(([^)\s]+)\)", first_cell)
    if not images:
        return ["first cell has no Open In Colab badge image"]
    if re.match(r"[a-z]+://", images[0]) or not (folder / images[0]).is_file():
        return [f"badge image {images[0]!r}: use the local copy (notebooks/images/colab-badge.svg)"]
    return []


def wrapper_calls(path: Path) -> list[str]:
    """Return each call (or import) of a course training wrapper in a notebook's code cells."""
    notebook = nbformat.read(Path(path), as_version=4)
    found = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        source = "\n".join(
            line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!"))
        )
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue  # nbval reports a cell that does not parse
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.attr in WRAPPERS.get(node.func.value.id, ())
            ):
                found.append(f"cell {index}: {node.func.value.id}.{node.func.attr}(...)")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                ("course_utils.", "course_tools.")
            ):
                module = node.module.rsplit(".", 1)[1]
                for alias in node.names:
                    if alias.name in WRAPPERS.get(module, ()):
                        found.append(f"cell {index}: from {node.module} import {alias.name}")
    return found


def is_training_lab(path: Path) -> bool:
    """Say whether a lesson notebook is a lab that trains (lessons 05 on)."""
    path = Path(path)
    return path.parent.name == "notebooks" and int(path.name[:2]) >= FIRST_TRAINING_LAB


def _source(cells, index: int) -> str:
    """Return the source of cell `index` if it is markdown, else ''."""
    return (
        cells[index].source if len(cells) > index and cells[index].cell_type == "markdown" else ""
    )
