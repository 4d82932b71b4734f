"""Group commit: many small write transactions become one durable LMDB commit.

Each caller hands over a function of a write transaction and waits.  One task drains
the queue and runs every waiting function in a child transaction of a single parent,
in a worker thread, so one fsync acknowledges them all and the event loop keeps
serving reads meanwhile.  A function that raises rolls back only its own child.  `seal`
runs last in the parent, once per commit: it signs the heads of the logs that grew.  A
function that finds the map full is run again once the map has grown (between batches, on
the event loop's thread, where no read transaction is open); when it cannot grow, ENOSPC.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import lmdb
import trio

from . import errors
from .status import RecentEvents
from .store import AgentStore, Txn

T = TypeVar("T")
log = logging.getLogger("agentfs")


@dataclass
class _Pending(Generic[T]):
    apply: Callable[[Txn], T]
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None


@dataclass
class CommitStatistics:
    commits: int = 0
    transactions: int = 0
    largest_batch: int = 0
    # Each transaction's latency, from its hand-over to its durable commit: what writers wait.
    latency: RecentEvents = field(default_factory=RecentEvents)


FLUSH_INTERVAL = 0.1  # durability=daemon: the most a power cut may lose, in seconds


class CommitQueue:
    def __init__(self, store: AgentStore, max_batch: int = 256,
                 seal: Callable[[Txn], None] | None = None) -> None:
        self.store = store
        self.seal = seal
        # Called in the event loop after each commit (the head publisher's cue).
        self.committed: Callable[[], None] = _nothing
        self.max_batch = max_batch
        self._queue: list[_Pending[Any]] = []
        self._wakeup = trio.Event()
        self._stats = CommitStatistics()
        self._unflushed = False  # durability=daemon: commits not yet flushed to the disk

    def statistics(self) -> CommitStatistics:
        return self._stats

    async def commit(self, apply: Callable[[Txn], T]) -> T:
        """Run `apply` in a write transaction; return once it is durable (or raise its error)."""
        pending: _Pending[T] = _Pending(apply)
        handed = time.monotonic()
        self._queue.append(pending)
        self._wakeup.set()
        await pending.done.wait()
        self._stats.latency.add(time.monotonic() - handed)
        if pending.error is not None:
            raise pending.error
        return pending.result  # type: ignore[no-any-return]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if not self.store.synced:
                nursery.start_soon(self._flush_now_and_then)
            task_status.started()
            await self._serve()

    async def _flush_now_and_then(self) -> None:
        """durability=daemon: what commits wrote to the file reaches the disk within
        FLUSH_INTERVAL, off the commit path."""
        while True:
            await trio.sleep(FLUSH_INTERVAL)
            if self._unflushed:
                self._unflushed = False
                await trio.to_thread.run_sync(self.store.flush)

    async def _serve(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            while self._queue:
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
                # Shielded: once a batch is handed to the thread its waiters must hear back.
                with trio.CancelScope(shield=True):
                    full = await trio.to_thread.run_sync(self._apply_batch, batch)
                if full:
                    self._retry_or_refuse(full)
                again = {id(p) for p in full if p.error is None}
                for pending in batch:
                    if id(pending) not in again:
                        pending.done.set()
                self.committed()

    def _retry_or_refuse(self, full: list[_Pending[Any]]) -> None:
        """Grow the map and queue `full` again first; or, at its largest, ENOSPC."""
        before = self.store.map_size()
        grown = self.store.grow()
        if grown is not None:
            log.info("the store's map grew from %d to %d bytes", before, grown)
            self._queue[:0] = full
            return
        log.error("the store's map is full at %d bytes (its largest; see -o map_size): "
                  "%d transaction(s) refused with ENOSPC", before, len(full))
        for pending in full:
            pending.error = errors.no_space(
                f"the store's map is full ({before} bytes, its largest)")

    def _apply_batch(self, batch: list[_Pending[Any]]) -> list[_Pending[Any]]:
        """Commit the batch; returns what found the map full (to run again, or refuse)."""
        env = self.store.env
        full: list[_Pending[Any]] = []
        try:
            with env.begin(write=True) as txn:
                for pending in batch:
                    child = env.begin(write=True, parent=txn)
                    try:
                        pending.result = pending.apply(child)
                    except lmdb.MapFullError:
                        child.abort()  # the parent is intact: the others go on
                        full.append(pending)
                    except errors.FsError as e:
                        child.abort()
                        pending.error = e
                    except Exception as e:  # noqa: BLE001 - a bug must not take the mount down
                        child.abort()
                        log.exception("a transaction failed")
                        pending.error = errors.FsError(errno.EIO, f"internal error: {e}")
                    else:
                        child.commit()
                if self.seal is not None:
                    self._seal(txn)
        except lmdb.MapFullError:  # the commit itself (or the seal) needed pages: all again
            for pending in batch:
                pending.result, pending.error = None, None
            return list(batch)
        except lmdb.Error as e:  # the whole commit failed (disk full, I/O error): tell everyone
            log.error("commit failed: %s", e)
            failure = errors.FsError(errno.EIO, f"the store could not commit: {e}")
            for pending in batch:
                pending.error = pending.error or failure
            return []
        self._unflushed = True
        self._stats.commits += 1
        self._stats.transactions += len(batch) - len(full)
        self._stats.largest_batch = max(self._stats.largest_batch, len(batch))
        return full

    def _seal(self, txn: Txn) -> None:
        assert self.seal is not None
        try:
            self.seal(txn)
        except lmdb.Error:
            raise  # the commit would fail too (or, map full, runs again): as any other
        except Exception:  # noqa: BLE001 - what the batch did is acknowledged all the same
            log.exception("signing the logs' heads failed: `agentfs verify` will say so")


def _nothing() -> None:
    pass
