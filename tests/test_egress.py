"""The egress proxy and the root file `secrets` (agentfs(4)), through the real mount: ticks run
curl and Python's urllib through HTTP_PROXY to real HTTP and HTTPS servers on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    AGENT_PYTHON,
    AGENTFS,
    READ_TRIGGER,
    Mount,
    errno_of,
    init_store,
    release_fifo,
    script,
    wait_until,
    write_once,
)
from upstream import Pki, Upstream, make_pki, serve

SECRET = "sk-live-3f9a1c77e2b54d08a6c1"  # a value that must never be seen but by the upstream
ROTATED = "sk-rotated-8d2e4b19f07a63c5e1"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    pki = make_pki(directory)
    directory.chmod(0o755)  # ticks trust the CA too (SSL_CERT_FILE)
    pki.ca.chmod(0o644)
    return pki


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Mount]:
    """A mount whose proxy trusts the test CA (`-o proxy_ca=`)."""
    base = tmp_path_factory.mktemp("egress")
    (base / "mnt").mkdir()
    mount = Mount(init_store(base / "store"), base / "mnt",
                  extra_args=["-o", f"proxy_ca={pki.ca}"])
    try:
        yield mount.start()
    finally:
        mount.stop()


@pytest.fixture
def https(pki: Pki) -> Iterator[Upstream]:
    with serve(pki) as upstream:
        yield upstream


@pytest.fixture
def plain() -> Iterator[Upstream]:
    with serve() as upstream:
        yield upstream


def egress_lines(mount: Mount, name: str) -> list[dict[str, Any]]:
    return [r for r in mount.log(name) if r["event"] == "egress"]


def curl_program(tmp_path: Path, name: str, *urls: str, extra: str = "") -> str:
    """A tick that saves its environment, then fetches each URL with curl through the proxy,
    appending each status to $1/codes and printing each body (its stdout is its outbox)."""
    fetches = "\n".join(
        f"curl -sS --max-time 20 {extra} -o \"$1/body\" -w '%{{http_code}}\\n' '{url}' "
        f">> \"$1/codes\" 2>> \"$1/curl.err\"; cat \"$1/body\" 2>/dev/null"
        for url in urls)
    return script(tmp_path, name, READ_TRIGGER + f'env > "$1/env"\n{fetches}\n')


def codes(tmp_path: Path) -> list[str]:
    return (tmp_path / "codes").read_text().split()


def run_once(mount: Mount, name: str, ticks: int) -> None:
    write_once(mount.agent(name) / "inbox", "go\n")
    mount.wait_ticks(name, ticks, timeout=60)


def proxy_of(env_file: Path) -> tuple[int, str]:
    """The proxy's port and the tick's token, from the environment the tick saved."""
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    url = urllib.parse.urlsplit(env["HTTP_PROXY"])
    assert env["http_proxy"] == env["HTTPS_PROXY"] == env["https_proxy"] == env["HTTP_PROXY"]
    assert env["NO_PROXY"] == env["no_proxy"] == ""
    assert url.hostname == "127.0.0.1" and url.username == "agent" and url.port
    assert url.password
    return url.port, url.password


def everything_the_agent_left(mount: Mount, name: str, tmp_path: Path) -> bytes:
    agent = mount.agent(name)
    seen = [(agent / f).read_bytes() for f in ("log", "outbox", "ctl", "inbox", "budget")]
    for directory, _dirs, files in os.walk(agent / "state"):
        seen += [Path(directory, f).read_bytes() for f in files]
    for path in tmp_path.iterdir():
        if path.is_file():
            seen.append(path.read_bytes())
    seen.append((mount.store.path / "daemon.log").read_bytes())
    return b"\n".join(seen)


# -- secrets -----------------------------------------------------------------------------------


def test_secrets_are_listed_without_values_and_sealed_in_the_store(proxied: Mount) -> None:
    path = proxied.mp / "secrets"
    write_once(path, f"sealed {SECRET} host=API.example.com\n"
                     f"keyed {ROTATED} host=127.0.0.1 header=X-Api-Key\n")
    assert path.read_text() == ("keyed host=127.0.0.1 header=X-Api-Key\n"
                                "sealed host=api.example.com\n")
    fd = os.open(path, os.O_RDWR)  # a read after a write, on the same open file
    try:
        os.write(fd, f"sealed {SECRET}x host=api.example.com\n".encode())
        assert SECRET.encode() not in os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    for bad in [f"sealed {SECRET}", f"sealed {SECRET} hots=x", f"sealed {SECRET} host=a..b",
                f"sealed {SECRET} host=h header=Content-Length", f"delete {SECRET} host=h",
                f"sealed {SECRET} host=h\nsealed {SECRET} host=h", "delete nosuch"]:
        code = errno_of(lambda b=bad: write_once(path, b + "\n"))
        assert code in (22, 2), bad  # EINVAL, or ENOENT for a delete of nothing
    write_once(path, "delete keyed\n")
    assert path.read_text() == "sealed host=api.example.com\n"
    data = (proxied.store.path / "data.mdb").read_bytes()
    for value in (SECRET, SECRET + "x", ROTATED):
        assert value.encode() not in data
        assert value.encode() not in (proxied.store.path / "daemon.log").read_bytes()
    write_once(path, "delete sealed\n")


def test_a_tick_calls_an_api_with_a_secret_it_never_sees(proxied: Mount, https: Upstream,
                                                         tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{https.port}/v1/models"
    program = curl_program(tmp_path, "api.sh", url)
    write_once(proxied.mp / "secrets", f"openai {SECRET} host=127.0.0.1\n")
    write_once(proxied.mp / "ctl", f"new caller {program} {tmp_path}\n"
                                   f"grant net 127.0.0.1:{https.port}\ngrant secret openai\n")
    run_once(proxied, "caller", 2)
    assert codes(tmp_path) == ["200"]
    # The proxy spoke TLS to the upstream, and added the header; the tick sent plain http.
    first = https.requests()[-1]
    assert (first.method, first.path) == ("GET", "/v1/models")
    assert first.headers["authorization"] == f"Bearer {SECRET}"
    assert first.headers["host"] == f"127.0.0.1:{https.port}"
    assert "proxy-authorization" not in first.headers
    assert proxied.outbox("caller")[-1]["data"] == "upstream got GET /v1/models (0 bytes)"
    line = egress_lines(proxied, "caller")[-1]
    assert {k: line[k] for k in ("method", "host", "port", "status", "tls", "secret", "up")} == \
        {"method": "GET", "host": "127.0.0.1", "port": https.port, "status": 200, "tls": True,
         "secret": "openai", "up": 0}
    assert line["down"] == len("upstream got GET /v1/models (0 bytes)\n")
    # Rotated, and now in a header of its own: the next request carries the new value.
    write_once(proxied.mp / "secrets", f"openai {ROTATED} host=127.0.0.1 header=X-Api-Key\n")
    run_once(proxied, "caller", 3)
    assert codes(tmp_path) == ["200", "200"]
    second = https.requests()[-1]
    assert second.headers["x-api-key"] == ROTATED and "authorization" not in second.headers
    left = everything_the_agent_left(proxied, "caller", tmp_path)
    data = (proxied.store.path / "data.mdb").read_bytes()
    for value in (SECRET, ROTATED):
        assert value.encode() not in left
        assert value.encode() not in data
    proxy_of(tmp_path / "env")  # the tick did go through the proxy's variables


def test_plain_http_is_forwarded_and_bodies_streamed(proxied: Mount, plain: Upstream,
                                                     tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(3_000_000))
    program = script(tmp_path, "post.sh", READ_TRIGGER + f"""
