"""A sweep's search space: one ``Dimension`` per swept binding, parsed from ``--grid
'KEY=[v1,v2]'`` (values in gin syntax) or ``--search 'KEY=kind(args)'`` (``uniform``,
``loguniform``, ``int``, ``choice``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lmt_tf.errors import ConfigError

_RANGE = re.compile(r"^(uniform|loguniform|int|choice)\((.*)\)$")


@dataclass(frozen=True)
class Dimension:
    """One binding's values: a grid's list (gin text), a range or choices."""

    key: str
    kind: str  # grid | uniform | loguniform | int | choice
    values: tuple[str, ...] = ()  # grid and choice: gin text of each value
    low: float = 0.0
    high: float = 0.0

    def example(self) -> str:
        """A value in the range, as gin text (to check the binding parses)."""
        return str(int(self.low)) if self.kind == "int" else repr(self.low)

    def suggest(self, trial: Any) -> str:
        """The trial's value, as gin text."""
        if self.kind in ("grid", "choice"):
            return trial.suggest_categorical(self.key, list(self.values))
        if self.kind == "int":
            return str(trial.suggest_int(self.key, int(self.low), int(self.high)))
        return repr(trial.suggest_float(self.key, self.low, self.high,
                                        log=self.kind == "loguniform"))


def parse_dimension(text: str, grid: bool) -> Dimension:
    """``KEY=[v1,v2]`` (grid) or ``KEY=kind(args)`` (search).

    Raises:
      ConfigError: naming the flag and what is wrong.
    """
    flag = "--grid" if grid else "--search"
    key, sep, spec = text.partition("=")
    key, spec = key.strip(), spec.strip()
    if not sep or not re.fullmatch(r"[\w.]+(/[\w.]+)?", key) or not spec:
        example = ("Adam.learning_rate=[1e-3,3e-3]" if grid
                   else "Adam.learning_rate=loguniform(1e-4,1e-2)")
        raise ConfigError(f"{flag} {text!r}: expected KEY=VALUES, e.g. {example}")
    if grid:
        if not (spec.startswith("[") and spec.endswith("]")):
            raise ConfigError(f"--grid {text!r}: the values must be a list, [v1,v2,...]")
        values = tuple(_split(spec[1:-1]))
        if not values or any(not v for v in values):
            raise ConfigError(f"--grid {text!r}: the list has an empty value")
        return Dimension(key, "grid", values)
    match = _RANGE.match(spec)
    if not match:
        raise ConfigError(f"--search {text!r}: expected uniform(a,b), loguniform(a,b), "
                          f"int(a,b) or choice(v1,v2,...)")
    kind, args = match.group(1), tuple(_split(match.group(2)))
    if kind == "choice":
        if len(args) < 2:
            raise ConfigError(f"--search {text!r}: choice needs at least two values")
        return Dimension(key, kind, args)
    try:
        low, high = (float(a) for a in args)
    except ValueError:
        raise ConfigError(f"--search {text!r}: {kind} needs two numbers, low and high") from None
    if not low < high or (kind == "loguniform" and low <= 0):
        raise ConfigError(f"--search {text!r}: needs low < high" +
                          (" and low > 0" if kind == "loguniform" else ""))
    return Dimension(key, kind, (), low, high)


def _split(text: str) -> list[str]:
    """Comma-separated values, commas inside brackets, parentheses or quotes kept."""
    values, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += char
    values.append(current.strip())
    return values if text.strip() else []
