"""How many `refused` records an agent's log takes: a burst, then one a second.

Every refused operation used to append its own record, committed on its own: a tick
refused in a loop wrote as fast as it could loop, into storage that is the agent's and
a disk that is everyone's.  Now each agent has a token bucket: BURST records at once,
then RATE a second.  What finds the bucket empty is counted, and one record, as soon as
the bucket lets one in, says how many were not logged and shows the last of them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .inbox import rfc3339_now

BURST = 32  # refused records an agent's log takes at once
RATE = 1.0  # records a second once the burst is spent
MAX_TEXT = 512  # characters of an `op` or `error` in a record (or in daemon.log)

Entry = dict[str, Any]
log = logging.getLogger("agentfs")


def clip(text: str) -> str:
    """`text`, cut to MAX_TEXT characters: a refusal may quote a whole write back."""
    if len(text) <= MAX_TEXT:
        return text
    return text[:MAX_TEXT - 1] + "\u2026"


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    suppressed: int = 0
    last: Entry | None = None  # the last record not logged
    woken: trio.Event = field(default_factory=trio.Event)  # one was not logged

    def refill(self, now: float) -> None:
        self.tokens = min(float(BURST), self.tokens + (now - self.stamp) * RATE)
        self.stamp = now

    def take(self, now: float) -> bool:
        self.refill(now)
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def until(self, now: float, tokens: float) -> float:
        """Seconds until the bucket holds `tokens`."""
        self.refill(now)
        return max(0.0, (tokens - self.tokens) / RATE)


class RefusalLog:
    """Rate-limits what `write(index, record)` puts in agents' logs.

    A bucket lives while it is not full: a task reports what it suppressed, and forgets
    it once it has filled again, so an agent that refuses nothing costs nothing.
    Without `nursery` (the runtime not running) every record is written.
    """

    def __init__(self, write: Callable[[int, Entry], Awaitable[None]]) -> None:
        self._write = write
        self._buckets: dict[int, _Bucket] = {}
        self.nursery: trio.Nursery | None = None

    async def refused(self, index: int, entry: Entry) -> None:
        if self.nursery is None:
            await self._write(index, entry)
            return
        now = trio.current_time()
        bucket = self._buckets.get(index)
        if bucket is None:
            bucket = self._buckets[index] = _Bucket(float(BURST), now)
            self.nursery.start_soon(self._watch, index, bucket)
        # While some are counted, the next record is their count: the log stays in order.
        if not bucket.suppressed and bucket.take(now):
            await self._write(index, entry)
            return
        bucket.suppressed += 1
        bucket.last = entry
        bucket.woken.set()

    async def _watch(self, index: int, bucket: _Bucket) -> None:
        """Report what the bucket suppressed when it may; forget it once it is full."""
        try:
            while True:
                now = trio.current_time()
                if bucket.suppressed:
                    await trio.sleep(bucket.until(now, 1))
                    bucket.take(trio.current_time())
                    assert bucket.last is not None
                    report = dict(bucket.last, time=rfc3339_now(), suppressed=bucket.suppressed)
                    bucket.suppressed, bucket.last = 0, None
                    try:
                        await self._write(index, report)
                    except Exception:  # noqa: BLE001 - this task's failure would end the mount
                        log.exception("agent %d: cannot log %d refusals", index,
                                      report["suppressed"])
                    continue
                full_in = bucket.until(now, BURST)
                if full_in <= 0:
                    return
                bucket.woken = trio.Event()
                with trio.move_on_after(full_in):
                    await bucket.woken.wait()
        finally:
            del self._buckets[index]
