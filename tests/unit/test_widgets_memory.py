"""Tests for the memory calculator of lesson 03: what it displays is exactly memory.estimate.

With N devices (lesson 09) it displays exactly sharding.estimate_per_device."""

import html

import pytest

from course_utils import memory, sharding
from course_utils.widgets import (
    MEMORY_DEVICES,
    MEMORY_DEVICES_CLASS,
    MEMORY_DTYPES,
    MEMORY_PRECISION_CLASS,
    MEMORY_STAGE_CLASS,
    MEMORY_STAGES,
    MEMORY_STATS_CLASS,
    _memory_gpu_table,
    format_memory_precision,
    format_memory_stats,
    memory_calculator,
    memory_stats,
)

SETTINGS = [
    ("SmolLM2-135M", "full", "fp32", 4, 512, "adamw"),
    ("Llama-2-7B", "full", "bf16", 1, 512, "adamw"),
    ("Mistral-7B", "full", "fp16", 2, 256, "adamw_8bit"),
    ("Llama-3.2-1B", "lora", "bf16", 2, 1024, "adamw_8bit"),
    ("Llama-2-7B", "qlora", "fp16", 1, 256, "sgd"),
    ("Llama-3-70B", "qlora", "bf16", 8, 4096, "adamw"),
]


# ------------------------------------------------------------------------------ memory_stats


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(map(str, s)))
def test_displayed_numbers_are_the_estimate(setting):
    model, method, dtype, batch, seq_len, optimizer = setting
    stats = memory_stats(model, method, dtype, batch, seq_len, optimizer)
    # a 16-bit dtype is mixed precision: full fine-tuning keeps an fp32 master copy
    master = method == "full" and dtype != "fp32"
    assert stats["master_weights"] == master
    est = memory.estimate(
        model, method, dtype, batch, seq_len, optimizer, master_weights=master, adapter_dtype="fp32"
    )
    for part, value in est.breakdown().items():
        assert stats[f"{part}_bytes"] == value
        assert stats[f"{part}_gb"] == value / memory.GB
    assert stats["n_params"] == est.n_params
    assert stats["trainable_params"] == est.trainable_params
    assert (stats["model"], stats["method"], stats["batch"], stats["seq_len"]) == (
        model,
        method,
        batch,
        seq_len,
    )
    assert set(stats["gpus"]) == set(memory.GPUS)
    for gpu, ok in stats["gpus"].items():
        assert ok == memory.fits(est, gpu)
    assert stats["fits"] == [gpu for gpu, ok in stats["gpus"].items() if ok]
    sizes = [memory.GPUS[gpu] for gpu in stats["gpus"]]
    assert sizes == sorted(sizes)  # smallest card first


def test_stats_follow_the_inputs():
    small, big = memory_stats(batch=1), memory_stats(batch=16)
    assert big["activations_gb"] > small["activations_gb"]
    assert big["weights_gb"] == small["weights_gb"]
    full, lora, qlora = (
        memory_stats("Llama-2-7B", m, "bf16", 1, 512) for m in ("full", "lora", "qlora")
    )
    assert full["total_gb"] > lora["total_gb"] > qlora["total_gb"]
    assert full["fits"] == [] and "T4 16 GB" in qlora["fits"]


# ------------------------------------------------------------------------------ the precision


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_full_fine_tuning_with_adamw_is_16_bytes_per_parameter_in_every_dtype(dtype):
    """Lesson 01's account: fp32 (also torch AMP) 4 + 4 + 8; bf16/fp16 2 + 2 + 4 master + 8."""
    stats = memory_stats("Llama-2-7B", "full", dtype, 1, 512, "adamw")
    n = stats["n_params"]
    state = stats["weights_bytes"] + stats["gradients_bytes"] + stats["optimizer_bytes"]
    assert state == 16 * n
    width = 4 if dtype == "fp32" else 2
    assert (stats["weights_bytes"], stats["gradients_bytes"]) == (width * n, width * n)
    text = format_memory_precision(stats)
    if dtype == "fp32":
        assert text == (
            "full fine-tuning, fp32, per parameter: 4 B fp32 weight + 4 B fp32 gradient + "
            "8 B adamw states = 16 B (activations come on top)"
        )
        assert "torch AMP" in MEMORY_DTYPES[dtype]
    else:
        assert text == (
            f"full fine-tuning, {dtype} mixed precision, per parameter: 2 B {dtype} weight + "
            f"2 B {dtype} gradient + 4 B fp32 master copy + 8 B adamw states = 16 B "
            "(activations come on top)"
        )
        assert MEMORY_DTYPES[dtype] == f"{dtype} + fp32 master copy (mixed precision)"


