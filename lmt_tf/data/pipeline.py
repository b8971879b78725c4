"""tf.data input pipelines: per-epoch seeded shuffling, batching by the global batch size,
and an ``input_fn(input_context)`` so each worker builds its own part of every batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

from lmt_tf.checks import check, check_types
from lmt_tf.errors import ConfigError

if TYPE_CHECKING:  # splits.py calls into this module for its pipelines
    from lmt_tf.data.splits import Split

InputFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]


SHARD_POLICIES = ("AUTO", "FILE", "DATA", "OFF")


@dataclass
class InputConfig:
    """How each worker's input pipeline takes its part of the data."""

    # AUTO: FILE when a file source has at least one file per worker, else DATA.
    # FILE: each worker reads its own files. DATA: every worker reads all and keeps its
    # share of the examples. OFF: every worker reads everything (duplicates).
    auto_shard_policy: str = "AUTO"
    shuffle_buffer: int = 10_000  # examples; file sources only (arrays shuffle fully)
    # Documents in memory: global batches per pool whose documents are sorted by length
    # before they are cut into batches (less padding); 0: off. See ``bucketed``.
    bucket_by_length: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        check(self.auto_shard_policy in SHARD_POLICIES, "InputConfig.auto_shard_policy",
              f"must be one of {SHARD_POLICIES}, got {self.auto_shard_policy!r}")
        check(self.shuffle_buffer >= 1, "InputConfig.shuffle_buffer",
              f"must be >= 1, got {self.shuffle_buffer}")
        check(self.bucket_by_length >= 0, "InputConfig.bucket_by_length",
              f"must be >= 0 (global batches per pool; 0: off), got {self.bucket_by_length}")


@dataclass(frozen=True)
class BatchPlan:
    """How one epoch is cut into steps."""

    global_batch_size: int  # examples per optimizer step, summed over all replicas
    replicas: int  # replicas in sync
    steps_per_epoch: int

    @property
    def per_replica_batch_size(self) -> int:
        return self.global_batch_size // self.replicas

    @property
    def examples_per_epoch(self) -> int:
        return self.steps_per_epoch * self.global_batch_size


def plan_batches(num_examples: int, global_batch_size: int, replicas: int,
                 steps_per_epoch: int | None = None) -> BatchPlan:
    """Checks a global batch size against the data and the replicas.

    Args:
      num_examples: training examples available.
      global_batch_size: examples per step over all replicas.
      replicas: replicas in sync; must divide ``global_batch_size``.
      steps_per_epoch: steps per epoch; None means every full batch once.

    Raises:
      ConfigError: if the batch does not divide over the replicas or does not fit the data.
    """
    if global_batch_size < 1 or global_batch_size % replicas:
        raise ConfigError(
            f"TrainConfig.global_batch_size must be a positive multiple of the {replicas} "
            f"replicas in sync, got {global_batch_size}"
        )
    full = num_examples // global_batch_size
    if full < 1:
        raise ConfigError(f"TrainConfig.global_batch_size {global_batch_size} exceeds the "
                          f"{num_examples} training examples")
    if steps_per_epoch is not None and not 1 <= steps_per_epoch <= full:
        raise ConfigError(f"TrainConfig.steps_per_epoch must be in [1, {full}] for "
                          f"{num_examples} examples in batches of {global_batch_size}, "
                          f"got {steps_per_epoch}")
    return BatchPlan(global_batch_size, replicas, steps_per_epoch or full)


def to_model_input(x: tf.Tensor) -> tf.Tensor:
    """Raw features as the model takes them: images stored as uint8 become float32 with
    their values 0-255 (the model rescales them: ``data.preprocessing``); other floats
    become float32; integer ids (users, items, tokens) stay integers for embedding
    lookups; documents stay strings (the tokenizer is inside the model)."""
    if x.dtype == tf.string:
        return x
    if x.dtype == tf.uint8:
        return tf.cast(x, tf.float32)
    if x.dtype.is_integer:
        return tf.cast(x, tf.int64)
    return tf.cast(x, tf.float32)


