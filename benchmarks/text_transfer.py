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
import os
import platform
import statistics
import time

from harness import few_shot_rows, run_file, scratch_store, write_result


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
    source_info = {}
    with scratch_store(args.tracking_uri):
        source, started = args.source, time.time()
        if source is not None:
            from lmt_tf.tracking.read import find_run

            given = find_run(source).data
            source_info = {"run": source, "epochs": int(given.params["TrainConfig.epochs"]),
                           "test_accuracy": given.metrics["test_accuracy"]}
        else:
            trained = run_file("20ng_transformer.gin",
                               [f"TrainConfig.epochs = {args.source_epochs}"])
            source = trained["run_id"]
            source_info = {"epochs": args.source_epochs,
                           "test_accuracy": trained["test_accuracy"],
                           "seconds": round(time.time() - started)}
            print(f"source: transformer on 20 Newsgroups, {args.source_epochs} epochs, test "
                  f"accuracy {trained['test_accuracy']:.4f} ({source_info['seconds']} s)",
                  flush=True)
        rows = few_shot_rows(args.shots, args.seeds,
                             ("r8_from_20ng.gin", [f"build_transfer.source = '{source}'"]),
                             ("r8_few_shot.gin", []))
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
    write_result("text_transfer.json",
                 {"machine": platform.platform(), "cpus": os.cpu_count(),
                  "source": source_info,
                  "experiments": ["r8_from_20ng.gin", "r8_few_shot.gin"],
                  "rows": rows, "means": table}, indent=1)


if __name__ == "__main__":
    main()
