"""Checks for the exercises of lesson 02 (the LoRA math): forward pass, parameter counts, SVD."""

from __future__ import annotations

import torch
from torch import nn

from course_utils.exercise_checks.feedback import allclose, equal, exercise, expect, isclose
from course_utils.lora import LoRALinear, lora_parameter_count
from course_utils.memory import PRESETS, linear_layer_shapes, lora_trainable_params
from course_utils.spectrum import low_rank_approx, random_subspace_error, singular_values, tail_norm

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SMOLLM2 = PRESETS["SmolLM2-135M"]


def _lora_reference(x, W, A, B, alpha, r):
    """The course's LoRALinear loaded with W, A and B: the answer the tests expect."""
    layer = LoRALinear(nn.Linear(W.shape[1], W.shape[0], bias=False), r=r, alpha=alpha)
    with torch.no_grad():
        layer.base.weight.copy_(W)
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
        return layer(x)


def _close(a, b) -> bool:
    """Equal up to float32 rounding."""
    return allclose(a, b, atol=1e-4, rtol=1e-4)


def _check_lora_forward(lora_forward, shape_x, d_out, r, alpha, seed) -> None:
    """Compare lora_forward with the reference on random tensors; explain a mismatch."""
    g = torch.Generator().manual_seed(seed)
    d_in = shape_x[-1]
    x = torch.randn(*shape_x, generator=g)
    W = torch.randn(d_out, d_in, generator=g)
    A = torch.randn(r, d_in, generator=g)
    B = torch.randn(d_out, r, generator=g)
    copies = [t.clone() for t in (x, W, A, B)]
    got = lora_forward(x, W, A, B, alpha, r)
    expect(
        isinstance(got, torch.Tensor),
        f"lora_forward returned {type(got).__name__}, not a torch.Tensor. "
        "Hint: return the tensor h itself.",
    )
    expected = _lora_reference(x, W, A, B, alpha, r)
    expect(
        tuple(got.shape) == tuple(expected.shape),
        f"for x of shape {tuple(shape_x)} and W of shape {(d_out, d_in)} the output should have "
        f"shape {tuple(expected.shape)}, got {tuple(got.shape)}. "
        "Hint: multiplying by W.T keeps the batch dimensions of x and turns d_in into d_out.",
    )
    expect(
        all(equal(a, b) for a, b in zip(copies, (x, W, A, B))),
        "lora_forward changed one of its inputs in place. Hint: avoid += and .mul_() on x, W, A, B.",
    )
    if _close(got, expected):
        return
    update = x @ A.T @ B.T
    if _close(got, x @ W.T):
        hint = "you returned only the frozen layer's output; add the scaled LoRA update."
    elif _close(got, x @ W.T + update):
        hint = "the LoRA update is not scaled; LoRA multiplies it by alpha / r."
    elif _close(got, x @ W.T + alpha * update):
        hint = "the update is scaled by alpha alone; LoRA scales it by alpha / r."
    else:
        hint = (
            "check each term against the formula: the frozen part, then A, then B, then the scale."
        )
    expect(
        False,
        f"lora_forward gives wrong values (largest difference "
        f"{(got - expected).abs().max().item():.3g}) for r={r}, alpha={alpha}. Hint: {hint}",
    )


#: (shape of x, d_out, r, alpha, seed) of the visible test.
LORA_FORWARD_CASES = [((4, 6), 5, 2, 4.0, 1)]


@exercise(1, "lora_forward")
def lora_forward(lora_forward, cases=LORA_FORWARD_CASES) -> None:
    """Exercise 1: lora_forward(x, W, A, B, alpha, r) against the course's LoRALinear."""
    for shape_x, d_out, r, alpha, seed in cases:
        _check_lora_forward(lora_forward, shape_x, d_out, r, alpha, seed)


def _check_counts(lora_param_counts, config, r) -> None:
    """Compare lora_param_counts with the course's layer shapes; explain a mismatch."""
    counts = lora_param_counts(config, r)
    expect(
        isinstance(counts, dict),
        f"lora_param_counts returned {type(counts).__name__}, not a dict. "
        "Hint: return {'q_proj': ..., 'k_proj': ..., ...}.",
    )
    missing = sorted(set(PROJECTIONS) - set(counts))
    expect(not missing, f"lora_param_counts has no entry for {missing}. Hint: count all seven.")
    hidden = config["hidden_size"]
    for name, (d_in, d_out) in linear_layer_shapes(config).items():
        expected = lora_parameter_count(d_out, d_in, r)
        if counts[name] == expected:
            continue
        hint = "LoRA trains the two thin matrices A (r x d_in) and B (d_out x r)."
        if name in ("k_proj", "v_proj") and counts[name] == r * 2 * hidden:
            hint = (
                "k_proj and v_proj do not output hidden_size numbers: with grouped-query "
                "attention they output fewer (see the config's num_key_value_heads)."
            )
        elif config.get("head_dim") and name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            hint = "this config gives head_dim: use it instead of computing it."
        elif counts[name] in (r * d_in * d_out, d_in * d_out):
            hint = "that is the size of the full matrix; LoRA trains only A and B."
        expect(
            False,
            f"{name} with r={r}: got {counts[name]:,}, expected {expected:,} "
            f"(d_in={d_in}, d_out={d_out}). Hint: {hint}",
        )