def feature_array(x: np.ndarray) -> np.ndarray:
    """Features as a tensor takes them: documents (an object array of str) as bytes."""
    return encoded(x) if x.dtype.kind in "OU" else x


def encoded(documents: np.ndarray) -> np.ndarray:
    """Documents as TensorFlow takes strings: an object array of their UTF-8 bytes (not
    ``astype(bytes)``, whose fixed width is the longest document's: 20 Newsgroups' 58 kB
    post would make its training split 600 MB)."""
    out = np.empty(len(documents), dtype=object)
    out[:] = [d if isinstance(d, bytes) else str(d).encode("utf-8") for d in documents]
    return out


def label_array(y: np.ndarray) -> np.ndarray:
    """Integer class labels as int64, regression targets as float32."""
    return y.astype(np.int64 if np.issubdtype(y.dtype, np.integer) else np.float32)


def epoch_order(num_examples: int, seed: int, epoch: tf.Tensor) -> tf.Tensor:
    """The permutation of example ids used in ``epoch``: a pure function of (seed, epoch),
    so a resumed run sees exactly the batches the uninterrupted run would have seen."""
    seeds = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.random.experimental.stateless_shuffle(tf.range(num_examples, dtype=tf.int64),
                                                    seed=seeds)


def document_lengths(x: np.ndarray) -> np.ndarray:
    """Whitespace-separated words of each document: what length bucketing sorts by and
    padding is measured in (the tokenizer's count, after it strips punctuation, is the
    same or a little less)."""
    return np.fromiter((len(str(doc).split()) for doc in x), np.int64, len(x))


