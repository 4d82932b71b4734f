"""`agentfs ps` and `agentfs top`: a mount's agents and its daemon, seen through the tree.

Like any user's tool, both read only the served files: the root `status` (the daemon's own
figures), and each agent's `ctl` and `budget`.  Nothing here opens the store.
"""

from __future__ import annotations

import argparse
import contextlib
import curses
import errno
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import errors
from .units import parse_duration

STATUSES = ("creating", "active", "dormant", "failed", "terminated")
# Each budget resource: its usage key and its limit key in `budget`, and whether a duration.
RESOURCES = (
    ("compute", "used_daily_compute", "max_daily_compute", True),
    ("storage", "used_storage_bytes", "max_storage_bytes", False),
    ("api_calls", "used_daily_api_calls", "max_daily_api_calls", False),
    ("spend_sats", "used_daily_spend_sats", "max_daily_spend_sats", False),
)
# What the root `status` has always: a file of that name without them is not agentfs's.
STATUS_KEYS = ("pid", "agents", "awake", "ticks", "ticks_per_s", "rss_bytes")
DEAD_MOUNT_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)  # as in cli.py
MAX_STATUS = 1 << 16  # bytes of a root `status` read: agentfs's is well under 1 KiB


class FleetError(Exception):
    """A mount point that cannot be read as agentfs: the sentence says why."""


@dataclass(frozen=True)
class Usage:
    used: float
    limit: float

    @property
    def percent(self) -> float:
        return 100.0 * self.used / self.limit if self.limit > 0 else 0.0


@dataclass(frozen=True)
class Agent:
    """One agent as its `ctl` and `budget` show it."""

    npub: str
    name: str | None
    status: str
    ticks: int
    pending: int
    last: str | None  # when its last tick ended (RFC 3339), None before the first
    last_result: str | None  # ok or error
    last_error: str | None  # the reason, for an error
    budget: dict[str, Usage]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "npub": self.npub, "status": self.status, "ticks": self.ticks,
            "pending": self.pending, "last": self.last, "last_result": self.last_result,
            "last_error": self.last_error,
            "budget": {k: {"used": _plain(u.used), "limit": _plain(u.limit)}
                       for k, u in self.budget.items()},
        }


def _plain(value: float) -> float | int:
    """A whole number as an int in JSON (bytes, calls, sats); seconds keep their fraction."""
    return int(value) if value.is_integer() else value


@dataclass(frozen=True)
class Sample:
    """The whole fleet at one moment."""

    when: float  # time.monotonic()
    daemon: dict[str, str]
    agents: list[Agent]


def _keyed(text: str) -> dict[str, str]:
    """`key value` lines, as ctl, budget and status are."""
    pairs = (line.partition(" ") for line in text.splitlines())
    return {key: value for key, _, value in pairs if key}


def daemon_status(mountpoint: Path) -> dict[str, str]:
    """The root `status`, or FleetError saying why `mountpoint` is not an agentfs mount."""
    path = mountpoint / "status"
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_STATUS)  # whatever a file of that name elsewhere may hold
    except OSError as e:
        raise FleetError(_why_not(mountpoint, e)) from None
    status = _keyed(raw.decode("utf-8", errors="replace"))
    if not all(key in status for key in STATUS_KEYS):
        raise FleetError(f"{mountpoint}: not an agentfs mount ({path} is not agentfs's "
                         "status file)")
    return status


def _why_not(mountpoint: Path, error: OSError) -> str:
    if error.errno in DEAD_MOUNT_ERRNOS:
        return (f"{mountpoint}: not connected: its agentfs daemon is gone (unmount it with "
                f"fusermount3 -uz {mountpoint})")
    if not os.path.isdir(mountpoint):
        return f"{mountpoint}: no such directory"
    if error.errno in (errno.ENOENT, errno.ENOTDIR):
        return f"{mountpoint}: not an agentfs mount (it has no status file)"
    if error.errno in (errno.EACCES, errno.EPERM):
        return (f"{mountpoint}/status: permission denied: the tree's files are the mount "
                "owner's (run this as the user that mounted it)")
    return f"{mountpoint}/status: {error.strerror}"


def parse_last(text: str) -> tuple[str | None, str | None, str | None]:
    """ctl's `last`: `TIME ok`, `TIME error: REASON` or `-`, as (time, result, reason)."""
    when, _, outcome = text.partition(" ")
    if when in ("", "-"):
        return None, None, None
    if outcome.startswith("error"):
        return when, "error", outcome.partition(":")[2].strip() or None
    return when, outcome or None, None


def _number(text: str, duration: bool) -> float:
    try:
        return parse_duration(text) if duration else float(text)
    except (ValueError, errors.FsError):
        return 0.0  # a figure this version does not know how to read


def read_agent(directory: Path) -> Agent:
    ctl = _keyed((directory / "ctl").read_text())
    budget = _keyed((directory / "budget").read_text())
    last, result, reason = parse_last(ctl.get("last", "-"))
    usage = {resource: Usage(_number(budget.get(used, "0"), duration),
                             _number(budget.get(most, "0"), duration))
             for resource, used, most, duration in RESOURCES}
    name = ctl.get("name", "-")
    return Agent(ctl.get("npub", directory.name), None if name == "-" else name,
                 ctl.get("status", "?"), int(ctl.get("ticks", "0")),
                 int(ctl.get("pending", "0")), last, result, reason, usage)


