"""The memory a model's variables and optimizer slots take in each task of a strategy,
worked out before anything is allocated.

The model and its optimizer are built inside a throw-away ``tf.Graph``: graph-mode
variables are never initialised, so describing a 10^9-parameter model costs a few
megabytes and a fraction of a second. Each variable's shape and dtype, and each slot the
optimizer's own ``build`` makes for it, are then laid out over the tasks as the strategy
places them: one copy per process (the default and one-device strategies), one per
replica (mirrored, whose logical CPUs share the host's memory; on GPUs one per GPU), one
per worker (multi-worker mirrored), or, under parameter servers, TensorFlow's
``MinSizePartitioner`` shards placed round-robin over the ps tasks, each slot beside its
variable, and nothing on the chief and the workers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import tensorflow as tf
import tf_keras as keras

from lmt_tf.errors import ConfigError
from lmt_tf.runtime.memory import Cap, format_size
from lmt_tf.runtime.strategy import Partitioning, describe, partitioning_of, role_of

PS_STRATEGY = "ParameterServerStrategy"
MULTI_WORKER = "MultiWorkerMirroredStrategy"
DEFAULT_MIN_SHARD_BYTES = 256 << 10  # parameter_server_strategy's default
MAX_SUGGESTED_PS = 256  # the largest number of ps tasks a refusal suggests
# A random initializer (Keras' uniform, normal, glorot) holds about 3x its variable
# while it runs: the random draw, the scaled draw and the shifted result (measured
# here: an Embedding of 512 MB took the process from 0.7 to 2.2 GB). Zeros, as slots
# start, cost nothing beyond the variable.
RANDOM_INIT_FACTOR = 3
_STRING_BYTES = 16  # MinSizePartitioner's estimate of a string element


@dataclass(frozen=True)
class VariableSpec:
    """One variable as created: its name, shape, element size, and what it is."""

    name: str
    shape: tuple[int, ...]
    element_bytes: int
    kind: str  # "model" (a weight of the model), "slot" (an optimizer's, per variable),
    # "optimizer" (an optimizer's own: its step count, factored moments), or "transient"
    # (made while the model was built, not one of its weights: alive only until then)
    slot_of: str | None = None  # a slot's model variable

    @property
    def bytes(self) -> int:
        return math.prod(self.shape) * self.element_bytes


@dataclass(frozen=True)
class ModelDescription:
    """A model and its optimizer's variables, described without allocating them."""

    name: str
    parameters: int  # the model's weights, as ``count_params`` counts them
    variables: tuple[VariableSpec, ...]  # in the order they are created
    optimizer: str | None = None  # the optimizer's class name; None: no optimizer
    # Why the optimizer's slots could not be described (then counted as none), or None.
    unknown_slots: str | None = None
    weights: tuple[str, ...] = ()  # the model's weights (names above), in its own order

    @property
    def variable_bytes(self) -> int:
        return sum(v.bytes for v in self.variables if v.kind == "model")

    @property
    def slot_bytes(self) -> int:
        return sum(v.bytes for v in self.variables if v.kind in ("slot", "optimizer"))

    @property
    def transient_bytes(self) -> int:
        return sum(v.bytes for v in self.variables if v.kind == "transient")

    @property
    def bytes(self) -> int:
        return self.variable_bytes + self.slot_bytes

    def contents(self) -> str:
        """``4.0 GB variables + 4.0 GB Adagrad slots``."""
        if self.optimizer is None:
            return f"{format_size(self.variable_bytes)} variables, no optimizer"
        if self.unknown_slots:
            return (f"{format_size(self.variable_bytes)} variables + slots of "
                    f"{self.optimizer} unknown ({self.unknown_slots}): counted as none")
        return (f"{format_size(self.variable_bytes)} variables + "
                f"{format_size(self.slot_bytes)} {self.optimizer} slots")


