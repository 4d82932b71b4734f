"""Capabilities (agentfs(4), `grant` and `revoke`): given by the owner, shown, logged, refused
to ticks; and `spend` only for an agent that holds it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from conftest import READ_TRIGGER, Mount, errno_of, module_mount, script, write_once

from agentfs import caps, errors
from agentfs.ctl import parse_agent_ctl
from agentfs.store import AgentRecord

CAP_KEYS = ["net", "secret", "tool", "spend"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Mount:
    yield from module_mount(tmp_path_factory, "caps")


def caps_of(mount: Mount, name: str) -> dict[str, str]:
    status = mount.status(name)
    return {key: status[key] for key in CAP_KEYS}


def ctl_log(mount: Mount, name: str) -> list[str]:
    return [str(r["command"]) for r in mount.log(name) if r["event"] == "ctl"]


def last_refusal(mount: Mount, name: str) -> dict[str, object]:
    return [r for r in mount.log(name) if r["event"] == "refused"][-1]


# -- the parser, without a mount ---------------------------------------------------------------


def test_grants_are_parsed_and_normalised() -> None:
    record = AgentRecord(0, "00")
    for command in parse_agent_ctl(
            b"grant net API.Example.COM. 127.0.0.1:8443 [0::1] [2001:db8::1]:8080\n"
            b"grant tool '/opt/my tools/run' //usr/bin/curl /usr/bin/curl\n"
            b"grant secret openai\ngrant spend\n"):
        caps.apply(record, command)
    assert record.caps == {
        "net": ["127.0.0.1:8443", "[2001:db8::1]:8080", "[::1]", "api.example.com"],
        "tool": ["/opt/my tools/run", "/usr/bin/curl"], "secret": ["openai"],
        "spend": ["granted"]}
    assert caps.tools(record) == ["/opt/my tools/run", "/usr/bin/curl"]
    assert caps.may_spend(record)
    # A bare host opens the TLS and plain http ports; HOST:PORT that port alone.
    bare, exact = caps.parse_endpoint("api.example.com"), caps.parse_endpoint("h:8443")
    assert bare.allows("api.example.com", 443) and bare.allows("api.example.com", 80)
    assert not bare.allows("api.example.com", 8443) and not bare.allows("other.example", 443)
    assert exact.allows("h", 8443) and not exact.allows("h", 443)
    assert dict(caps.shown(record))["tool"] == "'/opt/my tools/run' /usr/bin/curl"
    for line in [b"grant", b"grant nets x", b"grant net", b"grant net a..b", b"grant net h:0",
                 b"grant net h:65536", b"grant net ::1", b"grant net 1.2.3", b"grant net -a.b",
                 b"grant net h:80:1", b"grant net [::1", b"grant tool bin/curl",
                 b"grant tool /a/../etc", b"grant tool '/a\tb'", b"grant spend now",
                 b"grant secret .x", b"grant secret " + b"x" * 65, b"revoke"]:
        with pytest.raises(errors.FsError) as refused:
            parse_agent_ctl(line + b"\n")
        assert refused.value.errno == errno.EINVAL, line


# -- through the mount -------------------------------------------------------------------------


def test_grant_and_revoke_show_in_ctl_and_log(shared: Mount) -> None:
    shared.new_agent("granted")
    ctl = shared.agent("granted") / "ctl"
    assert caps_of(shared, "granted") == dict.fromkeys(CAP_KEYS, "-")  # nothing by default
    write_once(ctl, "grant net api.example.com 127.0.0.1:8443\ngrant secret openai\n"
                    "grant tool /usr/bin/curl '/opt/my tools'\ngrant spend\n")
    assert caps_of(shared, "granted") == {
        "net": "127.0.0.1:8443 api.example.com", "secret": "openai",
        "tool": "'/opt/my tools' /usr/bin/curl", "spend": "granted"}
    write_once(ctl, "revoke net api.example.com\nrevoke spend\nrevoke tool '/opt/my tools'\n")
    assert caps_of(shared, "granted") == {"net": "127.0.0.1:8443", "secret": "openai",
                                          "tool": "/usr/bin/curl", "spend": "-"}
    assert ctl_log(shared, "granted") == [
        "grant net api.example.com 127.0.0.1:8443", "grant secret openai",
        "grant tool /usr/bin/curl '/opt/my tools'", "grant spend",
        "revoke net api.example.com", "revoke spend", "revoke tool '/opt/my tools'"]
    # Revoking what it does not hold is ENOENT, and the write is all or nothing.
    assert errno_of(lambda: write_once(ctl, "revoke secret openai\nrevoke net nope.example\n")) \
        == errno.ENOENT
    assert caps_of(shared, "granted")["secret"] == "openai"
    refused = last_refusal(shared, "granted")
    assert refused["errno"] == "ENOENT" and "nope.example" in str(refused["error"])
    assert errno_of(lambda: write_once(ctl, "grant tool relative\n")) == errno.EINVAL
    assert "absolute" in str(last_refusal(shared, "granted")["error"])


def test_new_takes_grant_lines(shared: Mount) -> None:
    root = shared.mp / "ctl"
    write_once(root, "new fetcher /bin/true\ngrant net api.example.com\ngrant spend\n"
                     "new plain\nnew tooled\ngrant tool /usr/bin\n")
    assert caps_of(shared, "fetcher") == {"net": "api.example.com", "secret": "-", "tool": "-",
                                          "spend": "granted"}
    assert caps_of(shared, "plain") == dict.fromkeys(CAP_KEYS, "-")
    assert caps_of(shared, "tooled")["tool"] == "/usr/bin"
    log = shared.log("fetcher")
    assert [(r["event"], r.get("command")) for r in log[:3]] == [
        ("create", None), ("ctl", "grant net api.example.com"), ("ctl", "grant spend")]
    # A grant before any new, a revoke, or a bad grant refuses the whole write.
    for bad in ["grant spend\nnew early\n", "new early\nrevoke spend\n",
                "new early\ngrant net bad..host\n"]:
        assert errno_of(lambda b=bad: write_once(root, b)) == errno.EINVAL, bad
    assert not os.path.lexists(shared.mp / "early")


def test_a_tick_may_not_grant_itself_anything(shared: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "greedy.sh", READ_TRIGGER + """
for line in 'grant net evil.example' 'grant spend' 'revoke net api.example.com'; do
  if echo "$line" > "$AGENT_DIR/ctl"; then echo yes >> "$1/results"
  else echo no >> "$1/results"; fi