def sample(mountpoint: Path) -> Sample:
    """The daemon's status and every agent's, read now; agents in the order of the root."""
    daemon = daemon_status(mountpoint)
    agents = [read_agent(mountpoint / entry) for entry in agent_directories(mountpoint)]
    return Sample(time.monotonic(), daemon, agents)


def agent_directories(mountpoint: Path) -> list[str]:
    """The agents' directories in the root's order, the order they were made (names, the
    links, never start with npub1)."""
    return [entry for entry in os.listdir(mountpoint) if entry.startswith("npub1")]


# -- figures as text ---------------------------------------------------------------------------


def age(when: str | None, now: datetime) -> str:
    """How long ago an RFC 3339 time was, in its largest unit: 12s, 5m, 3h, 2d."""
    if when is None:
        return "-"
    try:
        then = datetime.fromisoformat(when.replace("Z", "+00:00"))
    except ValueError:
        return "?"
    seconds = max(0.0, (now - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def percent(usage: Usage) -> str:
    return f"{usage.percent:.0f}%"


def table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    """Columns as wide as their widest cell, left-aligned, two spaces apart; the last one
    (the npub) unpadded."""
    rows = list(rows)
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False))
            + "  " + row[-1] for row in (header, *rows)]


PS_HEADER = ["NAME", "STATUS", "TICKS", "PENDING", "LAST", "RESULT", "COMPUTE", "STORAGE",
             "NPUB"]


def ps_row(agent: Agent, now: datetime) -> list[str]:
    return [agent.name or "-", agent.status, str(agent.ticks), str(agent.pending),
            age(agent.last, now), agent.last_result or "-",
            percent(agent.budget["compute"]), percent(agent.budget["storage"]), agent.npub]


# -- agentfs ps --------------------------------------------------------------------------------


def cmd_ps(args: argparse.Namespace) -> int:
    mountpoint = Path(args.mountpoint)
    try:
        agents = sample(mountpoint).agents
    except FleetError as e:
        print(f"agentfs: {e}", file=sys.stderr)
        return 1
    if args.status:
        agents = [a for a in agents if a.status in args.status]
    if args.json:
        json.dump([a.to_json() for a in agents], sys.stdout)
        sys.stdout.write("\n")
        return 0
    now = datetime.now(UTC)
    for line in table(PS_HEADER, (ps_row(a, now) for a in agents)):
        print(line)
    return 0


# -- agentfs top -------------------------------------------------------------------------------


TOP_HEADER = ["NAME", "STATUS", "TICKS/S", "TICKS", "PENDING", "LAST", "RESULT", "COMPUTE",
              "STORAGE", "NPUB"]


def rates(now: Sample, before: Sample | None) -> dict[str, float | None]:
    """Each agent's ticks a second between two samples (None for the first sample)."""
    if before is None:
        return {a.npub: None for a in now.agents}
    span = now.when - before.when
    earlier = {a.npub: a.ticks for a in before.agents}
    return {a.npub: max(0, a.ticks - earlier.get(a.npub, 0)) / span if span > 0 else 0.0
            for a in now.agents}


def by_activity(agents: list[Agent], rate: dict[str, float | None]) -> list[Agent]:
    """Busiest first: tick rate, then triggers pending, then the latest last tick."""
    return sorted(agents, key=lambda a: (-(rate[a.npub] or 0.0), -a.pending,
                                         _negated_time(a.last), a.name or a.npub))


def _negated_time(when: str | None) -> float:
    if when is None:
        return math.inf
    try:
        return -datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return math.inf


def _uptime(text: str) -> str:
    try:
        seconds = int(parse_duration(text))
    except errors.FsError:
        return text
    days, rest = divmod(seconds, 86400)
    clock = f"{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days} days, {clock}" if days else clock


def frame(mountpoint: Path, now: Sample, before: Sample | None) -> list[str]:
    """One screen of top: the daemon's figures, then the agents, busiest first."""
    d, agents = now.daemon, now.agents
    count = {status: sum(1 for a in agents if a.status == status) for status in STATUSES}
    rss = int(d.get("rss_bytes", "0")) / (1 << 20)
    clock = datetime.now(UTC)
    lines = [
        f"agentfs top - {clock:%H:%M:%S} up {_uptime(d.get('uptime', '0s'))}, "
        f"{os.path.abspath(mountpoint)}, "
        f"pid {d.get('pid', '?')}, sandbox {d.get('sandbox', '?')}",
        f"Agents: {len(agents)} total, {d.get('awake', '?')} awake, "
        f"{d.get('running', '?')} running (of {d.get('jobs', '?')} jobs); "
        + ", ".join(f"{count[s]} {s}" for s in STATUSES),
        f"Ticks: {d.get('ticks_per_s', '?')}/s, {d.get('ticks', '?')} committed, "
        f"{d.get('failed_ticks', '?')} failed since mount",
        f"Commits: {d.get('commits', '?')}, latency p50 {d.get('commit_latency_p50', '?')} "
        f"p99 {d.get('commit_latency_p99', '?')} (last 10s); memory {rss:.1f} MiB resident",
        "",
    ]
    rate = rates(now, before)
    rows = []
    for a in by_activity(agents, rate):
        shown = "-" if rate[a.npub] is None else f"{rate[a.npub]:.1f}"
        row = ps_row(a, clock)
        rows.append([*row[:2], shown, *row[2:]])  # TICKS/S after NAME and STATUS
    return lines + table(TOP_HEADER, rows)