def test_precision_line_of_other_optimizers_and_of_lora():
    eight_bit = format_memory_precision(
        memory_stats("Llama-2-7B", "full", "bf16", 1, 512, "adamw_8bit")
    )
    assert "+ 4 B fp32 master copy + 2.031 B adamw_8bit states = 10.03 B" in eight_bit
    sgd = format_memory_precision(memory_stats("Llama-2-7B", "full", "fp32", 1, 512, "sgd"))
    assert sgd.endswith("+ 0 B sgd states = 8 B (activations come on top)")
    lora = memory_stats("Llama-2-7B", "lora", "bf16", 1, 512, "adamw")
    assert format_memory_precision(lora) == (
        f"lora: per trainable adapter parameter ({lora['trainable_params']:,}, fp32): "
        "4 B weight + 4 B gradient + 8 B adamw states = 16 B; frozen base model (bf16): "
        "2 B per weight, no gradient, no optimizer state"
    )
    qlora = format_memory_precision(memory_stats("Llama-2-7B", "qlora", "bf16", 1, 512, "adamw"))
    assert "frozen base model (bf16, linear layers in NF4): 0.574 B per weight on average" in qlora
    with pytest.raises(ValueError, match="master_weights"):
        format_memory_precision({"method": "full"})


# ------------------------------------------------------------------------------ the text


def test_format_is_predictable():
    stats = {
        "weights_gb": 0.5,
        "gradients_gb": 0.5,
        "optimizer_gb": 1.0,
        "activations_gb": 0.123,
        "total_gb": 2.123,
        "fits": ["T4 16 GB", "A100 40 GB"],
    }
    assert format_memory_stats(stats) == (
        "weights 0.50 GB · gradients 0.50 GB · optimizer 1.00 GB · activations 0.12 GB · "
        "total 2.12 GB · fits: T4 16 GB, A100 40 GB"
    )
    assert format_memory_stats({**stats, "fits": []}).endswith(" · fits: none")


def test_format_of_real_stats_shows_every_number():
    stats = memory_stats("Llama-2-7B", "lora", "bf16", 2, 512, "adamw")
    text = format_memory_stats(stats)
    for part in ("weights", "gradients", "optimizer", "activations", "total"):
        assert f"{part} {stats[f'{part}_gb']:.2f} GB" in text
    assert text.endswith("fits: " + ", ".join(stats["fits"]))


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "listed"),
    [
        ({"model": "GPT-5"}, "SmolLM2-135M"),
        ({"method": "dora"}, "qlora"),
        ({"dtype": "fp8"}, "bf16"),
        ({"optimizer": "adam"}, "adamw_8bit"),
    ],
)
def test_unknown_choices_list_the_valid_ones(kwargs, listed):
    with pytest.raises(ValueError, match=listed):
        memory_stats(**kwargs)
    with pytest.raises(ValueError, match=listed):
        memory_calculator(**kwargs)


def test_bad_numbers_and_bad_stats():
    with pytest.raises(ValueError, match="positive"):
        memory_stats(batch=0)
    with pytest.raises(TypeError, match="int"):
        memory_stats(seq_len="512")
    with pytest.raises(TypeError, match="int"):
        memory_stats(batch=True)
    with pytest.raises(TypeError, match="memory_stats"):
        format_memory_stats("weights 1 GB")
    with pytest.raises(ValueError, match="total_gb"):
        format_memory_stats({"weights_gb": 1.0})


# ------------------------------------------------------------------------------ the widget


def _text(calculator):
    return html.unescape(calculator.stats_html.value)


