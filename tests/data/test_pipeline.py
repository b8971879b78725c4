"""Input pipeline: seeded per-epoch order, global batches, per-worker slices."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from lmt_tf.data.pipeline import (
    array_eval_dataset,
    array_train_input_fn,
    eval_steps,
    padding,
    plan_batches,
)
from lmt_tf.data.splits import Split
from lmt_tf.data.text import documents
from lmt_tf.errors import ConfigError

IDS = Split(np.arange(103, dtype=np.int64).reshape(103, 1), np.arange(103) % 10)


def _ids(input_fn, steps: int, context: tf.distribute.InputContext | None = None
         ) -> list[list[int]]:
    """Example ids of the first ``steps`` batches of the (endless) input."""
    dataset = input_fn(context or tf.distribute.InputContext()).take(steps)
    return [x[:, 0].astype(int).tolist() for x, _ in dataset.as_numpy_iterator()]


def test_each_epoch_is_a_seeded_permutation_without_repeats() -> None:
    plan = plan_batches(len(IDS), 10, replicas=1)
    assert plan.steps_per_epoch == 10  # 103 // 10: the partial batch is dropped
    batches = _ids(array_train_input_fn(IDS, plan, seed=1, start_epoch=0), 20)
    assert len(batches) == 20 and all(len(b) == 10 for b in batches)
    first, second = sum(batches[:10], []), sum(batches[10:], [])
    assert len(set(first)) == 100 and len(set(second)) == 100
    assert first != second  # reshuffled every epoch
    again = _ids(array_train_input_fn(IDS, plan, seed=1, start_epoch=0), 10)
    assert sum(again, []) == first  # same seed, same order


def test_starting_at_a_later_epoch_sees_that_epochs_batches() -> None:
    plan = plan_batches(len(IDS), 10, replicas=1)
    whole = _ids(array_train_input_fn(IDS, plan, 4, 0), 30)
    later = _ids(array_train_input_fn(IDS, plan, 4, 2), 10)
    assert later == whole[20:]


def test_input_pipelines_split_every_global_batch_disjointly() -> None:
    """Two workers, two replicas each: per global step, the four per-replica slices are
    disjoint and together are exactly the single-pipeline global batch."""
    plan = plan_batches(len(IDS), 20, replicas=4)
    single = _ids(array_train_input_fn(IDS, plan, 9, 0), 5)
    per_worker = [
        _ids(array_train_input_fn(IDS, plan, 9, 0), 10,
             tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=w,
                                        num_replicas_in_sync=4))
        for w in range(2)]
    assert all(len(b) == 5 for w in per_worker for b in w)
    for step, global_batch in enumerate(single):
        slices = per_worker[0][2 * step: 2 * step + 2] + per_worker[1][2 * step: 2 * step + 2]
        assert sum(slices, []) == global_batch


def test_parameter_server_workers_take_whole_steps_round_robin() -> None:
    """Three worker pipelines, one replica in sync: each worker gets whole global batches,
    disjoint from the others', and together they are the epoch's batches."""
    plan = plan_batches(len(IDS), 10, replicas=1)
    single = _ids(array_train_input_fn(IDS, plan, 2, 0), 9)  # 10 steps: 9 deal evenly to 3
    workers = [_ids(array_train_input_fn(IDS, plan, 2, 0), 3,
                    tf.distribute.InputContext(num_input_pipelines=3, input_pipeline_id=w,
                                               num_replicas_in_sync=1))
               for w in range(3)]
    assert [workers[s % 3][s // 3] for s in range(9)] == single
    seen = [i for w in workers for batch in w for i in batch]
    assert len(seen) == len(set(seen)) == 90


def test_uint8_images_become_raw_floats_the_model_rescales() -> None:
    images = Split(np.full((4, 2, 2), 255, np.uint8), np.zeros(4, np.int64))
    x, y = next(iter(array_eval_dataset(images, 3)))
    assert x.dtype == tf.float32 and float(tf.reduce_max(x)) == 255.0 and x.shape[0] == 3
    steps = eval_steps(images, 3)
    assert steps == 2  # the second batch is partial: the split is covered exactly once
    assert [int(b[0].shape[0]) for b in array_eval_dataset(images, 3).take(steps)] == [3, 1]


@pytest.mark.parametrize("batch, replicas, steps, message", [
    (10, 3, None, "multiple of the 3 replicas"),
    (200, 1, None, "exceeds the 103"),
    (10, 1, 11, "steps_per_epoch must be in \\[1, 10\\]"),
])
def test_bad_batch_plans(batch: int, replicas: int, steps: int | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_batches(103, batch, replicas, steps)


# Documents of 1 to 120 words whose labels are their ids, for length bucketing.
LENGTHS = np.random.default_rng(0).integers(1, 121, 403)
DOCS = Split(documents(" ".join(["w"] * n) for n in LENGTHS), np.arange(403))


def _labels(input_fn, steps: int, context: tf.distribute.InputContext | None = None
            ) -> list[list[int]]:
    """Labels (here: example ids) of the first ``steps`` batches of the input."""
    dataset = input_fn(context or tf.distribute.InputContext()).take(steps)
    return [y.tolist() for _, y in dataset.as_numpy_iterator()]


def test_bucketing_sorts_pools_and_keeps_each_epochs_examples() -> None:
    plan = plan_batches(len(DOCS), 20, replicas=1)  # 20 steps: pools of 8, 8 and 4 batches
    plain = _labels(array_train_input_fn(DOCS, plan, 7, 0), 40)
    bucketed = _labels(array_train_input_fn(DOCS, plan, 7, 0, bucket=8), 40)
    for epoch in (0, 1):
        steps = slice(20 * epoch, 20 * epoch + 20)
        assert sorted(sum(bucketed[steps], [])) == sorted(sum(plain[steps], []))
        for pool in (slice(0, 8), slice(8, 16), slice(16, 20)):  # the same examples
            batches = bucketed[steps][pool]
            assert sorted(sum(batches, [])) == sorted(sum(plain[steps][pool], []))
            ranges = sorted((LENGTHS[b].min(), LENGTHS[b].max()) for b in batches)
            # Batches of a pool hold disjoint ranges of lengths (ties may touch).
            assert all(ranges[i][1] <= ranges[i + 1][0] for i in range(len(ranges) - 1))
    assert bucketed[:20] != bucketed[20:40]  # a new order every epoch
    again = _labels(array_train_input_fn(DOCS, plan, 7, 0, bucket=8), 40)
    assert again == bucketed  # the same seed, the same batches
    assert _labels(array_train_input_fn(DOCS, plan, 8, 0, bucket=8), 20) != bucketed[:20]
    # Batches are not in length order across a pool: they are shuffled.
    means = [float(np.mean(LENGTHS[b])) for b in bucketed[:8]]
    assert means != sorted(means) and means != sorted(means, reverse=True)


def test_a_resumed_bucketed_epoch_is_the_tail_of_the_uninterrupted_one() -> None:
    plan = plan_batches(len(DOCS), 20, replicas=1)
    whole = _labels(array_train_input_fn(DOCS, plan, 3, 0, bucket=4), 40)
    resumed = _labels(array_train_input_fn(DOCS, plan, 3, 1, start_step=13, bucket=4), 27)
    assert resumed == whole[33:] + _labels(array_train_input_fn(DOCS, plan, 3, 2, bucket=4),
                                           20)


def test_bucketed_global_batches_divide_over_workers_as_before() -> None:
    plan = plan_batches(len(DOCS), 20, replicas=4)
    single = _labels(array_train_input_fn(DOCS, plan, 9, 0, bucket=4), 20)
    per_worker = [
        _labels(array_train_input_fn(DOCS, plan, 9, 0, bucket=4), 40,
                tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=w,
                                           num_replicas_in_sync=4))
        for w in range(2)]
    for step, global_batch in enumerate(single):
        slices = per_worker[0][2 * step: 2 * step + 2] + per_worker[1][2 * step: 2 * step + 2]
        assert sum(slices, []) == global_batch


def test_padding_is_counted_by_hand() -> None:
    plan = plan_batches(len(DOCS), 20, replicas=2)  # per-replica batches of 10
    measured = padding(DOCS, plan, seed=1, bucket=plan.steps_per_epoch, sequence_length=100)
    capped = np.minimum(LENGTHS, 100)
    ids = sum(_labels(array_train_input_fn(DOCS, plan, 1, 0), 20), [])
    assert measured.tokens == capped[ids].sum()
    plain = capped[ids].reshape(-1, 10)
    assert measured.padded == (plain.max(axis=1)[:, None] - plain).sum()
    # One pool of the whole epoch: its documents sorted, cut into batches of 10.
    ordered = np.sort(capped[ids]).reshape(-1, 10)
    assert measured.padded_bucketed == (ordered.max(axis=1)[:, None] - ordered).sum()
    assert measured.fraction == measured.padded_bucketed / (measured.tokens
                                                           + measured.padded_bucketed)
    assert measured.params() == {  # what the run logs
        "derived.padding_fraction": round(measured.fraction, 4),
        "derived.padding_fraction_unbucketed": round(
            measured.padded / (measured.tokens + measured.padded), 4)}
    assert measured.params()["derived.padding_fraction"] < 0.5 * measured.params()[
        "derived.padding_fraction_unbucketed"]


def test_bucketing_refuses_examples_that_are_not_documents() -> None:
    plan = plan_batches(len(IDS), 10, replicas=1)
    with pytest.raises(ConfigError, match=r"InputConfig.bucket_by_length sorts documents in "
                                          r"memory by length; the training examples are of "
                                          r"int64 \(not text\): set it to 0"):
        array_train_input_fn(IDS, plan, 0, 0, bucket=4)
