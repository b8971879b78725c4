"""The footprint of a model's variables and slots per task, worked out in a throw-away
graph: slot counts of tf-keras' optimizers, each strategy's arithmetic against hand
numbers, TensorFlow's own partitioner, nothing allocated, and the one-line refusal."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from lmt_tf.data.preprocessing import PreprocessedModel
from lmt_tf.errors import ConfigError
from lmt_tf.models.mlp import build_mlp
from lmt_tf.runtime.footprint import (
    Layout,
    ModelDescription,
    VariableSpec,
    check_fits,
    describe_model,
    fewest_ps,
    plan,
    shard_rows,
)
from lmt_tf.runtime.memory import Cap
from lmt_tf.runtime.strategy import Partitioning

# The hand model: an int64 id table and a small head.
TABLE = 1000 * 16 * 4  # table_embedding/embeddings (1000, 16) float32
HEAD = 64 * 8 * 4 + 8 * 4 + 8 * 2 * 4 + 2 * 4  # hidden (64, 8) + (8,), out (8, 2) + (2,)
VARIABLES = TABLE + HEAD  # 66,152 bytes
PARAMETERS = VARIABLES // 4


def _hand_model() -> keras.Model:
    ids = keras.Input((4,), dtype="int64")
    x = keras.layers.Embedding(1000, 16, name="table_embedding")(ids)
    x = keras.layers.Dense(8, name="hidden")(keras.layers.Flatten()(x))
    return keras.Model(ids, keras.layers.Dense(2, name="out")(x), name="hand")


# Slots per variable, read off each class's build() in tf-keras 2.21 (SGD makes its
# momentum slot even at momentum 0, whatever its docstring says).
SLOTS = [
    (keras.optimizers.SGD, {}, 1),
    (keras.optimizers.SGD, {"momentum": 0.9}, 1),
    (keras.optimizers.Adam, {}, 2),
    (keras.optimizers.Adam, {"amsgrad": True}, 3),
    (keras.optimizers.AdamW, {}, 2),
    (keras.optimizers.Adagrad, {}, 1),
    (keras.optimizers.Ftrl, {}, 2),
    (keras.optimizers.RMSprop, {}, 1),
    (keras.optimizers.RMSprop, {"momentum": 0.9}, 2),
    (keras.optimizers.RMSprop, {"momentum": 0.9, "centered": True}, 3),
    (keras.optimizers.Adadelta, {}, 2),
    (keras.optimizers.Adamax, {}, 2),
    (keras.optimizers.Nadam, {}, 2),
    (keras.optimizers.Lion, {}, 1),
]


@pytest.mark.parametrize("optimizer, settings, per_variable", SLOTS,
                         ids=[f"{o.__name__}{s or ''}" for o, s, _ in SLOTS])
def test_slots_per_variable_match_the_optimizer_classes(optimizer, settings,
                                                        per_variable: int) -> None:
    described = describe_model(_hand_model, lambda: optimizer(**settings))
    assert described.parameters == PARAMETERS
    assert described.variable_bytes == VARIABLES
    slots = [v for v in described.variables if v.kind == "slot"]
    assert sum(v.bytes for v in slots) == per_variable * VARIABLES
    table_slots = [v for v in slots if v.slot_of == "table_embedding/embeddings"]
    assert len(table_slots) == per_variable and all(v.shape == (1000, 16)
                                                    for v in table_slots)
    # The optimizer's own variables (its step, learning rate; Nadam's u product) are
    # scalars.
    assert all(v.shape == () for v in described.variables if v.kind == "optimizer")
    assert described.unknown_slots is None and described.optimizer == optimizer.__name__


def test_an_optimizer_that_cannot_be_described_is_said_so() -> None:
    class Odd:  # no tf-keras optimizer
        pass

    described = describe_model(_hand_model, Odd)
    assert described.slot_bytes == 0
    assert "slots of Odd unknown (not a tf_keras optimizer): counted as none" in \
        described.contents()


def test_parameters_are_those_of_the_built_model() -> None:
    for build in (_hand_model, lambda: build_mlp((8, 8), 10, hidden_units=(32, 16))):
        assert describe_model(build).parameters == build().count_params()


def test_a_preprocessed_model_counts_once_and_its_dropped_copy_as_transient() -> None:
    """PreprocessedModel builds the model, then a clone of it: the clone's variables are
    the model's, the first ones are alive only while it is built."""

    class Fitted:  # what PreprocessedModel asks of a FittedPreprocessing
        text = False
        output_shape = (8,)

        def builder_args(self) -> dict:
            return {}

        def layers(self) -> list:
            return [keras.layers.Rescaling(0.5)]

    build = PreprocessedModel(lambda input_shape, num_classes: build_mlp(
        input_shape, num_classes, hidden_units=(4,)), Fitted())
    described = describe_model(lambda: build(input_shape=(8,), num_classes=3))
    expected = (8 * 4 + 4 + 4 * 3 + 3) * 4
    assert described.variable_bytes == expected and described.transient_bytes == expected
    assert described.parameters == build(input_shape=(8,), num_classes=3).count_params()


