"""Shared fixtures: the course model is loaded once per test session (offline, from the cache)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach for the hub


@pytest.fixture(scope="session")
def model():
    """Return SmolLM2-135M-Instruct from the course cache (prepared by `make model`)."""
    from course_utils import assets

    return assets.load_model(source="offline")


@pytest.fixture(scope="session")
def tokenizer():
    """Return the course tokenizer from the same offline source."""
    from course_utils import assets

    return assets.load_tokenizer(source="offline")


def _xdist_group(nodeid: str) -> str:
    """The worker group of a test: its file, and for a lesson's second run the lesson itself."""
    path, _, rest = nodeid.partition("::")
    if path.endswith("test_notebooks_rerun.py") and "[" in rest:
        return "notebooks/" + rest.split("[", 1)[1].rstrip("]")
    return path


def pytest_collection_modifyitems(config, items):
    """Under `pytest -n 2 --dist loadgroup` keep each file on one worker (module fixtures, the
    cells of a notebook in order) and a lesson's two runs together (they share its runs/ folder).
    """
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_xdist_group(item.nodeid)))
