"""Why a low-rank update is enough: singular values, Eckart-Young, and a real fine-tuning ΔW.

Lesson 02.

Every matrix M (d x k) has a singular value decomposition M = U diag(σ) V^T with
σ_1 >= σ_2 >= ... >= 0. Keeping only the r largest terms gives M_r, and the Eckart-Young
theorem (1936) says no rank-r matrix is closer to M in Frobenius norm:

    ||M - M_r||_F = sqrt(σ_{r+1}^2 + σ_{r+2}^2 + ...)   (the "tail")

The fraction of the squared norm that the top r values carry, Σ_{i<=r} σ_i^2 / Σ σ_i^2, is the
"energy captured" by rank r. If the update that fine-tuning makes to a weight matrix,
ΔW = W_after - W_before, has most of its energy in a few directions, a rank-r product B A can
stand in for it: that is the bet LoRA makes.

    result = short_full_finetune(model, tokenizer, texts, steps=20)   # trains a copy
    sigmas = singular_values(result.deltas["model.layers.0.self_attn.q_proj"])
    energy_captured(sigmas, 8)                                          # e.g. 0.4 = 40 %

All the linear algebra here runs in float64 on the CPU, so the identities hold to ~1e-12.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from numbers import Integral, Real

import torch
from torch import nn
from tqdm.auto import tqdm

from .checks import positive_int

__all__ = [
    "FineTuneResult",
    "energy_captured",
    "energy_curve",
    "low_rank_approx",
    "random_subspace_error",
    "reconstruction_error",
    "short_full_finetune",
    "singular_values",
    "tail_norm",
]


# -----------------------------------------------------------------------------
# Argument checks: one sentence saying what is wrong and what to do.


def _as_matrix(matrix: object, name: str = "matrix") -> torch.Tensor:
    """Return a 2-D, finite, float64 CPU copy of a tensor or array, else raise."""
    if not isinstance(matrix, torch.Tensor):
        try:
            import numpy as np
        except ImportError:  # pragma: no cover - numpy comes with torch here
            np = None
        if np is not None and isinstance(matrix, np.ndarray):
            matrix = torch.from_numpy(matrix)
        else:
            raise TypeError(
                f"{name} must be a torch.Tensor or a numpy array (got {type(matrix).__name__}); "
                "pass e.g. layer.weight.detach()."
            )
    if matrix.ndim != 2 or min(matrix.shape) == 0:
        raise ValueError(
            f"{name} must be a non-empty 2-D matrix (got shape {tuple(matrix.shape)}); "
            "pass one weight matrix, e.g. a d_out x d_in ΔW."
        )
    if matrix.is_complex() or matrix.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers (got {matrix.dtype}); pass floats.")
    result = matrix.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(result).all():
        raise ValueError(f"{name} contains NaN or inf; check the training run that produced it.")
    return result


def _as_sigmas(sigmas: object) -> torch.Tensor:
    """Return singular values as a float64 1-D tensor sorted largest first, else raise."""
    if isinstance(sigmas, list | tuple):
        sigmas = torch.tensor(sigmas, dtype=torch.float64)
    if not isinstance(sigmas, torch.Tensor):
        try:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"sigmas must be a 1-D tensor of singular values (got {type(sigmas).__name__}); "
                "get them with singular_values(matrix)."
            ) from None
    if sigmas.ndim != 1 or sigmas.numel() == 0:
        raise ValueError(
            f"sigmas must be a non-empty 1-D tensor (got shape {tuple(sigmas.shape)}); "
            "get them with singular_values(matrix)."
        )
    sigmas = sigmas.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(sigmas).all() or (sigmas < 0).any():
        raise ValueError(
            "sigmas must be finite and non-negative; get them with singular_values(matrix)."
        )
    return torch.sort(sigmas, descending=True).values


def check_rank(r: object, max_rank: int, what: str = "the matrix") -> int:
    """Return r if 1 <= r <= max_rank, else raise a message that names the valid range."""
    if isinstance(r, bool) or not isinstance(r, Integral):
        raise TypeError(
            f"r must be an integer (got {r!r}); pick a rank between 1 and {max_rank}, e.g. r=8."
        )
    if not 1 <= r <= max_rank:
        raise ValueError(
            f"r must be between 1 and {max_rank}, the largest rank {what} can have (got {r}); "
            f"pick r in that range, e.g. r={min(8, max_rank)}."
        )
    return int(r)


# -----------------------------------------------------------------------------
# Singular values and the best rank-r approximation.


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of a matrix, largest first, as a float64 CPU tensor."""
    return torch.linalg.svdvals(_as_matrix(matrix))


