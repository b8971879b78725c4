"""Distribution strategies built from configuration.

Each builder is a plain function returning a ``tf.distribute.Strategy``; gin binds one of
them as ``run_experiment.strategy``. They must be called before TensorFlow's first op,
since splitting the CPU into logical devices is only possible then.
"""

from __future__ import annotations

import contextlib
import os
import signal
import weakref
from dataclasses import dataclass

import tensorflow as tf

from lmt_tf.checks import Annotated, OneOf, Range
from lmt_tf.errors import ConfigError, LmtError
from lmt_tf.runtime.devices import collective
from lmt_tf.runtime.env import configure_cpu_devices
from lmt_tf.runtime.roles import SINGLE_PROCESS, Role, check_own_port, current_role

_CROSS_DEVICE_OPS = {
    "auto": None,
    "nccl": tf.distribute.NcclAllReduce,
    "hierarchical_copy": tf.distribute.HierarchicalCopyAllReduce,
    "reduce_to_one": tf.distribute.ReductionToOneDevice,
}


def default_strategy() -> tf.distribute.Strategy:
    """TensorFlow's default strategy: no distribution. On a host with several GPUs this
    process is pinned to the first (``devices.plan_single``): TensorFlow would compute on
    GPU:0 alone while reserving the memory of every GPU. ``@mirrored_strategy`` uses
    them all."""
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1:
        with contextlib.suppress(RuntimeError):  # the runtime is up: its devices stand
            tf.config.set_visible_devices(gpus[:1], "GPU")
    return tf.distribute.get_strategy()


def one_device_strategy(device: str | None = None) -> tf.distribute.Strategy:
    """All variables and computation on one device: the first GPU if any, else the CPU.

    Args:
      device: a TensorFlow device name such as ``/gpu:1``; None picks as above.
    """
    if device is None:
        device = "/gpu:0" if tf.config.list_physical_devices("GPU") else "/cpu:0"
    return tf.distribute.OneDeviceStrategy(device)


def mirrored_strategy(
    num_cpu_devices: Annotated[int, Range(ge=1)] = 2,
    cross_device_ops: Annotated[str, OneOf(*_CROSS_DEVICE_OPS)] = "auto"
) -> tf.distribute.Strategy:
    """Synchronous data parallelism over all local GPUs, or over logical CPUs.

    Args:
      num_cpu_devices: on a machine without GPUs, the number of logical CPU devices
        the host CPU is split into (one replica each). Ignored when GPUs are present.
      cross_device_ops: ``auto`` (TensorFlow's choice on GPUs, NCCL where it can;
        reduction to one device on CPUs), ``nccl``,
        ``hierarchical_copy`` or ``reduce_to_one``.

    Raises:
      ConfigError: for an unknown ``cross_device_ops`` or a bad device count.
    """
    if cross_device_ops not in _CROSS_DEVICE_OPS:
        raise ConfigError(
            f"mirrored_strategy.cross_device_ops must be one of {sorted(_CROSS_DEVICE_OPS)}, "
            f"got {cross_device_ops!r}"
        )
    ops_class = _CROSS_DEVICE_OPS[cross_device_ops]
    ops = ops_class() if ops_class else None
    if tf.config.list_physical_devices("GPU"):
        return tf.distribute.MirroredStrategy(cross_device_ops=ops)
    devices = configure_cpu_devices(num_cpu_devices)
    if ops is None:
        # TensorFlow's pick on CPUs is collective all-reduce, whose instance keys are per
        # strategy object while its executor is per process: a second MirroredStrategy in
        # the same process (a sweep, a test session) mixes up tensors of both. Reducing
        # to one device keeps no such state, and on one host costs no network.
        ops = tf.distribute.ReductionToOneDevice()
    return tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=ops)


_ROLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PARTITIONING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMMUNICATION = {
    "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
    "ring": tf.distribute.experimental.CommunicationImplementation.RING,
    "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
}


