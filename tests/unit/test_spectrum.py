"""Tests for course_utils.spectrum: SVD, Eckart-Young and the short full fine-tune."""

import math

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from course_utils import assets
from course_utils.spectrum import (
    energy_captured,
    energy_curve,
    low_rank_approx,
    random_subspace_error,
    reconstruction_error,
    short_full_finetune,
    singular_values,
    tail_norm,
)


def matrix(d_out: int = 30, d_in: int = 20, seed: int = 0) -> torch.Tensor:
    """A random float32 matrix with a decaying spectrum, like a real ΔW."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, d_in, generator=g))
    v, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g))
    sigmas = 0.7 ** torch.arange(d_in, dtype=torch.float32)
    return (u * sigmas) @ v.T


# -----------------------------------------------------------------------------
# Singular values and energy


def test_singular_values_sorted_float64_and_match_numpy():
    m = matrix()
    s = singular_values(m)
    assert s.dtype == torch.float64 and s.shape == (20,)
    assert torch.all(s[:-1] >= s[1:])
    np.testing.assert_allclose(s.numpy(), np.linalg.svd(m.double().numpy(), compute_uv=False))
    torch.testing.assert_close(s, 0.7 ** torch.arange(20, dtype=torch.float64), atol=1e-6, rtol=0)


def test_singular_values_accept_numpy():
    m = matrix()
    torch.testing.assert_close(singular_values(m.numpy()), singular_values(m))


def test_energy_monotone_and_one_at_full_rank():
    s = singular_values(matrix())
    values = [energy_captured(s, r) for r in range(1, 21)]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(1.0, abs=1e-12)
    assert values[0] == pytest.approx(1 / sum(0.49**i for i in range(20)), rel=1e-6)
    torch.testing.assert_close(energy_curve(s), torch.tensor(values, dtype=torch.float64))


def test_energy_sorts_unsorted_sigmas():
    assert energy_captured([1.0, 3.0, 2.0], 1) == pytest.approx(9 / 14)


# -----------------------------------------------------------------------------
# Eckart-Young


@pytest.mark.parametrize("shape", [(30, 20), (20, 30), (12, 12)])
def test_eckart_young_error_is_tail_norm(shape):
    m = matrix(*shape, seed=sum(shape)) if shape[0] >= shape[1] else matrix(*shape[::-1]).T
    s = singular_values(m)
    for r in range(1, min(shape) + 1):
        direct = reconstruction_error(m, r)
        assert direct == pytest.approx(tail_norm(s, r), abs=1e-10)
        assert direct == pytest.approx(math.sqrt(float((s[r:] ** 2).sum())), abs=1e-10)
    assert reconstruction_error(m, min(shape)) < 1e-10


def test_truncated_svd_beats_random_rank_r_approximations():
    m = matrix()
    for r in (1, 3, 8):
        best = reconstruction_error(m, r)
        rivals = [random_subspace_error(m, r, seed=seed) for seed in range(20)]
        assert all(best <= rival + 1e-12 for rival in rivals)
        assert min(rivals) > best * 1.01  # a random subspace really is worse, not just equal
        # Another rival: a random rank-r product B A, fitted by least squares given A.
        g = torch.Generator().manual_seed(r)
        a = torch.randn(r, m.shape[1], generator=g, dtype=torch.float64)
        b = torch.linalg.lstsq(a.T, m.double().T).solution.T
        assert best <= float(torch.linalg.matrix_norm(m.double() - b @ a)) + 1e-12


def test_low_rank_approx_has_rank_r_and_relative_error():
    m = matrix()
    approx = low_rank_approx(m, 4)
    assert approx.shape == m.shape and approx.dtype == torch.float64
    assert torch.linalg.matrix_rank(approx).item() == 4
    rel = reconstruction_error(m, 4, relative=True)
    assert rel == pytest.approx(reconstruction_error(m, 4) / float(m.double().norm()))
    assert rel == pytest.approx(math.sqrt(1 - energy_captured(singular_values(m), 4)), abs=1e-10)


# -----------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize("r", [0, -1, 21])
def test_bad_rank_raises_value_error_with_range(r):
    m = matrix()
    for call in (
        lambda: low_rank_approx(m, r),
        lambda: reconstruction_error(m, r),
        lambda: energy_captured(singular_values(m), r),
        lambda: tail_norm(singular_values(m), r),
        lambda: random_subspace_error(m, r),
    ):
        with pytest.raises(ValueError, match="r must be between 1 and 20"):
            call()


def test_bad_types_and_shapes():
    with pytest.raises(TypeError, match="r must be an integer"):
        low_rank_approx(matrix(), 2.0)
    with pytest.raises(TypeError, match="torch.Tensor or a numpy array"):
        singular_values([[1.0, 2.0]])
    with pytest.raises(ValueError, match="2-D matrix"):
        singular_values(torch.ones(3))
    with pytest.raises(ValueError, match="NaN or inf"):
        singular_values(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="non-negative"):
        energy_captured(torch.tensor([1.0, -1.0]), 1)
    with pytest.raises(ValueError, match="all singular values are zero"):
        energy_captured(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="all zeros"):
        reconstruction_error(torch.zeros(3, 3), 1, relative=True)


# -----------------------------------------------------------------------------
# The short full fine-tune


class CharTokenizer:
    """A stand-in tokenizer: one token per character (ids < 128), EOS = 0."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 127 for c in text]}


