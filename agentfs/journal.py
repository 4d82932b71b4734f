"""Append-only JSON-line files (`outbox`, `log`) keyed by byte offset, so offsets are stable.

Each line is stored under `ix + offset`, where offset is where the line starts in the file a
reader sees; `tail -f` and a reader that remembers its offset both work, and a read at any
offset is one cursor seek.
"""

from __future__ import annotations

import json
from typing import Any

from .store import AgentStore, Txn, agent_key


def encode_line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


class Journal:
    def __init__(self, store: AgentStore, name: str) -> None:
        self.store = store
        self.db = store.db[name]

    def last(self, txn: Txn, index: int) -> tuple[int, bytes] | None:
        """The offset and bytes of the agent's last line, or None for an empty journal."""
        cursor = txn.cursor(db=self.db)
        if cursor.set_range(agent_key(index + 1)):
            if not cursor.prev():
                return None
        elif not cursor.last():
            return None
        key = bytes(cursor.key())
        if not key.startswith(agent_key(index)):
            return None
        return int.from_bytes(key[4:], "big"), bytes(cursor.value())

    def size(self, txn: Txn, index: int) -> int:
        last = self.last(txn, index)
        return 0 if last is None else last[0] + len(last[1])

    def append(self, txn: Txn, index: int, record: dict[str, Any]) -> int:
        """Append one record; returns the offset its line starts at."""
        offset = self.size(txn, index)
        self.put(txn, index, offset, encode_line(record))
        return offset

    def put(self, txn: Txn, index: int, offset: int, line: bytes) -> None:
        txn.put(agent_key(index) + offset.to_bytes(8, "big"), line, db=self.db)

    def read(self, txn: Txn, index: int, offset: int, size: int) -> bytes:
        prefix = agent_key(index)
        cursor = txn.cursor(db=self.db)
        if not _seek_line(cursor, prefix, offset):
            return b""
        out = bytearray()
        for key, line in cursor:
            key = bytes(key)
            if not key.startswith(prefix) or len(out) >= size:
                break
            start = int.from_bytes(key[4:], "big")
            out += bytes(line)[max(0, offset - start):]
        return bytes(out[:size])


def _seek_line(cursor: Any, prefix: bytes, offset: int) -> bool:
    """Put `cursor` on the line holding `offset`, or the first one after it."""
    wanted = prefix + offset.to_bytes(8, "big")
    if not cursor.set_range(wanted):
        # Past every key: the holder, if ours, is the last line of all.
        return bool(cursor.last()) and bytes(cursor.key()).startswith(prefix)
    if bytes(cursor.key()) == wanted:
        return True
    if cursor.prev() and bytes(cursor.key()).startswith(prefix):
        return True
    return bool(cursor.set_range(wanted))
