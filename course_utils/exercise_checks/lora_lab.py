"""Checks for the exercises of lesson 05 (LoRA lab): a described LoraConfig, the largest rank a
budget allows, merging a saved adapter by hand, and the SFTTrainer of a described run.

The checks build their own models, as the notebook's set-up does: a Llama-style model of a config
on the meta device (shapes only) and the package's tiny random Llama with the course tokenizer's
vocabulary. Exercise 4's check trains that tiny model for a few steps.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import numbers
import tempfile
from pathlib import Path
from unittest import mock

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils.notebook import NotebookProgressCallback
from trl import SFTTrainer

from course_utils.assets import TINY_LLAMA, load_tokenizer, tiny_llama
from course_utils.data import load_instruction_task, prompt_messages, reference_answer
from course_utils.evaluate import max_logit_difference
from course_utils.exercise_checks.feedback import Wrong, allclose, exercise, expect, isclose
from course_utils.exercise_checks.trainer_settings import plain_run_settings, quiet, setting
from course_utils.lora import lora_scaling
from course_utils.memory import count_params, get_config, lora_trainable_params

_isfinite = math.isfinite  # bound at import, like feedback's comparisons
_FOLDERS: list[tempfile.TemporaryDirectory] = []

#: The projections each `where` of exercise 1 names, as PEFT's target_modules.
WHERE = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "all": "all-linear",
}
#: The prompts whose logits exercise 3 compares.
PROMPTS = ["A two-bed flat in Leeds, £1,250 pcm.", "What is LoRA?", "def f(x):\n    return 2 * x"]
#: The one-line system message of exercise 4's examples (shorter sequences, faster steps).
SYSTEM = {"role": "system", "content": "Reply with the listing as JSON."}


# ---------------------------------------------------------------------------------------------
# The models and files the checks use (the notebook's set-up builds the same ones).
# ---------------------------------------------------------------------------------------------


@functools.cache
def _tokenizer():
    """The course tokenizer (offline), loaded once."""
    return load_tokenizer()


def _tiny_config() -> dict:
    """The tiny Llama's config with the course tokenizer's vocabulary (the notebook's TINY)."""
    return {**TINY_LLAMA, "vocab_size": len(_tokenizer())}


def _meta_model(config):
    """A Llama-style model of this config (preset name or dict) on the meta device."""
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**get_config(config)))


def _tiny_model(seed=0):
    """The random tiny Llama with the course tokenizer's vocabulary (the same weights for a seed)."""
    return tiny_llama(_tokenizer(), seed=seed).eval()


def _scratch() -> str:
    """A folder for the adapters and runs of the checks, removed when Python exits."""
    if not _FOLDERS:
        _FOLDERS.append(tempfile.TemporaryDirectory(prefix="lora-lab-checks-"))
    return _FOLDERS[0].name


