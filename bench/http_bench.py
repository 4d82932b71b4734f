#!/usr/bin/env python3
"""agentfs-http throughput: POSTs/s end to end (a 202 means the inbox line is committed).

`posts_per_second` POSTs to a running driver from keep-alive connections in threads; its
baseline, `inbox_writes_per_second`, makes the same inbox lines with write(2) straight to the
tree from as many threads, so the difference is the driver's cost (HTTP, tokens, one log line
a request).  Run alone, it mounts a fresh store in a temporary directory, starts the driver,
prints both figures for each concurrency, and unmounts, error or not.  Not a test.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token-0123456789abcdef"


def pending(mountpoint: Path, agent: str) -> int:
    for line in (mountpoint / agent / "ctl").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "pending":
            return int(value)
    raise RuntimeError(f"{agent}/ctl has no pending line")


def in_threads(n: int, concurrency: int, setup: Callable[[], object],
               one: Callable[[object, int], None]) -> float:
    """Run one(state, i) for i in range(n) from `concurrency` threads, each with its own
    setup() state; the seconds from the first start to the last end."""
    counter = itertools.count()
    errors: list[BaseException] = []

    def work() -> None:
        state = setup()
        try:
            while (i := next(counter)) < n and not errors:
                one(state, i)
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def posts_per_second(mountpoint: Path, url: str, token: str, n: int, concurrency: int) -> float:
    """POSTs/s to `url` (a driver's `.../agents/AGENT/inbox`), each answered 202, so committed.

    The agent should have no program, so that its inbox keeps what arrives: its `pending`
    count is checked to have grown by `n`.
    """
    parts = urlsplit(url)
    agent = parts.path.split("/")[2]
    before = pending(mountpoint, agent)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def connect() -> object:
        return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)

    def one(conn: object, i: int) -> None:
        assert isinstance(conn, http.client.HTTPConnection)
        conn.request("POST", parts.path, body=json.dumps({"type": "bench", "data": i}),
                     headers=headers)
        response = conn.getresponse()
        answer = response.read()
        if response.status != 202:
            raise RuntimeError(f"POST {i}: {response.status} {answer!r}")

    seconds = in_threads(n, concurrency, connect, one)
    after = pending(mountpoint, agent)
    if after - before != n:
        raise RuntimeError(f"{agent}: {after - before} messages queued for {n} POSTs")
    return n / seconds


def inbox_writes_per_second(mountpoint: Path, agent: str, n: int, concurrency: int) -> float:
    """The baseline: the same lines, one open+write(2)+close each, straight to the inbox."""
    inbox = mountpoint / agent / "inbox"

    def one(_: object, i: int) -> None:
        line = json.dumps({"type": "bench", "data": i, "from": "http"}).encode() + b"\n"
        fd = os.open(inbox, os.O_WRONLY)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    return n / in_threads(n, concurrency, lambda: None, one)


def start_driver(mountpoint: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """agentfs-http on a free port of 127.0.0.1, its log in `log`; the process and its URL."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "drivers.http", "--listen",
                                 "127.0.0.1:0", str(mountpoint)], cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"listening on (\S+)", log.read_text())
        if found:
            return proc, found[1]
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"agentfs-http did not start: {log.read_text()}")


def stop_driver(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL if it has not gone in 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=2000, help="POSTs per run (default 2000)")
    ap.add_argument("--concurrency", default="1,8", help="comma-separated (default 1,8)")
    ap.add_argument("--dir", help="where the store and mount point go (default: $TMPDIR)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import AgentfsMount, log  # bench/bench.py, imported only when run alone

    base = Path(tempfile.mkdtemp(prefix="agentfs-http-bench-", dir=args.dir))
    fs = AgentfsMount(base, "http")
    proc = None
    try:
        fs.new_agents(["new bench\n", "new direct\n"])
        (fs.mp / "bench" / "ctl").write_text(f"token {TOKEN}\n")
        proc, url = start_driver(fs.mp, base / "driver.log")
        log(f"agentfs-http at {url}; {args.n} POSTs a run")
        print("| concurrency | POSTs/s via agentfs-http | inbox write(2)s/s, same lines |")
        print("| --- | --- | --- |")
        for c in (int(x) for x in args.concurrency.split(",")):
            posts = posts_per_second(fs.mp, f"{url}/agents/bench/inbox", TOKEN, args.n, c)
            writes = inbox_writes_per_second(fs.mp, "direct", args.n, c)
            print(f"| {c} | {posts:,.0f}/s | {writes:,.0f}/s |", flush=True)
    finally:
        if proc is not None:
            stop_driver(proc)
        fs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
