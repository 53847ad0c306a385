"""Which loss is fastest? The output layer and the cross-entropy raced alone, on SmolLM2's head.

``python -m course_tools.bench loss`` (part of ``make bench``) runs SmolLM2 once over
batch x seq_len tokens of the Python reference, keeps the hidden states its last layer hands
to the output layer, and then times only the loss *and its backward pass* on those tensors,
three ways:

* ``standard``: what ``LlamaForCausalLM`` does with labels: every logit, then transformers'
  ``ForCausalLMLoss`` (the logits, their log-probabilities and its gradient all alive);
* ``chunked_nll``: TRL 1.14's default, ``_chunked_cross_entropy_loss`` with TRL's chunk size,
  which recomputes each chunk in the backward pass;
* ``fused``: the labs' loss, :func:`course_utils.fused_loss.linear_cross_entropy`.

Each runs with the head frozen (LoRA and QLoRA: only the hidden states get a gradient) and
with the head training (full fine-tuning). The calls are interleaved, one of each per round,
and the median round is kept, so a drift of the machine's speed hits every loss alike. The
peak bytes of live tensors come from a separate, untimed call under
:class:`course_tools.bench.PeakMemory`. Before any timing the three losses and their gradients
are checked against each other: a loss that computes something else stops the bench.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers.loss.loss_utils import ForCausalLMLoss
from trl.trainer import sft_trainer

from course_utils import env, fused_loss
from course_utils.assets import load_tokenizer
from course_utils.checks import one_of, positive_int
from course_utils.peak_memory import PeakMemory

from .common import MODELS, machine
from .training import blocks, load_base

__all__ = ["HEADS", "LOSSES", "LOSS_FUNCTIONS", "check_agreement", "format_table", "race", "run"]

#: The losses raced, in the order they are printed.
LOSSES = ("standard", "chunked_nll", "fused")
#: A frozen head (LoRA, QLoRA) or a trained one (full fine-tuning of the tied embedding).
HEADS = ("frozen", "trained")


def _standard(hidden, weight, labels):
    """LlamaForCausalLM's loss: all the logits, then transformers' ForCausalLMLoss."""
    return ForCausalLMLoss(hidden @ weight.T, labels, vocab_size=weight.shape[0])


def _chunked_nll(hidden, weight, labels):
    """TRL's default loss for SFTTrainer, with TRL's own chunk size."""
    chunk = sft_trainer._CHUNKED_LM_HEAD_CHUNK_SIZE
    return sft_trainer._chunked_cross_entropy_loss(hidden, weight, chunk, labels=labels)[0]


def _fused(hidden, weight, labels):
    """The labs' loss, course_utils.fused_loss, with its own chunk size."""
    parts = fused_loss.linear_cross_entropy(hidden[:, :-1], weight, labels[:, 1:])
    return parts.loss_sum / parts.n_valid


LOSS_FUNCTIONS: dict[str, Callable] = {
    "standard": _standard,
    "chunked_nll": _chunked_nll,
    "fused": _fused,
}


def _loss_and_grads(name: str, hidden, weight, labels, head: str):
    """One loss and its backward pass: (loss, grad of hidden, grad of weight or None)."""
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_(head == "trained")
    loss = LOSS_FUNCTIONS[name](h, w, labels)
    grads = torch.autograd.grad(loss, (h, w) if head == "trained" else (h,))
    return loss.detach(), grads[0], grads[1] if head == "trained" else None


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| over the largest |b| (0 when both are zero)."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale else (a - b).abs().max().item()


def check_agreement(hidden, weight, labels, tolerance: float = 1e-4) -> dict[str, float]:
    """Raise unless every loss gives the standard loss's value and gradients; return the gaps."""
    gaps: dict[str, float] = {}
    ref = _loss_and_grads("standard", hidden, weight, labels, "trained")
    for name in LOSSES[1:]:
        got = _loss_and_grads(name, hidden, weight, labels, "trained")
        gaps[name] = max(_relative_gap(g, r) for g, r in zip(got, ref, strict=True))
        if gaps[name] > tolerance:
            raise AssertionError(
                f"the {name} loss differs from the standard one by {gaps[name]:.1e} (relative, "
                f"over loss and gradients; allowed {tolerance:.0e}): it computes something else."
            )
    return gaps


