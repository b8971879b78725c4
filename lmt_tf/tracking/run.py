"""The lifecycle of one MLflow run: ``Run``, what every run offers; ``TrackedRun``, a run
this process owns from ``start`` to ``end``; ``NullRun``, a run that records nothing
(tasks other than the chief). A run always ends FINISHED, FAILED (with the error as a
tag) or KILLED, never RUNNING: it records its owner and a heartbeat (``liveness``), and
its start first ends the runs in the store whose owner is gone.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lmt_tf.errors import LmtError
from lmt_tf.liveness import (
    ENDED_BY,
    HEARTBEAT,
    OWNER_HOST,
    OWNER_PID,
    Heartbeat,
    end_orphans,
    owner_gone,
    owner_tags,
)
from lmt_tf.process import PARENT_RUN_ENV
from lmt_tf.tracking.config import TrackingConfig
from lmt_tf.tracking.credentials import (
    error_line,
    redact,
    redact_credentials,
    redact_uri,
    secret,
)
from lmt_tf.tracking.store import check_reachable, get_or_create_experiment, resolve_tracking_uri

ERROR = "lmt.error"  # why a run ended FAILED or KILLED
# Tags that say how a run ended, removed when a resume re-opens it.
ENDS = frozenset({ERROR, ENDED_BY})

_MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value, in characters
DATASET_ATTEMPTS = 3  # logging a dataset input that a parallel run creates at once


@runtime_checkable
class Run(Protocol):
    """What a run offers its callers, whether it records (``TrackedRun``) or not
    (``NullRun``)."""

    @property
    def logs(self) -> bool:
        """Whether this run records anything."""

    @property
    def uri(self) -> str | None:
        """The tracking URI the run is stored at (None: nowhere)."""

    @property
    def shown_uri(self) -> str | None:
        """The tracking URI as it may be shown: without its password."""

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id once started."""

    @property
    def experiment_id(self) -> str | None:
        """Its experiment's id once started."""

    def start(self, run_name: str, run_id: str | None = None,
              echo: Callable[[str], None] | None = None,
              tags: Mapping[str, Any] | None = None) -> Run:
        """Creates the run named ``run_name``, or re-opens ``run_id``."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Logs params not yet on the run."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Sets tags, passwords redacted."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Logs metrics at ``step``."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """Logs ``text`` as the artifact ``artifact_file``, passwords redacted."""

    def log_artifact(self, file: Path, artifact_path: str) -> None:
        """Logs ``file`` under ``artifact_path``."""

    def log_artifacts(self, directory: Path, artifact_path: str) -> None:
        """Logs the files of ``directory`` under ``artifact_path``."""

    def log_dataset(self, name: str, digest: str, source: str, sizes: Mapping[str, int]
                    ) -> None:
        """Logs the run's data as an MLflow dataset input."""

    def log_served_model(self, saved_model: Path, example: Any, outputs: Any,
                         class_names: Sequence[str] = ()) -> str:
        """Logs a SavedModel as a served MLflow model; returns its URI."""

    def end(self, status: str, error: BaseException | None = None) -> None:
        """Ends the run as FINISHED, FAILED or KILLED."""

    def active(self) -> contextlib.AbstractContextManager[Run]:
        """A context that ends the run on leaving."""


