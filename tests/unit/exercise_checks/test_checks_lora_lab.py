"""Lesson 05's exercise checks: the usual mistakes get the hint that names them.

Exercise 4's check trains the tiny model once its settings and labels pass, so only answers that
it refuses before training are tried here (the right answer is left to the notebook's validation).
"""

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from trl import SFTConfig, SFTTrainer

from course_utils import data, memory
from course_utils.exercise_checks import lora_lab as check

WHERE = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "all": "all-linear",
}


@pytest.fixture(autouse=True)
def _learner(monkeypatch):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)


def _said(capsys) -> str:
    return capsys.readouterr().out.strip()


def _wrong(capsys, number: int, hint: str) -> None:
    said = _said(capsys)
    assert said.startswith(f"❌ Exercise {number}") and hint in said, said
    assert said.count("\n") == 0 and "Hint:" in said, said


# Exercise 1 ---------------------------------------------------------------------------------


def _config_for(alpha=lambda scale, r: scale * r, where_map=WHERE, refuse=True, **fields):
    def lora_config_for(r, scale, where, dropout=0.0):
        if refuse and where not in where_map:
            raise ValueError(where)
        settings = dict(bias="none", task_type="CAUSAL_LM") | fields
        return LoraConfig(
            r=r,
            lora_alpha=alpha(scale, r),
            lora_dropout=dropout,
            target_modules=where_map[where],
            **settings,
        )

    return lora_config_for


def test_lora_config_for_right(capsys):
    check.lora_config_for(_config_for())
    lines = _said(capsys).splitlines()
    assert lines[0] == "✅ Exercise 1: `lora_config_for` passes the tests.", lines
    assert lines[1].startswith("r=16 on attention:") and len(lines) == 4, lines


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        (_config_for(alpha=lambda scale, r: scale), "pick lora_alpha so that this ratio"),
        (_config_for(where_map=dict(WHERE, attention=["q_proj", "v_proj"])), "PEFT puts adapters"),
        (_config_for(task_type=None), "causal language model"),
        (_config_for(use_rslora=True), "leave use_rslora at False"),
    ],
)
def test_lora_config_for_mistakes(answer, hint, capsys):
    check.lora_config_for(answer)
    _wrong(capsys, 1, hint)


def test_lora_config_for_must_refuse_an_unknown_where(capsys):
    case = [(8, 2, "attn", 0.0, None)]
    check.lora_config_for(_config_for(where_map={**WHERE, "attn": ["q_proj"]}), cases=case)
    _wrong(capsys, 1, "instead of raising ValueError")
    check.lora_config_for(_config_for(refuse=False), cases=case)
    _wrong(capsys, 1, "raised KeyError, not ValueError")


# Exercise 2 ---------------------------------------------------------------------------------


def _per_rank(config, targets, layers=True):
    shapes = memory.linear_layer_shapes(config)
    names = list(shapes) if targets == "all-linear" else list(targets)
    count = sum(sum(shapes[name]) for name in names)
    return count * memory.get_config(config)["num_hidden_layers"] if layers else count


def _largest_rank(config, targets, budget):
    if budget < _per_rank(config, targets):
        raise ValueError("r=1 does not fit")
    return budget // _per_rank(config, targets)


def _percent(config, r, targets):
    trainable = r * _per_rank(config, targets)
    return 100 * trainable / (memory.count_params(config) + trainable)


def test_largest_rank_right(capsys):
    check.largest_rank(_largest_rank, _percent)
    said = _said(capsys)
    assert said.startswith("✅ Exercise 2: `largest_rank` and `trainable_percent` pass"), said
    assert "r = 6, 1.34 %" in said


