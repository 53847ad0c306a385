"""Two pytest workers, one lesson at a time: the lock a lesson's two runs share.

`make test` runs two workers (`pytest -n 2 --dist loadfile`): a notebook's cells stay on one
worker, but nbval's run of a lesson (notebooks/) and its second run (tests/test_notebooks_rerun.py)
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
