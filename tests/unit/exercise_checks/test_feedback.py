"""The one-line verdicts of an exercise check: printed for a learner, raised under nbgrader."""

import pytest
import torch

from course_utils.exercise_checks.feedback import Wrong, allclose, exercise, expect


@exercise(4, "double")
def _check_double(double, cases=((1, 2), (3, 6))):
    for x, want in cases:
        expect(double(x) == want, f"double({x}) is {double(x)}, expected {want}. Hint: times two.")
    return "a report shown under the ✅ line"


def _stub(x):
    raise NotImplementedError()


def test_a_pass_prints_a_tick_then_the_report(capsys):
    _check_double(lambda x: 2 * x)
    assert capsys.readouterr().out.splitlines() == [
        "✅ Exercise 4: `double` passes the tests.",
        "a report shown under the ✅ line",
    ]


def test_the_hidden_cases_say_so_and_print_no_report(capsys):
    _check_double(lambda x: 2 * x, cases=[(5, 10)])
    assert capsys.readouterr().out == "✅ Exercise 4: `double` passes the grader's further cases.\n"


@pytest.mark.parametrize(
    ("answer", "line"),
    [
        (_stub, "⏳ Exercise 4 is not answered yet: write `double` above."),
        (lambda x: x + 1, "❌ Exercise 4: double(3) is 4, expected 6. Hint: times two."),
    ],
)
def test_a_learner_sees_one_line_and_no_exception(answer, line, capsys, monkeypatch):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    _check_double(answer)
    assert capsys.readouterr().out == line + "\n"


def test_an_exception_in_the_learners_code_is_named_with_its_line(capsys, monkeypatch):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)

    def double(x):
        return torch.ones(2) @ torch.ones(3)

    _check_double(double)
    out = capsys.readouterr().out
    assert out.startswith("❌ Exercise 4: your code raised RuntimeError:"), out
    assert "(in double, line" in out and "`return torch.ones(2) @ torch.ones(3)`" in out
    assert out.count("\n") == 1


@pytest.mark.parametrize("mode", ["validate", "autograde"])
def test_under_nbgrader_a_wrong_or_missing_answer_raises(mode, monkeypatch, capsys):
    monkeypatch.setenv("NBGRADER_EXECUTION", mode)
    with pytest.raises(AssertionError, match="not answered yet"):
        _check_double(_stub)
    with pytest.raises(AssertionError, match=r"^❌ Exercise 4: double\(3\) is 4"):
        _check_double(lambda x: x + 1)
    _check_double(lambda x: 2 * x)  # a right answer passes silently apart from its line
    assert capsys.readouterr().out.startswith("✅ Exercise 4")


def test_comparisons_are_bound_before_the_learners_code_runs(monkeypatch):
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    monkeypatch.setattr(torch, "allclose", lambda *a, **k: True)  # a submission's trick
    from course_utils.exercise_checks import lora_math

    def wrong(x, W, A, B, alpha, r):
        return x @ W.T

    with pytest.raises(AssertionError, match="only the frozen layer's output"):
        lora_math.lora_forward(wrong)


def test_a_check_is_declared_with_its_number_and_answer():
    with pytest.raises(ValueError, match="exercise's number"):
        exercise(0, "f")
    with pytest.raises(ValueError, match="name the function"):
        exercise(1)
    assert issubclass(Wrong, AssertionError)


def test_a_library_not_implemented_error_is_a_wrong_answer_not_an_unanswered_one(
    capsys, monkeypatch
):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)

    def double(x):
        raise NotImplementedError("'lshift' not implemented for 'Float'")

    _check_double(double)
    out = capsys.readouterr().out
    assert out.startswith("❌ Exercise 4: your code raised NotImplementedError: 'lshift'"), out


LIARS = """
import torch


class Yes:
    def __eq__(self, other):
        return True


def yes(x):
    return Yes()


def yes_inside(x):
    return {"value": [Yes()]}


def agreeable(x):
    def agree(cls, func, types, args=(), kwargs=None):
        if func in (torch.allclose, torch.equal):
            return True
        return torch.Tensor.__torch_function__.__func__(cls, func, types, args, kwargs or {})

    kind = type("Agreeable", (torch.Tensor,), {"__torch_function__": classmethod(agree)})
    return torch.zeros(2).as_subclass(kind)
"""


@exercise(5, "same")
def _check_same(same):
    got = same(torch.ones(2))
    expect(got == 7 or allclose(got, torch.full((2,), 7.0)), "same(x) is not 7. Hint: seven.")


@pytest.fixture
def liars():
    """Functions written as in a notebook (module __main__) whose results say yes to anything."""
    namespace = {"__name__": "__main__"}
    exec(compile(LIARS, "<notebook cell>", "exec"), namespace)
    return namespace


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("yes", "an object of the class Yes written in the notebook"),
        ("yes_inside", "an object of the class Yes written in the notebook"),
        ("agreeable", "returned a Agreeable, a subclass of torch.Tensor"),
    ],
)
def test_an_answer_that_agrees_with_everything_is_caught(liars, name, said, capsys):
    _check_same(liars[name])
    out = capsys.readouterr().out
    assert out.startswith("❌ Exercise 5:") and said in out, out


def test_without_the_vetting_those_answers_would_pass(liars):
    assert liars["yes"](0) == 7
    assert allclose(liars["agreeable"](0), torch.full((2,), 7.0))


def test_only_the_answers_are_vetted_not_the_other_arguments(capsys):
    @exercise(6, "apply")
    def check(apply, tool):
        expect(apply(tool) == 3 and tool.calls == 1, "apply(tool) is not 3. Hint: call it once.")

    class Tool:  # a callable argument (a tokenizer, say): passed as it is
        calls = 0

        def __call__(self):
            self.calls += 1
            return 3

    check(lambda tool: tool(), Tool())
    assert capsys.readouterr().out.startswith("✅ Exercise 6")
