"""agentfs-timer: fires an agentfs mount's alarms, writing each due one into its agent's inbox.

It reads MOUNTPOINT/alarms (`UNIXSECONDS.mmm NPUB ALARM-ID` a line, soonest first) and
appends `{"type":"alarm","id":ALARM-ID}` to MOUNTPOINT/NPUB/inbox when the time comes; the
daemon then ends or advances the alarm.  Only the tree's files are used: see agentfs-timer(8).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import select
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

LINE = re.compile(r"^(\d+(?:\.\d+)?) (npub1[02-9ac-hj-np-z]+) (alarm:[0-9.]+)$")
# A write failing with one of these will fail the same way again: say so once, do not retry.
FINAL = {errno.ENOENT: "agent gone", errno.EACCES: "agent terminated",
         errno.EINVAL: "refused"}


@dataclass(frozen=True)
class Alarm:
    due: float  # unix seconds
    npub: str
    id: str

    @property
    def key(self) -> tuple[str, str]:
        return self.npub, self.id


def parse_alarms(text: str) -> tuple[list[Alarm], list[str]]:
    """The alarms listed in `text`, and the lines that are not alarms."""
    alarms, bad = [], []
    for line in text.splitlines():
        if match := LINE.match(line):
            alarms.append(Alarm(float(match[1]), match[2], match[3]))
        elif line.strip():
            bad.append(line)
    return alarms, bad


def log(text: str) -> None:
    print(f"timer: {text}", file=sys.stderr, flush=True)


class StopSignal:
    """SIGTERM and SIGINT ask the timer to stop; `wait` sleeps until a timeout or one comes.

    The handler only notes the signal, so a write under way finishes (PEP 475 retries it);
    the wakeup pipe ends a sleep at once.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._read, write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._note)

    def _note(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds; True if a stop was asked for."""
        if self.received is None and timeout > 0 and \
                select.select([self._read], [], [], timeout)[0]:
            os.read(self._read, 512)
        return self.received is not None


class Timer:
    def __init__(self, mountpoint: Path, poll: float, once: bool = False) -> None:
        self.mountpoint = mountpoint
        self.poll = poll
        self.once = once
        # Alarms written (or given up on) and still listed: the daemon removes one when it
        # takes the write, and until this reader sees that, the alarm must not fire again.
        self.fired: set[tuple[str, str]] = set()
        self.read_error: str | None = None
        self.bad_lines: set[str] = set()

    def read(self) -> list[Alarm] | None:
        """The listed alarms; None (logged once until it reads again) if the file fails."""
        try:
            with open(self.mountpoint / "alarms", encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            error = e.strerror if isinstance(e, OSError) else str(e)
            # The daemon went away: what was given up on may fare otherwise when it is back.
            self.fired.clear()
            if error != self.read_error:
                retry = "" if self.once else f"; trying again every {self.poll:g}s"
                log(f"cannot read {self.mountpoint}/alarms: {error}{retry}")
                self.read_error = error
            return None
        if self.read_error is not None:
            log(f"{self.mountpoint}/alarms readable again")
            self.read_error = None
        alarms, bad = parse_alarms(text)
        for line in set(bad) - self.bad_lines:
            log(f"ignoring a line of {self.mountpoint}/alarms: {line[:200]!r}")
        self.bad_lines = set(bad)
        listed = {alarm.key for alarm in alarms}
        self.fired &= listed
        return alarms

    def fire(self, alarm: Alarm) -> None:
        """One open, write and close of the agent's inbox; a write that returned is durable."""
        line = f'{{"type":"alarm","id":"{alarm.id}"}}\n'.encode()
        inbox = self.mountpoint / alarm.npub / "inbox"
        try:
            fd = os.open(inbox, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as e:
            what = FINAL.get(e.errno or 0)
            if what is None or not os.path.exists(self.mountpoint / "alarms"):
                # The daemon restarting, or stopped (its mount point left empty, so that
                # the agent looks gone): the next round tries again.
                log(f"{alarm.id} for {alarm.npub}: {e.strerror}; will retry")
                return
            log(f"{alarm.id} for {alarm.npub}: {what} ({e.strerror}); skipped")
        else:
            late = (time.time() - alarm.due) * 1000
            log(f"fired {alarm.id} for {alarm.npub} (late {late:.0f} ms)")
        self.fired.add(alarm.key)

    def wait_for(self, alarms: list[Alarm]) -> float:
        """Seconds to sleep: until the soonest alarm still to fire, at most `poll`."""
        waiting = [a.due for a in alarms if a.key not in self.fired]
        soonest = min(waiting, default=float("inf"))
        return max(0.0, min(self.poll, soonest - time.time()))

    def run(self, stop: StopSignal) -> int:
        while True:
            alarms = self.read()
            if alarms is None and self.once:
                return 1
            tried = 0
            for alarm in alarms or []:
                if stop.received:
                    break
                if alarm.due <= time.time() and alarm.key not in self.fired:
                    self.fire(alarm)
                    tried += 1
            if self.once:
                return 0
            # After firing, read again at once: a periodic alarm has its next due time now.
            timeout = self.poll if alarms is None else 0.0 if tried else self.wait_for(alarms)
            if stop.wait(timeout):
                log(f"stopping ({stop.received})")
                return 0


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"{text}: want seconds above 0, at most a day")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="agentfs-timer",
        description="Fire the alarms of the agentfs mount MOUNTPOINT into agents' inboxes.")
    parser.add_argument("--poll", type=seconds, default=1.0, metavar="SECONDS",
                        help="re-read MOUNTPOINT/alarms at least this often (default 1)")
    parser.add_argument("--once", action="store_true",
                        help="fire what is due now, then exit")
    parser.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    args = parser.parse_args(argv)
    mountpoint: Path = args.mountpoint
    if not os.path.isfile(mountpoint / "alarms"):  # False too for a dead mount (ENOTCONN)
        log(f"{mountpoint} is not an agentfs mount (it has no alarms file)")
        return 1
    stop = StopSignal()
    if not args.once:
        log(f"watching {mountpoint}/alarms (poll {args.poll:g}s)")
    return Timer(mountpoint, args.poll, args.once).run(stop)


if __name__ == "__main__":
    sys.exit(main())
