"""The root `status` file: the daemon's own figures, for `agentfs ps`, `agentfs top` and people.

The tick engine and the committer count into a `RecentEvents` each (what happened in the
last WINDOW seconds); `render` reads them with what the store and the kernel say now.
"""

from __future__ import annotations

import collections
import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .inbox import rfc3339_now

if TYPE_CHECKING:
    from .runtime import Runtime

WINDOW = 10.0  # seconds of recent events the rates and latencies are over
MAX_SAMPLES = 8192  # latencies kept for the percentiles: the most recent, at most
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class RecentEvents:
    """Events of the last WINDOW seconds, each with a value (a latency), and a total count.

    Bounded: at most MAX_SAMPLES are kept, the newest, so a burst of commits costs memory
    once and percentiles describe the latest of them."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = 0
        self._clock = clock
        self._started = clock()
        self._events: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=MAX_SAMPLES)
        self._counted: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, value: float = 0.0) -> None:
        now = self._clock()
        self.total += 1
        self._events.append((now, value))
        # The rate counts every event, beyond the samples kept: one counter per 0.1 s.
        slot = math.floor(now * 10) / 10
        if self._counted and self._counted[-1][0] == slot:
            self._counted[-1] = (slot, self._counted[-1][1] + 1)
        else:
            self._counted.append((slot, 1))
        self._forget(now)

    def _forget(self, now: float) -> None:
        while self._counted and self._counted[0][0] < now - WINDOW:
            self._counted.popleft()
        while self._events and self._events[0][0] < now - WINDOW:
            self._events.popleft()

    def rate(self) -> float:
        """Events a second over the last WINDOW seconds (or since the start, if sooner)."""
        now = self._clock()
        self._forget(now)
        span = min(WINDOW, now - self._started)
        return sum(n for _slot, n in self._counted) / span if span > 0 else 0.0

    def percentile(self, fraction: float) -> float | None:
        """The value `fraction` of the recent events are at or below; None if there were none."""
        self._forget(self._clock())
        if not self._events:
            return None
        values = sorted(value for _when, value in self._events)
        rank = math.ceil(fraction * len(values))  # the nearest-rank method
        return values[max(0, min(len(values), rank) - 1)]


def rss_bytes() -> int:
    """This process's resident memory now (statm's second field, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def _milliseconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.3f}ms"


def agent_counts(runtime: Runtime) -> tuple[int, int]:
    """(agents, awake): every agent of the store, and those not asleep; this file's figures,
    and the daemon's STATUS= line under systemd."""
    with runtime.store.read() as txn:
        # Agents are never removed; the awake index is counted, not read.
        return runtime.store.next_index(txn), runtime.store.count(txn, "awake")


def render(runtime: Runtime) -> bytes:
    engine, commits = runtime.engine.statistics(), runtime.committer.statistics()
    started, started_at = runtime.started
    agents, awake = agent_counts(runtime)
    lines = [
        ("pid", str(os.getpid())),
        ("started", started),
        ("uptime", f"{int(time.monotonic() - started_at)}s"),
        ("agents", str(agents)),
        ("awake", str(awake)),
        ("running", str(engine.running)),
        ("jobs", str(engine.jobs)),
        ("ticks", str(engine.committed.total)),
        ("failed_ticks", str(engine.failed.total)),
        ("ticks_per_s", f"{engine.committed.rate():.1f}"),
        ("commits", str(commits.commits)),
        ("transactions_per_s", f"{commits.latency.rate():.1f}"),
        ("commit_latency_p50", _milliseconds(commits.latency.percentile(0.5))),
        ("commit_latency_p99", _milliseconds(commits.latency.percentile(0.99))),
        ("rss_bytes", str(rss_bytes())),
        ("sandbox", runtime.sandbox_state()),
        ("durability", "disk" if runtime.store.synced else "daemon"),
        ("time", rfc3339_now()),
    ]
    return "".join(f"{k} {v}\n" for k, v in lines).encode()
