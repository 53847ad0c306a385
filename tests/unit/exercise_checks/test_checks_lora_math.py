"""Lesson 02's exercise checks: the usual mistakes get the hint that names them."""

import pytest
import torch

from course_utils.exercise_checks import lora_math as check


@pytest.fixture(autouse=True)
def _learner(monkeypatch):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)


def _said(capsys) -> str:
    return capsys.readouterr().out.strip()


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        (lambda x, W, A, B, alpha, r: x @ W.T, "only the frozen layer's output"),
        (lambda x, W, A, B, alpha, r: x @ W.T + x @ A.T @ B.T, "is not scaled"),
        (lambda x, W, A, B, alpha, r: x @ W.T + alpha * x @ A.T @ B.T, "by alpha alone"),
        (lambda x, W, A, B, alpha, r: x @ W, "shape"),
        (lambda x, W, A, B, alpha, r: (x @ W.T).tolist(), "not a torch.Tensor"),
    ],
)
def test_lora_forward_mistakes(answer, hint, capsys):
    check.lora_forward(answer)
    said = _said(capsys)
    assert said.startswith("❌ Exercise 1") and hint in said, said


def test_lora_forward_right(capsys):
    check.lora_forward(lambda x, W, A, B, alpha, r: x @ W.T + (alpha / r) * (x @ A.T @ B.T))
    assert _said(capsys) == "✅ Exercise 1: `lora_forward` passes the tests."


def test_counts_with_full_size_kv_get_the_grouped_query_hint(capsys):
    def counts(config, r):
        h, i = config["hidden_size"], config["intermediate_size"]
        return {
            **{name: r * 2 * h for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
            **{name: r * (h + i) for name in ("gate_proj", "up_proj", "down_proj")},
        }

    check.lora_param_counts(counts, lambda config, r, targets: 0)
    assert "grouped-query attention" in _said(capsys)


def test_best_rank_r_squared_error_is_named(capsys):
    def best(W, r):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        W_r = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r, :]
        return W_r, torch.linalg.norm(W - W_r) ** 2

    check.best_rank_r(best)
    assert "not its square" in _said(capsys)


def test_best_rank_r_smallest_singular_values_are_named(capsys):
    def best(W, r):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        W_r = U[:, -r:] @ torch.diag(S[-r:]) @ Vh[-r:, :]
        return W_r, torch.linalg.norm(W - W_r)

    check.best_rank_r(best)
    assert "LARGEST" in _said(capsys)