def test_widget_shows_the_formatted_stats_and_updates_on_change():
    calculator = memory_calculator()
    assert MEMORY_STATS_CLASS == "course-memory-stats"
    assert MEMORY_STATS_CLASS in calculator.stats_html._dom_classes
    assert MEMORY_PRECISION_CLASS in calculator.precision_html._dom_classes
    assert _text(calculator) == format_memory_stats(memory_stats())
    controls = calculator.controls
    # the dtype dropdown shows what each choice means; its values stay the dtype names
    assert controls["dtype"].options == tuple(
        (MEMORY_DTYPES[name], name) for name in memory.BYTES_PER_DTYPE
    )
    assert controls["dtype"].label == MEMORY_DTYPES["fp32"]
    assert controls["batch"].description == "batch"
    assert controls["seq_len"].description == "seq len"
    assert list(controls["model"].options) == list(memory.PRESETS)

    controls["batch"].value = 9
    assert _text(calculator) == format_memory_stats(memory_stats(batch=9))
    controls["method"].value = "qlora"
    controls["model"].value = "Llama-2-7B"
    controls["dtype"].value = "bf16"
    controls["seq_len"].value = 1024
    controls["optimizer"].value = "adamw_8bit"
    expected = memory_stats("Llama-2-7B", "qlora", "bf16", 9, 1024, "adamw_8bit")
    assert calculator.stats == expected
    assert _text(calculator) == format_memory_stats(expected)
    assert html.unescape(calculator.precision_html.value) == format_memory_precision(expected)
    assert controls["dtype"].label == MEMORY_DTYPES["bf16"]
    controls["method"].value = "full"
    full = memory_stats("Llama-2-7B", "full", "bf16", 9, 1024, "adamw_8bit")
    assert full["master_weights"] and calculator.stats == full
    assert html.unescape(calculator.precision_html.value) == format_memory_precision(full)


def test_widget_draws_the_chart_and_the_gpu_table():
    calculator = memory_calculator(model="Llama-2-7B", method="lora", dtype="bf16", batch=2)
    (output,) = calculator.chart.outputs
    assert output["data"]["image/png"].startswith("iVBORw0KGgo")  # base64 of a PNG header
    table = calculator.gpu_table.value
    for gpu in memory.GPUS:
        assert html.escape(gpu) in table
    assert table.count("✓ fits") == len(calculator.stats["fits"])
    before = output["data"]["image/png"]
    calculator.controls["batch"].value = 32
    assert calculator.chart.outputs[0]["data"]["image/png"] != before


def test_widget_starts_from_the_given_values():
    calculator = memory_calculator("Mistral-7B", "qlora", "fp16", 3, 2048, "sgd")
    values = {name: control.value for name, control in calculator.controls.items()}
    assert values == {
        "model": "Mistral-7B",
        "method": "qlora",
        "dtype": "fp16",
        "batch": 3,
        "seq_len": 2048,
        "optimizer": "sgd",
    }
    assert _text(calculator) == format_memory_stats(
        memory_stats("Mistral-7B", "qlora", "fp16", 3, 2048, "sgd")
    )


# ------------------------------------------------------------------------------ N × GPU (lesson 09)

SEVEN_B = ("Llama-2-7B", "full", "bf16", 1, 512, "adamw")
MIXED_7B = {
    "dtype": "bf16",
    "batch": 1,
    "seq_len": 512,
    "optimizer": "adamw",
    "master_weights": True,
    "adapter_dtype": "fp32",
}
ONE_GPU_HEAD = "<tr><th>GPU</th><th>memory</th><th>this setting</th><th>used</th></tr>"


def _one_sentence(raised):
    message = str(raised.value)
    assert message.endswith(".") and ". " not in message, message


@pytest.mark.parametrize("stage", MEMORY_STAGES)
def test_one_device_shows_what_it_always_showed_whatever_the_stage(stage):
    before = memory_stats(*SEVEN_B)
    after = memory_stats(*SEVEN_B, n_devices=1, stage=stage)
    assert {**after, "stage": "ddp"} == before  # nothing to shard on one device
    assert not any(key.startswith("device_") for key in after)
    assert format_memory_stats(after) == format_memory_stats(before)
    assert _memory_gpu_table(after) == _memory_gpu_table(before)
    assert _memory_gpu_table(after).startswith(f"<table>{ONE_GPU_HEAD}")


