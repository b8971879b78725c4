"""The ``lmt`` command: its arguments, and how it ends (one line and exit status 2 for a
user error; every status from ``process``). What each sub-command does is in
``commands``; TensorFlow is imported only by those that need it, so ``lmt --help``
answers at once."""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import lmt_tf
from lmt_tf import commands
from lmt_tf.errors import LmtError
from lmt_tf.process import EXIT_FAILED, EXIT_USER_ERROR, Stopped, exit_status, watch_parent
from lmt_tf.tracking.credentials import redacted_output


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end like every other user error: one line, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"lmt: error: {message} (see {self.prog} --help)\n")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be a number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {port}")
    return port


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lmt", description="Declarative TensorFlow experiments, tracked in MLflow.")
    parser.add_argument("--version", action="version", version=f"lmt_tf {lmt_tf.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gin_options = _Parser(add_help=False)
    gin_options.add_argument("--gin_file", dest="more_files", action="append", default=[],
                             metavar="FILE", help="a gin file, parsed after any before it")
    gin_options.add_argument("--gin_param", dest="bindings", action="append", default=[],
                             metavar="BINDING", help="a binding such as 'TrainConfig.epochs=3'")

    run_options = _Parser(add_help=False, parents=[gin_options])
    run_options.add_argument("gin_file", help="experiment file, e.g. experiments/quickstart.gin")
    run_options.add_argument("--resume", action="store_true",
                             help="continue the latest run of this experiment (or the run "
                                  "named by --run-name) from its last checkpoint, in the "
                                  "same MLflow run; refused if the bindings changed")
    run_options.add_argument("--allow-changes", action="store_true",
                             help="with --resume: accept changed bindings; the run keeps "
                                  "its original config and records the changes beside it")
    run_options.add_argument("--run-name", default=None, metavar="NAME",
                             help="name of the run directory (default: experiment and time)")
    run_options.add_argument("--traceback", action="store_true",
                             help="print the full traceback of a configuration or input error")

    _experiment_commands(commands, gin_options, run_options)
    _store_commands(commands, gin_options)
    return parser


def _experiment_commands(commands: Any, gin_options: argparse.ArgumentParser,
                         run_options: argparse.ArgumentParser) -> None:
    """The commands that run an experiment: run, evaluate, federate, flower-client,
    launch."""
    run = commands.add_parser("run", parents=[run_options],
                              help="run an experiment from gin files",
                              description="Train, evaluate and export one experiment; "
                                          "every run is logged to MLflow. Inside a cluster "
                                          "(TF_CONFIG set) the task's role comes from it.")
    run.add_argument("--dry-run", action="store_true",
                     help="print the resolved config, strategy, data and model; train nothing")
    run.add_argument("--flower-server", default=None, metavar="HOST:PORT",
                     help="run the federate stage as a Flower server listening on HOST:PORT, "
                          "for clients started with `lmt flower-client`")
    _tls_options(run, server=True)
    evaluate = commands.add_parser(
        "evaluate", parents=[gin_options], help="evaluate a logged model on an experiment's data",
        description="Evaluate a model on the test split of an experiment's data (per-class "
                    "scores, confusion matrix, calibration, robustness, latency); logged as "
                    "a new MLflow run tagged with the evaluated model.")
    evaluate.add_argument("model", help="a run id or name, an MLflow model URI "
                                        "(models:/m-..., runs:/ID/model) or a SavedModel path")
    evaluate.add_argument("gin_file", help="the experiment whose data (and evaluate settings) "
                                           "to use")
    evaluate.add_argument("--traceback", action="store_true",
                          help="print the full traceback of a configuration or input error")
    federate = commands.add_parser(
        "federate", parents=[run_options],
        help="run a federated experiment as a Flower server and client processes",
        description="Start a Flower server (`lmt run --flower-server`, which logs the MLflow "
                    "run) and N client processes (`lmt flower-client`) on 127.0.0.1; each "
                    "client loads only its own part of the data.")
    federate.add_argument("--clients", type=int, required=True,
                          help="client processes (sets PartitionConfig.clients)")
    federate.add_argument("--timeout", type=float, default=0,
                          help="seconds before the job is stopped (default: none)")
    client = commands.add_parser(
        "flower-client", parents=[gin_options], help="serve one client of a Flower federation",
        description="Train client K's part of the experiment's data whenever the Flower "
                    "server at --server asks; exits when the server ends the federation.")
    client.add_argument("gin_file", help="the server's experiment file")
    client.add_argument("--server", required=True, metavar="HOST:PORT",
                        help="the Flower server's address")
    client.add_argument("--client", type=int, required=True, metavar="K",
                        help="which client this is, 0 <= K < PartitionConfig.clients")
    _tls_options(client, server=False)

    launch = commands.add_parser(
        "launch", parents=[run_options], help="run an experiment on a local multi-process cluster",
        description="Start a real cluster of `lmt run` processes on 127.0.0.1, one per task, "
                    "with TF_CONFIG each. Without --ps: multi-worker mirrored training; with "
                    "--ps: parameter-server training with a chief (coordinator).")
    launch.add_argument("--workers", type=int, required=True, help="worker tasks (>= 1)")
    launch.add_argument("--ps", type=int, default=0, help="parameter-server tasks")
    launch.add_argument("--restarts", type=int, default=0,
                        help="restart a failed cluster up to K times, resuming the run")
    launch.add_argument("--timeout", type=float, default=0,
                        help="seconds before an attempt is stopped (default: none)")
    launch.add_argument("--gpus-per-worker", type=int, default=None, metavar="N",
                        help="GPUs each worker takes (default: the visible GPUs split "
                             "evenly; 0: train on the CPU); ps tasks and a ps chief take "
                             "none")
    launch.add_argument("--share-gpus", action="store_true",
                        help="let more workers than GPUs share them (memory growth on)")
    launch.add_argument("--evaluator", action="store_true",
                        help="add a side-car evaluator task that validates each checkpoint")
    launch.add_argument("--network", choices=("isolated", "host"), default="isolated",
                        help="isolated (default): the tasks run in a network namespace of "
                             "the job's own, unreachable from other hosts; host: this "
                             "machine's network (needed to reach a tracking server)")
    launch.add_argument("--task-memory", default=None, metavar="SIZE",
                        help="memory each task may use, e.g. 2G or 512M: checked before "
                             "training against each task's share of the variables and "
                             "optimizer slots, and enforced with a memory cgroup per task "
                             "where lmt may write them (else measured and reported)")



def _tls_options(parser: argparse.ArgumentParser, server: bool) -> None:
    """TLS of a Flower server (``lmt run --flower-server``) or client; PEM files."""
    parser.add_argument("--tls-ca", default=None, metavar="FILE",
                        help="TLS: the CA certificate that signed the Flower server's "
                             "certificate (FlowerTLS.ca_certificate)")
    if server:
        parser.add_argument("--tls-cert", default=None, metavar="FILE",
                            help="TLS: the Flower server's certificate "
                                 "(FlowerTLS.server_certificate)")
        parser.add_argument("--tls-key", default=None, metavar="FILE",
                            help="TLS: its private key (FlowerTLS.server_key)")
    parser.add_argument("--insecure", action="store_true",
                        help="accept plaintext to or from another machine (without TLS, "
                             "only 127.0.0.1 and localhost are allowed)")


def _store_commands(commands: Any, gin_options: argparse.ArgumentParser) -> None:
    """The commands around runs and data: shard, ui, sweep, compare, tensorboard."""
    shard = commands.add_parser(
        "shard", parents=[gin_options], help="write a data source into sharded TFRecord files",
        description="Write the train/validation/test splits of a data source into N TFRecord "
                    "files each (plus manifest.json), for @load_tfrecords and FILE sharding.")
    shard.add_argument("source", help="a data source configurable, e.g. load_mnist")
    shard.add_argument("--shards", type=int, required=True, help="files per split")
    shard.add_argument("--output", required=True, help="new directory for the files")

    ui = commands.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for the run store")
    ui.add_argument("--port", type=_port, default=5000)
    ui.add_argument("--tracking-uri", default=None,
                    help="store to show (default: $MLFLOW_TRACKING_URI or ./mlruns.db)")
    sweep = commands.add_parser(
        "sweep", parents=[gin_options], help="a grid or a search over bindings, on Optuna",
        description="Run `lmt run FILE` once per trial, each with its bindings, nested under "
                    "one parent MLflow run. The Optuna study is kept in ./lmt_sweeps.db: the "
                    "same command again resumes it (finished trials are kept, failed ones "
                    "run again).")
    sweep.add_argument("gin_file", help="experiment file")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=[V1,V2,...]",
                       help="a binding's values to try, in gin syntax (repeatable)")
    sweep.add_argument("--search", action="append", default=[], metavar="KEY=KIND(...)",
                       help="a binding's range: uniform(a,b), loguniform(a,b), int(a,b), "
                            "choice(v1,v2,...) (repeatable)")
    sweep.add_argument("--trials", type=int, default=0, help="trials of a search")
    sweep.add_argument("--sampler", default="tpe", help="search sampler: tpe or random")
    sweep.add_argument("--metric", default="val_accuracy",
                       help="the final metric of each run to optimise (default val_accuracy)")
    sweep.add_argument("--direction", default="maximize", help="maximize or minimize")
    sweep.add_argument("--parallel", type=int, default=1, help="trials at once (processes)")
    sweep.add_argument("--gpus-per-trial", type=int, default=None, metavar="N",
                       help="GPUs each trial takes (default: the visible GPUs split over "
                            "--parallel; 0: the CPU)")
    sweep.add_argument("--share-gpus", action="store_true",
                       help="let more parallel trials than GPUs share them")
    sweep.add_argument("--prune", action="store_true",
                       help="stop trials whose per-epoch --metric is below the median "
                            "(Optuna's median pruner)")
    sweep.add_argument("--quiet", action="store_true", help="print only the summary")
    compare = commands.add_parser(
        "compare", help="compare runs: metric curves, differing params, final metrics",
        description="Fetch runs from the tracking store and write a report: a PNG of each "
                    "per-epoch metric (one line per run) and a table of the params that "
                    "differ and the final metrics, as Markdown and HTML. With --parent the "
                    "report is also logged as artifacts of that run.")
    compare.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="runs to compare")
    compare.add_argument("--experiment", default=None, help="every run of this experiment")
    compare.add_argument("--parent", default=None, metavar="RUN_ID",
                         help="the child runs of this run (a sweep)")
    compare.add_argument("--metric", dest="metrics", action="append", default=[],
                         help="plot only this metric (repeatable)")
    compare.add_argument("--output", default=None,
                         help="directory of the report (default: lmt_compare/<name>)")
    compare.add_argument("--tracking-uri", default=None,
                         help="store of the runs (default: $MLFLOW_TRACKING_URI or ./mlruns.db)")
    board = commands.add_parser(
        "tensorboard", help="serve a run's TensorBoard logs on 127.0.0.1",
        description="Download the tensorboard/ artifacts of a run (TrackingConfig.tensorboard "
                    "= True) and serve them with TensorBoard on 127.0.0.1.")
    board.add_argument("run", help="the run's id or name")
    board.add_argument("--port", type=_port, default=6006)
    board.add_argument("--tracking-uri", default=None,
                       help="store of the run (default: $MLFLOW_TRACKING_URI or ./mlruns.db)")


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _commands() -> dict[str, Callable[[argparse.Namespace], int]]:
    return {"run": commands.run, "launch": commands.launch, "federate": commands.federate,
            "flower-client": commands.flower_client, "shard": commands.shard,
            "ui": commands.ui, "tensorboard": commands.tensorboard,
            "compare": commands.compare, "sweep": commands.sweep,
            "evaluate": commands.evaluate}


