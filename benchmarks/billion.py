"""A billion-parameter DLRM on parameter servers, end to end (issue 21), run by hand:

  (a) the pre-flight of experiments/clicklog_dlrm_1b.gin: its parameters (>= 10^9) and
      each task's bytes under 2 workers and 4 ps, worked out without allocating the
      model, and the one-line refusal of the same model under mirrored_strategy with the
      task cap;
  (b) examples/s of training it with `lmt launch --workers 2 --ps 4 --task-memory CAP`
      for a fixed number of steps, and the same at 1/100 of the size
      (experiments/clicklog_dlrm_ps.gin: same data, same batch);
  (c) every task's peak RSS (each below the full table's bytes while training), the
      checkpoint's bytes and save seconds, and a restore's seconds and peaks (the job
      resumed once, under --resume-cap: a restore briefly holds a ps task's share twice);
  (d) the export: the SavedModel's bytes, its load seconds and peak RSS in a fresh
      process (a serving process holds the whole table), and raw rows answered;
  (e) quality: test log-loss and AUC of experiments/clicklog_dlrm.gin's DLRM (default
      strategy) and of the logistic-regression baseline experiments/clicklog_wide.gin,
      trained on the same larger click log, against the data's Bayes optimum.

Prints a table and writes benchmarks/results/billion.json (after every phase, so a run
stopped early keeps what it measured). Data and runs go under --root (not the repo):

  python benchmarks/billion.py --root /work/bench-billion/run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
REFERENCE = "experiments/clicklog_dlrm_1b.gin"
SMALL = "experiments/clicklog_dlrm_ps.gin"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3",
       "CUDA_VISIBLE_DEVICES": "-1"}
LMT = [sys.executable, "-m", "lmt_tf.cli"]
PEAK = re.compile(r"^\s+((?:chief|worker|ps):\d+)\s+(\S+ [KMGT]?B)\s+(\S+ [KMGT]?B)", re.M)


def lmt(args: list[str], cwd: Path, log: Path, timeout: float) -> tuple[int, str, float]:
    """Runs ``lmt ARGS`` in ``cwd``; its exit status, output (also written to ``log``) and
    wall seconds."""
    cwd.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done = subprocess.run([*LMT, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    seconds = time.perf_counter() - start
    out = done.stdout + done.stderr
    log.write_text(out)
    print(f"  lmt {' '.join(args[:2])} ... -> exit {done.returncode} in {seconds:.0f} s "
          f"(log {log})", flush=True)
    return done.returncode, out, seconds


def only_run(cwd: Path) -> Any:
    """The one MLflow run in the store of ``cwd``."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlruns.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(ids)
    return client, run


def history(client: Any, run: Any, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key),
                                    key=lambda m: (m.step, m.timestamp))]


def data_bindings(root: Path, rows: int | None = None) -> list[str]:
    directory = root / "data" / (f"clicklog-{rows // 10**6}m" if rows else "clicklog-billion")
    bindings = [f"load_clicklog.directory = '{directory}'"]
    if rows:
        bindings.append(f"ClickLogConfig.train_examples = {rows}")
    return [a for b in bindings for a in ("--gin_param", b)]


