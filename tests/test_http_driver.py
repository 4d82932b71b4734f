"""agentfs-http against a real mount: curl as the client, a real HTTP server as the target."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import Mount, script, wait_until, write_once

from drivers.http import UNAUTHORIZED

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "alice-secret-0123456789"
PLUMB_TOKEN = "plumb-secret-0123456789"
RULES = """\
# what is sent to a URL goes to the port http, the URL in its dst
dst matches 'https?://.+'
plumb to http

type is note
plumb to alice
"""
IGNORE_LIFECYCLE = """read -r m
case "$m" in *'"lifecycle":true'*) exit 0;; esac
"""


# -- the driver, curl, and the target server ---------------------------------------------


@dataclass
class Driver:
    proc: subprocess.Popen[bytes]
    log: Path
    url: str = ""

    def text(self) -> str:
        return self.log.read_text()

    def wait_log(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        """The first match in the log, once there; fails at once if the driver is gone
        without it, as it will log no more."""

        def found() -> re.Match[str] | None:
            exited = self.proc.poll() is not None
            match = re.search(pattern, self.text())
            assert match or not exited, f"the driver exited: {self.text()[-4000:]}"
            return match

        return wait_until(found, timeout, f"driver log to match {pattern!r}")

    def stop(self, timeout: float = 8.0) -> int:
        """SIGTERM; the exit status (it may wait up to 1 s on a port read)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


DriverFactory = Callable[..., Driver]


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[DriverFactory]:
    """driver(mount, *args): agentfs-http on a free port of 127.0.0.1; killed at the end."""
    started: list[Driver] = []

    def start(mount: Mount, *args: str) -> Driver:
        log = tmp_path / f"driver-{len(started)}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "drivers.http", "--listen", "127.0.0.1:0", *args,
                 str(mount.mp)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        d = Driver(proc, log)
        started.append(d)

        def listening() -> str | None:
            assert proc.poll() is None, f"the driver exited: {d.text()}"
            found = re.search(r"listening on (\S+)", d.text())
            return found[1] if found else None

        d.url = wait_until(listening, 15, "the driver to listen")
        return d

    try:
        yield start
    finally:
        for d in started:
            if d.proc.poll() is None:
                d.proc.kill()
            d.proc.wait(timeout=15)


def curl(url: str, *args: str) -> tuple[int, dict[str, Any]]:
    """Run curl; the status and the JSON answer."""
    done = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args, url],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    body, _, code = done.stdout.rpartition("\n")
    return int(code), json.loads(body) if body.strip() else {}


def post(url: str, body: str, token: str | None = TOKEN, kind: str = "application/json",
         *headers: str) -> tuple[int, dict[str, Any]]:
    args = ["-X", "POST", "--data-binary", body, "-H", f"Content-Type: {kind}"]
    if token is not None:
        args += ["-H", f"Authorization: Bearer {token}"]
    for header in headers:
        args += ["-H", header]
    return curl(url, *args)


# -- raw HTTP, for what curl will not send -----------------------------------------------


def connect(d: Driver, timeout: float = 15.0) -> socket.socket:
    """A TCP connection to the driver; every read on it gives up after `timeout`."""
    host, _, port = d.url.removeprefix("http://").rpartition(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def port_of(s: socket.socket) -> int:
    port: int = s.getsockname()[1]
    return port


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def reset(s: socket.socket) -> None:
    """Close with a TCP reset, not a FIN: SO_LINGER on, with a timeout of 0."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def read_until_closed(s: socket.socket) -> bytes:
    """All the driver sends until it closes (a reset ends it too)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            data += chunk
    return data


def read_answer(s: socket.socket) -> bytes:
    """One answer: its head, and as much body as its Content-Length says."""
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            found = re.search(rb"(?im)^content-length: *(\d+)", head)
            if len(body) >= (int(found[1]) if found else 0):
                return data
        chunk = s.recv(65536)
        assert chunk, f"the driver closed after {data!r}"
        data += chunk


def send_quietly(s: socket.socket, data: bytes) -> None:
    """Send it all, then EOF; the driver may refuse and close before it has read it all."""
    with contextlib.suppress(OSError):
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)


