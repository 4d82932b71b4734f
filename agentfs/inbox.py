"""The inbox queue: pending triggers keyed `ix + seq`, consumed by deleting them at commit."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from . import errors
from .store import AgentStore, Txn, agent_key, scan_prefix

Message = dict[str, Any]
MAX_ID = 256  # bytes; ids are keys of the `seen` table
# Bytes of one line of inbox or outbox, its newline aside: as much as a tick may print in all
# (ticks.MAX_STDOUT).  A partial line is held by the daemon until its newline comes.
MAX_LINE = 16 << 20


def rfc3339_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_line(line: bytes, what: str = "inbox") -> Message:
    """One line as a message: a JSON object, or text that becomes a text message."""
    text = line.decode("utf-8", errors="strict").rstrip("\r")
    if text.lstrip().startswith("{"):
        try:
            message = json.loads(text)
        except json.JSONDecodeError as e:
            raise errors.invalid(
                f"{what}: line is not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise errors.invalid(f"{what}: JSON nested too deeply") from None
        if not isinstance(message, dict):
            raise errors.invalid(f"{what}: a JSON line must be an object")
        if "\\ud" in text.lower():  # an escaped surrogate: is it half of a pair?
            try:
                json.dumps(message, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise errors.invalid(f"{what}: a lone UTF-16 surrogate in a string") from None
        return message
    return {"type": "text", "data": text}


def parse_lines(data: bytes, what: str = "inbox") -> list[Message]:
    """Every non-empty line of `data` as a message, or EINVAL for the whole lot."""
    messages = []
    for line in data.split(b"\n"):
        if line.strip():
            try:
                messages.append(parse_line(line, what))
            except UnicodeDecodeError:
                raise errors.invalid(f"{what}: a line is not UTF-8") from None
    return messages


# Ids the daemon gives meaning to: a timer driver's firing, an event a relay brought.
DRIVER_ID_PREFIXES = ("alarm:", "nostr:")


def check_id(message: Message) -> None:
    message_id = message.get("id")
    if isinstance(message_id, str) and len(message_id.encode()) > MAX_ID:
        raise errors.invalid(f"message id longer than {MAX_ID} bytes")


def check_agent_id(message: Message) -> None:
    """check_id, and no id of the drivers' kinds: an agent could otherwise fire or spend
    another's alarm, or take the id of a DM on its way so that it is dropped."""
    check_id(message)
    message_id = message.get("id")
    if isinstance(message_id, str) and message_id.startswith(DRIVER_ID_PREFIXES):
        raise errors.invalid(f"message id {message_id[:40]!r}: ids starting "
                             f"{' or '.join(DRIVER_ID_PREFIXES)} are for drivers")


def stamp_id(message: Message) -> None:
    """Keep a message's own id (a non-empty string, for idempotence) or give it one."""
    check_id(message)
    if not isinstance(message.get("id"), str) or not message["id"]:
        message["id"] = secrets.token_hex(16)


class Inbox:
    def __init__(self, store: AgentStore) -> None:
        self.store = store
        self.db = store.db["inbox"]
        self.seen = store.db["seen"]

    def append(self, txn: Txn, index: int, message: Message) -> Message | None:
        """Queue `message`, stamped with id, seq and time; None if its id was accepted before.

        A sender that retries with the same id (a driver that died before it heard back)
        is acknowledged, and the message is not applied twice.
        """
        stored = dict(message)
        stored.setdefault("type", "text")
        stamp_id(stored)
        seen = agent_key(index) + stored["id"].encode()
        if txn.get(seen, db=self.seen) is not None:
            return None
        seq = self.store.bump_counter(txn, index, b"inbox-seq")
        txn.put(seen, seq.to_bytes(8, "big"), db=self.seen)
        stored["seq"] = seq
        stored["time"] = rfc3339_now()
        raw = json.dumps(stored, separators=(",", ":"), ensure_ascii=False).encode()
        txn.put(agent_key(index) + seq.to_bytes(8, "big"), raw, db=self.db)
        return stored

    def seen_before(self, txn: Txn, index: int, message_id: object) -> bool:
        """Whether a message with this id was accepted already (pending or consumed)."""
        return isinstance(message_id, str) and \
            txn.get(agent_key(index) + message_id.encode(), db=self.seen) is not None

    def pending(self, txn: Txn, index: int) -> Iterator[tuple[int, bytes]]:
        for seq, raw in scan_prefix(txn, self.db, agent_key(index)):
            yield int.from_bytes(seq, "big"), raw

    def first(self, txn: Txn, index: int) -> tuple[int, Message] | None:
        for seq, raw in self.pending(txn, index):
            return seq, json.loads(raw)
        return None

    def count(self, txn: Txn, index: int) -> int:
        return sum(1 for _ in self.pending(txn, index))

    def consume(self, txn: Txn, index: int, seq: int) -> bool:
        return bool(txn.delete(agent_key(index) + seq.to_bytes(8, "big"), db=self.db))

    def agents_with_pending(self, txn: Txn) -> Iterator[int]:
        """Each agent index that has a pending message, skipping over the rest of its queue."""
        cursor = txn.cursor(db=self.db)
        if not cursor.first():
            return
        while True:
            index = int.from_bytes(bytes(cursor.key())[:4], "big")
            yield index
            if not cursor.set_range(agent_key(index + 1)):
                return