def _check_total(lora_total, config, r, targets) -> None:
    """Compare lora_total with course_utils.memory.lora_trainable_params."""
    got = lora_total(config, r, targets)
    expected = lora_trainable_params(config, r, list(targets))
    expect(
        got == expected,
        f"lora_total(config, r={r}, targets={list(targets)}) is {got:,}, expected {expected:,}. "
        "Hint: only the targeted projections count, and every decoder layer has them.",
    )


#: (config, r, targets) of the visible tests; targets None checks lora_param_counts alone.
COUNT_CASES = [(SMOLLM2, 8, None), (SMOLLM2, 16, ["q_proj", "v_proj"]), (SMOLLM2, 16, PROJECTIONS)]


@exercise(2, "lora_param_counts", "lora_total")
def lora_param_counts(lora_param_counts, lora_total, cases=COUNT_CASES) -> str:
    """Exercise 2: the LoRA parameters per projection and in the whole model, from a config."""
    for config, r, targets in cases:
        if targets is None:
            _check_counts(lora_param_counts, config, r)
        else:
            _check_total(lora_total, config, r, targets)
    total = lora_total(SMOLLM2, 16, PROJECTIONS)
    return f"LoRA r=16 on all projections of SmolLM2: {total:,} parameters."


def _check_best_rank_r(best_rank_r, W, r) -> float:
    """Check shape, rank, values and error of best_rank_r(W, r); return ||W - W_r||_F."""
    original = W.clone()
    result = best_rank_r(W, r)
    expect(
        isinstance(result, tuple) and len(result) == 2,
        "best_rank_r must return a pair (W_r, error). Hint: return W_r, error.",
    )
    W_r, error = result
    expect(equal(W, original), "best_rank_r changed W in place. Hint: work on a copy.")
    expect(
        isinstance(W_r, torch.Tensor) and W_r.shape == W.shape,
        f"W_r must be a tensor with the shape of W {tuple(W.shape)}, got "
        f"{tuple(W_r.shape) if isinstance(W_r, torch.Tensor) else type(W_r).__name__}. "
        "Hint: U_r has r columns, diag(S_r) is r x r and Vh_r has r rows.",
    )
    sigmas = singular_values(W)
    tolerance = 1e-4 * float(sigmas[0])
    rank = int(torch.linalg.matrix_rank(W_r.double(), atol=tolerance))
    expect(
        rank <= r,
        f"W_r has rank {rank}, but a rank-{r} approximation may have rank at most {r}. "
        "Hint: keep only r singular values with their r columns of U and r rows of Vh.",
    )
    actual = float(torch.linalg.matrix_norm((W - W_r).double()))
    expect(
        isclose(float(error), actual, rel_tol=1e-4, abs_tol=tolerance),
        f"error is {float(error):.6g} but ||W - W_r||_F is {actual:.6g}. "
        "Hint: the error is the Frobenius norm of the difference, not its square.",
    )
    optimal = tail_norm(sigmas, r)  # Eckart–Young: the norm of the singular values left out
    expect(
        isclose(actual, optimal, rel_tol=1e-4, abs_tol=tolerance),
        f"||W - W_r||_F is {actual:.6g}, but the best rank-{r} approximation has error "
        f"{optimal:.6g}. Hint: keep the r LARGEST singular values (torch.linalg.svd sorts them "
        "in decreasing order) together with their singular vectors.",
    )
    expect(
        allclose(W_r.double(), low_rank_approx(W, r), atol=tolerance),
        "W_r has the right error but not the right entries. "
        "Hint: rebuild W_r from U, S and Vh in that order, as the SVD writes W.",
    )
    return actual


def _visible_matrix() -> torch.Tensor:
    """The 12 x 8 matrix of the visible test."""
    return torch.randn(12, 8, generator=torch.Generator().manual_seed(0))


@exercise(3, "best_rank_r")
def best_rank_r(best_rank_r, cases=None) -> str | None:
    """Exercise 3: best_rank_r(W, r) against the SVD's best approximation (Eckart–Young).

    `cases` is a list of (W, r, largest allowed error or None); without it, the visible test.
    """
    if cases is not None:
        for W, r, at_most in cases:
            error = _check_best_rank_r(best_rank_r, W, r)
            if at_most is not None:
                expect(
                    error <= at_most,
                    f"a rank-{r} matrix must be recovered exactly, error {error:.3g}.",
                )
        return None
    W = _visible_matrix()
    errors = {r: _check_best_rank_r(best_rank_r, W, r) for r in (1, 3, 8)}
    expect(errors[1] > errors[3] > errors[8], "the error must shrink as r grows.")
    return "\n".join(
        f"r={r}: SVD error {err:.3f}, a random rank-{r} subspace {random_subspace_error(W, r):.3f}"
        for r, err in errors.items()
    )
