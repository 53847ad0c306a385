"""make bench's scoring race: both evaluators give the same scores, and the table says the goal."""

import pytest

from course_tools.bench import eval as bench_eval


def test_the_race_times_both_evaluators_on_the_same_listings(model, tokenizer):
    rows = bench_eval.race(model, tokenizer, n_examples=4)
    assert [row["evaluator"] for row in rows] == ["plain", "course"]
    assert all(row["examples"] == 4 and row["seconds"] > 0 for row in rows)
    assert rows[0]["exact_match"] == rows[1]["exact_match"]
    table = bench_eval.format_table(rows, "untrained")
    assert "s per 100" in table and "goal <= 30 s per 100 listings" in table


def test_the_race_rejects_a_bad_size(model, tokenizer):
    with pytest.raises(ValueError, match="n_examples must be a positive integer"):
        bench_eval.race(model, tokenizer, n_examples=0)


def test_the_goal_line_says_met_or_not():
    fast = {"examples": 100, "exact_match": 0.0, "lenient_match": 0.0}
    rows = [
        {**fast, "evaluator": "plain", "seconds": 60.0, "seconds_per_100": 60.0},
        {**fast, "evaluator": "course", "seconds": 20.0, "seconds_per_100": 20.0},
    ]
    assert "3.0x" in bench_eval.format_table(rows, "m") and ": met" in bench_eval.format_table(
        rows, "m"
    )
    rows[1].update(seconds=40.0, seconds_per_100=40.0)
    assert "NOT met" in bench_eval.format_table(rows, "m")