def energy_captured(sigmas: torch.Tensor, r: int) -> float:
    """Fraction of Σσ² carried by the r largest singular values (1.0 at full rank)."""
    sigmas = _as_sigmas(sigmas)
    r = check_rank(r, sigmas.numel(), "these singular values")
    energy = sigmas.square()
    total = energy.sum()
    if total == 0:
        raise ValueError("all singular values are zero, so there is no energy to capture.")
    return float(energy[:r].sum() / total)


def energy_curve(sigmas: torch.Tensor) -> torch.Tensor:
    """Energy captured for every rank r = 1 .. len(sigmas), as a float64 tensor."""
    sigmas = _as_sigmas(sigmas)
    energy = sigmas.square()
    total = energy.sum()
    if total == 0:
        raise ValueError("all singular values are zero, so there is no energy to capture.")
    return torch.cumsum(energy, 0) / total


def tail_norm(sigmas: torch.Tensor, r: int) -> float:
    """sqrt(σ_{r+1}² + σ_{r+2}² + ...): the Eckart-Young error of the best rank-r approximation."""
    sigmas = _as_sigmas(sigmas)
    r = check_rank(r, sigmas.numel(), "these singular values")
    return float(sigmas[r:].square().sum().sqrt())


def low_rank_approx(matrix: torch.Tensor, r: int) -> torch.Tensor:
    """Best rank-r approximation U_r diag(σ_r) V_r^T (truncated SVD), float64 on the CPU."""
    m = _as_matrix(matrix)
    r = check_rank(r, min(m.shape))
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def reconstruction_error(matrix: torch.Tensor, r: int, relative: bool = False) -> float:
    """||M - M_r||_F computed from the truncated SVD itself (divided by ||M||_F if relative)."""
    if not isinstance(relative, bool):
        raise TypeError(f"relative must be True or False (got {relative!r}).")
    m = _as_matrix(matrix)
    error = float(torch.linalg.matrix_norm(m - low_rank_approx(m, r)))
    if relative:
        norm = float(torch.linalg.matrix_norm(m))
        if norm == 0:
            raise ValueError("the matrix is all zeros, so a relative error is undefined.")
        error /= norm
    return error


def random_subspace_error(matrix: torch.Tensor, r: int, seed: int = 0) -> float:
    """||M - Q Q^T M||_F for a random r-dimensional column space Q: a rank-r rival to the SVD."""
    m = _as_matrix(matrix)
    r = check_rank(r, min(m.shape))
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer (got {seed!r}); try seed=0.")
    generator = torch.Generator().manual_seed(int(seed))
    q, _ = torch.linalg.qr(torch.randn(m.shape[0], r, generator=generator, dtype=torch.float64))
    return float(torch.linalg.matrix_norm(m - q @ (q.T @ m)))


# -----------------------------------------------------------------------------
# A short full fine-tune that hands back ΔW = W_after - W_before.


@dataclass
class FineTuneResult:
    """What short_full_finetune measured: ΔW per module, losses, and the time it took."""

    deltas: dict[str, torch.Tensor]
    losses: list[float]
    eval_loss_before: float
    eval_loss_after: float
    seconds: float
    settings: dict = field(default_factory=dict)


