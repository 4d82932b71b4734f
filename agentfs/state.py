"""An agent's `state/` tree: key layout in LMDB and the file operations on it.

A key is `ix + parent + b"\\0" + name`, so one range scan lists a directory.  An entry
holds a file's size and the blob its bytes are in (see values.py), so renaming a file moves
no bytes.  The operations on names (`create`, `rename`, ...) are written once against
`StateView`, which the committed store (`TxnState`) and a tick's uncommitted overlay both
provide; writes and truncations go through a draft (`Runtime.state_write`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import NamedTuple, Protocol

from . import errors, values
from .store import AgentStore, Txn, agent_key, scan_prefix

MAX_NAME = 255
_FILE, _DIR = b"f", b"d"


class Entry(NamedTuple):
    is_dir: bool
    mtime_ns: int
    size: int = 0
    blob: int = 0  # where a file's bytes are (values.py); 0 for a directory
    draft: values.Draft | None = None  # uncommitted bytes over the blob's (never stored)

    def encode(self) -> bytes:
        return (_DIR if self.is_dir else _FILE) + b"".join(
            n.to_bytes(8, "big") for n in (self.mtime_ns, self.size, self.blob))

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> Entry:
        raw = bytes(raw)
        mtime, size, blob = (int.from_bytes(raw[i:i + 8], "big") for i in (1, 9, 17))
        return cls(raw[:1] == _DIR, mtime, size, blob)

    def changed(self, size: int, draft: values.Draft | None) -> Entry:
        """This file with its bytes changed: a new size and mtime, over `draft`."""
        return Entry(False, now_ns(), size, self.blob, draft)


ROOT = Entry(True, 0)


def split(path: str) -> tuple[str, str]:
    """`a/b/c` -> (`a/b`, `c`); `c` -> (``, `c`)."""
    parent, _, name = path.rpartition("/")
    return parent, name


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def state_key(index: int, path: str) -> bytes:
    parent, name = split(path)
    return agent_key(index) + parent.encode() + b"\0" + name.encode()


class StateView(Protocol):
    """The primitive reads and writes the file operations need."""

    def get(self, path: str) -> Entry | None: ...

    def children(self, path: str) -> Iterator[tuple[str, Entry]]: ...

    def set(self, path: str, entry: Entry | None) -> None: ...


class TxnState:
    """An agent's committed state seen through one LMDB transaction."""

    def __init__(self, store: AgentStore, txn: Txn, index: int) -> None:
        self.store, self.txn, self.index = store, txn, index
        self.db = store.db["state"]
        self.bytes_delta = 0
        # Blobs that lost their entry, and those an entry now holds (a rename moves one):
        # `finish` deletes the bytes of the first not in the second.
        self._dropped: set[int] = set()
        self._kept: set[int] = set()
        self.published: list[values.Draft] = []

    def get(self, path: str) -> Entry | None:
        if path == "":
            return ROOT
        raw = self.txn.get(state_key(self.index, path), db=self.db)
        return None if raw is None else Entry.decode(raw)

    def children(self, path: str) -> Iterator[tuple[str, Entry]]:
        prefix = agent_key(self.index) + path.encode() + b"\0"
        for name, raw in scan_prefix(self.txn, self.db, prefix):
            yield name.decode(), Entry.decode(raw)

    def set(self, path: str, entry: Entry | None) -> None:
        key = state_key(self.index, path)
        raw = self.txn.get(key, db=self.db)
        old = None if raw is None else Entry.decode(raw)
        if old is not None and not old.is_dir:
            self._dropped.add(old.blob)
        if entry is None:
            if old is not None:
                self.txn.delete(key, db=self.db)
        else:
            self.txn.put(key, entry.encode(), db=self.db)
            if not entry.is_dir:
                self._kept.add(entry.blob)
            if entry.draft is not None and not entry.draft.published:
                values.publish(self.txn, self.store, entry.draft)
                self.published.append(entry.draft)
        self.bytes_delta += (0 if entry is None else entry.size) - \
            (0 if old is None else old.size)

    def finish(self) -> None:
        """Delete the bytes of the values no entry holds any more."""
        for blob in self._dropped - self._kept:
            values.delete_blob(self.txn, self.store, blob)

    def descendants(self, path: str) -> Iterator[tuple[str, Entry]]:
        for name, entry in self.children(path):
            child = join(path, name)
            yield child, entry
            if entry.is_dir:
                yield from self.descendants(child)


# -- operations, shared by committed and overlay views ---------------------------


def now_ns() -> int:
    return time.time_ns()


def check_name(path: str) -> None:
    _parent, name = split(path)
    if len(name.encode()) > MAX_NAME:
        raise errors.name_too_long(path)


def lookup(view: StateView, path: str) -> Entry:
    entry = view.get(path)
    if entry is None:
        raise errors.no_such_file(f"state/{path}")
    return entry


def _parent_dir(view: StateView, path: str) -> None:
    parent, _name = split(path)
    entry = view.get(parent)
    if entry is None:
        raise errors.no_such_file(f"state/{parent}")
    if not entry.is_dir:
        raise errors.not_dir(f"state/{parent}")


def create(view: StateView, path: str, blob: int) -> Entry:
    check_name(path)
    _parent_dir(view, path)
    existing = view.get(path)
    if existing is not None:
        if existing.is_dir:
            raise errors.is_dir(f"state/{path}")
        raise errors.exists(f"state/{path}")
    entry = Entry(False, now_ns(), 0, blob)
    view.set(path, entry)
    return entry


def mkdir(view: StateView, path: str) -> Entry:
    check_name(path)
    _parent_dir(view, path)
    if view.get(path) is not None:
        raise errors.exists(f"state/{path}")
    entry = Entry(True, now_ns())
    view.set(path, entry)
    return entry


def file(view: StateView, path: str) -> Entry:
    """The file at `path`, to write to (not a directory)."""
    entry = lookup(view, path)
    if entry.is_dir:
        raise errors.is_dir(f"state/{path}")
    return entry


def unlink(view: StateView, path: str) -> None:
    if lookup(view, path).is_dir:
        raise errors.is_dir(f"state/{path}")
    view.set(path, None)


def rmdir(view: StateView, path: str) -> None:
    if not lookup(view, path).is_dir:
        raise errors.not_dir(f"state/{path}")
    if next(iter(view.children(path)), None) is not None:
        raise errors.not_empty(f"state/{path}")
    view.set(path, None)


def _move_tree(view: StateView, old: str, new: str, entry: Entry) -> None:
    view.set(new, entry)
    if entry.is_dir:
        for name, child in list(view.children(old)):
            _move_tree(view, join(old, name), join(new, name), child)
    view.set(old, None)


def rename(view: StateView, old: str, new: str) -> None:
    """rename(2) within one agent's state: replaces a file or an empty directory."""
    check_name(new)
    entry = lookup(view, old)
    _parent_dir(view, new)
    if old == new:
        return
    if entry.is_dir and (new + "/").startswith(old + "/"):
        raise errors.invalid(f"state/{old}: cannot move a directory into itself")
    target = view.get(new)
    if target is not None:
        if target.is_dir and not entry.is_dir:
            raise errors.is_dir(f"state/{new}")
        if entry.is_dir and not target.is_dir:
            raise errors.not_dir(f"state/{new}")
        if target.is_dir:
            rmdir(view, new)
    _move_tree(view, old, new, entry)
