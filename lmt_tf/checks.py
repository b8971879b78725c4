"""Validation of config dataclasses: a wrong type or range becomes a ConfigError naming the
setting, instead of a TypeError deep inside TensorFlow."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

from lmt_tf.errors import ConfigError


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits a (simple) type hint; unknown hint shapes are accepted."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list):
        if not isinstance(value, tuple | list):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is not None:
        return isinstance(value, origin) if isinstance(origin, type) else True
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    text = str(hint).replace("typing.", "")
    return hint.__name__ if isinstance(hint, type) else text


def check_types(config: Any, name: str | None = None) -> None:
    """Raises ConfigError if a field of the dataclass ``config`` does not match its hint.

    Args:
      config: a dataclass instance whose annotations are simple types (int, float, str,
        bool, Optional/Union of those, tuples/lists of one type, callables).
      name: the name gin binds the class by, if it is not the class's own.

    Raises:
      ConfigError: naming ``ClassName.field`` (or ``name.field``), the value given and
        the type expected.
    """
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        hint = hints[field.name]
        if not _matches(value, hint):
            raise ConfigError(
                f"{name or type(config).__name__}.{field.name} must be {_describe(hint)}, "
                f"got {value!r} ({type(value).__name__})"
            )


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
