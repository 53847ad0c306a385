"""Tests for course_tools.bench: the memory instrument, the subprocess runner and the table.

The SmolLM2 comparison itself takes minutes, so it lives in `python -m course_tools.bench
memory`; here a tiny random Llama goes through the same code path in a subprocess.
"""

import subprocess
import sys

import pytest
import torch

from course_tools.bench import memory as bench
from course_utils.memory import estimate
from course_utils.peak_memory import PeakMemory

MB = 2**20


# ------------------------------------------------------------------------------ the instrument


def test_peak_memory_sees_a_large_tensor_and_its_phases():
    with PeakMemory("cpu") as quiet:
        pass
    with PeakMemory("cpu") as busy:
        with busy.phase("allocate"):
            big = torch.ones(16 * MB)  # 64 MB of fp32
        with busy.phase("free"):
            del big
    assert quiet.peak < 1 * MB
    assert 64 * MB <= busy.peak < 66 * MB
    allocate, free = busy.phases["allocate"], busy.phases["free"]
    assert allocate["start"] < 1 * MB and allocate["end"] >= 64 * MB
    assert free["start"] == allocate["end"] and free["end"] < 1 * MB
    assert free["peak"] >= 64 * MB


def test_peak_memory_counts_the_transient_peak_not_the_end_state():
    with PeakMemory("cpu") as peak:
        for _ in range(3):
            scratch = torch.ones(8 * MB)  # 32 MB, dropped at once
            del scratch
        kept = torch.ones(2 * MB)  # 8 MB, still alive at the end
    assert 32 * MB <= peak.peak < 34 * MB
    assert peak.phases == {}
    del kept


def test_peak_memory_rejects_other_devices_and_bad_phase_names():
    with pytest.raises(ValueError, match="cpu"):
        PeakMemory("meta")
    with pytest.raises(TypeError):
        PeakMemory(0)
    with PeakMemory("cpu") as peak, pytest.raises(ValueError, match="name"):
        with peak.phase(""):
            pass


def test_peak_memory_keeps_the_profilers_own_lines_out_of_stderr():
    # Kineto writes "USDT: ... profiler_start" to file descriptor 2, and torch's allocator warns
    # there once about a tensor made before the profiler and freed inside it (as a training
    # step's tensors are); Jupyter shows both under the cell. The meter hides them and gives
    # fd 2 back (the last write must get out).
    code = (
        "import os, torch\n"
        "from course_utils.peak_memory import PeakMemory\n"
        "before = torch.ones(1000)\n"
        "with PeakMemory('cpu') as peak:\n"
        "    del before\n"
        "    x = torch.ones(1000)\n"
        "os.write(2, b'fd 2 works again\\n')\n"
        "print(peak.peak)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) >= 4000
    assert "profiler_start" not in run.stderr and "profiler_stop" not in run.stderr, run.stderr
    assert "unknown size" not in run.stderr, run.stderr
    assert "fd 2 works again" in run.stderr


# ------------------------------------------------------------------------------ the subprocess


@pytest.fixture(scope="module")
def tiny_full():
    return bench.measure_training_step("full", model="tiny", batch=2, seq_len=32)


def test_full_step_on_a_tiny_model_holds_16_bytes_per_parameter(tiny_full):
    n = tiny_full["n_params"]
    assert tiny_full["trainable_params"] == n
    assert tiny_full["weights"] >= 4 * n
    assert tiny_full["gradients"] == 4 * n
    assert tiny_full["optimizer"] >= 8 * n  # AdamW: two fp32 moments (+ a step counter)
    # the optimizer step of step 2 holds weights, gradients and both moments at once
    assert tiny_full["peak"] >= tiny_full["weights"] + tiny_full["gradients"] + 8 * n
    assert tiny_full["activations"] > 0
    assert tiny_full["steps"] == 2 and len(tiny_full["step_seconds"]) == 2
    assert tiny_full["peak_phase"] in tiny_full["phases"]


def test_the_estimator_reads_the_measured_config(tiny_full):
    est = estimate(
        {k: v for k, v in tiny_full["config"].items() if v is not None},
        method="full",
        batch=2,
        seq_len=32,
    )
    assert est.n_params == tiny_full["n_params"]
    # the model also holds the rotary inv_freq buffer, which the estimator leaves out
    assert est.weights <= tiny_full["weights"] < est.weights + 1024
    assert est.gradients == tiny_full["gradients"]


def test_qlora_step_on_a_tiny_model_trains_only_the_adapters(tiny_full):
    qlora = bench.measure_training_step("qlora", model="tiny", batch=2, seq_len=32)
    assert qlora["gradient_checkpointing"] is True  # the prepare_model_for_kbit_training default
    assert 0 < qlora["trainable_params"] < tiny_full["n_params"] / 4
    assert qlora["weights"] < tiny_full["weights"]  # NF4 linear layers
    assert qlora["gradients"] == 4 * qlora["trainable_params"]
    assert 0 < qlora["peak"] < tiny_full["peak"]


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"method": "sgd"}, ValueError),
        ({"method": "full", "batch": 0}, ValueError),
        ({"method": "full", "seq_len": 1.5}, TypeError),
        ({"method": "full", "model": "gpt2"}, ValueError),
        ({"method": "lora", "lora_dropout": 1.0}, ValueError),
        ({"method": "full", "dtype": "int8"}, ValueError),
    ],
)
def test_bad_arguments_fail_before_any_subprocess(kwargs, error):
    with pytest.raises(error):
        bench.measure_training_step(**kwargs)


