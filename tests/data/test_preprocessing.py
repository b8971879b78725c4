"""Preprocessing inside the model: its statistics come from the training split only,
feature selection keeps exactly k features (the same in the export), categories are
one-hot with a slot for the unseen, images are rescaled in the model, and the mistakes a
user makes are one line each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tf_keras as keras

from lmt_tf.cli import main
from lmt_tf.data.preprocessing import Preprocessing
from lmt_tf.data.sources import load_breast_cancer, load_digits
from lmt_tf.data.splits import Split, Splits
from lmt_tf.errors import ConfigError
from lmt_tf.models.mlp import build_mlp
from lmt_tf.models.saved import export_saved_model, load_saved_model


def _front(model: keras.Model) -> keras.Model:
    """The preprocessing layers of a built model alone: raw features in, model input out."""
    last = [layer for layer in model.layers if layer.name.startswith("preprocess_")][-1]
    return keras.Model(model.input, last.output)


def _shifted_splits() -> Splits:
    """Train features around 0 with a missing value in each column; test features around
    100 with another spread: statistics fitted on anything but train would show."""
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, (200, 3)).astype(np.float32)
    train[rng.random(train.shape) < 0.1] = np.nan
    test = rng.normal(100, 7, (50, 3)).astype(np.float32)
    y = np.arange(200) % 2
    return Splits("shifted", Split(train, y), Split(test[:10], y[:10]), Split(test, y[:50]), 2)


def test_imputation_and_scaling_come_from_the_training_split_only() -> None:
    splits = _shifted_splits()
    fitted = Preprocessing(impute="median", scale="standard").fit(splits)
    train = splits.train.x.astype(np.float64)
    median = np.nanmedian(train, axis=0)
    imputed = np.where(np.isnan(train), median, train)
    impute, scale = fitted.steps
    np.testing.assert_allclose(impute["fill"], median, rtol=1e-6)
    np.testing.assert_allclose(scale["mean"], imputed.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(scale["variance"], imputed.var(axis=0), rtol=1e-6)
    # Applied unchanged to the test split: its own mean (about 100) is not removed.
    model = fitted.wrap(build_mlp)(splits.input_shape, 2)
    test = splits.test.x.copy()
    test[0, 1] = np.nan
    out = _front(model).predict(test, verbose=0)
    expected = (np.where(np.isnan(test), median, test) - imputed.mean(axis=0)) \
        / imputed.std(axis=0)
    np.testing.assert_allclose(out, expected, rtol=1e-4)
    assert out.mean() > 50  # test data far from the training statistics stays far


def test_clipping_bounds_are_training_quantiles_or_z_scores() -> None:
    splits = _shifted_splits()
    train = splits.train.x.astype(np.float64)
    imputed = np.where(np.isnan(train), 0.0, train)
    quantile = Preprocessing(impute="constant", clip="quantile", clip_quantiles=(0.05, 0.95))
    clip = quantile.fit(splits).steps[1]
    np.testing.assert_allclose(clip["low"], np.quantile(imputed, 0.05, axis=0), rtol=1e-6)
    np.testing.assert_allclose(clip["high"], np.quantile(imputed, 0.95, axis=0), rtol=1e-6)
    clip = Preprocessing(impute="constant", clip="zscore", clip_z=2.0).fit(splits).steps[1]
    np.testing.assert_allclose(clip["high"], imputed.mean(0) + 2 * imputed.std(0), rtol=1e-6)


@pytest.mark.parametrize("how", ["mutual_info", "l1"])
def test_selection_keeps_exactly_k_features_the_same_in_the_export(how: str,
                                                                  tmp_path: Path) -> None:
    splits = load_breast_cancer()
    fitted = Preprocessing(scale="standard", select=how, k=7).fit(splits)
    assert fitted.output_shape == (7,)
    keep = fitted.steps[0]["keep"]
    assert len(keep) == len(set(keep)) == 7
    assert list(fitted.features) == [splits.features[i] for i in keep]
    model = fitted.wrap(build_mlp)(splits.input_shape, 2)
    assert model.get_layer("preprocess_select").keep == keep
    export_saved_model(model, tmp_path / "saved")
    exported = load_saved_model(tmp_path / "saved")
    x = splits.test.x[:20]
    dropped = [i for i in range(x.shape[1]) if i not in keep]
    noise = x.copy()
    noise[:, dropped] = 1e6  # only the kept features may matter
    for served in (model, exported):
        np.testing.assert_allclose(served.predict(noise, verbose=0),
                                   model.predict(x, verbose=0), rtol=1e-5)
    kept_noise = x.copy()
    kept_noise[:, keep[0]] += 1e3
    assert not np.allclose(exported.predict(kept_noise, verbose=0),
                           model.predict(x, verbose=0))


def test_variance_threshold_drops_constant_features() -> None:
    x = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    x[:, 2] = 5.0
    y = np.arange(100) % 2
    splits = Splits("const", Split(x, y), Split(x[:5], y[:5]), Split(x[:5], y[:5]), 2)
    fitted = Preprocessing(select="variance").fit(splits)
    assert fitted.steps[0]["keep"] == [0, 1, 3]


def test_categories_are_one_hot_over_training_values_plus_unknown() -> None:
    x = np.array([[1.0, 0.5], [2.0, 1.5], [3.0, np.nan], [1.0, 2.5]] * 10, np.float32)
    y = np.arange(40) % 2
    splits = Splits("cat", Split(x, y), Split(x[:4], y[:4]), Split(x[:4], y[:4]), 2,
                    features=("site", "size"))
    fitted = Preprocessing(impute="mean", categorical=["site"]).fit(splits)
    assert fitted.features == ("size", "site=1", "site=2", "site=3", "site=?")
    model = fitted.wrap(build_mlp)(splits.input_shape, 2)
    out = _front(model).predict(np.array([[2.0, 1.0], [7.0, np.nan]], np.float32),
                                verbose=0)
    np.testing.assert_allclose(out, [[1.0, 0, 1, 0, 0], [1.5, 0, 0, 0, 1]])


def test_uint8_and_digits_images_are_rescaled_inside_the_model() -> None:
    digits = load_digits()
    model = Preprocessing().fit(digits).wrap(build_mlp)(digits.input_shape, 10)
    assert model.layers[1].name == "preprocess_rescale"
    np.testing.assert_allclose(_front(model).predict(digits.test.x[:3], verbose=0),
                               digits.test.x[:3] / 16)
    images = Split(np.full((4, 2, 2), 255, np.uint8), np.zeros(4, np.int64))
    fitted = Preprocessing().fit(Splits("u8", images, images, images, 2))
    assert fitted.steps == [{"kind": "rescale", "scale": 1 / 255}]
    floats = Split(np.ones((4, 3), np.float32), np.zeros(4, np.int64))
    assert Preprocessing().fit(Splits("f", floats, floats, floats, 2)).steps == []


@pytest.mark.parametrize("preprocessing, data, message", [
    (Preprocessing(), load_breast_cancer(missing_fraction=0.1),
     "missing values \\(NaN\\), e.g. example .*: set Preprocessing.impute"),
    (Preprocessing(select="mutual_info", k=31), load_breast_cancer(),
     "Preprocessing.k asks for 31 features, but there are 30"),
    (Preprocessing(categorical=["colour"]), load_breast_cancer(),
     "Preprocessing.categorical \\['colour'\\] not among the columns"),
    (Preprocessing(scale="standard"), load_digits(),
     "work on tabular features .* shape \\(8, 8\\)"),
])
def test_steps_that_do_not_fit_the_data(preprocessing: Preprocessing, data: Splits,
                                        message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        preprocessing.fit(data)


@pytest.mark.parametrize("settings, message", [
    ({"scale": "robust"}, "Preprocessing.scale must be None or one of"),
    ({"select": "l1"}, "Preprocessing.k must be >= 1 for select='l1'"),
    ({"clip_quantiles": (0.9, 0.1)}, "Preprocessing.clip_quantiles must be \\(low, high\\)"),
])
def test_bad_settings(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Preprocessing(**settings)


def test_a_csv_column_named_in_gin_that_is_not_in_the_file(gin_file, in_tmp: Path,
                                                           capsys) -> None:
    (in_tmp / "t.csv").write_text("a,b,label\n" + "".join(f"{i},{i % 4},{i % 2}\n"
                                                         for i in range(40)))
    exp = gin_file("include 'gin/models/mlp.gin'\nrun_experiment.data = @load_csv\n"
                   "load_csv.path = 't.csv'\nPreprocessing.categorical = ['colour']\n")
    assert main(["run", exp]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "['colour'] not among the columns of csv:t: ['a', 'b']" in err[0]
