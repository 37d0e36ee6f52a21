"""What a user sees during a run: a live table on a terminal, plain lines anywhere else.

    progress = Progress(console, totals={"sft": 850, "grpo": 1000}, health=stack.health)
    async with progress:           # starts the display and a health poll every few seconds
        ...                        # apps call progress.update(row) with each metrics row

On a terminal (rich.live.Live): step, policy version, reward mean, eval accuracy, episodes/s,
tokens/s, staleness, buffer size, and each service replica's gRPC health. When stdout is not a
terminal (tests, CI, `| tee`), one plain line per eval row and at most one per `line_every`
seconds, plus a line whenever a replica's health changes; nothing redraws.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Awaitable, Callable

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

log = logging.getLogger("forgerpc.progress")

HealthReport = dict[str, list[tuple[str, str]]]  # {service: [(address, status), ...]}

# (row key, label, format) in display order; a key the latest row lacks shows the last value seen.
FIELDS = [
    ("version", "policy version", "{:d}"),
    ("reward_mean", "reward mean", "{:.3f}"),
    ("eval_accuracy", "eval accuracy", "{:.3f}"),
    ("loss", "loss", "{:.4f}"),
    ("episodes_per_s", "episodes/s", "{:.0f}"),
    ("tokens_per_s", "tokens/s", "{:.0f}"),
    ("staleness", "staleness", "{:d}"),
    ("buffer_size", "buffer (episodes)", "{:d}"),
]


def _fmt(fmt: str, value) -> str:
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


class Progress:
    def __init__(self, console: Console, totals: dict[str, int] | None = None,
                 health: Callable[[], Awaitable[HealthReport]] | None = None,
                 health_every: float = 5.0, line_every: float = 10.0):
        self.console = console
        self.totals = totals or {}
        self.health_source = health
        self.health_every = health_every
        self.line_every = line_every
        self.live = console.is_terminal
        self.latest: dict = {}  # last value of every key, across rows of the current phase
        self.eval_step: tuple[str, int] | None = None  # (phase, step) of the last eval
        self.health: HealthReport = {}
        self.started = time.monotonic()
        self._last_line = float("-inf")  # the first row always prints
        self._live: Live | None = None
        self._poller: asyncio.Task | None = None

    # -- input --------------------------------------------------------------------------
    def update(self, row: dict) -> None:
        """One metrics row (metrics.jsonl). Rows of a new phase start from a clean slate."""
        if "phase" not in row or "step" not in row:
            return  # events (e.g. resume) are not progress
        if row["phase"] != self.latest.get("phase"):
            self.latest = {}
        self.latest.update({k: v for k, v in row.items() if v is not None})
        if "eval_accuracy" in row:
            self.eval_step = (row["phase"], row["step"])
        if not self.live:
            now = time.monotonic()
            if "eval_accuracy" in row or now - self._last_line >= self.line_every:
                self._last_line = now
                self.console.print(self.line(), highlight=False, soft_wrap=True)

    def set_health(self, report: HealthReport) -> None:
        changed = [(name, addr, status) for name, rows in report.items() for addr, status in rows
                   if dict(self.health.get(name, [])).get(addr, "SERVING") != status]
        self.health = report
        if not self.live:
            for name, addr, status in changed:
                self.console.print(f"health: {name} {addr} {status}", highlight=False, soft_wrap=True)

    # -- output -------------------------------------------------------------------------
    def step_text(self) -> str:
        phase, step = self.latest.get("phase", "-"), self.latest.get("step", 0)
        total = self.totals.get(phase)
        return f"{phase} step {step}/{total}" if total else f"{phase} step {step}"

    def line(self) -> str:
        parts = [self.step_text()]
        for key, label, fmt in FIELDS:
            if key in self.latest:
                parts.append(f"{label} {_fmt(fmt, self.latest[key])}")
        return " | ".join(parts)

    def render(self) -> Group:
        table = Table(title=f"forgerpc · {self.step_text()} · {time.monotonic() - self.started:.0f}s",
                      show_header=False, min_width=40)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, label, fmt in FIELDS:
            value = _fmt(fmt, self.latest[key]) if key in self.latest else "-"
            if key == "eval_accuracy" and self.eval_step and key in self.latest:
                value += f" (step {self.eval_step[1]})"
            table.add_row(label, value)
        health = Table(title="service health", min_width=40)
        for col in ("service", "address", "health"):
            health.add_column(col)
        for name, rows in self.health.items():
            for address, status in rows:
                style = "green" if status == "SERVING" else "bold red"
                health.add_row(name, address, f"[{style}]{status}[/{style}]")
        return Group(table, health)

    # -- lifecycle ------------------------------------------------------------------------
    async def poll_health(self) -> None:
        while True:
            try:
                self.set_health(await self.health_source())
            except Exception as e:  # noqa: BLE001 - the display must never end the run
                log.warning("health poll failed: %s", e)
            await asyncio.sleep(self.health_every)

    async def __aenter__(self) -> "Progress":
        if self.live:
            self._live = Live(get_renderable=self.render, console=self.console, refresh_per_second=2)
            self._live.start()
        if self.health_source is not None:
            self._poller = asyncio.create_task(self.poll_health())
        return self

    async def __aexit__(self, *exc) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._live is not None:
            self._live.stop()  # the last frame stays on screen, above the summary
