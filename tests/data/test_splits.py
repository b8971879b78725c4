"""``Splits.validate``: what training relies on, checked before it starts, for any data
source (a script's own arrays too), naming the data set, the split, the example, the
feature and the value."""

from __future__ import annotations

import numpy as np
import pytest

from lmt_tf.data.splits import Split, Splits
from lmt_tf.errors import DataError


def _splits(x: np.ndarray, y: np.ndarray, num_classes: int = 2,
            features: tuple[str, ...] = ()) -> Splits:
    clean = Split(np.zeros((4, *x.shape[1:]), x.dtype), np.zeros(4, y.dtype))
    return Splits("mine", Split(x, y), clean, clean, num_classes, "mine.csv", features)


@pytest.mark.parametrize("x, y, num_classes, features, message", [
    (np.array([[0, 1], [2, np.inf]], np.float32), np.array([0, 1]), 2, ("a", "b"),
     "data mine (mine.csv): train example 1, feature 'b': inf is not a finite number"),
    (np.array([[0, 1], [-np.inf, 3]]), np.array([0, 1]), 2, (),
     "data mine (mine.csv): train example 1, feature 0: -inf is not a finite number"),
    (np.zeros((3, 2, 2)) + [[[0, 0], [0, np.inf]]], np.array([0, 1, 1]), 2, (),
     "train example 0, feature (1, 1): inf is not a finite number (3 in all)"),
    (np.zeros((3, 2)), np.array([0.0, 0.5, 1.7]), 2, (),
     "train example 1: label 0.5 is not a class id (labels are integers in [0, 2)); 2 in all"),
    (np.zeros((3, 2)), np.array([0.0, np.nan, 1.0]), 2, (),
     "train example 1: label nan is not a class id"),
    (np.zeros((3, 2)), np.array([0, 1, 2]), 2, (), "train has labels outside [0, 2)"),
    (np.zeros((3, 2)), np.array([1.5, np.inf, 4.0], np.float32), 1, (),
     "train example 1: target inf is not a finite number"),
])
def test_a_value_training_cannot_use_is_named(x: np.ndarray, y: np.ndarray, num_classes: int,
                                              features: tuple[str, ...], message: str) -> None:
    with pytest.raises(DataError) as error:
        _splits(x, y, num_classes, features).validate()
    assert message in str(error.value), str(error.value)


def test_missing_values_and_regression_targets_pass() -> None:
    x = np.array([[0, np.nan], [1, 2]], np.float32)  # NaN: for Preprocessing.impute
    _splits(x, np.array([0, 1])).validate()
    _splits(np.zeros((2, 2)), np.array([3.7, -1.25], np.float32), num_classes=1).validate()
    _splits(np.zeros((2, 2), np.uint8), np.array([0.0, 1.0])).validate()  # whole floats