def exchange(d: Driver, request: bytes) -> bytes:
    """Send `request` on a new connection (from a thread, so that a large one cannot keep
    the answer from being read) and read what comes back until the driver closes."""
    with connect(d) as s:
        sender = threading.Thread(target=send_quietly, args=(s, request), daemon=True)
        sender.start()
        answer = read_until_closed(s)
        sender.join(15)
    return answer


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def error_of(answer: bytes) -> str:
    reason: str = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    return reason


def request(path: str, *headers: str, body: bytes = b"") -> bytes:
    """An HTTP/1.1 POST: the head with `headers`, and `body` as it is."""
    head = "".join(f"{h}\r\n" for h in (f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *headers))
    return head.encode() + b"\r\n" + body


def chunked(body: bytes, size: int = 65536) -> bytes:
    """`body` in the chunked transfer coding."""
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


class Target:
    """A real HTTP server on 127.0.0.1: records each POST, answers from `statuses` (then 200),
    and with `hold_first` keeps the first request waiting until `release` is set."""

    def __init__(self, statuses: list[int] | None = None, hold_first: bool = False) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.statuses = list(statuses or [])
        self.release = threading.Event()
        lock = threading.Lock()
        target = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with lock:
                    target.requests.append((self.path, dict(self.headers.items()), body))
                    first = len(target.requests) == 1
                    status = target.statuses.pop(0) if target.statuses else 200
                if hold_first and first:
                    target.release.wait(30)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the driver was killed meanwhile

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def target() -> Iterator[Callable[..., Target]]:
    made: list[Target] = []

    def make(statuses: list[int] | None = None, hold_first: bool = False) -> Target:
        made.append(Target(statuses, hold_first))
        return made[-1]

    try:
        yield make
    finally:
        for t in made:
            t.close()


def send_to_url(mount: Mount, url: str, data: str) -> None:
    write_once(mount.mp / "plumb" / "send",
               json.dumps({"dst": url, "type": "post", "data": data}) + "\n")


def first_queued(mount: Mount) -> dict[str, Any]:
    """Queue a marker on the port, then read the port afresh: what comes first was queued
    before it (the marker itself, if the queue was empty)."""
    write_once(mount.mp / "plumb" / "send", '{"dst":"http","type":"marker","data":"m"}\n')
    fd = os.open(mount.mp / "plumb" / "http", os.O_RDWR)
    try:
        line = b""
        while not line.endswith(b"\n"):
            line += os.read(fd, 65536)
    finally:
        os.close(fd)
    message: dict[str, Any] = json.loads(line)
    return message


def with_token(mount: Mount, name: str, token: str = TOKEN, *program: str) -> str:
    npub = mount.new_agent(name, *program)
    write_once(mount.agent(name) / "ctl", f"token {token}\n")
    return npub


# -- in: POST to an inbox --------------------------------------------------------------------


def test_a_post_with_the_token_runs_the_agent(mount: Mount, driver: DriverFactory,
                                              tmp_path: Path) -> None:
    program = script(tmp_path, "seen.sh", IGNORE_LIFECYCLE +
                     'printf "%s\\n" "$m" >> "$AGENT_DIR/state/seen"\n')
    npub = with_token(mount, "alice", TOKEN, program)
    d = driver(mount)
    status, answer = post(f"{d.url}/agents/alice/inbox", '{"type":"greeting","data":"hi"}')
    assert status == 202
    status, again = post(f"{d.url}/agents/{npub}/inbox", "plain words", TOKEN, "text/plain")
    assert status == 202 and again["id"] != answer["id"]
    seen = mount.agent("alice") / "state" / "seen"
    wait_until(lambda: seen.exists() and len(seen.read_text().splitlines()) == 2, 15,
               "two ticks")
    first, second = (json.loads(line) for line in seen.read_text().splitlines())
    assert (first["type"], first["data"], first["from"], first["id"]) == \
        ("greeting", "hi", "http", answer["id"])
    assert (second["type"], second["data"], second["from"]) == ("text", "plain words", "http")
    d.wait_log(r"POST /agents/alice/inbox 202 queued")
    started = time.monotonic()
    assert d.stop() == 0  # idle: it may wait out a port read of at most 1 s
    assert time.monotonic() - started < 7
    assert "stopping on SIGTERM" in d.text()


