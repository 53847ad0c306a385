"""How fast does a lab score the rentals task? Seconds per 100 held-out listings, two ways.

``python -m course_tools.bench eval`` (part of ``make bench``) scores the same held-out listings
with SmolLM2-135M-Instruct twice, one after the other, in one process:

* ``plain``: what the labs did before: transformers' greedy ``generate`` 16 listings at a
  time, left-padded, each whole prompt computed, every row generating the old 56-token budget,
  the model's own attention;
* ``course``: `course_utils.evaluate.score_instruction` as the labs run it now: 64 at a time,
  the system message (the schema, shared by every prompt) computed once and copied to every row,
  a budget of the longest reference answer plus `data.ANSWER_SLACK` tokens, a row stopped as
  soon as its score is decided (`data.json_answer_decided`), and on a CPU grouped-query
  attention without copies of the key/value cache (`generation.sdpa_gqa_attention`).

Both must give the same exact match and lenient match (the bench stops otherwise). Run on the
untrained model (``--adapter`` adds a trained LoRA adapter folder): it writes prose, the worst
case for a JSON stop. The goal of the issue: at most 30 s per 100 listings on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from course_utils import data, env
from course_utils.assets import model_path
from course_utils.evaluate import score_instruction

__all__ = ["GOAL_SECONDS_PER_100", "format_table", "main", "race"]

#: Seconds per 100 listings the course's evaluator must not exceed on 2 CPU cores.
GOAL_SECONDS_PER_100 = 30.0
#: The evaluator the labs used before: batch, and a token budget for every row.
PLAIN = {"batch_size": 16, "max_new_tokens": 56}


@torch.no_grad()
def _plain_answers(model, tokenizer, prompts) -> list[str]:
    """Greedy answers the plain way: whole prompts left-padded, `PLAIN` batches, no tricks."""
    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    answers = []
    try:
        for start in range(0, len(texts), PLAIN["batch_size"]):
            batch = tokenizer(
                texts[start : start + PLAIN["batch_size"]],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(device)
            output = model.generate(
                **batch,
                max_new_tokens=PLAIN["max_new_tokens"],
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = output[:, batch["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [a.strip() for a in answers]


def _plain_scores(model, tokenizer, examples) -> dict:
    """Score `examples` the old way: whole prompts, fixed budget, no early stop."""
    model.eval()
    predictions = _plain_answers(model, tokenizer, [data.prompt_messages(e) for e in examples])
    references = [data.reference_answer(e) for e in examples]
    strict = [data.exact_match(p, r) for p, r in zip(predictions, references)]
    lenient = [data.exact_match(p, r, strict=False) for p, r in zip(predictions, references)]
    return {
        "exact_match": sum(strict) / len(strict),
        "lenient_match": sum(lenient) / len(lenient),
    }


def race(model, tokenizer, n_examples: int = 100) -> list[dict]:
    """Time both evaluators on the first `n_examples` test listings; check equal scores."""
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
        raise ValueError(f"n_examples must be a positive integer (got {n_examples!r}); e.g. 100.")
    examples = data.load_instruction_task("test")[:n_examples]
    rows = []
    for name, scorer in (("plain", _plain_scores), ("course", score_instruction)):
        started = time.perf_counter()
        scores = scorer(model, tokenizer, examples)
        seconds = time.perf_counter() - started
        rows.append(
            {
                "evaluator": name,
                "examples": len(examples),
                "seconds": round(seconds, 2),
                "seconds_per_100": round(100 * seconds / len(examples), 2),
                "exact_match": scores["exact_match"],
                "lenient_match": scores["lenient_match"],
            }
        )
    plain, course = rows
    for key in ("exact_match", "lenient_match"):
        if plain[key] != course[key]:
            raise RuntimeError(f"the two evaluators disagree on {key}: {plain} vs {course}")
    return rows


def format_table(rows: list[dict], model_label: str) -> str:
    """A markdown table of the race, with the speed-up and the goal."""
    lines = [
        f"| evaluator ({model_label}) | listings | seconds | s per 100 | exact match | lenient |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['evaluator']} | {row['examples']} | {row['seconds']:.1f} "
            f"| {row['seconds_per_100']:.1f} | {row['exact_match']:.0%} | {row['lenient_match']:.0%} |"
        )
    plain, course = rows
    met = "met" if course["seconds_per_100"] <= GOAL_SECONDS_PER_100 else "NOT met"
    lines.append("")
    lines.append(
        f"course / plain speed-up: {plain['seconds'] / course['seconds']:.1f}x; "
        f"goal <= {GOAL_SECONDS_PER_100:.0f} s per 100 listings: {met}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m course_tools.bench eval``: seconds per 100 held-out listings, two evaluators."""

    parser = argparse.ArgumentParser(prog="python -m course_tools.bench eval", description=__doc__)
    parser.add_argument("--examples", type=int, default=env.by_profile(full=100, ci=8))
    parser.add_argument("--adapter", type=Path, default=None, help="a LoRA adapter folder")
    parser.add_argument("--out", type=Path, default=None, help="write eval.md and eval.json here")
    args = parser.parse_args(argv)
    path = model_path(verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    device = env.pick_device()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=env.default_dtype(device)).to(device)
    label = "untrained SmolLM2-135M"
    if args.adapter is not None:
        model = PeftModel.from_pretrained(model, args.adapter)
        label = f"SmolLM2-135M + {args.adapter.name}"
    rows = race(model, tokenizer, args.examples)
    header = (
        f"{platform.machine()} {device.type}, {torch.get_num_threads()} torch threads, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    table = format_table(rows, label)
    print(header + "\n\n" + table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "eval.md").write_text(header + "\n\n" + table + "\n")
        (args.out / "eval.json").write_text(json.dumps({"machine": header, "rows": rows}, indent=1))
    return 0