curl -sS --max-time 20 -o /dev/null -w '%{{http_code}}\\n' --data-binary @{blob} \
  http://127.0.0.1:{plain.port}/upload >> "$1/codes"
curl -sS --max-time 20 -o /dev/null -w '%{{http_code}}\\n' -H 'Transfer-Encoding: chunked' \
  --data-binary @{blob} http://127.0.0.1:{plain.port}/chunked >> "$1/codes"
""")
    write_once(proxied.mp / "ctl", f"new poster {program} {tmp_path}\n"
                                   f"grant net 127.0.0.1:{plain.port}\n")
    run_once(proxied, "poster", 2)
    assert codes(tmp_path) == ["200", "200"]
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    got = [(s.path, s.body_length, s.body_sha256) for s in plain.requests()]
    assert got == [("/upload", 3_000_000, digest), ("/chunked", 3_000_000, digest)]
    assert all("authorization" not in s.headers for s in plain.requests())
    lines = egress_lines(proxied, "poster")
    assert [(r["method"], r["status"], r["up"], r.get("tls")) for r in lines] == \
        [("POST", 200, 3_000_000, None)] * 2


def test_a_host_not_granted_is_403_and_logged(proxied: Mount, plain: Upstream,
                                              tmp_path: Path) -> None:
    program = curl_program(tmp_path, "stray.sh", "http://api.example.invalid/v1/x",
                           f"http://localhost:{plain.port}/inside")
    write_once(proxied.mp / "ctl", f"new stray {program} {tmp_path}\n"
                                   f"grant net localhost:{plain.port}\n")
    run_once(proxied, "stray", 2)
    assert codes(tmp_path) == ["403", "403"]
    outbox = [m["data"] for m in proxied.outbox("stray")]
    assert "api.example.invalid:80 is not granted to agent stray" in outbox[0]
    assert f"echo 'grant net api.example.invalid' > {proxied.mp}/stray/ctl" in outbox[1]
    # A granted name that resolves inside is refused: only a granted address is reached so.
    assert "localhost resolves to 127.0.0.1" in " ".join(outbox[2:])
    lines = egress_lines(proxied, "stray")
    assert [(r["method"], r["host"], r["status"]) for r in lines] == \
        [("GET", "api.example.invalid", 403), ("GET", "localhost", 403)]
    assert all("error" in r for r in lines)
    assert plain.requests() == []
    budget = dict(line.split(" ", 1) for line in
                  (proxied.agent("stray") / "budget").read_text().splitlines())
    assert budget["used_daily_api_calls"] == "0"  # refused before it was made: not counted


ASK_PROXY = """
import base64, http.client, json, os, sys, urllib.parse
if json.loads(sys.stdin.readline()).get("lifecycle"):
    sys.exit(0)