@pytest.mark.parametrize(
    ("rank", "percent", "hint"),
    [
        (lambda c, t, b: b // _per_rank(c, t, layers=False), _percent, "every decoder layer"),
        (lambda c, t, b: b / _per_rank(c, t), _percent, "not an int"),
        (lambda c, t, b: b // _per_rank(c, t) + 1, _percent, "over the budget: round down"),
        (
            _largest_rank,
            lambda c, r, t: 100 * r * _per_rank(c, t) / memory.count_params(c),
            "count the adapters too",
        ),
        (_largest_rank, lambda c, r, t: _percent(c, r, t) / 100, "that is a fraction"),
    ],
)
def test_largest_rank_mistakes(rank, percent, hint, capsys):
    check.largest_rank(rank, percent)
    _wrong(capsys, 2, hint)


def test_largest_rank_must_refuse_a_budget_below_rank_one(capsys):
    budget = memory.lora_trainable_params("SmolLM2-135M", 1) - 1
    case = [("largest_rank", "SmolLM2-135M", "all-linear", budget)]
    check.largest_rank(lambda c, t, b: b // _per_rank(c, t), _percent, cases=case)
    _wrong(capsys, 2, "raise ValueError")


# Exercise 3 ---------------------------------------------------------------------------------


def _merge(scale=lambda config: config["lora_alpha"] / config["r"], sign=1):
    def merge_adapter(model, adapter_dir):
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        tensors = load_file(Path(adapter_dir) / "adapter_model.safetensors")
        weights = dict(model.named_parameters())
        with torch.no_grad():
            for key, A in tensors.items():
                if ".lora_A." in key:
                    B = tensors[key.replace(".lora_A.", ".lora_B.")]
                    layer = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                    weights[layer + ".weight"] += sign * scale(config) * (B @ A)
        return model

    return merge_adapter


def test_merge_adapter_right(capsys):
    check.merge_adapter(_merge())
    lines = _said(capsys).splitlines()
    assert lines[0] == "✅ Exercise 3: `merge_adapter` passes the tests.", lines
    assert lines[1].startswith("the adapter moves the logits by up to"), lines


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        (_merge(scale=lambda config: 1.0), "the update is not scaled"),
        (_merge(scale=lambda config: config["lora_alpha"]), "not lora_alpha alone"),
        (_merge(sign=-1), "do not subtract it"),
        (lambda model, adapter_dir: model, "its weight did not change"),
        (
            lambda model, folder: PeftModel.from_pretrained(model, folder).merge_and_unload(),
            "loaded the adapter with PeftModel",
        ),
    ],
)
def test_merge_adapter_mistakes(answer, hint, capsys):
    check.merge_adapter(answer)
    _wrong(capsys, 3, hint)


def test_merge_adapter_names_rslora(capsys):
    rslora = LoraConfig(
        r=16, lora_alpha=8, use_rslora=True, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    check.merge_adapter(_merge(), cases=[(rslora, 1)])
    _wrong(capsys, 3, "rsLoRA")
    check.merge_adapter(
        _merge(scale=lambda config: config["lora_alpha"] / math.sqrt(config["r"])),
        cases=[(rslora, 1)],
    )
    assert _said(capsys).startswith("✅ Exercise 3")


# Exercise 4 (answers refused before the check trains) ---------------------------------------


def _sft_trainer(rows=None, **changes):
    def sft_trainer(
        model, tokenizer, examples, lora, steps, batch_size, learning_rate, warmup_steps, output_dir
    ):
        data_rows = rows(examples) if rows else [data.to_prompt_completion(e) for e in examples]
        settings = dict(
            output_dir=str(output_dir),
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=warmup_steps,
            logging_steps=1,
            save_strategy="no",
            bf16=False,
            gradient_checkpointing=False,
        )
        settings = {k: v for k, v in (settings | changes).items() if v is not ...}
        return SFTTrainer(
            model=model,
            args=SFTConfig(**settings),
            train_dataset=Dataset.from_list(data_rows),
            processing_class=tokenizer,
            peft_config=lora,
        )

    return sft_trainer


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        (_sft_trainer(lr_scheduler_type=...), "decays along a cosine"),
        (_sft_trainer(logging_steps=...), "logs every step"),
        (_sft_trainer(save_strategy=...), "save_strategy"),
        (_sft_trainer(gradient_checkpointing=...), "gradient_checkpointing on by default"),
        (_sft_trainer(rows=lambda examples: examples), "the prompt's tokens carry labels"),
    ],
)
def test_sft_trainer_mistakes(answer, hint, capsys):
    check.sft_trainer(answer)
    _wrong(capsys, 4, hint)


def test_sft_trainer_with_trls_bf16_is_named(capsys):
    check.sft_trainer(_sft_trainer(bf16=...))
    _wrong(capsys, 4, "bf16 on by default: switch it off")  # refused by TRL, or by the check


def test_sft_trainer_without_peft_config_is_named(capsys):
    def no_lora(model, tokenizer, examples, lora, *args):
        return _sft_trainer()(model, tokenizer, examples, None, *args)

    check.sft_trainer(no_lora)
    _wrong(capsys, 4, "no LoRA adapter")
