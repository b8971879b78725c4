"""Sharded TFRecord files: a writer for any data source, and a file-backed source whose
workers can each read their own files (FILE sharding) or share out examples (DATA).

A directory written by ``write_shards`` holds ``{split}-{i:05d}-of-{n:05d}.tfrecord``
files and ``manifest.json`` (shape, dtypes, classes and their names, per-file example
counts and SHA-256, and any reference numbers of the data, such as a synthetic source's
Bayes-optimal loss). Every record carries the example's ``id`` (its index in its split),
so sharding can be checked. Documents (text) are stored as their UTF-8 bytes, x_dtype
``object``. ``ShardWriter`` writes one split as its examples arrive, for sources that
generate more than memory holds.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
CHUNK = 1 << 14  # examples encoded and written at a time
PARSE_BATCH = 1024  # records parsed at a time where no other batch is at hand


def write_shards(splits: Splits, directory: str | Path, shards: int,
                 echo: Callable[[str], None] = print) -> Path:
    """Writes every split of ``splits`` into ``shards`` TFRecord files each, streaming:
    in-memory splits by slices, file-backed ones (``TFRecordSplit``: a re-sharding) by
    chunks read in their order, so no split is ever held whole.

    Examples are dealt round-robin (``ShardWriter``), so shards differ in size by at most
    one example. The splits' ``reference`` numbers go into the manifest with them.

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
    shape, x_dtype, y_dtype = _split_format(splits.train)
    manifest = manifest_header(splits.name, splits.num_classes, shape, x_dtype, y_dtype,
                               splits.features, splits.pixel_scale, splits.class_names,
                               splits.reference)
    for name in SPLITS:
        split = getattr(splits, name)
        with ShardWriter(root, name, shards) as writer:
            for x, y in split_chunks(split):
                writer.write(x, y)
        manifest["splits"][name] = writer.entry()
        echo(f"lmt shard: {name}: {len(split):,} examples in {shards} files")
    return write_manifest(root, manifest)


def manifest_header(name: str, num_classes: int, example_shape: Sequence[int], x_dtype: str,
                    y_dtype: str, features: Sequence[str] = (),
                    pixel_scale: float | None = None, class_names: Sequence[str] = (),
                    reference: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The manifest of a directory of shards, its splits' entries still to be added
    (``manifest["splits"][name] = writer.entry()``): what ``load_tfrecords`` reads."""
    header = {"name": name, "num_classes": num_classes, "example_shape": list(example_shape),
              "x_dtype": x_dtype, "y_dtype": y_dtype, "features": list(features),
              "pixel_scale": pixel_scale, "class_names": list(class_names)}
    if reference:
        header["reference"] = {str(k): float(v) for k, v in reference.items()}
    return {**header, "splits": {}}


def write_manifest(root: Path, manifest: Mapping[str, Any]) -> Path:
    """Writes ``manifest`` as ``root/manifest.json``, last, so that a directory with a
    manifest holds all its files; returns its path."""
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return root / MANIFEST


def _split_format(split: Any) -> tuple[tuple[int, ...], str, str]:
    """(example shape, x_dtype, y_dtype) of an in-memory or file-backed split."""
    if isinstance(split, TFRecordSplit):
        return split.example_shape, split.x_dtype, split.y_dtype
    x_dtype = TEXT if is_text(split.x) else str(split.x.dtype)
    return tuple(split.example_shape), x_dtype, str(label_array(split.y[:1]).dtype)


def split_chunks(split: Any, size: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(x, y) of consecutive examples of ``split``, in its order, ``size`` at a time: an
    in-memory ``Split`` by slices, a ``TFRecordSplit`` read from its files."""
    if isinstance(split, TFRecordSplit):
        yield from split.chunks(size)
        return
    for start in range(0, len(split), size):
        yield split.x[start:start + size], label_array(split.y[start:start + size])


class ShardWriter:
    """One split written into ``shards`` TFRecord files as its examples arrive, in chunks
    of any size: example i (counted over all chunks) goes into file i % shards with id i,
    so files differ by at most one example and reading them round-robin restores the
    order. Use it as a context manager; ``entry()`` is the split's manifest entry."""

    def __init__(self, directory: Path, split: str, shards: int):
        self.directory = Path(directory)
        self.files = [f"{split}-{i:05d}-of-{shards:05d}.tfrecord" for i in range(shards)]
        self.counts = [0] * shards
        self.written = 0
        self._checksums: list[str] = []
        self._writers = [tf.io.TFRecordWriter(str(self.directory / f)) for f in self.files]

    def write(self, x: np.ndarray, y: np.ndarray) -> None:
        """Appends examples ``x`` with labels ``y`` (class ids, or float targets)."""
        records = encode_examples(self.written, x, y)
        shards = len(self._writers)
        for offset in range(min(shards, len(records))):
            file = (self.written + offset) % shards
            writer = self._writers[file]
            for record in records[offset::shards]:
                writer.write(record)
            self.counts[file] += len(records[offset::shards])
        self.written += len(records)

    def close(self) -> None:
        """Closes the files and takes their SHA-256 (read back: TensorFlow frames the
        records)."""
        if not self._writers:
            return
        for writer in self._writers:
            writer.close()
        self._writers = []
        self._checksums = [_sha256(self.directory / f) for f in self.files]

    def entry(self) -> dict[str, list[Any]]:
        """The split's manifest entry: its files, their example counts and checksums."""
        return {"files": list(self.files), "counts": list(self.counts),
                "sha256": list(self._checksums)}

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 22):
            sha.update(block)
    return sha.hexdigest()


