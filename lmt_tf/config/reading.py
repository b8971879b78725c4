"""Reading gin files and bindings: includes looked up beside each file and refused when
they include themselves, gin's errors in one line, every binding checked against its
parameter's type and range, and whether the result is a whole experiment."""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gin

from lmt_tf.checks import Returned, check_value
from lmt_tf.config.registry import _TYPED, PROJECT_ROOT, _registered, register
from lmt_tf.errors import ConfigError

# What an experiment must set, and where a user finds one to include.
_REQUIRED = {"data": "'gin/data/digits.gin'", "model": "'gin/models/mlp.gin'"}


def check_complete(config_files: Sequence[str]) -> None:
    """Raises ConfigError unless the parsed config is a whole experiment: one that sets
    ``run_experiment.data`` and ``run_experiment.model`` (a fragment such as
    'gin/models/mlp.gin' parses, but does not run).

    Raises:
      ConfigError: naming the files and what they leave unset.
    """
    missing = []
    for parameter, example in _REQUIRED.items():
        try:
            gin.query_parameter(f"run_experiment.{parameter}")
        except ValueError:
            missing.append(f"run_experiment.{parameter} (e.g. include {example})")
    if not missing:
        return
    files = ", ".join(config_files) or "the bindings"
    if not gin.config_str().strip():
        raise ConfigError(f"{files} binds nothing: an experiment sets at least "
                          f"{' and '.join(missing)}")
    raise ConfigError(f"{files} is not a complete experiment: it does not set "
                      f"{' or '.join(missing)}")


def parse(config_files: Sequence[str], bindings: Sequence[str]) -> None:
    """Parses gin files and ``a.b = v`` bindings into a fresh, finalised gin config.

    Includes are looked up beside each file, one directory up, in the working directory
    and in the project root.

    Raises:
      ConfigError: for a missing file, a syntax error, an unknown configurable or a
        parameter the configurable does not take; the message is one line.
    """
    register()
    gin.clear_config()
    for file in config_files:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"gin file not found: {file}")
        for prefix in (path.resolve().parent, path.resolve().parent.parent):
            gin.add_config_file_search_path(str(prefix))
    gin.add_config_file_search_path(str(PROJECT_ROOT))
    quiet = _NotFoundFilter()
    logging.getLogger().addFilter(quiet)
    reading = _Includes()
    try:
        with _plain_files_only(reading):
            gin.parse_config_files_and_bindings(list(config_files), list(bindings),
                                                finalize_config=True)
    except _IncludeCycle:
        raise ConfigError(reading.cycle) from None
    except RecursionError:  # nesting beyond Python's stack without a cycle
        raise ConfigError(f"{', '.join(config_files)}: includes nested too deeply") from None
    except SyntaxError as e:  # gin's parse errors: say which file or binding
        where = f"{e.filename}, line {e.lineno}" if e.filename else \
            f"binding {bindings[e.lineno - 1]!r}" if e.lineno and e.lineno <= len(bindings) \
            else "a binding"
        raise ConfigError(f"{e.msg} in {where}") from e
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(_one_line(e)) from e
    finally:
        logging.getLogger().removeFilter(quiet)
    _check_bindings()


def _check_bindings() -> None:
    """Checks every binding of a registered configurable against its parameter's type
    hint and declared range (``checks.check_value``): one mechanism for every stage,
    config dataclass, data source, model builder, strategy and transform, before any
    of them is called.

    Raises:
      ConfigError: naming ``configurable.parameter``, the value and what is allowed.
    """
    # gin has no public way to list every binding (get_bindings takes one configurable
    # in the current scope), and a scoped binding is a binding too.
    for (scope, selector), arguments in gin.config._CONFIG.items():  # noqa: SLF001
        if selector not in _TYPED:
            continue
        name, hints = _TYPED[selector]
        for parameter, value in arguments.items():
            judged = _judged(value)
            if parameter in hints and judged is not gin.REQUIRED:
                check_value(judged, hints[parameter],
                            f"{scope + '/' if scope else ''}{name}.{parameter}",
                            _shown(value, judged))


def _judged(value: Any) -> Any:
    """A bound value as it will reach its configurable, as far as the parse knows it: a
    macro's value, a reference to a configurable (@build_mlp) that configurable, a call
    of one (@FederatedConfig()) what it returns, known by its type."""
    if isinstance(value, gin.config.ConfigurableReference):
        target = value.configurable.wrapped
        if target is gin.config.macro:
            return _judged(gin.query_parameter("%" + value.scoped_selector.rsplit("/", 1)[0]))
        if not value.evaluate:
            return target
        if isinstance(target, type):
            return Returned(target)
        with contextlib.suppress(Exception):  # a hint that does not resolve: unknown
            returns = typing.get_type_hints(target).get("return")
            return Returned(returns if isinstance(returns, type) else None)
        return Returned(None)
    if isinstance(value, list | tuple):
        return type(value)(_judged(v) for v in value)
    if isinstance(value, dict):
        return {k: _judged(v) for k, v in value.items()}
    return value


def _shown(value: Any, judged: Any) -> str:
    """A bound value as the user wrote it (a macro with its value)."""
    if isinstance(value, gin.config.ConfigurableReference) and not isinstance(
            judged, Returned) and value.configurable.wrapped is gin.config.macro:
        return f"{value!r} = {judged!r}"
    return repr(value)


@contextlib.contextmanager
def _plain_files_only(reading: _Includes) -> Iterator[None]:
    """Parses with gin's plain file reader only, through ``reading``. gin 0.5's other
    reader takes an include such as 'experiments/x.gin' for a Python package path and
    crashes (TypeError) when `experiments` is importable as a namespace package, i.e.
    whenever the project root is on sys.path; lmt_tf's includes are files, never package
    resources."""
    readers = gin.config._FILE_READERS  # noqa: SLF001 (no public way to choose readers)
    saved = list(readers)
    readers[:] = [(reading.open if r[0] is open else r[0], r[1]) for r in saved
                  if r[0].__module__ != "gin.resource_reader"]
    try:
        yield
    finally:
        readers[:] = saved


class _IncludeCycle(RecursionError):
    """A gin file that includes itself, directly or through others."""


class _Includes:
    """The gin files being read, each inside the ones that include it: a file that
    includes itself is refused when it is opened the second time, not after gin has
    recursed a thousand times."""

    def __init__(self) -> None:
        self.stack: list[str] = []  # as shown in messages
        self._paths: list[str] = []  # as opened
        self.cycle = ""

    @contextlib.contextmanager
    def open(self, path: str) -> Iterator[Any]:
        relative = os.path.relpath(path)
        shown = path if relative.startswith("..") else relative
        start = next((i for i, other in enumerate(self._paths)
                      if os.path.samefile(path, other)), None)
        if start is not None:
            chain = " -> ".join([*self.stack[start:], shown])
            self.cycle = f"gin file {self.stack[start]} includes itself ({chain})"
            raise _IncludeCycle(self.cycle)
        self.stack.append(shown)
        self._paths.append(path)
        try:
            with open(path) as file:
                yield file
        finally:
            self.stack.pop()
            self._paths.pop()


class _NotFoundFilter(logging.Filter):
    """gin logs an error for every search path an include is not found under, even when
    a later one holds it; a missing include still raises."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Path not found")


def _one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    unknown = re.search(r"No configurable matching (?:reference )?'@?([\w.]+)'", text)
    if unknown:
        close = difflib.get_close_matches(unknown.group(1), _registered, n=3)
        if close:
            text += f" (did you mean {' or '.join(close)}?)"
    return text