def preflight(root: Path, cap: str) -> dict[str, Any]:
    """(a): the dry run of the reference (its parameters; one process would hold it all),
    its per-task table under 2 workers and 4 ps (what the chief's pre-flight works out,
    here without starting a cluster), and the one-line refusal of the same model under
    mirrored_strategy with the task cap (a dry run: refused before anything is built)."""
    import gin

    from lmt_tf.config import experiment
    from lmt_tf.config.reading import parse
    from lmt_tf.process import TASK_MEMORY_ENV
    from lmt_tf.runtime.footprint import PS_STRATEGY, Layout, describe_model, plan
    from lmt_tf.runtime.memory import parse_size
    from lmt_tf.runtime.strategy import Partitioning

    default = ["--gin_param", "run_experiment.strategy = @default_strategy"]
    _, out, seconds = lmt(["run", str(REPO / REFERENCE), "--dry-run", *default,
                           *data_bindings(root)], root / "preflight",
                          root / "preflight-dry-run.log", 1800)
    printed = next((line for line in out.splitlines() if " parameters" in line), "")
    print("  " + printed)
    parse([str(REPO / REFERENCE)], [])
    exp = experiment()
    train = exp.configs.train
    start = time.perf_counter()
    description = describe_model(lambda: exp.model(input_shape=(39,), num_classes=2),
                                 train.optimizer, train.precision, train.embedding_optimizer)
    layout = Layout(PS_STRATEGY, ("CPU:0",), 2, 4, Partitioning(
        gin.query_parameter("parameter_server_strategy.min_shard_bytes"), None))
    footprint = plan(description, layout)
    described = time.perf_counter() - start
    print(footprint.describe())
    ENV[TASK_MEMORY_ENV] = str(parse_size(cap))
    try:
        code, out, _ = lmt(["run", str(REPO / REFERENCE), "--dry-run", "--gin_param",
                            "run_experiment.strategy = @mirrored_strategy",
                            *data_bindings(root)],
                           root / "preflight", root / "preflight-mirrored.log", 1800)
    finally:
        del ENV[TASK_MEMORY_ENV]
    refusal = next((line for line in out.splitlines() if line.startswith("lmt: error")), "")
    print("  " + refusal)
    return {"dry_run_line": printed, "dry_run_seconds": round(seconds, 1),
            "parameters": description.parameters, "variable_bytes": description.variable_bytes,
            "slot_bytes": description.slot_bytes, "optimizers": description.optimizer,
            "per_task_bytes": footprint.per_task(), "ps_table": footprint.describe(),
            "described_in_seconds": round(described, 2),
            "mirrored_refusal": refusal, "mirrored_exit_status": code}


def train_on_ps(root: Path, file: str, name: str, cap: str, steps: int, timeout: float,
                export: bool = True, resume_cap: str | None = None) -> dict[str, Any]:
    """(b), (c): ``file`` trained for ``steps`` steps on 2 workers and 4 ps under the cap
    (the SavedModel exported if ``export``); with ``resume_cap``, the finished job is
    resumed once (``--resume``: the checkpoint restored, nothing left to train) under that
    cap, to time a restore. A restore holds a ps task's share twice for a moment (its
    variables, and the tensors TensorFlow's RestoreV2 reads for all of them at once), so
    it needs a larger cap than training."""
    cwd = root / name
    base = ["--workers", "2", "--ps", "4", "--run-name", name,
            "--gin_param", f"TrainConfig.steps_per_epoch = {steps}",
            "--gin_param", "ExportConfig.mlflow_model = False", *data_bindings(root)]
    if not export:
        base += ["--gin_param", "ExportConfig.saved_model = False"]
    code, out, seconds = lmt(["launch", str(REPO / file), "--task-memory", cap, *base], cwd,
                             root / f"{name}-1.log", timeout)
    result: dict[str, Any] = {"exit_status": [code], "wall_seconds": [round(seconds, 1)],
                              "caps": [cap],
                              "peaks": [dict((t, r) for t, r, _ in PEAK.findall(out))]}
    if code == 0 and resume_cap:
        code, out, seconds = lmt(["launch", str(REPO / file), "--task-memory", resume_cap,
                                  *base, "--resume"], cwd, root / f"{name}-2.log", timeout)
        result["exit_status"].append(code)
        result["wall_seconds"].append(round(seconds, 1))
        result["caps"].append(resume_cap)
        result["peaks"].append(dict((t, r) for t, r, _ in PEAK.findall(out)))
    return collect(cwd, result)


