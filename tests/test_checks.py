"""charlm.checks: every setting's check accepts what it should, refuses the rest in one error form."""

from __future__ import annotations

from typing import Literal

import pytest

from charlm import UserError
from charlm.checks import choice, flag, number, options, whole

Colour = Literal["red", "green"]


@pytest.mark.parametrize("value", [2, 5])
def test_whole_accepts_numbers_in_range(value):
    assert whole("a.n", value, 2, maximum=5) == value


@pytest.mark.parametrize("value", [1, 6, True, 2.0, "3", None])
def test_whole_refuses_with_the_key_and_the_bound(value):
    with pytest.raises(UserError, match=r"^a\.n=.* must be a whole number from 2 to 5; e\.g\. a\.n=3\.$"):
        whole("a.n", value, 2, maximum=5, example=3)


@pytest.mark.parametrize("value", [-1, True, False])
def test_whole_without_maximum_says_at_least(value):
    with pytest.raises(UserError, match=r"^x=.* must be a whole number >= 0\.$"):
        whole("x", value)


@pytest.mark.parametrize("value", [0, 0.5, 0.999])
def test_number_half_open_interval(value):
    assert number("model.dropout", value, 0, 1, high_open=True) == value


@pytest.mark.parametrize("value", [1, -0.1, float("nan"), True, "0.1"])
def test_number_refuses_outside_the_interval(value):
    with pytest.raises(UserError, match=r"must be in \[0, 1\); e\.g\. model\.dropout=0\.2\.$"):
        number("model.dropout", value, 0, 1, high_open=True, example=0.2)


def test_number_positive():
    assert number("lr", 1e-3, 0, low_open=True) == 1e-3
    with pytest.raises(UserError, match=r"^lr=0 must be positive\.$"):
        number("lr", 0, 0, low_open=True)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_number_refuses_what_is_not_finite_even_without_a_bound(value):
    with pytest.raises(UserError, match=r"must be >= 0"):
        number("optim.weight_decay", value, 0)
    with pytest.raises(UserError, match=r"must be a number"):
        number("x", value)


def test_flag():
    assert flag("model.layer_norm", False) is False
    with pytest.raises(UserError, match="must be true or false"):
        flag("model.layer_norm", "yes")


def test_choice_reads_the_allowed_values_from_the_literal():
    assert options(Colour) == ("red", "green")
    assert choice("colour", "green", Colour) == "green"
    with pytest.raises(UserError, match=r"^colour='blue' is not known; use one of red, green\.$"):
        choice("colour", "blue", Colour)
    with pytest.raises(UserError, match="is not known"):
        choice("colour", ["red"], ("red",))