def _peak_mb(name: str, hidden, weight, labels, head: str) -> float:
    """Peak MB of live tensors during one loss + backward (untimed)."""
    with PeakMemory(hidden.device) as peak:
        _loss_and_grads(name, hidden, weight, labels, head)
    return peak.peak / 2**20


def race(hidden, weight, labels, *, rounds: int = 5, heads: Sequence[str] = HEADS) -> list[dict]:
    """Time each loss + backward `rounds` times, interleaved; one row per (head, loss)."""
    positive_int(rounds, "rounds", "rounds=3")
    heads = [one_of(head, "head", HEADS) for head in heads]
    rows = []
    for head in heads:
        seconds: dict[str, list[float]] = {name: [] for name in LOSSES}
        for name in LOSSES:  # warm-up: first calls pay for page faults and lazy set-up
            _loss_and_grads(name, hidden, weight, labels, head)
        for _ in range(rounds):
            for name in LOSSES:
                started = time.perf_counter()
                _loss_and_grads(name, hidden, weight, labels, head)
                seconds[name].append(time.perf_counter() - started)
        for name in LOSSES:
            rows.append(
                {
                    "head": head,
                    "loss": name,
                    "median_s": statistics.median(seconds[name]),
                    "min_s": min(seconds[name]),
                    "seconds": seconds[name],
                    "peak_mb": _peak_mb(name, hidden, weight, labels, head),
                }
            )
        standard = rows[-len(LOSSES)]["median_s"]
        for row in rows[-len(LOSSES) :]:
            row["speedup"] = standard / row["median_s"]
    return rows


def _hidden_states(model_name: str, batch: int, seq_len: int):
    """SmolLM2's (or the tiny Llama's) last hidden states on Python-reference blocks."""
    tokenizer = load_tokenizer()
    model = load_base(model_name, "full", tokenizer, torch.device("cpu"))
    rows = blocks(tokenizer, batch, seq_len)
    ids = torch.tensor(rows["input_ids"])
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state
    weight = model.get_output_embeddings().weight.detach().clone()
    return hidden.float(), weight.float(), torch.tensor(rows["labels"])


def format_table(rows: Sequence[dict], info: dict) -> str:
    """The race as markdown: one row per head and loss, with the speed-up over the standard."""
    lines = [
        "# make bench: the loss alone",
        "",
        f"Machine: {', '.join(f'{k} {v}' for k, v in info['machine'].items())}.",
        "",
        f"{info['model']}: hidden states of {info['batch']} x {info['seq_len']} tokens of the "
        f"Python reference, vocabulary {info['vocab']:,}; loss + backward pass, median of "
        f"{info['rounds']} interleaved rounds after a warm-up; peak of live tensors from a "
        "separate call. All three losses agree with the standard one to "
        f"{max(info['gaps'].values()):.0e} (loss and gradients, relative).",
        "",
        "| head | loss | median s | fastest s | vs standard | peak MB |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['head']} | {row['loss']} | {row['median_s']:.3f} | {row['min_s']:.3f} | "
            f"{row['speedup']:.2f}x | {row['peak_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def run(
    out: Path | str = Path("bench/results"),
    *,
    model: str = "smollm2",
    batch: int = 8,
    seq_len: int = 128,
    rounds: int = 5,
) -> list[dict]:
    """Race the three losses on `model`'s head, print the table, write loss.md and loss.json."""
    for name, value in (("batch", batch), ("seq_len", seq_len), ("rounds", rounds)):
        positive_int(value, name, f"{name}=4")
    if model not in MODELS:
        raise ValueError(f"model must be one of {list(MODELS)} (got {model!r}).")
    env.seed_everything(0)
    hidden, weight, labels = _hidden_states(model, batch, seq_len)
    gaps = check_agreement(hidden, weight, labels)
    rows = race(hidden, weight, labels, rounds=rounds)
    info = {
        "machine": machine(),
        "model": model,
        "batch": batch,
        "seq_len": seq_len,
        "vocab": weight.shape[0],
        "rounds": rounds,
        "gaps": gaps,
    }
    table = format_table(rows, info)
    print(table)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loss.md").write_text(table)
    (out / "loss.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m course_tools.bench loss``: the three losses raced on the model's head."""

    parser = argparse.ArgumentParser(
        prog="python -m course_tools.bench loss", description=main.__doc__
    )
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    run(args.out, model=args.model, batch=args.batch, seq_len=args.seq_len, rounds=args.rounds)
    return 0
