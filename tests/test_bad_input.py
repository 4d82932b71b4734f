"""Random command lines to an agent's ctl and budget, through the real mount.

The parsers `agentfs.ctl.parse_agent_ctl` and `agentfs.budget.parse_settings`, called in this
process, are the oracle for whether a write is well formed; what a well-formed write may still
be refused for (a tick-only verb outside a tick, a name another agent holds) is modelled here.
Each example writes to a fresh agent with no program (so nothing ever ticks), then checks:
the daemon is alive and the mount answers; a refused write failed with the right errno, left
ctl status, budget, pending inbox, outbox and state exactly as they were, and added one
`refused` line naming the errno to the log; an accepted write changed just what it says.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import Mount, ctl_status, errno_of, init_store, pid_alive, write_once
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from agentfs import caps, errors
from agentfs.alarms import Alarm
from agentfs.budget import LIMIT_BY_KEY, parse_settings
from agentfs.ctl import AGENT_VERBS, TICK_VERBS, Command, parse_agent_ctl
from agentfs.store import AgentRecord
from agentfs.units import format_duration

SETTINGS = settings(deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

# -- the mount, shared by the module -----------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    base = tmp_path_factory.mktemp("bad-input")
    store = init_store(base / "store")
    (base / "mnt").mkdir()
    m = Mount(store, base / "mnt")
    try:
        m.start()
        m.new_agent("other")  # holds a name, so `name other` is EEXIST
        yield m
    finally:
        m.stop()


_fresh = itertools.count()


@dataclass
class Agent:
    name: str
    npub: str
    dir: Path  # by npub: stays valid when a `name` command renames the agent


def fresh_agent(mount: Mount) -> Agent:
    """An agent with no program, a state file and a directory, and one pending message."""
    name = f"f{next(_fresh)}"
    npub = mount.new_agent(name)
    agent = Agent(name, npub, mount.mp / npub)
    (agent.dir / "state" / "keep").write_bytes(b"kept\n")
    os.mkdir(agent.dir / "state" / "sub")
    (agent.dir / "state" / "sub" / "f").write_bytes(b"\x00\xff")
    write_once(agent.dir / "inbox", '{"id":"seed","type":"text","data":"seed"}\n')
    return agent


# -- what an agent looks like from outside -----------------------------------------------------


def records(path: Path) -> list[dict[str, Any]]:
    """JSON lines split on \\n only (a record may hold U+2028, which str.splitlines splits on)."""
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line]


def state_tree(root: Path) -> dict[str, bytes | None]:
    tree: dict[str, bytes | None] = {}
    for directory, dirs, files in os.walk(root):
        for d in dirs:
            tree[os.path.relpath(os.path.join(directory, d), root) + "/"] = None
        for f in files:
            path = os.path.join(directory, f)
            tree[os.path.relpath(path, root)] = Path(path).read_bytes()
    return tree


def budget_lines(agent: Agent) -> dict[str, str]:
    text = (agent.dir / "budget").read_text()
    lines = dict(line.split(" ", 1) for line in text.splitlines())
    lines.pop("next_reset")  # moves at midnight, nothing a write changes
    # The journals count in the storage used, and a write refused or done adds to the log:
    # what is compared is the rest, the bytes of state/.
    journals = sum((agent.dir / j).stat().st_size for j in ("outbox", "log"))
    lines["used_storage_bytes"] = str(int(lines["used_storage_bytes"]) - journals)
    return lines


@dataclass
class Snapshot:
    status: dict[str, str]
    budget: dict[str, str]
    inbox: list[dict[str, Any]]
    outbox: bytes
    state: dict[str, bytes | None]
    log: list[dict[str, Any]]


def snapshot(agent: Agent) -> Snapshot:
    return Snapshot(ctl_status(agent.dir), budget_lines(agent), records(agent.dir / "inbox"),
                    (agent.dir / "outbox").read_bytes(), state_tree(agent.dir / "state"),
                    records(agent.dir / "log"))


def assert_daemon_up(mount: Mount) -> None:
    assert pid_alive(mount.pid), "the daemon died"
    assert os.path.ismount(mount.mp)
    assert "ctl" in os.listdir(mount.mp)
    assert ctl_status(mount.mp / "other")["name"] == "other"


def write(agent: Agent, file: str, data: bytes) -> int | None:
    """One write(2) of `data`; None if it was accepted whole, else its errno."""
    try:
        assert write_once(agent.dir / file, data) == len(data)
    except OSError as e:
        return e.errno
    return None


def check_refused(agent: Agent, before: Snapshot, file: str, expected: int) -> None:
    after = snapshot(agent)
    assert after.status == before.status
    assert after.budget == before.budget
    assert after.inbox == before.inbox
    assert after.outbox == before.outbox
    assert after.state == before.state
    assert after.log[:len(before.log)] == before.log
    added = after.log[len(before.log):]
    assert len(added) == 1, added
    assert added[0]["event"] == "refused" and added[0]["op"] == f"write {file}"
    assert added[0]["errno"] == errno.errorcode[expected]
    assert added[0]["error"]


# -- generating command lines ------------------------------------------------------------------

# Placeholders for names, filled in per example: the agent's own name, a name another agent
# holds, and a name nobody holds.
OWN, OTHER, FREE = "@own", "@other", "@free"

COMMON_VERBS = sorted(AGENT_VERBS - {"terminate", "program"}) * 3 + [
    "new", "Wake", "WAKE", "wake,", "sleep!", "retry", "budget", "ctl", "-", "#", "é", "\x00"]
RARE_VERBS = ["terminate", "program"]
ARGS = st.one_of(
    st.sampled_from(["1", "0", "-1", "007", "3", "10", "1.5", "1e3", "+2", " 4", "api", "API",
                     "coffee", "x", OWN, OTHER, FREE, "bad name", ".hidden", "-dash",
                     "npub1xyz", "ctl", "a" * 65, "'", '"', "a'b", '"quoted word"', "\\",
                     "\t", "\x1b[31m", "\x7f", "\u00e9", "\u2028", "\x85", "\U0001f600",
                     "\ufeff", "\u0663", "\u00b2", "1\u00a0", "9" * 16, "9" * 400]),
    st.integers(-10, 10**6).map(str),
    st.text(max_size=12),
)


SMALL = st.integers(1, 50).map(str)
WAKE = st.builds(lambda text: f"wake {text}".rstrip(), st.one_of(st.just(""), st.text(max_size=20)))
TOKEN = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=16,
                max_size=40)
WELL_FORMED_CTL = st.one_of(
    WAKE,
    st.sampled_from(["alarm 30s", "alarm 2h", "alarm every 5m", "alarm cancel", "idle 0",
                     "idle 5m", "idle 1500ms", "alarm at 2030-01-01T00:00:00Z",
                     "alarm at 2027-06-01T12:00:00.5+02:00", "token none", "publish heads",
                     "publish none"]),
    st.builds(lambda token: f"token {token}", TOKEN),
    st.sampled_from(["sleep", "recover", "wake"]),
    st.builds(lambda n: f"retries {n}", st.one_of(SMALL, st.just("007"))),
    st.builds(lambda n: f"name {n}", st.sampled_from([FREE, OWN, OTHER])),
    WAKE,
    st.sampled_from(["sleep", "recover", "wake"]),
    st.sampled_from([  # capabilities; a revoke of what the agent does not hold is ENOENT
        "grant net api.example.com", "grant net 127.0.0.1:8443 [::1]:443", "grant spend",
        "grant secret openai", "grant tool /usr/bin/curl '/opt/my tools'", "revoke spend",
        "revoke net api.example.com", "revoke secret openai", "revoke tool /usr/bin/curl"]),
    st.one_of(  # well formed, but only for a running tick: EINVAL here
        st.just("checkpoint"),
        st.builds(lambda n: f"charge api {n}", SMALL),
        st.builds(lambda n, memo: f"spend {n} {memo}".rstrip(), SMALL, st.text(max_size=8))),
)


def one_in(draw: st.DrawFn, n: int) -> bool:
    """True about once in `n` draws (hypothesis favours the ends of a range: avoid them)."""
    return draw(st.integers(0, n - 1)) == n // 2


@st.composite
def garbled_ctl_line(draw: st.DrawFn) -> str:
    verb = draw(st.one_of(st.sampled_from(COMMON_VERBS), st.text(max_size=6))
                if not one_in(draw, 30) else st.sampled_from(RARE_VERBS))
    words = draw(st.lists(ARGS, max_size=3))
    separator = draw(st.sampled_from([" ", " ", " ", "  ", "\t", " \x0c"]))
    indent = draw(st.sampled_from(["", "", "", " ", "\t"]))
    return indent + separator.join([verb, *words])


def ctl_line() -> st.SearchStrategy[str]:
    """Mostly well-formed commands (several of them make a write worth accepting), the rest
    random verbs from the known set and garbage, with random arguments."""
    return st.one_of(WELL_FORMED_CTL, WELL_FORMED_CTL, WELL_FORMED_CTL, garbled_ctl_line())


BUDGET_KEYS = st.one_of(
    st.sampled_from(sorted(LIMIT_BY_KEY) * 3 + [
        "MAX_TICK_DURATION", "max_tick", "used_storage_bytes", "next_reset", "retries",
        "max_storage_bytes:", "warning_threshold=0.5", "#"]),
    st.text(max_size=10),
)
UNITS = ["", "", "ms", "s", "m", "h", "d", "B", "KB", "kb", "MiB", "GiB", "TB", "x", "sec",
         "µs", " s", "S", "H", "%"]
NUMBERS = st.one_of(
    st.integers(-5, 10**9).map(str),
    st.floats(-10, 1e6, allow_nan=False).map(lambda f: f"{f:.4g}"),
    st.sampled_from(["0", "0.0", "0.5", "1", "1.0", ".5", "5.", "1e3", "nan", "inf", "-0",
                     "0x10", "1_000", "1,5", "\u0663", "\u00b2", "3" * 19, "3" * 400,
                     "1." + "5" * 12]),
)
VALUES = st.one_of(
    st.builds(lambda n, u: n + u, NUMBERS, st.sampled_from(UNITS)),
    st.text(max_size=10),
)


WELL_FORMED_BUDGET = st.one_of(
    st.builds(lambda key, n, unit: f"{key} {n}{unit}",
              st.sampled_from(["max_tick_duration", "max_daily_compute"]),
              st.one_of(st.integers(1, 10**5).map(str), st.sampled_from(["0.5", "1.25"])),
              st.sampled_from(["", "ms", "s", "m", "h", "d"])),
    st.builds(lambda n, unit: f"max_storage_bytes {n}{unit}", st.integers(0, 10**6),
              st.sampled_from(["", "B", "KB", "kb", "MiB", "GiB", "TB"])),
    st.builds(lambda key, n: f"{key} {n}",
              st.sampled_from(["max_daily_api_calls", "max_daily_spend_sats"]),
              st.integers(0, 10**9)),
    st.builds(lambda f: f"warning_threshold {f:g}", st.floats(0.001, 1)),
)


@st.composite
def garbled_budget_line(draw: st.DrawFn) -> str:
    words = [draw(BUDGET_KEYS)]
    shape = draw(st.integers(0, 9))
    if shape:  # mostly `key value`
        words.append(draw(VALUES))
    if shape == 9:
        words.append(draw(VALUES))
    separator = draw(st.sampled_from([" ", " ", "  ", "\t", " \u3000"]))
    return separator.join(words)


def budget_line() -> st.SearchStrategy[str]:
    return st.one_of(WELL_FORMED_BUDGET, WELL_FORMED_BUDGET, garbled_budget_line())


LONG = st.builds(lambda piece, n: piece * n,
                 st.sampled_from(["x", "\u00e9", "wake ", "\x01", "1"]), st.integers(500, 4000))
SEPARATORS = ["\n"] * 8 + ["\r\n", "\n\n", "\r", "\x0b", "\x1c", "\x85", "\u2028"]
BAD_UTF8 = [b"\xff", b"\x80", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88"]


@st.composite
def write_data(draw: st.DrawFn, line: st.SearchStrategy[str],
               other: st.SearchStrategy[str]) -> bytes:
    """Several lines (now and then one meant for the other file, or a very long one) as bytes,
    sometimes with invalid UTF-8 spliced in."""
    # Now and then a line for the other file, or a long one.
    extra = [other] if one_in(draw, 10) else [LONG] if one_in(draw, 10) else []
    lines = draw(st.lists(st.one_of(line, *extra), min_size=1, max_size=4))
    parts = [lines[0]]
    for text in lines[1:]:
        parts += [draw(st.sampled_from(SEPARATORS)), text]
    parts.append(draw(st.sampled_from(["\n", "\n", "\n", "", "\r\n", " "])))
    data = "".join(parts).encode("utf-8", errors="surrogatepass")
    if one_in(draw, 12):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from(BAD_UTF8)) + data[at:]
    return data or b"\n"


def fill_names(data: bytes, agent: Agent) -> bytes:
    free = f"free-{next(_fresh)}"
    return data.replace(OWN.encode(), agent.name.encode()).replace(
        OTHER.encode(), b"other").replace(FREE.encode(), free.encode())


# -- the oracle --------------------------------------------------------------------------------


def parse_ctl(data: bytes) -> list[Command] | int:
    """The commands in a ctl write, or the errno it is refused with as malformed."""
    try:
        return parse_agent_ctl(data)
    except errors.FsError as e:
        return e.errno
    except Exception as e:  # noqa: BLE001 - a parser bug, but the input is malformed
        event(f"the parser raised {type(e).__name__}")
        return errno.EINVAL


def ctl_outcome(commands: list[Command], names: dict[str, str], own: str) -> int | None:
    """The errno a well-formed ctl write from outside a tick fails with, first failure first.

    A fresh agent holds no capability: a revoke is ENOENT unless the write granted it."""
    held = AgentRecord(0, "00")
    for command in commands:
        if command.verb in TICK_VERBS:
            return errno.EINVAL
        if command.verb == "name" and names.get(command.args[0], own) != own:
            return errno.EEXIST
        if command.verb in caps.VERBS:
            try:
                caps.apply(held, command)
            except errors.FsError as e:
                return e.errno
    return None


def parse_budget(data: bytes) -> dict[str, float] | int:
    try:
        parsed = parse_settings(data.decode("utf-8"))
    except UnicodeDecodeError:
        return errno.EINVAL
    except errors.FsError as e:
        return e.errno
    except Exception as e:  # noqa: BLE001 - a parser bug, but the input is malformed
        event(f"the parser raised {type(e).__name__}")
        return errno.EINVAL
    if not all(math.isfinite(v) for v in parsed.values()):
        event("the parser returned a value that is not finite")
        return errno.EINVAL  # no limit is infinite
    return parsed


def taken_names(mount: Mount) -> dict[str, str]:
    """Every agent name in the mount's root, and the npub it links to."""
    return {entry: os.readlink(mount.mp / entry) for entry in os.listdir(mount.mp)
            if os.path.islink(mount.mp / entry)}


