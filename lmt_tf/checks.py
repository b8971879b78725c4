"""Validation of settings: a setting's type comes from its type hint, its range from a
constraint declared beside it (``Annotated[float, Range(gt=0, lt=1)]``), and a value that
does not fit becomes one ConfigError naming the setting, the value and what is allowed,
instead of a TypeError deep inside TensorFlow. ``check_arguments`` is the one check: the
gin edge runs it on every binding, config dataclasses on their fields."""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import numbers
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from lmt_tf.errors import ConfigError

__all__ = ["Annotated", "OneOf", "Range", "Returned", "check", "check_arguments",
           "check_types", "check_value", "configured_call", "describe", "parameter_hints"]


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


@dataclass(frozen=True)
class Range:
    """The numbers a setting allows, declared beside its type:
    ``Annotated[int, Range(ge=1)]``, ``Annotated[float, Range(gt=0, lt=1)]``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, value: Any) -> bool:
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            return True  # not a number: the type check speaks
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le)
                and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        low = (f"[{_number(self.ge)}" if self.ge is not None
               else f"({_number(self.gt)}" if self.gt is not None else None)
        high = (f"{_number(self.le)}]" if self.le is not None
                else f"{_number(self.lt)})" if self.lt is not None else None)
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        if high:
            return ("<= " if high[-1] == "]" else "< ") + high[:-1]
        return "any number"


class OneOf:
    """The values a setting allows, declared beside its type:
    ``Annotated[str, OneOf("float", "int8")]``."""

    def __init__(self, *choices: Any):
        self.choices = choices

    def __contains__(self, value: Any) -> bool:
        try:
            return value in self.choices
        except TypeError:  # unhashable
            return False

    def __str__(self) -> str:
        return f"one of {self.choices}"

    def __repr__(self) -> str:
        return f"OneOf{self.choices!r}"


@dataclass(frozen=True)
class Returned:
    """A value known only by its type: what a configured call will return (gin's
    ``@FederatedConfig()`` before it is called). ``type`` None: unknown, fits anything."""

    type: type | None


_SEQUENCES = (tuple, list, collections.abc.Sequence, collections.abc.MutableSequence)
_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)


def _isinstance(value: Any, cls: Any) -> bool:
    if isinstance(value, Returned):
        return isinstance(value.type, type) and issubclass(value.type, cls)
    return isinstance(value, cls)


def _callable(value: Any) -> bool:
    if isinstance(value, Returned):  # an instance of the type: callable if it has __call__
        return any("__call__" in vars(k) for k in value.type.__mro__[:-1])
    return callable(value)


def _fits(value: Any, hint: Any, constraints: bool = True) -> bool:
    """Whether ``value`` fits ``hint`` (and, with ``constraints``, what it declares).
    Unknown hint shapes are accepted."""
    if hint is Any or hint is object or (isinstance(value, Returned) and value.type is None):
        return True
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *marks = typing.get_args(hint)
        return _fits(value, base, constraints) and (
            not constraints or isinstance(value, Returned)
            or all(value in mark for mark in marks if isinstance(mark, Range | OneOf)))
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg, constraints) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None or _isinstance(value, type(None))
    if hint is bool:
        return _isinstance(value, bool)
    if hint in (int, float):
        kind = numbers.Integral if hint is int else numbers.Real
        return _isinstance(value, kind) and not _isinstance(value, bool)
    if hint is str:
        return _isinstance(value, str)
    if origin in _SEQUENCES:
        # A string is not a list of settings: 'int8' is not ['int8'].
        if _isinstance(value, str) or not _isinstance(value, tuple | list):
            return False
        if isinstance(value, Returned):
            return True
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(
                _fits(v, a, constraints) for v, a in zip(value, args, strict=True))
        return not args or all(_fits(v, args[0], constraints) for v in value)
    if origin in _MAPPINGS:
        if not _isinstance(value, dict):
            return False
        if isinstance(value, Returned) or not typing.get_args(hint):
            return True
        key, item = typing.get_args(hint)
        return all(_fits(k, key, constraints) and _fits(v, item, constraints)
                   for k, v in value.items())
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        return _callable(value)
    if origin is not None:
        return _isinstance(value, origin) if isinstance(origin, type) else True
    if isinstance(hint, type):
        return _isinstance(value, hint)
    return True


def describe(hint: Any, plural: bool = False) -> str:
    """What ``hint`` allows, in words: ``an integer >= 1``, ``a list of strings``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        base, *marks = args
        choices = [m for m in marks if isinstance(m, OneOf)]
        if choices:
            return f"values from {choices[0].choices}" if plural else str(choices[0])
        ranges = [str(m) for m in marks if isinstance(m, Range)]
        return " ".join([describe(base, plural), *ranges])
    if origin in (typing.Union, types.UnionType):
        words = [describe(a, plural) for a in args if a is not type(None)]
        return " or ".join((["None"] if type(None) in args else []) + words)
    simple = {type(None): ("None", "None"), bool: ("True or False", "booleans"),
              int: ("an integer", "integers"), float: ("a number", "numbers"),
              str: ("a string", "strings"), Any: ("anything", "anything"),
              object: ("anything", "anything")}
    if hint in simple:
        return simple[hint][plural]
    if origin in _SEQUENCES:
        if origin is tuple and args and args[-1] is not Ellipsis:
            return "(" + ", ".join(describe(a) for a in args) + ")"
        items = f" of {describe(args[0], True)}" if args else ""
        return ("lists" if plural else "a list") + items
    if origin in _MAPPINGS:
        items = f" of {describe(args[0], True)} to {describe(args[1], True)}" if args else ""
        return ("dicts" if plural else "a dict") + items
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        return "functions or classes (@name)" if plural else "a function or class (@name)"
    if isinstance(hint, type):
        return f"{hint.__name__} objects" if plural else f"a {hint.__name__}"
    return str(hint).replace("typing.", "")