def describe_model(build_model: Callable[[], keras.Model],
                   build_optimizer: Callable[[], Any] | None = None,
                   precision: str = "float32",
                   build_embedding_optimizer: Callable[[], Any] | None = None
                   ) -> ModelDescription:
    """Builds the model (and its optimizer's slots) inside a throw-away graph, where
    variables are described but never initialised, and lists every variable created.

    Args:
      build_model: returns the model, as the trainer builds it.
      build_optimizer: returns the optimizer whose slots to count; None: none.
      precision: the Keras mixed-precision policy the model is built under.
      build_embedding_optimizer: returns the optimizer of the ``keras.layers.Embedding``
        layers' variables (``TrainConfig.embedding_optimizer``), whose slots they get
        instead of ``build_optimizer``'s; None: one optimizer for every variable.

    Raises:
      Whatever ``build_model`` or ``build_optimizer`` raise (a ConfigError for a bad
      binding); an optimizer that cannot build its slots in a graph is described as
      ``unknown_slots`` instead.
    """
    created: list[tf.Variable] = []
    slot_of: dict[int, str] = {}  # a slot's model variable (by its handle's name)

    def record(next_creator: Callable[..., Any], **kwargs: Any) -> Any:
        variable = next_creator(**kwargs)
        created.append(variable)
        return variable

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        with tf.Graph().as_default(), tf.variable_creator_scope(record):
            model = build_model()
            in_model = len(created)
            optimizer = build_optimizer() if build_optimizer is not None else None
            tables = _embedding_variables(model) if build_embedding_optimizer else []
            rest = [v for v in model.trainable_variables
                    if not any(v is t for t in tables)]
            unknown = _build_slots(optimizer, rest, slot_of) if optimizer else None
            names_of = [type(optimizer).__name__] if optimizer else []
            if tables:
                embedding_optimizer = build_embedding_optimizer()
                unknown = unknown or _build_slots(embedding_optimizer, tables, slot_of)
                names_of.append(type(embedding_optimizer).__name__)
            parameters = int(model.count_params())
            # The weights by the names they have outside this graph (which makes a name
            # unique by numbering it: dense_0_2/kernel for a builder's second dense_0).
            names = {w.handle.name: f"{layer.name}/{_name(w).rsplit('/', 1)[-1]}"
                     for layer in model.layers for w in layer.weights}
            order = tuple(names.get(w.handle.name, _name(w)) for w in model.weights)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    specs = []
    for index, variable in enumerate(created):
        reference = slot_of.get(id(variable))
        kind = ("slot" if reference else "optimizer" if index >= in_model
                else "model" if variable.handle.name in names else "transient")
        name = names.get(variable.handle.name, _name(variable))
        if reference:  # m/dense_0_2/kernel: the slot's kind, then its variable's name
            reference = names.get(reference, reference)
            name = f"{name.split('/', 1)[0]}/{reference}"
        specs.append(VariableSpec(name, _shape(variable), _element_bytes(variable.dtype),
                                  kind, reference))
    return ModelDescription(model.name, parameters, tuple(specs),
                            " + ".join(names_of) or None, unknown, order)


def _embedding_variables(model: keras.Model) -> list[Any]:
    """The trainable variables of ``model``'s ``keras.layers.Embedding`` layers: what
    ``TrainConfig.embedding_optimizer`` updates (as ``optim.sparse`` picks them)."""
    return [v for layer in model.submodules if isinstance(layer, keras.layers.Embedding)
            for v in layer.trainable_weights]


def _build_slots(optimizer: Any, variables: Sequence[Any], slot_of: dict[int, str]
                 ) -> str | None:
    """Builds ``optimizer``'s variables for ``variables`` (in the graph), noting which
    model variable each slot belongs to; why that failed, or None."""
    make_slot = getattr(optimizer, "add_variable_from_reference", None)
    if make_slot is None or not hasattr(optimizer, "build"):
        return "not a tf_keras optimizer"

    def recording(model_variable: Any, *args: Any, **kwargs: Any) -> Any:
        slot = make_slot(model_variable, *args, **kwargs)
        slot_of[id(slot)] = model_variable.handle.name
        return slot

    optimizer.add_variable_from_reference = recording  # this instance only
    try:
        optimizer.build(list(variables))
    except Exception as e:  # noqa: BLE001 (any optimizer's own failure: described, not fatal)
        return f"{type(e).__name__} building them in a graph"
    finally:
        del optimizer.add_variable_from_reference
    return None