def _cluster_resolver(cluster: str) -> tf.distribute.cluster_resolver.ClusterResolver:
    if cluster == "tf_config":
        check_own_port()  # validates TF_CONFIG with a clear error before TensorFlow reads it
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if cluster == "slurm":
        if "SLURM_JOB_ID" not in os.environ:
            raise LmtError("cluster='slurm' but this process is not inside a SLURM job "
                           "(SLURM_JOB_ID is not set)")
        return tf.distribute.cluster_resolver.SlurmClusterResolver()
    raise ConfigError(f"cluster must be 'tf_config' or 'slurm', got {cluster!r}")


def multi_worker_mirrored_strategy(
        communication: Annotated[str, OneOf(*_COMMUNICATION)] = "auto",
        cluster: Annotated[str, OneOf("tf_config", "slurm")] = "tf_config"
) -> tf.distribute.Strategy:
    """Synchronous data parallelism across workers with collective all-reduce.

    Every worker runs the same ``lmt run``; each finds its place in the cluster from
    ``TF_CONFIG`` or from the SLURM allocation. Without ``TF_CONFIG`` it is one worker.

    Args:
      communication: all-reduce implementation: ``auto`` (NCCL on GPUs, RING on CPUs),
        ``ring`` (gRPC) or ``nccl``.
      cluster: where the cluster is described: ``tf_config`` or ``slurm``.

    Raises:
      ConfigError / LmtError: for unknown settings or an invalid TF_CONFIG.
    """
    if communication not in _COMMUNICATION:
        raise ConfigError(f"multi_worker_mirrored_strategy.communication must be one of "
                          f"{sorted(_COMMUNICATION)}, got {communication!r}")
    # 'auto' is NCCL on GPUs, RING on CPUs: TensorFlow's own AUTO picks NCCL only in graph
    # mode, so eager Keras steps would all-reduce through gRPC even between GPUs.
    chosen = collective(communication, len(tf.config.list_physical_devices("GPU")))
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=_COMMUNICATION[chosen])
    resolver = _cluster_resolver(cluster)
    if resolver.task_type == "evaluator":
        return _evaluator_strategy()
    return _with_role(tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver, communication_options=options), resolver)


def parameter_server_strategy(max_shards: Annotated[int, Range(ge=1)] | None = None,
                              min_shard_bytes: Annotated[int, Range(ge=1)] = 256 << 10
                              ) -> tf.distribute.Strategy:
    """Asynchronous training: variables on parameter servers, steps run by workers and
    scheduled by the coordinator (the chief task, which runs ``lmt run``).

    On a worker or ps task this function serves the cluster until the process is ended
    and never returns: those tasks only host variables and run scheduled steps.

    Args:
      max_shards: partition large variables (embedding tables) into at most this many
        shards spread over the parameter servers; None: one shard per ps.
      min_shard_bytes: smallest shard; smaller variables stay whole.

    Raises:
      LmtError: without a TF_CONFIG that names at least one worker and one ps.
    """
    # Fail a step on a lost worker at once so the coordinator can reschedule it.
    os.environ.setdefault("GRPC_FAIL_FAST", "use_caller")
    check_own_port()
    role = current_role()
    if role.workers < 1 or role.ps < 1:
        raise LmtError("parameter_server_strategy needs TF_CONFIG with at least one worker "
                       "and one ps task (`lmt launch --workers N --ps M` starts such a "
                       "cluster locally)")
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if role.task_type == "evaluator":
        return _evaluator_strategy()
    if role.task_type in ("worker", "ps"):
        serve(resolver)
    partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
        min_shard_bytes=min_shard_bytes, max_shards=max_shards or role.ps)
    strategy = tf.distribute.ParameterServerStrategy(resolver,
                                                     variable_partitioner=partitioner)
    _PARTITIONING[strategy] = Partitioning(min_shard_bytes, max_shards)
    return _with_role(strategy, resolver)


def serve(resolver: tf.distribute.cluster_resolver.ClusterResolver) -> None:
    """Runs this task's gRPC server until the process is ended (worker and ps tasks)."""
    server = tf.distribute.Server(resolver.cluster_spec(), job_name=resolver.task_type,
                                  task_index=resolver.task_id,
                                  protocol=resolver.rpc_layer or "grpc", start=True)
    print(f"lmt: {resolver.task_type}:{resolver.task_id} serving", flush=True)
    # join() blocks in C++, where Python signal handlers never run: end at once instead.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    server.join()
    raise SystemExit(0)


