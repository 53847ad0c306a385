"""Tests for lesson 08's evidence: the grid (course_utils.hyperparameters), the runner
(course_tools.sweeps, `make sweeps`) and the shipped results it wrote.

The whole grid takes about an hour, so `make sweeps` is not part of `make test`; here the base run
goes through the same code in the CI profile, and the shipped file is checked for its shape, its
provenance and that it holds every run of the grid as the grid defines it now.
"""

import json
import math

import pytest
from peft import LoraConfig
from trl import SFTConfig

from course_tools import sweeps
from course_utils import hyperparameters as hp

# ------------------------------------------------------------------------------ the grid


def test_every_variant_changes_only_what_its_knob_names():
    for knob in hp.KNOBS:
        base = hp.BASES[knob.task]
        for label, changes in knob.variants:
            config = hp.variant_config(knob, label)
            changed = {k for k in base if config[k] != base[k]}
            assert changed == set(changes), (knob.name, label)


def test_run_ids_name_each_distinct_config_once_and_the_base_by_its_task():
    runs = hp.all_runs()
    assert len({json.dumps(c, sort_keys=True) for c in runs.values()}) == len(runs)
    assert runs["rentals"] == hp.BASES["rentals"] and runs["python"] == hp.BASES["python"]
    assert hp.run_id({**hp.BASES["rentals"], "learning_rate": 2e-4}) == (
        "rentals,learning_rate=0.0002"
    )
    assert (
        hp.run_id({**hp.BASES["python"], "target_modules": hp.MLP}) == "python,target_modules=mlp"
    )


def test_the_issue_asks_for_every_knob_of_the_usual_table():
    fields = {k for knob in hp.KNOBS for _, changes in knob.variants for k in changes}
    assert fields == {*hp.LORA_FIELDS, *hp.SFT_FIELDS}
    lrs = [c["learning_rate"] for c in hp.all_runs().values() if c["task"] == "rentals"]
    assert max(lrs) / min(lrs) >= 100  # two decades of learning rate


def test_each_advised_value_is_one_of_its_knobs_variants():
    for knob in hp.KNOBS:
        labels = [label for label, _ in knob.variants]
        assert set(knob.advised) <= set(labels), knob.name
        assert knob.sources and knob.advice


def test_a_run_config_is_what_the_libraries_take():
    config = hp.variant_config(hp.knob("target modules"), "attention (q, k, v, o)")
    lora = LoraConfig(**hp.lora_kwargs(config), task_type="CAUSAL_LM")
    assert set(lora.target_modules) == set(hp.ATTENTION) and lora.r == 16
    args = SFTConfig(output_dir="unused", bf16=False, **hp.sft_kwargs(config))
    assert args.learning_rate == config["learning_rate"]
    assert args.get_warmup_steps(100) == 0
    warm = hp.variant_config(hp.knob("warm-up (share of the steps)"), "10 %")
    assert (
        SFTConfig(output_dir="unused", bf16=False, **hp.sft_kwargs(warm)).get_warmup_steps(16) == 2
    )


def test_a_knob_or_variant_that_does_not_exist_is_named_in_the_error():
    with pytest.raises(ValueError, match="knob"):
        hp.knob("momentum")
    with pytest.raises(ValueError, match="variant"):
        hp.variant_config(hp.knob("learning rate"), "1e-5")
    with pytest.raises(ValueError, match="unknown run fields"):
        hp.run_id({**hp.BASES["rentals"], "momentum": 0.9})


# ------------------------------------------------------------------------------ the verdicts


def _results(scores: dict[str, float], seeds: list[float]) -> dict:
    """A results dict whose learning-rate row and seed row have the given exact matches."""
    runs = {}
    for label, score in [*scores.items()]:
        config = hp.variant_config(hp.knob("learning rate"), label)
        runs[hp.run_id(config)] = {"id": hp.run_id(config), "config": config}
        runs[hp.run_id(config)]["metrics"] = {"exact_match": score, "interval": [0, 1]}
    for seed, score in enumerate(seeds):
        config = {**hp.BASES["rentals"], "seed": seed}
        if seed:
            runs[hp.run_id(config)] = {"id": hp.run_id(config), "config": config}
        runs[hp.run_id(config)]["metrics"] = {"exact_match": score, "interval": [0, 1]}
    return {"runs": runs}


def _verdict(results: dict, knob: str = "learning rate") -> dict:
    return next(row for row in hp.recommendation_rows(results) if row["knob"] == knob)


