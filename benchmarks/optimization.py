"""Costs of the optimisation techniques, on MNIST with the quickstart CNN.

(a) Gradient accumulation: k=8 micro-batches of b=128 against one batch of 8b=1024 —
    steps/s and the peak resident memory of the process (each configuration runs in a
    fresh process, alternating, twice).
(b) Local SGD with H in {1, 4, 16} against synchronous training under multi-worker
    mirrored (2 worker processes via `lmt launch`): examples/s (lmt's own metric, first
    epoch dropped) and the number of weight averagings (all-reduces of the weights).
(c) The clipping chain (global-norm clipping then AGC): lmt's train step with the chain
    against the same step with an identity transform (the chain's own cost), each
    transform alone, and the identity step against the plain Keras step (the custom
    step's cost); the median time of a step, variants interleaved in one process. Also
    the chain with its factors multiplied into the gradients before the update rather
    than inside the compiled update, and with the update not XLA-compiled (Keras' CPU
    default).

    python benchmarks/optimization.py [--steps 20] [--rounds 2]

Prints a table and writes benchmarks/results/optimization.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _train(global_batch: int, micro_batches: int, steps: int) -> float:
    """Steps/s of the second of two epochs (the first traces) of the quickstart CNN."""
    import tf_keras as keras

    from lmt_tf.data.sources import load_mnist
    from lmt_tf.data.splits import Split
    from lmt_tf.models.cnn import build_cnn
    from lmt_tf.runtime.env import set_seed
    from lmt_tf.runtime.strategy import default_strategy
    from lmt_tf.training.train_config import TrainConfig
    from lmt_tf.training.trainer import Trainer

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.start

    splits = load_mnist()
    config = TrainConfig(epochs=2, steps_per_epoch=steps, global_batch_size=global_batch,
                         micro_batches=micro_batches, verbose=0)
    trainer = Trainer(config, default_strategy())
    set_seed(0)
    model = trainer.build_model(build_cnn, splits)
    # No validation: only training steps are timed.
    splits = dataclasses.replace(splits, validation=Split(splits.validation.x[:0],
                                                          splits.validation.y[:0]))
    timer = EpochTimer()
    trainer.fit(model, splits, seed=0, callbacks=[timer])
    return steps / timer.seconds


def child(spec: dict) -> None:
    from lmt_tf.runtime.env import import_tensorflow

    import_tensorflow()
    rate = _train(spec["global_batch"], spec["micro_batches"], spec["steps"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"steps_per_second": rate, "peak_rss_bytes": peak}))


def run_child(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=1800, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def accumulation(steps: int, rounds: int) -> dict:
    configs = {"one batch of 1024": {"global_batch": 1024, "micro_batches": 1},
               "8 micro-batches of 128": {"global_batch": 1024, "micro_batches": 8},
               "one batch of 128 (reference)": {"global_batch": 128, "micro_batches": 1}}
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for r in range(rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for name in order:
            runs[name].append(run_child({**configs[name], "steps": steps}))
            print(f"(a) {name}: {runs[name][-1]}", file=sys.stderr)
    summary = {name: {"steps_per_second": statistics.median(r["steps_per_second"] for r in rs),
                      "peak_rss_mb": statistics.median(r["peak_rss_bytes"] for r in rs) / 2**20,
                      "runs": rs}
               for name, rs in runs.items()}
    big, accumulated = summary["one batch of 1024"], summary["8 micro-batches of 128"]
    summary["throughput_ratio"] = accumulated["steps_per_second"] / big["steps_per_second"]
    summary["memory_ratio"] = accumulated["peak_rss_mb"] / big["peak_rss_mb"]
    return summary


# The chain with its factors multiplied into the gradients before the update, instead of
# inside the compiled update (train_step.UpdateFactors).
UNFUSED = "lmt step, clipping chain, multiplied before the update"


def clipping(block: int, rounds: int) -> dict:
    """Milliseconds per train step of prebuilt quickstart CNNs (MNIST, batch 128), timed
    step by step and interleaved in blocks of ``block`` steps, so that every variant
    sees the same state of the machine; the median step of each variant."""
    from lmt_tf.runtime.env import import_tensorflow

    import_tensorflow()
    import tensorflow as tf

    from lmt_tf.data.sources import load_mnist
    from lmt_tf.models.cnn import build_cnn
    from lmt_tf.optim.transforms import AdaptiveGradientClipping, ClipByGlobalNorm
    from lmt_tf.runtime.env import set_seed
    from lmt_tf.runtime.strategy import default_strategy
    from lmt_tf.training.train_config import TrainConfig
    from lmt_tf.training.trainer import Trainer

    def identity(gradients, variables):
        return gradients

    def chain():
        return ClipByGlobalNorm(1.0), AdaptiveGradientClipping(0.05)

    variants = {  # name: (gradient transforms, TrainConfig.jit_compile_update)
        "plain Keras step": ((), None),  # auto: not compiled (as Keras on CPU)
        "lmt step, identity transform": ((identity,), None),  # auto: compiled
        "lmt step, global-norm clipping": ((ClipByGlobalNorm(1.0),), None),
        "lmt step, AGC": ((AdaptiveGradientClipping(0.05),), None),
        "lmt step, clipping chain": (chain(), None),
        UNFUSED: (chain(), None),
        "lmt step, identity, update not compiled": ((identity,), False),
        "lmt step, clipping chain, update not compiled": (chain(), False),
    }
    splits = load_mnist()
    steps = {}
    for name, (transforms, jit) in variants.items():
        config = TrainConfig(global_batch_size=128, gradient_transforms=transforms,
                             jit_compile_update=jit, verbose=0)
        trainer = Trainer(config, default_strategy())
        set_seed(0)
        model = trainer.build_model(build_cnn, splits)
        if name == UNFUSED:
            model.update_factors = None  # the factors stay 1; the step multiplies first
        input_fn = splits.train.train_input_fn(trainer.plan(splits.train), 0, 0,
                                               trainer.input_config)
        iterator = iter(input_fn(tf.distribute.InputContext()).repeat())
        step = model.make_train_function()
        for _ in range(5):  # trace and compile
            step(iterator)
        steps[name] = (step, iterator)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            step, iterator = steps[name]
            for _ in range(block):
                start = time.perf_counter()
                step(iterator)  # returns when the step has run (eager call, CPU)
                times[name].append(time.perf_counter() - start)
        if (r + 1) % 5 == 0:
            print(f"(c) round {r + 1}/{rounds}", file=sys.stderr)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}

    def cost(name: str, baseline: str) -> float:
        return ms[name] / ms[baseline] - 1

    identity_step = "lmt step, identity transform"
    return {"ms_per_step": ms, "steps_timed": block * rounds,
            "chain_cost": cost("lmt step, clipping chain", identity_step),
            "global_norm_cost": cost("lmt step, global-norm clipping", identity_step),
            "agc_cost": cost("lmt step, AGC", identity_step),
            "chain_cost_factors_multiplied_first": cost(UNFUSED, identity_step),
            "chain_cost_update_not_compiled": cost(
                "lmt step, clipping chain, update not compiled",
                "lmt step, identity, update not compiled"),
            "custom_step_cost": cost(identity_step, "plain Keras step")}


def local_sgd(steps: int) -> dict:
    """Each configuration as a 2-worker cluster of fresh processes."""
    import tempfile

    import mlflow

    rows = {}
    for h in (None, 1, 4, 16):
        with tempfile.TemporaryDirectory() as work:
            bindings = [f"TrainConfig.steps_per_epoch = {steps}", "TrainConfig.epochs = 3",
                        "TrainConfig.verbose = 0", "ExportConfig.saved_model = False",
                        "ExportConfig.mlflow_model = False"]
            if h is not None:
                bindings.append(f"TrainConfig.local_steps = {h}")
            args = [sys.executable, "-m", "lmt_tf.cli", "launch", "--workers", "2",
                    "--timeout", "1200", str(ROOT / "experiments" / "quickstart.gin")]
            for binding in bindings:
                args += ["--gin_param", binding]
            subprocess.run(args, cwd=work, capture_output=True, text=True, timeout=1500,
                           check=True, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
            client = mlflow.MlflowClient(f"sqlite:///{work}/mlruns.db")
            (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
            speed = client.get_metric_history(run.info.run_id, "examples_per_second")
            rates = [m.value for m in sorted(speed, key=lambda m: m.step)][1:]
            averagings = int(run.data.metrics.get("weight_synchronisations", 0))
        rows["synchronous" if h is None else f"H={h}"] = {
            "examples_per_second": statistics.median(rates), "weight_averagings": averagings,
            "gradient_all_reduces": 3 * steps if h is None else 0}
        print(f"(b) {h}: {rows}", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--parts", default="abc", help="which measurements to run, e.g. 'c'")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    out = ROOT / "benchmarks" / "results" / "optimization.json"
    result = json.loads(out.read_text()) if out.exists() else {}
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    if "a" in args.parts:
        result["accumulation"] = accumulation(args.steps, args.rounds)
    if "b" in args.parts:
        result["local_sgd"] = local_sgd(args.steps * 2)
    if "c" in args.parts:
        result["clipping"] = clipping(10, args.rounds * 15)
    acc, clip = result.get("accumulation"), result.get("clipping")
    if acc:
        print(f"{'(a) accumulation, global batch 1024':<42}{'steps/s':>10}{'peak RSS MB':>14}")
        for name in ("one batch of 1024", "8 micro-batches of 128",
                     "one batch of 128 (reference)"):
            print(f"  {name:<40}{acc[name]['steps_per_second']:>10.2f}"
                  f"{acc[name]['peak_rss_mb']:>14.0f}")
        print(f"  accumulated / one batch: throughput {acc['throughput_ratio']:.2f}, "
              f"memory {acc['memory_ratio']:.2f}")
    if "local_sgd" in result:
        print(f"(b) local SGD on 2 workers, 3 epochs of {args.steps * 2} steps (first dropped)")
        for name, row in result["local_sgd"].items():
            print(f"  {name:<40}{row['examples_per_second']:>10.0f} examples/s"
                  f"{row['weight_averagings']:>6} averagings "
                  f"{row['gradient_all_reduces']:>5} gradient all-reduces")
    if clip:
        print(f"(c) median of {clip['steps_timed']} steps each, interleaved")
        for name, ms in clip["ms_per_step"].items():
            print(f"  {name:<56}{ms:>8.2f} ms/step")
        print(f"  cost per step against the identity step: chain "
              f"{100 * clip['chain_cost']:.1f}% (global norm {100 * clip['global_norm_cost']:.1f}%"
              f", AGC {100 * clip['agc_cost']:.1f}%); multiplied before the update, chain "
              f"{100 * clip['chain_cost_factors_multiplied_first']:.1f}%; with the update not "
              f"compiled, chain "
              f"{100 * clip['chain_cost_update_not_compiled']:.1f}%; the lmt step against "
              f"Keras' {100 * clip['custom_step_cost']:.1f}%")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
