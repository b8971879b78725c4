"""Training throughput of the same model, data and global batch under every strategy.

Each strategy runs in fresh processes (as a user would run it): default and mirrored
(2 logical CPU devices) through `lmt run`, multi-worker mirrored (2 workers) and
parameter server (2 workers, 1 ps) through `lmt launch`. Throughput is lmt's own
`examples_per_second` metric (training steps only, validation excluded), read from
MLflow; the first epoch (tracing, start-up) is dropped.

    python benchmarks/strategies.py [--steps 60] [--epochs 4]

Prints a table and writes benchmarks/results/strategies.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LMT = [sys.executable, "-m", "lmt_tf.cli"]
STRATEGIES = {
    "default": (["run"], "@default_strategy"),
    "mirrored (2 logical CPUs)": (["run"], "@mirrored_strategy"),
    "multi-worker (2 processes)": (["launch", "--workers", "2", "--timeout", "900"], None),
    "parameter server (2 workers, 1 ps)": (
        ["launch", "--workers", "2", "--ps", "1", "--timeout", "900"], None),
}


def measure(name: str, command: list[str], strategy: str | None, steps: int, epochs: int,
            batch: int, work: Path) -> dict:
    bindings = [f"TrainConfig.epochs = {epochs}", f"TrainConfig.steps_per_epoch = {steps}",
                f"TrainConfig.global_batch_size = {batch}", "TrainConfig.verbose = 0",
                "ExportConfig.saved_model = False", "ExportConfig.mlflow_model = False"]
    if strategy:
        bindings.append(f"run_experiment.strategy = {strategy}")
    args = [*LMT, *command, str(ROOT / "experiments" / "quickstart.gin")]
    for binding in bindings:
        args += ["--gin_param", binding]
    work.mkdir(parents=True)
    start = time.perf_counter()
    done = subprocess.run(args, cwd=work, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlruns.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = client.get_metric_history(run.info.run_id, "examples_per_second")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)][1:]
    return {"examples_per_second": statistics.median(rates), "per_epoch": rates,
            "wall_seconds": wall, "replicas": int(run.data.tags["lmt.replicas"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=4, help="epochs (the first is dropped)")
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (command, strategy)) in enumerate(STRATEGIES.items()):
            results[name] = measure(name, command, strategy, args.steps, args.epochs,
                                    args.batch, Path(tmp) / f"s{i}")
            print(f"{name}: {results[name]['examples_per_second']:.0f} examples/s",
                  file=sys.stderr)
    base = results["default"]["examples_per_second"]
    for result in results.values():
        result["ratio_to_default"] = result["examples_per_second"] / base
    print(f"{'strategy':<38}{'replicas':>9}{'examples/s':>12}{'ratio':>8}{'wall s':>8}")
    for name, r in results.items():
        print(f"{name:<38}{r['replicas']:>9}{r['examples_per_second']:>12.0f}"
              f"{r['ratio_to_default']:>8.2f}{r['wall_seconds']:>8.1f}")
    out = ROOT / "benchmarks" / "results" / "strategies.json"
    out.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "setup": {"model": "build_cnn (quickstart)", "data": "MNIST",
                  "global_batch": args.batch, "steps_per_epoch": args.steps,
                  "epochs": args.epochs, "dropped_epochs": 1},
        "communication_time": "not reported: TensorFlow exposes all-reduce time only "
                              "through the profiler trace, which this script does not take",
        "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