def test_refused_requests_write_nothing(mount: Mount, driver: DriverFactory,
                                       tmp_path: Path) -> None:
    with_token(mount, "alice")  # no program: what reaches the inbox stays there
    mount.new_agent("notoken")
    with_token(mount, "gone", "gone-secret-0123456789")
    write_once(mount.agent("gone") / "ctl", "terminate\n")
    d = driver(mount)
    inbox = f"{d.url}/agents/alice/inbox"
    (tmp_path / "big").write_bytes(b"x" * ((1 << 20) + 1))
    refusals = [
        (post(inbox, '{"data":"x"}', "wrong-token-0123456789"), 401, UNAUTHORIZED),
        (post(inbox, '{"data":"x"}', None), 401, UNAUTHORIZED),
        (post(f"{d.url}/agents/notoken/inbox", '{"data":"x"}'), 401, UNAUTHORIZED),
        (post(f"{d.url}/agents/nobody/inbox", '{"data":"x"}'), 401, UNAUTHORIZED),
        (post(inbox, '{"data":'), 400, "the body is not JSON"),
        (post(inbox, '["a list"]'), 400, "the body is not a JSON object"),
        (post(inbox, "x", TOKEN, "image/png"), 415, "application/json or text/plain"),
        (post(inbox, '{"id":"' + "i" * 300 + '"}'), 400, "longer than 256 bytes"),
        (post(inbox, "{}", TOKEN, "application/json", "Idempotency-Key: a b"), 400,
         "Idempotency-Key"),
        (post(inbox, "{}", TOKEN, "application/json", "Idempotency-Key: alarm:1.1"), 400,
         "are for the timer and Nostr drivers"),
        (post(inbox, '{"type":"nostr","event":{}}'), 400, "are for the timer and Nostr"),
        (curl(inbox, "-X", "POST", "-H", f"Authorization: Bearer {TOKEN}",
              "--data-binary", f"@{tmp_path / 'big'}"), 413, "over 1048576 bytes"),
        (curl(inbox, "-X", "POST", "-H", f"Authorization: Bearer {TOKEN}"), 411,
         "a Content-Length (or a chunked body) is required"),
        (curl(inbox, "-H", f"Authorization: Bearer {TOKEN}"), 405, "only POST"),
        (post(f"{d.url}/agents/alice/outbox", "{}"), 404, "no such path"),
        (post(f"{d.url}/agents/gone/inbox", '{"data":"x"}', "gone-secret-0123456789"), 403,
         "terminated"),
    ]
    for (status, answer), want, reason in refusals:
        assert status == want and reason in answer["error"], (status, answer, reason)
    assert mount.inbox("alice") == [] and mount.inbox("gone") == []
    assert mount.inbox("notoken") == []
    # The answer is one for every reason; the log, the operator's, tells them apart.
    d.wait_log(r"POST /agents/alice/inbox 401 bad token")
    d.wait_log(r"POST /agents/alice/inbox 401 missing bearer token")
    d.wait_log(r"POST /agents/nobody/inbox 401 no such agent, or it has no token: nobody")
    assert TOKEN not in d.text()
    # Tokens change in the tree: a new one works at once, and the old one, or a cleared one,
    # stops working within a second (a token found in the cache is trusted that long).
    write_once(mount.agent("alice") / "ctl", "token alice-new-secret-0123\n")
    assert post(inbox, '{"data":"new"}', "alice-new-secret-0123")[0] == 202
    assert post(inbox, '{"data":"old"}')[0] == 401
    write_once(mount.agent("alice") / "ctl", "token none\n")
    time.sleep(1.1)
    status, answer = post(inbox, '{"data":"none"}', "alice-new-secret-0123")
    assert (status, answer) == (401, {"error": UNAUTHORIZED})
    d.wait_log(r"POST /agents/alice/inbox 401 no such agent, or it has no token: alice")
    assert [m["data"] for m in mount.inbox("alice")] == ["new"]