target, out = sys.argv[1], sys.argv[2]
proxy = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
mine = proxy.password


def status(authorization):
    connection = http.client.HTTPConnection(proxy.hostname, proxy.port, timeout=20)
    headers = {} if authorization is None else {"Proxy-Authorization": authorization}
    try:
        connection.request("GET", target, headers=headers)
        response = connection.getresponse()
        response.read()
        return [response.status, response.getheader("Proxy-Authenticate")]
    finally:
        connection.close()


def basic(secret):
    return "Basic " + base64.b64encode(f"agent:{secret}".encode()).decode()


old = open(out + "/token.first").read() if os.path.exists(out + "/token.first") else None
results = {"none": status(None), "wrong": status(basic("not-the-token")),
           "bearer": status("Bearer " + mine), "mine": status(basic(mine)),
           "ended": status(basic(old)) if old else None}
open(out + "/token." + os.environ["AGENT_NAME"], "w").write(mine)
open(out + "/results." + os.environ["AGENT_NAME"], "w").write(json.dumps(results))
"""


def test_a_request_without_a_live_token_is_407(proxied: Mount, plain: Upstream,
                                               tmp_path: Path) -> None:
    # The proxy is reached from inside the sandbox only: the ticks themselves try it.
    probe = tmp_path / "ask.py"
    probe.write_text(ASK_PROXY)
    target = f"http://127.0.0.1:{plain.port}/token"
    for name in ("first", "second"):
        write_once(proxied.mp / "ctl", f"new {name} {AGENT_PYTHON} {probe} {target} {tmp_path}\n"
                                       f"grant net 127.0.0.1:{plain.port}\n")
        run_once(proxied, name, 2)
    first = json.loads((tmp_path / "results.first").read_text())
    second = json.loads((tmp_path / "results.second").read_text())
    for results in (first, second):
        assert results["none"] == [407, 'Basic realm="agentfs egress"']
        assert results["wrong"][0] == results["bearer"][0] == 407
        assert results["mine"][0] == 200
    assert second["ended"][0] == 407  # the first tick ended: so did its token
    assert [s.path for s in plain.requests()] == ["/token", "/token"]


def test_api_calls_are_counted_and_limited(proxied: Mount, plain: Upstream,
                                           tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{plain.port}/count"
    program = curl_program(tmp_path, "count.sh", url, url, url,
                           extra='-D "$1/headers"')
    write_once(proxied.mp / "ctl", f"new counter {program} {tmp_path}\n"
                                   f"grant net 127.0.0.1:{plain.port}\n")
    write_once(proxied.agent("counter") / "budget", "max_daily_api_calls 2\n")
    run_once(proxied, "counter", 2)
    assert codes(tmp_path) == ["200", "200", "429"]
    assert len(plain.requests()) == 2
    budget = dict(line.split(" ", 1) for line in
                  (proxied.agent("counter") / "budget").read_text().splitlines())
    assert budget["used_daily_api_calls"] == "2"
    last = egress_lines(proxied, "counter")[-1]
    assert last["status"] == 429 and "max_daily_api_calls 2" in last["error"]
    assert budget["next_reset"] in last["error"]
    assert "retry-after:" in (tmp_path / "headers").read_text().lower()
    # The warning line was crossed by the proxy's counting: a budget trigger was queued.
    assert any(r["event"] == "budget" and r.get("warning", {}).get("resource") == "api_calls"
               for r in proxied.log("counter"))


def test_connect_tunnels_tls_end_to_end(proxied: Mount, https: Upstream, pki: Pki,
                                        tmp_path: Path) -> None:
    program = script(tmp_path, "tunnel.sh", READ_TRIGGER + f"""
