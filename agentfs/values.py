"""A `state/` file's value in fixed chunks, and drafts: new versions written beside it.

A value is a blob: its bytes in CHUNK-sized pieces under `blob + chunk number + gen`
(each 8 bytes, big-endian) in the `chunks` database, so a read or a write touches only the
chunks it covers.  A chunk holds no bytes past the value's size; a missing one reads as
zeros (a sparse file).

A write goes to a `Draft` first: the chunks it changes are held in memory (up to SPILL
bytes, so a small value costs no commit of its own), then put under the draft's own
`gen`, listed in the `drafts` database until the draft is published, and readers skip
them.  Publishing, one small commit, deletes the chunks the draft replaced and drops its
`drafts` row: its chunks are then the value's.  A draft never published (its writer
closed after an error, its tick failed, the daemon was killed) is deleted; the daemon
sweeps what a crash left at start.  So a value is replaced whole or not at all, whatever
its size, and no commit copies more than the bytes written.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from .store import AgentStore, Txn

CHUNK = 256 * 1024
SPILL = 1 << 20  # bytes of chunks a draft holds in memory before it puts them in the store
_IDS_KEY = b"next_value_id"
# Ids a daemon takes for itself at start: the store records only where the next daemon's
# begin, so making a file or a draft costs no commit of its own.
_ID_RESERVE = 1 << 32
_NO_CUT = 1 << 63


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


def chunk_key(blob: int, number: int, gen: int) -> bytes:
    return _u64(blob) + _u64(number) + _u64(gen)


def chunks_of(size: int) -> int:
    """How many chunks hold `size` bytes."""
    return -(-size // CHUNK)


class ValueIds:
    """Blob and draft ids, unique in the store for ever: a range taken at start."""

    def __init__(self, store: AgentStore) -> None:
        with store.env.begin(write=True) as txn:
            meta = store.db["meta"]
            first = int(bytes(txn.get(_IDS_KEY, db=meta) or b"1"))
            txn.put(_IDS_KEY, str(first + _ID_RESERVE).encode(), db=meta)
        self._next = itertools.count(first)
        self._end = first + _ID_RESERVE

    def new(self) -> int:
        value = next(self._next)
        if value >= self._end:
            raise RuntimeError("value ids of this daemon run exhausted; remount")
        return value


def take_ids(txn: Txn, store: AgentStore, count: int) -> int:
    """The first of `count` ids, taken in `txn` (for a migration, before any daemon runs)."""
    meta = store.db["meta"]
    first = int(bytes(txn.get(_IDS_KEY, db=meta) or b"1"))
    txn.put(_IDS_KEY, str(first + count).encode(), db=meta)
    return first


@dataclass(eq=False)
class Draft:
    """A new version of one value, not yet published: its chunks are under `gen`.

    `base` is the draft this one continues after a checkpoint published (or tried to
    publish) it; else the base is the committed value.  `cut` is the smallest size the
    draft truncated to: the base's chunks from there on read as zeros.
    """

    gen: int
    blob: int
    index: int
    size: int
    base: Draft | None = None
    cut: int = _NO_CUT
    dirty: dict[int, bytes] = field(default_factory=dict)  # chunks held in memory
    staged: set[int] = field(default_factory=set)  # chunks put in the store under gen
    doomed: set[int] = field(default_factory=set)  # put once, truncated away since
    registered: bool = False
    published: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock)

    def chain(self) -> Iterator[Draft]:
        """This draft and its bases, oldest last."""
        draft: Draft | None = self
        while draft is not None:
            yield draft
            draft = draft.base


# -- reading --------------------------------------------------------------------


def committed_chunk(txn: Txn, store: AgentStore, blob: int, number: int) -> bytes:
    """Chunk `number` of `blob` as committed: the one version whose draft is published."""
    chunks, drafts = store.db["chunks"], store.db["drafts"]
    prefix = _u64(blob) + _u64(number)
    cursor = txn.cursor(db=chunks)
    if not cursor.set_range(prefix):
        return b""
    for key, value in cursor:
        key = bytes(key)
        if not key.startswith(prefix):
            break
        if txn.get(key[16:], db=drafts) is None:
            return bytes(value)
    return b""


def draft_chunk(txn: Txn, store: AgentStore, draft: Draft | None, blob: int,
                number: int) -> bytes:
    """Chunk `number` as `draft` sees it (the committed value's if None)."""
    for version in draft.chain() if draft is not None else ():
        if number in version.dirty:
            return version.dirty[number]
        if number in version.staged:
            raw = txn.get(chunk_key(blob, number, version.gen), db=store.db["chunks"])
            return b"" if raw is None else bytes(raw)
        if number * CHUNK >= version.cut:
            return b""
    return committed_chunk(txn, store, blob, number)


def read(txn: Txn, store: AgentStore, blob: int, size: int, draft: Draft | None,
         offset: int, length: int) -> bytes:
    """`length` bytes from `offset` of a value of `size` bytes (fewer at its end)."""
    end = min(size, offset + length)
    if offset >= end:
        return b""
    out = bytearray()
    for number in range(offset // CHUNK, chunks_of(end)):
        start = number * CHUNK
        held = min(CHUNK, size - start)
        piece = draft_chunk(txn, store, draft, blob, number)
        if len(piece) < held:
            piece = piece + bytes(held - len(piece))
        out += piece[max(0, offset - start):end - start]
    return bytes(out)


# -- writing a draft ------------------------------------------------------------


@dataclass
class Staging:
    """The chunks one write or truncation gives a draft (and those it drops)."""

    draft: Draft
    puts: dict[int, bytes | memoryview] = field(default_factory=dict)
    drops: list[int] = field(default_factory=list)
    size: int = 0
    cut: int = _NO_CUT


def plan_write(txn: Txn, store: AgentStore, draft: Draft, offset: int,
               data: bytes) -> Staging:
    """The chunks that writing `data` at `offset` gives the draft: whole chunks are taken
    from `data` as they are, a chunk it covers only in part is read and patched."""
    end = offset + len(data)
    staging = Staging(draft, size=max(draft.size, end), cut=draft.cut)
    view = memoryview(data)
    for number in range(offset // CHUNK, chunks_of(end)):
        start = number * CHUNK
        lo, hi = max(offset, start), min(end, start + CHUNK)
        piece = view[lo - offset:hi - offset]
        held = max(0, min(CHUNK, draft.size - start))  # bytes of the chunk before the write
        if lo == start and hi - start >= held:
            staging.puts[number] = piece
            continue
        old = draft_chunk(txn, store, draft, draft.blob, number)
        old = old + bytes(max(0, held - len(old)))
        head = old[:lo - start] + bytes(max(0, lo - start - len(old)))
        staging.puts[number] = head + bytes(piece) + old[hi - start:]
    return staging


def plan_truncate(txn: Txn, store: AgentStore, draft: Draft, size: int) -> Staging:
    """The chunks that truncating the draft to `size` drops, and the one it shortens."""
    staging = Staging(draft, size=size, cut=draft.cut)
    if size >= draft.size:
        return staging  # longer: the new bytes are zeros, held by no chunk
    staging.cut = min(draft.cut, size)
    staging.drops = sorted(n for n in draft.staged | draft.dirty.keys() if n * CHUNK >= size)
    if size % CHUNK:
        number = size // CHUNK
        staging.puts[number] = draft_chunk(txn, store, draft, draft.blob, number)[:size % CHUNK]
    return staging


def absorb(staging: Staging) -> None:
    """Take a write's or a truncation's chunks into the draft (in memory)."""
    draft = staging.draft
    for number in staging.drops:
        draft.dirty.pop(number, None)
        if number in draft.staged:
            draft.staged.discard(number)
            draft.doomed.add(number)
    for number, piece in staging.puts.items():
        draft.dirty[number] = bytes(piece)
    draft.size, draft.cut = staging.size, staging.cut


def should_spill(draft: Draft) -> bool:
    return sum(len(piece) for piece in draft.dirty.values()) >= SPILL


def spill(txn: Txn, store: AgentStore, draft: Draft) -> None:
    """Put the chunks the draft holds in memory in the store, under its gen (not yet
    visible); the caller calls `spilled` once the commit is durable."""
    chunks = store.db["chunks"]
    txn.put(_u64(draft.gen), draft.index.to_bytes(4, "big") + _u64(draft.blob),
            db=store.db["drafts"])
    for number in draft.doomed:
        txn.delete(chunk_key(draft.blob, number, draft.gen), db=chunks)
    for number, piece in draft.dirty.items():
        txn.put(chunk_key(draft.blob, number, draft.gen), piece, db=chunks)


def spilled(draft: Draft) -> None:
    draft.registered = True
    draft.staged.update(draft.dirty)
    draft.dirty.clear()
    draft.doomed.clear()


# -- publishing and deleting ----------------------------------------------------


def publish(txn: Txn, store: AgentStore, draft: Draft) -> None:
    """Make the draft (and any base not yet published) the value's committed version.

    The caller marks the drafts published once the commit is durable (`published`)."""
    if draft.base is not None and not draft.base.published:
        publish(txn, store, draft.base)
    chunks, drafts = store.db["chunks"], store.db["drafts"]
    for number in draft.doomed:
        txn.delete(chunk_key(draft.blob, number, draft.gen), db=chunks)
    for number, piece in draft.dirty.items():
        txn.put(chunk_key(draft.blob, number, draft.gen), piece, db=chunks)
    mine = draft.staged | draft.dirty.keys()
    replaced: list[bytes] = []
    for number in mine:
        prefix = _u64(draft.blob) + _u64(number)
        replaced += (key for key in _keys(txn, chunks, prefix)
                   if key[16:] != _u64(draft.gen) and txn.get(key[16:], db=drafts) is None)
    if draft.cut != _NO_CUT:
        first = _u64(draft.blob) + _u64(chunks_of(draft.cut))
        cursor = txn.cursor(db=chunks)
        if cursor.set_range(first):
            for raw in cursor.iternext(values=False):
                key = bytes(raw)
                if key[:8] != first[:8]:
                    break
                number = int.from_bytes(key[8:16], "big")
                if number not in mine and txn.get(key[16:], db=drafts) is None:
                    replaced.append(key)
    for key in replaced:
        txn.delete(key, db=chunks)
    txn.delete(_u64(draft.gen), db=drafts)


def published(draft: Draft) -> None:
    """Record that `publish` committed: the draft's chunks are the value's now."""
    for version in draft.chain():
        spilled(version)
        version.published = True


def discard(txn: Txn, store: AgentStore, draft: Draft) -> None:
    """Delete the chunks of a draft (and of its bases) that will not be published."""
    for version in draft.chain():
        if version.published or not version.registered:
            continue
        for number in version.staged | version.doomed:
            txn.delete(chunk_key(version.blob, number, version.gen), db=store.db["chunks"])
        txn.delete(_u64(version.gen), db=store.db["drafts"])


def delete_blob(txn: Txn, store: AgentStore, blob: int) -> None:
    """Delete every chunk of a value that is gone (removed, or replaced by a rename)."""
    chunks = store.db["chunks"]
    for key in list(_keys(txn, chunks, _u64(blob))):
        txn.delete(key, db=chunks)


def sweep(store: AgentStore) -> int:
    """Delete the drafts a crash left (their writers are gone); returns how many."""
    chunks, drafts = store.db["chunks"], store.db["drafts"]
    with store.env.begin(write=True) as txn:
        left = [(bytes(gen), bytes(row)) for gen, row in txn.cursor(db=drafts)]
        for gen, row in left:
            for key in list(_keys(txn, chunks, row[4:12])):
                if key[16:] == gen:
                    txn.delete(key, db=chunks)
            txn.delete(gen, db=drafts)
    return len(left)


def _keys(txn: Txn, db: Any, prefix: bytes) -> Iterator[bytes]:
    cursor = txn.cursor(db=db)
    if not cursor.set_range(prefix):
        return
    for raw in cursor.iternext(values=False):
        key = bytes(raw)
        if not key.startswith(prefix):
            return
        yield key


def put_whole(txn: Txn, store: AgentStore, blob: int, data: bytes) -> None:
    """Store `data` as blob `blob`'s committed chunks (a value made whole at once: a
    migration's, an import's)."""
    view = memoryview(data)
    for number in range(chunks_of(len(data))):
        txn.put(chunk_key(blob, number, 0), view[number * CHUNK:(number + 1) * CHUNK],
                db=store.db["chunks"])


def migrate_inline_values(store: AgentStore, txn: Txn) -> None:
    """Store versions 2 to 4 held each value in its entry (`kind + mtime + bytes`): move the
    bytes to chunks of a blob of its own, and the entry to `kind + mtime + size + blob`."""
    state = store.db["state"]
    old = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=state)]
    blob = take_ids(txn, store, len(old))
    for key, raw in old:
        kind, mtime, data = raw[:1], raw[1:9], raw[9:]
        put_whole(txn, store, blob, data)
        size = len(data) if kind == b"f" else 0
        txn.put(key, kind + mtime + _u64(size) + _u64(blob if kind == b"f" else 0),
                db=state)
        blob += 1
