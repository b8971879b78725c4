"""The read side of tracking: finding earlier runs (by id, name or parent), loading the
models they logged, and fetching their artifacts. Every read opens the store through
``store_client``: a server that does not answer is an error at once, not after MLflow's
minutes of retries."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from lmt_tf.errors import LmtError
from lmt_tf.tracking.credentials import error_line, redact_uri
from lmt_tf.tracking.store import check_reachable, resolve_tracking_uri


def store_client(uri: str) -> Any:
    """An ``MlflowClient`` on the store at ``uri``, once it answers.

    Raises:
      LmtError: if the store is a server that does not answer.
    """
    import mlflow

    check_reachable(uri)
    return mlflow.MlflowClient(uri)


def find_run(reference: str, uri: str | None = None) -> Any:
    """The MLflow run with id ``reference`` or, failing that, the newest run named
    ``reference``, in the store at ``uri`` (default: the store in force).

    Raises:
      LmtError: if there is no such run, or the store cannot be read.
    """
    import mlflow

    store = resolve_tracking_uri(uri)
    client = store_client(store)
    try:
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            return client.get_run(reference)
        experiments = [e.experiment_id for e in client.search_experiments()]
        named = client.search_runs(
            experiments, filter_string=f"attributes.run_name = '{reference}'",
            order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    except Exception as e:  # the store's own errors
        raise LmtError(f"cannot read the MLflow store {redact_uri(store)}: "
                       f"{error_line(e, store)}") from e
    if not named:
        raise LmtError(f"no MLflow run with id or name {reference!r} in {redact_uri(store)}")
    return named[0]


def child_run(uri: str, parent_id: str, run_name: str) -> Any:
    """The newest run named ``run_name`` nested under the run ``parent_id`` (a sweep's
    trial), or None."""
    client = store_client(uri)
    parent = client.get_run(parent_id)
    found = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                      f"attributes.run_name = '{run_name}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def has_artifacts(uri: str, run_id: str, path: str) -> bool:
    """Whether the run ``run_id`` logged anything under ``path``."""
    return bool(store_client(uri).list_artifacts(run_id, path))


def download_artifacts(uri: str, run_id: str, path: str, directory: str) -> str:
    """Downloads the run's artifacts under ``path`` into ``directory``; returns where
    they are."""
    return store_client(uri).download_artifacts(run_id, path, directory)


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
    from lmt_tf.models.saved import load_saved_model  # (TensorFlow: only when loading)

    path = Path(reference)
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise LmtError(f"{path} is not a SavedModel directory (no saved_model.pb)")
        return load_saved_model(path)
    import mlflow
    import mlflow.tensorflow

    store = resolve_tracking_uri(uri)
    client = store_client(store)
    mlflow.set_tracking_uri(store)
    model_uri = reference
    fallback = None
    if not reference.startswith(("runs:/", "models:/")):
        run_id = find_run(reference, store).info.run_id
        model_uri = f"runs:/{run_id}/model"
        # A run that logged no MLflow model (ExportConfig.mlflow_model off) but its
        # SavedModel: that, then.
        if any(a.path == "saved_model" for a in client.list_artifacts(run_id)):
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
                       f"{error_line(e, store)}") from e


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
            store_client(resolve_tracking_uri(uri))
            mlflow.set_tracking_uri(resolve_tracking_uri(uri))
            return mlflow.get_logged_model(reference.removeprefix("models:/")).source_run_id
        return find_run(reference, uri).info.run_id
    return None