def alarm_of(command: Command) -> Alarm | None:
    raw = command.args[0]
    return None if raw == "cancel" else Alarm.decode(json.loads(raw))


def describe(command: Command) -> str:
    """The `ctl` log record's command; for an alarm, as parsed here (see `same_alarm`)."""
    if command.verb == "wake":
        return f"wake {command.text}".rstrip()
    if command.verb == "alarm":
        alarm = alarm_of(command)
        return f"alarm {alarm.describe()}" if alarm else "alarm cancel"
    if command.verb == "idle":
        return f"idle {format_duration(float(command.args[0]))}"
    if command.verb == "token":
        return "token set" if command.args[0] else "token none"
    if command.verb in caps.VERBS:
        return caps.describe(command)
    return " ".join((command.verb, *command.args))


def same_alarm(shown: str, expected: str) -> bool:
    """Whether two alarm texts (`TIME [every PERIOD]`, or -) agree: an alarm `in` a duration
    is parsed here a little before the daemon parses it, so its times may differ a little."""
    if "-" in (shown, expected):
        return shown == expected
    (when, _, every), (want, _, want_every) = shown.partition(" every "), \
        expected.partition(" every ")
    moment = datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
    wanted = datetime.fromisoformat(want.replace("Z", "+00:00")).timestamp()
    return every == want_every and abs(moment - wanted) < 60