def cmd_top(args: argparse.Namespace) -> int:
    mountpoint = Path(args.mountpoint)
    try:
        first = sample(mountpoint)  # a mount point that is not agentfs fails before curses
    except FleetError as e:
        print(f"agentfs: {e}", file=sys.stderr)
        return 1
    if not args.batch and not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("agentfs: top draws on a terminal, and this is none: use -b (batch mode) to "
              "print frames", file=sys.stderr)
        return 1
    try:
        if args.batch:
            _batch(mountpoint, first, args.delay, args.iterations)
        else:
            curses.wrapper(_interactive, mountpoint, first, args.delay, args.iterations)
    except FleetError as e:
        print(f"agentfs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _batch(mountpoint: Path, first: Sample, delay: float, iterations: int | None) -> None:
    """top -b: frames on standard output, one after another, a blank line between."""
    before, now, shown = None, first, 0
    while True:
        print("\n".join(frame(mountpoint, now, before)), flush=True)
        shown += 1
        if iterations is not None and shown >= iterations:
            return
        print(flush=True)
        time.sleep(delay)
        before, now = now, sample(mountpoint)


def _interactive(screen: curses.window, mountpoint: Path, first: Sample, delay: float,
                 iterations: int | None) -> None:
    _invisible_cursor()
    before, now, shown = None, first, 0
    while True:
        _draw(screen, frame(mountpoint, now, before))
        shown += 1
        if iterations is not None and shown >= iterations:
            return
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            screen.timeout(max(1, int(left * 1000)))  # getch waits this long for a key
            key = screen.getch()
            if key in (ord("q"), ord("Q")):
                return
            if key == curses.KEY_RESIZE:
                break  # drawn again at once, to the new size
        before, now = now, sample(mountpoint)


def _invisible_cursor() -> None:
    with contextlib.suppress(curses.error):  # a terminal that cannot hide it shows it
        curses.curs_set(0)


def _draw(screen: curses.window, lines: list[str]) -> None:
    height, width = screen.getmaxyx()
    screen.erase()
    for y, line in enumerate(lines[:height]):
        attr = curses.A_REVERSE if line.startswith("NAME ") else curses.A_NORMAL
        with contextlib.suppress(curses.error):  # the bottom-right cell fails, once written
            screen.addnstr(y, 0, line, width, attr)
    screen.refresh()


# -- the command line --------------------------------------------------------------------------


def _statuses(text: str) -> set[str]:
    wanted = {s for s in text.split(",") if s}
    unknown = wanted - set(STATUSES)
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a status is one of {', '.join(STATUSES)} (several: comma-separated)")
    return wanted


def _delay(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0.05 <= seconds <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds from 0.05 to 86400")
    return seconds


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of at least 1")
    return int(text)


def add_parsers(sub: Any) -> None:
    """`ps` and `top`, as subcommands of `agentfs`."""
    ps = sub.add_parser("ps", help="list a mount's agents",
                        description="One line per agent of the mount: name, status, ticks, "
                                    "pending triggers, last tick (how long ago) and its result, "
                                    "today's compute and the storage used (of their limits), "
                                    "npub. Reads only the tree's files.")
    ps.add_argument("mountpoint", nargs="?", default=".",
                    help="an agentfs mount point (default: the current directory)")
    ps.add_argument("--json", action="store_true",
                    help="one JSON array of objects, one per agent, for scripts")
    ps.add_argument("--status", type=_statuses, metavar="S[,S...]",
                    help=f"only agents of these statuses ({', '.join(STATUSES)})")
    ps.set_defaults(run=cmd_ps)

    top = sub.add_parser("top", help="watch a mount's agents and daemon, live",
                         description="A live view of the mount, as top(1): the daemon's "
                                     "figures, then its agents, busiest first. q quits.")
    top.add_argument("mountpoint", nargs="?", default=".",
                     help="an agentfs mount point (default: the current directory)")
    top.add_argument("-d", dest="delay", type=_delay, default=2.0, metavar="SECS",
                     help="seconds between refreshes (default 2)")
    top.add_argument("-b", dest="batch", action="store_true",
                     help="batch mode: print frames to standard output, no curses")
    top.add_argument("-n", dest="iterations", type=_positive, metavar="N",
                     help="stop after N frames")
    top.set_defaults(run=cmd_top)


COMMANDS = ("ps", "top")
