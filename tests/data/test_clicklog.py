"""The synthetic click log: reproducible bytes, rows independent of chunking, the Zipf
law and the label model it promises, an optimum that is one, the manifest's refusal of
changed settings, int64 ids end to end, and the reference numbers in an MLflow run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score

from lmt_tf.cli import main
from lmt_tf.data.clicklog import (
    CRITEO_CARDINALITIES,
    ClickLogConfig,
    ClickTruth,
    OptimumMeter,
    load_clicklog,
    write_clicklog,
    zipf_top_share,
)
from lmt_tf.data.sources import load_digits
from lmt_tf.data.tfrecord import load_tfrecords, write_shards
from lmt_tf.errors import ConfigError, DataError
from tests.conftest import all_runs

D, K = 13, 26
TINY = ClickLogConfig(train_examples=3000, validation_examples=500, test_examples=2000,
                      shards=3)
TINY_GIN = ("ClickLogConfig.train_examples = 3000\nClickLogConfig.validation_examples = 500\n"
            "ClickLogConfig.test_examples = 2000\nClickLogConfig.shards = 3\n")


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("clicklog") / "tiny"
    write_clicklog(TINY, directory, echo=_quiet)
    return directory


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _stored(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Every row of ``split`` read back from the shards, in order."""
    chunks = list(getattr(load_tfrecords(str(directory)), split).chunks(1000))
    return np.concatenate([x for x, _ in chunks]), np.concatenate([y for _, y in chunks])


def test_same_settings_give_the_same_bytes(tiny: Path, tmp_path: Path) -> None:
    write_clicklog(TINY, tmp_path / "again", echo=_quiet)
    assert _files(tmp_path / "again") == _files(tiny)
    other = ClickLogConfig(**{**TINY.as_json(), "seed": 1})
    write_clicklog(other, tmp_path / "seed1", echo=_quiet)
    assert (tmp_path / "seed1" / "test-00000-of-00003.tfrecord").read_bytes() != \
        (tiny / "test-00000-of-00003.tfrecord").read_bytes()


def test_rows_do_not_depend_on_the_chunk_size(tiny: Path, tmp_path: Path) -> None:
    """The promise: row i of a split is a function of (settings, split, i) alone."""
    write_clicklog(TINY, tmp_path / "chunked", chunk_rows=777, echo=_quiet)
    assert _files(tmp_path / "chunked") == _files(tiny)
    truth = ClickTruth(TINY)
    whole = truth.rows("test", 0, 2000)
    part = truth.rows("test", 1234, 10)
    for a, b in zip(whole, part, strict=True):
        np.testing.assert_array_equal(a[1234:1244], b)


def test_ids_follow_the_zipf_law() -> None:
    """The k-th most frequent id of a feature is drawn as often as rank k's probability,
    within 4 binomial standard deviations; feature C9 (3 ids) shows all of them."""
    n, s = 20_000, 1.05
    x, _, _ = ClickTruth(ClickLogConfig(zipf_exponent=s)).rows("train", 0, n)
    for feature in (0, 8, 2):  # 1,460 ids; 3 ids; 10,131,227 ids
        vocabulary = CRITEO_CARDINALITIES[feature]
        counts = np.sort(np.unique(x[:, D + feature], return_counts=True)[1])[::-1]
        assert len(counts) <= vocabulary
        # P(rank <= r) = ((r + 1)**(1 - s) - 1) / ((V + 1)**(1 - s) - 1)
        below = [((r + 1) ** (1 - s) - 1) / ((vocabulary + 1) ** (1 - s) - 1)
                 for r in (0, 1, 2, 3)]
        shares = np.diff(below)
        assert shares[0] == pytest.approx(zipf_top_share(vocabulary, s))
        for k, share in enumerate(shares[:min(3, vocabulary)]):
            sd = math.sqrt(n * share * (1 - share))
            assert abs(counts[k] - n * share) < 4 * sd, (feature, k, counts[k], n * share)
    assert len(np.unique(x[:, D + 8])) == 3


def test_label_rate_is_the_mean_true_probability() -> None:
    n = 20_000
    truth = ClickTruth(ClickLogConfig(seed=3))
    _, y, z = truth.rows("validation", 0, n)
    p = 1 / (1 + np.exp(-z))
    sd = math.sqrt(np.sum(p * (1 - p))) / n
    assert abs(y.mean() - p.mean()) < 4 * sd, (y.mean(), p.mean(), sd)
    assert 0.1 < y.mean() < 0.3  # the default settings' click rate