# -- the properties ----------------------------------------------------------------------------


@settings(SETTINGS, max_examples=60)
@given(data=write_data(ctl_line(), budget_line()))
def test_random_ctl_writes(shared: Mount, data: bytes) -> None:
    agent = fresh_agent(shared)
    data = fill_names(data, agent)
    parsed = parse_ctl(data)
    if isinstance(parsed, list):
        # A valid `program` would let the pending triggers run it: not what this test is about.
        if any(c.verb == "program" for c in parsed):
            event("skipped: a valid program")
            assume(False)
        expected = ctl_outcome(parsed, taken_names(shared), agent.npub)
    else:
        expected = parsed
    event(f"ctl: {'accepted' if expected is None else errno.errorcode[expected]}")
    before = snapshot(agent)
    got = write(agent, "ctl", data)
    assert_daemon_up(shared)
    assert got == expected, (data, parsed)
    if expected is not None:
        check_refused(agent, before, "ctl", expected)
        return
    assert isinstance(parsed, list)
    # Accepted: each command did what it says, in order, and nothing else changed.
    status = dict(before.status)
    wakes = []
    held = AgentRecord(0, "00")  # the capabilities the write gives, shown as ctl shows them
    for command in parsed:
        if command.verb == "wake":
            wakes.append(command.text)
            if status["status"] == "dormant":
                status["status"] = "active"
        elif command.verb == "sleep" and status["status"] == "active":
            status["status"] = "dormant"
        elif command.verb == "terminate":
            status["status"] = "terminated"
            status["alarm"] = "-"  # terminate cancels the alarm
        elif command.verb == "retries":
            status["retries"] = command.args[0]
        elif command.verb == "name":
            status["name"] = command.args[0]
        elif command.verb == "idle":
            status["idle"] = format_duration(float(command.args[0]))
        elif command.verb == "token":
            status["token"] = "set" if command.args[0] else "-"
        elif command.verb == "publish":
            status["publish"] = command.args[0]
        elif command.verb == "alarm":
            alarm = alarm_of(command)
            status["alarm"] = alarm.describe() if alarm else "-"
        elif command.verb in caps.VERBS:
            caps.apply(held, command)
            status.update(caps.shown(held))
    status["pending"] = str(int(before.status["pending"]) + len(wakes))
    after = snapshot(agent)
    assert same_alarm(after.status.pop("alarm"), status.pop("alarm"))
    assert after.status == status
    assert after.inbox[:len(before.inbox)] == before.inbox
    added = after.inbox[len(before.inbox):]
    assert [(m["type"], m["data"]) for m in added] == [("wake", text) for text in wakes]
    assert after.budget == before.budget
    assert after.outbox == before.outbox
    assert after.state == before.state
    assert after.log[:len(before.log)] == before.log
    logged = after.log[len(before.log):]
    assert [r["event"] for r in logged] == ["ctl"] * len(parsed)
    for record, command in zip(logged, parsed, strict=True):
        if command.verb == "alarm" and record["command"] != "alarm cancel":
            assert same_alarm(str(record["command"]).removeprefix("alarm "),
                              describe(command).removeprefix("alarm "))
        else:
            assert record["command"] == describe(command)
    if status["name"] != agent.name:
        assert os.readlink(shared.mp / status["name"]) == agent.npub
        assert not os.path.lexists(shared.mp / agent.name)
    if status["status"] == "terminated":
        assert errno_of(lambda: write_once(agent.dir / "ctl", "wake\n")) == errno.EACCES