def test_an_idempotency_key_queues_one_message(mount: Mount, driver: DriverFactory) -> None:
    with_token(mount, "alice")
    d = driver(mount)
    answers = [post(f"{d.url}/agents/alice/inbox", '{"data":"once"}', TOKEN,
                    "application/json", "Idempotency-Key: order-42") for _ in range(3)]
    assert answers == [(202, {"id": "order-42"})] * 3
    assert [(m["id"], m["data"]) for m in mount.inbox("alice")] == [("order-42", "once")]


def test_post_plumb_is_routed_by_the_rules(mount: Mount, driver: DriverFactory,
                                           tmp_path: Path) -> None:
    mount.new_agent("alice")
    write_once(mount.mp / "plumb" / "rules", RULES)
    (tmp_path / "plumb-token").write_text(PLUMB_TOKEN + "\n")
    d = driver(mount, "--plumb-token-file", str(tmp_path / "plumb-token"))
    status, answer = post(f"{d.url}/plumb?from=test", '{"type":"note","data":"buy milk"}',
                          PLUMB_TOKEN, "application/json", "X-Request-Id: r1",
                          "Idempotency-Key: note-1")
    assert (status, answer) == (202, {"id": "note-1"})
    [message] = mount.inbox("alice")
    assert (message["data"], message["from"], message["src"], message["id"]) == \
        ("buy milk", "http", "http", "note-1")
    attr = message["attr"]
    assert (attr["method"], attr["path"], attr["x-request-id"], attr["content-type"]) == \
        ("POST", "/plumb?from=test", "r1", "application/json")
    assert attr["user-agent"].startswith("curl/") and "authorization" not in attr
    assert post(f"{d.url}/plumb", '{"type":"note"}', TOKEN)[0] == 401
    status, answer = post(f"{d.url}/plumb", '{"type":"unrouted"}', PLUMB_TOKEN)
    assert status == 400 and "no rule routes" in answer["error"]
    assert post(f"{d.url}/plumb", '{"type":"note","bogus":1}', PLUMB_TOKEN)[0] == 400
    assert len(mount.inbox("alice")) == 1
    off = driver(mount)
    assert post(f"{off.url}/plumb", '{"type":"note"}', PLUMB_TOKEN)[0] == 404


# -- hostile clients ---------------------------------------------------------------------


def test_a_reset_at_any_point_leaves_the_driver_serving(mount: Mount,
                                                       driver: DriverFactory) -> None:
    with_token(mount, "alice")
    d = driver(mount)
    inbox, auth = "/agents/alice/inbox", f"Authorization: Bearer {TOKEN}"
    promised = request(inbox, "Content-Type: application/json", "Content-Length: 100")
    # What is sent before the reset; whether the answer is read first; what the driver logs
    # of it for sure (a head sent is read even after the reset; a read under way fails).
    attacks: list[tuple[bytes, bool, str | None]] = [
        (promised, False, " POST /agents/alice/inbox 401 "),  # as found: no token, a body
        (promised, True, " POST /agents/alice/inbox 401 "),  # promised, none sent; then read
        (b"", False, None),  # at once
        (promised[:25], False, ": connection lost: Connection reset by peer"),  # mid-head
        (request(inbox, auth, "Content-Length: 100", body=b'{"data":'), False,
         ": connection lost: Connection reset by peer"),  # mid-body, past the token
        (request(inbox, auth, "Expect: 100-continue", "Content-Length: 100"), True,
         ": connection lost: Connection reset by peer"),  # after the 100 Continue
        (b"NOT HTTP\x00\xff\r\n\r\n", True, ": bad HTTP"),
        (request(inbox, "Content-Length: 1", "Content-Length: 2"), True, ": bad HTTP"),
        (request(inbox, "Transfer-Encoding: gzip"), True, ": bad HTTP"),
    ]
    idle_fds = open_fds(d.proc.pid)
    for sent, answered, line in attacks:
        s = connect(d)
        port = port_of(s)
        s.sendall(sent)
        if answered:
            assert read_answer(s).startswith(b"HTTP/1.1 ")
        reset(s)
        if line:
            d.wait_log(rf"127\.0\.0\.1:{port}{line}")
        # Done with it once its socket is closed (or dead: the next connect fails).
        wait_until(lambda: d.proc.poll() is not None or open_fds(d.proc.pid) <= idle_fds, 15,
                   f"the driver to close the connection from port {port}")
    assert post(f"{d.url}{inbox}", '{"data":"after"}')[0] == 202
    assert d.proc.poll() is None
    assert [m["data"] for m in mount.inbox("alice")] == ["after"]
    assert "Traceback" not in d.text()