@dataclass(frozen=True)
class StrategyInfo:
    """What a run records about its strategy."""

    name: str  # class name, e.g. MirroredStrategy
    replicas: int  # replicas in sync across the whole job
    devices: tuple[str, ...]  # devices of this worker's replicas


def describe(strategy: tf.distribute.Strategy) -> StrategyInfo:
    """Summarises ``strategy`` for logs, tags and the dry run: its devices as
    ``GPU:0``, ``CPU:1`` (the default strategy: the device TensorFlow places ops on)."""
    try:
        devices = tuple(d.rpartition("device:")[2] for d in strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy has no device list
        gpus = tf.config.list_logical_devices("GPU")
        devices = (gpus[0].name.rpartition("device:")[2],) if gpus else ("CPU:0",)
    name = type(strategy).__name__.lstrip("_").replace("DistributionStrategy", "Strategy")
    name = {"CollectiveAllReduceStrategy": "MultiWorkerMirroredStrategy",
            "ParameterServerStrategyV2": "ParameterServerStrategy"}.get(name, name)
    return StrategyInfo(name, strategy.num_replicas_in_sync, devices)


@dataclass(frozen=True)
class Partitioning:
    """How ``parameter_server_strategy`` splits variables over the ps tasks: TensorFlow's
    ``MinSizePartitioner(min_shard_bytes, max_shards or <number of ps>)``."""

    min_shard_bytes: int
    max_shards: int | None  # None: one shard per ps task


def partitioning_of(strategy: tf.distribute.Strategy) -> Partitioning | None:
    """The partitioning ``parameter_server_strategy`` gave ``strategy``; None for any
    other strategy."""
    return _PARTITIONING.get(strategy)


def role_of(strategy: tf.distribute.Strategy) -> Role:
    """This process's role in the strategy's cluster (a single process is a chief)."""
    return _ROLES.get(strategy, SINGLE_PROCESS)


def _evaluator_strategy() -> tf.distribute.Strategy:
    """A side-car evaluator is not part of the training cluster: it evaluates the chief's
    checkpoints on its own devices."""
    strategy = tf.distribute.OneDeviceStrategy(
        "/gpu:0" if tf.config.list_physical_devices("GPU") else "/cpu:0")
    _ROLES[strategy] = current_role()
    return strategy


def _with_role(strategy: tf.distribute.Strategy,
               resolver: tf.distribute.cluster_resolver.ClusterResolver) -> tf.distribute.Strategy:
    """Records the role the cluster builders resolved, for ``role_of``."""
    spec = resolver.cluster_spec().as_dict()
    if spec:
        _ROLES[strategy] = Role.in_cluster(spec, resolver.task_type, resolver.task_id or 0)
    return strategy


def variable_placement(variables: list[tf.Variable]) -> dict[str, list[str]]:
    """Where each variable lives: one device per shard (partitioned variables on
    parameter servers) or per replica (mirrored variables). A partitioned variable given
    whole (an optimizer's slot of a partitioned table) is listed by its shards."""
    placement = {}
    for variable in variables:
        if isinstance(variable, tf.__internal__.distribute.ShardedVariable):
            placement.update(variable_placement(list(variable.variables)))
            continue
        parts = getattr(variable, "variables", None) or getattr(variable, "values", None)
        placement[variable.name] = [p.device for p in (parts or [variable])]
    return placement


def local_updates_unsupported(strategy: tf.distribute.Strategy) -> str | None:
    """Why local SGD has no meaning under ``strategy``, or None where it has."""
    if isinstance(strategy, tf.distribute.ParameterServerStrategy):
        return ("parameter-server training is asynchronous; there are no replicas in sync "
                "whose weights could be averaged")
    if strategy.num_replicas_in_sync < 2:
        return (f"{describe(strategy).name} has one replica, so there is nothing to average "
                f"(use mirrored or multi-worker mirrored)")
    return None
