"""Lesson 01's exercise checks: the usual mistakes get the hint that names them."""

import pytest

from course_utils import memory
from course_utils.exercise_checks import why_finetune as check

SIZES = {"fp32": 4, "bf16": 2, "fp16": 2}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True)
def _learner(monkeypatch):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)


def _said(capsys) -> str:
    return capsys.readouterr().out.strip()


def _right_bytes(dtype="fp32", master_weights=False):
    if dtype not in SIZES:
        raise ValueError(dtype)
    return 2 * SIZES[dtype] + 8 + (4 if master_weights and dtype != "fp32" else 0)


def _right_gb(config, dtype="fp32"):
    return memory.count_params(config) * (2 * SIZES[dtype] + 8) / memory.GB


def _right_training_bytes(config, method, dtype="bf16", r=16):
    n, size = memory.count_params(config), SIZES[dtype]
    if method == "full":
        return {"weights": n * size, "gradients": n * size, "optimizer": n * (8 + 4 * (size != 4))}
    lora = memory.lora_trainable_params(config, r, list(PROJECTIONS))
    return {"weights": n * size + 4 * lora, "gradients": 4 * lora, "optimizer": 8 * lora}


def _right_fit(config, method, gpus, dtype="bf16", r=16):
    needed = sum(_right_training_bytes(config, method, dtype, r).values())
    return [name for name, gb in gpus.items() if needed <= 0.9 * gb * memory.GB]


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        (lambda dtype="fp32", master_weights=False: 2 * SIZES[dtype] + 8, "an fp32 copy"),
        (lambda dtype="fp32", master_weights=False: 2 * SIZES[dtype] + 4, "m and v"),
        (lambda dtype="fp32", master_weights=False: "16", "not a number"),
    ],
)
def test_bytes_per_param_mistakes(answer, hint, capsys):
    check.bytes_per_param(answer)
    said = _said(capsys)
    assert said.startswith("❌ Exercise 1") and hint in said, said


def test_bytes_per_param_right_then_its_report(capsys):
    check.bytes_per_param(_right_bytes)
    said = _said(capsys)
    assert said.startswith("✅ Exercise 1: `bytes_per_param` passes the tests."), said
    assert "Llama-2-7B (6,738,415,616 parameters)" in said


def test_bytes_per_param_master_copy_in_fp32_is_named(capsys):
    def always_master(dtype="fp32", master_weights=False):
        return 2 * SIZES[dtype] + 8 + 4 * master_weights

    check.bytes_per_param(always_master, cases=[("fp32", True)])
    assert "already are the master copy" in _said(capsys)


def test_bytes_per_param_must_raise_value_error(capsys):
    check.bytes_per_param(_right_bytes, cases=[()], invalid=("int8", "FP32"))
    assert _said(capsys).startswith("✅ Exercise 1")
    check.bytes_per_param(lambda dtype="fp32", master_weights=False: 16, cases=[], invalid=["x"])
    assert "instead of raising ValueError" in _said(capsys)
    check.bytes_per_param(
        lambda dtype="fp32", master_weights=False: SIZES[dtype], cases=[], invalid=["x"]
    )
    assert "raised KeyError, not ValueError" in _said(capsys)


def test_count_params_with_an_untied_head_gets_the_tied_hint(capsys):
    def count(config):
        return memory.count_params(dict(config, tie_word_embeddings=False))

    check.count_params(count, _right_gb)
    assert "ties its LM head" in _said(capsys)


def test_full_finetune_gb_in_decimal_gb_is_named(capsys):
    check.count_params(memory.count_params, lambda c, d="fp32": _right_gb(c, d) * memory.GB / 1e9)
    said = _said(capsys)
    assert said.startswith("❌ Exercise 2") and "not 10**9" in said, said


def test_count_params_right(capsys):
    check.count_params(memory.count_params, _right_gb)
    assert _said(capsys).startswith("✅ Exercise 2")


def test_lora_with_base_model_gradients_is_named(capsys):
    def training_bytes(config, method, dtype="bf16", r=16):
        parts = _right_training_bytes(config, method, dtype, r)
        if method == "lora":
            parts["gradients"] = memory.count_params(config) * SIZES[dtype]
        return parts

    check.training_bytes(training_bytes, _right_fit)
    assert "only the LoRA adapters have gradients" in _said(capsys)


def test_gpus_without_the_ten_percent_margin_are_named(capsys):
    def fit(config, method, gpus, dtype="bf16", r=16):
        needed = sum(_right_training_bytes(config, method, dtype, r).values())
        return [name for name, gb in gpus.items() if needed <= gb * memory.GB]

    check.training_bytes(_right_training_bytes, fit)
    said = _said(capsys)
    assert said.startswith("❌ Exercise 3") and "keep 10 %" in said, said


def test_training_bytes_right(capsys):
    check.training_bytes(_right_training_bytes, _right_fit)
    said = _said(capsys)
    assert said.startswith("✅ Exercise 3") and "Llama-2-7B, lora in bf16" in said, said
