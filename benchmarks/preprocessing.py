"""Cleaning inside the model on corrupted data: scikit-learn's breast-cancer data with 10%
of its values missing and 2% outliers (x20), an MLP trained by the experiment files
``breast_cancer_naive.gin`` (missing values as 0, nothing else), ``breast_cancer_clean.gin``
(median imputation, quantile clipping, standardisation) and the clean one with
mutual-information selection of 10 of the 30 features. Each seed draws its own
corruption, hold-outs and weights; every variant sees the same ones. Test accuracy, mean
over seeds.

    python benchmarks/preprocessing.py [--seeds 3]

Prints a table and writes benchmarks/results/preprocessing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import lmt_tf  # noqa: F401  (selects tf-keras before TensorFlow is imported)
from lmt_tf import config
from lmt_tf.invocation import RunOptions

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "naive (missing as 0)": ("breast_cancer_naive.gin", []),
    "clean": ("breast_cancer_clean.gin", []),
    "clean + mutual-info top 10": ("breast_cancer_clean.gin", [
        "Preprocessing.select = 'mutual_info'", "Preprocessing.k = 10"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        for label, (file, extra) in VARIANTS.items():
            accuracies = []
            for seed in range(args.seeds):
                config.parse([str(ROOT / "experiments" / file)], [
                    *extra, f"run_experiment.seed = {seed}", f"load_breast_cancer.seed = {seed}",
                    "TrainConfig.verbose = 0", "ExportConfig.mlflow_model = False"])
                result = config.run_parsed(options=RunOptions(echo=lambda _: None))
                accuracies.append(result.test_metrics["accuracy"])
                print(f"{label}, seed {seed}: {accuracies[-1]:.4f}", flush=True)
            rows.append({"variant": label, "experiment": file, "bindings": extra,
                         "test_accuracy": accuracies,
                         "mean": statistics.mean(accuracies)})
    print("\n| variant | test accuracy per seed | mean |\n| --- | --- | --- |")
    for row in rows:
        per_seed = ", ".join(f"{a:.2%}" for a in row["test_accuracy"])
        print(f"| {row['variant']} | {per_seed} | {row['mean']:.2%} |")
    out = ROOT / "benchmarks" / "results" / "preprocessing.json"
    out.write_text(json.dumps({"machine": platform.platform(), "processor": os.cpu_count(),
                               "data": "breast_cancer, 10% missing, 2% outliers x20",
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