def test_compare_memory_checks_methods_first():
    with pytest.raises(TypeError, match="list"):
        bench.compare_memory("full")
    with pytest.raises(ValueError, match="method"):
        bench.compare_memory(["full", "dora"])


# ------------------------------------------------------------------------------ the table


def _row(method, est_total_mb, peak_mb):
    est = {
        "weights": 100 * MB,
        "gradients": 10 * MB,
        "optimizer": 20 * MB,
        "activations": (est_total_mb - 130) * MB,
        "total": est_total_mb * MB,
    }
    measured = {
        "method": method,
        "weights": 100 * MB,
        "gradients": 10 * MB,
        "optimizer": 20 * MB,
        "activations": 50 * MB,
        "peak": peak_mb * MB,
        "rss": 300 * MB,
        "peak_phase": "step 2 backward",
        "phases": {"step 2 backward": {"start": 70 * MB, "end": 30 * MB, "peak": 150 * MB}},
    }
    return {
        "method": method,
        "estimated": est,
        "measured": measured,
        "error": est_total_mb / peak_mb - 1,
    }


def test_format_memory_table_shows_both_sides_and_flags_big_errors():
    table = bench.format_memory_table([_row("lora", 210, 200), _row("qlora", 260, 200)])
    lines = table.splitlines()
    assert lines[0].split()[:6] == [
        "method",
        "weights",
        "gradients",
        "optimizer",
        "activations",
        "total",
    ]
    lora_measured = next(line for line in lines if line.strip().startswith("measured"))
    assert "+5.0%" in lora_measured and "!" not in lora_measured
    assert "200.0" in lora_measured and "300.0" in lora_measured
    assert any("+30.0%!" in line for line in lines)
    assert "peak in step 2 backward = 100.0 weights + 70.0 live" in table
    assert "+-10 %" in bench.format_memory_table([_row("lora", 210, 200)])
    assert "+-50 %" in bench.format_memory_table([_row("lora", 210, 200)], tolerance=0.5)


def test_format_memory_table_rejects_what_compare_memory_does_not_return():
    with pytest.raises(TypeError):
        bench.format_memory_table([])
    with pytest.raises(TypeError):
        bench.format_memory_table({"method": "full"})
    with pytest.raises(TypeError, match="compare_memory"):
        bench.format_memory_table([{"method": "full"}])
    with pytest.raises(ValueError, match="tolerance"):
        bench.format_memory_table([_row("lora", 210, 200)], tolerance=0)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
def test_a_failing_subprocess_says_how_to_reproduce_it():
    with pytest.raises(RuntimeError, match=r"python -m course_tools\.bench _step full") as info:
        bench.measure_training_step("full", model="tiny", device="mps")
    assert "not available" in str(info.value)  # the child's own error message comes along
