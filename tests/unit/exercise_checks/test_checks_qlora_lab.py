"""Lesson 06's exercise checks: the usual mistakes get the hint that names them."""

import math
import tempfile

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from course_utils import memory  # noqa: E402
from course_utils.exercise_checks import qlora_lab as check  # noqa: E402


@pytest.fixture(autouse=True)
def _learner(monkeypatch):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)


def _said(capsys) -> str:
    return capsys.readouterr().out.strip()


def _failed(said: str, number: int, hint: str) -> bool:
    return said.startswith(f"❌ Exercise {number}") and "Hint:" in said and hint in said


# The notebook's helpers, small copies: an NF4 layer, a tiny Llama saved and loaded in 4 bits.


def linear4bit(d_out, d_in, double_quant=True, seed=0):
    torch.manual_seed(seed)
    weight = torch.randn(d_out, d_in) * 0.02
    layer = bnb.nn.Linear4bit(
        d_in,
        d_out,
        bias=False,
        compute_dtype=torch.float32,
        quant_type="nf4",
        compress_statistics=double_quant,
    )
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, quant_type="nf4", compress_statistics=double_quant
    )
    return layer.to("cpu")


SIZES = {
    "vocab_size": 64,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory(prefix="qlora-checks-") as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SIZES)).save_pretrained(tmp)
        yield tmp


def load_4bit(folder, recipe):
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=recipe, device_map={"": "cpu"}
    )


# Exercise 1.


def _bytes(d_out, d_in, double_quant=True, *, books=True, offset=True, half=True):
    """The right count, or one with a typical mistake."""
    n = d_out * d_in
    blocks = math.ceil(n / 64)
    codes = math.ceil(n / 2) if half else n
    nf4 = 64 if books else 0
    if not double_quant:
        return codes + 4 * blocks + nf4
    extra = 4 * math.ceil(blocks / 256) + (4 if offset else 0) + (1024 if books else 0)
    return codes + blocks + extra + nf4


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        ({"books": False}, "code book is missing"),
        ({"offset": False}, "offset of double quantization"),
        ({"half": False}, "half a byte"),
    ],
)
def test_nf4_weight_bytes_mistakes(mistake, hint, capsys):
    check.nf4_weight_bytes(
        lambda d_out, d_in, double_quant=True: _bytes(d_out, d_in, double_quant, **mistake),
        linear4bit,
    )
    said = _said(capsys)
    assert _failed(said, 1, hint), said


def test_nf4_weight_bytes_without_double_quant_is_named(capsys):
    check.nf4_weight_bytes(
        lambda d_out, d_in, double_quant=True: _bytes(d_out, d_in, False), linear4bit
    )
    said = _said(capsys)
    assert _failed(said, 1, "size without double quantization"), said


def test_nf4_weight_bytes_right_reports_the_bits(capsys):
    check.nf4_weight_bytes(_bytes, linear4bit)
    said = _said(capsys)
    assert said.startswith("✅ Exercise 1: `nf4_weight_bytes` passes the tests."), said
    assert "double quantization saves memory from" in said


def test_nf4_weight_bytes_pays_is_checked(capsys):
    check.nf4_weight_bytes(
        lambda d_out, d_in, double_quant=True: 1, linear4bit, cases=[], pays=[((4096, 4096), True)]
    )
    said = _said(capsys)
    assert _failed(said, 1, "1 KB map"), said


# Exercise 2.


def _training_gb(config, method, dtype="bf16", batch=1, seq_len=512, r=16, checkpointing=True):
    options = {"method": method, "dtype": dtype, "batch": batch, "seq_len": seq_len}
    if method == "full":
        options["master_weights"] = dtype != "fp32"
    elif method in check.METHODS:
        options["lora_r"] = r
        options["gradient_checkpointing"] = checkpointing and method == "qlora"
    else:
        raise ValueError(method)
    return memory.estimate(config, **options).total / memory.GB


def _pick(config, gpu_gb, dtype="bf16", batch=1, seq_len=512, r=16, *, usable=0.9, last=False):
    methods = reversed(check.METHODS) if last else check.METHODS
    for method in methods:
        if _training_gb(config, method, dtype, batch, seq_len, r) <= usable * gpu_gb:
            return method
    return None


def test_qlora_without_gradient_checkpointing_is_named(capsys):
    def training_gb(config, method, dtype="bf16", batch=1, seq_len=512, r=16):
        return _training_gb(config, method, dtype, batch, seq_len, r, checkpointing=False)

    check.pick_method(training_gb, _pick)
    said = _said(capsys)
    assert _failed(said, 2, "without gradient checkpointing"), said


