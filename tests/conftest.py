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
