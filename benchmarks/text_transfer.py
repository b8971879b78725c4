"""Few-shot transfer on text: the transformer of experiments/20ng_transformer.gin (trained
on 20 Newsgroups) carried to N documents per class of Reuters R8 with its tokenizer and
encoder (experiments/r8_from_20ng.gin), against the same transformer trained from scratch
on the same documents with a tokenizer fitted on them (experiments/r8_few_shot.gin: same
epochs, batch, optimizer), and the prototype baseline (nearest class mean of the source's
pooled encodings, no training). Test accuracy on R8's 2,189 test documents, mean and
spread over seeds (each seed draws its own N per class and initial weights).

    python benchmarks/text_transfer.py [--seeds 3] [--shots 1 5 10 50] [--source RUN_ID]
                                       [--source-epochs 5]

Prints a table and writes benchmarks/results/text_transfer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lmt_tf  # noqa: F401  (selects tf-keras before TensorFlow is imported)
from lmt_tf import config
from lmt_tf.invocation import RunOptions

ROOT = Path(__file__).resolve().parent.parent


def _run(file: str, bindings: list[str]) -> dict:
    config.parse([str(ROOT / "experiments" / file)],
                 [*bindings, "TrainConfig.verbose = 0", "ExportConfig.mlflow_model = False"])
    result = config.run_parsed(options=RunOptions(echo=lambda _: None))
    from lmt_tf.tracking.read import find_run

    return {"run_id": result.run_id, **find_run(result.run_id).data.metrics}


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 50])
    parser.add_argument("--source", default=None,
                        help="an earlier 20ng_transformer run (default: train one here)")
    parser.add_argument("--source-epochs", type=int, default=5,
                        help="epochs of the source trained here")
    parser.add_argument("--tracking-uri", default=None,
                        help="the store of --source (default: a new one in a temporary "
                             "directory)")
    args = parser.parse_args()
    rows, source_info = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = (args.tracking_uri
                                             or f"sqlite:///{Path(tmp) / 'mlruns.db'}")
        source, started = args.source, time.time()
        if source is not None:
            from lmt_tf.tracking.read import find_run

            given = find_run(source).data
            source_info = {"run": source, "epochs": int(given.params["TrainConfig.epochs"]),
                           "test_accuracy": given.metrics["test_accuracy"]}
        else:
            trained = _run("20ng_transformer.gin",
                           [f"TrainConfig.epochs = {args.source_epochs}"])
            source = trained["run_id"]
            source_info = {"epochs": args.source_epochs,
                           "test_accuracy": trained["test_accuracy"],
                           "seconds": round(time.time() - started)}
            print(f"source: transformer on 20 Newsgroups, {args.source_epochs} epochs, test "
                  f"accuracy {trained['test_accuracy']:.4f} ({source_info['seconds']} s)",
                  flush=True)
        for shots in args.shots:
            for seed in range(args.seeds):
                common = [f"few_shot.per_class = {shots}", f"few_shot.seed = {seed}",
                          f"run_experiment.seed = {seed}"]
                transfer = _run("r8_from_20ng.gin",
                                [*common, f"build_transfer.source = '{source}'"])
                scratch = _run("r8_few_shot.gin", common)
                row = {"shots": shots, "seed": seed,
                       "transfer": transfer["test_accuracy"],
                       "scratch": scratch["test_accuracy"],
                       "prototypes": transfer["prototypes/test_accuracy"]}
                rows.append(row)
                print(f"N={shots} seed {seed}: transfer {row['transfer']:.4f}, scratch "
                      f"{row['scratch']:.4f}, prototypes {row['prototypes']:.4f}", flush=True)
    table = []
    print(f"\nReuters R8 test accuracy, mean (standard deviation) of {args.seeds} seeds\n")
    print("| N per class | transfer from 20 Newsgroups | from scratch | prototypes |")
    print("| --- | --- | --- | --- |")
    for shots in args.shots:
        mine = [r for r in rows if r["shots"] == shots]
        stats = {k: (statistics.mean(r[k] for r in mine), _spread([r[k] for r in mine]))
                 for k in ("transfer", "scratch", "prototypes")}
        table.append({"shots": shots, **{k: v[0] for k, v in stats.items()},
                      **{f"{k}_std": v[1] for k, v in stats.items()},
                      "transfer_wins": sum(r["transfer"] > r["scratch"] for r in mine)})
        print("| " + " | ".join([str(shots)] + [f"{m:.2%} ({s:.2%})"
                                                for m, s in stats.values()]) + " |")
    out = ROOT / "benchmarks" / "results" / "text_transfer.json"
    out.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                               "source": source_info,
                               "experiments": ["r8_from_20ng.gin", "r8_few_shot.gin"],
                               "rows": rows, "means": table}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
