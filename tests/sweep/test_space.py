"""A sweep's space: --grid and --search values that do not parse are refused, naming the
flag and what is wrong."""

from __future__ import annotations

import pytest

from lmt_tf.errors import ConfigError
from lmt_tf.sweep.space import parse_dimension


@pytest.mark.parametrize(("flag", "text", "message"), [
    ("--grid", "Adam.learning_rate=[0.1", "the values must be a list"),
    ("--grid", "Adam.learning_rate", "expected KEY=VALUES"),
    ("--grid", "Adam.learning_rate=[0.1,]", "the list has an empty value"),
    ("--search", "Adam.learning_rate=loguniform(0,1)", "needs low < high and low > 0"),
    ("--search", "Adam.learning_rate=normal(0,1)", "expected uniform(a,b), loguniform"),
    ("--search", "Adam.learning_rate=uniform(a,1)", "uniform needs two numbers"),
])
def test_spaces_that_do_not_parse(flag: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_dimension(text, grid=flag == "--grid")