done
""")
    write_once(shared.mp / "ctl", f"new greedy {program} {tmp_path}\ngrant net api.example.com\n")
    write_once(shared.agent("greedy") / "inbox", "go\n")
    shared.wait_ticks("greedy", 2)
    assert (tmp_path / "results").read_text() == "no\nno\nno\n"
    assert caps_of(shared, "greedy")["net"] == "api.example.com"
    refused = [r for r in shared.log("greedy") if r["event"] == "refused"]
    assert [r["errno"] for r in refused] == ["EACCES"] * 3
    assert all("owner" in str(r["error"]) for r in refused)


def test_spend_needs_the_spend_capability(shared: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "pay.sh", READ_TRIGGER + """
if echo 'spend 5 tea' > "$AGENT_DIR/ctl"; then echo yes >> "$1/spent"
else echo no >> "$1/spent"; fi
""")
    shared.new_agent("payer", program, str(tmp_path))
    inbox, ctl = shared.agent("payer") / "inbox", shared.agent("payer") / "ctl"
    write_once(inbox, "one\n")
    shared.wait_ticks("payer", 2)
    write_once(ctl, "grant spend\n")
    write_once(inbox, "two\n")
    shared.wait_ticks("payer", 3)
    write_once(ctl, "revoke spend\n")
    write_once(inbox, "three\n")
    shared.wait_ticks("payer", 4)
    assert (tmp_path / "spent").read_text() == "no\nyes\nno\n"
    budget = dict(line.split(" ", 1) for line in
                  (shared.agent("payer") / "budget").read_text().splitlines())
    assert budget["used_daily_spend_sats"] == "5"
    refused = [r for r in shared.log("payer") if r["event"] == "refused"]
    assert [r["errno"] for r in refused] == ["EACCES", "EACCES"]
    assert "grant spend" in str(refused[0]["error"])


def test_ticks_may_not_open_the_secrets_file(shared: Mount, tmp_path: Path) -> None:
    write_once(shared.mp / "secrets", "api sk-not-for-ticks host=api.example.com\n")
    program = script(tmp_path, "peek.sh", READ_TRIGGER + f"""
if cat {shared.mp}/secrets > "$1/read" 2>/dev/null; then echo read >> "$1/results"
else echo refused >> "$1/results"; fi
if echo 'api stolen host=evil.example' > {shared.mp}/secrets; then echo wrote >> "$1/results"
else echo refused >> "$1/results"; fi
""")
    shared.new_agent("peeker", program, str(tmp_path))
    write_once(shared.agent("peeker") / "inbox", "go\n")
    shared.wait_ticks("peeker", 2)
    assert (tmp_path / "results").read_text() == "refused\nrefused\n"
    assert (shared.mp / "secrets").read_text() == "api host=api.example.com\n"
    refused = [r for r in shared.log("peeker") if r["event"] == "refused"]
    assert [r["errno"] for r in refused] == ["EACCES", "EACCES"]
