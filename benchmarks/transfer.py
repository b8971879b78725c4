"""Transfer and few-shot learning: the quickstart CNN trained on MNIST, its head replaced
and its convolutions frozen, fine-tuned on N examples per class of a new task, against
the same CNN trained from scratch on the same N examples (same epochs, batch, optimizer),
and the prototype baseline (nearest class mean of the source's embeddings, no training).
The new task is Fashion-MNIST where Debian's dataset-fashion-mnist is installed, else
scikit-learn's digits drawn as MNIST stores its digits (20x20 in 28x28). Test accuracy
on the whole test split, mean over seeds (each seed draws its own N examples per class
and initial weights).

    python benchmarks/transfer.py [--seeds 3] [--shots 1 5 10 50] [--source RUN_ID]

Prints a table and writes benchmarks/results/transfer.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

from harness import few_shot_rows, run_file, scratch_store, write_result

from lmt_tf.data.sources import FASHION_MNIST_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 50])
    parser.add_argument("--source", default=None,
                        help="an earlier quickstart run (default: train one here)")
    args = parser.parse_args()
    fashion = Path(FASHION_MNIST_DIR).is_dir()
    file = "fashion_transfer.gin" if fashion else "digits_transfer.gin"
    with scratch_store():
        source, started = args.source, time.time()
        if source is None:
            trained = run_file("quickstart.gin", [])
            source = trained["run_id"]
            print(f"source: quickstart CNN on MNIST, test accuracy "
                  f"{trained['test_accuracy']:.4f} ({time.time() - started:.0f} s)", flush=True)
        rows = few_shot_rows(
            args.shots, args.seeds, (file, [f"build_transfer.source = '{source}'"]),
            (file, ["run_experiment.model = @build_cnn", "run_experiment.stages = [@train()]"]),
            per_shots=lambda shots: [f"TrainConfig.global_batch_size = {min(50, 10 * shots)}"])
    table = []
    print(f"\nnew task: {'Fashion-MNIST' if fashion else 'digits 28x28'}; "
          f"mean of {args.seeds} seeds\n")
    print("| N per class | transfer (frozen convs) | from scratch | prototypes (no training) |")
    print("| --- | --- | --- | --- |")
    for shots in args.shots:
        mine = [r for r in rows if r["shots"] == shots]
        means = {k: statistics.mean(r[k] for r in mine)
                 for k in ("transfer", "scratch", "prototypes")}
        table.append({"shots": shots, **means})
        print(f"| {shots} | {means['transfer']:.2%} | {means['scratch']:.2%} | "
              f"{means['prototypes']:.2%} |")
    write_result("transfer.json", {"machine": platform.platform(), "cpus": os.cpu_count(),
                                   "task": "fashion_mnist" if fashion else "digits_28x28",
                                   "experiment": file, "rows": rows, "means": table}, indent=1)


if __name__ == "__main__":
    main()
