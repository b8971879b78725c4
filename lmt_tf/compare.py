"""``lmt compare``: runs side by side from the tracking store. Per-epoch metric curves
(a PNG per metric, one line per run), the params that differ between the runs, each
run's status and its final metrics, as Markdown and HTML. A run that did not finish
(KILLED, FAILED, RUNNING) has no final metrics: the last values it logged are shown
marked, never as if they were its result."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmt_tf.errors import LmtError
from lmt_tf.tracking.credentials import redact_uri

PARENT_TAG = "mlflow.parentRunId"
FINISHED = "FINISHED"
UNFINISHED_MARK = "†"  # after a value of a run that did not finish
_LEGEND = (f"{UNFINISHED_MARK} the last value logged by a run that did not finish (see its "
           f"status): not a final result.")


@dataclass
class Report:
    """What ``write_report`` wrote."""

    markdown: Path
    html: Path
    plots: dict[str, Path] = field(default_factory=dict)  # metric -> PNG
    curves: dict[str, list[str]] = field(default_factory=dict)  # metric -> run labels
    params: list[str] = field(default_factory=list)  # the params that differ
    unfinished: list[str] = field(default_factory=list)  # labels of runs not FINISHED


def select_runs(client: Any, uri: str, experiment: str | None = None,
                parent: str | None = None, run_ids: Sequence[str] = ()) -> list[Any]:
    """The runs to compare: the given ids, the children of ``parent`` (a sweep), or
    every run of ``experiment``; oldest first.

    Raises:
      LmtError: if nothing is selected, or fewer than two runs are found.
    """
    import mlflow

    try:
        if run_ids:
            runs = [client.get_run(r) for r in run_ids]
        elif parent is not None:
            parent_run = client.get_run(parent)
            runs = client.search_runs([parent_run.info.experiment_id],
                                      filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")
        elif experiment is not None:
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise LmtError(f"no experiment named {experiment!r} in {redact_uri(uri)}")
            runs = client.search_runs([found.experiment_id])
        else:
            raise LmtError("name the runs to compare: --experiment NAME, --parent RUN_ID "
                           "or run ids")
    except mlflow.exceptions.MlflowException as e:
        raise LmtError(f"cannot read the runs from {redact_uri(uri)}: "
                       f"{str(e).splitlines()[0]}") from e
    if len(runs) < 2:
        raise LmtError(f"found {len(runs)} run(s) to compare; need at least two")
    return sorted(runs, key=lambda r: r.info.start_time)


def differing_params(runs: Sequence[Any]) -> list[str]:
    """Params whose value is not the same in every run (missing counts as a value)."""
    keys = sorted({k for run in runs for k in run.data.params})
    return [k for k in keys if len({run.data.params.get(k) for run in runs}) > 1]


def label(run: Any) -> str:
    return run.info.run_name or run.info.run_id[:8]


def finished(run: Any) -> bool:
    """Whether ``run`` ended FINISHED: only then are its last metrics its results."""
    return run.info.status == FINISHED


def write_report(client: Any, runs: Sequence[Any], directory: Path,
                 metrics: Sequence[str] = ()) -> Report:
    """Writes ``compare.md``, ``compare.html`` and a PNG per curve metric (metrics with
    more than one step in some run; ``metrics`` limits them) into ``directory``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    names = sorted({k for run in runs for k in run.data.metrics})
    if metrics:
        unknown = sorted(set(metrics) - set(names))
        if unknown:
            raise LmtError(f"no run has the metric(s) {', '.join(unknown)}; they have "
                           f"{', '.join(names)}")
        names = list(metrics)
    params = differing_params(runs)
    report = Report(directory / "compare.md", directory / "compare.html", params=params,
                    unfinished=[label(run) for run in runs if not finished(run)])
    status = {label(run): run.info.status for run in runs}
    for name in names:
        histories = {label(run): sorted(client.get_metric_history(run.info.run_id, name),
                                        key=lambda m: m.step) for run in runs}
        if max(len(h) for h in histories.values()) < 2:
            continue  # a final value, not a curve: it is in the table
        figure, axes = plt.subplots(figsize=(7, 4))
        for run_label, history in histories.items():
            if history:
                shown = run_label if run_label not in report.unfinished else \
                    f"{run_label} ({status[run_label]})"
                axes.plot([m.step for m in history], [m.value for m in history],
                          marker="o", markersize=3, label=shown)
        axes.set(xlabel="step (epoch or round)", ylabel=name, title=name)
        axes.legend(fontsize="small")
        figure.tight_layout()
        path = directory / f"curve_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        report.plots[name] = path
        report.curves[name] = [k for k, h in histories.items() if h]
    finals = sorted({k for run in runs for k in run.data.metrics
                     if k.startswith(("test_", "val_")) or "/test_" in k or k == "loss"})
    header = ["run", "id", "status", *params, *finals]
    rows = [[label(run), run.info.run_id[:8], run.info.status,
             *[run.data.params.get(k, "") for k in params],
             *[_number(run.data.metrics.get(k), finished(run)) for k in finals]]
            for run in runs]
    report.markdown.write_text(_markdown(header, rows, report))
    report.html.write_text(_html(header, rows, report))
    return report


def _number(value: float | None, final: bool = True) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if final else f"{value:.4g} {UNFINISHED_MARK}"


def _markdown(header: list[str], rows: list[list[str]], report: Report) -> str:
    lines = [f"# {len(rows)} runs compared", "",
             f"Params that differ: {', '.join(report.params) or 'none'}.", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
              for row in rows]
    if report.unfinished:
        lines += ["", _LEGEND]
    lines += [""] + [f"![{name}]({path.name})" for name, path in report.plots.items()]
    return "\n".join(lines) + "\n"


def _html(header: list[str], rows: list[list[str]], report: Report) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    images = "".join(f'<figure><img src="{html.escape(p.name)}" alt="{html.escape(n)}">'
                     f"</figure>" for n, p in report.plots.items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>lmt compare</title>"
            f"<style>table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;"
            f"padding:2px 6px}}</style></head><body><h1>{len(rows)} runs compared</h1>"
            f"<table><tr>{cells}</tr>{body}</table>"
            f"{f'<p>{html.escape(_LEGEND)}</p>' if report.unfinished else ''}"
            f"{images}</body></html>\n")