def test_the_optimum_beats_a_constant_and_a_logistic_regression() -> None:
    """Sanity that the true probabilities are the optimum: on held-out rows no constant
    and no logistic regression over one-hot ids and scaled log-counts, fitted on 5,000
    rows, reaches their log-loss or AUC."""
    truth = ClickTruth(ClickLogConfig())
    x, y, _ = truth.rows("train", 0, 5000)
    xt, yt, zt = truth.rows("test", 0, 5000)

    def features(rows: np.ndarray) -> np.ndarray:
        dense = np.log1p(rows[:, :D].astype(np.float64))
        ids = [(rows[:, D:] == v).any(axis=1) for v in frequent]  # one-hot of each
        return np.column_stack([dense / 3.0, *ids]).astype(np.float64)

    values, counts = np.unique(x[:, D:], return_counts=True)
    frequent = values[counts >= 20]  # ids seen 20 times or more
    model = LogisticRegression(C=0.5, max_iter=500).fit(features(x), y)
    fitted = model.predict_proba(features(xt))[:, 1]
    bayes = 1 / (1 + np.exp(-zt))
    constant = np.full(len(yt), yt.mean())  # the best constant, in hindsight
    assert log_loss(yt, bayes) < log_loss(yt, fitted) < log_loss(yt, constant)
    assert roc_auc_score(yt, bayes) > roc_auc_score(yt, fitted) + 0.02


def test_meter_agrees_with_scikit_learn() -> None:
    truth = ClickTruth(ClickLogConfig(seed=5))
    meter = OptimumMeter()
    ys, zs = [], []
    for start in range(0, 3000, 1000):  # streamed in chunks
        _, y, z = truth.rows("test", start, 1000)
        meter.add(y, z)
        ys.append(y)
        zs.append(z)
    y, p = np.concatenate(ys), 1 / (1 + np.exp(-np.concatenate(zs)))
    assert meter.logloss == pytest.approx(log_loss(y, p), abs=1e-12)
    assert abs(meter.auc - roc_auc_score(y, p)) <= meter.auc_error + 1e-12
    assert meter.auc_error < 1e-5
    assert meter.click_rate == y.mean()


