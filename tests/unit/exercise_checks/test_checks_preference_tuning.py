"""Lesson 13's exercise checks: the usual mistakes get the hint that names them.

Exercise 4's mistakes are the settings its check reads before it trains (a refused DPOConfig, the
logging interval), so no test here trains a model.
"""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

from course_utils import preference
from course_utils.exercise_checks import preference_tuning as check


@pytest.fixture(autouse=True)
def _learner(monkeypatch):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)


def _said(capsys) -> str:
    return capsys.readouterr().out.strip()


def _report(sign=1, scale=True, tie_wins=False, as_float=True):
    """A reward_report with the mistakes chosen by the arguments."""

    def reward_report(pc, pr, rc, rr, beta):
        factor = beta if scale else 1.0
        chosen, rejected = factor * (pc - rc), factor * (pr - rr)
        margins = sign * (chosen - rejected)
        wins = margins >= 0 if tie_wins else margins > 0
        margin = margins.mean()
        return {
            "chosen": chosen,
            "rejected": rejected,
            "margins": margins,
            "margin": margin.item() if as_float else margin,
            "accuracy": wins.float().mean().item(),
        }

    return reward_report


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        (_report(sign=-1), "the sign is flipped"),
        (_report(scale=False), "not scaled by beta"),
        (_report(as_float=False), "as a Python float"),
        (lambda pc, pr, rc, rr, beta: [pc, pr], "not a dict"),
    ],
)
def test_reward_report_mistakes(answer, hint, capsys):
    check.reward_report(answer)
    said = _said(capsys)
    assert said.startswith("❌ Exercise 1") and hint in said, said


def test_reward_report_right_and_a_tie_that_wins(capsys):
    check.reward_report(_report())
    assert _said(capsys).startswith("✅ Exercise 1: `reward_report` passes the tests.")
    _, _, rc, rr = check.visible_logps()
    check.reward_report(_report(tie_wins=True), cases=[(rc, rr, rc, rr, 0.1)])
    said = _said(capsys)
    assert said.startswith("❌ Exercise 1") and "a tie" in said, said


def _logp(start_late=False, mean=False, with_prompt=False):
    """An answer_logp with the mistakes chosen by the arguments."""

    def answer_logp(model, tokenizer, prompt, completion):
        n_prompt = len(
            tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        per_token = torch.log_softmax(logits[:-1], -1)[torch.arange(len(ids) - 1), ids[1:]]
        kept = per_token if with_prompt else per_token[n_prompt - 1 + start_late :]
        return (kept.mean() if mean else kept.sum()).item()

    return answer_logp


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        (_logp(with_prompt=True), "the prompt's tokens are in the sum"),
        (_logp(mean=True), "the log-probability is their sum"),
        (_logp(start_late=True), "starts one token late"),
    ],
)
def test_answer_logp_mistakes(answer, hint, tokenizer, capsys):
    pairs = preference.load_preference_pairs("test")[:3]
    check.answer_logp(answer, tokenizer, pairs)
    said = _said(capsys)
    assert said.startswith("❌ Exercise 2") and hint in said, said


def _margins(pc, pr, rc, rr, beta):
    return beta * ((pc - rc) - (pr - rr))


def _weights(pc, pr, rc, rr, beta):
    return torch.sigmoid(-_margins(pc, pr, rc, rr, beta))


def _loss(pc, pr, rc, rr, beta):
    return -torch.nn.functional.logsigmoid(_margins(pc, pr, rc, rr, beta)).mean()


@pytest.mark.parametrize(
    ("loss", "weights", "hint"),
    [
        (
            lambda *a: -torch.log(torch.sigmoid(_margins(*a))).mean(),
            _weights,
            "underflows",
        ),
        (lambda *a: -torch.nn.functional.logsigmoid(_margins(*a)).sum(), _weights, "the mean"),
        (lambda *a: torch.nn.functional.logsigmoid(_margins(*a)).mean(), _weights, "MINUS"),
        (_loss, lambda *a: torch.sigmoid(_margins(*a)), "the sign is flipped"),
        (_loss, lambda *a: a[-1] / len(a[0]) * _weights(*a), "without beta / N"),
    ],
)
def test_dpo_loss_mistakes(loss, weights, hint, capsys):
    check.dpo_loss(loss, weights)
    said = _said(capsys)
    assert said.startswith("❌ Exercise 3") and hint in said, said


def test_dpo_loss_right(capsys):
    check.dpo_loss(_loss, _weights)
    said = _said(capsys)
    assert said.startswith("✅ Exercise 3") and "log 2 = 0.6931: 0.6931" in said, said


def _trainer(**settings):
    """A dpo_trainer whose DPOConfig takes `settings` (the mistakes) besides the run's."""

    def dpo_trainer(
        model, tokenizer, pairs, beta, loss_type, r, steps, batch_size, learning_rate, output_dir
    ):
        dataset = Dataset.from_list(
            [{key: pair[key] for key in ("prompt", "chosen", "rejected")} for pair in pairs]
        )
        config = DPOConfig(
            output_dir=str(output_dir),
            beta=beta,
            loss_type=loss_type,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            save_strategy="no",
            gradient_checkpointing=False,
            **settings,
        )
        lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear")
        return DPOTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
        )

    return dpo_trainer


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        (_trainer(logging_steps=1), "turns bf16 on by default"),  # refused on a CPU, read on a GPU
        (_trainer(bf16=False), "TRL logs every 10 steps by default"),
    ],
)
def test_dpo_trainer_mistakes_in_the_settings(answer, hint, tokenizer, capsys):
    pairs = preference.load_preference_pairs("train")[:4]
    check.dpo_trainer(answer, tokenizer, pairs)
    said = _said(capsys)
    assert said.startswith("❌ Exercise 4") and hint in said, said
