"""A user's text files (``load_text``): CSV, JSON Lines and TFRecord give the same
documents; every class of bad input is one line naming the file, the row and the value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tensorflow as tf

from lmt_tf.cli import main
from lmt_tf.data.text import load_text
from lmt_tf.errors import DataError
from lmt_tf.process import EXIT_USER_ERROR
from tests.conftest import all_runs

DOCS = [("grain prices rose", "grain"), ("the company acquired a rival", "acq"),
        ("profit, up 10%, beat forecasts", "earn"), ("a merger,\nagreed today", "acq"),
        ("wheat exports fell", "grain"), ("net income doubled", "earn")] * 5


def _csv(path: Path, rows: list[tuple[str, str]], header: str = "text,label") -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        f.write(header + "\n")
        csv.writer(f).writerows(rows)
    return path


def _jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": y, "id": i}) + "\n"
                            for i, (t, y) in enumerate(rows)), encoding="utf-8")
    return path


def _tfrecord(path: Path, rows: list[tuple[str, object]], text_key: str = "text") -> Path:
    def feature(value: object) -> tf.train.Feature:
        if isinstance(value, int):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        data = value if isinstance(value, bytes) else str(value).encode()
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))

    with tf.io.TFRecordWriter(str(path)) as writer:
        for text, label in rows:
            features = {text_key: feature(text), "label": feature(label)}
            writer.write(tf.train.Example(features=tf.train.Features(feature=features))
                         .SerializeToString())
    return path


def test_csv_jsonl_and_tfrecord_give_the_same_splits(tmp_path: Path) -> None:
    made = [write(tmp_path / f"docs.{ending}", DOCS) for write, ending in
            ((_csv, "csv"), (_jsonl, "jsonl"), (_tfrecord, "tfrecord"))]
    splits = [load_text(str(path), seed=3) for path in made]
    assert {s.digest() for s in splits} == {splits[0].digest()}
    first = splits[0]
    assert first.class_names == ("acq", "earn", "grain")  # sorted
    assert first.sizes() == {"train": 24, "validation": 3, "test": 3}
    train_docs = sorted(first.train.x.tolist() + first.validation.x.tolist()
                        + first.test.x.tolist())
    assert train_docs == sorted(t for t, _ in DOCS)  # quoted commas and newlines kept
    label_of = dict(DOCS)
    assert [first.class_names[y] for y in first.train.y] == [label_of[x] for x in first.train.x]


def test_a_test_file_and_several_training_files(tmp_path: Path) -> None:
    a = _csv(tmp_path / "a.csv", DOCS[:12])
    b = _jsonl(tmp_path / "b.jsonl", DOCS[12:24])
    test = _csv(tmp_path / "test.csv", DOCS[24:])
    splits = load_text([str(a), str(b)], test=str(test), validation_fraction=0.25, seed=1)
    assert splits.sizes() == {"train": 18, "validation": 6, "test": 6}
    assert splits.test.x.tolist() == [t for t, _ in DOCS[24:]]  # in file order
    again = load_text([str(a), str(b)], test=str(test), validation_fraction=0.25, seed=1)
    assert again.digest() == splits.digest()  # the hold-out is seeded


def test_integer_labels_are_ordered_by_number(tmp_path: Path) -> None:
    rows = [(f"document {i}", str(label)) for i, label in enumerate([2, 10, 1, 10, 2, 1] * 3)]
    splits = load_text(str(_csv(tmp_path / "n.csv", rows)), test_fraction=0.0,
                       validation_fraction=0.0)
    assert splits.class_names == ("1", "2", "10")
    assert [splits.class_names[y] for y in splits.train.y] == [r[1] for r in rows]


def _error(tmp_path: Path, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        load_text(**kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_an_empty_document(tmp_path: Path) -> None:
    path = _csv(tmp_path / "e.csv", [("fine text", "a"), ("   ", "b")])
    assert _error(tmp_path, train=str(path)) == (
        f"{path} row 3: the document '   ' is empty (label 'b'); remove the row or give it "
        f"text")


def test_a_label_seen_only_in_the_test_file(tmp_path: Path) -> None:
    train = _csv(tmp_path / "train.csv", DOCS[:6])
    test = _jsonl(tmp_path / "test.jsonl", [("fine", "earn"), ("crude oil", "crude")])
    assert _error(tmp_path, train=str(train), test=str(test)) == (
        f"{test} row 2: label 'crude' does not occur in the training split (its 3 classes: "
        f"acq, earn, grain)")


def test_a_label_the_hold_out_left_only_in_test(tmp_path: Path) -> None:
    path = _csv(tmp_path / "rare.csv", [*DOCS, ("a lone crude story", "crude")])
    messages = []
    for seed in range(20):  # the one crude story goes to test for some seeds
        try:
            load_text(str(path), test_fraction=0.2, seed=seed)
        except DataError as e:
            messages.append(str(e))
    assert messages, "no seed held the lone document out"
    # Row 37: the header, 30 documents, 5 of them over two lines.
    assert messages[0].startswith(f"{path} row 37: label 'crude' does not occur in the "
                                  f"training split: the seeded hold-out of "
                                  f"load_text.test_fraction = 0.2 took all 1 of its documents")


def test_a_file_in_another_encoding(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\nok,a\ncaf\u00e9 prices,b\n".encode("latin-1"))
    assert _error(tmp_path, train=str(path)) == (
        f"{path} line 3: byte 0xe9 at offset 19 is not UTF-8; convert the file (e.g. iconv "
        f"-f latin1 -t utf-8)")
    record = _tfrecord(tmp_path / "latin1.tfrecord", [("ok", "a"), ("caf\xe9".encode("latin-1"),
                                                                    "b")])
    assert _error(tmp_path, train=str(record)) == (
        f"{record} record 2: text: byte 0xe9 at offset 3 is not UTF-8")


@pytest.mark.parametrize("ending", ["csv", "jsonl", "tfrecord"])
def test_a_missing_text_column_names_those_there_are(tmp_path: Path, ending: str) -> None:
    path = tmp_path / f"docs.{ending}"
    if ending == "csv":
        _csv(path, DOCS[:2], header="body,label")
        expected = "row 1: no column 'text' (load_text.text_column); its columns: 'body', 'label'"
    elif ending == "jsonl":
        _jsonl(path, DOCS[:2])
        expected = ("row 1: no key 'body' (load_text.text_column); its keys: 'text', 'label', "
                    "'id'")
    else:
        _tfrecord(path, DOCS[:2], text_key="body")
        expected = ("record 1: no feature 'text' (load_text.text_column); its features: "
                    "'body', 'label'")
    column = "body" if ending == "jsonl" else "text"
    assert _error(tmp_path, train=str(path), text_column=column) == f"{path} {expected}"
    label = "row 1" if ending != "tfrecord" else "record 1"
    assert f"{label}: no " in _error(tmp_path, train=str(path), text_column=column
                                     if ending != "tfrecord" else "body", label_column="topic")


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("cells.csv", "text,label\nfine,a\nnot, quoted,b\n",
     "row 3: 3 cells, the header has 2 (text, label); quote a text holding commas"),
    ("quote.csv", 'text,label\nfine,a\n"never closed,b\n',
     "row 3: malformed CSV (unexpected end of data)"),
    ("broken.jsonl", '{"text": "fine", "label": "a"}\n{"text": "cut\n',
     "row 2: not JSON (column 10: Unterminated string starting at): {\"text\": \"cut"),
    ("list.jsonl", '{"text": "fine", "label": "a"}\n["x", "a"]\n',
     "row 2: a JSON list, not an object with keys 'text' and 'label': [\"x\", \"a\"]"),
    ("number.jsonl", '{"text": 5, "label": "a"}\n', "row 1: text 5 is not a string"),
    ("label.jsonl", '{"text": "fine", "label": [1]}\n',
     "row 1: label [1] is not a string or an integer"),
    ("text.tfrecord", "text,label\nthis is a CSV file\n",
     "record 1: not a TFRecord, or corrupt"),
])
def test_a_malformed_row(tmp_path: Path, name: str, content: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    assert _error(tmp_path, train=str(path)).startswith(f"{path} {expected}")


def test_missing_files_and_unknown_endings(tmp_path: Path) -> None:
    assert _error(tmp_path, train=str(tmp_path / "none.csv")) == (
        f"text file not found: {tmp_path / 'none.csv'}")
    (tmp_path / "docs.txt").write_text("text\n")
    assert _error(tmp_path, train=str(tmp_path / "docs.txt")) == (
        f"{tmp_path / 'docs.txt'}: unknown text file format '.txt'; name it .csv, .jsonl, "
        f".ndjson, .tfrecord, .tfrecords")
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    assert _error(tmp_path, train=str(header_only)) == (
        f"{header_only}: no documents (only a header, or nothing)")


def test_lmt_run_refuses_bad_text_in_one_line(gin_file, in_tmp: Path, capsys) -> None:
    _csv(in_tmp / "train.csv", DOCS[:6])
    _csv(in_tmp / "test.csv", [("fine", "earn"), ("oil", "crude")])
    experiment = gin_file("""
