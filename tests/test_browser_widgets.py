"""The lessons' widgets in a real browser: run the notebook in JupyterLab, move a slider with
the keyboard, and read back exactly the numbers the function behind the widget computes."""

import pytest
from browser import (
    chromium_page,
    jupyterlab,
    open_notebook,
    press_slider,
    run_all_cells,
    screenshot,
    slider_value,
    widget_text,
)

from course_utils import widgets


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """One JupyterLab and one browser page for all the widget tests of this module."""
    with jupyterlab(tmp_path_factory.mktemp("lab")) as url, chromium_page() as page:
        yield url, page


def test_memory_calculator_follows_the_batch_slider(lab):
    url, page = lab
    open_notebook(page, url, "notebooks/03_quantization.ipynb")
    run_all_cells(page)
    settings = {"model": "SmolLM2-135M", "method": "full", "dtype": "fp32", "seq_len": 512}
    start = widgets.format_memory_stats(widgets.memory_stats(batch=4, **settings))
    assert widget_text(page, "course-memory-stats", start) == start
    press_slider(page, "batch", "ArrowRight", times=3)
    assert slider_value(page, "batch") == "7"
    moved = widgets.format_memory_stats(widgets.memory_stats(batch=7, **settings))
    assert moved != start
    assert widget_text(page, "course-memory-stats", moved) == moved
    screenshot(page, "03_memory_calculator")
