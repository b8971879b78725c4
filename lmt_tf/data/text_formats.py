"""The rows of a user's text file: a document and a label each, from CSV (a header row),
JSON Lines (an object per line) or TFRecord (a ``tf.train.Example`` per record). Every
fault of the format is one line naming the file, the row and the value: bytes that are
not UTF-8, a malformed row, a missing text or label column (with the columns there are).
Rows are numbered as a user finds them: a CSV record by the line it starts on (the
header is row 1), a JSON Lines object by its line, a TFRecord by its record number."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from lmt_tf.errors import DataError

# File name endings and the format each names.
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".tfrecord": "tfrecord",
           ".tfrecords": "tfrecord"}


@dataclass
class Rows:
    """The documents and labels of one file, in file order, with each one's row."""

    file: str
    texts: list[str]
    labels: list[str]
    rows: list[int]


def read_rows(path: Path, text_column: str, label_column: str) -> Rows:
    """The (text, label) rows of a CSV, JSON Lines or TFRecord file, by its ending.

    Raises:
      DataError: for a missing file or an unknown ending, and (naming the file and the
        row) for bytes that are not UTF-8, a malformed row, a missing column, a text or
        label that is not a string (a label may also be an integer).
    """
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown text file format {path.suffix or '(no ending)'!r}; "
                        f"name it {', '.join(FORMATS)}")
    reader = {"csv": _csv, "jsonl": _jsonl, "tfrecord": _tfrecord}[kind]
    return reader(path, text_column, label_column)


def utf8(path: Path) -> str:
    """The content of a UTF-8 text file (a leading byte-order mark dropped).

    Raises:
      DataError: naming the file, the line and the byte that is not UTF-8.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path} line {line}: byte {data[e.start]:#04x} at offset {e.start} "
                        f"is not UTF-8; convert the file (e.g. iconv -f latin1 -t utf-8)") \
            from None


def _missing(path: Path, at: str, what: str, wanted: tuple[str, str],
             present: list[str]) -> None:
    """Raises DataError if a wanted column is not among those ``present``; ``at`` is the
    row (record) it is missing from."""
    for setting, name in zip(("load_text.text_column", "load_text.label_column"), wanted,
                             strict=True):
        if name not in present:
            shown = ", ".join(repr(p) for p in present[:20]) or "none"
            raise DataError(f"{path} {at}: no {what} {name!r} ({setting}); its "
                            f"{what}s: {shown}")


def _csv(path: Path, text_column: str, label_column: str) -> Rows:
    reader = csv.reader(io.StringIO(utf8(path), newline=""), strict=True)
    header = next(reader, None)
    if not header:
        raise DataError(f"{path}: no header row (expected columns {text_column!r} and "
                        f"{label_column!r})")
    _missing(path, "row 1", "column", (text_column, label_column), header)
    text_at, label_at = header.index(text_column), header.index(label_column)
    out = Rows(str(path), [], [], [])
    row = reader.line_num + 1  # the line the next record starts on
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{path} row {row}: malformed CSV ({e})") from None
        if cells:  # a blank line is no row
            if len(cells) != len(header):
                raise DataError(f"{path} row {row}: {len(cells)} cells, the header has "
                                f"{len(header)} ({', '.join(header)}); quote a text holding "
                                f"commas")
            out.texts.append(cells[text_at])
            out.labels.append(cells[label_at])
            out.rows.append(row)
        row = reader.line_num + 1
    return out


def _jsonl(path: Path, text_column: str, label_column: str) -> Rows:
    out = Rows(str(path), [], [], [])
    # Lines end at newlines only: JSON strings may hold other line separators (U+2028).
    for row, line in enumerate(utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} row {row}: not JSON (column {e.colno}: {e.msg}): "
                            f"{_short(line)}") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} row {row}: a JSON {type(record).__name__}, not an "
                            f"object with keys {text_column!r} and {label_column!r}: "
                            f"{_short(line)}")
        _missing(path, f"row {row}", "key", (text_column, label_column), list(record))
        text, label = record[text_column], record[label_column]
        if not isinstance(text, str):
            raise DataError(f"{path} row {row}: {text_column} {_short(json.dumps(text))} is "
                            f"not a string")
        out.texts.append(text)
        out.labels.append(_label(label, path, row, label_column))
        out.rows.append(row)
    return out


def _label(value: object, path: Path, row: int, column: str) -> str:
    """A label as a class name: a string, or an integer written as one."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{path} row {row}: {column} {_short(json.dumps(value))} is not a string "
                    f"or an integer")


def _tfrecord(path: Path, text_column: str, label_column: str) -> Rows:
    # TensorFlow is imported where it is needed: the packaged text sets never need it.
    import tensorflow as tf
    from google.protobuf.message import DecodeError

    out = Rows(str(path), [], [], [])
    records = iter(tf.data.TFRecordDataset(str(path)))
    row = 0
    while True:
        try:
            record = next(records)
        except StopIteration:
            break
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
            raise DataError(f"{path} record {row + 1}: not a TFRecord, or corrupt "
                            f"({e.message.splitlines()[0]})") from None
        row += 1
        try:
            features = tf.train.Example.FromString(record.numpy()).features.feature
        except DecodeError:
            raise DataError(f"{path} record {row}: not a tf.train.Example") from None
        _missing(path, f"record {row}", "feature", (text_column, label_column), sorted(features))
        text = _value(features[text_column], path, row, text_column)
        if not isinstance(text, str):
            raise DataError(f"{path} record {row}: {text_column} {text!r} is not text (a "
                            f"bytes feature)")
        out.texts.append(text)
        out.labels.append(str(_value(features[label_column], path, row, label_column)))
        out.rows.append(row)
    return out


def _value(feature: object, path: Path, row: int, name: str) -> str | int | float:
    """The one value of a feature: text (UTF-8 bytes), an integer or a float."""
    kind = feature.WhichOneof("kind")
    values = list(getattr(feature, kind).value) if kind else []
    if len(values) != 1:
        raise DataError(f"{path} record {row}: {name} holds {len(values)} values, expected 1")
    value = values[0]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} record {row}: {name}: byte {value[e.start]:#04x} at "
                            f"offset {e.start} is not UTF-8") from None
    return value


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