@settings(SETTINGS, max_examples=40)
@given(data=write_data(budget_line(), ctl_line()))
def test_random_budget_writes(shared: Mount, data: bytes) -> None:
    agent = fresh_agent(shared)
    parsed = parse_budget(data)
    event(f"budget: {errno.errorcode[parsed] if isinstance(parsed, int) else 'accepted'}")
    before = snapshot(agent)
    got = write(agent, "budget", data)
    assert_daemon_up(shared)
    expected = parsed if isinstance(parsed, int) else None
    assert got == expected, (data, parsed)
    if isinstance(parsed, int):
        check_refused(agent, before, "budget", parsed)
        return
    shown = {key: LIMIT_BY_KEY[key].render(value) for key, value in parsed.items()}
    after = snapshot(agent)
    assert after.budget == {**before.budget, **shown}
    assert after.status == before.status
    assert after.inbox == before.inbox
    assert after.outbox == before.outbox
    assert after.state == before.state
    assert after.log[:len(before.log)] == before.log
    logged = after.log[len(before.log):]
    assert [(r["event"], r["set"]) for r in logged] == [("budget", shown)]


# -- numbers that once broke the parsers -------------------------------------------------------

# str.isdigit() accepts digits int() refuses (superscripts), int() refuses more than 4300
# digits, float() of 400 digits is inf: the parsers raised ValueError/OverflowError (no
# FsError) and the mount died; an infinite duration was stored, then failed to render (EIO).
NUMBERS_THAT_BROKE = [
    ("ctl", "retries \u00b2"), ("ctl", "charge api \u00b9"), ("ctl", "retries " + "9" * 5000),
    ("ctl", "retries \u0663"), ("budget", "max_daily_api_calls \u00b2"),
    ("budget", "max_daily_spend_sats " + "9" * 400), ("budget", "max_storage_bytes " + "9" * 400),
    ("budget", "max_tick_duration " + "9" * 400), ("budget", "max_daily_compute 1e400"),
    ("budget", "warning_threshold " + "9" * 400), ("budget", "max_daily_api_calls \u0663"),
]


