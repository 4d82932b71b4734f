"""agentfs-nostr run by the tests, as a real process on a real mount."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Mount, wait_until

ROOT = Path(__file__).resolve().parent.parent


class NostrDriver:
    """agentfs-nostr on a mount, its stderr in a file; stopped or killed at the end."""

    def __init__(self, mount: Mount, log: Path, *args: str) -> None:
        self.mount, self.log, self.args = mount, log, args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NostrDriver:
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "drivers.nostr", "--poll", "0.2", *self.args,
                 str(self.mount.mp)], stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        return self

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_log(self, pattern: str, timeout: float = 15) -> re.Match[str]:
        return wait_until(lambda: re.search(pattern, self.text()), timeout,
                          f"{pattern!r} in the driver's log:\n{self.text()[-3000:]}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> int | None:
        """SIGTERM; its exit status (None if it had to be killed)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            return None


@pytest.fixture(name="drivers")
def nostr_drivers() -> Iterator[Callable[..., NostrDriver]]:
    """drivers(mount, log, *args): a started driver; every one is stopped after the test."""
    started: list[NostrDriver] = []

    def start(mount: Mount, log: Path, *args: str) -> NostrDriver:
        started.append(NostrDriver(mount, log, *args).start())
        return started[-1]

    try:
        yield start
    finally:
        for driver in started:
            driver.stop()
