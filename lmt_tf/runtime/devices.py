"""The device plan: which GPUs each task of a job may use, decided before any task starts
from the GPUs this host shows and the job's shape, so that no two tasks reserve the
same GPU's memory unasked and no GPU sits idle unnoticed.

Pure functions of (visible GPUs, job shape, choice): testable on a machine without a GPU.
Each task learns its part through its environment: ``CUDA_VISIBLE_DEVICES`` (``-1``: no
GPU at all) and, where tasks share a host's GPUs, ``TF_FORCE_GPU_ALLOW_GROWTH=true``
(TensorFlow otherwise reserves nearly all of every GPU it sees).

The rules:
- ps tasks and a parameter-server chief (the coordinator) get no GPU: they hold
  variables and schedule steps; the workers compute.
- Workers get ``gpus_per_worker`` GPUs each (default: the visible GPUs split evenly);
  more workers than GPUs is refused unless sharing is chosen (``share``: GPUs dealt
  round-robin, memory growth on).
- A side-car evaluator gets a GPU of its own if one is left, else none.
- Sweep trials run side by side get a slice each, as workers do; Flower clients share
  the GPUs round-robin (federations have more clients than GPUs), memory growth on.
- The collective of multi-worker all-reduce is NCCL where workers have GPUs, RING on
  CPUs; ``multi_worker_mirrored_strategy.communication`` still overrides it.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lmt_tf.errors import ConfigError

HIDDEN = "-1"  # CUDA_VISIBLE_DEVICES that shows no GPU
GROWTH_ENV = "TF_FORCE_GPU_ALLOW_GROWTH"


def visible_gpus(environ: Mapping[str, str] | None = None,
                 device_nodes: Sequence[str] | None = None) -> tuple[str, ...]:
    """The GPUs this process may hand out, by CUDA's ids: those named by
    ``CUDA_VISIBLE_DEVICES`` if it is set (none for ``-1`` or empty), else one per NVIDIA
    device node (``/dev/nvidia0``, ...). Found without importing TensorFlow, which would
    reserve the GPUs' memory in the parent of the tasks."""
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        listed = [g.strip() for g in environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
        # CUDA stops at the first invalid id (-1 hides every GPU).
        valid = []
        for gpu in listed:
            if gpu.startswith("-"):
                break
            valid.append(gpu)
        return tuple(valid)
    nodes = nvidia_device_nodes() if device_nodes is None else device_nodes
    return tuple(str(i) for i in range(len(nodes)))


def nvidia_device_nodes() -> list[str]:
    """The NVIDIA GPU device nodes of this host (``/dev/nvidia0``, ...)."""
    return sorted(n for n in glob.glob("/dev/nvidia[0-9]*") if n[len("/dev/nvidia"):].isdigit())


@dataclass(frozen=True)
class TaskDevices:
    """One task's part of the host's GPUs."""

    task: str  # e.g. worker:0, ps:0, chief:0, evaluator:0, trial:2, client:1
    gpus: tuple[str, ...] = ()
    memory_growth: bool = False  # the task shares a GPU or the host: allocate as needed

    def environment(self) -> dict[str, str]:
        """What the task's process environment gets."""
        env = {"CUDA_VISIBLE_DEVICES": ",".join(self.gpus) or HIDDEN}
        if self.memory_growth:
            env[GROWTH_ENV] = "true"
        return env

    def describe(self) -> str:
        shown = "GPU " + ",".join(self.gpus) if self.gpus else "CPU"
        return f"{self.task}: {shown}" + (" (memory growth)" if self.memory_growth else "")


@dataclass(frozen=True)
class DevicePlan:
    """Every task's devices, and the all-reduce the workers use."""

    gpus: tuple[str, ...]  # the host's GPUs the plan handed out
    tasks: tuple[TaskDevices, ...]
    collective: str  # nccl | ring: what communication='auto' resolves to

    def task(self, name: str) -> TaskDevices:
        return next(t for t in self.tasks if t.task == name)

    def describe(self) -> str:
        """One line: ``2 GPU(s); worker:0: GPU 0, worker:1: GPU 1; all-reduce nccl``."""
        return (f"{len(self.gpus)} GPU(s); " + ", ".join(t.describe() for t in self.tasks)
                + f"; all-reduce {self.collective}")


def _slices(gpus: Sequence[str], tasks: int, per_task: int | None, share: bool,
            what: str) -> list[tuple[tuple[str, ...], bool]]:
    """Each of ``tasks`` tasks' GPUs and whether it shares them."""
    if per_task is not None and per_task < 0:
        raise ConfigError(f"--gpus-per-{what} must be >= 0, got {per_task}")
    if not gpus or per_task == 0:
        return [((), False)] * tasks
    if share:
        count = per_task or 1
        dealt = [tuple(gpus[(i * count + j) % len(gpus)] for j in range(count))
                 for i in range(tasks)]
        shared = tasks * count > len(gpus)
        return [(d, shared) for d in dealt]
    count = per_task if per_task is not None else len(gpus) // tasks
    if count == 0 or tasks * count > len(gpus):
        want = tasks * (count or 1)
        raise ConfigError(
            f"{tasks} {what}(s) need {want} GPU(s) but this host shows {len(gpus)}; give "
            f"--gpus-per-{what} 0 (train on the CPU), fewer {what}s, or --share-gpus (each "
            f"GPU shared by several {what}s, memory growth on)")
    return [(tuple(gpus[i * count:(i + 1) * count]), False) for i in range(tasks)]


def plan_single(gpus: Sequence[str], mirrored: bool) -> DevicePlan:
    """The plan of one ``lmt run`` process: ``@mirrored_strategy`` uses every visible GPU;
    the default strategy is pinned to the first (TensorFlow's default would compute on
    GPU:0 while reserving the memory of all of them)."""
    gpus = tuple(gpus)
    mine = gpus if mirrored else gpus[:1]
    return DevicePlan(mine, (TaskDevices("chief:0", mine),), "nccl" if mine else "ring")


def plan_cluster(gpus: Sequence[str], workers: int, ps: int = 0, evaluator: bool = False,
                 gpus_per_worker: int | None = None, share: bool = False) -> DevicePlan:
    """The plan of an ``lmt launch`` job: multi-worker mirrored (``ps`` 0; worker 0 is
    the chief) or parameter servers (a chief coordinating ``workers`` and ``ps``).

    Raises:
      ConfigError: for more workers than GPUs without ``share`` (or an explicit 0).
    """
    gpus = tuple(gpus)
    tasks: list[TaskDevices] = []
    if ps:
        tasks.append(TaskDevices("chief:0"))
    slices = _slices(gpus, workers, gpus_per_worker, share, "worker")
    for i, (mine, shared) in enumerate(slices):
        # Tasks of one job share the host: growth keeps one from reserving what it
        # does not use, wherever a GPU serves more than one task.
        tasks.append(TaskDevices(f"worker:{i}", mine, shared))
    tasks += [TaskDevices(f"ps:{i}") for i in range(ps)]
    if evaluator:
        used = {g for t in tasks for g in t.gpus}
        free = [g for g in gpus if g not in used]
        tasks.append(TaskDevices("evaluator:0", tuple(free[:1])))
    on_gpus = any(t.gpus for t in tasks if t.task.startswith("worker"))
    return DevicePlan(tuple(g for g in gpus if any(g in t.gpus for t in tasks)),
                      tuple(tasks), "nccl" if on_gpus else "ring")


def plan_trials(gpus: Sequence[str], parallel: int, gpus_per_trial: int | None = None,
                share: bool = False) -> DevicePlan:
    """The plan of ``lmt sweep --parallel N``: trial slot k's GPUs (a trial runs in the
    slot that is free)."""
    slices = _slices(tuple(gpus), parallel, gpus_per_trial, share, "trial")
    tasks = tuple(TaskDevices(f"trial:{i}", mine, shared)
                  for i, (mine, shared) in enumerate(slices))
    return DevicePlan(tuple(gpus), tasks, "nccl" if any(t.gpus for t in tasks) else "ring")


def plan_federation(gpus: Sequence[str], clients: int) -> DevicePlan:
    """The plan of ``lmt federate``: the server (it aggregates in NumPy and evaluates)
    on the first GPU, the clients dealt round-robin over all, each GPU shared (memory
    growth on)."""
    gpus = tuple(gpus)
    server = TaskDevices("server:0", gpus[:1], bool(gpus))
    slices = _slices(gpus, clients, None, True, "client")
    tasks = (server, *(TaskDevices(f"client:{i}", mine, bool(mine))
                       for i, (mine, _) in enumerate(slices)))
    return DevicePlan(gpus, tasks, "ring")


def collective(requested: str, gpus: int) -> str:
    """The all-reduce implementation of ``multi_worker_mirrored_strategy``: ``auto``
    becomes NCCL on GPUs and RING on CPUs (TensorFlow's own ``auto`` picks NCCL only in
    graph mode, so eager Keras training went through gRPC even between GPUs)."""
    if requested != "auto":
        return requested
    return "nccl" if gpus else "ring"


def unseen_gpus(tensorflow_gpus: int, environ: Mapping[str, str] | None = None,
                device_nodes: Sequence[str] | None = None) -> str | None:
    """A one-line warning when this host has NVIDIA GPUs meant for this process but
    TensorFlow sees none (no CUDA libraries: the plain ``tensorflow`` wheel without its
    ``and-cuda`` extra), which would train on the CPU without a word; None otherwise
    (also where ``CUDA_VISIBLE_DEVICES`` hides the GPUs on purpose)."""
    meant = visible_gpus(environ, device_nodes)
    if not meant or tensorflow_gpus:
        return None
    return (f"lmt: warning: this host has {len(meant)} NVIDIA GPU(s) but TensorFlow sees "
            f"none, so this runs on the CPU; install the CUDA libraries with "
            f"pip install 'lmt_tf[gpu]' (tensorflow[and-cuda])")
