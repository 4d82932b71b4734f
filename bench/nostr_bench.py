#!/usr/bin/env python3
"""Nostr figures: a DM's round trip between agents of two trees through a relay, and the
cost of the signing and the NIP-44 cipher it is made of.

`dm_round_trip` mounts two fresh stores, runs agentfs-nostr on each against one local
nostr-relay (tests/relay.py), and times an agent on A sending a DM to an agent on B whose
program answers it: from the `wake` written to A's agent until A's agent runs with the
answer. `signs_per_second` and `nip44_per_second` time agentfs.nostr alone, in this process.
Run alone, it prints the three; everything lives in a temporary directory and is unmounted
and stopped at the end, error or not. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from agentfs.nostr import nip44  # noqa: E402
from agentfs.nostr.event import sign  # noqa: E402
from agentfs.nostr.keys import public_key  # noqa: E402

PY = sys.executable
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
RULES = "dst matches 'npub1[02-9ac-hj-np-z]+'\nplumb to nostr\n"
# A: a `wake` whose data is an npub sends it a DM; a DM's arrival is noted, in ns, in $0.got.
# Plain sh, no jq: the figure is agentfs's, the drivers' and the relay's, not jq's start-up.
PINGER = """read -r t
case "$t" in *'"lifecycle":true'*) exit 0;; esac
case "$t" in
*'"type":"dm"'*) date +%s%N >> "$0.got" ;;
*'"type":"wake"'*) to=${t#*'"data":"'}; printf '{"to":"%s","data":"ping"}\n' "${to%%'"'*}" ;;
esac
"""
# B: answers a DM.
ANSWERER = """read -r t
case "$t" in *'"type":"dm"'*) echo pong ;; esac
"""


def log(*args: object) -> None:
    print("#", *args, file=sys.stderr, flush=True)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             interval: float = 0.001) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- trees and drivers ---------------------------------------------------------------------


@contextlib.contextmanager
def mounted(base: Path, name: str, shared: Path) -> Iterator[Path]:
    """A fresh store mounted at base/name.mnt, sharing `shared` with its sandboxed ticks;
    unmounted (and its daemon gone) at the end."""
    store, mp = base / f"{name}.store", base / f"{name}.mnt"
    mp.mkdir()
    for argv in (["init", str(store)],
                 ["mount", "--store", str(store), "-o", f"shared={shared}", str(mp)]):
        done = subprocess.run([PY, "-m", "agentfs", *argv], env=ENV, capture_output=True,
                              text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"agentfs {argv[0]}: {done.stderr.strip()}")
    pid = int((store / "daemon.pid").read_text().split()[0])
    try:
        yield mp
    finally:
        if subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True).returncode:
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
        with contextlib.suppress(RuntimeError):
            wait_for(lambda: not Path(f"/proc/{pid}").exists() or
                     Path(f"/proc/{pid}/stat").read_bytes().split(b") ")[-1][:1] == b"Z",
                     20, "the daemon to exit", 0.05)


@contextlib.contextmanager
def driver(mp: Path, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """agentfs-nostr on `mp`, subscribed; SIGTERM (then SIGKILL) at the end."""
    with open(log_path, "ab") as err:
        proc = subprocess.Popen([PY, "-m", "drivers.nostr", "--poll", "0.5", str(mp)],
                                env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: re.search(r"subscription \S+ caught up", log_path.read_text()), 30,
                 f"{log_path.name}: the driver's subscription", 0.02)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def new_agent(mp: Path, name: str, program: str) -> str:
    fd = os.open(mp / "ctl", os.O_RDWR)
    try:
        os.write(fd, f"new {name} /bin/sh {program}\n".encode())
        npub = os.read(fd, 4096).decode().strip()
    finally:
        os.close(fd)
    return npub


def write_program(base: Path, name: str, text: str) -> str:
    path = base / f"{name}.sh"
    path.write_text(text)
    return str(path)


# -- the figures ---------------------------------------------------------------------------


def dm_round_trip(samples: int = 30, warmup: int = 3, base: Path | None = None,
                  shared: Path | None = None) -> list[float]:
    """Milliseconds from `wake` on A's agent to A's agent running with B's answer, each DM
    a NIP-17 gift wrap signed in the daemons and carried by two agentfs-nostr drivers
    through one local relay.  The agents' programs live in `shared` (default BASE/shared),
    which both mounts share with their sandboxed ticks; the pinger writes beside itself."""
    from relay import Relay  # tests/relay.py: nostr-relay as a child process

    with contextlib.ExitStack() as stack:
        if base is None:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nostr-bench-")))
        base.mkdir(exist_ok=True)
        if shared is None:
            shared = base / "shared"
            shared.mkdir(exist_ok=True)
            base.chmod(0o755)
            shared.chmod(0o777)
        relay = stack.enter_context(Relay(base / "relay"))
        a = stack.enter_context(mounted(base, "a", shared))
        b = stack.enter_context(mounted(base, "b", shared))
        for mp in (a, b):
            (mp / "plumb" / "rules").write_text(RULES)
            (mp / "nostr" / "relays").write_text(relay.url + "\n")
        pinger = write_program(shared, "pinger", PINGER)
        new_agent(a, "pinger", pinger)
        answerer = new_agent(b, "answerer", write_program(shared, "answerer", ANSWERER))
        stack.enter_context(driver(a, base / "a-driver.log"))
        stack.enter_context(driver(b, base / "b-driver.log"))
        got = Path(pinger + ".got")

        def arrivals() -> list[int]:
            return [int(x) for x in got.read_text().split()] if got.exists() else []

        def answered(count: int) -> Callable[[], bool]:
            return lambda: len(arrivals()) >= count

        out: list[float] = []
        for i in range(warmup + samples):
            t0 = time.time_ns()
            with open(a / "pinger" / "ctl", "w") as ctl:
                ctl.write(f"wake {answerer}\n")
            wait_for(answered(i + 1), 30, f"answer {i + 1}")
            if i >= warmup:
                out.append((arrivals()[i] - t0) / 1e6)
        return out


def signs_per_second(n: int = 2000) -> float:
    """NIP-01 events (kind 1, one p tag) signed per second: id, BIP-340 signature."""
    secret = bytes.fromhex("00" * 31 + "0a")
    tags = [["p", "ab" * 32]]
    t0 = time.perf_counter()
    for i in range(n):
        sign(secret, 1, f"note {i}", tags)
    return n / (time.perf_counter() - t0)


def nip44_per_second(n: int = 2000, size: int = 100) -> float:
    """NIP-44 v2 encrypt+decrypt pairs per second of a `size`-byte message, the conversation
    key derived once (the ECDH a new correspondent costs is not counted)."""
    key = nip44.get_conversation_key(bytes.fromhex("00" * 31 + "0a"),
                                     public_key(bytes.fromhex("00" * 31 + "0b")))
    text = "x" * size
    t0 = time.perf_counter()
    for _ in range(n):
        if nip44.decrypt(nip44.encrypt(text, key), key) != text:
            raise RuntimeError("NIP-44 round trip changed the text")
    return n / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer samples, for a smoke run")
    p.add_argument("--samples", type=int, help="DM round trips to time (default 30, quick 5)")
    args = p.parse_args()
    samples = args.samples or (5 if args.quick else 30)
    n = 200 if args.quick else 2000
    log("signing")
    signs = signs_per_second(n)
    log("NIP-44")
    ciphers = nip44_per_second(n)
    log(f"DM round trips: {samples}")
    trips = dm_round_trip(samples)
    print(f"DM round trip agent -> relay -> agent -> relay -> agent: "
          f"p50 {percentile(trips, 50):.1f} ms, p99 {percentile(trips, 99):.1f} ms "
          f"({len(trips)} samples)")
    print(f"signed events/s: {signs:,.0f}")
    print(f"NIP-44 encrypt+decrypt/s (100 bytes): {ciphers:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