def tiny_llama() -> LlamaForCausalLM:
    """A 2-layer Llama with a 128-token vocabulary, built from a config."""
    return assets.tiny_llama(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ).eval()


TEXTS = ["the quick brown fox jumps over the lazy dog. " * 8, "abcabcabc " * 30]


def test_short_full_finetune_returns_deltas_and_leaves_model_alone():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = short_full_finetune(
        model, CharTokenizer(), TEXTS, steps=6, lr=1e-2, batch_size=2, seq_len=16, progress=False
    )
    assert sorted(result.deltas) == [
        f"model.layers.{i}.self_attn.{m}_proj" for i in range(2) for m in ("q", "v")
    ]
    assert result.deltas["model.layers.0.self_attn.q_proj"].shape == (32, 32)
    assert result.deltas["model.layers.0.self_attn.v_proj"].shape == (16, 32)  # 2 kv heads of 8
    assert all(d.abs().max() > 0 for d in result.deltas.values())
    assert len(result.losses) == 6 and result.seconds > 0
    assert result.eval_loss_after < result.eval_loss_before
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_short_full_finetune_is_deterministic_and_follows_lr():
    kwargs = {"steps": 2, "batch_size": 2, "seq_len": 16, "progress": False}
    a = short_full_finetune(tiny_llama(), CharTokenizer(), TEXTS, lr=1e-3, **kwargs)
    b = short_full_finetune(tiny_llama(), CharTokenizer(), TEXTS, lr=1e-3, **kwargs)
    small = short_full_finetune(tiny_llama(), CharTokenizer(), TEXTS, lr=1e-5, **kwargs)
    name = "model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(a.deltas[name], b.deltas[name], atol=0, rtol=0)
    # Adam moves each weight by about lr per step: 100x smaller lr, ~100x smaller ΔW.
    ratio = float(a.deltas[name].norm() / small.deltas[name].norm())
    assert 30 < ratio < 300


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"steps": 0}, ValueError, "steps must be a positive integer"),
        ({"lr": -1.0}, ValueError, "lr must be a positive number"),
        ({"modules": "q_proj"}, ValueError, "modules must be a non-empty list"),
        ({"modules": ["nope"]}, ValueError, "pick from"),
        ({"seq_len": 4096}, ValueError, "pass more text or lower seq_len"),
        ({"texts": "one string"}, ValueError, "texts must be a non-empty list"),
    ],
)
def test_short_full_finetune_rejects_bad_arguments(kwargs, error, match):
    arguments = {"texts": TEXTS, "steps": 1, "progress": False} | kwargs
    texts = arguments.pop("texts")
    with pytest.raises(error, match=match):
        short_full_finetune(tiny_llama(), CharTokenizer(), texts, **arguments)
