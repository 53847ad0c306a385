"""Tests for lesson 01's claims and helpers: the 16-byte rule, what PEFT saves, where setups fit."""

import math

import pytest

from course_utils import memory as M

SMOLLM2_PARAMS = 134_515_008  # sum(p.numel()) of the real SmolLM2-135M-Instruct (tied embeddings)


def _full(name, **kw):
    return M.estimate(name, method="full", dtype="bf16", master_weights=True, **kw)


# ------------------------------------------------------------------------------ the 16-byte rule


@pytest.mark.parametrize("name", sorted(M.PRESETS))
def test_sixteen_bytes_per_param_fp32_and_mixed_precision(name):
    n = M.count_params(name)
    fp32 = M.estimate(name, method="full", dtype="fp32")
    # 4 weights + 4 gradients + 4 Adam m + 4 Adam v
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4 * n, 4 * n, 8 * n)
    mixed = _full(name)
    # 2 bf16 weights + 2 bf16 gradients + (4 fp32 master + 8 Adam), the master counted as optimizer
    assert (mixed.weights, mixed.gradients, mixed.optimizer) == (2 * n, 2 * n, 12 * n)
    assert M.training_state_bytes(mixed) == 14 * n
    # without the master copy the sum is 12, not 16: the rule needs it
    no_master = M.estimate(name, method="full", dtype="bf16")
    assert no_master.weights + no_master.gradients + no_master.optimizer == 12 * n


def test_smollm2_preset_matches_the_real_parameter_count():
    assert M.count_params("SmolLM2-135M") == SMOLLM2_PARAMS


# ------------------------------------------------------------------------------ what PEFT saves


def test_training_state_bytes_is_gradients_plus_optimizer():
    est = M.estimate("SmolLM2-135M", method="lora", dtype="fp32", lora_r=16)
    assert M.training_state_bytes(est) == est.gradients + est.optimizer
    # LoRA adapters in fp32: 4 gradient + 8 Adam bytes per trainable parameter
    assert M.training_state_bytes(est) == 12 * est.trainable_params


def test_lora_r16_saving_grows_with_model_width():
    ratios = {}
    for name in M.PRESETS:
        full = M.training_state_bytes(_full(name))
        lora = M.training_state_bytes(M.estimate(name, method="lora", dtype="bf16", lora_r=16))
        ratios[name] = full / lora
    # more than 50x from 1B parameters up; SmolLM2 (hidden 576) saves less, about 32x
    assert all(ratios[name] > 50 for name in M.PRESETS if name != "SmolLM2-135M"), ratios
    assert 25 < ratios["SmolLM2-135M"] < 50, ratios
    assert ratios["Llama-3-70B"] > ratios["Llama-2-7B"] > ratios["Llama-3.2-1B"]


def test_qlora_stores_the_frozen_linear_weights_in_about_4_bits():
    lora = M.estimate("Llama-2-7B", method="lora", dtype="bf16")
    qlora = M.estimate("Llama-2-7B", method="qlora", dtype="bf16")
    assert M.training_state_bytes(lora) == M.training_state_bytes(qlora)
    assert qlora.weights < lora.weights / 3  # 16 bits -> ~4.1 bits on almost every weight


# ------------------------------------------------------------------------------ where it fits


def test_gpus_needed_and_fit_table():
    full_7b = _full("Llama-2-7B", batch=1, seq_len=512)
    assert M.gpus_needed(full_7b, "A100 80 GB") == math.ceil(full_7b.total / (80 * M.GB * 0.9))
    assert M.gpus_needed(full_7b, "A100 80 GB") >= 2  # 16 bytes x 6.7 B params > 100 GB
    small = M.estimate("SmolLM2-135M", method="qlora", batch=1, seq_len=128)
    assert M.gpus_needed(small, 8) == 1
    assert M.gpus_needed(full_7b, 80, usable_fraction=1.0) <= M.gpus_needed(full_7b, 80)

    rows = M.fit_table({"full 7B": full_7b, "qlora 135M": small}, gpus=["T4 16 GB", "A100 80 GB"])
    assert [row["setup"] for row in rows] == ["full 7B", "qlora 135M"]
    assert rows[0]["total_gb"] == pytest.approx(full_7b.total / M.GB)
    assert rows[0]["T4 16 GB"] is False and rows[0]["A100 80 GB"] is False
    assert rows[1]["T4 16 GB"] is True and rows[1]["A100 80 GB"] is True
    assert set(M.fit_table({"x": small})[0]) == {"setup", "total_gb", *M.GPUS}


def test_helpers_reject_bad_arguments():
    est = M.estimate("SmolLM2-135M")
    with pytest.raises(TypeError, match="estimate"):
        M.training_state_bytes(123)
    with pytest.raises(ValueError, match="unknown GPU"):
        M.gpus_needed(est, "H100 1 TB")
    with pytest.raises(TypeError, match="gpu"):
        M.gpus_needed(est, -4)
    with pytest.raises(ValueError, match="usable_fraction"):
        M.gpus_needed(est, 80, usable_fraction=1.5)
    with pytest.raises(TypeError, match="non-empty dict"):
        M.fit_table({})
    with pytest.raises(TypeError, match="MemoryEstimate"):
        M.fit_table({"x": 5})
    with pytest.raises(ValueError, match="unknown GPU"):
        M.fit_table({"x": est}, gpus=["H100"])
    with pytest.raises(TypeError, match="gpus"):
        M.fit_table({"x": est}, gpus="T4 16 GB")
