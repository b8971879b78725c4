"""Run directories: state and the LATEST pointer are written atomically, also by runs of
one experiment side by side (a sweep's parallel trials)."""

from __future__ import annotations

import threading
from pathlib import Path

from lmt_tf.rundir import find_run_dir, new_run_dir


def test_runs_side_by_side_mark_latest_without_clashing(tmp_path: Path) -> None:
    runs = [new_run_dir(tmp_path, "exp", f"run-{k}") for k in range(4)]
    errors: list[BaseException] = []

    def mark(run) -> None:
        try:
            for step in range(200):
                run.update_state(epochs=step)
                run.mark_latest()
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=mark, args=(run,)) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert find_run_dir(tmp_path, "exp").name in {f"run-{k}" for k in range(4)}
    assert all(run.read_state()["epochs"] == 199 for run in runs)
    assert not list(tmp_path.rglob("*.tmp"))  # no scratch file left behind
