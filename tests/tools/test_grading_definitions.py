"""What the grader runs of a learner's cells: definitions only (course_tools.grading.definitions).

The batch in test_grading_sandbox.py shows the effect on grades; these tests pin the rule, one
statement at a time, and check that no model answer of any exercise loses a line to it.
"""

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from course_tools.grading.definitions import MARK, Filter, keep_definitions, master_names

ROOT = Path(__file__).resolve().parents[2]
MASTERS = sorted((ROOT / "solutions").glob("*/*.ipynb"))
LORA = ROOT / "solutions" / "02_lora_math" / "02_lora_math_exercises.ipynb"


@pytest.fixture(scope="module")
def lora_filter():
    return Filter(*master_names(nbformat.read(LORA, as_version=4)))


def _run(source: str, keep: Filter) -> tuple[list[str], list[str]]:
    """(the lines the grader runs, why the others are not run)."""
    text, notes = keep_definitions(source, keep)
    return [line for line in text.splitlines() if not line.startswith(MARK)], notes


@pytest.mark.parametrize("master", MASTERS, ids=lambda p: p.parent.name)
def test_every_model_answer_runs_unchanged(master):
    notebook = nbformat.read(master, as_version=4)
    keep = Filter(*master_names(notebook))
    answers = [c for c in notebook.cells if c.metadata.get("nbgrader", {}).get("solution")]
    assert answers
    for cell in answers:
        assert keep_definitions(cell.source, keep) == (cell.source, []), cell.source[:200]


def test_the_masters_names_are_protected_and_the_answers_are_not():
    protected, answers = master_names(nbformat.read(LORA, as_version=4))
    assert protected["check"] == "course_utils.exercise_checks.lora_math"
    assert protected["torch"] == "torch"
    assert {"lora_forward", "lora_param_counts", "lora_total", "best_rank_r"} <= answers
    assert not answers & set(protected)


HONEST = '''"""My helpers."""
import math
import torch
from torch import nn
from functools import lru_cache

SCALE = 2.0
NAMES = ("q_proj", "v_proj")
LIMIT = -SCALE * 3 if SCALE else None
PROMPT = f"rank {SCALE:.0f}"
square = lambda v: v * v


@lru_cache(maxsize=None)
def helper(n: int = 3) -> int:
    return n * math.prod(range(1, n))


@torch.no_grad()
def lora_forward(x, W, A, B, alpha, r):
    return x @ W.T + (alpha / r) * ((x @ A.T) @ B.T)


class Layer(nn.Module):
    """A layer."""

    size: int = 3

    @property
    def width(self):
        return self.size

    @width.setter
    def width(self, value):
        self.size = value

    @staticmethod
    def name():
        return "layer"


class Deeper(Layer):
    pass
'''


def test_honest_definitions_all_run(lora_filter):
    assert keep_definitions(HONEST, lora_filter) == (HONEST, [])


ATTACKS = {
    "torch.allclose = lambda *a, **k: True": "assigns to an attribute",
    "check.lora_forward = print": "assigns to an attribute",
    "setattr(torch, 'equal', print)": "not a definition",
    "import numpy as torch": "replace `torch`",
    "from builtins import exec as property": "replace `property`",
    "check = None": "replace `check`",
    "def check(*args):\n    pass": "replace `check`",
    "x = __import__('os').system('rm -rf /')": "calls something",
    "x = torch._C": "calls something",
    "from os import *": "star or relative",
    "from . import answers": "star or relative",
    "def f(x=setattr(torch, 'allclose', print)):\n    pass": "calls something",
    "def f(x: print('run')):\n    pass": "calls something",
    "@functools.wraps(print)\ndef f():\n    pass": "decorator",
    "@evil\ndef f():\n    pass": "decorator",
    "class A(metaclass=type):\n    pass": "metaclass",
    "class A(dict):\n    pass": "base class",
    "class A:\n    def __init_subclass__(cls):\n        pass": "__init_subclass__",
    "class A:\n    __class_getitem__ = print": "__class_getitem__",
    "class A:\n    print('run')": "in its body",
    "class A:\n    x = print('run')": "in its body",
    "for name in ('allclose',):\n    pass": "not a definition",
    "with open('x') as f:\n    pass": "not a definition",
    "try:\n    import torch\nexcept ImportError:\n    pass": "not a definition",
    "(x := 3)": "not a definition",
    "%time 1": "not a definition",
    "!cat /etc/passwd": "not a definition",
}


