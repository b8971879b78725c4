"""The DLRM and wide click models: hashing exact on int64 ids and stable through a
SavedModel, crosses, the shared table, the logistic-regression baseline by hand, training,
row-sparse embedding gradients, and parameters counted without allocating them."""

from __future__ import annotations

import resource

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from lmt_tf.errors import ConfigError
from lmt_tf.models import dlrm, saved

D, K = 13, 26
TINY = {"buckets": 50, "embedding_dim": 4, "cross_buckets": 30, "bottom_units": (8,),
        "top_units": (8,)}
# Ids past 2**31 and 2**32, 2**40 - 1 (the contract's largest) and the largest int64; a
# float32 holds 2**40 and 2**40 + 1 (and 2**53 + 1 as float64) as the same number.
EDGES = [0, 1, 2**31 - 1, 2**31, 2**32 + 7, 2**40 - 1, 2**40, 2**40 + 1, 2**53 + 1,
         2**62, 2**63 - 1]


def raw_rows(n: int, seed: int = 0) -> np.ndarray:
    """n raw rows [13 counts | 26 ids], ids up to 2**40, some from ``EDGES``."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 1000, (n, D)) * (rng.random((n, D)) < 0.7)
    ids = rng.integers(0, 2**40, (n, K))
    ids[: len(EDGES), 0] = EDGES[:n]
    return np.concatenate([counts, ids], axis=1).astype(np.int64)


def layer_output(model: keras.Model, name: str, x: np.ndarray) -> np.ndarray:
    return keras.Model(model.input, model.get_layer(name).output)(x).numpy()


def test_probabilities_are_a_softmax_of_zero_and_the_logit() -> None:
    x = raw_rows(32)
    for model in (dlrm.build_dlrm((D + K,), 2, **TINY),
                  dlrm.build_dlrm((D + K,), 2, interaction="concat", **TINY),
                  dlrm.build_wide((D + K,), 2, buckets=50)):
        assert model.input.dtype == tf.int64 and model.output_shape == (None, 2)
        p = model(x).numpy()
        z = layer_output(model, "logit", x)[:, 0]
        assert p.dtype == np.float32 and p.shape == (32, 2)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(p[:, 1], 1 / (1 + np.exp(-z)), rtol=1e-5, atol=1e-7)
    assert np.ptp(z) == 0.0  # the wide model starts at zero weights: p = 0.5


def test_hashing_is_exact_on_int64_ids_and_matches_the_pure_python_hash() -> None:
    ids = np.array(EDGES, np.int64)[:, None] + np.zeros((1, 3), np.int64)
    buckets = [1_000_003, 97, 2_404_000]
    layer = dlrm.HashedIds(buckets)
    hashed = layer(tf.constant(ids)).numpy()
    expected = [[dlrm.hash_id(int(v), f, buckets[f]) for f, v in enumerate(row)]
                for row in ids]
    np.testing.assert_array_equal(hashed, expected)
    # Traced (as in fit and in a SavedModel's signature), the constants stay exact.
    np.testing.assert_array_equal(tf.function(layer)(tf.constant(ids)).numpy(), expected)
    column = dict(zip(EDGES, hashed[:, 0], strict=True))
    # Ids that only differ past bit 31, or past float32's (and float64's) mantissa.
    assert column[2**31] != column[0] and column[2**40 + 1] != column[2**40]
    assert len(set(hashed[:, 0])) == len(EDGES)
    # The same id lands elsewhere in another feature (the salt), for a shared table.
    same = dlrm.HashedIds([10**6] * K)(tf.fill([1, K], tf.constant(12345, tf.int64)))
    assert len(set(same.numpy()[0])) == K
    pairs = [(0, 1), (2, 0)]
    crossed = dlrm.HashedCrosses(pairs, 1009)(tf.constant(ids)).numpy()
    np.testing.assert_array_equal(
        crossed, [[dlrm.hash_cross(int(r[a]), int(r[b]), c, 1009)
                   for c, (a, b) in enumerate(pairs)] for r in ids])


def test_hashing_is_the_same_in_another_build_and_after_a_saved_model_round_trip(
        tmp_path) -> None:
    x = raw_rows(64, seed=1)
    settings = {**TINY, "crosses": ((0, 1), (3, 25))}
    keras.utils.set_random_seed(1)
    model = dlrm.build_dlrm((D + K,), 2, **settings)
    keras.utils.set_random_seed(2)
    other = dlrm.build_dlrm((D + K,), 2, **settings)
    for name in ("hashed_ids", "hashed_crosses"):
        np.testing.assert_array_equal(layer_output(model, name, x),
                                      layer_output(other, name, x))
    expected = model(x).numpy()
    assert not np.allclose(expected, other(x).numpy())  # other weights, same buckets

    saved.export_saved_model(model, tmp_path / "dlrm")
    loaded = saved.load_saved_model(tmp_path / "dlrm")
    np.testing.assert_allclose(loaded(x).numpy(), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(layer_output(loaded, "hashed_ids", x),
                                  layer_output(model, "hashed_ids", x))
    serve = tf.saved_model.load(str(tmp_path / "dlrm")).signatures["serving_default"]
    ((_, spec),) = serve.structured_input_signature[1].items()
    assert spec.dtype == tf.int64  # raw ids go in as int64, never as floats
    (out,) = serve(features=tf.constant(x)).values()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_a_cross_changes_predictions_only_through_its_pair() -> None:
    model = dlrm.build_dlrm((D + K,), 2, crosses=((0, 1), (2, 3)), **TINY)
    x = raw_rows(200, seed=2)
    crossed = layer_output(model, "hashed_crosses", x)
    other = x.copy()
    other[:, D + 4:] += 1  # every feature but the pairs' ids changes
    np.testing.assert_array_equal(layer_output(model, "hashed_crosses", other), crossed)
    first = x.copy()
    first[:, D + 0] += 1  # feature 0: only the cross (0, 1) moves
    moved = layer_output(model, "hashed_crosses", first)
    np.testing.assert_array_equal(moved[:, 1], crossed[:, 1])
    assert (moved[:, 0] != crossed[:, 0]).mean() > 0.9

    # A row of the (0, 1) cross's table changes the predictions of exactly the examples
    # whose pair hashes to it.
    before = model(x).numpy()
    table = model.get_layer("cross_0_1_embedding")
    weights = table.get_weights()[0]
    row = crossed[0, 0]
    weights[row] += 1.0
    table.set_weights([weights])
    changed = np.abs(model(x).numpy() - before).max(axis=1) > 0
    np.testing.assert_array_equal(changed, crossed[:, 0] == row)


def test_one_shared_table_for_every_feature() -> None:
    model = dlrm.build_dlrm((D + K,), 2, shared_buckets=500, crosses=((4, 5),), **TINY)
    tables = [layer for layer in model.layers if layer.name.endswith("_embedding")]
    assert [t.name for t in tables] == ["shared_embedding", "cross_4_5_embedding"]
    assert tables[0].input_dim == 500 and tables[0].output_dim == 4
    x = raw_rows(16)
    hashed = layer_output(model, "hashed_ids", x)
    assert hashed.max() < 500
    np.testing.assert_array_equal(
        hashed[:, 7], [dlrm.hash_id(int(v), 7, 500) for v in x[:, D + 7]])
    np.testing.assert_allclose(model(x).numpy().sum(axis=1), 1.0, atol=1e-6)
    assert model.count_params() == dlrm.dlrm_parameters(
        (D + K,), shared_buckets=500, crosses=((4, 5),), **TINY)


def test_the_wide_model_is_logistic_regression_on_its_weights() -> None:
    mean, std = np.linspace(0.5, 3, D), np.linspace(1, 2, D)
    buckets = [20 + f for f in range(K)]  # one count per feature
    model = dlrm.build_wide((D + K,), 2, buckets=buckets, crosses=((0, 1),),
                            cross_buckets=30, dense_mean=mean.tolist(),
                            dense_std=std.tolist())
    rng = np.random.default_rng(3)
    model.set_weights([rng.normal(size=w.shape).astype(np.float32)
                       for w in model.get_weights()])
    x = raw_rows(40, seed=3)
    x[0, :D] = -5  # a negative count reads as 0
    tables = {f: model.get_layer(f"cat_{f}_embedding").get_weights()[0][:, 0]
              for f in range(K)}
    cross = model.get_layer("cross_0_1_embedding").get_weights()[0][:, 0]
    kernel, bias = model.get_layer("dense_linear").get_weights()
    z = []
    for row in x.tolist():
        counts, ids = np.maximum(row[:D], 0), row[D:]
        logit = float(bias[0]) + float(((np.log1p(counts) - mean) / std) @ kernel[:, 0])
        logit += sum(float(tables[f][dlrm.hash_id(v, f, buckets[f])])
                     for f, v in enumerate(ids))
        logit += float(cross[dlrm.hash_cross(ids[0], ids[1], 0, 30)])
        z.append(logit)
    z = np.array(z)
    p = model(x).numpy()
    np.testing.assert_allclose(p[:, 1], 1 / (1 + np.exp(-z)), rtol=1e-4, atol=1e-6)
    assert model.count_params() == sum(buckets) + 30 + D + 1 == dlrm.wide_parameters(
        (D + K,), buckets=buckets, crosses=((0, 1),), cross_buckets=30)


@pytest.mark.parametrize("builder", ["dlrm", "wide"])
def test_a_few_steps_reduce_the_log_loss(builder: str) -> None:
    keras.utils.set_random_seed(0)
    x = raw_rows(256, seed=4)
    x[:, D] = (np.arange(256) % 8) << 35  # feature 0: 8 ids past 2**32
    y = (x[:, D] >> 35) % 2  # the click is a function of feature 0's id
    mean, std = dlrm.dense_statistics(x)
    statistics = {"dense_mean": mean, "dense_std": std}
    model = (dlrm.build_dlrm((D + K,), 2, **TINY, **statistics) if builder == "dlrm"
             else dlrm.build_wide((D + K,), 2, buckets=50, **statistics))
    # Adagrad, the usual optimizer of this family; Keras' default first accumulator
    # (0.1) shrinks the dot interaction's small first gradients to nothing.
    model.compile(keras.optimizers.Adagrad(0.1, initial_accumulator_value=1e-6),
                  "sparse_categorical_crossentropy")
    first = model.evaluate(x, y, batch_size=256, verbose=0)
    model.fit(x, y, batch_size=64, epochs=5, verbose=0, shuffle=False)
    assert model.evaluate(x, y, batch_size=256, verbose=0) < 0.5 * first


@pytest.mark.parametrize("settings", [
    {**TINY, "crosses": ((0, 1),)},
    {**TINY, "shared_buckets": 200, "interaction": "concat"},
    "wide"])
def test_embedding_gradients_are_row_sparse(settings) -> None:
    model = (dlrm.build_wide((D + K,), 2, buckets=50, crosses=((0, 1),))
             if settings == "wide" else dlrm.build_dlrm((D + K,), 2, **settings))
    x, y = raw_rows(8, seed=5), tf.constant([0, 1] * 4, tf.int64)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    @tf.function
    def gradients(x):  # traced, as in fit
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    grads = gradients(tf.constant(x))
    tables = [(v, g) for v, g in zip(model.trainable_variables, grads, strict=True)
              if "_embedding" in v.name]
    assert tables and all(isinstance(g, tf.IndexedSlices) for _, g in tables)
    assert all(not isinstance(g, tf.IndexedSlices) for v, g in
               zip(model.trainable_variables, grads, strict=True)
               if "_embedding" not in v.name)
    # A plain SGD step changes only the rows the batch looked up.
    before = [v.numpy() for v, _ in tables]
    keras.optimizers.SGD(1.0).apply_gradients([(g, v) for v, g in tables])
    for (v, g), old in zip(tables, before, strict=True):
        touched = np.zeros(len(old), bool)
        touched[np.unique(g.indices.numpy())] = True
        changed = np.any(v.numpy() != old, axis=1)
        assert not changed[~touched].any() and changed[touched].any()


def graph_parameters(build, *args, **kwargs) -> int:
    """Parameters of the model built in a throwaway graph: its variables are graph nodes,
    never initialised, so nothing the size of a table is allocated."""
    with tf.Graph().as_default():
        model = build(*args, **kwargs)
        return sum(int(np.prod(w.shape.as_list())) for w in model.weights)


@pytest.mark.parametrize("settings", [
    TINY,
    {**TINY, "buckets": list(range(10, 10 + K)), "crosses": ((0, 1), (5, 2))},
    {**TINY, "shared_buckets": 300, "crosses": ((0, 1),), "interaction": "concat"},
    {**TINY, "bottom_units": (), "top_units": (), "interaction": "dot"}])
def test_parameter_arithmetic_equals_the_built_models(settings) -> None:
    expected = dlrm.dlrm_parameters((D + K,), **settings)
    assert graph_parameters(dlrm.build_dlrm, (D + K,), 2, **settings) == expected
    assert dlrm.build_dlrm((D + K,), 2, **settings).count_params() == expected
    wide = {k: v for k, v in settings.items()
            if k in ("buckets", "shared_buckets", "crosses", "cross_buckets")}
    assert graph_parameters(dlrm.build_wide, (D + K,), 2, **wide) \
        == dlrm.wide_parameters((D + K,), **wide)


def test_the_reference_configuration_has_a_billion_parameters_never_allocated(
        monkeypatch) -> None:
    """The commented reference bindings of gin/models/dlrm.gin, as they are written."""
    from lmt_tf import config
    from tests.conftest import PROJECT_ROOT

    text = (PROJECT_ROOT / "gin/models/dlrm.gin").read_text().splitlines()
    reference = [line[2:] for line in text if line.startswith("# build_dlrm.")]
    assert len(reference) == 4
    monkeypatch.chdir(PROJECT_ROOT)
    config.parse(["gin/models/dlrm.gin"], reference)
    build = config.configurable("build_dlrm")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with tf.Graph().as_default():
        model = build((D + K,), 2)
        sizes = {w.name: int(np.prod(w.shape.as_list())) for w in model.weights}
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak
    total = sum(sizes.values())
    rows = sum(n for name, n in sizes.items() if "_embedding" in name)
    assert total >= 1e9 and rows / total > 0.999
    assert total == dlrm.dlrm_parameters((D + K,), buckets=2_404_000, embedding_dim=16,
                                         bottom_units=(512, 256), top_units=(512, 256))
    ps_bytes = rows * 4 / 4  # float32 rows, over 4 ps tasks (and as much again of Adagrad)
    assert ps_bytes < 1.01e9
    assert grown < 300e6, f"building the graph grew the peak RSS by {grown / 1e6:.0f} MB"


def test_dense_statistics_standardise_the_log_counts() -> None:
    x = raw_rows(300, seed=6)
    x[:, 5] = 7  # a constant feature keeps std 1
    mean, std = dlrm.dense_statistics(x)
    streamed = dlrm.dense_statistics([x[:100], x[100:]])
    np.testing.assert_allclose(streamed, (mean, std), rtol=1e-9)
    assert std[5] == 1.0
    layer = dlrm.LogStandardize(mean, std)
    out = layer(tf.constant(x[:, :D])).numpy()
    np.testing.assert_allclose(np.delete(out.mean(axis=0), 5), 0, atol=1e-5)
    np.testing.assert_allclose(np.delete(out.std(axis=0), 5), 1, atol=1e-4)
    with pytest.raises(ConfigError, match="at least one row"):
        dlrm.dense_statistics([])


@pytest.mark.parametrize(("settings", "message"), [
    ({"input_shape": (28, 28)}, r"rows of num_dense=13 counts .* got input shape \(28, 28\)"),
    ({"input_shape": (13,)}, r"at least one categorical id"),
    ({"num_classes": 10}, "num_classes 2"),
    ({"crosses": ((0, 26),)}, r"\(0, 26\) names a feature out of range; .* 0\.\.25"),
    ({"crosses": ((3, 3),)}, "two different features"),
    ({"crosses": (5,)}, "pairs of categorical feature indices"),
    ({"buckets": 0}, r"build_dlrm\.buckets must be an integer >= 1, got 0"),
    ({"buckets": [10] * 3}, r"buckets must be one number or 26"),
    ({"shared_buckets": -1}, r"shared_buckets must be an integer >= 1"),
    ({"embedding_dim": 0}, r"embedding_dim must be an integer >= 1"),
    ({"cross_buckets": 0}, r"cross_buckets must be an integer >= 1"),
    ({"bottom_units": (8, 0)}, r"bottom_units must be a list of integers >= 1"),
    ({"top_units": "16"}, r"top_units must be a list of integers >= 1"),
    ({"interaction": "cross"}, r"interaction must be one of \('dot', 'concat'\)"),
    ({"dense_std": 0.0}, r"dense_std must be > 0"),
    ({"dense_mean": [0.0] * 3}, r"dense_mean must be a number or 13 numbers"),
])
def test_bad_settings_are_one_line_config_errors(settings, message) -> None:
    arguments = {"input_shape": (D + K,), "num_classes": 2, **TINY, **settings}
    for function in (dlrm.build_dlrm, dlrm.dlrm_parameters):
        with pytest.raises(ConfigError, match=message) as error:
            function(**arguments)
        assert "\n" not in str(error.value)


def test_gin_checks_the_settings_before_building(monkeypatch) -> None:
    from lmt_tf import config
    from tests.conftest import PROJECT_ROOT

    monkeypatch.chdir(PROJECT_ROOT)
    with pytest.raises(ConfigError, match=r"build_wide.cross_buckets must be >= 1, got 0"):
        config.parse(["gin/models/wide.gin"], ["build_wide.cross_buckets = 0"])
    with pytest.raises(ConfigError, match=r"build_dlrm.interaction must be one of"):
        config.parse(["gin/models/dlrm.gin"], ["build_dlrm.interaction = 'sum'"])
