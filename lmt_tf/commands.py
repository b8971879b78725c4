"""What each ``lmt`` sub-command does with its parsed arguments. Heavy imports
(TensorFlow, MLflow, Optuna) happen inside the commands that need them."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from lmt_tf.errors import LmtError


def run(args: argparse.Namespace) -> int:
    """``lmt run``: one experiment in this process."""
    if args.allow_changes and not args.resume:
        raise LmtError("--allow-changes only applies to --resume")
    return _run_parsed(
        args, args.bindings, flower=(args.flower_server, None) if args.flower_server else None,
        resume=args.resume, dry_run=args.dry_run, run_name=args.run_name,
        allow_changes=args.allow_changes)


def evaluate(args: argparse.Namespace) -> int:
    """``lmt evaluate``: a logged model on an experiment's data, as a new run."""
    if "'" in args.model or "\\" in args.model:
        raise LmtError(f"a model reference cannot hold quotes or backslashes: {args.model!r}")
    return _run_parsed(args, [*args.bindings, "run_experiment.stages = [@evaluate()]",
                                  f"evaluate.model = '{args.model}'"])


def flower_client(args: argparse.Namespace) -> int:
    """``lmt flower-client``: one client of a Flower federation."""
    return _run_parsed(args, args.bindings, flower=(args.server, args.client))


def _run_parsed(args: argparse.Namespace, bindings: Sequence[str],
                    flower: tuple[str, int | None] | None = None, **options: Any) -> int:
    """Parses the experiment's gin files with ``bindings`` and runs it with ``options``
    (``RunOptions`` fields) and a Flower role (address, client or None for the server):
    ``lmt run``, ``lmt evaluate`` and ``lmt flower-client``."""
    from lmt_tf.runtime.env import import_tensorflow

    import_tensorflow()  # quiet, before anything imports TensorFlow
    _quiet_mlflow()
    from lmt_tf import config
    from lmt_tf.invocation import RunOptions

    files = [args.gin_file, *args.more_files]
    config.parse(files, bindings)
    config.run_parsed(options=RunOptions(
        config_files=files, bindings=list(bindings),
        # Line by line, also into a pipe (`| tee log`, a scheduler's log).
        echo=lambda line: print(line, flush=True),
        flower=_flower_role(args, *flower) if flower else None, **options))
    return 0


def _flower_role(args: argparse.Namespace, address: str, client: int | None) -> Any:
    """This process's part in a Flower deployment, checked before the run starts: its
    TLS (the --tls-* flags over FlowerTLS in gin) and, for the server, that it can
    listen on ``address``."""
    from lmt_tf import config
    from lmt_tf.federated.transport import FlowerTLS, check_listen, secured
    from lmt_tf.invocation import FlowerRole

    flags = FlowerTLS(getattr(args, "tls_ca", None), getattr(args, "tls_cert", None),
                      getattr(args, "tls_key", None))
    tls = secured(address, config.configured(FlowerTLS).overridden_by(flags),
                  getattr(args, "insecure", False), server=client is None)
    if client is None:
        check_listen(address)
    return FlowerRole(address, client, tls)


def federate(args: argparse.Namespace) -> int:
    """``lmt federate``: a Flower server and its client processes."""
    from lmt_tf.federated.deploy import Deployment, deploy
    from lmt_tf.runtime.launcher import project_file

    for file in [args.gin_file, *args.more_files]:
        project_file(file)
    job = Deployment(_gin_args(args), args.clients, args.timeout, args.run_name, args.resume,
                     args.allow_changes)
    return deploy(job, echo=lambda line: print(line, flush=True),
                  echo_error=lambda line: print(line, file=sys.stderr, flush=True))


def _gin_args(args: argparse.Namespace) -> list[str]:
    """The gin file and the --gin_file/--gin_param arguments, to pass on to a process."""
    gin_args = [args.gin_file]
    for file in args.more_files:
        gin_args += ["--gin_file", file]
    for binding in args.bindings:
        gin_args += ["--gin_param", binding]
    return gin_args


def _echo(line: str) -> None:
    """A line of output, flushed at once (also into a pipe)."""
    print(line, flush=True)


def _quiet_mlflow() -> None:
    """MLflow's INFO lines (database migrations on first use) are not the user's concern;
    MLFLOW_LOGGING_LEVEL set by the user wins."""
    import logging

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())


