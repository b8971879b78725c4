"""Serving on raw text: does the MLflow model of the R8 transformer, behind
``mlflow models serve``, answer R8's test stories as the run measured them?

Trains ``experiments/r8_evaluate.gin`` with ``lmt run`` (train, export, evaluate), then
starts the scoring server on the logged model (``--env-manager local``, 127.0.0.1),
posts all 2,189 raw test stories as JSON lists of strings (``{"inputs": [...]}``),
takes each answer's most probable class by its name, and compares the accuracy with the
run's logged ``test_accuracy`` (target: within 0.2 points). Also the served latency per
document (one story per request, and batches of 256) and a sample answer.

    python benchmarks/serving.py [--epochs N] [--keep DIR]

Prints a summary and writes benchmarks/results/serving.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = ROOT / "experiments" / "r8_evaluate.gin"
BATCH = 256  # stories per request of the accuracy pass
SINGLE = 200  # requests of one story each, for the latency at batch 1
TARGET = 0.2  # points of accuracy the served model may differ from the logged one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, documents: list[str]) -> list[dict[str, float]]:
    """The scoring server's answer for ``documents``: one record per story."""
    request = urllib.request.Request(url, data=json.dumps({"inputs": documents}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as reply:
        return json.load(reply)["predictions"]


def wait_for_health(base: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"mlflow models serve did not answer within {timeout:.0f} s")


def printed_lines(log: str) -> list[str]:
    """What the server printed, but its access log (a line per request) and the
    intermediate states of a progress bar (its last, 100%, is kept)."""
    return [line[:300] for line in log.splitlines() if line.strip()
            and "/invocations" not in line and not ("it/s]" in line and "100%" not in line)]


def train(work: Path, epochs: int | None) -> tuple[str, dict[str, float], str, float]:
    """Runs the experiment with ``lmt run`` in ``work``; returns the run id, its
    metrics, what lmt printed and the seconds it took."""
    command = [sys.executable, "-m", "lmt_tf.cli", "run", str(EXPERIMENT)]
    if epochs is not None:
        command += ["--gin_param", f"TrainConfig.epochs = {epochs}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True,
                          check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"lmt run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                order_by=["attributes.start_time DESC"], max_results=1)
    return run.info.run_id, run.data.metrics, done.stdout + done.stderr, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None,
                        help="TrainConfig.epochs (default: the experiment's)")
    parser.add_argument("--keep", default=None,
                        help="a directory for the store and run files (default: temporary)")
    parser.add_argument("--output", default="serving.json",
                        help="file name under benchmarks/results/")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from lmt_tf.data.text import load_reuters

    test = load_reuters().test
    classes = load_reuters().class_names
    documents = [str(doc) for doc in test.x]
    labels = [classes[i] for i in test.y]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlruns.db'}"
        run_id, metrics, printed, train_seconds = train(work, args.epochs)
        print(printed, flush=True)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
                                     f"{os.environ.get('PATH', '')}"}
        env.pop("TF_USE_LEGACY_KERAS", None)  # the served model needs no lmt_tf, no Keras
        log = work / "serve.log"
        with log.open("w") as output:
            server = subprocess.Popen(
                [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                 f"runs:/{run_id}/model", "--env-manager", "local", "--host", "127.0.0.1",
                 "--port", str(port), "--workers", "1"], cwd=work, env=env, stdout=output,
                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            start = time.perf_counter()
            wait_for_health(base, server)
            startup = time.perf_counter() - start
            url = f"{base}/invocations"
            start = time.perf_counter()
            answers = [record for i in range(0, len(documents), BATCH)
                       for record in post(url, documents[i:i + BATCH])]
            batch_ms = (time.perf_counter() - start) * 1000 / len(documents)
            single = []
            for doc in documents[:SINGLE]:
                start = time.perf_counter()
                post(url, [doc])
                single.append((time.perf_counter() - start) * 1000)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)
        served_log = log.read_text()
    predicted = [max(record, key=record.get) for record in answers]
    served = sum(p == t for p, t in zip(predicted, labels, strict=True)) / len(labels)
    logged = metrics["test_accuracy"]
    difference = 100 * (served - logged)
    single.sort()
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "setup": {"experiment": str(EXPERIMENT.relative_to(ROOT)), "epochs": args.epochs,
                  "server": "mlflow models serve --env-manager local --workers 1",
                  "data": "Reuters R8 test split (Cachopo), 2,189 stories, raw text"},
        "run_id": run_id, "train_and_evaluate_seconds": round(train_seconds, 1),
        "logged_test_accuracy": logged, "served_accuracy": served,
        "difference_points": difference, "within_target": abs(difference) <= TARGET,
        "evaluate": {k.removeprefix("evaluate/"): v for k, v in metrics.items()
                     if k.startswith("evaluate/")},
        "server_startup_seconds": round(startup, 1),
        "served_ms_per_document_batch_256": batch_ms,
        "served_ms_per_request_batch_1": {"mean": statistics.mean(single),
                                          "p50": single[len(single) // 2],
                                          "p95": single[int(0.95 * len(single))]},
        "sample_answer": {"document": documents[0][:120] + "...", "label": labels[0],
                          "answer": answers[0]},
        "server_printed": printed_lines(served_log),
        "requests_answered_200": served_log.count('"POST /invocations HTTP/1.1" 200'),
    }
    out = ROOT / "benchmarks" / "results" / args.output
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"logged test accuracy {logged:.4f}, served {served:.4f} "
          f"({difference:+.2f} points; target within ±{TARGET})")
    print(f"served latency: {result['served_ms_per_request_batch_1']['mean']:.1f} ms per "
          f"request of one story, {batch_ms:.2f} ms per story in batches of {BATCH}")
    print(f"wrote {out}")
    if abs(difference) > TARGET:
        sys.exit(1)


if __name__ == "__main__":
    main()
