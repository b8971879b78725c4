"""The lifecycle of one run: a ``NullRun`` stands in for a ``TrackedRun`` everywhere; a
data set that a parallel run creates at once is logged again."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Protocol

import pytest

from lmt_tf.tracking.config import TrackingConfig
from lmt_tf.tracking.run import DATASET_ATTEMPTS, NullRun, Run, TrackedRun


def _public(cls: type) -> dict[str, object]:
    return {name: member for name, member in inspect.getmembers(cls)
            if not name.startswith("_")}


def _parameters(member: object) -> list[tuple[str, object, object]] | None:
    """A method's parameters (name, kind, default); None for an attribute."""
    if not callable(member):
        return None
    return [(p.name, p.kind, p.default)
            for p in inspect.signature(member).parameters.values()]


@pytest.mark.parametrize("cls", [NullRun, TrackedRun], ids=["NullRun", "TrackedRun"])
def test_every_run_offers_all_of_the_protocol_alike(cls: type, in_tmp: Path) -> None:
    protocol = {name: member for name, member in _public(Run).items()
                if name not in _public(Protocol)}
    assert {"uri", "shown_uri", "run_id", "experiment_id", "log_served_model", "end",
            "active", "start", "logs"} <= set(protocol)
    offered = _public(cls)
    run = cls() if cls is NullRun else cls(TrackingConfig(), "exp")
    assert isinstance(run, Run)
    for name, member in protocol.items():
        assert hasattr(run, name), name
        if isinstance(member, property):  # an attribute: a value, not a method
            assert not callable(getattr(run, name)), name
        else:
            assert _parameters(offered[name]) == _parameters(member), name


def test_a_null_run_records_nothing_and_ends_quietly(tmp_path: Path) -> None:
    run = NullRun()
    with run.start("name").active() as active:
        active.log_params({"a": 1})
        active.log_metrics({"loss": 1.0}, step=1)
        assert active.log_served_model(tmp_path, None, None) == ""
    run.end("FINISHED")
    assert (run.logs, run.uri, run.shown_uri, run.run_id) == (False, None, None, None)


class _RacingLogInput:
    """``mlflow.log_input`` against a server that loses the dataset race ``losses`` times
    first (two runs creating one data set at once), as PostgreSQL reports it."""

    def __init__(self, losses: int):
        self.losses, self.logged = losses, []

    def __call__(self, dataset, context, tags) -> None:
        from mlflow.exceptions import RestException

        if self.losses:
            self.losses -= 1
            raise RestException({"error_code": "BAD_REQUEST", "message": (
                '(psycopg.errors.UniqueViolation) duplicate key value violates unique '
                'constraint "dataset_pk"')})
        self.logged.append((dataset.name, dataset.digest, context, tags))


@pytest.mark.parametrize("losses, logged", [(0, 1), (2, 1), (3, 0)])
def test_a_dataset_lost_to_a_parallel_run_is_logged_again(in_tmp: Path, monkeypatch,
                                                        losses: int, logged: int) -> None:
    import mlflow
    from mlflow.exceptions import RestException

    racing = _RacingLogInput(losses)
    monkeypatch.setattr(mlflow, "log_input", racing)
    run = TrackedRun(TrackingConfig(), "exp")
    if losses >= DATASET_ATTEMPTS:
        with pytest.raises(RestException, match="UniqueViolation"):
            run.log_dataset("digits", "abc", "", {"train": 3})
    else:
        run.log_dataset("digits", "abc", "", {"train": 3})
    assert len(racing.logged) == logged
