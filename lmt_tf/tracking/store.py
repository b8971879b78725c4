"""The MLflow store: which one is in force, whether it answers, its experiments and
where their artifacts go, links into its UI, and ending the runs whose owner is gone.

The embedded default store is a SQLite file ``./mlruns.db`` with artifacts under
``./mlartifacts``; ``MLFLOW_TRACKING_URI`` or ``TrackingConfig.tracking_uri`` points at
any MLflow server instead.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from lmt_tf.errors import LmtError
from lmt_tf.liveness import end_orphans
from lmt_tf.process import JOB_NETWORK_ENV
from lmt_tf.tracking.credentials import check_uri, error_line, redact, redact_uri, remember

DEFAULT_DB = "mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI in force: ``uri``, else $MLFLOW_TRACKING_URI, else the SQLite
    file in the working directory (as an absolute URI, so it survives a ``chdir``)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        remember(check_uri(uri))  # never printed, whoever prints it (redacted_output)
        return uri
    return f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fails fast on a store that cannot be used, instead of MLflow's minutes of retries:
    a server that does not answer, a SQLite file that is not there and cannot be made (a
    read-only directory) or cannot be opened. A new SQLite store gets its tables here,
    under a lock (see ``_open_sqlite``).

    Raises:
      LmtError: naming the URI or file and what to do.
    """
    if check_uri(uri).startswith("sqlite:"):
        _check_sqlite_file(uri)
        _open_sqlite(uri)
        return
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


def _check_sqlite_file(uri: str) -> None:
    """A SQLite store that does not exist yet must be one that can be made: MLflow
    retries making it for 100 seconds before it fails."""
    path = Path(urllib.parse.unquote(uri.removeprefix("sqlite:///").split("?", 1)[0]))
    if not path.name or path.name == ":memory:" or path.exists():
        return
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise LmtError(f"cannot use the MLflow store {path.resolve()}: it does not exist, "
                       f"and {path.resolve().parent} is not a directory you can write to; "
                       f"run from a directory you can write to, or set MLFLOW_TRACKING_URI")


def open_store(uri: str | None, found_by: str,
               echo: Callable[[str], None] | None = None) -> str:
    """The tracking URI in force (``uri``, else as ``resolve_tracking_uri`` says), once
    its store answers, with the runs whose owner is gone ended first (so what a command
    then reads of them is true). What every ``lmt`` command that reads a store opens it
    with.

    Raises:
      LmtError: naming the URI if it is a server that does not answer.
    """
    uri = resolve_tracking_uri(uri)
    check_reachable(uri)
    # A store this user may only read is still read; its own errors come with the read.
    with contextlib.suppress(LmtError):
        end_orphaned_runs(uri, found_by, echo)
    return uri


def end_orphaned_runs(uri: str, found_by: str,
                      echo: Callable[[str], None] | None = None) -> list[str]:
    """Ends the runs in the store at ``uri`` whose owner is gone (see ``liveness``) as
    KILLED; returns their ids.

    Raises:
      LmtError: if the store cannot be opened.
    """
    import mlflow

    check_reachable(uri)
    try:
        return end_orphans(mlflow.MlflowClient(uri), found_by, echo)
    except Exception as e:  # the store's own errors: sqlalchemy's, MLflow's, OSError
        raise LmtError(f"cannot use the MLflow store {redact_uri(uri)}: "
                       f"{error_line(e, uri)}") from e


def get_or_create_experiment(uri: str, name: str, artifact_root: str) -> str:
    """The id of the experiment ``name`` in the store at ``uri``, created if it is not
    there yet; in a local store, with its artifacts under ``artifact_root``.

    Raises:
      LmtError: if the experiment's local artifact location cannot be used.
    """
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        check_artifact_location(experiment.artifact_location)
        return experiment.experiment_id
    location = artifact_location(uri, artifact_root)
    check_artifact_location(location)
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:
        # Another run of the same experiment (a sweep, parallel seeds) created it
        # between the lookup and here: use theirs.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def artifact_location(uri: str, artifact_root: str) -> str | None:
    """Where a new experiment in the store at ``uri`` keeps its artifacts: under
    ``artifact_root`` for a local store; None for a server, which decides."""
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        return Path(artifact_root).resolve().as_uri()
    return None


def check_artifact_location(location: str | None) -> None:
    """A local artifact location must be a directory that can be made; a server's or a
    cloud store's is its own business.

    Raises:
      LmtError: naming the location if it is a file, cannot be made or is not writable.
    """
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


_OPENED: set[str] = set()  # SQLite stores this process has opened


def _open_sqlite(uri: str) -> None:
    """Opens the SQLite store at ``uri`` once per process, holding a lock beside its file
    (``mlruns.db.lock``) while MLflow makes its tables: two first runs on a fresh store
    would otherwise both migrate the new file's schema, and the loser fail ("duplicate
    column name"). MLflow keeps the opened store for the process.

    Raises:
      LmtError: if the store cannot be opened (not a database, no permission).
    """
    if uri in _OPENED:
        return
    import mlflow

    name = urllib.parse.unquote(uri.removeprefix("sqlite:///"))
    if not uri.startswith("sqlite:///") or name in ("", ":memory:"):
        return  # in memory: one process's own
    path = Path(name) if Path(name).is_absolute() else Path.cwd() / name
    try:
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # sqlalchemy's, alembic's, OSError
        raise LmtError(f"cannot use the MLflow store {uri}: {error_line(e, uri)}") from e
    _OPENED.add(uri)