include 'gin/preprocessing/words.gin'
include 'gin/models/bag_of_embeddings.gin'
run_experiment.data = @load_text
load_text.train = 'train.csv'
load_text.test = 'test.csv'
""")
    assert main(["run", experiment]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lmt: error: test.csv row 3: label 'crude' does not occur in the training "
                   "split (its 3 classes: acq, earn, grain)"], err
    assert all_runs(in_tmp) == []


def test_a_csv_dry_run_reports_the_padding_bucketing_saves(gin_file, in_tmp: Path,
                                                           capsys) -> None:
    lengths = [1 + (7 * i) % 60 for i in range(160)]  # 1 to 60 words
    _csv(in_tmp / "docs.csv", [(" ".join(["short"] * n if n < 30 else ["long"] * n),
                                "short" if n < 30 else "long") for n in lengths])
    experiment = gin_file("""
include 'gin/preprocessing/words.gin'
include 'gin/models/bag_of_embeddings.gin'
include 'gin/techniques/bucket_by_length.gin'
run_experiment.data = @load_text
load_text.train = 'docs.csv'
TrainConfig.global_batch_size = 8
Tokenizer.sequence_length = 64
""")
    assert main(["run", experiment, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "lmt: data text:docs: train 128, validation 16, test 16" in out
    line = next(line for line in out.splitlines() if line.startswith("lmt: padding: "))
    assert "bucketed by length in pools of 8 batches" in line, line
    assert all_runs(in_tmp) == []
