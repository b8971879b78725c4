"""What a sweep shows of its trials as they finish: a live rich table on a terminal, a
line each otherwise, and the best trial at the end."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any


class TrialTable:
    """Finished trials as they come: a live rich table on a terminal, a line each
    otherwise; nothing with ``quiet`` but the summary."""

    def __init__(self, study_name: str, metric: str, quiet: bool,
                 echo: Callable[[str], None]):
        self.study_name, self.metric, self.quiet, self.echo = study_name, metric, quiet, echo
        self.rows: list[tuple] = []
        self.lock = threading.Lock()
        self.live = None
        if not quiet and sys.stdout.isatty():
            from rich.live import Live

            self.live = Live(self._render(), refresh_per_second=2)
            self.live.start()

    def _render(self) -> Any:
        from rich.table import Table

        table = Table(title=f"lmt sweep {self.study_name}")
        for column in ("trial", "bindings", self.metric, "state", "seconds"):
            table.add_column(column)
        for number, bindings, value, state, seconds in self.rows:
            table.add_row(str(number), ", ".join(bindings),
                          "" if value is None else f"{value:.4f}", state, f"{seconds:.0f}")
        return table

    def add(self, number: int, bindings: list[str], value: float | None, state: str,
            seconds: float) -> None:
        """Shows trial ``number`` ended ``state`` (finished, pruned, failed) after
        ``seconds``, with its ``value`` of the metric if it has one."""
        with self.lock:
            self.rows.append((number, bindings, value, state, seconds))
            if self.live is not None:
                self.live.update(self._render())
            elif not self.quiet:
                shown = "" if value is None else f" {self.metric} {value:.4f}"
                self.echo(f"lmt sweep: trial {number} {state}{shown} ({', '.join(bindings)}; "
                          f"{seconds:.0f} s)")

    def close(self, best: Any) -> None:
        """Stops the live table and names the ``best`` trial (an Optuna trial, or None)."""
        if self.live is not None:
            self.live.stop()
        if best is not None:
            self.echo(f"lmt sweep: best trial {best.number}: {self.metric} "
                      f"{best.value:.4f} with " + ", ".join(f"{k} = {v}" for k, v in
                                                          best.params.items()))
