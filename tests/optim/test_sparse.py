"""Row-sparse updates of embedding tables (TrainConfig.embedding_optimizer): a step
changes only the looked-up rows of each table and of its optimizer's slots, the other
layers train with TrainConfig.optimizer, and what cannot stay sparse is refused in one
line."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from lmt_tf.cli import main
from lmt_tf.data.splits import Split, Splits
from lmt_tf.errors import ConfigError
from lmt_tf.models.mlp import build_mlp
from lmt_tf.models.recommender import build_recommender
from lmt_tf.optim.model_transforms import inference_model
from lmt_tf.optim.sparse import EmbeddingOptimizer, SparseAdagrad, SparseFtrl
from lmt_tf.optim.transforms import AdaptiveGradientClipping, ClipByGlobalNorm
from lmt_tf.runtime.env import set_seed
from lmt_tf.runtime.strategy import default_strategy, mirrored_strategy
from lmt_tf.training.train_config import TrainConfig
from lmt_tf.training.trainer import Trainer

USERS, ITEMS = 50, 30  # rows of the two tables
# One global batch of 32 (user, item) pairs that looks up these rows only.
PAIRS = np.array([[3, 7], [10, 7], [3, 20], [40, 5]] * 8, np.int64)
LABELS = np.array([0, 1, 1, 0] * 8)
LOOKED_UP = {"user_embedding": {3, 10, 40}, "item_embedding": {5, 7, 20}}


def _splits() -> Splits:
    split = Split(PAIRS, LABELS)
    return Splits("pairs", split, Split(PAIRS[:0], LABELS[:0]), split, 2, "test")


def _model(**kwargs):
    return build_recommender(num_users=USERS, num_items=ITEMS, embedding_dim=4,
                             hidden_units=(8,), **kwargs)


def _build(strategy, embedding_optimizer, **settings):
    config = TrainConfig(epochs=1, steps_per_epoch=1, global_batch_size=32, verbose=0,
                         optimizer=lambda: keras.optimizers.Adam(0.01),
                         embedding_optimizer=embedding_optimizer, **settings)
    trainer = Trainer(config, strategy)
    set_seed(0)
    return trainer, trainer.build_model(_model, _splits())


def _changed_rows(before: np.ndarray, after: np.ndarray) -> set[int]:
    return set(np.flatnonzero((before != after).any(axis=1)).tolist())


def _table(variable: tf.Variable) -> str:
    return next(name for name in LOOKED_UP if name in variable.name)


@pytest.mark.parametrize("strategy, optimizer", [
    ("default", lambda: SparseAdagrad(0.5)),
    ("default", lambda: SparseFtrl(0.5)),
    ("mirrored", lambda: SparseFtrl(0.5)),
])
def test_one_step_changes_only_the_looked_up_rows_of_each_table_and_slot(strategy: str,
                                                                         optimizer) -> None:
    trainer, model = _build(default_strategy() if strategy == "default"
                            else mirrored_strategy(2), optimizer)
    sparse = model.embedding_optimizer
    received = []  # what the embedding optimizer's update is given, as it is traced
    update_step = sparse.update_step
    sparse.update_step = lambda g, v: (received.append(type(g)), update_step(g, v))[1]
    inner = inference_model(model)
    tables = [v for v in inner.trainable_variables if "embedding" in v.name]
    dense = [v for v in inner.trainable_variables if "embedding" not in v.name]
    slots = [v for v in sparse.variables if v.shape.rank == 2]
    before = {id(v): v.numpy() for v in [*tables, *dense, *slots]}

    trainer.fit(model, _splits(), seed=0)

    assert received and set(received) == {tf.IndexedSlices}
    for table in tables:
        assert _changed_rows(before[id(table)], table.numpy()) == LOOKED_UP[_table(table)]
    assert len(slots) == len(tables) * (2 if isinstance(sparse, SparseFtrl) else 1)
    for slot in slots:
        assert _changed_rows(before[id(slot)], slot.numpy()) == LOOKED_UP[_table(slot)]
    # The dense layers trained with Adam, whose moments exist for them alone.
    assert all(not np.array_equal(before[id(v)], v.numpy()) for v in dense)
    adam = model.optimizer
    assert isinstance(adam, keras.optimizers.Adam) and int(adam.iterations.numpy()) == 1
    moments = [v for v in adam.variables if "/" in v.name]
    assert len(moments) == 2 * len(dense)
    assert not any("embedding" in v.name for v in moments)
    assert int(sparse.iterations.numpy()) == 1


def test_micro_batches_and_clipping_keep_rows_sparse_and_equal_one_big_batch() -> None:
    """k=4 micro-batches concatenate the tables' rows; the global-norm clip (small
    enough to bite) sees the norms of their deduplicated rows: the same step as one
    batch, and still only the looked-up rows change."""
    clip = (ClipByGlobalNorm(0.01),)
    results = []
    for k in (1, 4):
        trainer, model = _build(default_strategy(), lambda: SparseAdagrad(0.5),
                                micro_batches=k, gradient_transforms=clip)
        inner = inference_model(model)
        initial = [v.numpy() for v in inner.trainable_variables]
        trainer.fit(model, _splits(), seed=0)
        results.append((initial, inner))
    (initial, big), (_, accumulated) = results
    for start, a, b in zip(initial, big.trainable_variables, accumulated.trainable_variables,
                           strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
        if "embedding" in a.name:
            assert _changed_rows(start, b.numpy()) == LOOKED_UP[_table(a)]


def test_sparse_ftrl_equals_keras_ftrl_on_the_looked_up_rows_and_leaves_the_rest() -> None:
    """Keras' own Ftrl rewrites every row for a sparse gradient; SparseFtrl changes only
    the looked-up ones (a duplicate index summed), to the same values."""
    start = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    rows = tf.IndexedSlices(tf.constant([[0.5, -1.0, 2.0], [1.0, 1.0, 1.0], [0.25, 0, -3]]),
                            tf.constant([1, 4, 4], tf.int64), tf.constant([6, 3], tf.int64))
    settings = dict(learning_rate=0.3, l1_regularization_strength=0.01,
                    l2_regularization_strength=0.1, beta=0.5, jit_compile=False)
    ours, theirs = tf.Variable(start), tf.Variable(start)
    SparseFtrl(**settings).apply_gradients([(rows, ours)])
    keras.optimizers.Ftrl(**settings).apply_gradients([(tf.convert_to_tensor(rows), theirs)])
    np.testing.assert_allclose(ours.numpy()[[1, 4]], theirs.numpy()[[1, 4]], rtol=1e-5)
    untouched = [0, 2, 3, 5]
    np.testing.assert_array_equal(ours.numpy()[untouched], start[untouched])
    assert not np.allclose(theirs.numpy()[untouched], start[untouched])


@pytest.mark.parametrize("settings, message", [
    ({"micro_batches": 1, "local_steps": 2},
     "TrainConfig.embedding_optimizer cannot be combined with TrainConfig.local_steps"),
    ({"gradient_transforms": (AdaptiveGradientClipping(),)},
     "cannot be combined with AdaptiveGradientClipping .*: its unit norms read every row"),
    ({"precision": "mixed_float16"},
     "cannot be combined with TrainConfig.precision 'mixed_float16'"),
])
def test_a_combination_that_cannot_stay_sparse_is_refused(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(embedding_optimizer=SparseAdagrad, **settings)


@pytest.mark.parametrize("optimizer, message", [
    (lambda: keras.optimizers.Ftrl(0.1), "Ftrl runs its dense update for every row"),
    (lambda: keras.optimizers.Adam(0.1), "Adam updates every row"),
    (lambda: keras.optimizers.SGD(0.1, momentum=0.9), "SGD decays its momentum over every row"),
    (lambda: keras.optimizers.Adagrad(0.1), "Adagrad makes its accumulators' initial values "
                                            "in this process"),
    (lambda: SparseAdagrad(0.1, weight_decay=0.01), "with weight_decay decays every row"),
])
def test_an_optimizer_that_is_not_row_sparse_is_refused(optimizer, message: str) -> None:
    with pytest.raises(ConfigError, match=f"TrainConfig.embedding_optimizer .*{message}"):
        _build(default_strategy(), optimizer)


@pytest.mark.parametrize("cls, message", [
    (keras.optimizers.Ftrl, "Ftrl runs its dense update for every row"),
    (keras.optimizers.Adagrad, "Adagrad makes its accumulators' initial values"),
    (keras.optimizers.legacy.Adagrad, "must make a keras.optimizers optimizer"),
])
def test_a_class_bound_in_gin_is_refused_before_anything_is_built(cls, message: str) -> None:
    with pytest.raises(ConfigError, match=f"TrainConfig.embedding_optimizer .*{message}"):
        TrainConfig(embedding_optimizer=cls)


def test_plain_sgd_is_row_sparse() -> None:
    _, model = _build(default_strategy(), lambda: keras.optimizers.SGD(0.1))
    assert isinstance(model.embedding_optimizer, keras.optimizers.SGD)


def test_a_model_without_tables_and_factors_on_a_table_are_refused() -> None:
    config = TrainConfig(embedding_optimizer=SparseAdagrad, global_batch_size=32)
    digits = Splits("digits", Split(np.zeros((32, 4), np.float32), LABELS),
                    Split(np.zeros((0, 4), np.float32), LABELS[:0]),
                    Split(np.zeros((32, 4), np.float32), LABELS), 2, "test")
    with pytest.raises(ConfigError, match="is set, but model 'mlp' has no "
                                          "keras.layers.Embedding layer"):
        Trainer(config, default_strategy()).build_model(build_mlp, digits)
    with pytest.raises(ConfigError, match=r"block update factors on embedding tables "
                                          r"\(user_embedding/embeddings:0\)"):
        _build(default_strategy(), SparseAdagrad, update_multipliers={"user_": 0.5})


def test_a_student_does_not_inherit_the_tables_optimizer() -> None:
    """It depends on the model's layers (a student may have no tables)."""
    assert not EmbeddingOptimizer.kept_for_students
    kept = TrainConfig(embedding_optimizer=SparseAdagrad).without_techniques(
        lambda t: t.kept_for_students)
    assert kept.techniques() == [] and kept.embedding_optimizer is None


def test_the_refusal_is_one_line_from_the_command_line(gin_file, capsys) -> None:
    exp = gin_file("include 'experiments/movielens_ps_sparse.gin'\n"
                   "TrainConfig.gradient_transforms = (@AdaptiveGradientClipping(),)\n")
    assert main(["run", exp]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == ("lmt: error: TrainConfig.embedding_optimizer cannot be combined with "
                    "AdaptiveGradientClipping in TrainConfig.gradient_transforms: its unit "
                    "norms read every row of each table every step")
