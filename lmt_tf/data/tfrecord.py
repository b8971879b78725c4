"""Sharded TFRecord files: a writer for any data source, and a file-backed source whose
workers can each read their own files (FILE sharding) or share out examples (DATA).

A directory written by ``write_shards`` holds ``{split}-{i:05d}-of-{n:05d}.tfrecord``
files and ``manifest.json`` (shape, dtypes, classes and their names, per-file example
counts). Every record carries the example's ``id`` (its index in its split), so sharding
can be checked. Documents (text) are stored as their UTF-8 bytes, x_dtype ``object``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from lmt_tf.data.pipeline import (
    BatchPlan,
    InputConfig,
    InputFn,
    batches_per_step,
    evaluation_batches,
    label_array,
    to_model_input,
    without_autoshard,
)
from lmt_tf.data.splits import Splits, is_text
from lmt_tf.errors import ConfigError, DataError

MANIFEST = "manifest.json"
TEXT = "object"  # the x_dtype of documents (NumPy's, for an array of str)
SPLITS = ("train", "validation", "test")


def write_shards(splits: Splits, directory: str | Path, shards: int,
                 echo: Callable[[str], None] = print) -> Path:
    """Writes every split of ``splits`` into ``shards`` TFRecord files each.

    Examples are dealt round-robin, so shards differ in size by at most one example.

    Returns:
      The path of the manifest.

    Raises:
      ConfigError: if ``shards`` < 1, or more than a split has examples (a file per
        example or empty files: reading them costs more than the data), or the directory
        already holds a manifest.
    """
    if shards < 1:
        raise ConfigError(f"--shards must be at least 1, got {shards}")
    sizes = {name: len(getattr(splits, name)) for name in SPLITS}
    smallest = min((n, name) for name, n in sizes.items() if n)
    if shards > smallest[0]:
        raise ConfigError(f"--shards {shards} is more than the {smallest[0]:,} examples of "
                          f"the {smallest[1]} split; use at most {smallest[0]:,}")
    root = Path(directory)
    if (root / MANIFEST).exists():
        raise ConfigError(f"{root} already holds shards ({MANIFEST}); choose a new directory")
    root.mkdir(parents=True, exist_ok=True)
    first = splits.train
    x_dtype = TEXT if is_text(first.x) else str(first.x.dtype)
    manifest = {"name": splits.name, "num_classes": splits.num_classes,
                "example_shape": list(first.example_shape), "x_dtype": x_dtype,
                "y_dtype": str(label_array(first.y).dtype), "features": list(splits.features),
                "pixel_scale": splits.pixel_scale, "class_names": list(splits.class_names),
                "splits": {}}
    for name in SPLITS:
        split = getattr(splits, name)
        files = [f"{name}-{i:05d}-of-{shards:05d}.tfrecord" for i in range(shards)]
        counts = [0] * shards
        y = label_array(split.y)
        writers = [tf.io.TFRecordWriter(str(root / f)) for f in files]
        try:
            for i in range(len(split)):
                writers[i % shards].write(_example(i, split.x[i], y[i]))
                counts[i % shards] += 1
        finally:
            for writer in writers:
                writer.close()
        manifest["splits"][name] = {"files": files, "counts": counts}
        echo(f"lmt shard: {name}: {len(split):,} examples in {shards} files")
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return root / MANIFEST


def _example(index: int, x: np.ndarray | str, y: np.generic) -> bytes:
    data = x.encode("utf-8") if isinstance(x, str) else np.ascontiguousarray(x).tobytes()
    label = (tf.train.Feature(int64_list=tf.train.Int64List(value=[int(y)]))
             if np.issubdtype(type(y), np.integer)
             else tf.train.Feature(float_list=tf.train.FloatList(value=[float(y)])))
    features = {
        "id": tf.train.Feature(int64_list=tf.train.Int64List(value=[index])),
        "x": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
        "y": label,
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


@dataclass(frozen=True)
class TFRecordSplit:
    """One split as TFRecord files; the same interface as an in-memory ``Split``."""

    directory: Path
    files: tuple[str, ...]
    counts: tuple[int, ...]
    example_shape: tuple[int, ...]
    x_dtype: str
    y_dtype: str

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def text(self) -> bool:
        """Whether the examples are documents (strings)."""
        return self.x_dtype == TEXT

    @property
    def paths(self) -> list[str]:
        """The files of this split, as paths."""
        return [str(self.directory / f) for f in self.files]

    def _parse(self, record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        y_type = tf.int64 if self.y_dtype.startswith("int") else tf.float32
        parsed = tf.io.parse_single_example(record, {
            "id": tf.io.FixedLenFeature([], tf.int64),
            "x": tf.io.FixedLenFeature([], tf.string),
            "y": tf.io.FixedLenFeature([], y_type)})
        if self.text:
            return parsed["id"], parsed["x"], parsed["y"]
        x = tf.reshape(tf.io.decode_raw(parsed["x"], tf.dtypes.as_dtype(self.x_dtype)),
                       self.example_shape)
        return parsed["id"], x, parsed["y"]

    def policy_for(self, pipelines: int, shard_policy: str) -> str:
        """The policy in force: AUTO is FILE with at least one file per pipeline."""
        if shard_policy == "AUTO":
            return "FILE" if pipelines > 1 and len(self.files) >= pipelines else "DATA"
        if shard_policy == "FILE" and len(self.files) < pipelines:
            raise ConfigError(f"FILE sharding over {pipelines} workers needs at least "
                              f"{pipelines} files; {self.directory} has {len(self.files)} "
                              f"per split (write more with `lmt shard --shards`)")
        return shard_policy

    def examples(self, context: tf.distribute.InputContext, seed: int, epoch: tf.Tensor,
                 shard_policy: str = "AUTO", shuffle_buffer: int = 10_000
                 ) -> tf.data.Dataset:
        """(id, x, y) of this pipeline's part of ``epoch``, shuffled by (seed, epoch): the
        same on every restart.

        FILE: pipeline p reads files p, p+P, ...; DATA: every pipeline reads all files in
        the same order and keeps every P-th example; OFF: every pipeline reads everything.
        """
        pipelines, pipeline = context.num_input_pipelines, context.input_pipeline_id
        policy = self.policy_for(pipelines, shard_policy)
        files = self.paths
        if policy == "FILE":
            files = files[pipeline::pipelines]
        seeds = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
        order = tf.random.experimental.stateless_shuffle(tf.constant(files), seed=seeds)
        dataset = tf.data.Dataset.from_tensor_slices(order).interleave(
            tf.data.TFRecordDataset, cycle_length=min(4, len(files)))
        dataset = _block_shuffle(dataset.map(self._parse), shuffle_buffer, seeds)
        if policy == "DATA":
            dataset = dataset.shard(pipelines, pipeline)
        return dataset

    def train_input_fn(self, plan: BatchPlan, seed: int, start_epoch: int,
                       input_config: InputConfig | None = None,
                       start_step: int = 0) -> InputFn:
        """Epochs from step ``start_step`` of ``start_epoch`` on, without end, in
        per-replica batches."""
        config = input_config or InputConfig()

        def input_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
            per_replica = context.get_per_replica_batch_size(plan.global_batch_size)
            epochs = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max)
            dataset = epochs.flat_map(lambda e: self.examples(
                context, seed, e, config.auto_shard_policy, config.shuffle_buffer))
            dataset = dataset.map(lambda _, x, y: (to_model_input(x), y),
                                  num_parallel_calls=tf.data.AUTOTUNE)
            dataset = dataset.batch(per_replica, drop_remainder=True)
            dataset = dataset.skip(start_step * batches_per_step(context))
            return without_autoshard(dataset).prefetch(tf.data.AUTOTUNE)

        return input_fn

    def eval_dataset(self, global_batch_size: int) -> tf.data.Dataset:
        """All examples in file order, for validation or testing."""
        examples = tf.data.TFRecordDataset(self.paths).map(self._parse).map(lambda _, x, y: (x, y))
        return evaluation_batches(examples, global_batch_size)

    def sample(self, count: int) -> np.ndarray:
        batch = next(iter(tf.data.TFRecordDataset(self.paths[0])
                          .map(self._parse).batch(count)))
        return _decoded(batch[1].numpy()) if self.text else batch[1].numpy()

    def documents(self) -> np.ndarray:
        """Every document of the split, in its order before sharding (by id), as an
        object array of str: what a tokenizer is fitted on.

        Raises:
          ConfigError: if the examples are not documents.
        """
        if not self.text:
            raise ConfigError(f"{self.directory} holds examples of {self.x_dtype}, not "
                              f"documents")
        ids, docs = [], []
        for batch in tf.data.TFRecordDataset(self.paths).map(self._parse).batch(4096):
            ids.append(batch[0].numpy())
            docs.append(batch[1].numpy())
        if not ids:
            return _decoded(np.zeros(0, object))
        order = np.argsort(np.concatenate(ids), kind="stable")
        return _decoded(np.concatenate(docs)[order])


def _decoded(data: np.ndarray) -> np.ndarray:
    """UTF-8 bytes as documents: an object array of str."""
    out = np.empty(len(data), dtype=object)
    out[:] = [item.decode("utf-8") for item in data]
    return out


def _block_shuffle(examples: tf.data.Dataset, block: int, seeds: tf.Tensor) -> tf.data.Dataset:
    """Shuffles examples within consecutive blocks of ``block`` by a stateless permutation
    of (seeds, block number): the same order for the same seeds on every run.
    (``Dataset.shuffle`` takes no tensor seed inside a per-epoch function.)"""
    epoch_seed = seeds[0] * 1_000_003 + seeds[1]

    def permute(number: tf.Tensor, examples_block: tuple[tf.Tensor, ...]):
        ids, x, y = examples_block
        order = tf.random.experimental.stateless_shuffle(
            tf.range(tf.shape(ids)[0]), seed=tf.stack([epoch_seed, number]))
        return tf.gather(ids, order), tf.gather(x, order), tf.gather(y, order)

    return examples.batch(block).enumerate().map(permute).unbatch()


def load_tfrecords(directory: str, verify: bool = True) -> Splits:
    """The splits written by ``lmt shard`` into ``directory``.

    Args:
      directory: where ``lmt shard`` wrote the files and ``manifest.json``.
      verify: read every file once before training: each record's checksum, the
        records per file against the manifest, and (for classification) every label
        in ``[0, num_classes)``. A damaged shard is then an error naming the file,
        instead of an epoch that silently ends early. About a second per 100 MB.

    Raises:
      DataError: if the manifest is missing or unreadable, a listed file is missing, or
        (verifying) a file is corrupt, truncated, or holds labels out of range.
    """
    root = Path(directory)
    manifest_file = root / MANIFEST
    if not manifest_file.is_file():
        raise DataError(f"no TFRecord shards in {root} (no {MANIFEST}; write them with "
                        f"`lmt shard SOURCE --shards N --output {root}`)")
    try:
        manifest = json.loads(manifest_file.read_text())
        entries = {name: manifest["splits"][name] for name in SPLITS}
        shape, classes = tuple(manifest["example_shape"]), int(manifest["num_classes"])
        x_dtype, y_dtype, name = manifest["x_dtype"], manifest["y_dtype"], manifest["name"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{manifest_file} is not a manifest written by `lmt shard` "
                        f"({type(e).__name__}: {e})") from e
    parts = {}
    for split_name in SPLITS:
        entry = entries[split_name]
        missing = [f for f in entry["files"] if not (root / f).is_file()]
        if missing:
            raise DataError(f"{root}: files listed in {MANIFEST} are missing: {missing[:3]}")
        parts[split_name] = TFRecordSplit(root, tuple(entry["files"]), tuple(entry["counts"]),
                                          shape, x_dtype, y_dtype)
        if verify:
            verify_split(parts[split_name], classes)
    return Splits(f"tfrecord:{name}", parts["train"], parts["validation"], parts["test"],
                  classes, str(Path(directory).resolve()),
                  tuple(manifest.get("features", ())), manifest.get("pixel_scale"),
                  tuple(str(c) for c in manifest.get("class_names") or ()))


def verify_split(split: TFRecordSplit, num_classes: int) -> None:
    """Reads every record of ``split`` once; see ``load_tfrecords(verify=True)``.

    Raises:
      DataError: naming the first file that is corrupt, truncated, short of the
        manifest's count, or (classification) holds a label outside the classes.
    """
    y_type = tf.int64 if split.y_dtype.startswith("int") else tf.float32
    labels = {"y": tf.io.FixedLenFeature([], y_type)}
    for path, expected in zip(split.paths, split.counts, strict=True):
        records = tf.data.TFRecordDataset(path).batch(4096)
        count, low, high = 0, None, None
        try:
            for batch in records:
                y = tf.io.parse_example(batch, labels)["y"].numpy()
                count += len(y)
                low = y.min() if low is None else min(low, y.min())
                high = y.max() if high is None else max(high, y.max())
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
            reason = e.message.splitlines()[0]
            raise DataError(f"{path} is corrupt after {count} records ({reason})") from e
        if count != expected:
            raise DataError(f"{path} holds {count} records, but {MANIFEST} lists {expected} "
                            f"(truncated or replaced?)")
        if num_classes > 1 and count and (low < 0 or high >= num_classes):
            raise DataError(f"{path} holds labels in [{low}, {high}], outside "
                            f"[0, {num_classes})")