def _make_adapter(config, seed=0) -> Path:
    """Save an adapter of `config` for the tiny model, with random A and B; return its folder."""
    peft_model = get_peft_model(_tiny_model(), copy.deepcopy(config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    folder = Path(tempfile.mkdtemp(dir=_scratch()))
    peft_model.save_pretrained(folder)
    return folder


def _rental_examples(n, start=0):
    """n of the lab's training examples, with a one-line system message (as in the notebook)."""
    examples = load_instruction_task("train")[start : start + n]
    return [{"messages": [SYSTEM, *example["messages"][1:]]} for example in examples]


def _model_of(config):
    """A config as given in a case: None is the tiny Llama."""
    return _tiny_config() if config is None else config


# ---------------------------------------------------------------------------------------------
# Exercise 1: the LoraConfig of a described run.
# ---------------------------------------------------------------------------------------------


def _adapters(config, lora):
    """{layer name: scaling} of every layer PEFT gives an adapter, and the trainable count."""
    peft_model = get_peft_model(_meta_model(config), copy.deepcopy(lora))
    layers = {
        name: module.scaling["default"]
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }
    return layers, peft_model.get_nb_trainable_parameters()[0]


def _kinds(names):
    """The projection names among the names of adapted layers."""
    return sorted({name.rsplit(".", 1)[-1] for name in names})


def _check_refused(lora_config_for, r, scale, where, dropout) -> None:
    """A `where` the exercise does not name must raise ValueError."""
    try:
        got = lora_config_for(r, scale, where, dropout=dropout)
    except ValueError:
        return
    except (KeyError, TypeError, AttributeError) as error:
        expect(
            False,
            f"lora_config_for({r}, {scale}, {where!r}) raised {type(error).__name__}, not ValueError. "
            "Hint: check `where` yourself before you use it, and refuse an unknown one with a "
            "ValueError.",
        )
    expect(
        False,
        f"lora_config_for({r}, {scale}, {where!r}) returned {type(got).__name__} instead of raising "
        "ValueError. Hint: `where` may only be 'attention', 'mlp' or 'all'; anything else is a "
        "ValueError.",
    )


def _check_fields(got, expected, r, scale, where) -> None:
    """Compare the LoraConfig's fields with the described run's; explain the first mismatch."""
    hints = {
        "r": "r is the rank, the first argument.",
        "lora_alpha": (
            "PEFT multiplies B·A by lora_alpha / r: pick lora_alpha so that this ratio is the "
            f"scale, {scale:g}, at rank {r}."
        ),
        "lora_dropout": "lora_dropout is the dropout argument.",
        "bias": "the run keeps the biases frozen: PEFT's bias option names that as 'none'.",
        "task_type": "task_type tells PEFT that it wraps a causal language model ('CAUSAL_LM').",
        "use_rslora": "this run scales by lora_alpha / r: leave use_rslora at False.",
    }
    for field, hint in hints.items():
        value, wanted = getattr(got, field), getattr(expected, field)
        if field == "lora_alpha":
            same = isinstance(value, numbers.Real) and isclose(value, wanted)
        else:
            same = value == wanted
        expect(same, f"{field} is {value!r}, expected {wanted!r} (where={where!r}). Hint: {hint}")


def _check_config(lora_config_for, r, scale, where, dropout=0.0, model=None) -> int | None:
    """Compare lora_config_for with the described LoraConfig, field by field and inside PEFT."""
    if where not in WHERE:
        _check_refused(lora_config_for, r, scale, where, dropout)
        return None
    model = _model_of(model)
    got = lora_config_for(r, scale, where, dropout=dropout)
    expect(
        isinstance(got, LoraConfig),
        f"lora_config_for returned {type(got).__name__}, not a peft.LoraConfig. "
        "Hint: build the config with peft.LoraConfig and return it.",
    )
    expected = LoraConfig(
        r=r,
        lora_alpha=scale * r,
        lora_dropout=dropout,
        target_modules=WHERE[where],
        bias="none",
        task_type="CAUSAL_LM",
    )
    _check_fields(got, expected, r, scale, where)
    mine, trainable = _adapters(model, got)
    theirs, expected_trainable = _adapters(model, expected)
    expect(
        set(mine) == set(theirs),
        f"PEFT puts adapters on {_kinds(mine)}, expected {_kinds(theirs)} (where={where!r}). "
        f"Hint: target_modules names the projections that get an adapter; the exercise lists "
        f"those of {where!r}.",
    )
    expect(
        mine == theirs,
        "PEFT scales the adapters differently from the described run. "
        "Hint: the scale is lora_alpha / r; check lora_alpha.",
    )
    reference = lora_trainable_params(model, r, WHERE[where])
    expect(
        trainable == expected_trainable == reference,
        f"PEFT trains {trainable:,} parameters, expected {expected_trainable:,} "
        f"(course_utils.memory counts {reference:,}). "
        "Hint: the rank and the targets decide the count; check r and target_modules.",
    )
    return trainable


#: (r, scale, where, dropout, model) of the visible tests; model None is the tiny Llama.
LORA_CONFIG_CASES = [(8, 2, "attention", 0.05, None), (16, 2, "all", 0.0, None)]


@exercise(1, "lora_config_for")
def lora_config_for(lora_config_for, cases=LORA_CONFIG_CASES) -> str:
    """Exercise 1: lora_config_for(r, scale, where, dropout) against the described LoraConfig.

    A case whose `where` is none of 'attention', 'mlp' and 'all' must raise ValueError.
    """
    for r, scale, where, dropout, model in cases:
        _check_config(lora_config_for, r, scale, where, dropout=dropout, model=model)
    lines = []
    for where in WHERE:
        trainable = _adapters("SmolLM2-135M", lora_config_for(16, 2, where))[1]
        lines.append(f"r=16 on {where:9s}: {trainable:>9,} trainable parameters in SmolLM2")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Exercise 2: the largest rank a budget allows, and PEFT's trainable%.
# ---------------------------------------------------------------------------------------------


def _peft_counts(config, r, targets):
    """(trainable, all) as PEFT counts them on the model of this config."""
    targets = targets if isinstance(targets, str) else list(targets)
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(_meta_model(config), lora).get_nb_trainable_parameters()


def _check_too_small(largest_rank, config, targets, budget, per_rank) -> None:
    """Not even r = 1 fits the budget: largest_rank must raise ValueError."""
    try:
        got = largest_rank(config, targets, budget)
    except ValueError:
        return
    expect(
        False,
        f"largest_rank({config!r:.40}, {targets!r}, {budget:,}) returned {got!r}, but r=1 "
        f"already trains {per_rank:,} parameters. Hint: when not even r = 1 fits the budget, "
        "raise ValueError.",
    )


def _rank_hint(config, targets, budget, got, expected, per_rank) -> str:
    """Why largest_rank's answer is not the expected rank."""
    layers = get_config(config)["num_hidden_layers"]
    if got == budget // (per_rank // layers):
        return "LoRA goes on the targets of every decoder layer, not of one."
    if got >= 1 and lora_trainable_params(config, got, targets) > budget:
        over = lora_trainable_params(config, got, targets)
        return f"r={got} trains {over:,}, over the budget: round down."
    if got + 1 <= expected:
        fits = lora_trainable_params(config, got + 1, targets)
        return f"r={got + 1} fits too ({fits:,} parameters)."
    return "count r · (d_in + d_out) over the targets, in every decoder layer."


def _check_rank(largest_rank, config, targets, budget) -> int | None:
    """Compare largest_rank with memory.lora_trainable_params at r and r + 1; explain a miss."""
    per_rank = lora_trainable_params(config, 1, targets)
    expected = budget // per_rank
    if expected < 1:
        _check_too_small(largest_rank, config, targets, budget, per_rank)
        return None
    try:
        got = largest_rank(config, targets, budget)
    except ValueError as error:
        expect(
            False,
            f"largest_rank({config!r:.40}, {targets!r}, {budget:,}) raised ValueError ({error}), "
            f"yet r={expected} fits. Hint: raise only when not even r = 1 fits.",
        )
    expect(
        isinstance(got, int) and not isinstance(got, bool),
        f"largest_rank returned {type(got).__name__}, not an int. "
        "Hint: a rank is a whole number; round down with integer division.",
    )
    if got != expected:
        hint = _rank_hint(config, targets, budget, got, expected, per_rank)
        expect(
            False,
            f"largest_rank({config!r:.40}, {targets!r}, {budget:,}) is {got}, expected {expected}. "
            f"Hint: {hint}",
        )
    counted = _peft_counts(config, got, targets)[0]
    expect(
        counted <= budget,
        f"PEFT trains {counted:,} parameters at r={got}, over the budget {budget:,}, although "
        "course_utils.memory counts fewer. Hint: not your answer's fault; tell the course.",
    )
    return got


def _check_percent(trainable_percent, config, r, targets) -> float:
    """Compare trainable_percent with what PEFT counts on the model; explain a mismatch."""
    got = trainable_percent(config, r, targets)
    try:
        value = float(got)
    except (TypeError, ValueError):
        expect(
            False,
            f"trainable_percent returned {type(got).__name__}, not a number. "
            "Hint: return the percentage as a float.",
        )
    trainable, everything = _peft_counts(config, r, targets)
    course = count_params(config) + lora_trainable_params(config, r, targets)
    expect(
        everything == course,
        f"PEFT counts {everything:,} parameters, course_utils.memory {course:,}. "
        "Hint: not your answer's fault; tell the course.",
    )
    expected = 100 * trainable / everything
    if isclose(value, expected, rel_tol=1e-9):
        return value
    if isclose(value, 100 * trainable / count_params(config), rel_tol=1e-9):
        hint = "PEFT's 'all params' count the adapters too, not only the base model's."
    elif isclose(value, expected / 100, rel_tol=1e-9):
        hint = "that is a fraction: PEFT prints a percentage."
    else:
        hint = f"LoRA r={r} trains {trainable:,} parameters here, the wrapped model has {everything:,}."
    expect(
        False,
        f"trainable_percent(..., r={r}, {targets!r}) is {value:.6g}, expected {expected:.6g}. "
        f"Hint: {hint}",
    )
    return value


#: The visible tests: ("largest_rank", config, targets, budget) and
#: ("trainable_percent", config, r, targets). A budget too small for r = 1 must raise ValueError.
RANK_CASES = [
    ("largest_rank", "SmolLM2-135M", "all-linear", 5_000_000),
    ("largest_rank", "SmolLM2-135M", ["q_proj", "v_proj"], 1_000_000),
    ("trainable_percent", "SmolLM2-135M", 16, "all-linear"),
    ("trainable_percent", "Llama-2-7B", 8, ["q_proj", "v_proj"]),
]


@exercise(2, "largest_rank", "trainable_percent")
def largest_rank(largest_rank, trainable_percent, cases=RANK_CASES) -> str:
    """Exercise 2: the largest rank a budget allows and PEFT's trainable%, against
    course_utils.memory and PEFT on the model built from the config."""
    for kind, *arguments in cases:
        if kind == "largest_rank":
            _check_rank(largest_rank, *arguments)
        elif kind == "trainable_percent":
            _check_percent(trainable_percent, *arguments)
        else:
            raise ValueError(f"a case is 'largest_rank' or 'trainable_percent', got {kind!r}.")
    lines = []
    for targets in ("all-linear", ["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"]):
        r = largest_rank("SmolLM2-135M", targets, 2_000_000)
        share = trainable_percent("SmolLM2-135M", r, targets)
        lines.append(
            f"SmolLM2, 2 M parameters on {targets}: r = {r}, {share:.2f} % of the wrapped model"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Exercise 3: merge a saved adapter by hand.
# ---------------------------------------------------------------------------------------------


def _refuse_peft(*args, **kwargs):
    raise Wrong(
        "merge_adapter loaded the adapter with PeftModel. Hint: merge by hand: read "
        "adapter_config.json and adapter_model.safetensors and add s * B @ A to each weight."
    )


def _merge_hint(mine, expected, base, saved) -> str:
    """Why one merged weight differs from PEFT's."""
    delta, mine_delta = expected - base, mine - base
    if not delta.abs().max():
        return "this layer has no adapter, yet its weight changed."
    if not mine_delta.abs().max():
        return (
            "this layer has an adapter but its weight did not change: the key "
            "base_model.model.<layer>.lora_A.weight belongs to the parameter <layer>.weight."
        )
    r, alpha = saved["r"], saved["lora_alpha"]
    s = lora_scaling(r, alpha, use_rslora=saved["use_rslora"])
    implied = s * float((mine_delta * delta).sum() / (delta * delta).sum())
    if allclose(mine_delta, delta * implied / s, atol=1e-6):
        for value, hint in (
            (1.0, "the update is not scaled: PEFT multiplies B @ A by s (lesson 02)."),
            (alpha, "s is lora_alpha divided by the rank, not lora_alpha alone."),
            (
                alpha / r,
                "this adapter uses rsLoRA (use_rslora): s divides by the square root of r.",
            ),
            (alpha / r**0.5, "this adapter uses plain LoRA (no use_rslora): s divides by r."),
            (-s, "add the update, do not subtract it."),
        ):
            if isclose(implied, value, rel_tol=1e-4):
                return hint
    return "W' = W + s * B @ A, with B of shape d_out x r and A of shape r x d_in."


def _check_weights(got, expected, saved) -> None:
    """Compare every weight of the learner's merged model with PEFT's merge."""
    mine = dict(got.named_parameters())
    base = dict(_tiny_model().named_parameters())
    with torch.no_grad():
        for name, weight in expected.named_parameters():
            expect(
                name in mine and mine[name].shape == weight.shape,
                f"the merged model has no parameter {name} of shape {tuple(weight.shape)}. "
                "Hint: change the weights of the model you are given, in place.",
            )
            if not allclose(mine[name], weight, rtol=1e-5, atol=1e-6):
                expect(
                    False,
                    f"{name} differs from PEFT's merge by up to "
                    f"{float((mine[name] - weight).abs().max()):.2e}. "
                    f"Hint: {_merge_hint(mine[name], weight, base[name], saved)}",
                )


def _check_merge(merge_adapter, config, seed=0):
    """Merge an adapter with merge_adapter and with PEFT; compare weights, then logits.

    Return the learner's merged model and the largest logit difference from PEFT's.
    """
    adapter_dir = _make_adapter(config, seed)
    files = {path.name: path.read_bytes() for path in adapter_dir.iterdir()}
    with mock.patch.object(PeftModel, "from_pretrained", side_effect=_refuse_peft):
        got = merge_adapter(_tiny_model(), adapter_dir)
    expect(
        isinstance(got, torch.nn.Module),
        f"merge_adapter returned {type(got).__name__}. Hint: return the merged model.",
    )
    expect(
        not isinstance(got, PeftModel) and not any("lora_" in n for n, _ in got.named_modules()),
        "the merged model still has LoRA modules. Hint: add s * B @ A into the base weights.",
    )
    expect(
        {path.name: path.read_bytes() for path in adapter_dir.iterdir()} == files,
        "merge_adapter changed the adapter folder. Hint: only read it.",
    )
    saved = json.loads(files["adapter_config.json"])
    expected = PeftModel.from_pretrained(_tiny_model(), adapter_dir).merge_and_unload()
    _check_weights(got, expected, saved)
    gap = max_logit_difference(got, expected, _tokenizer(), PROMPTS)
    expect(
        gap < 1e-4,
        f"the weights match PEFT's merge, but the logits differ from its merged model by "
        f"{gap:.2e}. Hint: change nothing but the adapted weights.",
    )
    return got, gap


def _visible_adapter() -> LoraConfig:
    """The adapter of the visible test (and of the notebook's example)."""
    return LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM"
    )


@exercise(3, "merge_adapter")
def merge_adapter(merge_adapter, cases=None) -> str | None:
    """Exercise 3: merge_adapter(model, adapter_dir) against PEFT's merge_and_unload, weights and
    logits (course_utils.evaluate.max_logit_difference).

    `cases` is a list of (LoraConfig, seed) of the adapters to merge; without it, the visible test.
    """
    if cases is not None:
        for config, seed in cases:
            _check_merge(merge_adapter, config, seed)
        return None
    merged, gap = _check_merge(merge_adapter, _visible_adapter(), 0)
    moved = max_logit_difference(_tiny_model(), merged, _tokenizer(), PROMPTS)
    return (
        f"the adapter moves the logits by up to {moved:.3f}; yours and PEFT's merge differ by "
        f"{gap:.1e}"
    )


# ---------------------------------------------------------------------------------------------
# Exercise 4: the SFTTrainer of a described run.
# ---------------------------------------------------------------------------------------------


def _adapted(model):
    """The names of the layers that carry a LoRA adapter."""
    return {name.split(".lora_A.")[0] for name, _ in model.named_parameters() if ".lora_A." in name}


def _expected_rates(steps, learning_rate, warmup_steps):
    """The learning rate of every optimizer step under transformers' cosine schedule."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=learning_rate)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
    rates = []
    for _ in range(steps):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    return rates


def _setting_checks(args, steps, batch_size, learning_rate, warmup_steps):
    """(it holds, what is wrong, hint) for each setting of the described run."""
    return (
        (
            args.max_steps == steps,
            f"it runs max_steps={args.max_steps}, the run has {steps} optimizer steps",
            "SFTConfig's max_steps counts optimizer steps (and overrides num_train_epochs).",
        ),
        (
            args.per_device_train_batch_size == batch_size
            and args.gradient_accumulation_steps == 1,
            f"it takes batches of {args.per_device_train_batch_size} and accumulates "
            f"{args.gradient_accumulation_steps}, the run takes {batch_size} examples per step",
            "per_device_train_batch_size is the examples per batch; one batch per step.",
        ),
        (
            isclose(args.learning_rate, learning_rate),
            f"its learning rate is {args.learning_rate:g}, the run's peak is {learning_rate:g}",
            "TRL's default learning rate is not the run's: set learning_rate.",
        ),
        (
            setting(args.lr_scheduler_type) == "cosine",
            f"its schedule is {setting(args.lr_scheduler_type)!r}, the run decays along a cosine",
            "lr_scheduler_type names the schedule after the warm-up.",
        ),
        (
            args.get_warmup_steps(steps) == warmup_steps,
            f"it warms up for {args.get_warmup_steps(steps)} steps, the run for {warmup_steps}",
            "warmup_steps counts the steps of the linear warm-up.",
        ),
        *plain_run_settings(args, "SFTConfig"),
    )


def _check_settings(trainer, lora, steps, batch_size, learning_rate, warmup_steps) -> None:
    """Compare the trainer's settings with the description; explain the first mismatch."""
    expect(
        isinstance(trainer, SFTTrainer),
        f"sft_trainer returned {type(trainer).__name__}, not a trl.SFTTrainer. "
        "Hint: build the trainer from an SFTConfig and return it.",
    )
    expect(
        trainer.state.global_step == 0,
        "the trainer has trained already. "
        "Hint: return it before trainer.train(): the tests train it.",
    )
    for ok, problem, hint in _setting_checks(
        trainer.args, steps, batch_size, learning_rate, warmup_steps
    ):
        expect(ok, f"{problem}. Hint: {hint}")
    expect(
        isinstance(trainer.model, PeftModel),
        "the trainer's model has no LoRA adapter. Hint: give the LoraConfig to the trainer "
        "(its peft_config argument); it wraps the model itself.",
    )
    used = trainer.model.peft_config["default"]
    expected = get_peft_model(_tiny_model(), copy.deepcopy(lora))
    expect(
        (used.r, used.lora_alpha, _adapted(trainer.model))
        == (lora.r, lora.lora_alpha, _adapted(expected)),
        "the adapter is not the one described. Hint: give the trainer the lora you are given.",
    )


def _labels_hint(got, prompt) -> str:
    """Why a row's labels are not -100 on the prompt and the token ids on the answer."""
    if any(label != -100 for label in got[: len(prompt)]):
        return (
            "the prompt's tokens carry labels, so the loss is on them too. Hint: give "
            "SFTTrainer {'prompt': [...], 'completion': [...]} examples and leave "
            "completion_only_loss at its default."
        )
    return (
        "the answer's tokens must carry labels (their own ids). "
        "Hint: the completion is the assistant message."
    )


def _check_row(sequence, labels, padding, by_ids) -> None:
    """One row of the batch: a whole conversation, labelled on the answer only."""
    tokenizer = _tokenizer()
    example = by_ids.get(tuple(sequence))
    expect(
        example is not None,
        "the batch holds a sequence that is not an example's conversation. Hint: give the "
        "trainer the messages themselves (prompt and completion lists); it applies the chat "
        "template.",
    )
    prompt = tokenizer.apply_chat_template(
        prompt_messages(example), add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    answer = sequence[len(prompt) :]
    expect(
        tokenizer.decode(answer).startswith(reference_answer(example)),
        "the tokens after the prompt are not the example's answer. "
        "Hint: the prompt is every message before the assistant's answer.",
    )
    expect(labels == [-100] * len(prompt) + answer, _labels_hint(labels, prompt))
    expect(
        all(label == -100 for label in padding),
        "padding carries labels. Hint: padding must carry no label (-100); leave the collator at "
        "TRL's default.",
    )


def _check_labels(trainer, examples, batch_size):
    """The first batch the trainer builds: labels on the answer's tokens only."""
    tokenizer = _tokenizer()
    with quiet():
        batch = next(iter(trainer.get_train_dataloader()))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"].bool()
    expect(
        ids.shape[0] == batch_size,
        f"a batch holds {ids.shape[0]} examples, the run takes {batch_size}. "
        "Hint: per_device_train_batch_size.",
    )
    by_ids = {}
    for example in examples:
        full = tokenizer.apply_chat_template(example["messages"], tokenize=True, return_dict=True)
        by_ids[tuple(full["input_ids"])] = example
    for row in range(ids.shape[0]):
        _check_row(
            ids[row][mask[row]].tolist(),
            labels[row][mask[row]].tolist(),
            labels[row][~mask[row]].tolist(),
            by_ids,
        )
    return batch


def _check_run(trainer, output_dir, steps, learning_rate, warmup_steps):
    """Train, then check the steps run, the log of every step and the schedule followed."""
    for progress in (NotebookProgressCallback, ProgressCallback, PrinterCallback):
        trainer.remove_callback(progress)  # the verdict and its report are all the check shows
    with quiet():
        trainer.train()
    state = trainer.state
    expect(
        state.global_step == steps,
        f"the trainer ran {state.global_step} optimizer steps, the run has {steps}. "
        "Hint: max_steps.",
    )
    logged = [entry for entry in state.log_history if "loss" in entry]
    expect(
        [entry["step"] for entry in logged] == list(range(1, steps + 1)),
        f"the loss was logged at steps {[entry['step'] for entry in logged]}, the run logs every "
        "step. Hint: logging_steps.",
    )
    expect(
        all(_isfinite(entry["loss"]) for entry in logged),
        "the loss is not finite. Hint: train in fp32 at the run's learning rate.",
    )
    rates = [entry["learning_rate"] for entry in logged]
    expected = _expected_rates(steps, learning_rate, warmup_steps)
    expect(
        all(isclose(a, b, rel_tol=1e-6, abs_tol=1e-12) for a, b in zip(rates, expected)),
        f"the learning rates of the steps were {[f'{rate:.3g}' for rate in rates]}, the schedule's "
        f"are {[f'{rate:.3g}' for rate in expected]}. Hint: warm-up steps, then a cosine to 0.",
    )
    saved = sorted(path.name for path in Path(output_dir).glob("checkpoint-*"))
    expect(not saved, f"the run saved {saved}. Hint: this run saves no checkpoint (save_strategy).")
    return logged


def _build_trainer(
    sft_trainer, examples, lora, steps, batch_size, learning_rate, warmup_steps, seed, output_dir
):
    """Call sft_trainer quietly; explain TRL's refusal of bf16 on a machine without it."""
    try:
        with quiet():
            return sft_trainer(
                _tiny_model(seed),
                _tokenizer(),
                examples,
                copy.deepcopy(lora),
                steps,
                batch_size,
                learning_rate,
                warmup_steps,
                output_dir,
            )
    except ValueError as error:
        if "bf16" not in str(error):
            raise
        raise Wrong(
            f"SFTConfig refused the settings: {error} Hint: the run is in fp32, and TRL's "
            "SFTConfig turns bf16 on by default: switch it off."
        ) from error


def _check_trainer(
    sft_trainer, examples, lora, steps, batch_size, learning_rate, warmup_steps, seed=0
):
    """Build the trainer with sft_trainer, check it, its labels and its run; return its log."""
    output_dir = Path(tempfile.mkdtemp(dir=_scratch()))
    original = json.dumps(examples)
    trainer = _build_trainer(
        sft_trainer,
        examples,
        lora,
        steps,
        batch_size,
        learning_rate,
        warmup_steps,
        seed,
        output_dir,
    )
    expect(
        json.dumps(examples) == original,
        "sft_trainer changed the examples. Hint: only read them.",
    )
    _check_settings(trainer, lora, steps, batch_size, learning_rate, warmup_steps)
    _check_labels(trainer, examples, batch_size)
    return _check_run(trainer, output_dir, steps, learning_rate, warmup_steps)


def _visible_run() -> dict:
    """The run of the visible test: 4 steps of 2 of the lab's first 12 examples."""
    return {
        "examples": _rental_examples(12),
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
        "steps": 4,
        "batch_size": 2,
        "learning_rate": 1e-3,
        "warmup_steps": 1,
    }


@exercise(4, "sft_trainer")
def sft_trainer(sft_trainer, cases=None) -> str | None:
    """Exercise 4: sft_trainer's settings, labels and run, read from TRL itself, against the
    answers (course_utils.data) and transformers' own cosine schedule.

    `cases` is a list of runs: dicts of sft_trainer's arguments from `examples` to
    `warmup_steps` (by name), and the `seed` of the tiny model; without it, the visible test.
    Each run trains the tiny model.
    """
    if cases is not None:
        for case in cases:
            _check_trainer(sft_trainer, **case)
        return None
    logged = _check_trainer(sft_trainer, **_visible_run())
    return "\n".join(
        f"step {entry['step']}: learning rate {entry['learning_rate']:.2e}, loss {entry['loss']:.3f}"
        for entry in logged
    )
