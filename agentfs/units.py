"""Durations and sizes as people write them in ctl and budget files: `30s`, `1h`, `100MB`."""

from __future__ import annotations

import re

from . import errors

_NUMBER = re.compile(r"^\s*([0-9]{1,18}(?:\.[0-9]{1,9})?)\s*([A-Za-z]*)\s*$", re.ASCII)
MAX_DURATION = 100 * 365 * 86400.0  # a century: anything longer is a mistake
MAX_SIZE = 1 << 62

DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def _split(text: str, what: str) -> tuple[float, str]:
    m = _NUMBER.match(text)
    if m is None:
        raise errors.invalid(
            f"{what} {text[:40]!r}: not a number (at most 18 digits) with an optional unit")
    return float(m.group(1)), m.group(2)


def parse_duration(text: str) -> float:
    """Seconds in `text`: a number with ms, s, m, h or d (bare = seconds)."""
    value, unit = _split(text, "duration")
    if unit not in DURATION_UNITS:
        raise errors.invalid(f"duration {text!r}: unit {unit!r} is not one of ms s m h d")
    seconds = value * DURATION_UNITS[unit]
    if seconds > MAX_DURATION:
        raise errors.invalid(f"duration {text!r}: longer than a century")
    return seconds


def parse_size(text: str) -> int:
    """Bytes in `text`: B, KB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB (powers of 1024)."""
    value, unit = _split(text, "size")
    factor = SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise errors.invalid(
            f"size {text!r}: unit {unit!r} is not one of B KB MB GB TB KiB MiB GiB TiB")
    size = value * factor
    if size > MAX_SIZE:
        raise errors.invalid(f"size {text!r}: larger than 2^62 bytes")
    if size != int(size):
        raise errors.invalid(f"size {text!r}: not a whole number of bytes")
    return int(size)


def format_duration(seconds: float) -> str:
    """The shortest exact rendering: 30s, 1h, 1.5s, 250ms."""
    for unit in ("d", "h", "m"):
        n = seconds / DURATION_UNITS[unit]
        if n >= 1 and n == int(n):
            return f"{int(n)}{unit}"
    if seconds != 0 and seconds < 1:
        ms = seconds * 1000
        return f"{ms:g}ms"
    return f"{seconds:g}s"
