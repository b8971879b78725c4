"""MLflow tracking: where runs are stored, and the lifecycle of one run.

The embedded default store is a SQLite file ``./mlruns.db`` with artifacts under
``./mlartifacts``; ``MLFLOW_TRACKING_URI`` or ``TrackingConfig.tracking_uri`` points at
any MLflow server instead. A run always ends FINISHED, FAILED (with the error as a tag)
or KILLED, never RUNNING: a run records its owner and a heartbeat (``liveness``), and
every ``lmt`` command that opens a store first ends the runs whose owner is gone.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmt_tf.checks import check, check_types
from lmt_tf.errors import LmtError
from lmt_tf.liveness import HEARTBEAT, Heartbeat, owner_tags, sweep_orphans
from lmt_tf.process import JOB_NETWORK_ENV, PARENT_RUN_ENV

DEFAULT_DB = "mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"
_MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value, in characters
DATASET_ATTEMPTS = 3  # logging a dataset input that a parallel run creates at once


@dataclass
class TrackingConfig:
    """Where and how much a run logs to MLflow."""

    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///./mlruns.db
    artifact_root: str = DEFAULT_ARTIFACTS  # artifacts of new experiments in a local store
    experiment_name: str | None = None  # None: the experiment's name
    log_every_n_steps: int = 0  # also log training metrics every N steps; 0: per epoch only
    # TensorBoard logs of the train stage (scalars per epoch, the graph), logged as the
    # run's tensorboard/ artifacts; `lmt tensorboard RUN` serves them.
    tensorboard: bool = False
    # With tensorboard: profile these training steps (first, last; 1-based), e.g.
    # (10, 12); (0, 0): no profile.
    tensorboard_profile: tuple[int, ...] = (0, 0)

    def __post_init__(self) -> None:
        if isinstance(self.tensorboard_profile, list):  # gin writes [...] as a list
            self.tensorboard_profile = tuple(self.tensorboard_profile)
        check_types(self)
        check(self.log_every_n_steps >= 0, "TrackingConfig.log_every_n_steps",
              f"must be >= 0, got {self.log_every_n_steps}")
        first, last = (self.tensorboard_profile + (0, 0))[:2]
        check(len(self.tensorboard_profile) == 2 and 0 <= first <= last
              and (first > 0 or last == 0), "TrackingConfig.tensorboard_profile",
              f"must be (first, last) steps with 1 <= first <= last, or (0, 0), got "
              f"{self.tensorboard_profile}")


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI in force: ``uri``, else $MLFLOW_TRACKING_URI, else the SQLite
    file in the working directory (as an absolute URI, so it survives a ``chdir``)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fails fast on an MLflow server that does not answer, instead of MLflow's minutes
    of retries. Local stores (sqlite, file) are not checked.

    Raises:
      LmtError: naming the URI if the server's health endpoint does not answer.
    """
    if not uri.startswith(("http://", "https://")):
        return
    parts = urllib.parse.urlsplit(uri)
    bare = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    request = urllib.request.Request(f"{bare.rstrip('/')}/health")
    user, password = parts.username, parts.password
    if user is None:  # MLflow's own variables, as its client uses them
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user is not None:
        token = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password or '')}"
        request.add_header("Authorization",
                           "Basic " + base64.b64encode(token.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            pass
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        isolated = os.environ.get(JOB_NETWORK_ENV) == "isolated"
        hint = " from the job's own network namespace (lmt launch --network host)" \
            if isolated else ""
        raise LmtError(f"MLflow tracking server {redact_uri(uri)} is unreachable{hint} "
                       f"({redact(str(reason), uri)})") from e


def redact_uri(uri: str) -> str:
    """``uri`` with any password replaced by ``***`` (``http://user:***@host``)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    user = parts.netloc.rpartition("@")[0].split(":", 1)[0]
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


_CREDENTIALS = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@'\"]+):[^@\s/'\"]+@")


def redact_credentials(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` in it
    replaced by ``***``: for params, tags and config files logged with a run."""
    return _CREDENTIALS.sub(r"\1:***@", text)


def redact(text: str, uri: str) -> str:
    """``text`` with the password of ``uri`` (if any) replaced by ``***``."""
    password = urllib.parse.urlsplit(uri).password
    if not password:
        return text
    for secret in {password, urllib.parse.unquote(password)}:
        text = text.replace(secret, "***")
    return text


def sweep_store(uri: str, found_by: str,
                echo: Callable[[str], None] | None = None) -> list[str]:
    """Ends the runs in the store at ``uri`` whose owner is gone (see ``liveness``).

    Raises:
      LmtError: if the store cannot be opened.
    """
    import mlflow

    check_reachable(uri)
    try:
        return sweep_orphans(mlflow.MlflowClient(uri), found_by, echo)
    except Exception as e:  # the store's own errors: sqlalchemy's, MLflow's, OSError
        raise LmtError(f"cannot use the MLflow store {redact_uri(uri)}: "
                       f"{redact(_first_line(e), uri)}") from e


def run_links(uri: str, experiment_id: str, run_id: str) -> tuple[str, str]:
    """Links to the run and to the experiment's runs table in the MLflow UI (the 3.x UI
    otherwise opens an experiment on its GenAI overview page)."""
    if uri.startswith(("http://", "https://")):
        parts = urllib.parse.urlsplit(uri)
        base = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl().rstrip("/")
    else:
        base = "http://127.0.0.1:5000"
    return (f"{base}/#/experiments/{experiment_id}/runs/{run_id}",
            f"{base}/#/experiments/{experiment_id}/runs")


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


class TrackedRun:
    """One MLflow run, owned by this process between ``start`` and ``end``. Only the
    process that owns the run (the chief) creates one."""

    logs = True

    def __init__(self, config: TrackingConfig, experiment_name: str):
        import mlflow

        self._mlflow = mlflow
        self.uri = resolve_tracking_uri(config.tracking_uri)
        # MLflow prints "View run ... at: <uri>" when a run ends, password included;
        # lmt prints its own links, without it.
        if urllib.parse.urlsplit(self.uri).password:
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        else:
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.config = config
        self.experiment_name = config.experiment_name or experiment_name
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._heartbeat: Heartbeat | None = None

    @property
    def shown_uri(self) -> str:
        """The tracking URI as it may be shown: without its password."""
        return redact_uri(self.uri)

    def start(self, run_name: str, run_id: str | None = None,
              echo: Callable[[str], None] | None = None) -> TrackedRun:
        """Creates the run, or re-opens ``run_id`` (a resumed run) as RUNNING, owned by
        this process. First ends the runs in the store whose owner is gone.

        Raises:
          LmtError: if the store cannot be opened or written, or ``run_id`` is not in it.
        """
        mlflow = self._mlflow
        check_reachable(self.uri)
        mlflow.set_tracking_uri(self.uri)
        try:
            sweep_orphans(mlflow.MlflowClient(self.uri), f"lmt (pid {os.getpid()})", echo)
            if run_id is not None:
                run = mlflow.start_run(run_id=run_id)
            else:
                # A sweep's trial is nested under the sweep's run (the UI groups them).
                parent = {"mlflow.parentRunId": os.environ[PARENT_RUN_ENV]} \
                    if os.environ.get(PARENT_RUN_ENV) else {}
                run = mlflow.start_run(experiment_id=self._experiment_id(), run_name=run_name,
                                       tags=parent)
            self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
            mlflow.set_tags(owner_tags())
        except (LmtError, KeyboardInterrupt):
            self._end_quietly()
            raise
        except Exception as e:  # the store's own errors: sqlalchemy's, MLflow's, OSError
            self._end_quietly()
            what = f"resume MLflow run {run_id} in" if run_id else "use the MLflow store"
            raise LmtError(f"cannot {what} {self.shown_uri}: "
                           f"{redact(_first_line(e), self.uri)}") from e
        client, current = mlflow.MlflowClient(self.uri), self.run_id
        self._heartbeat = Heartbeat(lambda now: client.set_tag(current, HEARTBEAT, now)).start()
        return self

    def _experiment_id(self) -> str:
        experiment = self._mlflow.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            _check_artifact_location(experiment.artifact_location)
            return experiment.experiment_id
        location = self._artifact_location()
        _check_artifact_location(location)
        try:
            return self._mlflow.create_experiment(self.experiment_name,
                                                  artifact_location=location)
        except Exception:
            # Another run of the same experiment (a sweep, parallel seeds) created it
            # between the lookup and here: use theirs.
            experiment = self._mlflow.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _artifact_location(self) -> str | None:
        if self.uri.startswith(("sqlite:", "file:")) or "://" not in self.uri:
            return Path(self.config.artifact_root).resolve().as_uri()
        return None  # a server decides where its artifacts go

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
        self._mlflow.set_tags({k: redact_credentials(str(v)) for k, v in tags.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._mlflow.log_metrics(dict(metrics), step=step)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._mlflow.log_text(redact_credentials(text), artifact_file)

    def log_artifacts(self, directory: Path, artifact_path: str) -> None:
        self._mlflow.log_artifacts(str(directory), artifact_path)

    def log_artifact(self, file: Path, artifact_path: str) -> None:
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

    def log_served_model(self, saved_model: Path, example: Any, outputs: Any) -> str:
        """Logs the SavedModel directory ``saved_model`` as an MLflow pyfunc model that
        serves it with TensorFlow alone (``served_model.py``), with the signature
        of the raw ``example`` inputs and their ``outputs``; returns its URI."""
        import mlflow.pyfunc
        import tensorflow as tf
        from mlflow.models import infer_signature

        from lmt_tf import served_model

        info = mlflow.pyfunc.log_model(
            name="model", python_model=served_model.__file__,
            artifacts={"saved_model": str(saved_model)},
            signature=infer_signature(example, outputs),
            metadata={"lmt.input": "raw features: the preprocessing is inside the model"},
            # Explicit, because inferring requirements re-loads the model in a subprocess.
            pip_requirements=[f"tensorflow=={tf.__version__}"])
        return info.model_uri

    def end(self, status: str, error: BaseException | None = None) -> None:
        """Ends the run as FINISHED, FAILED or KILLED; a failure's message becomes the
        ``lmt.error`` tag."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self.run_id is None:
            return
        with contextlib.suppress(Exception):
            if error is not None:
                message = redact_credentials(
                    redact(f"{type(error).__name__}: {error}", self.uri))
                self._mlflow.set_tag("lmt.error", message[:5000])
        self._mlflow.end_run(status=status)

    @contextlib.contextmanager
    def active(self) -> Iterator[TrackedRun]:
        """Ends the run on leaving: FINISHED, KILLED on Ctrl-C/SIGTERM, FAILED otherwise."""
        try:
            yield self
        except KeyboardInterrupt as e:
            self.end("KILLED", e)
            raise
        except BaseException as e:
            self.end("FAILED", e)
            raise
        self.end("FINISHED")


def _check_artifact_location(location: str | None) -> None:
    """A local artifact location must be a directory that can be made; a server's or a
    cloud store's is its own business."""
    if not location or not location.startswith("file:"):
        return
    path = Path(urllib.parse.unquote(urllib.parse.urlsplit(location).path))
    if path.exists() and not path.is_dir():
        raise LmtError(f"the MLflow artifact location {path} is a file, not a directory "
                       f"(set TrackingConfig.artifact_root to a directory)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LmtError(f"cannot create the MLflow artifact location {path} "
                       f"({e.strerror})") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise LmtError(f"the MLflow artifact location {path} is not writable")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def find_run(reference: str, uri: str | None = None) -> Any:
    """The MLflow run with id ``reference`` or, failing that, the newest run named
    ``reference``, in the store at ``uri`` (default: the store in force).

    Raises:
      LmtError: if there is no such run, or the store cannot be read.
    """
    import mlflow

    store = resolve_tracking_uri(uri)
    client = mlflow.MlflowClient(store)
    try:
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            return client.get_run(reference)
        experiments = [e.experiment_id for e in client.search_experiments()]
        named = client.search_runs(
            experiments, filter_string=f"attributes.run_name = '{reference}'",
            order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    except Exception as e:  # the store's own errors
        raise LmtError(f"cannot read the MLflow store {redact_uri(store)}: "
                       f"{redact(_first_line(e), store)}") from e
    if not named:
        raise LmtError(f"no MLflow run with id or name {reference!r} in {redact_uri(store)}")
    return named[0]


def load_model(reference: str, uri: str | None = None) -> Any:
    """A Keras model logged or exported by an earlier run.

    Args:
      reference: a SavedModel directory, an MLflow model URI (``runs:/<run id>/model``,
        ``models:/m-...``), or a run's id or name (its logged model or, without one,
        its ``saved_model/`` artifact).
      uri: the tracking store for MLflow references (default: the store in force).

    Raises:
      LmtError: if nothing loadable is found under ``reference``.
    """
    from lmt_tf.models.saved import load_saved_model

    path = Path(reference)
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise LmtError(f"{path} is not a SavedModel directory (no saved_model.pb)")
        return load_saved_model(path)
    import mlflow
    import mlflow.tensorflow

    store = resolve_tracking_uri(uri)
    mlflow.set_tracking_uri(store)
    model_uri = reference
    fallback = None
    if not reference.startswith(("runs:/", "models:/")):
        run_id = find_run(reference, store).info.run_id
        model_uri = f"runs:/{run_id}/model"
        # A run that logged no MLflow model (ExportConfig.mlflow_model off) but its
        # SavedModel: that, then.
        if any(a.path == "saved_model"
               for a in mlflow.MlflowClient(store).list_artifacts(run_id)):
            fallback = f"runs:/{run_id}/saved_model"
    # No progress bar per file: a teacher or an evaluated model loads in one line.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        try:
            local = Path(mlflow.artifacts.download_artifacts(model_uri))
        except Exception:
            if fallback is None:
                raise
            local = Path(mlflow.artifacts.download_artifacts(fallback))
        if (local / "artifacts" / "saved_model").is_dir():  # lmt's served model
            return load_saved_model(local / "artifacts" / "saved_model")
        if (local / "saved_model.pb").is_file():  # a run's saved_model/ artifact
            return load_saved_model(local)
        return mlflow.tensorflow.load_model(model_uri)  # a Keras model logged elsewhere
    except Exception as e:  # MLflow's errors for a missing run or model
        raise LmtError(f"cannot load the model {model_uri} from {redact_uri(store)}: "
                       f"{redact(_first_line(e), store)}") from e


def source_run_id(reference: str, uri: str | None = None) -> str | None:
    """The id of the run that logged the model ``reference`` (a run id or name, a
    ``runs:/`` or ``models:/m-`` URI), or None (a SavedModel path, an unknown model)."""
    import mlflow

    if Path(reference).is_dir():
        return None
    if reference.startswith("runs:/"):
        return reference.removeprefix("runs:/").split("/", 1)[0]
    with contextlib.suppress(Exception):
        if reference.startswith("models:/"):
            mlflow.set_tracking_uri(resolve_tracking_uri(uri))
            return mlflow.get_logged_model(reference.removeprefix("models:/")).source_run_id
        return find_run(reference, uri).info.run_id
    return None


def _duplicate_key(error: BaseException) -> bool:
    """Whether ``error`` is a store's unique-key violation (PostgreSQL, MySQL, SQLite)."""
    text = str(error)
    return any(mark in text for mark in ("UniqueViolation", "duplicate key",
                                         "UNIQUE constraint failed", "Duplicate entry"))


class NullRun:
    """What tasks other than the chief log to: nothing."""

    logs = False
    run_id = experiment_id = None

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

    @contextlib.contextmanager
    def active(self) -> Iterator[NullRun]:
        yield self


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_VALUE else text[: _MAX_PARAM_VALUE - 3] + "..."