def _name(variable: Any) -> str:
    return variable.name.rsplit(":", 1)[0]


def _shape(variable: Any) -> tuple[int, ...]:
    return tuple(int(d or 0) for d in variable.shape.as_list())


def _element_bytes(dtype: Any) -> int:
    dtype = tf.as_dtype(dtype).base_dtype
    return _STRING_BYTES if dtype == tf.string else dtype.size


@dataclass(frozen=True)
class Layout:
    """Where a strategy keeps variables: its name, this worker's replica devices, and,
    for clusters, the tasks and the partitioning."""

    strategy: str  # as ``strategy.describe`` names it, e.g. MirroredStrategy
    devices: tuple[str, ...] = ("CPU:0",)  # each worker's replica devices
    workers: int = 1  # worker tasks (multi-worker mirrored: each holds a copy)
    ps: int = 0  # parameter-server tasks
    partitioning: Partitioning | None = None  # None: variables are not partitioned

    @property
    def on_gpus(self) -> bool:
        return any(d.startswith("GPU") for d in self.devices)

    def describe(self) -> str:
        if self.strategy == PS_STRATEGY:
            p = self.partitioning
            split = (f"MinSizePartitioner({format_size(p.min_shard_bytes)}, "
                     f"{p.max_shards or self.ps} shards)" if p else "no partitioner")
            return f"{self.strategy}, {self.ps} ps, {split}"
        copies = len(self.devices)
        where = "per GPU" if self.on_gpus else "on this host"
        if self.strategy == MULTI_WORKER:
            return f"{self.strategy}, {self.workers} workers, {copies} replica(s) {where} each"
        return f"{self.strategy}, {copies} replica(s) {where}"


def layout_of(strategy: tf.distribute.Strategy) -> Layout:
    """Where ``strategy`` keeps variables (its cluster from the role it was built with)."""
    info, role = describe(strategy), role_of(strategy)
    if info.name == PS_STRATEGY:
        return Layout(info.name, ("CPU:0",), role.workers, role.ps, partitioning_of(strategy))
    if info.name == MULTI_WORKER:
        return Layout(info.name, info.devices, max(role.workers, 1))
    return Layout(info.name, info.devices)


@dataclass(frozen=True)
class TaskShare:
    """What one task (or one of its GPUs) holds."""

    task: str  # chief:0, worker:1, ps:0
    device: str = "host"  # "host" (the task's memory, which a cap limits) or "GPU:0"
    variables: int = 0  # bytes of model variables
    slots: int = 0  # bytes of optimizer variables
    initialising: int = 0  # estimated transient bytes on top, while variables are made

    @property
    def bytes(self) -> int:
        return self.variables + self.slots

    @property
    def name(self) -> str:
        return self.task if self.device == "host" else f"{self.task} {self.device}"


@dataclass(frozen=True)
class Footprint:
    """Each task's share of a model's variables and slots under one layout."""

    model: ModelDescription
    layout: Layout
    tasks: tuple[TaskShare, ...]
    # Each variable's pieces (one per shard or copy): (task, bytes), in creation order.
    placement: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = field(repr=False)

    @property
    def largest(self) -> TaskShare:
        """The task holding the most host memory (the first of equals)."""
        host = [t for t in self.tasks if t.device == "host"]
        return max(host, key=lambda t: t.bytes)

    @property
    def biggest_piece(self) -> tuple[str, int, int]:
        """The largest variable or shard: (variable name, bytes, pieces it is in)."""
        name, pieces = max(self.placement, key=lambda p: max(b for _, b in p[1]))
        return name, max(b for _, b in pieces), len(pieces)

    def per_task(self) -> dict[str, int]:
        """Bytes per task (and GPU), by name."""
        return {t.name: t.bytes for t in self.tasks}

    def describe(self) -> str:
        """The per-task table, with the model's totals and its largest variable."""
        rows = [("task", "variables", "slots", "total", "initialising (est.)")]
        rows += [(t.name, format_size(t.variables), format_size(t.slots),
                  format_size(t.bytes), format_size(t.bytes + t.initialising))
                 for t in self.tasks]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        table = "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                          .rstrip() for r in rows)
        name, size, pieces = self.biggest_piece
        kind = "shards" if self.layout.strategy == PS_STRATEGY else "copies"
        shards = f" (1 of {pieces} {kind})" if pieces > 1 else ""
        return (f"memory per task under {self.layout.describe()}: "
                f"{format_size(self.model.bytes)} in all ({self.model.contents()})\n"
                f"{table}\n  largest variable or shard: {name}, {format_size(size)}{shards}")


