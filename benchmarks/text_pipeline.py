"""The text input pipeline against what training consumes: examples per second that the
R8 training pipeline yields alone (documents gathered by the seeded order, batched,
prefetched; the tokenizer is inside the model), and that training of the R8 transformer
takes in (``r8_transformer.gin``'s model, tokenizer and batch), in the same process, with
length bucketing off and on. The pipeline must run >= 5x faster than training consumes.

    python benchmarks/text_pipeline.py [--steps 60]

Prints a table and writes benchmarks/results/text_pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import lmt_tf  # noqa: F401  (selects tf-keras before TensorFlow is imported)
from lmt_tf import config
from lmt_tf.experiment import prepare
from lmt_tf.invocation import RunOptions

ROOT = Path(__file__).resolve().parent.parent


def rates(bucket: int, steps: int) -> dict:
    import tensorflow as tf

    config.parse([str(ROOT / "experiments" / "r8_transformer.gin")],
                 [f"InputConfig.bucket_by_length = {bucket}", "TrainConfig.verbose = 0"])
    setup = prepare(config.experiment(), RunOptions(echo=lambda _: None))
    plan, split = setup.plan, setup.splits.train
    input_fn = split.train_input_fn(plan, 0, 0, setup.configs.input)
    dataset = input_fn(tf.distribute.InputContext())
    batches = iter(dataset)
    next(batches)  # the first batch builds the pipeline
    started = time.perf_counter()
    for _ in range(steps * 5):
        next(batches)
    pipeline = steps * 5 * plan.global_batch_size / (time.perf_counter() - started)

    model = setup.trainer.build_model(setup.model_fn, setup.splits)
    train = iter(input_fn(tf.distribute.InputContext()))
    model.train_on_batch(*next(train))  # traces the step
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(*next(train))
    training = steps * plan.global_batch_size / (time.perf_counter() - started)
    return {"bucket_by_length": bucket, "pipeline_examples_per_s": pipeline,
            "training_examples_per_s": training, "ratio": pipeline / training}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps timed")
    args = parser.parse_args()
    rows = [rates(bucket, args.steps) for bucket in (0, 8)]
    print("| bucket_by_length | pipeline (documents/s) | training (documents/s) | ratio |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['bucket_by_length']} | {r['pipeline_examples_per_s']:,.0f} | "
              f"{r['training_examples_per_s']:,.0f} | {r['ratio']:.0f}x |")
    out = ROOT / "benchmarks" / "results" / "text_pipeline.json"
    out.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                               "experiment": "r8_transformer.gin", "rows": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
