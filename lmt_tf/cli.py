"""The ``lmt`` command: argument parsing only. TensorFlow is imported only by the
sub-commands that need it, so ``lmt --help`` answers at once."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Sequence

import lmt_tf
from lmt_tf.errors import LmtError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmt", description="Declarative TensorFlow experiments, tracked in MLflow.")
    parser.add_argument("--version", action="version", version=f"lmt_tf {lmt_tf.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run an experiment from gin files",
                              description="Train, evaluate and export one experiment; "
                                          "every run is logged to MLflow.")
    run.add_argument("gin_file", help="experiment file, e.g. experiments/quickstart.gin")
    run.add_argument("--gin_file", dest="more_files", action="append", default=[],
                     metavar="FILE", help="another gin file, parsed after the first")
    run.add_argument("--gin_param", dest="bindings", action="append", default=[],
                     metavar="BINDING", help="a binding such as 'TrainConfig.epochs=3'")
    run.add_argument("--resume", action="store_true",
                     help="continue the latest run of this experiment from its last "
                          "checkpoint, in the same MLflow run")
    run.add_argument("--dry-run", action="store_true",
                     help="print the resolved config, strategy, data and model; train nothing")
    run.add_argument("--traceback", action="store_true",
                     help="print the full traceback of a configuration or input error")

    ui = commands.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for the run store")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--tracking-uri", default=None,
                    help="store to show (default: $MLFLOW_TRACKING_URI or ./mlruns.db)")
    return parser


def _run(args: argparse.Namespace) -> int:
    from lmt_tf.runtime.env import import_tensorflow

    import_tensorflow()
    from lmt_tf import config
    from lmt_tf.experiment import RunOptions, run_experiment

    files = [args.gin_file, *args.more_files]
    config.parse(files, args.bindings)
    options = RunOptions(config_files=files, bindings=args.bindings, resume=args.resume,
                         dry_run=args.dry_run)
    run_experiment(options=options)
    return 0


def _ui(args: argparse.Namespace) -> int:
    from lmt_tf.tracking import DEFAULT_ARTIFACTS, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    if uri.startswith(("http://", "https://")):
        print(f"lmt: {uri} is an MLflow server already; open {uri}/#/experiments")
        return 0
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--default-artifact-root", os.path.abspath(DEFAULT_ARTIFACTS),
               "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]
    _check_port_free(args.port)
    print(f"lmt: MLflow UI for {uri}\n  runs: http://127.0.0.1:{args.port}/#/experiments\n"
          f"  (Ctrl-C stops it)", flush=True)
    # Its own session, so that stopping lmt (Ctrl-C, SIGTERM) stops the whole server.
    server = subprocess.Popen(command, start_new_session=True)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(server)


def _stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    """Ends ``process`` and its process group: SIGTERM, then SIGKILL after ``grace`` s."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _check_port_free(port: int) -> None:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise LmtError(f"port {port} on 127.0.0.1 is in use ({e.strerror}); "
                           f"choose another with --port") from e


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lmt``; returns the process exit status."""
    args = _parser().parse_args(argv)
    # A scheduler's SIGTERM ends a run like Ctrl-C: KILLED in MLflow, checkpoints kept.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return {"run": _run, "ui": _ui}[args.command](args)
    except LmtError as e:
        if getattr(args, "traceback", False):
            traceback.print_exc()
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"lmt: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("lmt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
