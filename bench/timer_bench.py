#!/usr/bin/env python3
"""Alarm lateness: from an alarm's due time to its agent's program seeing the trigger, with
drivers/timer.py running against a mount (and, beside it, to the inbox commit).

`python3 bench/timer_bench.py [--samples N]` mounts a temporary store and prints p50/p99;
bench.py calls `alarm_samples` for its table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AGENTS = 10  # alarms `every 1s`, their due times spread over the second: 10 samples a second
# Notes when the program started (bash's clock, no fork) and the trigger it read; skips
# lifecycle triggers.
PROGRAM = r"""read -r t
case $t in *'"lifecycle":true'*) exit 0;; esac
printf '%s %s\n' "$EPOCHREALTIME" "$t" >> "$AGENT_DIR/state/seen"
"""


def _unix(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def _new_agent(mountpoint: Path, name: str, program: list[str]) -> Path:
    fd = os.open(mountpoint / "ctl", os.O_WRONLY)
    try:
        os.write(fd, (shlex.join(["new", name, *program]) + "\n").encode())
    finally:
        os.close(fd)
    return mountpoint / name


def _ctl(agent: Path, line: str) -> None:
    fd = os.open(agent / "ctl", os.O_WRONLY)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


def _seen(agent: Path) -> list[tuple[float, dict[str, object]]]:
    try:
        text = (agent / "state/seen").read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        started, _, trigger = line.partition(" ")
        out.append((float(started), json.loads(trigger)))
    return out


def alarm_samples(mountpoint: Path, samples: int, shared: Path,
                  timeout: float = 300) -> list[tuple[float, float]]:
    """(due to inbox commit, due to program start) in ms, one pair per alarm fired.

    AGENTS agents get `alarm every 1s`, set a tenth of a second apart so that no two fall
    due together, and agentfs-timer fires them until `samples` firings reached programs.
    The commit is the queued message's `time`, to the millisecond.  The program lives in
    `shared`, a directory the mount shares with its sandboxed ticks (`-o shared=`).
    """
    with tempfile.TemporaryDirectory(prefix="timer-bench-", dir=shared) as tmp:
        os.chmod(tmp, 0o755)  # the agents' uids read the program
        program = Path(tmp) / "seen.sh"
        program.write_text(PROGRAM)
        tag = f"late{os.getpid()}x{time.monotonic_ns() % 10**6}"
        agents = [_new_agent(mountpoint, f"{tag}-{i}", ["/bin/bash", str(program)])
                  for i in range(AGENTS)]
        for agent in agents:
            _ctl(agent, "idle 1h")  # awake: a dormant one would run its `wake` trigger first
        driver = subprocess.Popen(
            [sys.executable, "-m", "drivers.timer", str(mountpoint)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True)
        try:
            for agent in agents:
                _ctl(agent, "alarm every 1s")
                time.sleep(1 / AGENTS)
            deadline = time.monotonic() + timeout
            while sum(len(_seen(a)) for a in agents) < samples:
                if driver.poll() is not None:
                    raise RuntimeError(f"agentfs-timer exited {driver.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError("alarm lateness: too few firings in time")
                time.sleep(0.2)
        finally:
            for agent in agents:
                _ctl(agent, "alarm cancel")
            driver.send_signal(signal.SIGTERM)
            try:
                driver.wait(timeout=10)
            except subprocess.TimeoutExpired:
                driver.kill()
                driver.wait()
        pairs = []
        for agent in agents:
            for started, trigger in _seen(agent):
                due = int(str(trigger["id"]).removeprefix("alarm:").split(".")[0])
                pairs.append((_unix(str(trigger["time"])) * 1000 - due, started * 1000 - due))
        return pairs[:samples]


def alarm_lateness(mountpoint: Path, samples: int, shared: Path) -> list[float]:
    """Milliseconds from each alarm's due time to its program seeing the trigger."""
    return [program for _commit, program in alarm_samples(mountpoint, samples, shared)]


def sleep_and_spawn_lateness(samples: int) -> list[float]:
    """The baseline: this process sleeps until each due time and starts PROGRAM's shell
    itself (as cron would), ms from the due time to the program's clock reading."""
    out = []
    for k in range(samples):
        due = time.time() + 0.05 + (k % 10) * 0.003
        time.sleep(max(0.0, due - time.time()))
        done = subprocess.run(["/bin/bash", "-c", 'printf %s "$EPOCHREALTIME"'],
                              capture_output=True, text=True, check=True)
        out.append((float(done.stdout) - due) * 1000)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description="agentfs alarm lateness, p50 and p99")
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import AgentfsMount, percentile, sandbox_options, shared_dir

    with tempfile.TemporaryDirectory(prefix="timer-bench-") as base:
        shared = shared_dir(Path(base))
        fs = AgentfsMount(Path(base), "timer", sandbox_options(shared))
        try:
            pairs = alarm_samples(fs.mp, args.samples, shared)
        finally:
            fs.close()
    commits = [c for c, _p in pairs]
    programs = [p for _c, p in pairs]
    print(f"alarm lateness over {len(pairs)} firings ({AGENTS} agents, every 1s):")
    for what, values in (("due -> inbox commit", commits), ("due -> program start", programs)):
        print(f"  {what:21} p50 {percentile(values, 50):7.2f} ms   "
              f"p99 {percentile(values, 99):7.2f} ms   max {max(values):7.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