class TrackedRun:
    """One MLflow run, owned by this process between ``start`` and ``end``. Only the
    process that owns the run (the chief, a sweep's driver) creates one."""

    logs = True

    def __init__(self, config: TrackingConfig, experiment_name: str):
        import mlflow

        self._mlflow = mlflow
        self.uri = resolve_tracking_uri(config.tracking_uri)
        # MLflow prints "View run ... at: <uri>" when a run ends, password included;
        # lmt prints its own links, without it.
        if secret(self.uri):
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        else:
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self._config = config
        self._experiment_name = config.experiment_name or experiment_name
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._heartbeat: Heartbeat | None = None
        self._ended = False

    @property
    def shown_uri(self) -> str:
        """The tracking URI as it may be shown: without its password."""
        return redact_uri(self.uri)

    def start(self, run_name: str, run_id: str | None = None,
              echo: Callable[[str], None] | None = None,
              tags: Mapping[str, Any] | None = None) -> TrackedRun:
        """Creates the run, or re-opens ``run_id`` (a resumed run) as RUNNING, owned by
        this process. First ends the runs in the store whose owner is gone.

        Args:
          run_name: the new run's name.
          run_id: the run to re-open instead of making one.
          echo: where to say which orphaned runs were ended (None: nowhere).
          tags: tags of the new run (a re-opened run keeps its own).

        Raises:
          LmtError: if the store cannot be opened or written, or ``run_id`` is not in it.
        """
        mlflow = self._mlflow
        check_reachable(self.uri)
        mlflow.set_tracking_uri(self.uri)
        try:
            end_orphans(mlflow.MlflowClient(self.uri), f"lmt (pid {os.getpid()})", echo)
            if run_id is not None:
                client = mlflow.MlflowClient(self.uri)
                _check_not_owned(client.get_run(run_id))
                run = mlflow.start_run(run_id=run_id)
                # The tags of how it ended before describe no longer: it goes on.
                for key in set(run.data.tags) & ENDS:
                    client.delete_tag(run_id, key)
            else:
                # A sweep's trial is nested under the sweep's run (the UI groups them).
                parent = {"mlflow.parentRunId": os.environ[PARENT_RUN_ENV]} \
                    if os.environ.get(PARENT_RUN_ENV) else {}
                run = mlflow.start_run(
                    experiment_id=get_or_create_experiment(
                        self.uri, self._experiment_name, self._config.artifact_root),
                    run_name=run_name, tags={**(tags or {}), **parent})
            self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
            mlflow.set_tags(owner_tags())
        except (LmtError, KeyboardInterrupt):
            self._end_quietly()
            raise
        except Exception as e:  # the store's own errors: sqlalchemy's, MLflow's, OSError
            self._end_quietly()
            what = f"resume MLflow run {run_id} in" if run_id else "use the MLflow store"
            raise LmtError(f"cannot {what} {self.shown_uri}: {error_line(e, self.uri)}"
                           ) from e
        client, current = mlflow.MlflowClient(self.uri), self.run_id
        self._heartbeat = Heartbeat(lambda now: client.set_tag(current, HEARTBEAT, now)).start()
        return self

    def _end_quietly(self) -> None:
        with contextlib.suppress(Exception):
            if self._mlflow.active_run() is not None:
                self._mlflow.end_run(status="FAILED")

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Logs params not yet on the run (a resumed run keeps its original values)."""
        existing = self._mlflow.get_run(self.run_id).data.params
        fresh = {k: _param_value(redact_credentials(str(v))) for k, v in params.items()
                 if k not in existing}
        if fresh:
            self._mlflow.log_params(fresh)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Sets tags, passwords redacted."""
        self._mlflow.set_tags({k: redact_credentials(str(v)) for k, v in tags.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Logs metrics at ``step``."""
        self._mlflow.log_metrics(dict(metrics), step=step)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Logs ``text`` as the artifact ``artifact_file``, passwords redacted."""
        self._mlflow.log_text(redact_credentials(text), artifact_file)

    def log_artifacts(self, directory: Path, artifact_path: str) -> None:
        """Logs the files of ``directory`` under ``artifact_path``."""
        self._mlflow.log_artifacts(str(directory), artifact_path)

    def log_artifact(self, file: Path, artifact_path: str) -> None:
        """Logs ``file`` under ``artifact_path``."""
        self._mlflow.log_artifact(str(file), artifact_path)

    def log_dataset(self, name: str, digest: str, source: str, sizes: Mapping[str, int]
                    ) -> None:
        """Logs the run's data as an MLflow dataset input (the runs table's Dataset
        column): its name, digest and source, with the split sizes as input tags."""
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.meta_dataset import MetaDataset

        where = CodeDatasetSource({"source": source or "(not recorded by the loader)"})
        if source and Path(source).exists():
            from mlflow.data.dataset_source_registry import resolve_dataset_source

            with contextlib.suppress(Exception), warnings.catch_warnings():
                # (no resolver for it: keep the text; two that agree: a warning)
                warnings.simplefilter("ignore")
                where = resolve_dataset_source(Path(source).resolve().as_uri())
        dataset = MetaDataset(where, name=name, digest=digest)
        tags = {f"{split}_examples": str(n) for split, n in sizes.items()}
        for attempt in range(DATASET_ATTEMPTS):
            try:
                self._mlflow.log_input(dataset, context="training", tags=tags)
                return
            except Exception as e:
                # Runs logging the same new data set at once (sweep trials in parallel)
                # race in the server's get-or-create: the loser's insert violates the
                # dataset's key (seen with PostgreSQL). Again, the data set exists.
                if attempt + 1 == DATASET_ATTEMPTS or not _duplicate_key(e):
                    raise
                time.sleep(0.2 * (attempt + 1))

    def log_served_model(self, saved_model: Path, example: Any, outputs: Any,
                         class_names: Sequence[str] = ()) -> str:
        """Logs the SavedModel directory ``saved_model`` as an MLflow pyfunc model that
        serves it with TensorFlow alone; returns its URI (see ``served.log_served``)."""
        from lmt_tf.tracking.served import log_served

        return log_served(saved_model, example, outputs, class_names)

    def end(self, status: str, error: BaseException | None = None) -> None:
        """Ends the run as FINISHED, FAILED or KILLED; a failure's message becomes the
        ``lmt.error`` tag. Only the first end counts."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self.run_id is None or self._ended:
            return
        self._ended = True
        with contextlib.suppress(Exception):
            if error is not None:
                message = redact_credentials(
                    redact(f"{type(error).__name__}: {error}", self.uri))
                self._mlflow.set_tag(ERROR, message[:5000])
        self._mlflow.end_run(status=status)

    @contextlib.contextmanager
    def active(self) -> Iterator[TrackedRun]:
        """Ends the run on leaving: FINISHED (unless ended before), KILLED on
        Ctrl-C/SIGTERM, FAILED otherwise."""
        try:
            yield self
        except KeyboardInterrupt as e:
            self.end("KILLED", e)
            raise
        except BaseException as e:
            self.end("FAILED", e)
            raise
        self.end("FINISHED")


class NullRun:
    """A run that records nothing: what tasks other than the chief log to."""

    logs = False
    uri = shown_uri = run_id = experiment_id = None

    def start(self, run_name: str, run_id: str | None = None,
              echo: Callable[[str], None] | None = None,
              tags: Mapping[str, Any] | None = None) -> NullRun:
        return self

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_artifact(self, file: Path, artifact_path: str) -> None:
        pass

    def log_artifacts(self, directory: Path, artifact_path: str) -> None:
        pass

    def log_dataset(self, name: str, digest: str, source: str, sizes: Mapping[str, int]
                    ) -> None:
        pass

    def log_served_model(self, saved_model: Path, example: Any, outputs: Any,
                         class_names: Sequence[str] = ()) -> str:
        return ""  # logged nowhere

    def end(self, status: str, error: BaseException | None = None) -> None:
        pass

    @contextlib.contextmanager
    def active(self) -> Iterator[NullRun]:
        yield self


def git_commit(directory: Path) -> str | None:
    """The commit checked out in ``directory``, if it is inside a git work tree."""
    try:
        out = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def host_tags() -> dict[str, str]:
    """Tags that say where and with what a run was made."""
    import tensorflow as tf

    import lmt_tf

    tags = {"lmt.version": lmt_tf.__version__, "tensorflow.version": tf.__version__,
            "lmt.host": socket.gethostname()}
    commit = git_commit(Path.cwd())
    if commit:
        tags["lmt.git_commit"] = commit
    return tags


def _duplicate_key(error: BaseException) -> bool:
    """Whether ``error`` is a store's unique-key violation (PostgreSQL, MySQL, SQLite)."""
    text = str(error)
    return any(mark in text for mark in ("UniqueViolation", "duplicate key",
                                         "UNIQUE constraint failed", "Duplicate entry"))


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_VALUE else text[: _MAX_PARAM_VALUE - 3] + "..."


def _check_not_owned(run: Any) -> None:
    """Raises LmtError if ``run`` is RUNNING under an owner that is still alive: a run
    has one writer at a time."""
    if run.info.status == "RUNNING" and owner_gone(run.data.tags) is None:
        tags = run.data.tags
        owner = f"pid {tags.get(OWNER_PID, '?')} on {tags.get(OWNER_HOST, '?')}"
        raise LmtError(f"run {run.info.run_id} is RUNNING, owned by {owner}; wait for it to "
                       f"end (or stop it) before continuing it")
