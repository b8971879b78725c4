"""The read side of tracking: find an earlier run, load its model by any reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmt_tf import config
from lmt_tf.config import run_parsed
from lmt_tf.errors import LmtError
from lmt_tf.invocation import RunOptions
from lmt_tf.tracking.read import find_run, load_model
from tests.conftest import TINY


@pytest.fixture
def earlier_run(gin_file, in_tmp: Path):
    exp = gin_file(TINY)
    config.parse([exp], ["TrainConfig.epochs = 1"])
    return run_parsed(options=RunOptions(config_files=[exp], echo=lambda _: None))


def test_find_a_run_by_id_or_name(earlier_run) -> None:
    by_id = find_run(earlier_run.run_id)
    assert find_run(by_id.info.run_name).info.run_id == earlier_run.run_id
    with pytest.raises(LmtError, match="no MLflow run with id or name 'nope'"):
        find_run("nope")


def test_load_a_model_by_every_kind_of_reference(earlier_run) -> None:
    from lmt_tf.data.sources import load_digits

    x = load_digits().test.x[:5]
    expected = earlier_run.model.predict(x, verbose=0)
    saved_model = str(earlier_run.run_dir / "export" / "saved_model")
    run_name = find_run(earlier_run.run_id).info.run_name
    for reference in (saved_model, f"runs:/{earlier_run.run_id}/model", earlier_run.run_id,
                      run_name):
        loaded = load_model(reference)
        np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, rtol=1e-5,
                                   atol=1e-6, err_msg=reference)


def test_loading_nothing_is_one_clear_error(earlier_run, in_tmp: Path) -> None:
    (in_tmp / "empty").mkdir()
    with pytest.raises(LmtError, match="is not a SavedModel directory"):
        load_model(str(in_tmp / "empty"))
    with pytest.raises(LmtError, match="cannot load the model models:/m-0"):
        load_model("models:/m-0")


def test_a_run_without_an_mlflow_model_loads_from_its_saved_model(gin_file) -> None:
    exp = gin_file(TINY, "bare.gin")
    config.parse([exp], ["TrainConfig.epochs = 1", "ExportConfig.mlflow_model = False"])
    bare = run_parsed(options=RunOptions(config_files=[exp], echo=lambda _: None))
    from lmt_tf.data.sources import load_digits

    x = load_digits().test.x[:5]
    np.testing.assert_allclose(load_model(bare.run_id).predict(x, verbose=0),
                               bare.model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
