"""Text classification against the standard baseline: scikit-learn's TF-IDF + logistic
regression (unigrams, sublinear TF, min_df 2, C in {1, 10, 100} chosen on the validation
split) and lmt's text models, trained from their experiment files, on the same splits
(Cachopo's single-label R8 and 20 Newsgroups; validation held out of train alike).
Test accuracy, mean and spread over seeds (weights, data order and hold-out), beside
the published TextGCN figures (Yao et al. 2019).

    python benchmarks/text.py [--seeds 3] [--first-seed 0] [--data r8 20ng]
                              [--models transformer ...]

Prints a table and writes benchmarks/results/text.json; rows of an earlier invocation
that this one does not measure again (another data set, seed or model) are kept, so the
seeds of a slow data set can be measured in several sittings.
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
from lmt_tf.data import text
from lmt_tf.invocation import RunOptions

ROOT = Path(__file__).resolve().parent.parent
TEXTGCN = {"r8": 0.9707, "r52": 0.9356, "20ng": 0.8634}  # Yao et al. 2019, Table 2
DATA = {
    "r8": (lambda seed: text.load_reuters("r8", seed=seed),
           ["run_experiment.data = @load_reuters", "load_reuters.subset = 'r8'"]),
    "r52": (lambda seed: text.load_reuters("r52", seed=seed),
            ["run_experiment.data = @load_reuters", "load_reuters.subset = 'r52'"]),
    "20ng": (lambda seed: text.load_20newsgroups(seed=seed),
             ["run_experiment.data = @load_20newsgroups"]),
}
# Each lmt model: its experiment file (the data binding replaces the file's data).
MODELS = {"transformer": "r8_transformer.gin",
          "bag_of_embeddings": "r8_bag_of_embeddings.gin",
          "tfidf_mlp": "20ng_tfidf_mlp.gin"}


def tfidf_logistic_regression(splits) -> dict:
    """The baseline: TF-IDF features and an L2 logistic regression fitted on train, C
    chosen by validation accuracy."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    started = time.time()
    vectorizer = TfidfVectorizer(sublinear_tf=True, min_df=2)
    train = vectorizer.fit_transform(splits.train.x)
    validation = vectorizer.transform(splits.validation.x)
    best = None
    for c in (1.0, 10.0, 100.0):
        model = LogisticRegression(C=c, max_iter=2000).fit(train, splits.train.y)
        score = model.score(validation, splits.validation.y)
        if best is None or score > best[0]:
            best = (score, c, model)
    accuracy = best[2].score(vectorizer.transform(splits.test.x), splits.test.y)
    return {"test_accuracy": float(accuracy), "C": best[1], "seconds": time.time() - started}


def lmt_model(file: str, data: list[str], seed: int) -> dict:
    started = time.time()
    config.parse([str(ROOT / "experiments" / file)],
                 [*data, f"run_experiment.seed = {seed}", "TrainConfig.verbose = 0",
                  "ExportConfig.mlflow_model = False"])
    result = config.run_parsed(options=RunOptions(echo=lambda _: None))
    from lmt_tf.tracking.read import find_run

    metrics = find_run(result.run_id).data.metrics
    params = find_run(result.run_id).data.params
    return {"test_accuracy": metrics["test_accuracy"], "seconds": time.time() - started,
            "parameters": int(params["derived.parameters"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--data", nargs="+", default=["r8", "20ng"], choices=list(DATA))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    out = ROOT / "benchmarks" / "results" / "text.json"
    kept = json.loads(out.read_text())["rows"] if out.is_file() else []
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlruns.db'}"
        for name in args.data:
            load, bindings = DATA[name]
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                runs = {"tfidf_logreg": tfidf_logistic_regression(load(seed))}
                for model in args.models:
                    runs[model] = lmt_model(MODELS[model], bindings, seed)
                for model, run in runs.items():
                    rows.append({"data": name, "seed": seed, "model": model, **run})
                    print(f"{name} seed {seed} {model}: {run['test_accuracy']:.4f} "
                          f"({run['seconds']:.0f} s)", flush=True)
                # What is measured so far survives an interruption.
                write(merged(kept, rows), quiet=True)
    write(merged(kept, rows))


def merged(kept: list[dict], rows: list[dict]) -> list[dict]:
    """``kept`` rows that ``rows`` does not measure again, then ``rows``."""
    again = {(r["data"], r["seed"], r["model"]) for r in rows}
    return [r for r in kept if (r["data"], r["seed"], r["model"]) not in again] + rows


def write(rows: list[dict], quiet: bool = False) -> None:
    """The table of ``rows`` (mean and spread over the seeds each data set has) printed
    unless ``quiet``, and everything written to benchmarks/results/text.json."""
    summary, lines = [], ["| data | model | seeds | accuracy | sd | vs TF-IDF+LR | TextGCN | "
                          "seconds |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in dict.fromkeys(r["data"] for r in rows):
        mine = [r for r in rows if r["data"] == name]
        base = statistics.mean(r["test_accuracy"] for r in mine if r["model"] == "tfidf_logreg")
        for model in dict.fromkeys(r["model"] for r in mine):
            scores = [r["test_accuracy"] for r in mine if r["model"] == model]
            mean = statistics.mean(scores)
            sd = statistics.stdev(scores) if len(scores) > 1 else 0.0
            seconds = statistics.mean(r["seconds"] for r in mine if r["model"] == model)
            summary.append({"data": name, "model": model, "seeds": len(scores), "mean": mean,
                            "sd": sd, "minus_baseline": mean - base,
                            "textgcn": TEXTGCN[name], "seconds": seconds})
            lines.append(f"| {name} | {model} | {len(scores)} | {mean:.2%} | {sd:.2%} | "
                         f"{mean - base:+.2%} | {TEXTGCN[name]:.2%} | {seconds:.0f} |")
    out = ROOT / "benchmarks" / "results" / "text.json"
    out.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                               "rows": rows, "summary": summary}, indent=1) + "\n")
    if not quiet:
        print("\ntest accuracy, mean and sd over seeds; TextGCN as published (Yao et al. "
              "2019)\n\n" + "\n".join(lines) + f"\n\nwrote {out}")


if __name__ == "__main__":
    main()
