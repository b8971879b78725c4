"""The working directory of one run: checkpoints, exports, and the state that lets
``--resume`` find the checkpoint and re-attach to the same MLflow run.

Layout: ``<work_dir>/<experiment>/<run name>/{checkpoints,export,state.json}`` and
``<work_dir>/<experiment>/LATEST`` naming the newest run directory.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmt_tf.errors import LmtError


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def export(self) -> Path:
        return self.path / "export"

    def read_state(self) -> dict[str, Any]:
        file = self.path / "state.json"
        return json.loads(file.read_text()) if file.is_file() else {}

    def update_state(self, **values: Any) -> None:
        """Merges ``values`` into state.json, atomically (a crash leaves the old file)."""
        state = {**self.read_state(), **values}
        tmp = self.path / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
        os.replace(tmp, self.path / "state.json")


def new_run_dir(work_dir: str | Path, experiment: str) -> RunDir:
    """Creates a fresh, timestamped run directory and marks it as the latest."""
    root = Path(work_dir) / experiment
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = root / f"{experiment}-{stamp}", 1
    while path.exists():
        n += 1
        path = root / f"{experiment}-{stamp}-{n}"
    path.mkdir()
    (root / "LATEST").write_text(path.name + "\n")
    return RunDir(path)


def latest_run_dir(work_dir: str | Path, experiment: str) -> RunDir:
    """The run directory that ``--resume`` continues.

    Raises:
      LmtError: if no earlier run of ``experiment`` exists under ``work_dir``.
    """
    root = Path(work_dir) / experiment
    marker = root / "LATEST"
    if not marker.is_file():
        raise LmtError(f"nothing to resume: no earlier run of {experiment!r} in {root}")
    path = root / marker.read_text().strip()
    if not path.is_dir():
        raise LmtError(f"nothing to resume: {path} (named by {marker}) is missing")
    return RunDir(path)