def test_training_gb_in_bytes_is_named(capsys):
    def training_gb(config, method, dtype="bf16", batch=1, seq_len=512, r=16):
        return _training_gb(config, method, dtype, batch, seq_len, r) * memory.GB

    check.pick_method(training_gb, _pick)
    said = _said(capsys)
    assert _failed(said, 2, "number of bytes"), said


@pytest.mark.parametrize(
    ("pick", "hint"),
    [
        (lambda *a, **k: _pick(*a, **k, usable=1.0), "Keep 10 % back"),
        (lambda *a, **k: _pick(*a, **k, last=True), "order of preference"),
    ],
)
def test_pick_method_mistakes(pick, hint, capsys):
    check.pick_method(_training_gb, pick)
    said = _said(capsys)
    assert _failed(said, 2, hint), said


def test_pick_method_right_and_an_unknown_method(capsys):
    check.pick_method(_training_gb, _pick)
    assert _said(capsys).startswith("✅ Exercise 2")
    check.pick_method(lambda config, method, **k: 1.0, _pick, cases=[("Llama-2-7B", "dora", {})])
    said = _said(capsys)
    assert _failed(said, 2, "raise a ValueError"), said


# Exercise 3.


@pytest.fixture(scope="module")
def layer():
    """A PEFT LoRA layer around an NF4 Linear4bit, B not zero (as after training)."""

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = linear4bit(48, 64)

    model = inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]), Holder()
    )
    model.train()
    with torch.no_grad():
        model.proj.lora_B["default"].weight.copy_(torch.randn(48, 4) * 0.05)
    return model.proj


def _dequantize(layer):
    weight = getattr(layer, "base_layer", layer).weight
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()


def _forward(layer, x, *, scale=True, adapter=True):
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"] if scale else 1.0
    return x @ _dequantize(layer).T + (s * (x @ A.T) @ B.T if adapter else 0)


@pytest.mark.parametrize(
    ("qlora_forward", "hint"),
    [
        (lambda layer, x: _forward(layer, x, adapter=False), "update is missing"),
        (lambda layer, x: _forward(layer, x, scale=False), "not scaled"),
        (lambda layer, x: layer(x), "called the layer"),
    ],
)
def test_qlora_forward_mistakes(qlora_forward, hint, layer, capsys):
    check.qlora_forward(_dequantize, qlora_forward, linear4bit, layer)
    said = _said(capsys)
    assert _failed(said, 3, hint), said


def test_dequantize_of_the_packed_codes_is_named(layer, capsys):
    check.qlora_forward(lambda module: module.weight.data.float(), _forward, linear4bit, layer)
    said = _said(capsys)
    assert _failed(said, 3, "quant_state.shape"), said


def test_qlora_forward_right(layer, capsys):
    check.qlora_forward(_dequantize, _forward, linear4bit, layer)
    said = _said(capsys)
    assert said.startswith("✅ Exercise 3: `dequantize` and `qlora_forward` pass the tests."), said


# Exercise 4.


def _config(quant_type, double_quant, compute_dtype, keep=(), *, head=True, nested=True):
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant and nested,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=[*keep, *(["lm_head"] if head else [])],
    )


def _save(folder):
    return lambda **shape: folder


@pytest.mark.parametrize(
    ("bnb_config", "hint"),
    [
        (lambda *a, keep=(): _config(*a, keep=keep, head=False), "LM head"),
        (lambda *a, keep=(): _config(*a, keep=keep, nested=False), "double-quantization"),
        (lambda q, d, c, keep=(): _config(q, d, c), "keeps down_proj in full precision"),
        (lambda q, d, c, keep=(): BitsAndBytesConfig(load_in_8bit=True), "4 bits"),
    ],
)
def test_bnb_config_mistakes(bnb_config, hint, folder, capsys):
    check.bnb_config(bnb_config, _save(folder), load_4bit)
    said = _said(capsys)
    assert _failed(said, 4, hint), said


def test_bnb_config_right(folder, capsys):
    check.bnb_config(lambda *a, keep=(): _config(*a, keep=keep), _save(folder), load_4bit)
    said = _said(capsys)
    assert said.startswith("✅ Exercise 4: `bnb_config` passes the tests."), said
    assert "of fp32" in said
