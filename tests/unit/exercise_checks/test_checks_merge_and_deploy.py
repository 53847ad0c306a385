"""Lesson 14's exercise checks: the usual mistakes get the hint that names them."""

import math
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model

from course_utils import assets, memory
from course_utils.exercise_checks import merge_and_deploy as check


@pytest.fixture(autouse=True)
def _learner(monkeypatch):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)


def _said(capsys) -> str:
    return capsys.readouterr().out.strip()


# Exercise 1: bytes on disk ------------------------------------------------------------------


def _adapter(config, r, targets):
    return memory.lora_trainable_params(config, r, targets) * 4


def _payload(path):
    with open(path, "rb") as file:
        n = int.from_bytes(file.read(8), "little")
    return os.path.getsize(path) - 8 - n


def _saved(config, r, targets, dtype):
    return _adapter(config, r, targets), memory.count_params(config) * dtype.itemsize


@pytest.mark.parametrize(
    ("saved", "payload", "hint"),
    [
        (  # A and B in the base model's dtype
            lambda c, r, t, dtype: (
                memory.lora_trainable_params(c, r, t) * dtype.itemsize,
                memory.count_params(c) * dtype.itemsize,
            ),
            _payload,
            "PEFT keeps A and B in fp32",
        ),
        (  # the tied LM head counted a second time
            lambda c, r, t, dtype: (
                _adapter(c, r, t),
                (memory.count_params(c) + c["vocab_size"] * c["hidden_size"]) * dtype.itemsize,
            ),
            _payload,
            "tied to the embeddings",
        ),
        (lambda c, r, t, dtype: list(_saved(c, r, t, dtype)), _payload, "a tuple of two ints"),
        (_saved, os.path.getsize, "that is the whole file"),
        (_saved, lambda path: os.path.getsize(path) - 8, "leave out the JSON header too"),
        (
            _saved,
            lambda path: (
                os.path.getsize(path) - 8 - int.from_bytes(open(path, "rb").read(8), "big")
            ),
            "little-endian",
        ),
    ],
)
def test_saved_bytes_mistakes(saved, payload, hint, capsys):
    check.saved_bytes(saved, payload)
    said = _said(capsys)
    assert said.startswith("❌ Exercise 1") and hint in said and "Hint:" in said, said


def test_saved_bytes_right(capsys):
    check.saved_bytes(_saved, _payload)
    said = _said(capsys).splitlines()
    assert said[0] == "✅ Exercise 1: `saved_bytes` and `payload_bytes` pass the tests."
    assert said[1].startswith("adapter_model.safetensors") and "SmolLM2-135M" in said[3]


def test_saved_bytes_preset_case(capsys):
    check.saved_bytes(_saved, _payload, cases=[("Llama-2-7B", 8, ["q_proj"], torch.float16, False)])
    assert _said(capsys).startswith("✅ Exercise 1")


# Exercise 2: combined adapters --------------------------------------------------------------


def _present(layer, adapters, weights):
    return [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]


def _exact(layer, adapters, weights, scaled=True):
    s = layer.scaling
    return sum(
        (w * s[a] if scaled else w) * layer.lora_B[a].weight @ layer.lora_A[a].weight
        for a, w in _present(layer, adapters, weights)
    )


def _right(layer, adapters, weights, combination_type, svd_rank=None):
    present = _present(layer, adapters, weights)
    if combination_type == "linear":
        s = layer.scaling
        roots = {a: math.sqrt(abs(w * s[a])) for a, w in present}
        B = sum(roots[a] * layer.lora_B[a].weight for a, _ in present)
        A = sum(math.copysign(roots[a], w * s[a]) * layer.lora_A[a].weight for a, w in present)
        return B @ A
    total = _exact(layer, adapters, weights)
    if combination_type == "svd":
        rank = svd_rank or max(layer.r[a] for a, _ in present)
        U, S, Vh = torch.linalg.svd(total, full_matrices=False)
        return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
    if combination_type != "cat":
        raise ValueError(combination_type)
    return total


def _linear_as_sum(layer, adapters, weights, combination_type, svd_rank=None):
    if combination_type == "linear":
        return _exact(layer, adapters, weights)
    return _right(layer, adapters, weights, combination_type, svd_rank)


def _unscaled(layer, adapters, weights, combination_type, svd_rank=None):
    return _exact(layer, adapters, weights, scaled=False)


def _untruncated(layer, adapters, weights, combination_type, svd_rank=None):
    if combination_type == "svd":
        return _exact(layer, adapters, weights)
    return _right(layer, adapters, weights, combination_type, svd_rank)


