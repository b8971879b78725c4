"""The contract between an ``lmt`` process and the ``lmt`` processes it starts (cluster
tasks, Flower clients, sweep trials): how a child is built, the environment variables
that tell it its part, the exceptions it stops with and the exit statuses they become."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from lmt_tf.errors import LmtError

EXIT_OK = 0
EXIT_FAILED = 1  # an unexpected error (a traceback)
EXIT_USER_ERROR = 2  # a configuration or input error: running it again cannot help
EXIT_PRUNED = 3  # a sweep's trial stopped early by the sweep's pruner
EXIT_TIMEOUT = 124  # a job stopped after its --timeout (as timeout(1) exits)
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM (128 + SIGINT)

# Set by `lmt launch` in every task's environment: a file where the chief names the
# MLflow run it made (read back to end that run if the job is stopped, and to resume it
# by name), and the job's network mode (an unreachable tracking server's error then
# says why).
JOB_FILE_ENV = "LMT_JOB_FILE"
JOB_NETWORK_ENV = "LMT_JOB_NETWORK"
# Set by `lmt launch --task-memory` in every task's environment: the bytes each task may
# use, against which a task's pre-flight size check compares its share of the model
# (without it, `lmt run` compares against the machine's memory).
TASK_MEMORY_ENV = "LMT_TASK_MEMORY"
# Set by `lmt sweep` for its trials: the MLflow run they are nested under, and (JSON)
# the Optuna trial a pruned sweep's child reports each epoch to.
PARENT_RUN_ENV = "LMT_PARENT_RUN_ID"
TRIAL_ENV = "LMT_SWEEP_TRIAL"
# Set by `runtime.processes` for every child it starts: the pid of the process that
# started it. A child outlives no parent: once that process is gone (even killed with
# SIGKILL, which it cannot pass on) the child stops as if its parent had stopped it.
PARENT_PID_ENV = "LMT_PARENT_PID"
ORPHAN_POLL_SECONDS = 0.5
ORPHAN_GRACE_SECONDS = 60.0  # after its SIGTERM, before an orphan kills itself


class Stopped(KeyboardInterrupt):
    """A run stopped on purpose, saying why. A KeyboardInterrupt, so the run ends KILLED
    like on Ctrl-C; ``lmt`` prints its message instead of ``interrupted``."""


class Pruned(Stopped):
    """A trial stopped by the sweep's pruner: its run ends KILLED, ``lmt run`` exits 3."""


class Preempted(Stopped):
    """Training stopped on a preemption signal, after every worker saved a checkpoint:
    the run ends KILLED, ``lmt run`` exits 130."""


def lmt_command(command: str, *args: str) -> list[str]:
    """The command line of a child ``lmt`` process: ``lmt COMMAND ARGS`` run by this
    interpreter, so that the child runs the same lmt_tf as its parent.

    Args:
      command: the sub-command (``run``, ``flower-client``, ...).
      *args: its arguments.
    """
    return [sys.executable, "-m", "lmt_tf.cli", command, *args]


def exit_status(error: BaseException) -> int:
    """The exit status of an ``lmt`` process that stops with ``error``, by its type: 3
    for ``Pruned``; 130 for any other interruption (Ctrl-C, SIGTERM, ``Preempted``); 2
    for a user error (``LmtError``, or the file system refusing a path the user chose);
    1 for anything else."""
    if isinstance(error, Pruned):
        return EXIT_PRUNED
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, (LmtError, OSError)):
        return EXIT_USER_ERROR
    return EXIT_FAILED


def watch_parent() -> None:
    """Makes this process stop when the process named by ``PARENT_PID_ENV`` is gone.

    A thread polls the parent pid; when this process has been re-parented (its parent
    exited, however), it sends SIGTERM, as its parent would have stopped it, to its
    process group if it leads one (its own children with it), else to itself: a run ends
    KILLED (a training task first saves a checkpoint); SIGKILL follows if it is still
    alive after ``ORPHAN_GRACE_SECONDS``. The variable is taken out of the environment, so processes
    this one starts on its own do not watch a process that is not their parent. Polling
    (rather than Linux's ``PR_SET_PDEATHSIG``, which fires when the parent *thread* that
    started the child ends) does not care which of the parent's threads started it.
    """
    expected = os.environ.pop(PARENT_PID_ENV, "")
    if not expected.isdigit():
        return
    parent = int(expected)

    def stop(signum: int) -> None:
        if os.getpgid(0) == os.getpid():
            os.killpg(os.getpid(), signum)
        else:
            os.kill(os.getpid(), signum)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_POLL_SECONDS)
        stop(signal.SIGTERM)
        time.sleep(ORPHAN_GRACE_SECONDS)
        stop(signal.SIGKILL)

    threading.Thread(target=watch, name="lmt-parent-watch", daemon=True).start()
