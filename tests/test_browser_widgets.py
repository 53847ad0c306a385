"""The lessons' widgets in a real browser: run the notebook in JupyterLab, move a slider with
the keyboard, and read back exactly the numbers the function behind the widget computes."""

import pytest
from browser import (
    chromium_page,
    jupyterlab,
    kernel_print,
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


def test_rank_and_alpha_explorers_follow_their_sliders(lab):
    url, page = lab
    open_notebook(page, url, "notebooks/02_lora_math.ipynb")
    run_all_cells(page)

    def computed_rank_text(r: int) -> str:
        """The text the function behind the widget gives for rank r on the notebook's real ΔW."""
        return kernel_print(page, f"print(format_rank_stats(rank_stats(delta_q, {r})))")

    start = computed_rank_text(8)
    assert start.startswith("rank r = 8 · reconstruction error = ")
    assert widget_text(page, "course-rank-stats", start) == start
    press_slider(page, "rank r", "ArrowRight", times=4, index=0)
    assert slider_value(page, "rank r", index=0) == "12"
    moved = computed_rank_text(12)
    assert moved != start
    assert widget_text(page, "course-rank-stats", moved) == moved
    screenshot(page, "02_rank_explorer")

    start = widgets.format_alpha_stats(widgets.alpha_stats(8, 16))
    assert widget_text(page, "course-alpha-stats", start) == start
    press_slider(page, "alpha α", "ArrowRight", times=16)
    assert slider_value(page, "alpha α") == "32"
    moved = widgets.format_alpha_stats(widgets.alpha_stats(8, 32))
    assert widget_text(page, "course-alpha-stats", moved) == moved
    page.locator(".widget-checkbox", has_text="rsLoRA").locator("input").check()
    rslora = widgets.format_alpha_stats(widgets.alpha_stats(8, 32, rslora=True))
    assert rslora != moved
    assert widget_text(page, "course-alpha-stats", rslora) == rslora
    screenshot(page, "02_alpha_explorer")
