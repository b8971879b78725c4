"""A sweep's search space: one ``Dimension`` per swept binding, parsed from ``--grid
'KEY=[v1,v2]'`` (values in gin syntax) or ``--search 'KEY=kind(args)'`` (``uniform``,
``loguniform``, ``int``, ``choice``).

Values are read as gin reads them (``gin.config_parser``: Python literals, ``@name``,
``@name()``, ``%MACRO``, lists, tuples and dicts of those), so a value gin would refuse in
a trial is refused here, naming it, before any trial starts.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from dataclasses import dataclass
from typing import Any

from lmt_tf.errors import ConfigError

_RANGE = re.compile(r"^(uniform|loguniform|int|choice)\((.*)\)$", re.DOTALL)
_GIN_VALUES = ("a number, a 'quoted string', True, False, None, an @reference, a %MACRO, "
               "or a list, tuple or dict of those")


@dataclass(frozen=True)
class Dimension:
    """One binding's values: a grid's list (gin text), a range or choices."""

    key: str
    kind: str  # grid | uniform | loguniform | int | choice
    values: tuple[str, ...] = ()  # grid and choice: gin text of each value
    low: float = 0.0
    high: float = 0.0

    def every_value(self) -> tuple[str, ...]:
        """Each value a trial can bind, as gin text: a grid's and a choice's values; a
        range's ends."""
        if self.values:
            return self.values
        if self.kind == "int":
            return (str(int(self.low)), str(int(self.high)))
        return (repr(self.low), repr(self.high))

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
      ConfigError: naming the flag, the text and what is wrong with it, in one line.
    """
    flag = "--grid" if grid else "--search"
    key, sep, spec = text.partition("=")
    key, spec = key.strip(), spec.strip()
    if not sep or not re.fullmatch(r"[\w.]+(/[\w.]+)?", key) or not spec:
        example = ("Adam.learning_rate=[1e-3,3e-3]" if grid
                   else "Adam.learning_rate=loguniform(1e-4,1e-2)")
        raise ConfigError(f"{flag} {text!r}: expected KEY=VALUES, e.g. {example}")
    try:
        return _grid(key, spec) if grid else _search(key, spec)
    except ValueError as e:
        raise ConfigError(f"{flag} {text!r}: {e}") from None


def _grid(key: str, spec: str) -> Dimension:
    if not (spec.startswith("[") and spec.endswith("]")):
        raise ValueError("the values must be a list, [v1,v2,...]")
    items = _Values(spec[1:-1]).items()
    if not items:
        raise ValueError("the list has no value")
    texts = tuple(text for text, _ in items)
    if len(set(texts)) != len(texts):
        raise ValueError("the list holds a value twice")
    return Dimension(key, "grid", texts)


def _search(key: str, spec: str) -> Dimension:
    match = _RANGE.match(spec)
    if not match:
        raise ValueError("expected uniform(a,b), loguniform(a,b), int(a,b) or "
                         "choice(v1,v2,...)")
    kind, args = match.group(1), match.group(2)
    numbers = (int,) if kind == "int" else (int, float)
    needs = f"{kind} needs two {'integers' if kind == 'int' else 'numbers'}, low and high, " \
            f"got {args.strip() or 'nothing'}"
    try:
        items = _Values(args).items()
    except ValueError:
        if kind == "choice":
            raise
        raise ValueError(needs) from None
    if kind == "choice":
        texts = tuple(text for text, _ in items)
        if len(texts) < 2:
            raise ValueError("choice needs at least two values")
        if len(set(texts)) != len(texts):
            raise ValueError("choice holds a value twice")
        return Dimension(key, kind, texts)
    if len(items) != 2 or any(type(value) not in numbers for _, value in items):
        raise ValueError(needs)  # (int(0.5,1.5) is no range of integers: not int(0,1))
    low, high = (float(value) for _, value in items)
    if not low < high or (kind == "loguniform" and low <= 0):
        raise ValueError("needs low < high" + (" and low > 0" if kind == "loguniform" else ""))
    return Dimension(key, kind, (), low, high)


class _Reference:
    """A gin ``@reference`` or ``%MACRO``: a value only gin can resolve."""


class _Values:
    """Comma-separated gin values, read as ``gin.config_parser.ConfigParser.parse_value``
    reads one (on Python's tokens); ``items`` gives each one's text and Python value."""

    def __init__(self, text: str):
        if "\n" in text or "\r" in text:
            raise ValueError("a value must be on one line")
        self.text = text
        skip = (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.INDENT,
                tokenize.DEDENT)
        try:
            self.tokens = [t for t in tokenize.generate_tokens(io.StringIO(text).readline)
                           if t.type not in skip]
        except (tokenize.TokenError, SyntaxError):
            raise ValueError(f"a bracket or quote in {text.strip()!r} is not closed"
                             ) from None
        for token in self.tokens:
            if token.type == tokenize.ERRORTOKEN and token.string.strip() in ("'", '"'):
                raise ValueError(f"a quote in {text.strip()!r} is not closed")
        self.at = 0

    def items(self) -> list[tuple[str, Any]]:
        found = []
        while self._peek() is not None:
            start = self._peek().start[1]
            value = self._value()
            found.append((self.text[start:self.tokens[self.at - 1].end[1]].strip(), value))
            if self._peek() is None:
                break
            self._expect(",")
            if self._peek() is None:
                raise ValueError("a value is missing after the last ','")
        return found

    def _peek(self) -> tokenize.TokenInfo | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def _next(self) -> tokenize.TokenInfo:
        token = self._peek()
        if token is None:
            raise ValueError(f"{self.text.strip()!r} ends where a value is missing")
        self.at += 1
        return token

    def _expect(self, string: str) -> None:
        token = self._next()
        if token.string != string:
            raise ValueError(f"expected {string!r} but found {token.string!r} in "
                             f"{self.text.strip()!r}")

    def _value(self) -> Any:
        token = self._peek()
        if token is None:
            raise ValueError("a value is missing")
        closing = {"[": "]", "(": ")", "{": "}"}
        if token.string in closing:
            return self._container(token.string, closing[token.string])
        if token.string in ("@", "%"):
            self._next()
            self._selector(token.string)
            if token.string == "@" and self._peek() is not None and \
                    self._peek().string == "(":
                self._next()
                self._expect(")")
            return _Reference()
        return self._basic()

    def _container(self, opening: str, closing: str) -> Any:
        self._next()
        values: list[Any] = []
        comma = False
        while self._peek() is None or self._peek().string != closing:
            if opening == "{":
                key = self._value()
                self._expect(":")
                values.append((key, self._value()))
            else:
                values.append(self._value())
            if self._peek() is not None and self._peek().string == ",":
                self._next()
                comma = True
            elif self._peek() is None or self._peek().string != closing:
                found = "the end" if self._peek() is None else repr(self._peek().string)
                raise ValueError(f"expected ',' or {closing!r} but found {found} in "
                                 f"{self.text.strip()!r}")
        self._next()
        if opening == "(":  # (v) is v, as in Python; (v,) is a tuple
            return values[0] if len(values) == 1 and not comma else tuple(values)
        if opening == "[":
            return values
        return {_hashable(k): v for k, v in values}

    def _selector(self, sigil: str) -> None:
        token = self._next()
        if token.type != tokenize.NAME:
            raise ValueError(f"{sigil} must be followed by a name, got {token.string!r}")
        while self._peek() is not None and self._peek().string in (".", "/") and \
                self._peek().start == token.end:
            self._next()
            token = self._next()
            if token.type != tokenize.NAME:
                raise ValueError(f"{sigil}… holds a bad name part {token.string!r}")

    def _basic(self) -> Any:
        text = ""
        start = self._peek()
        if start.string == "-":
            text = self._next().string
        token = self._next()
        if token.type not in (tokenize.NAME, tokenize.NUMBER, tokenize.STRING):
            raise ValueError(f"{(text + token.string)!r} is not a gin value ({_GIN_VALUES})")
        text += token.string
        while token.type == tokenize.STRING and self._peek() is not None and \
                self._peek().type == tokenize.STRING:  # 'a' 'b', as Python joins them
            token = self._next()
            text += " " + token.string
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"{text!r} is not a gin value ({_GIN_VALUES})") from None


def _hashable(key: Any) -> Any:
    try:
        hash(key)
    except TypeError:
        raise ValueError(f"a dict key must be a number, string or tuple, got {key!r}"
                         ) from None
    return key