def test_manifest_reference_is_the_optimum_of_the_stored_rows(tiny: Path) -> None:
    """Read back, the test rows' true probabilities give the manifest's numbers: the
    shards hold what was scored, raw ids unchanged."""
    manifest = json.loads((tiny / "manifest.json").read_text())
    reference = load_tfrecords(str(tiny)).reference
    assert reference == manifest["reference"]
    assert set(reference) == {"train_click_rate", "validation_click_rate", "test_click_rate",
                              "bayes_validation_logloss", "bayes_validation_auc",
                              "bayes_test_logloss", "bayes_test_auc"}
    x, y = _stored(tiny, "test")
    p = ClickTruth(TINY).probability(x)
    assert reference["bayes_test_logloss"] == pytest.approx(log_loss(y, p), abs=1e-12)
    assert reference["bayes_test_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-5)
    assert reference["test_click_rate"] == y.mean()
    assert manifest["class_names"] == ["no_click", "click"] and manifest["num_classes"] == 2
    assert manifest["features"][:2] == ["I1", "I2"] and manifest["features"][-1] == "C26"
    assert manifest["generator"]["config"] == TINY.as_json()


def test_int64_ids_above_2_31_survive_the_round_trip(tiny: Path) -> None:
    x, y = _stored(tiny, "train")
    generated_x, generated_y, _ = ClickTruth(TINY).rows("train", 0, 3000)
    assert x.dtype == np.int64 and x.shape == (3000, D + K)
    np.testing.assert_array_equal(x, generated_x)
    np.testing.assert_array_equal(y, generated_y)
    ids = x[:, D:]
    assert (ids > 2**31).mean() > 0.9 and ids.max() < 2**40 and ids.min() >= 0
    # The input pipeline hands the model int64 too (file 0 first: rows 0, 3, 6, ...).
    batch_x, _ = next(iter(load_tfrecords(str(tiny)).train.eval_dataset(64)))
    assert batch_x.dtype.name == "int64"
    np.testing.assert_array_equal(batch_x.numpy()[:, D:], ids[0::3][:64])


def test_load_generates_once_and_refuses_other_settings(tmp_path: Path, capsys) -> None:
    directory = tmp_path / "log"
    splits = load_clicklog(str(directory), TINY)
    assert "clicklog: generating" in capsys.readouterr().out
    assert splits.name == "clicklog" and splits.sizes() == {
        "train": 3000, "validation": 500, "test": 2000}
    assert splits.class_names == ("no_click", "click") and splits.input_shape == (D + K,)
    before = _files(directory)
    again = load_clicklog(str(directory), ClickLogConfig(**TINY.as_json()))
    assert "generating" not in capsys.readouterr().out
    assert again.digest() == splits.digest() and again.reference == splits.reference
    changed = ClickLogConfig(**{**TINY.as_json(), "cross_scale": 0.7})
    with pytest.raises(ConfigError) as caught:
        load_clicklog(str(directory), changed)
    assert str(caught.value) == (
        f"ClickLogConfig.cross_scale is 0.7, but {directory} holds the click log of "
        f"cross_scale = 0.5; it is never overwritten: choose a new load_clicklog.directory")
    assert _files(directory) == before
    assert load_clicklog(str(tmp_path / "seed1"), changed).digest() != splits.digest()


def test_loads_at_once_generate_once(tmp_path: Path, capsys) -> None:
    """Two loaders of one directory at once (as a cluster's workers): one generates
    while the other waits on the lock, then reads the same shards."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        loads = [pool.submit(load_clicklog, str(tmp_path / "log"), TINY) for _ in range(2)]
        digests = {load.result().digest() for load in loads}
    assert len(digests) == 1
    assert capsys.readouterr().out.count("clicklog: generating") == 1


def test_an_interrupted_generation_is_cleared(tmp_path: Path) -> None:
    partial = tmp_path / ".log.partial"  # what a killed generation leaves
    partial.mkdir()
    (partial / "train-00000-of-00003.tfrecord").write_bytes(b"cut short")
    splits = load_clicklog(str(tmp_path / "log"), TINY)
    assert not partial.exists() and len(splits.test) == 2000


def test_load_refuses_directories_it_did_not_write(tmp_path: Path) -> None:
    write_shards(load_digits(), tmp_path / "digits", shards=2, echo=_quiet)
    with pytest.raises(ConfigError, match="not generated by load_clicklog"):
        load_clicklog(str(tmp_path / "digits"), TINY)
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds files but no manifest.json"):
        load_clicklog(str(tmp_path / "stray"), TINY)
    assert (tmp_path / "stray" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("settings, message", [
    ({"vocabulary_sizes": (10, 20)}, r"one size per categorical feature \(26\)"),
    ({"crosses": ((0, 26),)}, r"two different categorical features in \[0, 26\)"),
    ({"crosses": ((3, 3),)}, "got \\(3, 3\\)"),
    ({"shards": 600, "validation_examples": 500}, "at most the 500 examples"),
    ({"zipf_exponent": 0.0}, r"ClickLogConfig.zipf_exponent must be in \(0, 4\], got 0.0"),
])
def test_settings_out_of_range_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ClickLogConfig(**{"train_examples": 3000, **settings})


def test_lmt_run_logs_the_optimum(gin_file, in_tmp: Path) -> None:
    exp = gin_file(
        "include 'gin/data/clicklog.gin'\ninclude 'gin/models/mlp.gin'\n"
        "include 'gin/strategies/default.gin'\n"
        "load_clicklog.directory = 'clicks'\n" + TINY_GIN +
        "build_mlp.hidden_units = (8,)\nTrainConfig.epochs = 1\n"
        # An MLP cannot use raw 40-bit ids (the DLRM hashes them): this run only shows
        # the data's numbers reaching MLflow, so it does not move the weights.
        "TrainConfig.optimizer = @keras.optimizers.SGD\n"
        "keras.optimizers.SGD.learning_rate = 0.0\n"
        "TrainConfig.global_batch_size = 500\nTrainConfig.verbose = 0\n"
        "ExportConfig.mlflow_model = False\n")
    assert main(["run", exp]) == 0
    reference = load_tfrecords(str(in_tmp / "clicks")).reference
    (run,) = all_runs(in_tmp)
    metrics = run.data.metrics
    for name in ("bayes_test_logloss", "bayes_test_auc", "test_click_rate"):
        assert metrics[f"data/{name}"] == pytest.approx(reference[name])
    assert 0.6 < metrics["data/bayes_test_auc"] < 0.95
    assert run.data.params["derived.dataset"] == "clicklog"


def test_shard_command_reshards_a_click_log(in_tmp: Path) -> None:
    """`lmt shard load_clicklog` generates (once) and writes the same rows, with their
    reference numbers, into another number of files."""
    bindings = ["--gin_param", "load_clicklog.directory = 'generated'",
                "--gin_param", "load_clicklog.config = @ClickLogConfig()"]
    for line in TINY_GIN.splitlines():
        bindings += ["--gin_param", line]
    assert main(["shard", "load_clicklog", "--shards", "2", "--output", "two", *bindings]) == 0
    generated, copied = load_tfrecords("generated"), load_tfrecords("two")
    assert len(copied.train.files) == 2 and copied.sizes() == generated.sizes()
    assert copied.reference == generated.reference and copied.class_names == ("no_click",
                                                                              "click")
    for split in ("train", "test"):
        for a, b in zip(_stored(in_tmp / "generated", split), _stored(in_tmp / "two", split),
                        strict=True):
            np.testing.assert_array_equal(a, b)
