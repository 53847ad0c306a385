"""Tests for course_utils.claims: a lesson's claims, recorded where measured, reported at the end."""

import pytest

from course_utils.claims import ClaimFailed, Claims


def test_report_lists_every_claim_with_a_tick_and_passes_when_all_hold(capsys):
    claims = Claims()
    claims.add("the loss went down", 0.4 < 2.1, first=2.1, last=0.4)
    claims.add("the adapter is a small file", True)
    claims.report()
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "✓ the loss went down (first = 2.1, last = 0.4)",
        "✓ the adapter is a small file",
        "All 2 claims of this lesson hold on this run.",
    ]
    assert claims.failed == []


def test_report_raises_naming_the_failed_claim_and_its_measured_values(capsys):
    claims = Claims()
    claims.add("the loss went down", True, first=2.0, last=0.5)
    claims.add("the fine-tuned model scores higher", 0.25 > 0.5, before=0.5, after=0.25)
    claims.add("merging keeps the logits", True)
    with pytest.raises(ClaimFailed) as failure:
        claims.report()
    message = str(failure.value)
    assert message.startswith("1 of 3 claims did not hold: ")
    assert "the fine-tuned model scores higher (before = 0.5, after = 0.25)" in message
    assert "the loss went down" not in message  # only the failures are named
    # a failing claim is still listed with the others, marked ✗, before the error
    out = capsys.readouterr().out
    assert "✗ the fine-tuned model scores higher (before = 0.5, after = 0.25)" in out
    assert "✓ the loss went down (first = 2, last = 0.5)" in out
    assert "✓ merging keeps the logits" in out
    assert "All 3 claims" not in out
    # ClaimFailed is an AssertionError: nbval and pytest report it as a failed check
    assert isinstance(failure.value, AssertionError)


def test_every_failed_claim_is_named_not_only_the_first():
    claims = Claims()
    claims.add("first claim fails", False, x=1)
    claims.add("second claim holds", True)
    claims.add("third claim fails", 0, wrong=["a", "b"])
    assert claims.failed == ["first claim fails (x = 1)", "third claim fails (wrong = ['a', 'b'])"]
    with pytest.raises(
        ClaimFailed, match=r"^2 of 3 claims did not hold: first claim fails \(x = 1\); third"
    ):
        claims.report()


def test_a_claim_is_judged_by_the_truth_of_its_condition():
    claims = Claims()
    claims.add("an empty list is false", [])
    claims.add("a non-empty list is true", [0])
    assert [ok for _, ok, _ in claims.items] == [False, True]


def test_long_values_are_shortened_and_floats_rounded():
    claims = Claims()
    claims.add("a long value", False, text="x" * 200, ratio=1 / 3)
    [line] = claims.failed
    assert "text = '" + "x" * 116 + "..." in line and len(line) < 200
    assert "ratio = 0.3333" in line


def test_an_empty_claims_raises():
    with pytest.raises(ClaimFailed, match="no claim was recorded"):
        Claims().report()


@pytest.mark.parametrize("claim", ["", "   ", None, 3, True])
def test_a_claim_that_is_not_a_sentence_raises_value_error(claim):
    claims = Claims()
    with pytest.raises(ValueError, match="claim must be a sentence"):
        claims.add(claim, True)
    assert claims.items == []  # nothing was recorded


def test_the_sentence_is_recorded_without_surrounding_spaces(capsys):
    claims = Claims()
    claims.add("  the loss went down \n", True)
    claims.report()
    assert capsys.readouterr().out.startswith("✓ the loss went down\n")


def test_a_claim_recorded_again_replaces_the_earlier_run(capsys):
    claims = Claims()
    claims.add("the loss went down", False, last=2.5)
    claims.add("the adapter is small", True)
    claims.add("the loss went down", True, last=0.5)  # the cell was run again
    claims.report()
    assert capsys.readouterr().out.splitlines()[:2] == [
        "✓ the loss went down (last = 0.5)",
        "✓ the adapter is small",
    ]


def test_a_condition_of_several_values_asks_to_be_reduced():
    torch = pytest.importorskip("torch")
    claims = Claims()
    with pytest.raises(ValueError, match=r"not one True or False.*\.all\(\)"):
        claims.add("the codes match", torch.tensor([1, 2]) == torch.tensor([1, 2]))
    assert claims.items == []