def test_a_knob_is_read_against_the_spread_of_the_seeds():
    scores = {"1e-4": 0.2, "2e-4": 0.5, "1e-3 (lab 05)": 0.8}
    row = _verdict(_results(scores, [0.8, 0.75, 0.7]))
    assert row["best"] == "1e-3 (lab 05)" and row["verdict"] == "disagrees"
    assert math.isclose(row["effect"], 0.6) and math.isclose(row["noise"], 0.1)
    near = _verdict(_results({**scores, "2e-4": 0.72}, [0.8, 0.75, 0.7]))
    assert near["verdict"] == "agrees"  # the advised 2e-4 is within the seeds' spread of the best
    flat = _verdict(_results({"1e-4": 0.7, "1e-3 (lab 05)": 0.75}, [0.8, 0.7]))
    assert flat["verdict"] == "no effect beyond the seeds' spread"
    alone = _verdict(_results(scores, [0.8]))
    assert alone["noise"] is None and alone["verdict"].startswith("seeds not run")


def test_the_table_names_the_runs_behind_each_row():
    table = hp.recommendation_table(_results({"2e-4": 0.5, "1e-3 (lab 05)": 0.8}, [0.8, 0.7]))
    row = next(line for line in table.splitlines() if line.startswith("| learning rate |"))
    assert "`rentals,learning_rate=0.0002`" in row and "`rentals`" in row and "Dettmers" in row


def test_a_broken_results_file_says_to_re_run_the_sweep(tmp_path):
    with pytest.raises(FileNotFoundError, match="make sweeps"):
        hp.load(tmp_path / "missing.json")
    path = tmp_path / "sweeps.json"
    path.write_text(json.dumps({"provenance": {}, "profile": "full", "before": {}, "runs": {}}))
    with pytest.raises(ValueError, match=r"provenance lacks \['date'"):
        hp.load(path)


# ------------------------------------------------------------------------------ the runner


def test_the_command_refuses_an_unknown_run_id(capsys):
    assert sweeps.main(["--only", "rentals,momentum=0.9"]) == 2
    assert "--list" in capsys.readouterr().err


def test_one_run_of_the_grid_goes_through_make_sweeps_code(tmp_path):
    out, docs, figure = tmp_path / "s.json", tmp_path / "h.md", tmp_path / "img" / "h.png"
    argv = ["--only", "rentals", "--out", str(out), "--docs", str(docs), "--figure", str(figure)]
    assert sweeps.main(argv) == 0
    results = hp.load(out)
    run = results["runs"]["rentals"]
    assert results["profile"] == "ci" and list(results["runs"]) == ["rentals"]
    assert run["config"] == hp.BASES["rentals"]
    assert run["sft_config"]["max_steps"] == sweeps.ran_steps(hp.BASES["rentals"]) == 2
    assert run["train"]["losses"][-1] < run["train"]["losses"][0]
    assert 0 <= run["metrics"]["exact_match"] <= 1 and run["metrics"]["n"] == 4
    assert run["metrics"]["validation_loss"] < results["before"]["rentals"]["validation_loss"]
    assert figure.stat().st_size > 10_000
    page = docs.read_text()
    assert "## The recommendation table" in page and "`rentals`" in page
    assert "torch" in results["provenance"]["versions"]
    assert sweeps.main([*argv]) == 0  # a second call finds the run done and trains nothing
    assert hp.load(out)["runs"]["rentals"]["train"] == run["train"]


# ------------------------------------------------------------------------------ what ships


@pytest.fixture(scope="module")
def shipped():
    return hp.load()


def test_the_shipped_results_hold_every_run_of_the_grid_as_it_is_defined(shipped):
    grid = hp.all_runs()
    assert list(shipped["runs"]) == list(grid)
    for rid, run in shipped["runs"].items():
        assert run["config"] == grid[rid], rid
        assert run["sft_config"] == hp.sft_kwargs(grid[rid]), rid  # the full profile's steps
        assert run["lora_config"] == {
            **hp.lora_kwargs(grid[rid]),
            "bias": "none",
            "task_type": "CAUSAL_LM",
        }
        assert len(run["train"]["losses"]) == grid[rid]["max_steps"]


def test_the_shipped_results_say_where_when_and_how_they_were_made(shipped):
    provenance = shipped["provenance"]
    assert shipped["profile"] == "full"
    assert provenance["command"].startswith("python -m course_tools.sweeps")
    assert {"torch", "transformers", "peft", "trl"} <= set(provenance["versions"])
    assert {"cpu", "cpu cores", "device"} <= set(provenance["machine"])
    assert provenance["date"][:4].isdigit() and provenance["seconds"] > 60
    assert shipped["before"]["rentals"]["n"] == 40


def test_the_generated_page_is_the_shipped_results(shipped, tmp_path):
    sweeps.write_docs(
        shipped, tmp_path / "hyperparameters.md", tmp_path / "images" / sweeps.FIGURE.name
    )
    made = (tmp_path / "hyperparameters.md").read_text()
    assert made == sweeps.DOCS.read_text(), "docs/hyperparameters.md is stale: run make sweeps"
