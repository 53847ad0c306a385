"""Preference tuning: (prompt, chosen, rejected) pairs, DPO's implicit reward, and TRL's DPOTrainer.

Lesson 13 reads this module. It holds

- the **preference data set** ``rentals_preference_*.jsonl``, built by `build_preference_pairs`
  from the course's own rentals listings (`course_utils.data`): the prompt is the system + user
  messages, *chosen* is the reference JSON, *rejected* is the same answer with one rule of the
  schema broken the way a model breaks it (a value copied as written, the rent as text, prose
  around the JSON, the wrong period), see `MISTAKES`;
- **log-probabilities** of a completion under a model (`completion_logps`), tokenized the way
  TRL's ``DPOTrainer`` tokenizes conversational pairs, so the numbers agree with TRL's;
- DPO's **implicit reward** r = β·(log π_θ(y|x) − log π_ref(y|x)), the reward **margin**
  r(chosen) − r(rejected), the preference **accuracy** (share of pairs with margin > 0) and the
  **DPO loss** −log σ(margin) (`preference_report`, `dpo_loss`);
- `dpo_trainer`: TRL's ``DPOTrainer`` with a PEFT LoRA adapter, whose reference model is the
  same network with the adapter switched off.

Regenerate the shipped files with ``python -m course_tools.datasets --write`` (it writes these too).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from trl import DPOConfig, DPOTrainer

from . import data, env
from .checks import positive_int, positive_number

__all__ = [
    "MISTAKES",
    "PREFERENCE_SOURCES",
    "build_preference_pairs",
    "completion_logps",
    "dpo_loss",
    "dpo_trainer",
    "implicit_rewards",
    "load_preference_pairs",
    "make_rejected",
    "preference_report",
    "read_pairs",
    "to_dataset",
    "training_curves",
    "write_pairs",
]

#: The ways a rejected answer breaks the schema (one per pair).
MISTAKES = (
    "type_as_written",  # "type": "semi-detached house" instead of "house"
    "rent_as_text",  # "rent_gbp": "£1,250" instead of 1250
    "period_as_written",  # "rent_period": "pcm" instead of "month"
    "bedrooms_as_word",  # "bedrooms": "three" instead of 3
    "city_as_written",  # "city": "LEEDS" instead of "Leeds"
    "prose_around",  # "Here is the JSON: {...}" instead of the JSON only
    "wrong_period",  # "week" for a monthly rent (or the reverse)
)
#: Which rentals split each preference split is made from (held-out pairs: listings never trained on).
PREFERENCE_SOURCES = {"train": "train", "test": "test"}
PREFERENCE_STEM = "rentals_preference"
# How listings write a rent period, longest first so that "per calendar month" wins over "a month".
PERIOD_WORDS = (
    "per calendar month", "per month", "per week", "a month", "a week", "/month", "/week",
    "pcm", "p/m", "p/w", "pw",
)  # fmt: skip
PROSE = (
    "Here is the listing as JSON: {json}",
    "Sure! {json}",
    "```json\n{json}\n```",
    "{json}\nThis is a rental listing in {city}.",
)

Pair = dict[str, Any]


# --------------------------------------------------------------------------------------------
# 1. The data set: a rentals example -> (prompt, chosen, rejected).
# --------------------------------------------------------------------------------------------


def _type_as_written(listing: str, record: dict) -> str | None:
    """Return the longest way the listing names the property type, if it is not the label."""
    words = [w for w in data.TYPE_WORDS[record["type"]] if w in listing.lower()]
    longest = max(words, key=len) if words else None
    return longest if longest and longest != record["type"] else None


def _period_as_written(listing: str) -> str | None:
    """Return how the listing writes its rent period (e.g. 'pcm'), or None if none is found."""
    lowered = listing.lower()
    for word in PERIOD_WORDS:
        pattern = re.escape(word) if word.startswith("/") else rf"(?<![a-z]){re.escape(word)}\b"
        if re.search(pattern, lowered):
            return word.lstrip("/")
    return None


def make_rejected(listing: str, record: dict[str, Any], mistake: str, rng: random.Random) -> str:
    """Return the reference answer to `listing` with the rule `mistake` broken (see MISTAKES)."""
    if mistake not in MISTAKES:
        raise ValueError(f"mistake must be one of {', '.join(MISTAKES)} (got {mistake!r}).")
    if mistake not in applicable_mistakes(listing, record):
        raise ValueError(f"The mistake {mistake!r} does not apply to this listing; pick another.")
    wrong = dict(record)
    if mistake == "type_as_written":
        wrong["type"] = _type_as_written(listing, record)
    elif mistake == "rent_as_text":
        wrong["rent_gbp"] = f"£{record['rent_gbp']:,}"
    elif mistake == "period_as_written":
        wrong["rent_period"] = _period_as_written(listing)
    elif mistake == "bedrooms_as_word":
        wrong["bedrooms"] = data.NUMBER_WORDS[record["bedrooms"]]
    elif mistake == "city_as_written":
        wrong["city"] = record["city"].upper()
    elif mistake == "wrong_period":
        wrong["rent_period"] = "week" if record["rent_period"] == "month" else "month"
    elif mistake == "prose_around":
        return rng.choice(PROSE).format(json=json.dumps(record), city=record["city"])
    return json.dumps(wrong, ensure_ascii=False)


def applicable_mistakes(listing: str, record: dict[str, Any]) -> list[str]:
    """Return the MISTAKES that change this listing's answer (e.g. no 'bedrooms_as_word' for a studio)."""
    kinds = ["rent_as_text", "prose_around", "wrong_period"]
    if _type_as_written(listing, record):
        kinds.append("type_as_written")
    period = _period_as_written(listing)
    if period and period != record["rent_period"]:
        kinds.append("period_as_written")
    if record["bedrooms"] > 0:
        kinds.append("bedrooms_as_word")
    if record["city"].upper() in listing and record["city"].upper() != record["city"]:
        kinds.append("city_as_written")
    return [k for k in MISTAKES if k in kinds]


