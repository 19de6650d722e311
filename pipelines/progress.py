"""Progress of a sweep across its Tune chunks: done / total, failed, and an ETA.

The ETA comes from the finished trials: the wall time so far, scaled by the estimated compute that
is left over the estimated compute of the trials that finished (the estimates are the planner's,
`pipelines.cost`; only their ratios matter here, so a miscalibrated rate does not bias the ETA).
On a terminal it is a progress bar (rich); elsewhere (a log file, CI) one line per finished trial,
at most one every `every` seconds, and always the last.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def duration(seconds: float) -> str:
    """12s, 4m05s, 2h07m."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    def __init__(self, bundles: int, runs: int, cost: float, stream: TextIO | None = None, tty: bool | None = None, every: float = 2.0):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.total_bundles, self.total_runs, self.total_cost = bundles, runs, cost
        self.bundles = self.runs = self.failed = 0
        self.cost = 0.0
        self.every = every
        self.t0 = time.perf_counter()
        self._last = float("-inf")
        self._failed: set[str] = set()
        self._bar = None
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("bundles"), TimeElapsedColumn(), TextColumn("{task.fields[tail]}"), transient=False)
            self._bar.start()
            self._task = self._bar.add_task("run", total=bundles, tail="")

    def eta(self) -> float:
        elapsed = time.perf_counter() - self.t0
        if self.cost <= 0:
            return float("nan")
        return elapsed * max(0.0, self.total_cost - self.cost) / self.cost

    def status(self) -> str:
        return f"{self.runs}/{self.total_runs} runs, {self.failed} failed, ETA {duration(self.eta())}"

    def finished(self, bundle_id: str, runs: int, cost: float, detail: str, failed: bool = False) -> None:
        """Record one finished trial (a bundle of `runs` runs whose estimated cost was `cost`).

        A bundle that failed and is run again (`run_sweep` gives a bundle whose worker was lost one
        more round) replaces its earlier failure.
        """
        if bundle_id in self._failed:
            self._failed.discard(bundle_id)
            self.bundles, self.runs, self.failed, self.cost = self.bundles - 1, self.runs - runs, self.failed - runs, self.cost - cost
        if failed:
            self._failed.add(bundle_id)
        self.bundles += 1
        self.runs += runs
        self.failed += runs if failed else 0
        self.cost += cost
        if self._bar is not None:
            self._bar.update(self._task, completed=self.bundles, tail=self.status())
            if failed:
                self._bar.console.print(f"bundle {bundle_id[:8]} failed: {detail}")
            return
        now = time.perf_counter()
        if failed or now - self._last >= self.every or self.bundles == self.total_bundles:
            self._last = now
            print(f"[{self.bundles}/{self.total_bundles} bundles] {self.status()}; bundle {bundle_id[:8]}: {detail}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