def collect(cwd: Path, result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with what the one run in ``cwd`` logged."""
    client, run = only_run(cwd)
    metrics = run.data.metrics
    result.update({
        "run_status": run.info.status,
        "parameters": int(run.data.params.get("derived.parameters", 0)),
        "examples_per_second": [round(v, 1) for v in history(client, run,
                                                               "examples_per_second")],
        # one value per launch: training, then the resume
        "peak_rss_bytes": {k.rsplit("/", 1)[1]: history(client, run, k) for k in metrics
                           if k.startswith("memory/peak_rss_bytes/")},
        "peak_charged_bytes": {k.rsplit("/", 1)[1]: history(client, run, k) for k in metrics
                               if k.startswith("memory/peak_charged_bytes/")},
        "checkpoint_bytes": metrics.get("checkpoint/bytes"),
        "checkpoint_save_seconds": history(client, run, "checkpoint/save_seconds"),
        "checkpoint_restore_seconds": history(client, run, "checkpoint/restore_seconds"),
        "saved_model_bytes": metrics.get("export.saved_model_bytes"),
        "test_loss": metrics.get("test_loss"), "test_click_auc": metrics.get("test_click_auc"),
        "bayes_test_logloss": metrics.get("data/bayes_test_logloss"),
        "bayes_test_auc": metrics.get("data/bayes_test_auc"),
    })
    saved = sorted(cwd.glob("lmt_work/*/*/export/saved_model"))
    result["saved_model"] = str(saved[-1]) if saved else None
    return result


SERVE = r"""
import json, resource, sys, time
import lmt_tf  # tf-keras before TensorFlow
import numpy as np
import tensorflow as tf
from lmt_tf.data.tfrecord import load_tfrecords
start = time.perf_counter()
model = tf.saved_model.load(sys.argv[1])
load = time.perf_counter() - start
serve = model.signatures["serving_default"]
rows = load_tfrecords(sys.argv[2]).test.sample(4)
(name,) = serve.structured_input_signature[1]
start = time.perf_counter()
out = list(serve(**{name: tf.constant(rows)}).values())[0].numpy()
answer = time.perf_counter() - start
print(json.dumps({"load_seconds": load, "answer_seconds": answer,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "rows": rows.tolist(), "click_probability": out[:, 1].tolist()}))
"""


def serve(saved_model: str, data: Path) -> dict[str, Any]:
    """(d): the SavedModel loaded in a fresh process, answering 4 raw test rows."""
    done = subprocess.run([sys.executable, "-c", SERVE, saved_model, str(data)], env=ENV,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["saved_model_bytes"] = sum(f.stat().st_size for f in Path(saved_model).rglob("*")
                                      if f.is_file())
    return result


def quality(root: Path, rows: int, timeout: float) -> dict[str, Any]:
    """(e): the DLRM (clicklog_dlrm.gin) and the wide baseline (clicklog_wide.gin) on the
    same ``rows``-row click log, default strategy."""
    result = {}
    for file, name in (("experiments/clicklog_dlrm.gin", "dlrm"),
                       ("experiments/clicklog_wide.gin", "wide")):
        cwd = root / f"quality-{name}"
        code, out, seconds = lmt(["run", str(REPO / file), *data_bindings(root, rows),
                                  "--gin_param", "ExportConfig.mlflow_model = False"],
                                 cwd, root / f"quality-{name}.log", timeout)
        client, run = only_run(cwd)
        metrics = run.data.metrics
        result[name] = {"exit_status": code, "wall_seconds": round(seconds, 1),
                        "parameters": int(run.data.params.get("derived.parameters", 0)),
                        "test_logloss": metrics.get("test_loss"),
                        "test_auc": metrics.get("test_click_auc"),
                        "val_auc": history(client, run, "val_click_auc"),
                        "examples_per_second": history(client, run, "examples_per_second")}
        result["bayes_test_logloss"] = metrics.get("data/bayes_test_logloss")
        result["bayes_test_auc"] = metrics.get("data/bayes_test_auc")
    result["train_rows"] = rows
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/work/bench-billion/run"))
    parser.add_argument("--cap", default="3.5GiB", help="--task-memory of every task")
    parser.add_argument("--resume-cap", default="5GiB",
                        help="--task-memory of the resumed job (a restore's transient)")
    parser.add_argument("--steps", type=int, default=200, help="training steps timed")
    parser.add_argument("--quality-rows", type=int, default=4_000_000)
    parser.add_argument("--phases", default="preflight,small,reference,serve,quality")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per launch")
    args = parser.parse_args()
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    phases = args.phases.split(",")
    out = RESULTS / "billion.json"
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}

    def save() -> None:
        from benchmarks.harness import machine

        result["machine"] = {**machine(), "memory_bytes": os.sysconf("SC_PAGE_SIZE")
                             * os.sysconf("SC_PHYS_PAGES")}
        RESULTS.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")

    result["settings"] = {"cap": args.cap, "steps": args.steps, "global_batch_size": 1024,
                          "workers": 2, "ps": 4, "quality_rows": args.quality_rows}
    if "preflight" in phases:
        print("(a) pre-flight of the reference", flush=True)
        result["preflight"] = preflight(root, args.cap)
        save()
    if "small" in phases:
        print("(b) 1/100 size on 2 workers + 4 ps", flush=True)
        result["small"] = train_on_ps(root, SMALL, "small", args.cap, args.steps,
                                      args.timeout)
        save()
    if "reference" in phases:
        print("(b, c) the reference on 2 workers + 4 ps, then resumed once", flush=True)
        result["reference"] = train_on_ps(root, REFERENCE, "reference", args.cap, args.steps,
                                          args.timeout, export=False,
                                          resume_cap=args.resume_cap)
        save()
        print("(d) the reference trained again and exported", flush=True)
        result["export"] = train_on_ps(root, REFERENCE, "export", args.cap, args.steps,
                                       args.timeout)
        save()
    if "serve" in phases and result.get("export", {}).get("saved_model"):
        print("(d) the exported reference in a fresh process", flush=True)
        result["serve"] = serve(result["export"]["saved_model"],
                                root / "data" / "clicklog-billion")
        save()
    if "quality" in phases:
        print(f"(e) quality on {args.quality_rows:,} rows", flush=True)
        result["quality"] = quality(root, args.quality_rows, args.timeout)
        save()
    report(result)
    print(f"wrote {out}")


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e9:.2f} GB"


def report(result: dict[str, Any]) -> None:
    """The table of what was measured."""
    pre = result.get("preflight")
    if pre:
        print(f"reference: {pre['parameters']:,} parameters, {_gb(pre['variable_bytes'])} "
              f"variables + {_gb(pre['slot_bytes'])} slots ({pre['optimizers']})")
        for task, size in pre["per_task_bytes"].items():
            print(f"  pre-flight {task:9s} {_gb(size)}")
        print(f"  mirrored: {pre['mirrored_refusal']}")
    for key in ("small", "reference", "export"):
        run = result.get(key)
        if not run:
            continue
        print(f"{key}: {run['parameters']:,} parameters; examples/s per epoch "
              f"{run['examples_per_second']}; status {run['run_status']}")
        for task, peaks in sorted(run["peak_rss_bytes"].items()):
            print(f"  peak RSS {task:9s} " + " / ".join(_gb(p) for p in peaks))
        print(f"  checkpoint {_gb(run['checkpoint_bytes'])}, save s "
              f"{[round(s, 1) for s in run['checkpoint_save_seconds']]}, restore s "
              f"{[round(s, 1) for s in run['checkpoint_restore_seconds']]}; SavedModel "
              f"{_gb(run['saved_model_bytes'])}; test log-loss {run['test_loss']}, AUC "
              f"{run['test_click_auc']}")
    served = result.get("serve")
    if served and "load_seconds" in served:
        print(f"serving: {_gb(served['saved_model_bytes'])} loaded in "
              f"{served['load_seconds']:.1f} s, peak RSS {_gb(served['peak_rss_bytes'])}, "
              f"click probabilities {[round(p, 4) for p in served['click_probability']]}")
    q = result.get("quality")
    if q:
        print(f"quality on {q['train_rows']:,} rows: Bayes log-loss "
              f"{q['bayes_test_logloss']:.4f}, AUC {q['bayes_test_auc']:.4f}")
        for name in ("dlrm", "wide"):
            print(f"  {name}: log-loss {q[name]['test_logloss']:.4f}, AUC "
                  f"{q[name]['test_auc']:.4f} ({q[name]['parameters']:,} parameters, "
                  f"{q[name]['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