def test_two_framings_or_a_chunked_body_over_the_limit_store_nothing(
        mount: Mount, driver: DriverFactory) -> None:
    with_token(mount, "alice")
    d = driver(mount)
    inbox, auth = "/agents/alice/inbox", f"Authorization: Bearer {TOKEN}"
    json_type, te = "Content-Type: application/json", "Transfer-Encoding: chunked"
    big = chunked(b'{"data":"' + b"x" * (3 << 20) + b'"}')
    for headers in ([auth, json_type, "Content-Length: 20", te],
                    [te, "Content-Length: 20", json_type, auth],
                    [te, "Content-Length: 20"]):  # before the token is looked at
        answer = exchange(d, request(inbox, *headers, body=big))
        assert status_of(answer) == 400, answer[:300]
        assert "both Content-Length and Transfer-Encoding" in error_of(answer)
        assert re.search(rb"(?im)^connection: close\r$", answer)
    over = chunked(b'{"data":"' + b"x" * (1 << 20) + b'"}')
    answer = exchange(d, request(inbox, auth, json_type, te, body=over))
    assert status_of(answer) == 413 and "over 1048576 bytes" in error_of(answer)
    assert mount.inbox("alice") == []
    # Chunked within the limit is a body like any other.
    answer = exchange(d, request(inbox, auth, json_type, te,
                                 body=chunked(b'{"data":"in chunks"}', 5)))
    assert status_of(answer) == 202, answer
    assert [m["data"] for m in mount.inbox("alice")] == ["in chunks"]
    assert d.proc.poll() is None


def test_connections_past_the_cap_are_answered_503(mount: Mount, driver: DriverFactory) -> None:
    with_token(mount, "alice")
    cap = 4
    d = driver(mount, "--max-connections", str(cap))
    inbox = "/agents/alice/inbox"
    idle = [connect(d) for _ in range(cap)]  # accepted in this order, so these are served
    try:
        for _ in range(3):
            with connect(d) as extra:
                answer = read_until_closed(extra)
            head = answer.partition(b"\r\n\r\n")[0].lower()
            assert status_of(answer) == 503 and b"\r\nconnection: close" in head, answer
            assert b"\r\nretry-after: 1" in head
            assert error_of(answer) == "too many connections; try again later"
        assert post(f"{d.url}{inbox}", '{"data":"full"}') == \
            (503, {"error": "too many connections; try again later"})
        d.wait_log(rf"turned away: {cap} connections open")
        # The connections within the cap are served still.
        idle[0].sendall(request(inbox, f"Authorization: Bearer {TOKEN}",
                                "Content-Type: application/json", "Content-Length: 15",
                                body=b'{"data":"kept"}'))
        assert status_of(read_answer(idle[0])) == 202
        # Closed (EOF, and the driver's close seen), they make room again.
        for s in idle:
            s.shutdown(socket.SHUT_WR)
            assert read_until_closed(s) == b""
    finally:
        for s in idle:
            s.close()
    assert post(f"{d.url}{inbox}", '{"data":"after"}')[0] == 202
    assert [m["data"] for m in mount.inbox("alice")] == ["kept", "after"]
    assert d.proc.poll() is None


def test_a_client_slower_than_the_idle_timeout_is_dropped(mount: Mount,
                                                         driver: DriverFactory) -> None:
    with_token(mount, "alice")
    d = driver(mount, "--idle-timeout", "0.5")
    inbox = "/agents/alice/inbox"
    started = time.monotonic()
    with connect(d) as silent, connect(d) as slow, connect(d) as kept:
        slow.sendall(b"POST /agents/alice/inbox HTTP/1.1\r\nHost: 127")
        kept.sendall(request(inbox, f"Authorization: Bearer {TOKEN}", "Content-Length: 12",
                             body=b'{"data":"k"}'))
        assert status_of(read_answer(kept)) == 202
        assert read_until_closed(silent) == b""  # closed, nothing said: nothing was asked
        answer = read_until_closed(slow)
        assert status_of(answer) == 408 and "over 0.5 seconds" in error_of(answer)
        assert read_until_closed(kept) == b""  # kept alive, then idle too long
    assert time.monotonic() - started < 10
    d.wait_log(r"no whole request head in 0.5s")
    assert post(f"{d.url}{inbox}", '{"data":"after"}')[0] == 202
    assert [m["data"] for m in mount.inbox("alice")] == ["k", "after"]


