"""Lesson 10's exercise checks: the usual mistakes get the hint that names them."""

import pytest
import torch
import torch.nn.functional as F

from course_utils import data, memory
from course_utils.exercise_checks import unsloth_lab as check

IGNORE = data.IGNORE_INDEX


@pytest.fixture(autouse=True)
def _learner(monkeypatch):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)


def _said(capsys) -> str:
    return capsys.readouterr().out.strip()


def _bytes(per_value=4, chunked=True, shift=0):
    """A logits_bytes with one mistake: bytes per value, chunk_rows ignored, shifted positions."""

    def logits_bytes(config, batch, seq_len, chunk_rows=None):
        rows = batch * (seq_len - shift)
        if chunked and chunk_rows is not None:
            rows = min(rows, chunk_rows)
        return rows * memory.get_config(config)["vocab_size"] * per_value

    return logits_bytes


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        (_bytes(per_value=1), "each fp32 value takes 4 bytes"),
        (_bytes(per_value=2), "upcasts the logits to fp32"),
        (_bytes(chunked=False), "only chunk_rows rows of logits exist at once"),
        (_bytes(shift=1), "all seq_len positions"),
        (lambda config, batch, seq_len, chunk_rows=None: 1.5, "not an int"),
    ],
)
def test_logits_bytes_mistakes(answer, hint, capsys):
    check.logits_bytes(answer)
    said = _said(capsys)
    assert said.startswith("❌ Exercise 1") and hint in said, said


def test_logits_bytes_right_reports_the_chunk(capsys):
    check.logits_bytes(_bytes())
    said = _said(capsys)
    assert said.startswith("✅ Exercise 1: `logits_bytes` passes the tests."), said
    assert "a chunk of 341 rows: 64 MB" in said


def _targets(labels):
    """The next-token targets, -100 at the end of each row."""
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    return targets.reshape(-1)


def _nll(shift=True, per_chunk_mean=False, chunked=True):
    """A chunked_nll with one mistake."""

    def chunked_nll(hidden, weight, labels, chunk_rows):
        rows = hidden.reshape(-1, hidden.shape[-1])
        targets = _targets(labels) if shift else labels.reshape(-1)
        step = chunk_rows if chunked else len(rows)
        losses = [
            F.cross_entropy(
                (rows[s : s + step] @ weight.T).float(),
                targets[s : s + step],
                reduction="mean" if per_chunk_mean else "sum",
            )
            for s in range(0, len(rows), step)
        ]
        if per_chunk_mean:
            return torch.stack(losses).mean()
        return sum(losses) / (targets != IGNORE).sum()

    return chunked_nll


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        (_nll(shift=False), "shift the labels"),
        (_nll(per_chunk_mean=True), "reduction='mean' gives NaN"),
        (_nll(chunked=False), "never all of them"),
    ],
)
def test_chunked_nll_mistakes(answer, hint, capsys):
    check.chunked_nll(answer)
    said = _said(capsys)
    assert said.startswith("❌ Exercise 2") and hint in said, said


def test_chunked_nll_right_reports_the_blocks(capsys):
    check.chunked_nll(_nll())
    said = _said(capsys)
    assert said.startswith("✅ Exercise 2: `chunked_nll` passes the tests."), said
    assert "largest block  64 rows" in said


def test_chunked_nll_not_answered(capsys):
    def chunked_nll(hidden, weight, labels, chunk_rows):
        raise NotImplementedError()

    check.chunked_nll(chunked_nll)
    assert _said(capsys).startswith("⏳ Exercise 2 is not answered yet")


def _backward(sign=1.0, divide=True):
    """A chunked_nll_backward by hand, with a wrong sign or without the division by n."""

    def chunked_nll_backward(hidden, weight, labels, chunk_rows):
        rows = hidden.reshape(-1, hidden.shape[-1])
        targets = _targets(labels)
        counted = targets != IGNORE
        n = counted.sum()
        total, grad = torch.zeros(()), torch.zeros_like(rows)
        for s in range(0, len(rows), chunk_rows):
            y, keep = targets[s : s + chunk_rows], counted[s : s + chunk_rows]
            logits = (rows[s : s + chunk_rows] @ weight.T).float()
            total = total + F.cross_entropy(logits, y, reduction="sum")
            block = torch.softmax(logits, -1) - F.one_hot(torch.where(keep, y, 0), logits.shape[-1])
            grad[s : s + chunk_rows] = sign * (block * keep[:, None]) @ weight
        return total / n, (grad / n if divide else grad).reshape(hidden.shape)

    return chunked_nll_backward


def _with_autograd(hidden, weight, labels, chunk_rows):
    h = hidden.detach().clone().requires_grad_()
    with torch.enable_grad():
        loss = _nll()(h, weight, labels, chunk_rows)
        loss.backward()
    return loss.detach(), h.grad


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        (_with_autograd, "called autograd"),
        (_backward(divide=False), "divide by n"),
        (_backward(sign=-1.0), "not onehot - softmax"),
        (lambda hidden, weight, labels, chunk_rows: hidden, "return (loss, grad_hidden)"),
    ],
)
def test_chunked_nll_backward_mistakes(answer, hint, capsys):
    check.chunked_nll_backward(answer)
    said = _said(capsys)
    assert said.startswith("❌ Exercise 3") and hint in said, said


def test_chunked_nll_backward_right_reports_the_training_step(capsys):
    check.chunked_nll_backward(_backward())
    said = _said(capsys)
    assert said.startswith("✅ Exercise 3: `chunked_nll_backward` passes the tests."), said
    assert "gradients match the model's own loss's" in said