def _blocks(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Tokenize the texts, join them with EOS and cut the stream into rows of seq_len tokens."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    n_blocks = len(ids) // seq_len
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


@torch.no_grad()
def _mean_loss(model: nn.Module, batches: list[torch.Tensor], device: torch.device) -> float:
    """Average next-token loss of the model over some batches."""
    losses = [float(model(input_ids=b.to(device), labels=b.to(device)).loss) for b in batches]
    return sum(losses) / len(losses)


def short_full_finetune(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    steps: int,
    *,
    lr: float = 2e-5,
    batch_size: int = 4,
    seq_len: int = 64,
    modules: tuple[str, ...] | list[str] = ("q_proj", "v_proj"),
    seed: int = 0,
    progress: bool = True,
) -> FineTuneResult:
    """Fully fine-tune an fp32 copy of `model` with AdamW; return ΔW of the chosen Linear layers.

    The model you pass is not changed: a deep copy is trained (in float32 even when the model is
    bf16/fp16, so that tiny updates are not rounded away). The texts are tokenized, joined and cut
    into blocks of `seq_len` tokens; one batch of blocks is held out to measure the loss before
    and after, the other blocks are shuffled (with `seed`) and used in turn for `steps` steps.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module (got {type(model).__name__}); pass the loaded model."
        )
    if not callable(tokenizer) or not hasattr(tokenizer, "eos_token_id"):
        raise TypeError("tokenizer must be a transformers tokenizer; pass load_tokenizer().")
    if isinstance(texts, str) or not isinstance(texts, list | tuple) or not texts:
        raise ValueError("texts must be a non-empty list of strings; e.g. [text1, text2].")
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("every entry of texts must be a string; convert them with str().")
    steps = positive_int(steps, "steps", "steps=20")
    batch_size = positive_int(batch_size, "batch_size", "batch_size=4")
    seq_len = positive_int(seq_len, "seq_len", "seq_len=64")
    if isinstance(lr, bool) or not isinstance(lr, Real) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number (got {lr!r}); try lr=2e-5.")
    if isinstance(modules, str) or not isinstance(modules, list | tuple) or not modules:
        raise ValueError(
            f"modules must be a non-empty list of layer names (got {modules!r}); "
            "try ['q_proj', 'v_proj']."
        )

    blocks = _blocks(tokenizer, list(texts), seq_len)
    if blocks.shape[0] < 2 * batch_size:
        raise ValueError(
            f"the texts give only {blocks.shape[0]} blocks of {seq_len} tokens, but one held-out "
            f"batch and one training batch need {2 * batch_size}; pass more text or lower seq_len."
        )
    generator = torch.Generator().manual_seed(seed)
    blocks = blocks[torch.randperm(blocks.shape[0], generator=generator)]
    eval_batch, train_blocks = blocks[:batch_size], blocks[batch_size:]

    device = next(model.parameters()).device
    work = copy.deepcopy(model).to(dtype=torch.float32)
    for param in work.parameters():
        param.requires_grad_(True)
    names = [
        n
        for n, m in work.named_modules()
        if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in modules)
    ]
    if not names:
        suffixes = sorted(
            {n.rsplit(".", 1)[-1] for n, m in work.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ValueError(
            f"no nn.Linear module name ends with any of {list(modules)}; pick from {suffixes[:20]}."
        )
    before = {n: work.get_submodule(n).weight.detach().float().cpu().clone() for n in names}

    started = time.perf_counter()
    work.eval()  # no dropout: the same data gives the same ΔW
    eval_loss_before = _mean_loss(work, [eval_batch], device)
    optimizer = torch.optim.AdamW(work.parameters(), lr=float(lr), weight_decay=0.0)
    losses: list[float] = []
    for step in tqdm(range(steps), desc="full fine-tune", disable=not progress):
        start = (step * batch_size) % max(1, train_blocks.shape[0] - batch_size + 1)
        batch = train_blocks[start : start + batch_size].to(device)
        loss = work(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(work.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    eval_loss_after = _mean_loss(work, [eval_batch], device)
    seconds = time.perf_counter() - started

    deltas = {n: work.get_submodule(n).weight.detach().float().cpu() - before[n] for n in names}
    del work, optimizer
    return FineTuneResult(
        deltas=deltas,
        losses=losses,
        eval_loss_before=eval_loss_before,
        eval_loss_after=eval_loss_after,
        seconds=seconds,
        settings={
            "steps": steps,
            "lr": float(lr),
            "batch_size": batch_size,
            "seq_len": seq_len,
            "train_blocks": int(train_blocks.shape[0]),
            "device": str(device),
        },
    )