@pytest.mark.parametrize("attack", ATTACKS, ids=range(len(ATTACKS)))
def test_code_that_runs_at_the_top_is_commented_out_and_says_why(attack, lora_filter):
    ran, notes = _run(f"import math\n\n{attack}\n\nSCALE = 2\n", lora_filter)
    assert ran == ["import math", "", "", "SCALE = 2"], ran
    [note] = notes
    assert note.startswith("line 3:") and ATTACKS[attack] in note, note


def test_a_line_shared_with_an_attack_is_not_run(lora_filter):
    ran, notes = _run("x = 1; torch.equal = print\ny = 2\n", lora_filter)
    assert ran == ["y = 2"] and len(notes) == 1


def test_a_class_name_rebound_later_is_no_longer_a_base(lora_filter):
    source = "class A:\n    pass\n\nA = B\n\nclass C(A):\n    pass\n"
    ran, notes = _run(source, lora_filter)
    assert "class C(A):" not in ran and "base class `A`" in notes[0]


def test_a_property_name_rebound_in_the_class_loses_its_setter(lora_filter):
    source = (
        "class A:\n    @property\n    def x(self):\n        return 1\n\n"
        "    x = Other\n\n    @x.setter\n    def x(self, value):\n        pass\n"
    )
    ran, notes = _run(source, lora_filter)
    assert ran == [] and "replace `x`" in notes[0]


def test_a_cell_that_does_not_parse_runs_nothing(lora_filter):
    ran, notes = _run("def f(:\n    pass\n", lora_filter)
    assert ran == [] and "syntax error" in notes[0]


SPOOFED_RUN = """
from course_utils.exercise_checks import lora_math as check
import torch
import course_utils.lora
import course_utils.exercise_checks.feedback as feedback

{spoof}

def lora_forward(x, W, A, B, alpha, r):
    return x @ W.T  # wrong: no LoRA update

check.lora_forward(lora_forward)
"""
SPOOF = """course_utils.lora.LoRALinear.forward = lambda self, x: self.base(x)
feedback.allclose = lambda *args, **kwargs: True
check._close = lambda *args: True"""


@pytest.mark.parametrize("filtered", [False, True])
def test_a_spoof_that_fools_the_check_is_what_the_filter_removes(filtered, lora_filter):
    """The same cell run as written passes a wrong answer; run as the grader runs it, it fails."""
    source = SPOOFED_RUN.format(spoof=SPOOF)
    if filtered:
        source, notes = keep_definitions(source, lora_filter)
        assert len(notes) == 4  # three patches and the call of the check (the test cell's job)
        source += "\ncheck.lora_forward(lora_forward)\n"
    result = subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    verdict = "❌ Exercise 1: lora_forward gives wrong values" if filtered else "✅ Exercise 1"
    assert result.stdout.startswith(verdict), result.stdout


def test_a_name_the_masters_cells_read_cannot_be_rebound_to_the_learners_code():
    """04's locked cells call `tokenizer`: rebinding it would run the learner's code in them."""
    master = ROOT / "solutions" / "04_data_preparation" / "04_data_preparation_exercises.ipynb"
    protected, _ = master_names(nbformat.read(master, as_version=4))
    assert "tokenizer" in protected
    keep = Filter(*master_names(nbformat.read(master, as_version=4)))
    ran, notes = _run("def mine(*args, **kwargs):\n    pass\n\n\ntokenizer = mine\n", keep)
    assert "tokenizer = mine" not in ran and "replace `tokenizer`" in notes[0]
    why = ROOT / "solutions" / "01_why_finetune" / "01_why_finetune_exercises.ipynb"
    protected, _ = master_names(nbformat.read(why, as_version=4))
    assert not {"d", "k", "m", "v"} & set(protected)  # its comprehensions' variables stay inside