def test_a_401_does_not_tell_which_agents_exist(mount: Mount, driver: DriverFactory,
                                                tmp_path: Path) -> None:
    alice = with_token(mount, "alice")
    mount.new_agent("notoken")
    with_token(mount, "bob", "bob-secret-0123456789")
    (tmp_path / "plumb-token").write_text(PLUMB_TOKEN + "\n")
    d = driver(mount, "--plumb-token-file", str(tmp_path / "plumb-token"))
    nobody = alice[:-6] + ("qqqqqq" if not alice.endswith("qqqqqq") else "pppppp")
    agents = ["alice", alice, "notoken", "nobody", nobody, "-not-a-name"]
    tokens = [None, "wrong-token-0123456789", "bob-secret-0123456789", PLUMB_TOKEN, ""]

    def ask(agent: str, token: str | None) -> bytes:
        auth = [] if token is None else [f"Authorization: Bearer {token}"]
        answer = exchange(d, request(f"/agents/{agent}/inbox", *auth,
                                     "Content-Type: application/json", "Content-Length: 12",
                                     body=b'{"data":"x"}'))
        return re.sub(rb"(?im)^date:[^\r\n]*\r\n", b"", answer)

    for token in tokens:
        answers = {agent: ask(agent, token) for agent in agents}
        first = answers["nobody"]
        assert status_of(first) == 401 and error_of(first) == UNAUTHORIZED, first
        assert re.search(rb"(?im)^www-authenticate: Bearer\r$", first)
        for agent, answer in answers.items():
            assert answer == first, (agent, token, answer, first)
    assert mount.inbox("alice") == [] and mount.inbox("notoken") == []
    assert ask("bob", "bob-secret-0123456789").startswith(b"HTTP/1.1 202 ")


# -- out: the port http, POSTed ----------------------------------------------------------


def test_an_agents_message_to_an_allowed_url_is_posted_once(
        mount: Mount, driver: DriverFactory, target: Callable[..., Target],
        tmp_path: Path) -> None:
    t = target()
    program = script(tmp_path, "post.sh", IGNORE_LIFECYCLE +
                     f"""echo '{{"to":"{t.url}/hook?x=1","type":"post","data":{{"n":1}}}}' \
>> "$AGENT_DIR/outbox"\n""")
    npub = mount.new_agent("poster", program)
    write_once(mount.mp / "plumb" / "rules", RULES)
    d = driver(mount, "--allow", f"127.0.0.1:{t.port}")
    write_once(mount.agent("poster") / "inbox", "go\n")
    wait_until(lambda: t.requests, 15, "the POST")
    sent = [m for m in mount.outbox("poster") if m.get("to")][0]
    d.wait_log(rf"delivered {sent['id']} to {re.escape(t.url)}/hook\?x=1: 200")
    time.sleep(0.3)
    [(path, headers, body)] = t.requests
    assert path == "/hook?x=1" and json.loads(body) == {"n": 1}
    assert headers["Content-Type"] == "application/json"
    assert headers["Idempotency-Key"] == sent["id"] and headers["X-Agentfs-Src"] == npub
    assert d.stop() == 0
    assert first_queued(mount)["type"] == "marker"  # acknowledged: the queue was empty


def test_a_failed_delivery_is_tried_again(mount: Mount, driver: DriverFactory,
                                          target: Callable[..., Target]) -> None:
    t = target([500, 200])
    write_once(mount.mp / "plumb" / "rules", RULES)
    d = driver(mount, "--allow", "127.0.0.1")
    send_to_url(mount, f"{t.url}/hook", "retry me")
    wait_until(lambda: len(t.requests) == 2, 15, "the second try")
    d.wait_log(r"delivered \S+ to \S+: 200")
    assert "retry" in d.text() and "status 500" in d.text()
    time.sleep(0.3)
    assert [body for _, _, body in t.requests] == [b"retry me"] * 2
    assert len({h["Idempotency-Key"] for _, h, _ in t.requests}) == 1
    assert t.requests[0][1]["Content-Type"].startswith("text/plain")
    assert d.stop() == 0
    assert first_queued(mount)["type"] == "marker"


