"""Lesson 07's exercise checks: the usual mistakes get the hint that names them."""

import math

import pytest
import torch

from course_utils import assets, callbacks, data, memory
from course_utils.exercise_checks import full_finetuning_lab as check


@pytest.fixture(autouse=True)
def _learner(monkeypatch):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)


def _said(capsys) -> str:
    return capsys.readouterr().out.strip()


def _failed(said: str, number: int, hint: str) -> bool:
    return said.startswith(f"❌ Exercise {number}") and "Hint:" in said and hint in said


@pytest.fixture(scope="module")
def notebook():
    """What the notebook's set-up gives the checks: the tokenizer, the text, a tiny model."""
    tokenizer = assets.load_tokenizer()
    texts = data.load_python_reference("validation")
    model = assets.tiny_llama(tokenizer, seed=0).eval()
    examples = data.load_instruction_task("validation")[:4]
    return model, tokenizer, texts, examples


# Exercise 1.


def _ppl(losses):
    values = [float(v) for sequence in losses for v in torch.as_tensor(sequence).reshape(-1)]
    if not values:
        raise ValueError("no loss")
    return math.exp(sum(values) / len(values))


def _mean_of_means(losses):
    means = [sum(float(v) for v in sequence) / len(sequence) for sequence in losses]
    return math.exp(sum(means) / len(means))


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        (_mean_of_means, "mean of the pieces' means"),
        (lambda losses: math.log(_ppl(losses)), "the mean loss"),
        (lambda losses: 2 ** math.log(_ppl(losses)), "natural logarithms"),
        (lambda losses: torch.tensor(_ppl(losses)), "not a float"),
    ],
)
def test_perplexity_mistakes(answer, hint, notebook, capsys):
    model, tokenizer, texts, _ = notebook
    check.perplexity_from_losses(answer, model, tokenizer, texts)
    said = _said(capsys)
    assert _failed(said, 1, hint), said


def test_perplexity_of_nothing_must_raise(capsys):
    def answer(losses):
        values = [float(v) for sequence in losses for v in sequence]
        return math.exp(sum(values) / len(values))

    check.perplexity_from_losses(answer, None, None, None, cases=[], empty=[[[]]])
    said = _said(capsys)
    assert _failed(said, 1, "raise a ValueError"), said


def test_perplexity_right(notebook, capsys):
    model, tokenizer, texts, _ = notebook
    check.perplexity_from_losses(_ppl, model, tokenizer, texts)
    said = _said(capsys)
    assert said.startswith("✅ Exercise 1: `perplexity_from_losses` passes the tests."), said


# Exercise 2.


def _token_losses(model, input_ids, labels=None, attention_mask=None, *, shift=True, sign=-1):
    input_ids = torch.as_tensor(input_ids)
    labels = input_ids if labels is None else torch.as_tensor(labels)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = labels[:, 1:] if shift else input_ids[:, :-1]
    keep = labels[:, 1:] != -100
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return [sign * picked[row][keep[row]] for row in range(input_ids.shape[0])]


def _all_positions(model, input_ids, labels=None, attention_mask=None):
    input_ids = torch.as_tensor(input_ids)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = log_probs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return list(-picked)


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        (lambda *a: _token_losses(*a, shift=False), "against its own token"),
        (lambda *a: _token_losses(*a, sign=1), "log-probabilities"),
        (_all_positions, "next label is not -100"),
        (lambda *a: torch.cat(_token_losses(*a)), "shape"),
    ],
)
def test_token_losses_mistakes(answer, hint, notebook, capsys):
    check.token_losses(answer, *notebook)
    said = _said(capsys)
    assert _failed(said, 2, hint), said


def test_token_losses_must_take_lists(notebook, capsys):
    model, tokenizer, texts, examples = notebook
    check.token_losses(
        lambda model, ids, *a: [row[1:] for row in ids.float()],
        model,
        tokenizer,
        texts,
        examples,
        cases=[("lists", model, 16, 2)],
    )
    said = _said(capsys)
    assert _failed(said, 2, "lists of lists"), said


