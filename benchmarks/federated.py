"""Speed of the federated simulation: FedAvg rounds against central training of the same
model (the quickstart CNN) with the same optimizer (SGD) and batch size, on MNIST.

Central: Keras ``fit`` on the training split in batches of B, the second epoch of
``--steps`` steps timed (the first traces). Federated: rounds of FedAvg with 100 IID
clients, C = 0.1, E = 1 and the same B, timed without evaluation; examples/s counts the
examples the clients trained on. The two alternate for ``--repeats`` rounds each; the
ratio is of the medians. Time per round is reported as measured.

    python benchmarks/federated.py [--batch 10] [--rounds 6] [--steps 600]

Prints a table and writes benchmarks/results/federated.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from lmt_tf.runtime.env import import_tensorflow, set_seed

import_tensorflow()
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from lmt_tf.data.pipeline import label_array, to_model_input  # noqa: E402
from lmt_tf.data.sources import load_mnist  # noqa: E402
from lmt_tf.federated.client import ClientModel  # noqa: E402
from lmt_tf.federated.config import FederatedConfig  # noqa: E402
from lmt_tf.federated.partition import PartitionConfig, partition  # noqa: E402
from lmt_tf.federated.rounds import Federation  # noqa: E402
from lmt_tf.models.cnn import build_cnn  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LEARNING_RATE = 0.05


def central(splits, batch: int, steps: int) -> float:
    """Examples/s of Keras fit, second epoch of ``steps`` steps."""
    set_seed(0)
    model = build_cnn(input_shape=splits.input_shape, num_classes=splits.num_classes)
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE, jit_compile=False),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    data = tf.data.Dataset.from_tensor_slices((splits.train.x, label_array(splits.train.y)))
    data = data.shuffle(len(splits.train), seed=0).repeat().batch(batch).map(
        lambda x, y: (to_model_input(x), y)).prefetch(tf.data.AUTOTUNE)

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.start

    timer = Timer()
    model.fit(data, epochs=2, steps_per_epoch=steps, verbose=0, callbacks=[timer])
    return steps * batch / timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (and epochs)")
    parser.add_argument("--steps", type=int, default=600, help="central steps per epoch")
    args = parser.parse_args()
    splits = load_mnist()
    config = FederatedConfig(rounds=args.rounds + 1, client_fraction=0.1, local_epochs=1,
                             local_batch_size=args.batch, client_learning_rate=LEARNING_RATE)
    parts = partition(splits.train.y, PartitionConfig(clients=100), seed=0)
    federation = Federation(config, parts, splits.train, seed=0)
    set_seed(0)
    client = ClientModel(build_cnn, splits.input_shape, splits.num_classes, config,
                         feature_dtype=splits.train.x.dtype)
    state = federation.initial_state(client.get_weights())
    central_rates, federated_rates, round_seconds = [], [], []
    for round_ in range(1, args.rounds + 2):
        started = time.perf_counter()
        results = [client.fit(state.weights, federation.client_split(k), 0, round_, int(k))
                   for k in federation.sample(round_)]
        state, record = federation.close_round(state, results, round_, started,
                                               evaluate=lambda _: {})  # timed without it
        seconds = record.seconds
        if round_ == 1:
            continue  # traces the local loop
        round_seconds.append(seconds)
        federated_rates.append(sum(r.examples for r in results) / seconds)
        central_rates.append(central(splits, args.batch, args.steps))
        print(f"round {round_ - 1}/{args.rounds}: federated {federated_rates[-1]:.0f}, "
              f"central {central_rates[-1]:.0f} examples/s", flush=True)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": "quickstart CNN (build_cnn)", "batch_size": args.batch,
        "clients": 100, "clients_per_round": 10, "local_epochs": 1,
        "traces": client.traces,
        "seconds_per_round": statistics.median(round_seconds),
        "federated_examples_per_second": statistics.median(federated_rates),
        "central_examples_per_second": statistics.median(central_rates),
        "runs": {"federated": federated_rates, "central": central_rates,
                 "round_seconds": round_seconds},
    }
    result["ratio"] = (result["federated_examples_per_second"]
                       / result["central_examples_per_second"])
    print(f"\n{'':28}{'examples/s':>12}")
    print(f"{'central (Keras fit)':28}{result['central_examples_per_second']:12.0f}")
    print(f"{'federated (FedAvg rounds)':28}{result['federated_examples_per_second']:12.0f}")
    print(f"ratio federated/central {result['ratio']:.3f}; "
          f"{result['seconds_per_round']:.2f} s per round of 10 clients x 600 examples; "
          f"local loop traced {client.traces} time(s)")
    out = ROOT / "benchmarks" / "results" / "federated.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
