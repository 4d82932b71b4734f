"""The `budget` file: one table of limits with their units, defaults and parsers."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from . import errors
from .store import AgentRecord
from .units import format_duration, parse_duration, parse_size


def _count(text: str) -> float:
    if not re.fullmatch(r"[0-9]{1,15}", text.strip(), re.ASCII):
        raise errors.invalid(f"count {text[:40]!r}: not a whole number of at most 15 digits")
    return float(int(text))


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise errors.invalid(f"threshold {text[:40]!r}: not a number") from None
    if not math.isfinite(value) or not 0 < value <= 1:
        raise errors.invalid(f"threshold {text!r}: must be above 0 and at most 1")
    return value


def _positive_duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise errors.invalid(f"duration {text!r}: must be above zero")
    return seconds


@dataclass(frozen=True)
class Limit:
    key: str
    default: float
    parse: Callable[[str], float]
    render: Callable[[float], str]
    usage: str | None  # the usage figure that goes with it


LIMITS = (
    Limit("max_tick_duration", 30.0, _positive_duration, format_duration, "last_tick_duration"),
    Limit("max_daily_compute", 3600.0, _positive_duration, format_duration, "used_daily_compute"),
    Limit("max_storage_bytes", 100e6, lambda t: float(parse_size(t)), lambda v: str(int(v)),
          "used_storage_bytes"),
    Limit("max_daily_api_calls", 1000.0, _count, lambda v: str(int(v)), "used_daily_api_calls"),
    Limit("max_daily_spend_sats", 10000.0, _count, lambda v: str(int(v)), "used_daily_spend_sats"),
    Limit("warning_threshold", 0.8, _fraction, lambda v: f"{v:g}", None),
)
LIMIT_BY_KEY = {limit.key: limit for limit in LIMITS}
DAILY_USAGE = ("used_daily_compute", "used_daily_api_calls", "used_daily_spend_sats")


def limit(record: AgentRecord, key: str) -> float:
    return record.limits.get(key, LIMIT_BY_KEY[key].default)


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def next_reset() -> datetime:
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight + timedelta(days=1)


def roll_day(record: AgentRecord) -> None:
    """Daily usage, and the warnings given about it, reset at 00:00 UTC."""
    if record.usage.get("day") != today():
        record.usage["day"] = today()
        for key in DAILY_USAGE:
            record.usage[key] = 0
        record.usage["warned"] = []
        record.usage.pop("compute_refused", None)


# Each resource: its usage figure and its limit.
RESOURCES = (
    ("compute", "used_daily_compute", "max_daily_compute"),
    ("storage", "used_storage_bytes", "max_storage_bytes"),
    ("api_calls", "used_daily_api_calls", "max_daily_api_calls"),
    ("spend_sats", "used_daily_spend_sats", "max_daily_spend_sats"),
)


def new_warnings(record: AgentRecord, storage_bytes: int) -> list[dict[str, Any]]:
    """Resources whose usage crossed warning_threshold and were not warned of today.

    Marks them warned in `record`, so each resource is warned of once a day.
    """
    roll_day(record)
    usage = dict(record.usage, used_storage_bytes=storage_bytes)
    threshold = limit(record, "warning_threshold")
    warned: list[str] = record.usage.setdefault("warned", [])
    crossed = []
    for resource, used_key, limit_key in RESOURCES:
        used, most = float(usage.get(used_key, 0)), limit(record, limit_key)
        if resource not in warned and used >= threshold * most:
            warned.append(resource)
            crossed.append({"resource": resource, "used": round(used, 3), "limit": most})
    return crossed


def parse_settings(text: str) -> dict[str, float]:
    """`key value` lines to set; any bad line refuses the whole write."""
    settings: dict[str, float] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words:
            continue
        if len(words) != 2:
            raise errors.invalid(
                f"budget line {number}: expected `key value`, got {line.strip()!r}")
        key, value = words
        if key not in LIMIT_BY_KEY:
            known = " ".join(LIMIT_BY_KEY)
            raise errors.invalid(f"budget line {number}: unknown key {key!r} (known: {known})")
        settings[key] = LIMIT_BY_KEY[key].parse(value)
    if not settings:
        raise errors.invalid("budget: nothing to set (write `key value` lines)")
    return settings


def render(record: AgentRecord, storage_bytes: int) -> str:
    roll_day(record)
    usage = dict(record.usage, used_storage_bytes=storage_bytes)
    lines = []
    for lim in LIMITS:
        lines.append(f"{lim.key} {lim.render(limit(record, lim.key))}")
    for lim in LIMITS:
        if lim.usage is None:
            continue
        value = float(usage.get(lim.usage, 0))
        shown = format_duration(round(value, 3)) if "compute" in lim.usage or "duration" in \
            lim.usage else str(int(value))
        lines.append(f"{lim.usage} {shown}")
    reset = next_reset().isoformat().replace("+00:00", "Z")
    lines.append(f"next_reset {reset}")
    return "\n".join(lines) + "\n"