def plan(model: ModelDescription, layout: Layout) -> Footprint:
    """Each task's share of ``model``'s variables and slots under ``layout``."""
    if layout.strategy == PS_STRATEGY:
        return _parameter_servers(model, layout)
    copies = 1 if layout.on_gpus else len(layout.devices)
    tasks = ([f"worker:{i}" for i in range(layout.workers)]
             if layout.strategy == MULTI_WORKER else ["chief:0"])
    variables, slots = model.variable_bytes, model.slot_bytes
    biggest = max((v.bytes for v in model.variables if v.kind in ("model", "transient")),
                  default=0)
    # While the model is built: the variables a builder makes and drops (a copy of the
    # model, as the preprocessing's clone makes), and a random initializer's draw.
    extra = model.transient_bytes + (RANDOM_INIT_FACTOR - 1) * biggest
    shares = []
    for task in tasks:
        if layout.on_gpus:
            shares.append(TaskShare(task))
            shares += [TaskShare(task, d, variables, slots, extra) for d in layout.devices]
        else:
            shares.append(TaskShare(task, "host", copies * variables, copies * slots, extra))
    # One piece per copy: per replica on the host's logical CPUs, per GPU.
    per_task = len(layout.devices)
    placement = tuple((v.name, tuple((task, v.bytes) for task in tasks
                                     for _ in range(per_task)))
                      for v in model.variables if v.kind != "transient")
    return Footprint(model, layout, tuple(shares), placement)


def shard_rows(spec: VariableSpec, partitioning: Partitioning | None, ps: int) -> list[int]:
    """The rows of each shard TensorFlow makes of ``spec`` under ``partitioning``:
    ``MinSizePartitioner``'s count (at most ``max_shards``, one per ps by default; no
    shard under ``min_shard_bytes`` unless the variable is smaller), then the "div"
    split of ``ParameterServerStrategyV2``: the first ``rows % n`` shards take one more
    row. ``[rows]`` for a variable left whole (scalars, a single shard)."""
    if partitioning is None or not spec.shape:
        return [spec.shape[0] if spec.shape else 1]
    rows = spec.shape[0]
    wanted = math.ceil(spec.bytes / partitioning.min_shard_bytes)
    shards = max(1, min(rows, partitioning.max_shards or ps, wanted))
    base, extra = divmod(rows, shards)
    return [base + (1 if i < extra else 0) for i in range(shards)]


