"""The one check of settings: a value against its type hint and the range declared
beside it, as one line naming the setting, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import pytest

from lmt_tf.checks import (
    OneOf,
    Range,
    Returned,
    check_arguments,
    check_types,
    check_value,
    parameter_hints,
)
from lmt_tf.errors import ConfigError

Sparsity = Annotated[float, Range(gt=0, lt=1)]
Mode = Annotated[str, OneOf("float", "int8")]


@pytest.mark.parametrize("value, hint, message", [
    # the type first: what is allowed, in words, with the type of what was given
    ("high", Sparsity, "s must be a number in (0, 1), got 'high' (str)"),
    (True, float, "s must be a number, got True (bool)"),
    (100.5, Annotated[int, Range(ge=1)], "s must be an integer >= 1, got 100.5 (float)"),
    (5, Sequence[float], "s must be a list of numbers, got 5 (int)"),
    (None, Annotated[float, Range(gt=0)], "s must be a number > 0, got None (NoneType)"),
    ("ten", Annotated[int, Range(ge=1)] | None,
     "s must be None or an integer >= 1, got 'ten' (str)"),
    (0.5, tuple[float, float], "s must be (a number, a number), got 0.5 (float)"),
    ([0.5], tuple[float, float], "s must be (a number, a number), got [0.5] (list)"),
    ({"a": "b"}, dict[str, float], "s must be a dict of strings to numbers, got {'a': 'b'}"),
    ("x", Callable[..., Any], "s must be a function or class (@name), got 'x' (str)"),
    # a string is not a list of strings
    ("int8", Sequence[Mode], "s must be a list of values from ('float', 'int8'), got 'int8' "
                             "(a string, not a list: write ['int8'])"),
    ("ab", Sequence[str], "(a string, not a list: write ['ab'])"),
    # the range, when the type is right
    (1.0, Sparsity, "s must be in (0, 1), got 1.0"),
    (0, Annotated[int, Range(ge=1)] | None, "s must be None or >= 1, got 0"),
    ("int4", Mode, "s must be one of ('float', 'int8'), got 'int4'"),
    (["int4"], Sequence[Mode], "s must be a list of values from ('float', 'int8'), got "
                               "['int4'] (list)"),
    ([0.1, 2], Sequence[Annotated[float, Range(le=1)]], "s must be a list of numbers <= 1"),
    (-1, Annotated[float, Range(ge=0, le=1)], "s must be in [0, 1], got -1"),
])
def test_a_value_that_does_not_fit_is_one_line_naming_what_is_allowed(
        value: Any, hint: Any, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        check_value(value, hint, "s")
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("value, hint", [
    (0.5, Sparsity), (3, float), ([1, 2], tuple[int, ...]), ((1, 2), Sequence[int]),
    ([0.1, 0.9], tuple[float, float]), (None, Sparsity | None), (["int8"], Sequence[Mode]),
    ({"dense": 1}, dict[str, float]), (print, Callable[..., Any]), ("a", Any),
    (Returned(None), int),  # what a call returns, unknown: not refused
])
def test_a_value_that_fits_passes(value: Any, hint: Any) -> None:
    check_value(value, hint, "s")


class _Config:
    pass


class _Transform:
    def __call__(self) -> None:
        pass


def test_what_a_configured_call_returns_is_judged_by_its_type() -> None:
    check_value(Returned(_Config), _Config | None, "s")
    check_value([Returned(_Transform)], tuple[Callable[..., Any], ...], "s")
    with pytest.raises(ConfigError, match="s must be a function or class"):
        check_value(Returned(_Config), Callable[..., Any], "s")
    # a class where its instance belongs: call it; a call where a callable belongs: not
    with pytest.raises(ConfigError, match=r"got @_Config \(a class: call it, @_Config\(\)\)"):
        check_value(_Config, _Config | None, "s", "@_Config")
    with pytest.raises(ConfigError, match=r"got @f\(\) \(what a call returns: bind it "
                                          r"uncalled, @f\)$"):
        check_value(Returned(_Config), Callable[..., Any], "s", "@f()")


@dataclass
class _Settings:
    rate: Annotated[float, Range(gt=0)] = 1.0
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_types(self)


def _function(size: Annotated[int, Range(ge=1)], name: str = "", *rest: int,
              **more: Any) -> None:
    pass


def test_hints_of_functions_classes_and_dataclasses_keep_their_ranges() -> None:
    assert parameter_hints(_function) == {"size": Annotated[int, Range(ge=1)], "name": str}
    assert parameter_hints(_Settings)["rate"] == Annotated[float, Range(gt=0)]
    check_arguments("f", _function, {"size": 2, "elsewhere": "ignored"})
    with pytest.raises(ConfigError, match=r"^f.size must be >= 1, got 0$"):
        check_arguments("f", _function, {"size": 0})


def test_a_config_dataclass_checks_its_fields_with_their_ranges() -> None:
    _Settings(rate=0.5, names=["a"])
    with pytest.raises(ConfigError, match=r"^_Settings.rate must be > 0, got 0$"):
        _Settings(rate=0)
    with pytest.raises(ConfigError, match=r"^_Settings.names must be a list of strings"):
        _Settings(names="ab")


@pytest.mark.parametrize("constraint, text", [
    (Range(ge=1), ">= 1"), (Range(gt=0), "> 0"), (Range(le=1.5), "<= 1.5"),
    (Range(lt=1), "< 1"), (Range(ge=0, lt=1), "in [0, 1)"), (Range(gt=0, le=1), "in (0, 1]"),
    (OneOf("a", "b"), "one of ('a', 'b')"),
])
def test_constraints_read_as_the_messages_say_them(constraint: Any, text: str) -> None:
    assert str(constraint) == text