def _every_adapter(layer, adapters, weights, combination_type, svd_rank=None):
    return sum(
        w * layer.scaling[a] * layer.lora_B[a].weight @ layer.lora_A[a].weight
        for a, w in zip(adapters, weights)
    )


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        (_unscaled, "scale each update by its adapter's scaling"),
        (_untruncated, "truncate the sum"),
        (_linear_as_sum, "'linear' does not add the updates"),
        (_every_adapter, "an adapter that does not target a layer adds nothing"),
    ],
)
def test_combined_delta_mistakes(answer, hint, capsys):
    check.combined_delta(answer)
    said = _said(capsys)
    assert said.startswith("❌ Exercise 2") and hint in said, said


def test_combined_delta_right_and_rejects(capsys):
    check.combined_delta(_right)
    assert _said(capsys).splitlines()[0] == "✅ Exercise 2: `combined_delta` passes the tests."
    model = get_peft_model(
        assets.tiny_llama(seed=1),
        LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"),
        adapter_name="rentals",
    )
    model.add_adapter("docs", LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    cases = [(model, ["rentals", "docs"], [1.0, 1.0], "cat", None)]
    check.combined_delta(lambda *args: _exact(*args[:3]), cases=cases, rejects=["ties"])
    assert "instead of raising ValueError" in _said(capsys)


# Exercise 3: the rotary permutation and llama.cpp's RoPE ------------------------------------


def _permute(weight, n_head):
    half = weight.shape[0] // n_head // 2
    heads = weight.reshape(n_head, 2, half, *weight.shape[1:])
    return heads.swapaxes(1, 2).reshape(weight.shape).copy()


def _unpermute(weight, n_head):
    half = weight.shape[0] // n_head // 2
    heads = weight.reshape(n_head, half, 2, *weight.shape[1:])
    return heads.swapaxes(1, 2).reshape(weight.shape).copy()


def _rope(x, positions, theta=10000.0, sign=1.0, interleave=True):
    d = x.shape[-1]
    angles = positions.float()[:, None] * theta ** (-torch.arange(0, d, 2).float() / d)
    cos, sin = angles.cos(), sign * angles.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    first, second = even * cos - odd * sin, even * sin + odd * cos
    if interleave:
        return torch.stack((first, second), dim=-1).flatten(-2)
    return torch.cat((first, second), dim=-1)


def _rope_halves(x, positions, theta=10000.0):
    """RoPE with Hugging Face's pairs (i, i + d/2) on llama.cpp's layout: the wrong convention."""
    d = x.shape[-1]
    angles = positions.float()[:, None] * theta ** (-torch.arange(0, d, 2).float() / d)
    cos, sin = angles.cos(), angles.sin()
    first, second = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


@pytest.mark.parametrize(
    ("permute", "unpermute", "rope", "hint"),
    [
        (_unpermute, _unpermute, _rope, "that is the inverse"),
        (lambda w, n: _permute(w, 1), _unpermute, _rope, "reorder inside each head"),
        (_permute, _permute, _rope, "reorders the rows once more"),
        (_permute, _unpermute, _rope_halves, "llama.cpp rotates neighbours"),
        (_permute, _unpermute, lambda x, p, t: _rope(x, p, t, sign=-1.0), "not -phi"),
        (
            _permute,
            _unpermute,
            lambda x, p, t: _rope(x, p, t, interleave=False),
            "keep each rotated pair next to each other",
        ),
        (_permute, _unpermute, lambda x, p, t: _rope(x, p), "use the theta given"),
    ],
)
def test_rotary_mistakes(permute, unpermute, rope, hint, capsys):
    cases = [*check.ROTARY_CASES[:5], ("rope", (2, 3, 8), range(3), 500000.0)]
    check.permute_for_gguf(permute, unpermute, rope, cases=cases)
    said = _said(capsys)
    assert said.startswith("❌ Exercise 3") and hint in said, said


def test_rotary_stubs_are_not_answered_yet(capsys):
    def stub(*args):
        raise NotImplementedError()

    check.permute_for_gguf(stub, stub, stub)
    assert _said(capsys).startswith("⏳ Exercise 3 is not answered yet")


def test_rotary_right(capsys):
    check.permute_for_gguf(_permute, _unpermute, _rope)
    said = _said(capsys).splitlines()
    assert said[0].startswith("✅ Exercise 3") and "differ by" in said[1]