def test_messages_that_cannot_be_delivered_are_refused_not_retried(
        mount: Mount, driver: DriverFactory, target: Callable[..., Target]) -> None:
    t, elsewhere = target([404]), target()
    write_once(mount.mp / "plumb" / "rules", RULES)
    d = driver(mount, "--allow", f"127.0.0.1:{t.port}")
    send_to_url(mount, f"{elsewhere.url}/hook", "not for you")
    write_once(mount.mp / "plumb" / "send", '{"dst":"http","type":"post","data":"no url"}\n')
    send_to_url(mount, f"{t.url}/missing", "answered 404")
    d.wait_log(rf"refused \S+: 127.0.0.1:{elsewhere.port} is not allowed")
    d.wait_log(r"refused \S+: no http\(s\) url")
    d.wait_log(r"rejected \S+ by \S+/missing: 404; dropped")
    assert elsewhere.requests == [] and len(t.requests) == 1
    assert d.stop() == 0
    assert first_queued(mount)["type"] == "marker"


def test_a_message_http_cannot_carry_is_refused_and_the_rest_delivered(
        mount: Mount, driver: DriverFactory, target: Callable[..., Target]) -> None:
    t = target()
    write_once(mount.mp / "plumb" / "rules", RULES)
    d = driver(mount, "--allow", "127.0.0.1")
    send_to_url(mount, f"{t.url}/caf\u00e9", "not ASCII")  # http.client: UnicodeEncodeError
    send_to_url(mount, f"{t.url}/a b", "a blank")  # InvalidURL, which is for ever
    write_once(mount.mp / "plumb" / "send",  # a header value with a CR: ValueError
               json.dumps({"dst": f"{t.url}/hook", "type": "a\rb", "data": "cr"}) + "\n")
    send_to_url(mount, f"{t.url}/hook", "after")
    d.wait_log(rf"delivered \S+ to {re.escape(t.url)}/hook: 200")
    assert [body for _, _, body in t.requests] == [b"after"]
    assert len(re.findall(r"refused \S+: cannot be sent", d.text())) == 3
    assert d.stop() == 0
    assert first_queued(mount)["type"] == "marker"


def test_a_driver_killed_mid_delivery_delivers_after_restart(
        mount: Mount, driver: DriverFactory, target: Callable[..., Target]) -> None:
    t = target(hold_first=True)
    write_once(mount.mp / "plumb" / "rules", RULES)
    d = driver(mount, "--allow", "127.0.0.1")
    send_to_url(mount, f"{t.url}/hook", "survive")
    wait_until(lambda: t.requests, 15, "the first POST")
    d.proc.kill()  # while the target holds the request: nothing was acknowledged
    d.proc.wait(timeout=10)
    again = driver(mount, "--allow", "127.0.0.1")
    wait_until(lambda: len(t.requests) == 2, 15, "the POST again")
    again.wait_log(r"delivered \S+ to \S+: 200")
    t.release.set()
    # At least once: the target saw it twice, with the same key to tell.
    assert [body for _, _, body in t.requests] == [b"survive"] * 2
    assert len({h["Idempotency-Key"] for _, h, _ in t.requests}) == 1
    assert again.stop() == 0
    assert first_queued(mount)["type"] == "marker"


def test_sigterm_mid_delivery_exits_0_and_keeps_the_message(
        mount: Mount, driver: DriverFactory, target: Callable[..., Target]) -> None:
    t = target(hold_first=True)
    write_once(mount.mp / "plumb" / "rules", RULES)
    d = driver(mount, "--allow", "127.0.0.1")
    send_to_url(mount, f"{t.url}/hook", "held")
    wait_until(lambda: t.requests, 15, "the POST")
    started = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - started < 3
    assert "stopped" in d.text()
    held = first_queued(mount)  # not acknowledged, so still queued, ahead of the marker
    assert (held["data"], held["dst"]) == ("held", f"{t.url}/hook")