def shard(args: argparse.Namespace) -> int:
    """``lmt shard``: a data source written into sharded TFRecord files."""
    from lmt_tf.runtime.env import import_tensorflow

    import_tensorflow()
    from lmt_tf import config
    from lmt_tf.data.tfrecord import write_shards

    config.parse(args.more_files, args.bindings)
    source = config.configurable(args.source)
    manifest = write_shards(source(), args.output, args.shards,
                            echo=lambda line: print(line, flush=True))
    print(f"lmt shard: wrote {manifest}; read it with run_experiment.data = @load_tfrecords "
          f"and load_tfrecords.directory = '{args.output}'")
    return 0


def launch(args: argparse.Namespace) -> int:
    """``lmt launch``: an experiment on a local multi-process cluster."""
    from lmt_tf.runtime import launcher

    for file in [args.gin_file, *args.more_files]:
        launcher.project_file(file)
    run_args = _gin_args(args)
    if args.allow_changes:
        run_args.append("--allow-changes")
    from lmt_tf.runtime.memory import parse_size

    job = launcher.Job(run_args, args.workers, args.ps, args.restarts, args.timeout,
                       args.evaluator, resume=args.resume, run_name=args.run_name,
                       network=args.network, gpus_per_worker=args.gpus_per_worker,
                       share_gpus=args.share_gpus,
                       task_memory=parse_size(args.task_memory) if args.task_memory else None)
    return launcher.launch(job, echo=lambda line: print(line, flush=True),
                           echo_error=lambda line: print(line, file=sys.stderr, flush=True))


def ui(args: argparse.Namespace) -> int:
    """``lmt ui``: the MLflow UI on 127.0.0.1 for the run store."""
    from lmt_tf.runtime.processes import watched_module
    from lmt_tf.tracking.credentials import redact_uri
    from lmt_tf.tracking.store import DEFAULT_ARTIFACTS, end_orphaned_runs, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    if uri.startswith(("http://", "https://")):
        print(f"lmt: {redact_uri(uri)} is an MLflow server already; open "
              f"{redact_uri(uri)}/#/experiments")
        return 0
    _check_port_free(args.port)
    _quiet_mlflow()
    end_orphaned_runs(uri, "lmt ui", echo=_echo)
    command = watched_module("mlflow", "server", "--backend-store-uri", uri,
                             "--default-artifact-root", os.path.abspath(DEFAULT_ARTIFACTS),
                             "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1")
    print(f"lmt: MLflow UI for {uri}\n  runs: http://127.0.0.1:{args.port}/#/experiments\n"
          f"  (Ctrl-C stops it)", flush=True)
    return _serve(command)


def _serve(command: list[str]) -> int:
    """Runs a server (a ``watched_module``) until it exits or lmt is stopped (Ctrl-C,
    SIGTERM, even SIGKILL: the server watches lmt), which stops it."""
    from lmt_tf.runtime.processes import child_environment, stop_process_groups

    # Its own session, so that stopping lmt stops the whole server, children included.
    server = subprocess.Popen(command, start_new_session=True, env=child_environment({}))
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_process_groups([server])


def sweep(args: argparse.Namespace) -> int:
    """``lmt sweep``: a grid or a search over bindings, on Optuna."""
    from lmt_tf.runtime.env import import_tensorflow

    import_tensorflow()
    _quiet_mlflow()
    from lmt_tf import config
    from lmt_tf.runtime.launcher import project_file
    from lmt_tf.sweep.driver import Sweep, run_sweep
    from lmt_tf.sweep.preflight import check_metric
    from lmt_tf.sweep.space import parse_dimension
    from lmt_tf.tracking.config import TrackingConfig
    from lmt_tf.tracking.store import open_store

    files = [args.gin_file, *args.more_files]
    for file in files:
        project_file(file)
    dimensions = ([parse_dimension(text, grid=True) for text in args.grid]
                  + [parse_dimension(text, grid=False) for text in args.search])
    # Before any trial: every value of every dimension (the others at their first) is
    # parsed by gin and taken by the experiment's configs; the metric is checked against
    # what the experiment logs. The first values are parsed last: the sweep reads its
    # tracking settings from that config.
    first = {d.key: d.every_value()[0] for d in dimensions}
    for key, value in [(None, None), *((d.key, v) for d in dimensions
                                       for v in d.every_value()[1:]), (None, None)]:
        point = {**first, key: value} if key else first
        config.parse(files, [*args.bindings, *(f"{k} = {v}" for k, v in point.items())])
        stages, metrics = _sweep_experiment(config, f"with {key} = {value}: " if key else "")
        if not key:
            check_metric(args.metric, stages, metrics, args.prune)
    tracking = config.configured(TrackingConfig)
    open_store(tracking.tracking_uri, f"lmt sweep (pid {os.getpid()})", _echo)
    job = Sweep(_gin_args(args), config.experiment_name(files), dimensions, args.trials,
                args.sampler, args.metric, args.direction, args.parallel, args.prune,
                tracking, args.quiet, args.gpus_per_trial, args.share_gpus)
    return run_sweep(job, echo=_echo,
                     echo_error=lambda line: print(line, file=sys.stderr, flush=True))