def bucketed(order: tf.Tensor, lengths: tf.Tensor, batch: int, pool: int,
             seeds: tf.Tensor) -> tf.Tensor:
    """``order`` (example ids, a whole number of batches of ``batch``) with the examples
    of each pool of ``pool`` consecutive batches sorted by length (ties in their order)
    and cut into batches again, the batches of each pool then shuffled by ``seeds``.

    Each batch holds documents of similar length, so less padding; which examples a
    pool holds, and so an epoch's multiset of examples, stays that of ``order``, and
    the result is a pure function of (order, lengths, seeds).
    """
    order = tf.cast(order, tf.int64)
    count = tf.shape(order, out_type=tf.int64)[0]
    examples_pool = tf.range(count) // (batch * pool)
    length = tf.cast(tf.gather(lengths, order), tf.int64)
    # Pool first, then length: one key, since lengths are below 2**32.
    by_length = tf.argsort(examples_pool * 2**32 + length, stable=True)
    batches = tf.reshape(tf.gather(order, by_length), [-1, batch])
    steps = tf.shape(batches, out_type=tf.int64)[0]
    rank = tf.random.experimental.stateless_shuffle(
        tf.range(steps), seed=tf.random.experimental.stateless_fold_in(seeds, 1))
    shuffled = tf.argsort((tf.range(steps) // pool) * steps + rank, stable=True)
    return tf.reshape(tf.gather(batches, shuffled), [-1])


def epoch_examples(num_examples: int, seed: int, epoch: tf.Tensor, plan: BatchPlan,
                   bucket: int = 0, lengths: tf.Tensor | None = None) -> tf.Tensor:
    """The example ids of the ``plan.steps_per_epoch`` global batches of ``epoch``,
    batch after batch: the epoch's seeded permutation (``epoch_order``), with pools of
    ``bucket`` batches sorted by ``lengths`` (``bucketed``) if ``bucket`` > 0."""
    order = epoch_order(num_examples, seed, epoch)[: plan.examples_per_epoch]
    if not bucket:
        return order
    seeds = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    return bucketed(order, lengths, plan.global_batch_size, bucket, seeds)


def array_train_input_fn(split: Split, plan: BatchPlan, seed: int, start_epoch: int,
                         shard_policy: str = "AUTO", start_step: int = 0,
                         bucket: int = 0) -> InputFn:
    """An input function yielding epochs ``start_epoch, start_epoch + 1, ...`` of the
    in-memory ``split`` without end (``model.fit`` takes ``steps_per_epoch`` per epoch),
    the first from its step ``start_step`` (a run resumed mid-epoch).

    Step ``s`` of an epoch uses examples ``order[s*B:(s+1)*B]`` of that epoch's seeded
    permutation (B = global batch; with ``bucket`` > 0 and documents, pools of
    ``bucket`` batches sorted by length: ``epoch_examples``), cut into per-replica
    chunks. Each input pipeline (one per worker) yields only its own chunks:

    - synchronous strategies (replicas >= pipelines): per step, each pipeline takes its
      replicas' consecutive chunks, so the global batch is the same whatever the number
      of workers and replicas;
    - parameter-server training (one replica, several worker pipelines): whole steps go
      round-robin to the pipelines, so no two workers train on the same examples.

    With ``shard_policy`` OFF every pipeline yields the whole epoch; FILE is an error,
    since arrays in memory have no files (``lmt shard`` writes TFRecord shards).

    Returns:
      A function of a ``tf.distribute.InputContext`` returning a ``tf.data.Dataset``
      of (features, labels) per-replica batches.
    """
    if shard_policy == "FILE":
        raise ConfigError(f"InputConfig.auto_shard_policy FILE needs a file source, but "
                          f"{len(split)} examples are in memory: use DATA, or write TFRecord "
                          f"shards with `lmt shard` and read them with @load_tfrecords")
    lengths = bucket_lengths(split, bucket)
    x_all, y_all = feature_array(split.x), label_array(split.y)
    num_examples = len(split)

    def input_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = context.get_per_replica_batch_size(plan.global_batch_size)
        pipelines, pipeline = context.num_input_pipelines, context.input_pipeline_id
        if shard_policy == "OFF":
            pipelines, pipeline = 1, 0
        block = max(context.num_replicas_in_sync, pipelines)  # chunks dealt per round
        chunks = plan.steps_per_epoch * context.num_replicas_in_sync // block * block
        features, labels = tf.constant(x_all), tf.constant(y_all)
        sort_by = None if lengths is None else tf.constant(lengths)

        def epoch_batches(epoch: tf.Tensor) -> tf.data.Dataset:
            order = epoch_examples(num_examples, seed, epoch, plan, bucket, sort_by)
            order = order[: chunks * per_replica]
            grid = tf.reshape(order, [-1, pipelines, block // pipelines, per_replica])
            mine = tf.reshape(grid[:, pipeline], [-1, per_replica])
            return tf.data.Dataset.from_tensor_slices(mine)

        def gather(ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return to_model_input(tf.gather(features, ids)), tf.gather(labels, ids)

        epochs = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max)
        dataset = epochs.flat_map(epoch_batches).skip(
            start_step * batches_per_step(context))
        dataset = dataset.map(gather, num_parallel_calls=tf.data.AUTOTUNE)
        return without_autoshard(dataset).prefetch(tf.data.AUTOTUNE)

    return input_fn


def bucket_lengths(split: Split, bucket: int) -> np.ndarray | None:
    """The lengths length bucketing sorts ``split`` by (None when it is off).

    Raises:
      ConfigError: if bucketing is asked for examples that are not documents in memory.
    """
    if not bucket:
        return None
    x = getattr(split, "x", None)
    check(x is not None and np.asarray(x).dtype.kind in "OUS", "InputConfig.bucket_by_length",
          f"sorts documents in memory by length; the training examples are "
          f"{'read from files' if x is None else f'of {np.asarray(x).dtype} (not text)'}: "
          f"set it to 0")
    return document_lengths(x)


@dataclass(frozen=True)
class Padding:
    """Token positions of an epoch's per-replica batches, each padded to its longest
    document (at most the sequence length): the documents' tokens and the padding,
    without and with length bucketing."""

    tokens: int  # tokens of the epoch's documents (the same either way)
    padded: int  # padding positions, batches of the epoch's random permutation
    padded_bucketed: int | None  # with length bucketing; None: off
    pool: int  # global batches per bucketing pool (0: off)

    @property
    def fraction(self) -> float:
        """The share of padding among the positions of the batches in force."""
        padded = self.padded if self.padded_bucketed is None else self.padded_bucketed
        return padded / (self.tokens + padded) if padded else 0.0

    @property
    def unbucketed_fraction(self) -> float:
        return self.padded / (self.tokens + self.padded) if self.padded else 0.0

    def params(self) -> dict[str, float]:
        """The run's params: the share of padding in force, and without bucketing."""
        return {"derived.padding_fraction": round(self.fraction, 4),
                "derived.padding_fraction_unbucketed": round(self.unbucketed_fraction, 4)}

    def describe(self) -> str:
        """One line: how much of an epoch's token positions are padding."""
        line = (f"padding: {self.unbucketed_fraction:.1%} of an epoch's "
                f"{self.tokens + self.padded:,} token positions")
        if self.padded_bucketed is None:
            return line + " (InputConfig.bucket_by_length sorts batches by length)"
        cut = self.padded / self.padded_bucketed if self.padded_bucketed else float("inf")
        return (line + f"; bucketed by length in pools of {self.pool} batches "
                f"{self.fraction:.1%} of {self.tokens + self.padded_bucketed:,} ({cut:.1f}x "
                f"fewer padded tokens)")


def padding(split: Split, plan: BatchPlan, seed: int, bucket: int, sequence_length: int,
            epoch: int = 0) -> Padding:
    """The padding of ``epoch`` of ``split``'s documents (whitespace words, at most
    ``sequence_length`` each) batched as the input pipeline batches them, without and
    with length bucketing in pools of ``bucket`` global batches."""
    lengths = np.minimum(document_lengths(split.x), sequence_length)
    sort_by = tf.constant(lengths)

    def padded(pool: int) -> tuple[int, int]:
        ids = epoch_examples(len(split), seed, tf.constant(epoch), plan, pool, sort_by).numpy()
        batches = lengths[ids].reshape(-1, plan.per_replica_batch_size)
        positions = np.maximum(batches.max(axis=1), 1) * batches.shape[1]
        return int(batches.sum()), int(positions.sum() - batches.sum())

    tokens, plain = padded(0)
    return Padding(tokens, plain, padded(bucket)[1] if bucket else None, bucket)


def batches_per_step(context: tf.distribute.InputContext) -> int:
    """Per-replica batches one input pipeline yields per step of synchronous training:
    one for each of its replicas."""
    return max(context.num_replicas_in_sync // context.num_input_pipelines, 1)


def array_eval_dataset(split: Split, global_batch_size: int) -> tf.data.Dataset:
    """Batches of the split in order, repeated without end; ``eval_steps`` of them cover
    the split exactly once (the last batch partial).

    Repeated, because under parameter servers every worker iterates its own copy and the
    coordinator schedules the steps: a finite copy would run out on one worker while
    steps remain (there, evaluation is approximate). Not cached: the arrays are in memory,
    and a cache op looks like a one-file source to TensorFlow's auto-sharding.
    """
    dataset = tf.data.Dataset.from_tensor_slices((feature_array(split.x),
                                                  label_array(split.y)))
    return evaluation_batches(dataset, global_batch_size)


def evaluation_batches(examples: tf.data.Dataset, global_batch_size: int) -> tf.data.Dataset:
    """(x, y) examples in order, batched, preprocessed and repeated (see above)."""
    dataset = examples.batch(global_batch_size).map(
        lambda x, y: (to_model_input(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    # In-memory data cannot be sharded by file; shard by data when several workers evaluate.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.repeat().with_options(options).prefetch(tf.data.AUTOTUNE)


def eval_steps(split: Split, global_batch_size: int) -> int:
    """Batches of an evaluation dataset that cover ``split`` once."""
    return -(-len(split) // global_batch_size)


def without_autoshard(dataset: tf.data.Dataset) -> tf.data.Dataset:
    # The input function already selects this pipeline's examples.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)
