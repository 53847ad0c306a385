"""Two pytest workers, one lesson at a time: the lock a lesson's two runs share.

`make test` runs two workers (`pytest -n 2 --dist loadfile`): a notebook's cells stay on one
worker, but nbval's run of a lesson (notebooks/) and its second run (tests/notebooks/test_notebooks_rerun.py)
are in different files and may land on the two workers at once, where both would clear and
refill the lesson's runs/ folder. Each takes the lesson's file lock first.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import tempfile
from pathlib import Path

import pytest


def lock_path(notebook: Path) -> Path:
    """The lock file of one notebook of this checkout, in the temp folder."""
    digest = hashlib.sha1(str(Path(notebook).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"course-notebook-{digest}.lock"


def _acquire(notebook: Path):
    """Block until this process holds the notebook's lock; return the open lock file."""
    handle = open(lock_path(notebook), "w")  # noqa: SIM115 (closed by _release)
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def _release(handle) -> None:
    """Let the other worker have the notebook."""
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


@contextlib.contextmanager
def _holding(notebook: Path):
    """Hold the notebook's lock for a ``with`` block."""
    handle = _acquire(notebook)
    try:
        yield
    finally:
        _release(handle)


@pytest.fixture
def notebook_lock():
    """``with notebook_lock(path):`` runs a notebook while nbval cannot run the same one."""
    return _holding


@pytest.hookimpl(trylast=True)  # after pytest has set up the notebook (its parent)
def pytest_runtest_setup(item):
    """nbval's cells of a notebook hold its lock from the first cell to the notebook's end."""
    if type(item).__name__ != "IPyNbCell" or getattr(item.parent, "_course_lock", None):
        return
    handle = _acquire(item.path)
    item.parent._course_lock = handle

    def unlock():
        item.parent._course_lock = None
        _release(handle)

    item.parent.addfinalizer(unlock)


#: The slowest files of `make test`, slowest first (summed test times, AMD EPYC, 2026-12-03). With
#: ``--dist loadfile --no-loadscope-reorder`` each file goes whole to the next free worker in
#: this order, so the long ones start at once instead of running alone at the end. Lesson 05's
#: nbval run comes after the second-run file has passed lesson 05 (they share its lock).
SLOWEST_FIRST = (
    "tests/tools/test_grading_sandbox.py",  # ~220 s: 7 students, 2 at a time, then 3 alone
    "tests/notebooks/test_notebooks_rerun.py",  # 110-200 s: lesson 05 again
    "tests/notebooks/test_exercises.py",  # ~150 s: validate on 4 masters, Run All on 11
    "tests/tools/test_grading.py",  # ~120 s: the model answers of 01, 04, 05, 06 and 13
    "notebooks/14_merge_and_deploy.ipynb",  # 196 s
    "notebooks/09_beyond_one_machine.ipynb",  # ~150 s: five 2-process training runs
    "notebooks/15_your_own_finetune.ipynb",  # ~130 s: two short trainings, scoring, export
    "notebooks/07_full_finetuning_lab.ipynb",  # 164 s
    "notebooks/13_preference_tuning.ipynb",  # 152 s
    "notebooks/10_unsloth_lab.ipynb",  # 129 s
    "notebooks/12_lora_zoo.ipynb",  # 113 s
    "notebooks/06_qlora_lab.ipynb",  # 110 s
    "notebooks/05_lora_lab.ipynb",  # 166 s, but after the second run of 05 (their lock)
    "tests/notebooks/test_browser_widgets.py",  # 99 s
    "notebooks/08_hyperparameters.ipynb",  # ~60 s: one short run of the grid, live
    "tests/tools/test_sweeps.py",  # ~60 s: the base run through make sweeps' code
    "tests/tools/test_results.py",  # ~40 s: one run through make results' code
    "tests/repo/test_examples_finetune.py",  # ~110 s on a busy machine: LoRA and QLoRA runs
    "tests/unit/test_assets.py",  # 75 s
    "tests/unit/test_deploy.py",  # 68 s
    "tests/notebooks/test_make_course.py",  # ~65 s: two JupyterLabs in chromium
    "tests/repo/test_colab_install.py",  # 25-80 s: pip resolves the Colab install
)


def pytest_collection_modifyitems(config, items):
    """Put the tests of SLOWEST_FIRST's files first, in its order; the rest keep theirs."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}

    def key(item):
        try:
            name = Path(item.path).resolve().relative_to(config.rootpath).as_posix()
        except ValueError:  # a test outside the checkout (pytester)
            return len(rank)
        return rank.get(name, len(rank))

    items.sort(key=key)  # a stable sort: a file's tests (a notebook's cells) keep their order