# Records are tf.train.Example protos {"id": int64, "x": bytes, "y": int64 | float},
# encoded here rather than through tf.train.Example (about 10x faster: whole chunks at a
# time in NumPy); tests check that TensorFlow parses them as it parses its own.

def _varint(n: int) -> bytes:
    n &= 0xFFFF_FFFF_FFFF_FFFF  # a negative int64 is its two's complement, 10 bytes
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (every tag here fits one byte)."""
    return bytes((tag,)) + _varint(len(payload)) + payload


def _label_feature(y: Any) -> bytes:
    """The Feature of a label: an int64_list (field 3) for an integer, a float_list
    (field 2) for anything else."""
    if np.issubdtype(type(y), np.integer) or isinstance(y, int):
        return _field(0x1A, _field(0x0A, _varint(int(y))))
    return _field(0x12, _field(0x0A, struct.pack("<f", float(y))))


def _entries(index: int, data: bytes, y: Any) -> tuple[bytes, bytes, bytes]:
    """The three map<string, Feature> entries of an Example: id, x (its bytes), y."""

    def entry(key: bytes, feature: bytes) -> bytes:
        return _field(0x0A, _field(0x0A, key) + _field(0x12, feature))

    return (entry(b"id", _field(0x1A, _field(0x0A, _varint(index)))),
            entry(b"x", _field(0x0A, _field(0x0A, data))), entry(b"y", _label_feature(y)))


def _example(index: int, x: np.ndarray | str | bytes, y: Any) -> bytes:
    """One serialized Example; ``x`` a document (str or UTF-8 bytes) or a numeric row."""
    data = (x.encode("utf-8") if isinstance(x, str) else x if isinstance(x, bytes)
            else np.ascontiguousarray(x).tobytes())
    return _field(0x0A, b"".join(_entries(index, data, y)))


def _varint_widths(values: np.ndarray) -> np.ndarray:
    """Bytes of each value's varint (uint64 values)."""
    widths = np.ones(len(values), np.int64)
    for k in range(1, 10):
        widths += values >= np.uint64(1 << (7 * k))
    return widths


def _varint_columns(values: np.ndarray, width: int) -> np.ndarray:
    """(n, width) uint8: the varints of ``values`` (uint64), each ``width`` bytes."""
    shifts = np.arange(width, dtype=np.uint64) * np.uint64(7)
    columns = ((values[:, None] >> shifts) & np.uint64(0x7F)).astype(np.uint8)
    columns[:, :-1] |= 0x80
    return columns


def encode_examples(start: int, x: np.ndarray, y: np.ndarray) -> list[bytes]:
    """The serialized Examples of rows ``x`` (ids ``start``, ``start + 1``, ...) with
    labels ``y``: documents one by one, numeric rows as whole chunks. Rows whose id and
    label varints are equally long share one layout; NumPy fills the varying bytes."""
    n = len(x)
    if n == 0:
        return []
    if is_text(x) or (x.dtype.kind == "S"):
        return [_example(start + i, x[i], y[i]) for i in range(n)]
    data = np.ascontiguousarray(x).reshape(n, -1).view(np.uint8).reshape(n, -1)
    ids = np.arange(start, start + n, dtype=np.uint64)
    integer = np.issubdtype(np.asarray(y).dtype, np.integer)
    labels = (np.asarray(y).astype(np.int64).view(np.uint64) if integer
              else np.asarray(y, np.float32))
    id_widths = _varint_widths(ids)
    label_widths = _varint_widths(labels) if integer else np.full(n, 4)
    groups = id_widths * 16 + label_widths
    records: list[bytes] = [b""] * n
    for group in np.unique(groups):
        rows = np.flatnonzero(groups == group)
        id_width, label_width = int(group) // 16, int(group) % 16
        # A row of this layout: the id's varint ends the first entry, x's bytes the
        # second, the label's value the record.
        id_entry, x_entry, y_entry = _entries(
            1 << (7 * (id_width - 1)), data[0].tobytes(),
            (1 << (7 * (label_width - 1))) if integer else 0.0)
        sample = _field(0x0A, id_entry + x_entry + y_entry)
        length, x_width = len(sample), data.shape[1]
        id_end = length - len(y_entry) - len(x_entry)
        x_end = length - len(y_entry)
        layout = np.tile(np.frombuffer(sample, np.uint8), (len(rows), 1))
        layout[:, id_end - id_width:id_end] = _varint_columns(ids[rows], id_width)
        layout[:, x_end - x_width:x_end] = data[rows]
        layout[:, length - label_width:] = (
            _varint_columns(labels[rows], label_width) if integer
            else labels[rows].astype("<f4").view(np.uint8).reshape(-1, 4))
        flat, size = layout.tobytes(), length * len(rows)
        cut = map(flat.__getitem__, map(slice, range(0, size, length),
                                        range(length, size + 1, length)))
        if len(rows) == n:  # one layout (the usual case)
            return list(cut)
        for row, record in zip(rows.tolist(), cut, strict=True):
            records[row] = record
    return records


