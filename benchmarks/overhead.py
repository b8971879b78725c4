"""Overhead of lmt over a hand-written tf-keras ``model.fit``, and input pipeline headroom.

The same model (the quickstart CNN), data (MNIST) and global batch are trained for the
same steps by lmt's own path, ``config.run_parsed`` (MLflow logging and per-epoch
checkpoints included), and by plain ``model.fit`` on a ``tf.data`` pipeline, both
validating on the same 5,000 images after each epoch, alternating, in one process. Then
the lmt input pipeline alone is drained to show it outpaces training.

    python benchmarks/overhead.py [--steps 200] [--rounds 3]

Prints a table and writes benchmarks/results/overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lmt_tf
from lmt_tf.runtime.env import import_tensorflow

import_tensorflow()
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from lmt_tf import config  # noqa: E402
from lmt_tf.config import run_parsed  # noqa: E402
from lmt_tf.data.pipeline import array_train_input_fn, plan_batches  # noqa: E402
from lmt_tf.data.sources import load_mnist  # noqa: E402
from lmt_tf.invocation import RunOptions  # noqa: E402
from lmt_tf.models.cnn import build_cnn  # noqa: E402
from lmt_tf.runtime.env import set_seed  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BATCH = 128  # global batch, as in experiments/quickstart.gin
EPOCHS = 2  # so that per-epoch logging and checkpointing are part of the measurement


class FitTimer(keras.callbacks.Callback):
    """Wall time from the start to the end of model.fit, tracing included for both."""

    def on_train_begin(self, logs=None) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, logs=None) -> None:
        self.seconds = time.perf_counter() - self.start


def plain_fit(splits, steps_per_epoch: int) -> float:
    set_seed(0)
    model = build_cnn(splits.input_shape, splits.num_classes)
    model.compile(keras.optimizers.Adam(0.001), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    data = (tf.data.Dataset.from_tensor_slices((splits.train.x, splits.train.y))
            .shuffle(10_000, seed=0).repeat().batch(BATCH, drop_remainder=True)
            .map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y),
                 num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))
    validation = (tf.data.Dataset.from_tensor_slices((splits.validation.x, splits.validation.y))
                  .batch(BATCH).map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y))
                  .cache().prefetch(tf.data.AUTOTUNE))
    timer = FitTimer()
    model.fit(data, epochs=EPOCHS, steps_per_epoch=steps_per_epoch, callbacks=[timer],
              validation_data=validation, verbose=0)
    return EPOCHS * steps_per_epoch / timer.seconds


def lmt_fit(steps_per_epoch: int, work: Path) -> float:
    bindings = [f"TrainConfig.epochs = {EPOCHS}",
                f"TrainConfig.steps_per_epoch = {steps_per_epoch}",
                f"TrainConfig.global_batch_size = {BATCH}", "TrainConfig.verbose = 0",
                f"run_experiment.work_dir = '{work / 'lmt_work'}'",
                f"TrackingConfig.tracking_uri = 'sqlite:///{work / 'mlruns.db'}'",
                f"TrackingConfig.artifact_root = '{work / 'mlartifacts'}'",
                "ExportConfig.saved_model = False", "ExportConfig.mlflow_model = False"]
    config.parse([str(ROOT / "experiments" / "quickstart.gin")], bindings)
    timer = FitTimer()
    run_parsed(options=RunOptions(callbacks=[timer], echo=lambda _: None))
    return EPOCHS * steps_per_epoch / timer.seconds


def pipeline_rate(splits, batches: int) -> float:
    plan = plan_batches(len(splits.train), BATCH, 1)
    dataset = array_train_input_fn(splits.train, plan, 0, 0)(tf.distribute.InputContext())
    iterator = iter(dataset)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    args = parser.parse_args()
    steps_per_epoch = args.steps // EPOCHS
    splits = load_mnist()
    plain, lmt = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            plain.append(plain_fit(splits, steps_per_epoch))
            lmt.append(lmt_fit(steps_per_epoch, Path(tmp) / f"round{r}"))
            print(f"round {r + 1}: plain {plain[-1]:.2f} steps/s, lmt {lmt[-1]:.2f} steps/s",
                  file=sys.stderr)
    pipeline = pipeline_rate(splits, 2000)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "tensorflow": tf.__version__, "lmt_tf": lmt_tf.__version__,
                    "gpus": len(tf.config.list_physical_devices("GPU"))},
        "setup": {"model": "build_cnn (quickstart)", "data": "MNIST", "global_batch": BATCH,
                  "steps": EPOCHS * steps_per_epoch, "epochs": EPOCHS, "rounds": args.rounds},
        "plain_steps_per_s": plain, "lmt_steps_per_s": lmt,
        "median_plain": statistics.median(plain), "median_lmt": statistics.median(lmt),
        "lmt_over_plain": statistics.median(lmt) / statistics.median(plain),
        "pipeline_batches_per_s": pipeline,
        "pipeline_over_training": pipeline / statistics.median(lmt),
    }
    rows = [("plain tf-keras fit", f"{result['median_plain']:.2f} steps/s", "1.00"),
            ("lmt run_experiment", f"{result['median_lmt']:.2f} steps/s",
             f"{result['lmt_over_plain']:.3f}"),
            ("lmt input pipeline alone", f"{pipeline:.1f} batches/s",
             f"{result['pipeline_over_training']:.1f}x training")]
    print(f"{'what':<28}{'rate':>20}{'ratio':>18}")
    for what, rate, ratio in rows:
        print(f"{what:<28}{rate:>20}{ratio:>18}")
    out = ROOT / "benchmarks" / "results" / "overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
