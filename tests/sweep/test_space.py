"""A sweep's space: values are read as gin reads them; --grid and --search values that do
not parse are refused in one line, naming the flag, the text and what is wrong."""

from __future__ import annotations

import re

import pytest

from lmt_tf.errors import ConfigError
from lmt_tf.sweep.space import parse_dimension


@pytest.mark.parametrize(("flag", "text", "message"), [
    ("--grid", "Adam.learning_rate=[0.1", "the values must be a list"),
    ("--grid", "Adam.learning_rate", "expected KEY=VALUES"),
    ("--grid", "Adam.learning_rate=[0.1,]", "a value is missing after the last ','"),
    ("--grid", "Adam.learning_rate=[]", "the list has no value"),
    ("--grid", "Adam.learning_rate=[0.1,0.1]", "the list holds a value twice"),
    # Not Python's "<ast.Name object at 0x...>": the value, and what gin reads.
    ("--grid", "Adam.learning_rate=[nan]", "'nan' is not a gin value (a number, a 'quoted"),
    ("--grid", "load_npz.path=[a.npz]", "'a' is not a gin value"),
    ("--grid", "load_npz.path=['a.npz]", "a quote in \"'a.npz\" is not closed"),
    ("--grid", "build_mlp.hidden_units=[(32,]", "a bracket or quote in '(32,' is not closed"),
    ("--grid", "Adam.learning_rate=[0.1 0.2]", "expected ',' but found '0.2'"),
    ("--search", "Adam.learning_rate=loguniform(0,1)", "needs low < high and low > 0"),
    ("--search", "Adam.learning_rate=normal(0,1)", "expected uniform(a,b), loguniform"),
    ("--search", "Adam.learning_rate=uniform(a,1)", "uniform needs two numbers, low and high"),
    ("--search", "Adam.learning_rate=uniform(1)", "uniform needs two numbers, low and high"),
    # Not int(0,1) silently: a range of integers has integer ends.
    ("--search", "TrainConfig.epochs=int(0.5,1.5)",
     "int needs two integers, low and high, got 0.5,1.5"),
    ("--search", "TrainConfig.epochs=int(True,3)", "int needs two integers"),
    ("--search", "TrainConfig.epochs=choice(1)", "choice needs at least two values"),
    ("--search", "TrainConfig.epochs=choice(1, nan)", "'nan' is not a gin value"),
])
def test_spaces_that_do_not_parse(flag: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_dimension(text, grid=flag == "--grid")
    line = str(caught.value)
    assert line.startswith(f"{flag} {text!r}: ") and message in line
    assert "\n" not in line and not re.search(r"object at 0x", line)


def test_values_are_kept_as_the_gin_text_a_trial_binds() -> None:
    grid = parse_dimension("x.y=[1, -2.5, 'a,b', @f, @s/g.h(), %M, (1, 2), [3, [4]], "
                           "{'k': (5,)}, True, None, 'a' 'b']", grid=True)
    assert grid.values == ("1", "-2.5", "'a,b'", "@f", "@s/g.h()", "%M", "(1, 2)",
                           "[3, [4]]", "{'k': (5,)}", "True", "None", "'a' 'b'")
    search = parse_dimension("TrainConfig.epochs=int(-3, 3)", grid=False)
    assert (search.kind, search.low, search.high) == ("int", -3, 3)
    assert search.every_value() == ("-3", "3")
    assert parse_dimension("a.b=choice(@x, %Y)", grid=False).every_value() == ("@x", "%Y")
