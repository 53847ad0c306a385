"""The browser harness itself: JupyterLab + chromium run a notebook and drive a real slider."""

import nbformat
import pytest
from browser import (
    ROOT,
    chromium_page,
    jupyterlab,
    open_notebook,
    press_slider,
    run_all_cells,
    screenshot,
    slider_value,
    widget_text,
)

WIDGET_CELL = """import ipywidgets as widgets
from IPython.display import display

level = widgets.IntSlider(value=2, min=0, max=10, description="level")
shown = widgets.HTML().add_class("course-check")
def show(change=None):
    shown.value = f"level = {level.value} · squared = {level.value ** 2}"
level.observe(show, names="value")
show()
display(widgets.VBox([level, shown]))"""


@pytest.fixture
def scratch_notebook():
    """Write a one-widget notebook inside the served folder (outputs/ is ignored by git)."""
    folder = ROOT / "outputs" / "browser-check"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "slider.ipynb"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(WIDGET_CELL)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    nbformat.write(notebook, path)
    yield path.relative_to(ROOT).as_posix()
    path.unlink()


def test_a_slider_moved_with_the_keyboard_updates_the_display(tmp_path, scratch_notebook):
    with jupyterlab(tmp_path) as url, chromium_page() as page:
        open_notebook(page, url, scratch_notebook)
        run_all_cells(page, timeout_s=120)
        assert widget_text(page, "course-check", "level = 2 · squared = 4") == (
            "level = 2 · squared = 4"
        )
        press_slider(page, "level", "ArrowRight", times=3)
        assert slider_value(page, "level") == "5"
        assert widget_text(page, "course-check", "level = 5 · squared = 25") == (
            "level = 5 · squared = 25"
        )
        assert screenshot(page, "browser-harness").stat().st_size > 10_000
