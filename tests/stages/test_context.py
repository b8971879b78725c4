"""The stage template (``Stage.run``): whatever a stage is, a model it leaves with NaN or
infinite weights ends the run FAILED as a diverged fit does, and no later stage runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmt_tf.stages import Export, RunContext, Stage
from lmt_tf.training.callbacks import TrainingDiverged
from tests.conftest import all_runs, mlflow_client
from tests.stages import run_stages


class Blowup(Stage):
    """A stage written in a test: it trains nothing a guard watches, and leaves one
    weight NaN."""

    name = "blowup"
    trains = True  # it leaves a model of its own making (the order check asks)

    def work(self, context: RunContext) -> None:
        weights = context.model.get_weights()
        weights[0][0, 0] = np.nan
        context.model.set_weights(weights)


class Marker(Stage):
    """Records that it ran."""

    name = "marker"
    ran = False

    def work(self, context: RunContext) -> None:
        Marker.ran = True


def test_a_stage_that_leaves_a_diverged_model_fails_the_run(in_tmp: Path) -> None:
    with pytest.raises(TrainingDiverged, match="training diverged: 1 of [0-9,]+ weights of "
                                               "the model the blowup stage left are NaN"):
        run_stages([Blowup(), Marker(), Export()])
    assert not Marker.ran
    (run,) = all_runs(in_tmp)
    assert run.info.status == "FAILED"
    assert run.data.tags["lmt.error"].startswith("TrainingDiverged: training diverged")
    assert mlflow_client(in_tmp).list_artifacts(run.info.run_id, "saved_model") == []
    assert not list(in_tmp.glob("lmt_work/*/*/export"))
