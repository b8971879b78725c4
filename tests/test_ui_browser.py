"""The MLflow UI as a user sees it: `lmt ui` over a store holding a small sweep made by
`lmt sweep`, opened in headless Chromium; the rendered DOM shows the sweep's parent run,
and a trial's page its name, param and metric. A screenshot is kept in test-artifacts/
(or $LMT_TEST_ARTIFACTS). Skipped where Chromium is absent (`.ci/run` installs Debian's
chromium)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, TINY, mlflow_client
from tests.test_processes import LMT, _free_port, _reap, wait_for_health

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,900", "--virtual-time-budget=30000"]


def _chromium(url: str, profile: Path, *how: str) -> str:
    done = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *how, url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _sweep_store(directory: Path) -> tuple[str, str, dict[str, tuple[str, float]]]:
    """A store made by a real `lmt sweep` of two trials: the experiment id, the parent
    run's name, and each trial's run id with its name and final val_accuracy."""
    (directory / "swept.gin").write_text(TINY + "TrainConfig.epochs = 1\n")
    done = subprocess.run([LMT, "sweep", "swept.gin", "--quiet",
                           "--grid", "keras.optimizers.SGD.learning_rate=[0.05,0.2]"],
                          cwd=directory, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    client = mlflow_client(directory)
    experiment = client.get_experiment_by_name("swept").experiment_id
    runs = client.search_runs([experiment])
    (parent,) = [r for r in runs if r.info.run_name.startswith("sweep-")]
    trials = {r.data.params["SGD.learning_rate"]: (r.info.run_id, r.info.run_name,
                                                   r.data.metrics["val_accuracy"])
              for r in runs if r is not parent}
    assert set(trials) == {"0.05", "0.2"}
    return experiment, parent.info.run_name, trials


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: chromium)")
def test_the_ui_shows_a_sweeps_runs_params_and_metrics(in_tmp: Path) -> None:
    experiment, parent, trials = _sweep_store(in_tmp)
    port = _free_port()
    ui = subprocess.Popen([LMT, "ui", "--port", str(port)], cwd=in_tmp,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base, ui, "lmt ui")
        runs_page = _chromium(f"{base}/#/experiments/{experiment}/runs", in_tmp / "p1",
                              "--dump-dom")
        assert parent in runs_page  # the sweep, its trials nested under it
        run_id, name, accuracy = trials["0.2"]
        run_url = f"{base}/#/experiments/{experiment}/runs/{run_id}"
        run_page = _chromium(run_url, in_tmp / "p2", "--dump-dom")
        # The page shows the metric's full value (0.5629629...): its first digits, not
        # a rounding of them.
        for shown in (name, "SGD.learning_rate", ">0.2<", "val_accuracy",
                      str(accuracy)[:5], parent):
            assert shown in run_page, shown
        artifacts = Path(os.environ.get("LMT_TEST_ARTIFACTS", PROJECT_ROOT / "test-artifacts"))
        artifacts.mkdir(parents=True, exist_ok=True)
        picture = artifacts / "mlflow-ui-trial-run.png"
        _chromium(run_url, in_tmp / "p3", f"--screenshot={picture}")
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        ui.terminate()  # lmt ui stops its MLflow server on SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            ui.wait(30)
        _reap(ui)