export SSL_CERT_FILE={pki.ca}
{AGENT_PYTHON} - "$1" <<'EOF'
import sys, urllib.request
with urllib.request.urlopen("https://127.0.0.1:{https.port}/tunnelled", timeout=20) as answer:
    open(sys.argv[1] + "/tunnel", "w").write(f"{{answer.status}} {{answer.read().decode()}}")
EOF
if curl -sS --max-time 20 -o /dev/null https://api.example.invalid/ 2> "$1/refused"; then
  echo reached > "$1/refused"; fi
""")
    write_once(proxied.mp / "secrets", f"openai {SECRET} host=127.0.0.1\n")
    write_once(proxied.mp / "ctl", f"new tunneller {program} {tmp_path}\n"
                                   f"grant net 127.0.0.1:{https.port}\ngrant secret openai\n")
    run_once(proxied, "tunneller", 2)
    assert (tmp_path / "tunnel").read_text() == "200 upstream got GET /tunnelled (0 bytes)\n"
    seen = https.requests()[-1]
    assert seen.path == "/tunnelled"
    assert "authorization" not in seen.headers  # end to end: the proxy adds nothing to TLS
    assert "403" in (tmp_path / "refused").read_text()
    lines = egress_lines(proxied, "tunneller")
    assert [(r["method"], r["host"], r["status"]) for r in lines] == \
        [("CONNECT", "127.0.0.1", 200), ("CONNECT", "api.example.invalid", 403)]
    assert lines[0]["up"] > 0 and lines[0]["down"] > 0 and "tls" not in lines[0]


def test_revoke_takes_effect_at_the_next_request(proxied: Mount, plain: Upstream,
                                                 tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    url = f"http://127.0.0.1:{plain.port}/again"
    fetch = f"curl -sS --max-time 20 -o /dev/null -w '%{{http_code}}\\n' {url} >> \"$1/codes\""
    program = script(tmp_path, "twice.sh", READ_TRIGGER + f"{fetch}\nread -r x < {fifo}\n{fetch}\n")
    write_once(proxied.mp / "ctl", f"new twice {program} {tmp_path}\n"
                                   f"grant net 127.0.0.1:{plain.port}\n")
    write_once(proxied.agent("twice") / "inbox", "go\n")
    wait_until(lambda: (tmp_path / "codes").exists() and codes(tmp_path) == ["200"])
    write_once(proxied.agent("twice") / "ctl", f"revoke net 127.0.0.1:{plain.port}\n")
    release_fifo(fifo)
    proxied.wait_ticks("twice", 2)
    assert codes(tmp_path) == ["200", "403"]


def test_a_bad_proxy_ca_fails_the_mount(tmp_path: Path) -> None:
    store = init_store(tmp_path / "store")
    (tmp_path / "mnt").mkdir()
    (tmp_path / "not-a-ca.pem").write_text("nothing here\n")
    for option in [f"proxy_ca={tmp_path}/nosuch.pem", "proxy_ca=relative.pem",
                   f"proxy_ca={tmp_path}/not-a-ca.pem"]:
        done = subprocess.run([*AGENTFS, "mount", "--store", str(store.path), "-o", option,
                               str(tmp_path / "mnt")], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 1 and "agentfs:" in done.stderr, (option, done.stderr)
        assert not os.path.ismount(tmp_path / "mnt")


# -- the wire's bounds, in this process (no mount: the limits are module constants) -----------


def test_the_proxy_bounds_connections_and_heads(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import trio

    from agentfs import egress
    from agentfs.identity import generate_mnemonic
    from agentfs.runtime import Runtime
    from agentfs.store import AgentStore

    monkeypatch.setattr(egress, "MAX_CONNECTIONS", 2)
    store = AgentStore.create(tmp_path / "store", generate_mnemonic())
    runtime = Runtime(store, str(tmp_path / "mnt"))

    async def ask(port: int, data: bytes) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            answer = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some(65536):
                    answer += chunk
            return answer

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(runtime.run)
            port = runtime.egress.port
            assert port is not None
            token = runtime.egress.issue(0)
            auth = b"Proxy-Authorization: Basic " + base64.b64encode(
                f"agent:{token}".encode()) + b"\r\n"
            origin = await ask(port, b"GET /x HTTP/1.1\r\nHost: h\r\n" + auth + b"\r\n")
            assert origin.startswith(b"HTTP/1.1 400 ") and b"absolute URL" in origin
            big = b"GET http://h/ HTTP/1.1\r\nHost: h\r\nX-Big: " + b"x" * 40000 + b"\r\n\r\n"
            assert (await ask(port, big)).startswith(b"HTTP/1.1 431 ")
            held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
            with trio.fail_after(10):  # the accept loop takes them in its own time
                while runtime.egress._connections < 2:
                    await trio.sleep(0.001)
            busy = await ask(port, b"GET http://h/ HTTP/1.1\r\nHost: h\r\n" + auth + b"\r\n")
            assert busy.startswith(b"HTTP/1.1 503 "), busy
            for stream in held:
                await stream.aclose()
            runtime.egress.revoke(token)
            gone = await ask(port, b"GET http://h/ HTTP/1.1\r\nHost: h\r\n" + auth + b"\r\n")
            assert gone.startswith(b"HTTP/1.1 407 ")
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        store.close()
