"""TensorBoard: a run with TrackingConfig.tensorboard logs scalars, the graph and a
profile as artifacts; `lmt tensorboard RUN` serves them on loopback, and stops serving
when lmt is gone, even killed with SIGKILL; bad input."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from lmt_tf.cli import main
from lmt_tf.errors import ConfigError
from lmt_tf.tracking.config import TrackingConfig
from tests.conftest import TINY, all_runs, mlflow_client
from tests.test_processes import LMT, _free_port, _reap, _wait_for


def test_tensorboard_logs_are_run_artifacts_and_served(gin_file, in_tmp: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    gin_file(TINY + "TrackingConfig.tensorboard = True\n"
                    "TrackingConfig.tensorboard_profile = (2, 3)\n")
    assert main(["run", "exp.gin"]) == 0
    (run,) = all_runs(in_tmp)
    logs = Path(mlflow_client(in_tmp).download_artifacts(run.info.run_id, "tensorboard",
                                                         str(in_tmp / "down")))
    train = EventAccumulator(str(logs / "train")).Reload()
    # TF 2 writes scalars as tensor summaries.
    assert [e.step for e in train.Tensors("epoch_loss")] == [0, 1]  # TINY: 2 epochs
    assert train.Tags()["graph"]
    assert list((logs / "plugins" / "profile").rglob("*.xplane.pb"))
    validation = EventAccumulator(str(logs / "validation")).Reload()
    assert len(validation.Tensors("epoch_accuracy")) == 2

    port = _free_port()
    server = subprocess.Popen([LMT, "tensorboard", run.info.run_id, "--port", str(port)],
                              cwd=in_tmp, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, start_new_session=True)
    try:
        def runs_listed() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs",
                                            timeout=2) as reply:
                    return {"train", "validation"} <= set(json.load(reply))
            except OSError:
                assert server.poll() is None
                return False

        _wait_for(runs_listed, 120, "TensorBoard to list the run's logs")
    finally:
        _reap(server)  # SIGKILL: lmt cannot stop TensorBoard, which stops by itself

    def stopped() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) != 0

    _wait_for(stopped, 30, "TensorBoard to stop with lmt")


def test_a_run_without_tensorboard_logs_is_a_one_line_error(gin_file, in_tmp: Path,
                                                             capsys) -> None:
    gin_file(TINY)
    assert main(["run", "exp.gin"]) == 0
    (run,) = all_runs(in_tmp)
    assert main(["tensorboard", run.info.run_id, "--port", str(_free_port())]) == 2
    assert "has no TensorBoard logs (run it with TrackingConfig.tensorboard = True)" in \
        capsys.readouterr().err


@pytest.mark.parametrize("steps", [(3, 2), (0, 4), (1, 2, 3)])
def test_bad_profile_steps(steps) -> None:
    with pytest.raises(ConfigError, match="TrackingConfig.tensorboard_profile must be"):
        TrackingConfig(tensorboard_profile=steps)