def _constraint_broken(value: Any, hint: Any) -> str | None:
    """If ``value`` has the type ``hint`` asks for but not its declared range: the range
    (``>= 1``); None otherwise."""
    alternatives = (typing.get_args(hint) if typing.get_origin(hint)
                    in (typing.Union, types.UnionType) else (hint,))
    for alternative in alternatives:
        if typing.get_origin(alternative) is Annotated and _fits(value, alternative, False):
            base, *marks = typing.get_args(alternative)
            broken = [str(m) for m in marks
                      if isinstance(m, Range | OneOf) and value not in m]
            if broken and _fits(value, base):
                return ("None or " if type(None) in alternatives else "") + " and ".join(broken)
    return None


def check_value(value: Any, hint: Any, setting: str, shown: str | None = None) -> None:
    """Raises ConfigError unless ``value`` fits ``hint``, its type and declared range.

    Args:
      value: the value (a ``Returned`` for one known by its type only).
      hint: a type hint, with ``Range``/``OneOf`` constraints in ``Annotated``.
      setting: the setting's name in messages (``prune.final_sparsity``).
      shown: how the value is shown (as written in gin); default: its repr.

    Raises:
      ConfigError: ``setting must be <what is allowed>, got <value>``, one line.
    """
    if _fits(value, hint):
        return
    shown = shown if shown is not None else repr(value)
    broken = _constraint_broken(value, hint)
    if broken:
        raise ConfigError(f"{setting} must be {broken}, got {shown}")
    kind = "" if isinstance(value, Returned) else f" ({type(value).__name__})"
    if isinstance(value, str) and _fits([value], hint, False):
        kind = f" (a string, not a list: write [{shown}])"
    elif isinstance(value, type) and _fits(Returned(value), hint):
        kind = f" (a class: call it, {shown}())"
    elif isinstance(value, Returned) and shown.endswith("()") and _fits(print, hint):
        kind = f" (what a call returns: bind it uncalled, {shown[:-2]})"
    raise ConfigError(f"{setting} must be {describe(hint)}, got {shown}{kind}")


def parameter_hints(target: Callable[..., Any]) -> dict[str, Any]:
    """The type hints, constraints included, of the parameters ``target`` takes by name:
    a function's, or a class's constructor's (a dataclass's fields). A parameter without
    a hint has ``Any``.

    Raises:
      NameError: if a hint names something its module does not define.
    """
    if dataclasses.is_dataclass(target):  # each field's hint, read in its class's module
        hints = typing.get_type_hints(target, include_extras=True)
    else:
        function = target.__init__ if isinstance(target, type) else target
        hints = typing.get_type_hints(function, include_extras=True)
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin)
        return {}
    return {p.name: hints.get(p.name, Any) for p in parameters
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def check_arguments(name: str, target: Callable[..., Any], arguments: Mapping[str, Any],
                    shown: Mapping[str, str] | None = None) -> None:
    """Checks each of ``arguments`` against the hint of ``target``'s parameter of that
    name (see ``check_value``); arguments ``target`` does not take are left alone.

    Args:
      name: the name ``target`` is configured by (``prune``, ``TrainConfig``).
      target: a function or class.
      arguments: parameter name -> value.
      shown: parameter name -> the value as the user wrote it.

    Raises:
      ConfigError: naming ``name.parameter``, the value and what is allowed.
    """
    hints = parameter_hints(target)
    for parameter, value in arguments.items():
        if parameter in hints:
            check_value(value, hints[parameter], f"{name}.{parameter}",
                        (shown or {}).get(parameter))


def check_types(config: Any, name: str | None = None) -> None:
    """Raises ConfigError if a field of the dataclass ``config`` does not fit its hint or
    its declared range (``check_arguments`` on the fields).

    Args:
      config: a dataclass instance.
      name: the name gin binds the class by, if it is not the class's own.

    Raises:
      ConfigError: naming ``ClassName.field`` (or ``name.field``), the value given and
        what is allowed.
    """
    check_arguments(name or type(config).__name__, type(config),
                    {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                     if f.init})


def check(condition: bool, setting: str, message: str) -> None:
    """Raises ConfigError(``setting message``) unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{setting} {message}")


def configured_call(function: Callable[..., Any], setting: str, *args: Any,
                    **kwargs: Any) -> Any:
    """Calls a user-configured ``function`` (a data source, a model builder, an optimizer
    class bound in gin) and turns the TypeError or ValueError that a wrong value in its
    bindings raises into a ConfigError naming ``setting``.

    Raises:
      ConfigError: ``setting: <the error's first line>``.
    """
    try:
        return function(*args, **kwargs)
    except (TypeError, ValueError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # gin appends "In call to configurable 'X' (<function ...>)": keep the name only.
        where = next((line.split(" (<", 1)[0] for line in lines
                      if line.startswith("In call to configurable")), "")
        message = lines[0] if lines else type(e).__name__
        raise ConfigError(f"{setting}: {message}" + (f" ({where})" if where else "")) from e