@pytest.mark.slow  # a fresh process, for a clean peak (TensorFlow's import: ~15 s)
def test_describing_a_large_model_allocates_nothing() -> None:
    """2e8 parameters (an 800 MB table) and their Adagrad slot, built with preprocessing
    in front (which builds the model twice and copies the weights over), described in a
    fresh process: its peak resident memory grows by less than 100 MB."""
    script = textwrap.dedent("""
        import lmt_tf
        from lmt_tf.runtime.env import import_tensorflow
        import_tensorflow()
        import tensorflow as tf, tf_keras as keras
        from lmt_tf.data.preprocessing import PreprocessedModel
        from lmt_tf.runtime.footprint import describe_model
        def hwm():
            status = open("/proc/self/status").read().split("VmHWM:")[1]
            return int(status.split()[0]) * 1024
        class Fitted:
            text, output_shape = False, (26,)
            def builder_args(self):
                return {}
            def layers(self):
                return [keras.layers.Identity()]
        def table(input_shape, num_classes):
            ids = keras.Input(input_shape, dtype="int64")
            x = keras.layers.Embedding(1_562_500, 128, name="big_embedding")(ids)
            return keras.Model(ids, keras.layers.Dense(num_classes)(keras.layers.Flatten()(x)))
        tf.zeros([1])  # TensorFlow's runtime up before the baseline
        keras.layers.Dense(1)(keras.Input((1,)))
        before = hwm()
        build = PreprocessedModel(table, Fitted())
        described = describe_model(lambda: build(input_shape=(26,), num_classes=2),
                                   keras.optimizers.Adagrad)
        print(described.parameters, described.bytes, hwm() - before)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    parameters, held, grown = (int(x) for x in done.stdout.split())
    assert parameters == 1_562_500 * 128 + 26 * 128 * 2 + 2
    assert held > 1.6e9  # the table and its accumulator, described
    assert grown < 100 * 2**20, f"describing grew the process by {grown / 2**20:.0f} MB"


def _spec(name: str, shape: tuple, kind: str = "model", slot_of: str | None = None):
    return VariableSpec(name, shape, 4, kind, slot_of)


def _hand_description() -> ModelDescription:
    """The hand model with one Adagrad slot per variable (as describe_model makes it)."""
    names = [("table", (1000, 16)), ("hidden/kernel", (64, 8)), ("hidden/bias", (8,)),
             ("out/kernel", (8, 2)), ("out/bias", (2,))]
    specs = [_spec(n, s) for n, s in names] + [_spec("iteration", (), "optimizer")]
    specs += [_spec(f"accumulator/{n}", s, "slot", n) for n, s in names]
    return ModelDescription("hand", PARAMETERS, tuple(specs), "Adagrad")


def test_one_process_holds_everything() -> None:
    footprint = plan(_hand_description(), Layout("DefaultStrategy"))
    (task,) = footprint.tasks
    assert (task.task, task.variables, task.slots) == ("chief:0", VARIABLES, VARIABLES + 4)
    # While initialising: a random draw of the table, 3x its bytes at once.
    assert task.initialising == 2 * TABLE


def test_mirrored_replicas_on_logical_cpus_each_hold_a_copy_in_host_memory() -> None:
    footprint = plan(_hand_description(), Layout("MirroredStrategy", ("CPU:0", "CPU:1")))
    assert footprint.per_task() == {"chief:0": 2 * (2 * VARIABLES + 4)}


def test_mirrored_on_gpus_holds_a_copy_per_gpu_and_none_on_the_host() -> None:
    footprint = plan(_hand_description(), Layout("MirroredStrategy", ("GPU:0", "GPU:1")))
    assert footprint.per_task() == {"chief:0": 0, "chief:0 GPU:0": 2 * VARIABLES + 4,
                                    "chief:0 GPU:1": 2 * VARIABLES + 4}


def test_each_multi_worker_task_holds_a_copy() -> None:
    footprint = plan(_hand_description(), Layout("MultiWorkerMirroredStrategy", workers=3))
    assert footprint.per_task() == {f"worker:{i}": 2 * VARIABLES + 4 for i in range(3)}


def test_parameter_servers_shard_round_robin_and_slots_follow_their_variable() -> None:
    """3 ps, MinSizePartitioner(16 KiB, one shard per ps): the 64,000-byte table wants
    ceil(64000 / 16384) = 4 shards, at most 3: rows 334, 333, 333 on ps 0, 1, 2; then
    hidden/kernel (2,048 B, whole) on ps 0, hidden/bias on ps 1, out/kernel on ps 2,
    out/bias on ps 0, the step counter on ps 1; each accumulator beside its variable."""
    layout = Layout("ParameterServerStrategy", workers=2, ps=3,
                    partitioning=Partitioning(16 << 10, None))
    footprint = plan(_hand_description(), layout)
    row = 16 * 4
    ps0 = 334 * row + 64 * 8 * 4 + 2 * 4
    ps1 = 333 * row + 8 * 4
    ps2 = 333 * row + 8 * 2 * 4
    assert footprint.per_task() == {"chief:0": 0, "worker:0": 0, "worker:1": 0,
                                    "ps:0": 2 * ps0, "ps:1": 2 * ps1 + 4, "ps:2": 2 * ps2}
    placement = dict(footprint.placement)
    assert placement["table"] == (("ps:0", 334 * row), ("ps:1", 333 * row),
                                  ("ps:2", 333 * row))
    assert placement["accumulator/table"] == placement["table"]
    assert placement["out/bias"] == (("ps:0", 8),)
    assert footprint.largest.task == "ps:0"
    assert footprint.biggest_piece == ("table", 334 * row, 3)
    # The coordinator passes each slot shard's zeros on to its ps.
    assert footprint.tasks[0].initialising == 334 * row


@pytest.mark.parametrize("shape, dtype", [((1000, 16), tf.float32), ((10, 3), tf.float32),
                                          ((7,), tf.float64), ((100_000, 64), tf.float32),
                                          ((5, 1_000_000), tf.float16), ((33, 8), tf.int64)])
@pytest.mark.parametrize("min_shard_bytes, max_shards", [(256 << 10, 4), (1024, 3),
                                                         (1, 8), (16 << 10, 2)])
def test_shard_counts_are_tensorflows(shape, dtype, min_shard_bytes: int,
                                      max_shards: int) -> None:
    partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
        min_shard_bytes=min_shard_bytes, max_shards=max_shards)
    expected = min(partitioner(tf.TensorShape(shape), dtype)[0], shape[0])
    rows = shard_rows(VariableSpec("v", shape, dtype.size, "model"),
                      Partitioning(min_shard_bytes, max_shards), ps=max_shards)
    assert len(rows) == expected and sum(rows) == shape[0]
    assert max(rows) - min(rows) <= 1 and rows == sorted(rows, reverse=True)


def test_mirrored_refusal_is_one_line_with_the_numbers_and_what_would_fit() -> None:
    table = 25_000_000  # rows of 16 floats: 1.6 GB; Adagrad's accumulator as much
    specs = (_spec("big_embedding", (table, 16)),
             _spec("accumulator", (table, 16), "slot", "big_embedding"))
    model = ModelDescription("big", table * 16, specs, "Adagrad")
    footprint = plan(model, Layout("MirroredStrategy", ("CPU:0", "CPU:1")))
    with pytest.raises(ConfigError) as refused:
        check_fits(footprint, Cap(2 << 30, "--task-memory"))
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(
        "the model needs 3.0 GB of variables and slots per replica (1.5 GB variables + "
        "1.5 GB Adagrad slots) under MirroredStrategy, 6.0 GB for its 2 replicas on this "
        "host, above the 2.0 GB a task may use (--task-memory); ")
    # 2 ps: 1.5 GB each fits 2 GB (one shard of each table per ps, 256 KB shards at least).
    assert "use parameter_server_strategy with >= 2 ps (1.5 GB per ps task)" in message
    assert message.endswith("or a cap of at least 6.0 GB (--task-memory)")


def test_too_few_parameter_servers_are_refused_with_the_count_that_fits() -> None:
    specs = (_spec("big_embedding", (1 << 20, 64)),
             _spec("accumulator", (1 << 20, 64), "slot", "big_embedding"))
    model = ModelDescription("big", 64 << 20, specs, "Adagrad")  # 512 MB in all
    layout = Layout("ParameterServerStrategy", workers=1, ps=2,
                    partitioning=Partitioning(256 << 10, None))
    with pytest.raises(ConfigError) as refused:
        check_fits(plan(model, layout), Cap(100 << 20, "--task-memory"))
    message = str(refused.value)
    assert message.startswith("ps:0 needs 256.0 MB of variables and slots (128.0 MB "
                              "variables + 128.0 MB slots; the model 512.0 MB")
    assert "use >= 6 ps (85.3 MB per ps task)" in message  # 512 / 6 <= 100 < 512 / 5
    ps, candidate, unset = fewest_ps(model, layout, 100 << 20)
    assert (ps, unset) == (6, False) and candidate.largest.bytes <= 100 << 20


def test_a_fitting_model_passes_and_warns_when_initialising_may_not() -> None:
    specs = (_spec("big_embedding", (1 << 20, 64)),)  # 256 MB, no slots
    footprint = plan(ModelDescription("big", 64 << 20, specs), Layout("DefaultStrategy"))
    assert check_fits(footprint, Cap(1 << 30, "--task-memory")) is None
    warning = check_fits(footprint, Cap(300 << 20, "--task-memory"))
    assert warning and "may need about 768.0 MB while it initialises them" in warning


def test_a_local_cluster_without_caps_must_fit_the_machine_together() -> None:
    specs = (_spec("big_embedding", (1 << 20, 64)),)  # 256 MB
    footprint = plan(ModelDescription("big", 64 << 20, specs),
                     Layout("MultiWorkerMirroredStrategy", workers=4))
    machine = Cap(600 << 20, "this machine's memory (MemTotal)")
    assert check_fits(footprint, machine, same_host=False)
    with pytest.raises(ConfigError, match="all on this machine, need 1.0 GB"):
        check_fits(footprint, machine, same_host=True)


def test_the_table_names_every_task() -> None:
    layout = Layout("ParameterServerStrategy", workers=1, ps=2,
                    partitioning=Partitioning(16 << 10, None))
    text = plan(_hand_description(), layout).describe()
    lines = text.splitlines()
    assert lines[0].startswith("memory per task under ParameterServerStrategy, 2 ps, "
                               "MinSizePartitioner(16.0 KB, 2 shards)")
    assert [line.split()[0] for line in lines[2:6]] == ["chief:0", "worker:0", "ps:0", "ps:1"]
    assert lines[-1] == "  largest variable or shard: table, 31.2 KB (1 of 2 shards)"
    assert np.isclose(sum(plan(_hand_description(), layout).per_task().values()),
                      2 * VARIABLES + 4)
