"""A tick's uncommitted writes: seen by the tick through AGENT_DIR, by nobody else until commit."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import values
from .ctl import Command
from .state import Entry, TxnState, split
from .store import AgentStore


@dataclass
class TickOverlay:
    """Implements `state.StateView` over the committed state, plus the tick's other effects."""

    store: AgentStore
    index: int
    ids: values.ValueIds
    changes: dict[str, Entry | None] = field(default_factory=dict)
    outbox: list[dict[str, Any]] = field(default_factory=list)
    inbox: list[dict[str, Any]] = field(default_factory=list)
    ctl: list[Command] = field(default_factory=list)
    charges: dict[str, int] = field(default_factory=dict)  # usage key -> amount charged
    spends: list[dict[str, Any]] = field(default_factory=list)
    bytes_delta: int = 0  # what the changes add to the agent's stored bytes
    # Bytes of messages the daemon holds for the tick until it commits: `outbox` as its lines
    # will be stored (they count in the agent's storage), the messages it queued for itself,
    # and the partial lines in files it has open (not part of a snapshot: they stay
    # buffered).  Bounded: see `Runtime.hold`.
    outbox_bytes: int = 0
    inbox_bytes: int = 0
    partial_bytes: int = 0
    # Every draft the tick wrote to: those no entry holds at the end are deleted.
    drafts: list[values.Draft] = field(default_factory=list)

    def snapshot(self) -> TickOverlay:
        """What the tick has written so far, frozen: a checkpoint commits this while the
        tick's other processes may go on writing to the overlay itself.

        A file the tick wrote goes on in a new draft over the frozen one, so that what is
        written from now on is not part of the checkpoint.  The caller holds the drafts'
        locks (`draft_locks`): no write is half done."""
        frozen = TickOverlay(self.store, self.index, self.ids, dict(self.changes),
                             list(self.outbox), list(self.inbox), list(self.ctl),
                             dict(self.charges), list(self.spends), self.bytes_delta,
                             self.outbox_bytes, self.inbox_bytes)
        for path, entry in self.changes.items():
            if entry is not None and entry.draft is not None and not entry.draft.published:
                self.changes[path] = entry._replace(draft=self.new_draft(entry, entry.draft))
        return frozen

    def new_draft(self, entry: Entry, base: values.Draft | None = None) -> values.Draft:
        draft = values.Draft(self.ids.new(), entry.blob, self.index, entry.size, base)
        self.drafts.append(draft)
        return draft

    def draft_locks(self) -> list[values.Draft]:
        return [e.draft for e in self.changes.values() if e is not None and e.draft is not None]

    async def wait_writes(self) -> None:
        """Until no write to a draft is under way (the tick has ended: none starts)."""
        for draft in self.drafts:
            async with draft.lock:
                pass

    def unpublished(self) -> list[values.Draft]:
        return [d for d in self.drafts if not d.published]

    def forget(self, done: TickOverlay) -> None:
        """Drop what `done`, a snapshot of this overlay, committed; keep what came since."""
        for path, entry in done.changes.items():
            if path in self.changes and self.changes[path] is entry:
                del self.changes[path]
        for mine, theirs in ((self.outbox, done.outbox), (self.inbox, done.inbox),
                             (self.ctl, done.ctl), (self.spends, done.spends)):
            del mine[:len(theirs)]
        for key, amount in done.charges.items():
            left = self.charges.get(key, 0) - amount
            if left:
                self.charges[key] = left
            else:
                self.charges.pop(key, None)
        self.bytes_delta -= done.bytes_delta
        self.outbox_bytes -= done.outbox_bytes
        self.inbox_bytes -= done.inbox_bytes

    @property
    def stored_delta(self) -> int:
        """What committing adds to the agent's storage (but for the tick's own log record)."""
        return self.bytes_delta + self.outbox_bytes

    @property
    def held_bytes(self) -> int:
        return self.outbox_bytes + self.inbox_bytes + self.partial_bytes

    def get(self, path: str) -> Entry | None:
        if path in self.changes:
            return self.changes[path]
        with self.store.read() as txn:
            return TxnState(self.store, txn, self.index).get(path)

    def children(self, path: str) -> Iterator[tuple[str, Entry]]:
        with self.store.read() as txn:
            merged = dict(TxnState(self.store, txn, self.index).children(path))
        for changed, entry in self.changes.items():
            parent, name = split(changed)
            if parent == path and changed != "":
                if entry is None:
                    merged.pop(name, None)
                else:
                    merged[name] = entry
        yield from sorted(merged.items())

    def set(self, path: str, entry: Entry | None) -> None:
        old = self.get(path)
        self.bytes_delta += (0 if entry is None else entry.size) - \
            (0 if old is None else old.size)
        self.changes[path] = entry