def preference_pair(example: data.Example, rng: random.Random) -> Pair:
    """Turn one rentals example into a preference pair with a randomly chosen applicable mistake."""
    prompt = data.prompt_messages(example)
    chosen = data.reference_answer(example)
    record = json.loads(chosen)
    listing = prompt[-1]["content"]
    mistake = rng.choice(applicable_mistakes(listing, record))
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [
            {"role": "assistant", "content": make_rejected(listing, record, mistake, rng)}
        ],
        "mistake": mistake,
    }


def build_preference_pairs(
    seed: int = data.SEED, rentals: dict[str, list[data.Example]] | None = None
) -> dict[str, list[Pair]]:
    """Build the preference splits from the rentals splits (default: the shipped ones), seeded."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer (got {seed!r}); try seed=0.")
    if rentals is None:
        rentals = {s: data.load_instruction_task(s) for s in PREFERENCE_SOURCES.values()}
    missing = [s for s in PREFERENCE_SOURCES.values() if s not in rentals]
    if missing:
        raise ValueError(
            f"rentals lacks the split(s) {missing}; pass data.build_instruction_task()."
        )
    rng = random.Random(seed)
    return {
        split: [preference_pair(e, rng) for e in rentals[source]]
        for split, source in PREFERENCE_SOURCES.items()
    }


def pair_problem(pair: object) -> str | None:
    """Return what is wrong with one preference pair, or None if it is valid."""
    if not isinstance(pair, dict):
        return f"expected a JSON object, got {type(pair).__name__}"
    for key in ("prompt", "chosen", "rejected"):
        if key not in pair:
            return f'missing the "{key}" key'
    problem = data.message_problem({"messages": pair["prompt"] + pair["chosen"]})
    if problem is None:
        problem = data.message_problem({"messages": pair["prompt"] + pair["rejected"]})
    if problem is not None:
        return problem
    if pair["chosen"] == pair["rejected"]:
        return "chosen and rejected are the same answer"
    return None


def write_pairs(path: str | os.PathLike, pairs: Sequence[Pair]) -> Path:
    """Write preference pairs to `path` as JSONL (one pair a line), after checking each one."""
    if isinstance(pairs, dict | str) or not isinstance(pairs, Sequence):
        raise TypeError("pairs must be a list of {'prompt', 'chosen', 'rejected'} dicts.")
    for index, pair in enumerate(pairs):
        problem = pair_problem(pair)
        if problem is not None:
            raise ValueError(f"pair {index}: {problem}; build pairs with build_preference_pairs.")
    return data.write_json_lines(path, pairs)


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    """Read a preference JSONL file, checking every line (a bad one raises naming file and line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; write it with write_pairs.")
    pairs = []
    for number, pair in data.json_lines(path):
        problem = pair_problem(pair)
        if problem is not None:
            raise ValueError(f"{path}, line {number}: {problem}; fix or regenerate the file.")
        pairs.append(pair)
    return pairs


def load_preference_pairs(split: str = "train") -> list[Pair]:
    """Return the shipped preference pairs of one split ('train' or 'test')."""
    if split not in PREFERENCE_SOURCES:
        raise ValueError(f"split must be one of {', '.join(PREFERENCE_SOURCES)} (got {split!r}).")
    return read_pairs(data.DATA_DIR / f"{PREFERENCE_STEM}_{split}.jsonl")


def to_dataset(pairs: Sequence[Pair]):
    """Return a ``datasets.Dataset`` with the prompt / chosen / rejected columns TRL reads."""
    pairs = _check_pairs(pairs)
    return Dataset.from_list(
        [{key: pair[key] for key in ("prompt", "chosen", "rejected")} for pair in pairs]
    )


def _check_pairs(pairs: object) -> list[Pair]:
    """Return `pairs` as a list if it is a non-empty list of valid pairs, else raise."""
    if isinstance(pairs, dict | str) or not isinstance(pairs, Sequence) or not pairs:
        raise ValueError(
            "pairs must be a non-empty list of preference pairs, e.g. "
            "preference.load_preference_pairs('test')."
        )
    for index, pair in enumerate(pairs):
        problem = pair_problem(pair)
        if problem is not None:
            raise ValueError(f"pair {index}: {problem}; build pairs with build_preference_pairs.")
    return list(pairs)


# --------------------------------------------------------------------------------------------
# 2. Log-probabilities, implicit rewards, margin, accuracy and the DPO loss.
# --------------------------------------------------------------------------------------------


def _token_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Tokenize a conversation with the chat template (as TRL does)."""
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    return list(out["input_ids"])


def _prompt_and_completion(tokenizer, prompt: list[dict], completion: list[dict]):
    """Return (prompt ids, completion ids): the completion is what the template adds after the prompt."""
    prompt_ids = _token_ids(tokenizer, prompt, add_generation_prompt=True)
    full = _token_ids(tokenizer, prompt + completion)
    if full[: len(prompt_ids)] != prompt_ids:
        raise ValueError(
            "The chat template changes the prompt when the answer is added; use ChatML."
        )
    return prompt_ids, full[len(prompt_ids) :]


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Put the model in eval mode without gradients, and restore its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def completion_logps(
    model, tokenizer, prompts: Sequence[list[dict]], completions: Sequence[list[dict]], *,
    batch_size: int = 8,
) -> torch.Tensor:  # fmt: skip
    """Return log π(completion | prompt), summed over the completion's tokens, one per prompt."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(
            "prompts must be a non-empty list of message lists, e.g. [pair['prompt']]."
        )
    if len(prompts) != len(completions):
        raise ValueError("prompts and completions must have the same length; pass one per prompt.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (got {batch_size!r}); try 8.")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [_prompt_and_completion(tokenizer, p, c) for p, c in zip(prompts, completions)]
    sums = []
    with _eval_mode(model):
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            width = max(len(p) + len(c) for p, c in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros_like(ids)
            scored = torch.zeros_like(ids, dtype=torch.bool)
            for i, (p, c) in enumerate(batch):
                n = len(p) + len(c)
                ids[i, :n] = torch.tensor(p + c)
                attention[i, :n] = 1
                scored[i, len(p) : n] = True
            ids, attention, scored = ids.to(device), attention.to(device), scored.to(device)
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits.float()
            logps = torch.log_softmax(logits[:, :-1], dim=-1)
            token_logps = logps.gather(-1, ids[:, 1:, None]).squeeze(-1)
            sums.append((token_logps * scored[:, 1:]).sum(dim=-1).cpu())
    return torch.cat(sums)


def implicit_rewards(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float):
    """Return DPO's implicit reward r = β·(log π_θ(y|x) − log π_ref(y|x)), element by element."""
    beta = _beta(beta)
    if policy_logps.shape != reference_logps.shape:
        raise ValueError(
            "policy and reference log-probs must have the same shape (one per answer)."
        )
    return beta * (policy_logps - reference_logps)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Return the mean DPO loss −log σ(r(chosen) − r(rejected)) over the pairs."""
    margins = implicit_rewards(policy_chosen, reference_chosen, beta) - implicit_rewards(
        policy_rejected, reference_rejected, beta
    )
    return -torch.nn.functional.logsigmoid(margins).mean()


def _beta(beta: object) -> float:
    """Return β if it is a finite number > 0, else raise."""
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 < beta < math.inf:
        raise ValueError(f"beta must be a positive number (got {beta!r}); try beta=0.1.")
    return float(beta)


@contextlib.contextmanager
def _reference(model, reference) -> Iterator[Any]:
    """Yield the reference model: `reference`, else `model` with its adapters off (else itself)."""
    if reference is not None:
        yield reference
    elif hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


def preference_report(
    model, tokenizer, pairs: Sequence[Pair], *, beta: float = 0.1, reference=None,
    batch_size: int = 8,
) -> dict[str, Any]:  # fmt: skip
    """Score pairs: log-probs, implicit rewards, reward margin and accuracy, raw log-prob preference.

    The reference is `reference`, or, for a PEFT model, the same model with its adapter switched
    off (what TRL's DPOTrainer uses), or else the model itself (then every margin is 0).
    """
    beta = _beta(beta)
    pairs = _check_pairs(pairs)
    prompts = [p["prompt"] for p in pairs]
    chosen = [p["chosen"] for p in pairs]
    rejected = [p["rejected"] for p in pairs]

    def logps(m):
        return (
            completion_logps(m, tokenizer, prompts, chosen, batch_size=batch_size),
            completion_logps(m, tokenizer, prompts, rejected, batch_size=batch_size),
        )

    policy_chosen, policy_rejected = logps(model)
    if reference is model or (reference is None and not hasattr(model, "disable_adapter")):
        ref_chosen, ref_rejected = policy_chosen, policy_rejected  # the policy is the reference
    else:
        with _reference(model, reference) as ref:
            ref_chosen, ref_rejected = logps(ref)
    margins = implicit_rewards(policy_chosen, ref_chosen, beta) - implicit_rewards(
        policy_rejected, ref_rejected, beta
    )
    preference = policy_chosen - policy_rejected
    return {
        "policy_chosen_logps": policy_chosen,
        "policy_rejected_logps": policy_rejected,
        "reference_chosen_logps": ref_chosen,
        "reference_rejected_logps": ref_rejected,
        "margins": margins,
        "margin": margins.mean().item(),
        "accuracy": (margins > 0).float().mean().item(),
        "loss": dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta).item(),
        "logp_preference": preference.mean().item(),
        "logp_accuracy": (preference > 0).float().mean().item(),
        "logp_preferences": preference,
    }


# --------------------------------------------------------------------------------------------
# 3. Training with TRL's DPOTrainer + LoRA.
# --------------------------------------------------------------------------------------------


def dpo_trainer(
    model,
    tokenizer,
    train_pairs: Sequence[Pair],
    *,
    steps: int,
    batch_size: int = 8,
    learning_rate: float = 5e-4,
    beta: float = 0.1,
    lora=None,
    eval_pairs: Sequence[Pair] | None = None,
    output_dir: str | os.PathLike = "runs/dpo",
    seed: int = 0,
    max_length: int = 256,
):
    """Return TRL's DPOTrainer set up to train a LoRA adapter (default: r=16, α=32, all-linear).

    `model` is a plain transformers model: the trainer wraps it with the adapter, and its reference
    is the same network with the adapter switched off, so no second copy of the model is kept.
    """
    if isinstance(model, PeftModel):
        raise ValueError("Pass the base model (assets.load_model()); the trainer adds the adapter.")
    steps = positive_int(steps, "steps", "steps=20")
    batch_size = positive_int(batch_size, "batch_size", "batch_size=8")
    learning_rate = positive_number(learning_rate, "learning_rate", "learning_rate=5e-4")
    max_length = positive_int(max_length, "max_length", "max_length=256")
    beta = _beta(beta)
    on_cuda = next(model.parameters()).device.type == "cuda"
    dtype = env.default_dtype("cuda") if on_cuda else torch.float32
    config = DPOConfig(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="linear",
        beta=beta,
        loss_type=["sigmoid"],
        max_length=max_length,
        logging_steps=1,
        gradient_checkpointing=False,  # a 135M model fits; recomputing costs a third more time
        save_strategy="no",
        report_to="none",
        seed=seed,
        bf16=on_cuda and dtype == torch.bfloat16,
        fp16=on_cuda and dtype == torch.float16,
        dataloader_num_workers=0,
        dataloader_pin_memory=on_cuda,
        disable_tqdm=False,
    )
    return DPOTrainer(
        model=model,
        ref_model=None,
        args=config,
        train_dataset=to_dataset(train_pairs),
        eval_dataset=None if eval_pairs is None else to_dataset(eval_pairs),
        processing_class=tokenizer,
        peft_config=lora
        if lora is not None
        else LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )


def training_curves(log_history: Sequence[dict]) -> dict[str, list[float]]:
    """Return the per-step training curves (loss, rewards/margins, rewards/accuracies) TRL logged."""
    if isinstance(log_history, dict | str) or not isinstance(log_history, Sequence):
        raise TypeError("log_history must be trainer.state.log_history (a list of dicts).")
    keys = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")
    curves: dict[str, list[float]] = {key: [] for key in ("step", *keys)}
    for entry in log_history:
        if "loss" in entry and "rewards/margins" in entry:
            curves["step"].append(float(entry["step"]))
            for key in keys:
                curves[key].append(float(entry[key]))
    if not curves["step"]:
        raise ValueError("No DPO training steps in this log; train with logging_steps=1 first.")
    return curves
