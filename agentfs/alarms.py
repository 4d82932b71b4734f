"""Alarms: one per agent, kept in its record and in a store-wide index by due time.

The daemon does not fire alarms itself.  The root file `alarms` lists what is due, and a
timer driver writes each one into the agent's inbox as `{"type": "alarm", "id": ID}` when
its time comes.  The id names the due time and the setting (`alarm:<unix ms>.<n>`), so the
inbox's id dedupe
makes a driver's retry harmless, and the daemon can tell the firing of the agent's alarm
from a stale one (cancelled or replaced meanwhile), which it drops.  A periodic alarm
advances past now when it fires: after downtime it fires once, not once per missed period.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from . import errors
from .inbox import Message
from .store import AgentRecord, AgentStore, Txn, agent_key
from .units import format_duration, parse_duration

ID_PREFIX = "alarm:"
CANCEL = "cancel"
MIN_PERIOD = 1.0  # seconds: a shorter `every` is a busy loop, not an alarm
_AT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:\d{2})$")


@dataclass(frozen=True)
class Alarm:
    due: float  # unix seconds, whole milliseconds
    every: float | None = None  # seconds between firings of a periodic alarm
    serial: int = 0  # which setting of the agent's alarm this is: set again, a new id

    def __post_init__(self) -> None:
        object.__setattr__(self, "due", round(self.due * 1000) / 1000)

    @property
    def id(self) -> str:
        return f"{ID_PREFIX}{round(self.due * 1000)}.{self.serial}"

    def encode(self) -> dict[str, Any]:
        return {"due": self.due, "every": self.every, "serial": self.serial}

    @classmethod
    def decode(cls, raw: dict[str, Any] | None) -> Alarm | None:
        return None if raw is None else cls(float(raw["due"]), raw.get("every"),
                                            int(raw.get("serial", 0)))

    def to_arg(self) -> str:
        """The alarm as a ctl command's argument: set at write time, applied at commit."""
        return json.dumps(self.encode())

    @classmethod
    def from_arg(cls, arg: str) -> Alarm | None:
        return None if arg == CANCEL else cls.decode(json.loads(arg))

    def describe(self) -> str:
        text = rfc3339(self.due)
        return f"{text} every {format_duration(self.every)}" if self.every else text


def rfc3339(unix: float) -> str:
    moment = datetime.fromtimestamp(unix, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse(words: list[str], now: float | None = None) -> Alarm | None:
    """`30s`, `at TIME`, `every 5m` or `cancel` (None); EINVAL for anything else."""
    now = time.time() if now is None else now
    usage = "ctl: usage: alarm DURATION | alarm at RFC3339-TIME | alarm every DURATION | " \
            "alarm cancel"
    if words == [CANCEL]:
        return None
    if len(words) == 1:
        return Alarm(now + parse_duration(words[0]))
    if len(words) != 2:
        raise errors.invalid(usage)
    if words[0] == "at":
        if not _AT.match(words[1]):
            raise errors.invalid(f"ctl: alarm at {words[1][:40]!r}: not an RFC 3339 time "
                                 "such as 2026-12-01T08:00:00Z")
        try:
            due = datetime.fromisoformat(words[1].replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise errors.invalid(f"ctl: alarm at {words[1]!r}: no such time") from None
        if due < 0:
            raise errors.invalid(f"ctl: alarm at {words[1]!r}: before 1970")
        return Alarm(due)
    if words[0] == "every":
        period = parse_duration(words[1])
        if period < MIN_PERIOD:
            raise errors.invalid(f"ctl: alarm every {words[1]!r}: shorter than 1s")
        return Alarm(now + period, period)
    raise errors.invalid(usage)


class Alarms:
    """The `alarms` index: due time (ms) + agent -> b"", for the root file drivers read."""

    def __init__(self, store: AgentStore) -> None:
        self.store = store
        self.db = store.db["alarms"]

    @staticmethod
    def _key(alarm: Alarm, index: int) -> bytes:
        return round(alarm.due * 1000).to_bytes(8, "big") + agent_key(index)

    def set(self, txn: Txn, record: AgentRecord, alarm: Alarm | None) -> None:
        """Replace the agent's alarm (None cancels it); the caller puts the record."""
        old = Alarm.decode(record.alarm)
        if old is not None:
            txn.delete(self._key(old, record.index), db=self.db)
        if alarm is not None and (old is None or alarm.serial != old.serial):
            # A new setting, even of a time that fired before, gets an id never used.
            alarm = replace(alarm, serial=self.store.bump_counter(txn, record.index, b"alarm"))
        record.alarm = None if alarm is None else alarm.encode()
        if alarm is not None:
            txn.put(self._key(alarm, record.index), b"", db=self.db)

    def restore(self, txn: Txn, record: AgentRecord) -> None:
        """Index the alarm a record came with (an imported agent's), as it was set."""
        alarm = Alarm.decode(record.alarm)
        if alarm is not None:
            txn.put(self._key(alarm, record.index), b"", db=self.db)

    def fired(self, txn: Txn, record: AgentRecord, message: Message,
              now: float | None = None) -> bool | None:
        """For an inbox message with an alarm id: True if it is the agent's alarm firing
        (which then advances or ends), False if it is stale.  None for any other message."""
        message_id = message.get("id")
        if message.get("type") != "alarm" or not isinstance(message_id, str) or \
                not message_id.startswith(ID_PREFIX):
            return None
        alarm = Alarm.decode(record.alarm)
        if alarm is None or alarm.id != message_id:
            return False
        message["due"] = rfc3339(alarm.due)
        following = None
        if alarm.every:
            now = time.time() if now is None else now
            missed = max(0, int((now - alarm.due) // alarm.every))
            following = Alarm(alarm.due + (missed + 1) * alarm.every, alarm.every, alarm.serial)
            if missed:
                message["missed"] = missed
        self.set(txn, record, following)
        return True

    def text(self, txn: Txn) -> bytes:
        """`UNIX-SECONDS NPUB ID` a line, soonest first: what the timer drivers read."""
        lines = []
        for key, _value in txn.cursor(db=self.db):
            record = self.store.agent(txn, int.from_bytes(key[8:12], "big"))
            alarm = None if record is None else Alarm.decode(record.alarm)
            if record is not None and alarm is not None:
                lines.append(f"{alarm.due:.3f} {record.npub} {alarm.id}\n")
        return "".join(lines).encode()