@dataclass(frozen=True)
class TFRecordSplit:
    """One split as TFRecord files; the same interface as an in-memory ``Split``."""

    directory: Path
    files: tuple[str, ...]
    counts: tuple[int, ...]
    example_shape: tuple[int, ...]
    x_dtype: str
    y_dtype: str
    checksums: tuple[str, ...] = ()  # each file's SHA-256 as written (older manifests: none)

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

    def _parse(self, records: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """(ids, x, y) of a batch of serialized records: parsed a batch at a time, about
        ten times the examples/s of one at a time."""
        y_type = tf.int64 if self.y_dtype.startswith("int") else tf.float32
        parsed = tf.io.parse_example(records, {
            "id": tf.io.FixedLenFeature([], tf.int64),
            "x": tf.io.FixedLenFeature([], tf.string),
            "y": tf.io.FixedLenFeature([], y_type)})
        if self.text:
            return parsed["id"], parsed["x"], parsed["y"]
        x = tf.reshape(tf.io.decode_raw(parsed["x"], tf.dtypes.as_dtype(self.x_dtype)),
                       [-1, *self.example_shape])
        return parsed["id"], x, parsed["y"]

    def _records(self) -> tf.data.Dataset:
        """(x, y) of every record, in file order (a map per example would cost more than
        the parsing)."""
        return (tf.data.TFRecordDataset(self.paths).batch(PARSE_BATCH)
                .map(lambda records: self._parse(records)[1:]).unbatch())

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
        dataset = _block_shuffle(dataset, shuffle_buffer, seeds, self._parse)
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
            dataset = dataset.batch(per_replica, drop_remainder=True)
            dataset = dataset.map(lambda _, x, y: (to_model_input(x), y),  # per batch
                                  num_parallel_calls=tf.data.AUTOTUNE)
            dataset = dataset.skip(start_step * batches_per_step(context))
            return without_autoshard(dataset).prefetch(tf.data.AUTOTUNE)

        return input_fn

    def eval_dataset(self, global_batch_size: int) -> tf.data.Dataset:
        """All examples in file order, for validation or testing."""
        return evaluation_batches(self._records(), global_batch_size)

    def chunks(self, size: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(x, y) of ``size`` examples at a time, every file read once, round-robin: the
        order ``ShardWriter`` dealt them in (ids 0, 1, ...). Documents come as UTF-8 bytes."""
        files = tf.data.Dataset.from_tensor_slices(self.paths)
        records = files.interleave(tf.data.TFRecordDataset, cycle_length=len(self.paths),
                                   block_length=1)
        for _, x, y in records.batch(size).map(self._parse).as_numpy_iterator():
            yield x, y

    def sample(self, count: int) -> np.ndarray:
        batch = next(iter(tf.data.TFRecordDataset(self.paths[0]).batch(count)
                          .map(self._parse)))
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
        for batch in tf.data.TFRecordDataset(self.paths).batch(4096).map(self._parse):
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


def _block_shuffle(records: tf.data.Dataset, block: int, seeds: tf.Tensor,
                   parse: Callable[[tf.Tensor], tuple[tf.Tensor, ...]]) -> tf.data.Dataset:
    """(id, x, y) of ``records``, parsed and shuffled within consecutive blocks of
    ``block`` by a stateless permutation of (seeds, block number): the same order for the
    same seeds on every run. (``Dataset.shuffle`` takes no tensor seed inside a
    per-epoch function.)"""
    epoch_seed = seeds[0] * 1_000_003 + seeds[1]

    def permute(number: tf.Tensor, records_block: tf.Tensor):
        ids, x, y = parse(records_block)
        order = tf.random.experimental.stateless_shuffle(
            tf.range(tf.shape(ids)[0]), seed=tf.stack([epoch_seed, number]))
        return tf.gather(ids, order), tf.gather(x, order), tf.gather(y, order)

    return records.batch(block).enumerate().map(permute).unbatch()


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
                                          shape, x_dtype, y_dtype,
                                          tuple(entry.get("sha256") or ()))
        if verify:
            verify_split(parts[split_name], classes)
    return Splits(f"tfrecord:{name}", parts["train"], parts["validation"], parts["test"],
                  classes, str(Path(directory).resolve()),
                  tuple(manifest.get("features", ())), manifest.get("pixel_scale"),
                  tuple(str(c) for c in manifest.get("class_names") or ()),
                  {str(k): float(v) for k, v in (manifest.get("reference") or {}).items()})


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
