"""Campaign progress for people: counts by state, throughput, ETA against the deadline and
dead letters, drawn as a rich progress bar on a terminal and as plain lines elsewhere.

Used by `greetflow campaign status ID [--watch]` and `greetflow submit --wait`. Every
snapshot is a few aggregate queries (GROUP BY state, two counts over job_events), so a
watch loop stays cheap on a large campaign.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import IO, Any

from pipeline.repositories import JobRepository
from schemas.common import utcnow
from schemas.jobs import FINAL_STATES, WAITING_FOR_HUMAN, JobState

# Throughput is measured over this trailing window (or since the campaign started, if later).
THROUGHPUT_WINDOW_S = 300.0


@dataclass(frozen=True)
class CampaignProgress:
    campaign_id: str
    counts: dict[JobState, int]
    dead_lettered: int
    settled_in_window: int
    window_s: float
    started_at: datetime | None
    deadline: datetime | None
    now: datetime

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def final(self) -> int:
        return sum(n for st, n in self.counts.items() if st in FINAL_STATES)

    @property
    def waiting_for_human(self) -> int:
        return sum(n for st, n in self.counts.items() if st in WAITING_FOR_HUMAN)

    @property
    def remaining(self) -> int:
        return self.total - self.final

    @property
    def throughput_per_min(self) -> float:
        """Jobs that reached a final state per minute, over the trailing window."""
        if self.window_s <= 0:
            return 0.0
        return self.settled_in_window * 60.0 / self.window_s

    @property
    def eta(self) -> datetime | None:
        """When the remaining jobs are done at the current throughput (None: no throughput)."""
        if self.remaining == 0:
            return self.now
        rate = self.throughput_per_min
        if rate <= 0:
            return None
        return self.now + timedelta(minutes=self.remaining / rate)

    def eta_text(self) -> str:
        if self.total == 0:
            return "no jobs"
        if self.remaining == 0:
            return "done"
        eta = self.eta
        deadline = f"deadline {self.deadline:%Y-%m-%d %H:%M} UTC" if self.deadline else "no deadline"
        if eta is None:
            return f"ETA unknown (nothing finished in the last {self.window_s / 60:.0f} min), {deadline}"
        left = max((eta - self.now).total_seconds(), 0)
        verdict = ""
        if self.deadline is not None:
            verdict = ": on time" if eta <= self.deadline else ": AFTER THE DEADLINE"
        return f"ETA {eta:%H:%M:%S} UTC (in {_duration(left)}), {deadline}{verdict}"

    def state_text(self) -> str:
        shown = [f"{st.value}={n}" for st, n in self.counts.items() if n]
        return ", ".join(shown) or "no jobs"

    def plain_lines(self) -> list[str]:
        pct = 100.0 * self.final / self.total if self.total else 0.0
        return [
            f"campaign {self.campaign_id}: {self.final}/{self.total} final ({pct:.0f}%), "
            f"{self.waiting_for_human} waiting for review, {self.dead_lettered} dead-lettered",
            f"  states: {self.state_text()}",
            f"  throughput: {self.throughput_per_min:.1f} jobs/min over the last "
            f"{self.window_s / 60:.1f} min; {self.eta_text()}",
        ]


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


class ProgressService:
    """Snapshots of one campaign's progress from the job table and its history."""

    def __init__(
        self,
        jobs: JobRepository,
        *,
        deadline_s: float,
        window_s: float = THROUGHPUT_WINDOW_S,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.jobs = jobs
        self.deadline_s = deadline_s
        self.window_s = window_s
        self._clock = clock

    def snapshot(self, campaign_id: str, *, deadline: datetime | None = None) -> CampaignProgress:
        """`deadline`: None means the first job's creation plus `deadline_s`."""
        now = self._clock()
        since = now - timedelta(seconds=self.window_s)
        counts = self.jobs.counts_by_state(campaign_id)
        started, settled, dead = self.jobs.campaign_activity(campaign_id, since=since)
        window = self.window_s
        if started is not None and started > since:
            window = max((now - started).total_seconds(), 1.0)
        if deadline is None and started is not None:
            deadline = started + timedelta(seconds=self.deadline_s)
        return CampaignProgress(
            campaign_id=campaign_id,
            counts=counts,
            dead_lettered=dead,
            settled_in_window=settled,
            window_s=window,
            started_at=started,
            deadline=deadline,
            now=now,
        )


class ProgressView:
    """Shows snapshots: a live rich panel on a terminal, plain lines otherwise (one block per
    `show`, so a log or a pipe gets a readable history)."""

    def __init__(self, stream: IO[str] | None = None, *, live: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.live_mode = self.stream.isatty() if live is None else live
        self._live: Any = None

    def __enter__(self) -> ProgressView:
        if self.live_mode:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(file=self.stream), refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def show(self, p: CampaignProgress) -> None:
        if self._live is not None:
            self._live.update(render_rich(p))
            return
        for line in p.plain_lines():
            print(line, file=self.stream)
        self.stream.flush()


def render_rich(p: CampaignProgress) -> Any:
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    head = Text.assemble((f"campaign {p.campaign_id}", "bold"))
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        ProgressBar(total=max(p.total, 1), completed=p.final, width=50),
        Text(f"{p.final}/{p.total} final", style="bold"),
        Text(f"{100.0 * p.final / p.total:.0f}%" if p.total else "", style="cyan"),
    )
    table = Table(show_header=True, header_style="bold", box=None, padding=(0, 2))
    table.add_column("state")
    table.add_column("jobs", justify="right")
    for st, n in p.counts.items():
        if n:
            style = "red" if st in (JobState.FAILED, JobState.REJECTED) else ""
            table.add_row(Text(st.value, style=style), str(n))
    dlq_style = "bold red" if p.dead_lettered else "green"
    footer = Text.assemble(
        f"throughput {p.throughput_per_min:.1f} jobs/min   ",
        (f"dead-lettered {p.dead_lettered}", dlq_style),
        f"   waiting for review {p.waiting_for_human}\n",
        p.eta_text(),
    )
    return Group(head, bar, table, footer)


def watch(
    service: ProgressService,
    campaign_id: str,
    view: ProgressView,
    *,
    interval_s: float,
    until: Callable[[CampaignProgress], bool],
    timeout_s: float | None = None,
    deadline: datetime | None = None,
) -> CampaignProgress:
    """Show a snapshot every `interval_s` until `until(snapshot)` or `timeout_s` passes."""
    started = time.monotonic()
    while True:
        p = service.snapshot(campaign_id, deadline=deadline)
        view.show(p)
        if until(p) or (timeout_s is not None and time.monotonic() - started >= timeout_s):
            return p
        time.sleep(interval_s)


class ThrottledProgress:
    """An `on_progress` callback (CampaignService.wait) that shows a fresh snapshot at most
    every `every_s` seconds; `flush()` shows the last state."""

    def __init__(
        self, service: ProgressService, campaign_id: str, view: ProgressView, *, every_s: float | None = None
    ) -> None:
        self.service = service
        self.campaign_id = campaign_id
        self.view = view
        self.every_s = every_s if every_s is not None else (0.5 if view.live_mode else 5.0)
        self._last = float("-inf")

    def __call__(self, _counts: object) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        self.view.show(self.service.snapshot(self.campaign_id))
