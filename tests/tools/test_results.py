"""Tests for `make results` (course_tools.results): the three-domain table and the file it ships.

The 15 runs train for many minutes on 2 cores, so `make results` is not part of `make test`;
here one run goes through the same code in the CI profile and the file it writes is checked, and
the shipped file is checked for its shape, its provenance and the page generated from it.
"""

import pytest

from course_tools import results


def test_the_table_has_every_method_the_issue_names_on_every_task():
    assert list(results.METHODS) == [
        "full",
        "LoRA r=4 α=16",
        "LoRA r=8 α=32",
        "LoRA r=16 α=32",
        "QLoRA r=16 α=32",
    ]
    assert [(s.get("r"), s.get("alpha")) for s in results.METHODS.values()] == [
        (None, None),
        (4, 16),
        (8, 32),
        (16, 32),
        (16, 32),
    ]
    assert len(results.jobs_of(None, None)) == 15


def test_an_unknown_task_or_method_is_refused_with_the_choices(capsys):
    with pytest.raises(ValueError, match="choose from"):
        results.jobs_of(["chess"], None)
    assert results.main(["--methods", "LoRA r=2"]) == 2
    assert "choose from" in capsys.readouterr().err


def test_a_broken_results_file_says_to_re_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="make results"):
        results.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="make results"):
        results.check({"provenance": {}, "profile": "ci", "steps": 2, "rows": [{"domain": "x"}]})


def test_one_run_goes_through_make_results_code(tmp_path):
    out, docs = tmp_path / "results.json", tmp_path / "results_table.md"
    argv = ["--domains", "causal_lm", "--methods", "LoRA r=4 α=16", "--out", str(out)]
    assert results.main([*argv, "--docs", str(docs)]) == 0
    made = results.load(out)
    (row,) = made["rows"]
    assert made["profile"] == "ci" and made["steps"] == row["steps"] == 2
    assert row["trainable_params"] == 4 * 30 * (
        (576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3
    )  # r·(d_in + d_out) over q, o, k, v, gate, up, down of 30 layers
    assert row["after"]["metric"] < row["before"]["metric"]  # perplexity fell
    assert row["peak_memory_bytes"] > 500 * 2**20
    assert "| causal_lm | LoRA r=4 α=16 | 1,221,120 |" in docs.read_text()


@pytest.fixture(scope="module")
def shipped():
    return results.load()


def test_the_shipped_table_holds_every_run_in_the_full_profile(shipped):
    assert shipped["profile"] == "full" and shipped["steps"] == 16
    assert [(r["domain"], r["method"]) for r in shipped["rows"]] == results.jobs_of(None, None)
    assert {"cpu", "cpu cores"} <= set(shipped["provenance"]["machine"])
    assert shipped["provenance"]["command"].startswith("python -m course_tools.results")
    by = {(r["domain"], r["method"]): r for r in shipped["rows"]}
    full, lora = by["instruction", "full"], by["instruction", "LoRA r=16 α=32"]
    assert full["trainable_params"] > 20 * lora["trainable_params"]
    assert by["instruction", "QLoRA r=16 α=32"]["trainable_params"] == lora["trainable_params"]


def test_the_docs_page_is_generated_from_the_shipped_file(shipped, tmp_path):
    results.write_docs(shipped, tmp_path / "page.md")
    assert (tmp_path / "page.md").read_text() == results.DOCS.read_text(), "run make results"