def test_numbers_that_broke_the_parsers(shared: Mount) -> None:
    for file, line in NUMBERS_THAT_BROKE:
        agent = fresh_agent(shared)
        before = snapshot(agent)
        assert write(agent, file, line.encode() + b"\n") == errno.EINVAL, line[:40]
        assert_daemon_up(shared)
        check_refused(agent, before, file, errno.EINVAL)


def test_known_bad_lines_are_einval_and_logged(shared: Mount) -> None:
    """A fixed list next to the random ones: each new word, key and unit, malformed."""
    ctl_cases = ["retries 0", "retries -1", "retries 1.5", "retries", "retries 1 2", "name",
                 "name a b", "name .x", "name npub1x", "name ctl", "wake\nfrobnicate",
                 "sleep now", "recover x", "terminate please", "checkpoint", "charge api 1",
                 "spend 3 memo", "charge api", "charge cpu 1", "spend 0", "program",
                 "program 'unclosed", "name 'a", "grant", "grant nets x", "grant net",
                 "grant net a..b", "grant tool rel", "grant spend now", "revoke", "\xff"]
    budget_cases = ["max_tick_duration", "max_tick_duration 0", "max_tick_duration 5y",
                    "max_tick_duration -1s", "max_daily_compute 1 h", "max_storage_bytes 1.5",
                    "max_storage_bytes 10XB", "max_storage_bytes 0.5B",
                    "max_daily_api_calls 1.5", "max_daily_api_calls -1",
                    "max_daily_spend_sats lots", "warning_threshold 0", "warning_threshold 1.1",
                    "warning_threshold nan", "warning_threshold inf", "mystery_key 1",
                    "max_tick_duration 1s\nbogus", "", "\n\n", "\xff"]
    for file, cases in (("ctl", ctl_cases), ("budget", budget_cases)):
        agent = fresh_agent(shared)
        for case in cases:
            data = case.encode("latin-1" if case == "\xff" else "utf-8") + b"\n"
            before = snapshot(agent)
            assert write(agent, file, data) == errno.EINVAL, case
            check_refused(agent, before, file, errno.EINVAL)
        assert_daemon_up(shared)
