"""Measuring a fine-tuned model: task scores, perplexity, forgetting, equality checks, sizes.

Lessons 05-07 and 10-15.

Labs 05-07 read this module:

- `score_instruction` runs the rentals task (strict JSON exact match, and each field's accuracy);
- `perplexity` on held-out text of a corpus: the domain-adaptation metric, and, on text the
  fine-tuning never saw, the **forgetting** check (it rises when general ability is lost);
- `max_logit_difference`: two models give the same logits (a reloaded adapter, a merged model);
- `side_by_side`: a markdown table of inputs, answers before and after, and the reference;
- `folder_size`: bytes on disk of an adapter or a saved model.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from . import data
from .checks import positive_int

__all__ = [
    "FIELDS",
    "answer_loss",
    "field_accuracy",
    "folder_size",
    "max_logit_difference",
    "perplexity",
    "score_instruction",
    "side_by_side",
    "wilson_interval",
]

#: The keys of the rentals JSON answer.
FIELDS = ("bedrooms", "type", "city", "rent_gbp", "rent_period")


def _non_empty(values: object, name: str, example: str) -> Sequence:
    """Return `values` if it is a non-empty list (not a string), else raise saying what to pass."""
    if isinstance(values, str | bytes | dict) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} must be a non-empty list, e.g. {example}.")
    return values


def field_accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Return, for each rentals field, the share of answers whose JSON has that field right."""
    _non_empty(predictions, "predictions", "result['predictions']")
    if len(predictions) != len(references):
        raise ValueError("predictions and references must have the same length.")
    right = dict.fromkeys(FIELDS, 0)
    for prediction, reference in zip(predictions, references):
        parsed = data.parse_json_answer(prediction, strict=False) or {}
        truth = data.parse_json_answer(reference) or {}
        for key in FIELDS:
            right[key] += key in parsed and parsed[key] == truth.get(key)
    return {key: count / len(predictions) for key, count in right.items()}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Return the Wilson score interval of a proportion (95 % for z = 1.96): small n, honest bounds.

    With 20-40 held-out examples an exact match of 80 % is known only to about ±12 points; the
    Wilson interval stays inside [0, 1] and is sound at 0 % and 100 % (Wilson, 1927).
    """
    for name, value in (("successes", successes), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer (got {value!r}).")
    if n == 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n and n > 0 (got {successes} of {n}).")
    p = successes / n
    denominator = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def score_instruction(
    model, tokenizer, examples: Sequence[data.Example], *, batch_size: int = 64
) -> dict[str, Any]:
    """Run the rentals task on `examples`: exact match, lenient match and per-field accuracy."""
    _non_empty(examples, "examples", "data.load_instruction_task('test')")
    result = data.evaluate_instruction(model, tokenizer, examples, batch_size=batch_size)
    result["fields"] = field_accuracy(result["predictions"], result["references"])
    return result


def side_by_side(
    examples: Sequence[data.Example], columns: dict[str, Sequence[str]], n: int = 4
) -> str:
    """Return a markdown table: the user's input, then one column per run, then the reference."""
    _non_empty(examples, "examples", "test[:4]")
    positive_int(n, "n", "n=40")
    for label, answers in columns.items():
        if len(answers) < min(n, len(examples)):
            raise ValueError(f"column {label!r} has fewer answers than the {n} rows asked for.")

    def cell(text: str) -> str:
        return " ".join(str(text).split()).replace("|", "\\|")

    header = ["input", *columns, "reference"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, example in enumerate(examples[:n]):
        user = [m["content"] for m in example["messages"] if m["role"] == "user"][-1]
        row = [user, *(answers[i] for answers in columns.values()), data.reference_answer(example)]
        lines.append(
            "| " + " | ".join(f"`{cell(v)}`" if j else cell(v) for j, v in enumerate(row)) + " |"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Put `model` in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    block_size: int = 128,
    max_blocks: int = 32,
    batch_size: int = 8,
) -> float:
    """Return exp(mean next-token loss) over the first `max_blocks` blocks of `texts`."""
    _non_empty(texts, "texts", "data.load_python_reference('validation')")
    positive_int(max_blocks, "max_blocks", "max_blocks=8")
    positive_int(batch_size, "batch_size", "batch_size=8")
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    blocks = data.group_texts(ids, block_size, separator_id=tokenizer.eos_token_id)["input_ids"]
    blocks = blocks[:max_blocks]
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    with _eval_mode(model):
        for start in range(0, len(blocks), batch_size):
            batch = torch.tensor(blocks[start : start + batch_size], device=device)
            loss = model(input_ids=batch, labels=batch).loss.float().item()
            n = batch.shape[0] * (batch.shape[1] - 1)  # the positions that predict a next token
            total_loss += loss * n
            total_tokens += n
    return math.exp(total_loss / total_tokens)


@torch.no_grad()
def max_logit_difference(model_a, model_b, tokenizer, prompts: Sequence[str]) -> float:
    """Return the largest |logit_a - logit_b| of two models over the same prompts (padding aside)."""
    _non_empty(prompts, "prompts", "['What is LoRA?']")
    pad_side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = pad_side
    mask = batch["attention_mask"].bool()
    logits = []
    for model in (model_a, model_b):
        with _eval_mode(model):
            device = next(model.parameters()).device
            logits.append(model(**batch.to(device)).logits.float().cpu())
    return (logits[0] - logits[1]).abs()[mask].max().item()


def folder_size(path: str | os.PathLike) -> int:
    """Return the bytes of all files under `path` (an adapter or a saved model on disk)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; save the model or adapter there first.")
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@torch.no_grad()
def answer_loss(
    model, tokenizer, examples: Sequence[data.Example], *, batch_size: int = 8
) -> float:
    """Return the mean loss on the assistant tokens of `examples` (teacher-forced, no generation)."""
    _non_empty(examples, "examples", "data.load_instruction_task('validation')")
    positive_int(batch_size, "batch_size", "batch_size=8")
    features = [data.tokenize_with_assistant_mask(tokenizer, e) for e in examples]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with _eval_mode(model):
        for start in range(0, len(features), batch_size):
            chunk = features[start : start + batch_size]
            batch = {
                k: v.to(device) for k, v in data.pad_batch(chunk, tokenizer.pad_token_id).items()
            }
            n = int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
            total += model(**batch).loss.float().item() * n
            count += n
    return total / count