def _error_line(error: BaseException) -> str:
    """The one line ``lmt`` ends with on ``error``."""
    if isinstance(error, Stopped):  # a preemption says where its checkpoint is, ...
        return f"lmt: {error}"
    if isinstance(error, KeyboardInterrupt):  # ... Ctrl-C needs no explanation
        return "lmt: interrupted"
    if isinstance(error, OSError) and not isinstance(error, LmtError):
        where = f": {error.filename}" if error.filename else ""
        reason = error.strerror or (str(error).splitlines() or [type(error).__name__])[0]
        return f"lmt: error: {reason}{where}"
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"lmt: error: {message}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lmt``; returns the process exit status. Everything it prints,
    a traceback too, goes through ``credentials.redacted_output``; a child ``lmt``
    process stops when the process that started it is gone (``process.watch_parent``)."""
    watch_parent()
    with redacted_output():
        try:
            return _main(argv)
        except Exception:  # a bug: its traceback, as Python prints it, but redacted
            traceback.print_exc()
            return EXIT_FAILED


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (one line, status 2)
        return e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    # A scheduler's SIGTERM ends a run like Ctrl-C: KILLED in MLflow, checkpoints kept.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return _commands()[args.command](args)
    except (LmtError, KeyboardInterrupt, OSError) as e:
        # The file system refusing a path the user chose (permissions, a file where a
        # directory belongs, a full disk) is the user's to fix, not a traceback.
        if not isinstance(e, KeyboardInterrupt) and getattr(args, "traceback", False):
            traceback.print_exc()
        print(_error_line(e), file=sys.stderr)
        return exit_status(e)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
