"""course_utils.course_map: the lesson table and the measured timings behind it."""

import json

import pytest

from course_tools import timings as lesson_timings
from course_utils import course_map as cm


def test_the_map_lists_every_lesson_in_order():
    rows = cm.course_map()
    assert [row["#"] for row in rows] == [f"{n:02d}" for n in range(16)]
    assert rows[0]["status"] == "ready"  # notebooks/00_start_here.ipynb exists
    for lesson, row in zip(cm.LESSONS, rows):
        expected = "ready" if (cm.NOTEBOOKS_DIR / lesson.notebook).is_file() else "coming"
        assert row["status"] == expected, lesson


def test_markdown_table_has_a_row_per_lesson():
    table = cm.course_map_markdown().splitlines()
    assert len(table) == 2 + len(cm.LESSONS)
    assert table[0].startswith("| # | lesson |")


def test_recorded_timings_show_up_and_untimed_ones_say_so(tmp_path, monkeypatch):
    timings = tmp_path / "timings.json"
    record = lesson_timings.record_timing("00_start_here", 125.0, path=timings)
    assert record["seconds"] == 125.0 and record["machine"]
    stored = json.loads(timings.read_text())
    assert stored["00_start_here"]["cpu"]["seconds"] == 125.0
    monkeypatch.setattr(cm, "TIMINGS_FILE", timings)
    monkeypatch.setattr(cm, "load_timings", lambda path=timings: json.loads(timings.read_text()))
    row = cm.course_map()[0]
    assert row["CPU (2 cores)"] == "2 min" and row["GPU"] == "not timed yet"
    assert cm._format_time({"seconds": 40}) == "40 s"


def test_the_shipped_timings_file_is_well_formed():
    for stem, kinds in cm.load_timings().items():
        assert stem in {lesson.notebook.removesuffix(".ipynb") for lesson in cm.LESSONS}, stem
        for kind, record in kinds.items():
            assert kind in ("cpu", "gpu") and record["seconds"] > 0 and record["machine"]


def test_measure_rejects_a_missing_notebook(tmp_path):
    with pytest.raises(FileNotFoundError, match="No notebook at"):
        lesson_timings.measure_notebook(tmp_path / "nope.ipynb")
