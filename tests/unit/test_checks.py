"""course_utils.checks: one sentence per bad argument, naming it and what to pass instead."""

import math

import pytest

from course_utils.checks import WrongType, flag, fraction, one_of, positive_int, positive_number


def test_good_values_come_back():
    assert positive_int(3, "r", "r=8") == 3
    assert positive_number(2, "alpha", "alpha=16") == 2.0
    assert fraction(0.0, "dropout", "dropout=0.05") == 0.0
    assert flag(False, "use_rslora") is False
    assert one_of("lora", "method", ("full", "lora")) == "lora"


@pytest.mark.parametrize(
    ("check", "value", "error"),
    [
        (positive_int, 0, ValueError),
        (positive_int, -1, ValueError),
        (positive_int, 2.0, WrongType),
        (positive_int, True, WrongType),
        (positive_number, 0.0, ValueError),
        (positive_number, math.nan, ValueError),
        (positive_number, math.inf, ValueError),
        (positive_number, "1", WrongType),
        (fraction, 1.0, ValueError),
        (fraction, -0.1, ValueError),
        (fraction, None, WrongType),
    ],
)
def test_bad_values_raise_one_sentence_with_an_example(check, value, error):
    with pytest.raises(error, match=r"^x must be .*; try x=1\.$") as info:
        check(value, "x", "x=1")
    assert str(info.value).count(".") <= 3  # one sentence (the example may hold a decimal point)


def test_a_wrong_type_is_both_a_type_error_and_a_value_error():
    for caught in (TypeError, ValueError):
        with pytest.raises(caught):
            positive_int("8", "r", "r=8")
    with pytest.raises(TypeError, match="True or False"):
        flag(1, "use_rslora")


def test_one_of_names_the_choices_even_for_an_unhashable_value():
    with pytest.raises(
        ValueError, match=r"method must be one of \['full', 'lora'\] \(got 'dora'\)"
    ):
        one_of("dora", "method", ("full", "lora"))
    with pytest.raises(ValueError, match="must be one of"):
        one_of(["lora"], "method", {"full": 1, "lora": 2})


def test_numpy_numbers_pass_as_the_plain_python_ones():
    """A rank or a size from a NumPy array is an integer too (lesson 02 sweeps np.arange ranks)."""
    np = pytest.importorskip("numpy")
    assert positive_int(np.int64(8), "r", "r=8") == 8
    assert type(positive_int(np.int64(8), "r", "r=8")) is int
    assert positive_number(np.float32(0.5), "alpha", "alpha=16") == 0.5
    assert fraction(np.float32(0.25), "dropout", "dropout=0.05") == 0.25