def test_eight_gpus_zero3_for_a_7b_full_fine_tune_is_sharding_per_device():
    stats = memory_stats(*SEVEN_B, n_devices=8, stage="zero3")
    sharded = sharding.estimate_per_device("Llama-2-7B", "full", 8, "zero3", **MIXED_7B)
    for part, value in sharded.breakdown().items():
        assert stats[f"device_{part}_bytes"] == value
    assert stats["device_total_bytes"] == sharded.total < stats["total_bytes"] / 4
    text = format_memory_stats(stats)
    assert text.startswith("per device, zero3 on 8 devices: ")
    assert f"total {sharded.total / memory.GB:.2f} GB" in text
    assert f"gathered {sharded.gathered / memory.GB:.2f} GB" in text
    for gpu, ok in stats["gpus"].items():
        assert ok == sharding.fits_on_devices("Llama-2-7B", "full", gpu, 8, "zero3", **MIXED_7B)
        needed = sharding.devices_needed("Llama-2-7B", "full", gpu, "zero3", **MIXED_7B)
        assert stats["devices_needed"][gpu] == needed
    assert text.endswith("fits: " + ", ".join(f"8 × {gpu}" for gpu in stats["fits"]))
    table = _memory_gpu_table(stats)
    assert "on 8 × GPU (zero3)" in table and "fewest GPUs under zero3" in table
    for gpu, needed in stats["devices_needed"].items():
        assert f"<td>{html.escape(gpu)}</td>" in table and f"<td>{needed}</td>" in table
    assert table.count("✓ fits") == len(stats["fits"])


def test_a_run_that_never_fits_says_so():
    stats = memory_stats("Llama-3-70B", "full", "bf16", 1, 512, "adamw", 2, "ddp")
    assert set(stats["devices_needed"].values()) == {None}  # DDP replicates everything
    assert _memory_gpu_table(stats).count("more than 1024") == len(memory.GPUS)
    assert format_memory_stats(stats).endswith("fits: none")


def test_changing_the_devices_and_stage_controls_updates_the_widget():
    calculator = memory_calculator(*SEVEN_B)
    devices, stage = (calculator.sharding_controls[name] for name in ("n_devices", "stage"))
    assert MEMORY_DEVICES_CLASS in devices._dom_classes and MEMORY_STAGE_CLASS in stage._dom_classes
    assert list(devices.options) == list(MEMORY_DEVICES) == [1, 2, 4, 8, 16, 32, 64]
    assert devices.value == 1
    assert list(stage.options) == [s for s in sharding.STAGES if s != "fsdp_hybrid_shard"]
    assert stage.value == "ddp" and devices.description == "devices"
    one_gpu = calculator.gpu_table.value
    assert one_gpu == _memory_gpu_table(memory_stats(*SEVEN_B))

    devices.value = 8
    stage.value = "zero3"
    expected = memory_stats(*SEVEN_B, n_devices=8, stage="zero3")
    assert calculator.stats == expected
    assert calculator.gpu_table.value == _memory_gpu_table(expected) != one_gpu
    assert _text(calculator) == format_memory_stats(expected)
    stage.value = "zero1"
    assert calculator.gpu_table.value == _memory_gpu_table(memory_stats(*SEVEN_B, 8, "zero1"))
    devices.value = 1
    assert calculator.gpu_table.value == one_gpu  # back to one GPU: as before
    assert _text(calculator) == format_memory_stats(memory_stats(*SEVEN_B))


def test_the_chart_draws_per_device_bars():
    calculator = memory_calculator(*SEVEN_B, n_devices=4, stage="fsdp_full_shard")
    assert calculator.stats["n_devices"] == 4
    (output,) = calculator.chart.outputs
    assert output["data"]["image/png"].startswith("iVBORw0KGgo")
    assert output["data"]["text/plain"].startswith("per device, fsdp_full_shard on 4 devices")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_devices": 0}, ValueError, "n_devices must be a positive integer"),
        ({"n_devices": "8"}, TypeError, "n_devices must be a positive integer"),
        ({"stage": "zero4"}, ValueError, "unknown stage"),
        ({"stage": "fsdp_hybrid_shard"}, ValueError, "stage must be one of"),
    ],
)
def test_bad_devices_or_stage_get_one_sentence(kwargs, error, match):
    with pytest.raises(error, match=match) as raised:
        memory_stats(**kwargs)
    _one_sentence(raised)
    with pytest.raises(error, match=match):
        memory_calculator(**kwargs)


def test_the_calculator_offers_only_its_device_counts():
    with pytest.raises(ValueError, match="n_devices must be one of") as raised:
        memory_calculator(n_devices=3)
    _one_sentence(raised)
    assert memory_stats(n_devices=3)["n_devices"] == 3  # the function itself takes any count