def _parameter_servers(model: ModelDescription, layout: Layout) -> Footprint:
    """TensorFlow's placement: each variable (or each shard of a partitioned one) on
    ``/job:ps/task:<count % ps>``, the count going up by one per variable or shard in the
    order they are created; a slot on the device(s) of its variable, split as it is."""
    if layout.ps < 1:
        raise ConfigError("a parameter-server layout needs at least one ps task")
    count = 0
    pieces: dict[str, list[tuple[int, int]]] = {}  # name -> [(ps, bytes)]
    placement = []
    for spec in model.variables:
        reference = pieces.get(spec.slot_of or "")
        if spec.kind == "slot" and reference:
            whole = sum(b for _, b in reference) or 1
            mine = [(ps, spec.bytes * b // whole) for ps, b in reference]
        else:
            row_bytes = spec.bytes // max(spec.shape[0], 1) if spec.shape else spec.bytes
            mine = []
            for rows in shard_rows(spec, layout.partitioning, layout.ps):
                mine.append((count % layout.ps, rows * row_bytes if spec.shape else spec.bytes))
                count += 1
        pieces[spec.name] = mine
        if spec.kind != "transient":
            placement.append((spec.name, tuple((f"ps:{ps}", b) for ps, b in mine)))
    # Per ps: variables, slots, transient variables, the biggest piece it initialises.
    held = {i: [0, 0, 0, 0] for i in range(layout.ps)}
    biggest_slot = 0
    for spec in model.variables:
        column = {"model": 0, "slot": 1, "optimizer": 1, "transient": 2}[spec.kind]
        for ps, size in pieces[spec.name]:
            held[ps][column] += size
            if spec.kind in ("model", "transient"):
                held[ps][3] = max(held[ps][3], size)
            else:
                biggest_slot = max(biggest_slot, size)
    # The coordinator makes each slot's initial value (tf-keras' zeros, an eager tensor)
    # itself and sends it to the ps task: a slot piece at a time passes through its
    # memory (a lower bound: building, evaluating and saving on the coordinator add theirs).
    shares = [TaskShare("chief:0", initialising=biggest_slot)]
    shares += [TaskShare(f"worker:{i}") for i in range(layout.workers)]
    shares += [TaskShare(f"ps:{i}", "host", v, s, t + (RANDOM_INIT_FACTOR - 1) * big)
               for i, (v, s, t, big) in held.items()]
    return Footprint(model, layout, tuple(shares), tuple(placement))


def fewest_ps(model: ModelDescription, layout: Layout, cap: int
              ) -> tuple[int, Footprint, bool] | None:
    """The fewest ps tasks under which no ps task holds more than ``cap``: (count, its
    footprint, whether ``max_shards`` had to be left to its default of one shard per
    ps); None if even ``MAX_SUGGESTED_PS`` are not enough."""
    given = layout.partitioning if layout.strategy == PS_STRATEGY else None
    base = given or Partitioning(DEFAULT_MIN_SHARD_BYTES, None)
    tries = [(base, False)]
    if base.max_shards is not None:
        tries.append((replace(base, max_shards=None), True))
    for partitioning, unset in tries:
        for ps in range(1, MAX_SUGGESTED_PS + 1):
            candidate = plan(model, Layout(PS_STRATEGY, ("CPU:0",), max(layout.workers, 1),
                                           ps, partitioning))
            if candidate.largest.bytes <= cap:
                return ps, candidate, unset
    return None


def check_fits(footprint: Footprint, cap: Cap, same_host: bool = False) -> str | None:
    """Refuses a footprint whose largest task cannot hold its share within ``cap``.

    Args:
      footprint: each task's share.
      cap: the memory each task may use.
      same_host: every task runs on this machine (a local cluster), so that, without a
        cap of their own, their shares together must fit the machine's memory too.

    Returns:
      A warning where the shares fit but initialising the variables may not (random
      initializers hold about ``RANDOM_INIT_FACTOR`` times their variable while they
      run), else None.

    Raises:
      ConfigError: in one line naming the numbers and what would fit.
    """
    largest, model = footprint.largest, footprint.model
    together = sum(t.bytes for t in footprint.tasks if t.device == "host")
    if largest.bytes > cap.bytes:
        raise ConfigError(f"{_needs(footprint)}, above the {format_size(cap.bytes)} a task "
                          f"may use ({cap.source}); {_remedies(footprint, cap)}")
    if same_host and cap.source != "--task-memory" and together > cap.bytes:
        raise ConfigError(f"the tasks of this cluster, all on this machine, need "
                          f"{format_size(together)} of variables and slots together "
                          f"({model.contents()}) under {footprint.layout.describe()}, above "
                          f"the {format_size(cap.bytes)} of {cap.source}; run them on "
                          f"more machines or make the model smaller")
    peak = max((t for t in footprint.tasks if t.device == "host"),
               key=lambda t: t.bytes + t.initialising)
    if peak.bytes + peak.initialising > cap.bytes:
        return (f"lmt: warning: {peak.task} holds {format_size(peak.bytes)} of variables "
                f"and slots, within the {format_size(cap.bytes)} it may use ({cap.source}), "
                f"but may need about {format_size(peak.bytes + peak.initialising)} while "
                f"it initialises them (a random initializer holds about "
                f"{RANDOM_INIT_FACTOR}x its variable while it runs)")
    return None


def _needs(footprint: Footprint) -> str:
    """What the largest task needs, and why, for a refusal."""
    layout, model, largest = footprint.layout, footprint.model, footprint.largest
    contents = model.contents()
    if layout.strategy == PS_STRATEGY:
        share = (f"{format_size(largest.variables)} variables + "
                 f"{format_size(largest.slots)} slots")
        return (f"{largest.task} needs {format_size(largest.bytes)} of variables and slots "
                f"({share}; the model {format_size(model.bytes)}: {contents}) under "
                f"{layout.describe()}")
    copies = 1 if layout.on_gpus else len(layout.devices)
    if copies > 1:
        return (f"the model needs {format_size(model.bytes)} of variables and slots per "
                f"replica ({contents}) under {layout.strategy}, "
                f"{format_size(largest.bytes)} for its {copies} replicas on this host")
    who = "each worker" if layout.strategy == MULTI_WORKER else "the model"
    return (f"{who} needs {format_size(largest.bytes)} of variables and slots "
            f"({contents}) under {layout.strategy}")


def _remedies(footprint: Footprint, cap: Cap) -> str:
    """What would fit: fewer replicas, enough ps tasks, a larger cap."""
    layout, model = footprint.layout, footprint.model
    options = []
    copies = 1 if layout.on_gpus else len(layout.devices)
    if layout.strategy != PS_STRATEGY and copies > 1 and model.bytes <= cap.bytes:
        options.append(f"one replica per host ({format_size(model.bytes)})")
    found = fewest_ps(model, layout, cap.bytes)
    if found:
        ps, candidate, unset = found
        strategy = "" if layout.strategy == PS_STRATEGY else "parameter_server_strategy with "
        shards = " and parameter_server_strategy.max_shards unset" if unset else ""
        options.append(f"use {strategy}>= {ps} ps{shards} "
                       f"({format_size(candidate.largest.bytes)} per ps task)")
    needed = format_size(footprint.largest.bytes)
    options.append(f"a cap of at least {needed} (--task-memory)" if cap.source == "--task-memory"
                   else f"a machine with more than {needed} of memory")
    return " or ".join(options)


def pieces_of(variable: Any) -> list[tuple[str, int]]:
    """Where a real (built) variable's pieces are, as ``Footprint.placement`` predicts
    them: (task, bytes) per shard of a partitioned variable or copy of a mirrored one."""
    parts = (getattr(variable, "variables", None) or getattr(variable, "values", None)
             or [variable])
    return [(task_of(p.device), p.shape.num_elements() * _element_bytes(p.dtype))
            for p in parts]


def placed_bytes(variables: Iterable[Any]) -> dict[str, int]:
    """Bytes per device of real (built) variables: each shard of a partitioned variable
    and each copy of a mirrored one on its own device (as ``variable_placement`` lists
    them), keyed by device name."""
    held: dict[str, int] = {}
    seen: set[int] = set()
    for variable in variables:
        parts = (getattr(variable, "variables", None) or getattr(variable, "values", None)
                 or [variable])
        for part in parts:
            if id(part) in seen:
                continue
            seen.add(id(part))
            size = part.shape.num_elements() * _element_bytes(part.dtype)
            held[part.device] = held.get(part.device, 0) + size
    return held


def task_of(device: str) -> str:
    """``ps:1`` for ``/job:ps/replica:0/task:1/device:CPU:0``; ``chief:0`` for this
    process's own devices (``/job:localhost/...`` or no job)."""
    spec = tf.DeviceSpec.from_string(device)
    if spec.job in (None, "localhost"):
        return "chief:0"
    return f"{spec.job}:{spec.task or 0}"


def by_task(held: dict[str, int]) -> dict[str, int]:
    """``placed_bytes`` summed per task (the copies on a host's logical CPUs together)."""
    totals: dict[str, int] = {}
    for device, size in held.items():
        task = task_of(device)
        totals[task] = totals.get(task, 0) + size
    return totals


def on_one_host(cluster: dict[str, Sequence[str]]) -> bool:
    """Whether every task of ``cluster`` (a cluster spec) runs on this machine."""
    local = ("127.0.0.1", "localhost", "[::1]", "::1")
    with contextlib.suppress(ValueError, AttributeError):
        return all(address.rsplit(":", 1)[0] in local
                   for addresses in cluster.values() for address in addresses)
    return False
