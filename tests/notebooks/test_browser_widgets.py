"""The lessons' widgets in a real browser: run the notebook in JupyterLab, move a slider with
the keyboard, and read back exactly the numbers the function behind the widget computes."""

import re
import time

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

    # The update norm comes from one real Adam step, whose first move is about lr * sign(gradient):
    # the last digits depend on how the CPU's threads summed the gradient. The rest is exact.
    def shown_alpha(expected: str) -> str:
        """Wait until the alpha line shows `expected` up to the update norm's last digits."""
        for _ in range(300):
            text = widget_text(page, "course-alpha-stats")
            if alpha_lines_agree(text, expected):
                return text
            time.sleep(0.2)
        return text

    start = widgets.format_alpha_stats(widgets.alpha_stats(8, 16))
    assert alpha_lines_agree(shown_alpha(start), start)
    press_slider(page, "alpha α", "ArrowRight", times=16)
    assert slider_value(page, "alpha α") == "32"
    moved = widgets.format_alpha_stats(widgets.alpha_stats(8, 32))
    assert alpha_lines_agree(shown_alpha(moved), moved)
    page.locator(".widget-checkbox", has_text="rsLoRA").locator("input").check()
    rslora = widgets.format_alpha_stats(widgets.alpha_stats(8, 32, rslora=True))
    assert not alpha_lines_agree(rslora, moved)
    assert alpha_lines_agree(shown_alpha(rslora), rslora)
    screenshot(page, "02_alpha_explorer")


def alpha_lines_agree(shown: str, expected: str) -> bool:
    """Say whether two alpha-explorer lines agree: exactly, but the update norm within 3 %."""
    number = r"update norm = ([0-9.]+) × lr"
    a, b = re.search(number, shown), re.search(number, expected)
    if not (a and b):
        return False
    same_rest = re.sub(number, "", shown) == re.sub(number, "", expected)
    return same_rest and abs(float(a.group(1)) / float(b.group(1)) - 1) < 0.03


def test_alpha_lines_agree_compares_what_it_should():
    line = widgets.format_alpha_stats(widgets.alpha_stats(8, 32, rslora=True))
    assert alpha_lines_agree(line, line)
    assert not alpha_lines_agree(line, widgets.format_alpha_stats(widgets.alpha_stats(8, 33, True)))
    assert not alpha_lines_agree(line, line.replace("α/√r", "α/r"))
    assert not alpha_lines_agree(line, "")