def test_token_losses_right(notebook, capsys):
    check.token_losses(_token_losses, *notebook)
    said = _said(capsys)
    assert said.startswith("✅ Exercise 2: `token_losses` passes the tests."), said


# Exercise 3.


def _row(peak_mb, task_loss, perplexity):
    result = callbacks.TrainResult(
        label="run",
        steps=1,
        batch_size=1,
        seconds=0.0,
        trainable_params=1000,
        total_params=2000,
        peak_memory=int(peak_mb * 2**20),
    )
    return {"result": result, "task_loss": task_loss, "perplexity": perplexity}


ROWS = {
    "full": _row(3000, 0.02, 8.4),
    "lora": _row(2000, 0.03, 7.6),
    "lora twin": _row(2000, 0.03, 7.6),
    "qlora": _row(500, 0.03, 7.9),
    "bad": _row(2500, 0.04, 8.0),
}


def _comparison(rows, ppl_before, *, mb=2**20, ratio=False):
    return [
        {
            "method": name,
            "trainable": row["result"].trainable_params,
            "peak_mb": row["result"].peak_memory / mb,
            "task_loss": row["task_loss"],
            "forgetting": row["perplexity"] / ppl_before - (0 if ratio else 1),
        }
        for name, row in rows.items()
    ]


def _front(table, *, strict=True):
    keys = ("peak_mb", "task_loss", "forgetting")

    def dominates(a, b):
        better = any(a[k] < b[k] for k in keys) if strict else a is not b
        return all(a[k] <= b[k] for k in keys) and better

    return [b["method"] for b in table if not any(dominates(a, b) for a in table)]


def _pick(table, memory_mb, max_forgetting, *, ties=True):
    allowed = [
        (row["task_loss"], row["peak_mb"] if ties else 0, i, row["method"])
        for i, row in enumerate(table)
        if row["peak_mb"] <= memory_mb and row["forgetting"] <= max_forgetting
    ]
    return min(allowed)[3] if allowed else None


@pytest.mark.parametrize(
    ("answers", "hint"),
    [
        ((lambda r, p: _comparison(r, p, ratio=True), _front, _pick), "ratio of the perplexities"),
        ((lambda r, p: _comparison(r, p, mb=1e6), _front, _pick), "2**20 bytes"),
        ((_comparison, lambda t: _front(t, strict=False), _pick), "identical row"),
        ((_comparison, lambda t: _front(t)[::-1], _pick), "table order"),
        ((_comparison, _front, lambda *a: _pick(*a, ties=False)), "smaller peak_mb"),
        ((_comparison, _front, lambda t, m, f: _pick(t, m, 10.0)), "over the"),
    ],
)
def test_comparison_mistakes(answers, hint, capsys):
    check.comparison(*answers, ROWS, 7.5, cases=[(ROWS, 7.5, [(2500, 0.1), (2000, 0.05)])])
    said = _said(capsys)
    assert _failed(said, 3, hint), said


def test_comparison_must_leave_rows_alone(capsys):
    def comparison(rows, ppl_before):
        table = _comparison(rows, ppl_before)
        rows.clear()
        return table

    check.comparison(comparison, _front, _pick, dict(ROWS), 7.5)
    said = _said(capsys)
    assert _failed(said, 3, "leave rows alone"), said


def test_comparison_right_on_the_lab_rows(capsys):
    rows = {
        name: {
            "result": callbacks.TrainResult(
                label=name,
                steps=1,
                batch_size=8,
                seconds=0.0,
                trainable_params=estimate.trainable_params,
                total_params=estimate.n_params,
                peak_memory=estimate.total,
            ),
            "task_loss": loss,
            "perplexity": ppl,
        }
        for name, estimate, loss, ppl in (
            ("full", memory.estimate("SmolLM2-135M", method="full", batch=8), 0.02, 8.4),
            ("qlora", memory.estimate("SmolLM2-135M", method="qlora", batch=8), 0.03, 7.9),
        )
    }
    check.comparison(_comparison, _front, _pick, rows, 7.5)
    said = _said(capsys)
    assert said.startswith("✅ Exercise 3: `comparison`, `worth_considering` and `pick` pass"), said
    assert "worth considering: ['full', 'qlora']" in said