def _sweep_experiment(config: Any, where: str) -> tuple[list[str], list[str]]:
    """The names of the parsed experiment's stages and its ``TrainConfig.metrics``, from
    its gin root (configs and stages made; no data, model or strategy).

    Raises:
      ConfigError: in one line, after ``where``, for bindings the experiment's configs
        refuse.
    """
    from lmt_tf.errors import ConfigError
    from lmt_tf.stages import default_stages

    try:
        experiment = config.experiment()
    except (LmtError, TypeError, ValueError, RuntimeError, AttributeError, KeyError) as e:
        # (gin adds "In call to configurable ..." lines to the error's own)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ConfigError(f"{where}{lines[0] if lines else type(e).__name__}") from e
    stages = experiment.stages if experiment.stages is not None else default_stages()
    if not isinstance(stages, (list, tuple)):
        raise ConfigError(f"run_experiment.stages must be a list of stages such as "
                          f"[@train(), @export()], got {stages!r}")
    return ([str(getattr(stage, "name", stage)) for stage in stages],
            [str(m) for m in experiment.configs.train.metrics])


def compare(args: argparse.Namespace) -> int:
    """``lmt compare``: runs side by side, as a report."""
    from pathlib import Path

    from lmt_tf.compare import UNFINISHED_MARK, select_runs, write_report
    from lmt_tf.rundir import safe_name
    from lmt_tf.tracking.read import store_client
    from lmt_tf.tracking.store import open_store

    _quiet_mlflow()
    uri = open_store(args.tracking_uri, f"lmt compare (pid {os.getpid()})", _echo)
    client = store_client(uri)
    runs = select_runs(client, uri, args.experiment, args.parent, args.run_ids)
    # (--output is a path the user chose; a run's or experiment's name is made one.)
    name = safe_name(args.parent or args.experiment or "runs")
    directory = Path(args.output or Path("lmt_compare") / name)
    report = write_report(client, runs, directory, args.metrics)
    if args.parent:
        client.log_artifacts(args.parent, str(directory), "compare")
    differ = (f"{len(report.params)} param differs" if len(report.params) == 1
              else f"{len(report.params)} params differ")
    unfinished = (f"; {len(report.unfinished)} did not finish (their last values are "
                  f"marked {UNFINISHED_MARK})" if report.unfinished else "")
    print(f"lmt compare: {len(runs)} runs; {differ}; "
          f"{len(report.plots)} plot(s){unfinished}\n  {report.markdown}\n  {report.html}"
          + (f"\n  logged to run {args.parent} under compare/" if args.parent else ""))
    return 0


def tensorboard(args: argparse.Namespace) -> int:
    """``lmt tensorboard``: a run's TensorBoard logs, served on 127.0.0.1."""
    import tempfile

    from lmt_tf.runtime.processes import watched_module
    from lmt_tf.tracking.read import download_artifacts, find_run, has_artifacts
    from lmt_tf.tracking.store import open_store

    _check_port_free(args.port)
    _quiet_mlflow()
    uri = open_store(args.tracking_uri, f"lmt tensorboard (pid {os.getpid()})", _echo)
    run = find_run(args.run, uri)
    if not has_artifacts(uri, run.info.run_id, "tensorboard"):
        raise LmtError(f"run {run.info.run_id} has no TensorBoard logs (run it with "
                       f"TrackingConfig.tensorboard = True)")
    with tempfile.TemporaryDirectory(prefix="lmt-tensorboard-") as scratch:
        logs = download_artifacts(uri, run.info.run_id, "tensorboard", scratch)
        command = watched_module("tensorboard.main", "--logdir", logs,
                                 "--host", "127.0.0.1", "--port", str(args.port))
        print(f"lmt: TensorBoard for run {run.info.run_id} ({run.info.run_name})\n"
              f"  http://127.0.0.1:{args.port}/\n  (Ctrl-C stops it)", flush=True)
        return _serve(command)


def _check_port_free(port: int) -> None:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise LmtError(f"port {port} on 127.0.0.1 is in use ({e.strerror}); "
                           f"choose another with --port") from e
