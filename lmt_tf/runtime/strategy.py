"""Distribution strategies built from configuration.

Each builder is a plain function returning a ``tf.distribute.Strategy``; gin binds one of
them as ``run_experiment.strategy``. They must be called before TensorFlow's first op,
since splitting the CPU into logical devices is only possible then.
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

from lmt_tf.errors import ConfigError
from lmt_tf.runtime.env import configure_cpu_devices

_CROSS_DEVICE_OPS = {
    "auto": None,
    "nccl": tf.distribute.NcclAllReduce,
    "hierarchical_copy": tf.distribute.HierarchicalCopyAllReduce,
    "reduce_to_one": tf.distribute.ReductionToOneDevice,
}


def default_strategy() -> tf.distribute.Strategy:
    """TensorFlow's default strategy: no distribution, TensorFlow places ops itself."""
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
    num_cpu_devices: int = 2, cross_device_ops: str = "auto"
) -> tf.distribute.Strategy:
    """Synchronous data parallelism over all local GPUs, or over logical CPUs.

    Args:
      num_cpu_devices: on a machine without GPUs, the number of logical CPU devices
        the host CPU is split into (one replica each). Ignored when GPUs are present.
      cross_device_ops: ``auto`` (NCCL on GPUs, TensorFlow's choice otherwise), ``nccl``,
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
    return tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=ops)


@dataclass(frozen=True)
class StrategyInfo:
    """What a run records about its strategy."""

    name: str  # class name, e.g. MirroredStrategy
    replicas: int  # replicas in sync across the whole job
    devices: tuple[str, ...]  # devices of this worker's replicas


def describe(strategy: tf.distribute.Strategy) -> StrategyInfo:
    """Summarises ``strategy`` for logs, tags and the dry run."""
    try:
        devices = tuple(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy has no device list
        devices = ()
    name = type(strategy).__name__.lstrip("_").replace("DistributionStrategy", "Strategy")
    return StrategyInfo(name, strategy.num_replicas_in_sync, devices)
