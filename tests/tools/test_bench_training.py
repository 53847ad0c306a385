"""Tests for course_tools.bench.training: the training record of `make bench`, on a tiny Llama.

`make bench` runs the same code on SmolLM2 for minutes; here a random 2-layer Llama with the
course tokenizer's vocabulary goes through the real subprocesses, the real SFTTrainer and the
real transformers.Trainer + PEFT, so the numbers are real, only small.
"""

import csv
import json

import pytest

from course_tools.bench import training as bench_training
from course_utils import memory

MB = 2**20
WORKLOADS = ["course-full", "course-lora", "sft-lora", "trainer-lora", "unsloth-lora"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rows = bench_training.run(
        WORKLOADS, out=out, model="tiny", steps=4, batch=2, seq_len=32, progress=False
    )
    return out, rows


def test_every_workload_ran_on_the_same_tokens(bench_run):
    _, rows = bench_run
    assert [row["workload"] for row in rows] == WORKLOADS
    for row in rows:
        assert row["tokens_per_step"] == 2 * 32
        assert len(row["step_seconds"]) == 4 and len(row["losses"]) == 4
        assert row["timed_steps"] == 1  # steps 1-3 are warm-up and memory profiling
        assert row["tokens_per_second"] == pytest.approx(64 / row["seconds_per_step"])
    by = {row["workload"]: row for row in rows}
    # LoRA starts with B = 0, so step 1's loss is the base model's on the first batch: equal
    # only if the plain Trainer shuffled the blocks the way the course path did
    assert by["trainer-lora"]["losses"][0] == pytest.approx(by["course-lora"]["losses"][0], 1e-5)


def test_trainable_parameters_are_what_each_method_trains(bench_run):
    _, rows = bench_run
    by = {row["workload"]: row for row in rows}
    full, lora, plain = by["course-full"], by["course-lora"], by["trainer-lora"]
    assert full["trainable_params"] == full["total_params"]
    expected = memory.lora_trainable_params(
        {k: v for k, v in lora["config"].items() if v is not None}, r=16
    )
    assert lora["trainable_params"] == plain["trainable_params"] == expected
    assert by["unsloth-lora"]["trainable_params"] == expected


def test_unsloth_trains_the_same_model_on_the_same_loss_and_says_which_backend(bench_run):
    _, rows = bench_run
    by = {row["workload"]: row for row in rows}
    course, unsloth = by["course-lora"], by["unsloth-lora"]
    # B starts at zero, so step 1 is the base model's loss on the same batch, whoever computes it
    assert unsloth["losses"][0] == pytest.approx(course["losses"][0], rel=1e-4)
    assert unsloth["losses"][-1] < unsloth["losses"][0]
    assert unsloth["peak_memory"] > 0 and unsloth["dtype"] == course["dtype"]
    on_cpu = course["device"] == "cpu"
    assert ("CPU fallback" in unsloth["backend"]) == on_cpu, unsloth["backend"]
    assert not on_cpu or "chunked CE on" in unsloth["backend"]


def test_mfu_is_model_flops_over_the_measured_matmul_rate(bench_run):
    _, rows = bench_run
    for row in rows:
        n, trained = row["total_params"], row["trainable_params"]
        per_token = 6 * n if row["method"] == "full" else 4 * (n - trained) + 6 * trained
        # blocks of 32 tokens: the first label of a block is never predicted, so the output
        # layer (vocab x hidden, frozen under LoRA) runs on 31 of 32 tokens per block
        head = row["config"]["vocab_size"] * row["config"]["hidden_size"]
        per_token -= round((6 if row["method"] == "full" else 4) * head / 32)
        assert row["labelled_per_step"] == 2 * 31
        assert row["flops_per_token"] == per_token
        assert row["matmul_rate"] > 1e8  # any CPU multiplies faster than 0.1 GFLOP/s
        assert row["mfu"] == pytest.approx(
            per_token * row["tokens_per_second"] / row["matmul_rate"]
        )


def test_each_workload_measures_its_own_matmul_rate_after_every_step(bench_run):
    _, rows = bench_run
    for row in rows:
        samples = row["matmul_rates"]
        assert len(samples) == len(row["step_seconds"]) == 4, row["workload"]
        # the best sample after steps 3 and 4, the steps timed (step 4) and the one before
        assert row["matmul_rate"] == max(samples[2:])
        assert row["parent_matmul_rate"] > 1e8
    table = (bench_run[0] / "train.md").read_text()
    assert "the parent measured" in table and "| matmul GFLOP/s |" in table


def test_peak_memory_is_measured_for_the_course_path_and_compared_with_the_estimator(bench_run):
    _, rows = bench_run
    by = {row["workload"]: row for row in rows}
    full = by["course-full"]
    # full fine-tuning holds weights, gradients and both AdamW moments: 16 bytes per parameter
    assert full["peak_memory"] >= 16 * full["total_params"]
    assert by["course-lora"]["peak_memory"] < full["peak_memory"]
    for row in (full, by["course-lora"]):
        assert row["estimator_error"] == pytest.approx(
            row["estimated_memory"] / row["peak_memory"] - 1
        )
    assert by["trainer-lora"]["peak_memory"] is None  # the reference path is only timed


def test_the_report_files_hold_the_table_the_csv_and_the_plot(bench_run):
    out, rows = bench_run
    table = (out / "train.md").read_text()
    for workload in WORKLOADS:
        assert f"| {workload} |" in table
    for target in bench_training.TARGETS:
        assert f"| {target} |" in table
    assert "| peak qlora / lora | - |" in table  # qlora was not run: not measured, not faked
    assert "Unsloth / course LoRA speed: " in table and "Unsloth 20" in table
    assert "Machine: cpu " in table
    with open(out / "train.csv") as handle:
        lines = list(csv.DictReader(handle))
    assert [line["workload"] for line in lines] == WORKLOADS
    assert float(lines[0]["tokens_per_second"]) == pytest.approx(rows[0]["tokens_per_second"])
    assert (out / "train.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "train.json").read_text())["rows"][0]["workload"] == WORKLOADS[0]


# ------------------------------------------------------------------------------ the arithmetic


def test_flops_per_token_follows_the_stated_formulas():
    assert bench_training.flops_per_token("full", 1000, 1000) == 6000
    assert bench_training.flops_per_token("lora", 1000, 10) == 4 * 990 + 60
    assert bench_training.flops_per_token("qlora", 1000, 10) == 4 * 990 + 60
    with pytest.raises(ValueError, match="method"):
        bench_training.flops_per_token("dora", 1000, 10)
    with pytest.raises(ValueError, match="total_params"):
        bench_training.flops_per_token("full", 0, 0)
    # a head of 100 parameters used on a quarter of the tokens: 3/4 of its FLOPs are not needed
    assert bench_training.flops_per_token("full", 1000, 1000, head_params=100, labelled=0.25) == (
        6000 - 450
    )
    assert bench_training.flops_per_token("lora", 1000, 10, head_params=100, labelled=0.5) == (
        4 * 990 + 60 - 200
    )
    with pytest.raises(ValueError, match="labelled"):
        bench_training.flops_per_token("full", 1000, 1000, head_params=100, labelled=1.5)
    with pytest.raises(ValueError, match="head_params"):
        bench_training.flops_per_token("full", 1000, 1000, head_params=-1)


def test_matmul_rate_is_positive_and_checks_its_arguments():
    assert bench_training.matmul_rate(shapes=[(64, 64, 64)], repeats=2) > 0
    with pytest.raises(ValueError, match="repeats"):
        bench_training.matmul_rate(repeats=0)
    with pytest.raises(ValueError, match="m must be"):
        bench_training.matmul_rate(shapes=[(0, 4, 4)])


def _row(workload, tokens_per_second, peak, mfu, error=0.0):
    return {
        "workload": workload,
        "tokens_per_second": tokens_per_second,
        "peak_memory": peak,
        "mfu": mfu,
        "estimator_error": error,
    }


def test_summarise_and_the_targets_flag_what_is_met_and_what_is_not():
    rows = [
        _row("course-full", 100.0, 1000, 0.9, error=0.02),
        _row("course-lora", 150.0, 700, 0.5, error=-0.15),
        _row("course-qlora", 50.0, 300, 0.2),
        _row("trainer-lora", 100.0, None, 0.4, error=None),
    ]
    summary = bench_training.summarise(rows)
    assert summary["course / trainer speed"] == pytest.approx(1.5)
    assert summary["peak qlora / lora"] == pytest.approx(300 / 700)
    assert summary["peak lora / full"] == pytest.approx(0.7)
    assert summary["estimator error"] == pytest.approx(-0.15)  # the largest in size
    met = {name: bench_training._met(name, value) for name, value in summary.items()}
    assert met == {
        "course / trainer speed": "met",
        "MFU lora": "NOT met",
        "MFU full": "met",
        "peak qlora / lora": "met",
        "peak lora / full": "NOT met",
        "estimator error": "NOT met",
    }


def test_rounds_keep_each_workloads_fastest_and_say_so():
    slow, fast = (
        {"workload": "course-lora", "seconds_per_step": 7.0, "peak": 1},
        {
            "workload": "course-lora",
            "seconds_per_step": 6.0,
            "peak": 2,
        },
    )
    best = bench_training._fastest([slow, fast])
    assert best["peak"] == 2 and best["round_seconds_per_step"] == [7.0, 6.0]
    assert "fastest of 2 interleaved rounds (s/step of each: course-lora 7.00 / 6.00)" in (
        bench_training._rounds_note([best])
    )
    assert bench_training._rounds_note([bench_training._fastest([slow])]) == ""


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workloads": ["course-dora"]}, "unknown workload"),
        ({"workloads": "course-lora"}, "non-empty list"),
        ({"workloads": []}, "non-empty list"),
        ({"steps": 1}, "at least 2"),
        ({"batch": 0}, "batch must be a positive integer"),
        ({"seq_len": 2.5}, "seq_len must be a positive integer"),
        ({"rounds": 0}, "rounds must be a positive integer"),
    ],
)
def test_run_rejects_bad_arguments_before_measuring_anything(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench_training.run(out=tmp_path / "never", model="tiny", **kwargs)
    assert not (tmp_path / "never").exists()


def test_run_workload_rejects_an_unknown_model():
    with pytest.raises(ValueError, match="model must be"):
        bench_training.run_workload("course-lora", model="gpt2")


def test_format_table_rejects_rows_that_are_not_from_run():
    with pytest.raises(TypeError, match="non-empty list"):
        bench_training.format_table([])
    with pytest.raises(TypeError, match="workload"):
        bench_training.format_table([{"method": "lora"}])


def test_chat_data_gives_both_paths_the_same_examples_and_skips_the_estimator():
    rows = [
        bench_training.run_workload(w, model="tiny", steps=2, batch=2, data="chat")
        for w in ("course-lora", "trainer-lora")
    ]
    course, plain = (bench_training._with_derived(row, 1e10) for row in rows)
    assert course["tokens_per_step"] == plain["tokens_per_step"] > 0  # padding not counted
    assert course["seq_len"] is None and course["data"] == "chat"
    assert course["peak_memory"] > 0 and course["estimated_memory"] is None
    assert "rentals chat examples" in bench_training.format_table([course, plain])
    bench_training.plot([course, plain])  # measured bars only, no estimated ones


def test_unknown_data_is_rejected():
    with pytest.raises(ValueError, match="data must be one of"):
        bench_training.run_workload("course-lora", model="tiny", data="wikitext")
