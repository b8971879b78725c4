"""A user's own data files as ``Splits``: NumPy ``.npz`` archives and CSV tables, every
value checked where it is read (the file, the line or index, the column and the value)."""

from __future__ import annotations

import csv as csv_module
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmt_tf.data.splits import Fraction, Seed, Split, Splits, hold_out, not_class_ids, three_way
from lmt_tf.errors import ConfigError, DataError

MISSING = ("", "na", "nan", "null", "?")  # CSV cells read as a missing value (NaN)


def load_npz(path: str, validation_fraction: Fraction = 0.1, test_fraction: Fraction = 0.1,
             seed: Seed = 0) -> Splits:
    """The user's own arrays in a ``.npz`` file.

    The file holds either ``x`` and ``y`` (divided here with seeded hold-outs), or
    ``x_train``, ``y_train``, ``x_test``, ``y_test`` (validation held out of train).
    Labels are integers from 0; an optional ``class_names`` array names them (label i
    is ``class_names[i]``).

    Raises:
      DataError: if the file is missing or holds neither set of keys.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"npz file not found: {file}")
    with np.load(file) as arrays:
        keys = set(arrays.files)
        names = _npz_class_names(arrays, file) if "class_names" in keys else ()
        if {"x_train", "y_train", "x_test", "y_test"} <= keys:
            train = Split(_npz_features(arrays, "x_train", file),
                          _npz_labels(arrays, "y_train", file))
            test = Split(_npz_features(arrays, "x_test", file),
                         _npz_labels(arrays, "y_test", file))
            classes = len(names) or int(max(train.y.max(), test.y.max())) + 1
            train, val = hold_out(train, validation_fraction, seed)
            return Splits(f"npz:{file.stem}", train, val, test, classes, str(file),
                          class_names=names)
        if {"x", "y"} <= keys:
            y = _npz_labels(arrays, "y", file)
            x = _npz_features(arrays, "x", file)
            return three_way(Split(x, y), f"npz:{file.stem}", len(names) or int(y.max()) + 1,
                              validation_fraction, test_fraction, seed, str(file),
                              class_names=names)
    raise DataError(f"{file} holds {sorted(keys)}; expected x, y or x_train, y_train, "
                    f"x_test, y_test")


def _npz_class_names(arrays: Any, file: Path) -> tuple[str, ...]:
    """The class names under ``class_names``: a 1-D array of strings.

    Raises:
      DataError: naming the file if they are not.
    """
    names = np.asarray(arrays["class_names"])
    if names.ndim != 1 or names.dtype.kind not in "US" or not len(names):
        raise DataError(f"{file}: class_names must be a 1-D array of strings (label i is "
                        f"class_names[i]), got {names.dtype} of shape {names.shape}")
    return tuple(str(n.decode() if isinstance(n, bytes) else n) for n in names)


def _npz_features(arrays: Any, key: str, file: Path) -> np.ndarray:
    """The features under ``key``, refusing an infinite one (NaN is a missing value).

    Raises:
      DataError: naming the file, the key, the index and the value.
    """
    x = np.asarray(arrays[key])
    if x.dtype.kind in "fc" and np.isinf(x).any():
        at = tuple(int(i) for i in np.argwhere(np.isinf(x))[0])
        raise DataError(f"{file}: {key}[{', '.join(map(str, at))}] = {x[at]} is not a finite "
                        f"number ({int(np.isinf(x).sum())} in all)")
    return x


def _npz_labels(arrays: Any, key: str, file: Path) -> np.ndarray:
    """The labels under ``key`` as int64, refusing any that are not whole numbers (a cast
    would truncate 0.5 to class 0).

    Raises:
      DataError: naming the file, the key, the index and the value.
    """
    y = np.asarray(arrays[key])
    if y.dtype.kind in "fc":
        bad = not_class_ids(y)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{file}: {key}[{i}] = {y[i]} is not a class id (labels are "
                            f"integers from 0); {int(bad.sum())} in all")
    elif y.dtype.kind not in "iub":
        raise DataError(f"{file}: {key} holds {y.dtype} values, not integer labels")
    return y.astype(np.int64)


def load_csv(path: str, label_column: str = "label", validation_fraction: Fraction = 0.1,
             test_fraction: Fraction = 0.1, seed: Seed = 0,
             class_names: Sequence[str] = ()) -> Splits:
    """A CSV file with a header row: numeric feature columns and an integer label column.
    Empty cells and NA, NaN, null or ? are missing values (NaN): impute them with
    ``Preprocessing.impute``. The feature columns keep their names (``Splits.features``);
    ``class_names`` names the labels 0, 1, ... in order (empty: their ids name them).

    Raises:
      DataError: if the file or the label column is missing, or a value is not numeric.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"CSV file not found: {file}")
    with file.open(newline="") as f:
        reader = csv_module.reader(f)
        header = next(reader, None)
        if not header or label_column not in header:
            raise DataError(f"{file}: no column {label_column!r} in header {header}")
        label_at = header.index(label_column)
        numbered = [(reader.line_num, row) for row in reader if row]  # blank lines skipped
    rows = [row for _, row in numbered]
    if not rows:
        raise DataError(f"{file}: no rows below the header")
    if len(header) < 2:
        raise DataError(f"{file}: no feature columns besides {label_column!r}")
    for line, row in numbered:
        if len(row) != len(header):
            raise DataError(f"{file}, line {line}: {len(row)} cells, the header has "
                            f"{len(header)}")
    try:
        table = np.asarray([[np.nan if cell.strip().lower() in MISSING else cell
                             for cell in row] for row in rows], dtype=np.float64)
    except ValueError:
        raise _non_numeric(file, header, numbered) from None
    if np.isnan(table[:, label_at]).any():
        raise DataError(f"{file}: {int(np.isnan(table[:, label_at]).sum())} rows have no "
                        f"{label_column!r}")
    labels = table[:, label_at]
    _refuse_cell(file, header, numbered, not_class_ids(labels), label_at,
                 "is not a class id (labels are integers from 0)")
    for column in range(len(header)):  # NaN is a missing value; infinity is no number
        _refuse_cell(file, header, numbered, np.isinf(table[:, column]), column,
                     "is not a finite number")
    y = labels.astype(np.int64)
    x = np.delete(table, label_at, axis=1).astype(np.float32)
    features = tuple(name for i, name in enumerate(header) if i != label_at)
    names = tuple(str(n) for n in class_names)
    if names and len(names) <= y.max():
        raise ConfigError(f"load_csv.class_names has {len(names)} names, but {file} has "
                          f"labels up to {int(y.max())}: name every class 0..{int(y.max())}")
    return three_way(Split(x, y), f"csv:{file.stem}", len(names) or int(y.max()) + 1,
                      validation_fraction, test_fraction, seed, str(file), features, names)


def _refuse_cell(file: Path, header: list[str], numbered: list[tuple[int, list[str]]],
                 bad: np.ndarray, column: int, why: str) -> None:
    """Raises DataError naming the first of the rows ``bad`` marks: its line in the file,
    the column and the cell as written."""
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        line, cells = numbered[row]
        raise DataError(f"{file}, line {line}, column {header[column]!r}: {cells[column]!r} "
                        f"{why} ({int(bad.sum())} rows in all)")


def _non_numeric(file: Path, header: list[str],
                 numbered: list[tuple[int, list[str]]]) -> DataError:
    """The error naming the first cell that is neither a number nor missing, by its line
    in the file and its column."""
    for line, row in numbered:
        for name, cell in zip(header, row, strict=True):
            if cell.strip().lower() in MISSING:
                continue
            try:
                float(cell)
            except ValueError:
                return DataError(
                    f"{file}, line {line}, column {name!r}: {cell!r} is not a number (text "
                    "categories: encode them as integer codes and list the column in "
                    "Preprocessing.categorical)")
    return DataError(f"{file}: a value is not a number")
