"""The alarm, token and idle ctl verbs, and the root files `alarms` and `tokens` (agentfs(4)),
through the real mount.  No timer driver here: the tests write the firing messages a driver
would, at the times they choose."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    READ_TRIGGER,
    Mount,
    errno_of,
    module_mount,
    script,
    sh,
    wait_until,
    write_once,
)

ALARM_LINE = re.compile(r"^(\d+\.\d{3}) (npub1[02-9ac-hj-np-z]+) (alarm:(\d+)\.(\d+))$")
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SECRET = "correct-horse-battery-staple-42"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One mount for the module: each test uses agents of its own."""
    yield from module_mount(tmp_path_factory, "alarms")


def alarms(mount: Mount) -> list[tuple[float, str, str]]:
    """The root `alarms` file: (due, npub, id) a line, each line checked for its form."""
    listed = []
    for line in (mount.mp / "alarms").read_text().splitlines():
        match = ALARM_LINE.match(line)
        assert match, line
        assert int(match[4]) == round(float(match[1]) * 1000), line  # the id names the due time
        listed.append((float(match[1]), match[2], match[3]))
    assert listed == sorted(listed), "soonest first"
    return listed


def alarm_of(mount: Mount, npub: str) -> tuple[float, str] | None:
    """(due, id) of the agent's line in `alarms`, if it has one (it has at most one)."""
    mine = [(due, ident) for due, who, ident in alarms(mount) if who == npub]
    assert len(mine) <= 1, mine
    return mine[0] if mine else None


def serial(ident: str) -> int:
    """Which setting of its agent's alarm an id names."""
    return int(ident.rpartition(".")[2])


def unix(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def ctl(mount: Mount, name: str, line: str) -> None:
    write_once(mount.agent(name) / "ctl", line + "\n")


def fire(mount: Mount, name: str, ident: str) -> None:
    """What the timer driver writes when an alarm is due."""
    write_once(mount.agent(name) / "inbox", json.dumps({"type": "alarm", "id": ident}) + "\n")


def commands(mount: Mount, name: str) -> list[str]:
    return [str(r["command"]) for r in mount.log(name) if r["event"] == "ctl"]


def dropped(mount: Mount, name: str) -> list[dict[str, Any]]:
    return [r for r in mount.log(name) if r["event"] == "alarm"]


# -- setting, replacing, cancelling --------------------------------------------------------------


def test_set_replace_and_cancel_show_in_ctl_and_alarms(shared: Mount) -> None:
    a = shared.new_agent("a-set")
    b = shared.new_agent("b-set")
    assert shared.status("a-set")["alarm"] == "-" and alarm_of(shared, a) is None
    ctl(shared, "a-set", "alarm at 2030-01-01T00:00:00Z")
    assert shared.status("a-set")["alarm"] == "2030-01-01T00:00:00.000Z"
    assert alarm_of(shared, a) == (1893456000.0, "alarm:1893456000000.1")  # its 1st setting
    before = time.time()
    ctl(shared, "b-set", "alarm every 5m")
    shown = shared.status("b-set")["alarm"]
    when, every = shown.split(" every ")
    assert TIME.match(when) and every == "5m"
    due, ident = alarm_of(shared, b) or (0.0, "")
    assert serial(ident) == 1
    # (due times are kept in whole milliseconds)
    assert before + 299.999 <= due <= time.time() + 300 and abs(unix(when) - due) < 0.001
    # Soonest first: b's alarm, in five minutes, before a's in 2030.
    ours = [who for _due, who, _id in alarms(shared) if who in (a, b)]
    assert ours == [b, a]
    # One alarm per agent: setting another replaces it.
    before = time.time()
    ctl(shared, "a-set", "alarm 1h")
    due, ident = alarm_of(shared, a) or (0.0, "")
    assert before + 3599.999 <= due <= time.time() + 3600
    assert ident == f"alarm:{round(due * 1000)}.2"
    assert [who for _due, who, _id in alarms(shared) if who in (a, b)] == [b, a]
    ctl(shared, "a-set", "alarm cancel")
    assert shared.status("a-set")["alarm"] == "-" and alarm_of(shared, a) is None
    ctl(shared, "a-set", "alarm cancel")  # nothing to cancel: nothing happens
    assert shared.status("a-set")["alarm"] == "-"
    assert commands(shared, "a-set")[:1] == ["alarm 2030-01-01T00:00:00.000Z"]
    assert commands(shared, "a-set")[2:] == ["alarm cancel", "alarm cancel"]
    assert re.match(r"^alarm \S+Z$", commands(shared, "a-set")[1])
    assert commands(shared, "b-set") == [f"alarm {shown}"]
    # terminate cancels the agent's alarm.
    ctl(shared, "b-set", "terminate")
    assert shared.status("b-set")["alarm"] == "-" and alarm_of(shared, b) is None


def test_idle_is_shown_and_logged(shared: Mount) -> None:
    shared.new_agent("idler")
    assert shared.status("idler")["idle"] == "30s"
    for line, shown in (("idle 5m", "5m"), ("idle 1500ms", "1.5s"), ("idle 0", "0s"),
                        ("idle 2h", "2h")):
        ctl(shared, "idler", line)
        assert shared.status("idler")["idle"] == shown
    assert commands(shared, "idler") == ["idle 5m", "idle 1.5s", "idle 0s", "idle 2h"]


# -- firing --------------------------------------------------------------------------------------


def test_a_firing_is_applied_once_and_a_stale_one_is_dropped(shared: Mount,
                                                             tmp_path: Path) -> None:
    program = script(tmp_path, "alarmed.sh", READ_TRIGGER + """
printf '%s\\n' "$trigger" >> "$1/triggers"
""")
    npub = shared.new_agent("ring", program, str(tmp_path))
    shared.created("ring")
    ctl(shared, "ring", "alarm 1h")
    due, ident = alarm_of(shared, npub) or (0.0, "")
    fire(shared, "ring", ident)
    # The firing ends a one-shot alarm at once, in the commit of the inbox write.
    assert shared.status("ring")["alarm"] == "-" and alarm_of(shared, npub) is None
    shared.wait_ticks("ring", 2)
    [trigger] = [json.loads(t) for t in (tmp_path / "triggers").read_text().splitlines()]
    assert (trigger["type"], trigger["id"]) == ("alarm", ident)
    assert abs(unix(trigger["due"]) - due) < 0.001 and "missed" not in trigger
    # A driver's retry of the same firing is acknowledged, not applied twice, and logged.
    fire(shared, "ring", ident)
    status = shared.status("ring")
    assert (status["pending"], status["ticks"], status["alarm"]) == ("0", "2", "-")
    [retry] = dropped(shared, "ring")
    assert retry["id"] == ident and retry["dropped"].startswith("duplicate")
    # A stale id (cancelled, replaced, never set) is dropped, with an `alarm` line in the log.
    ctl(shared, "ring", "alarm 2h")
    _due, replaced = alarm_of(shared, npub) or (0.0, "")
    ctl(shared, "ring", "alarm 3h")
    current = alarm_of(shared, npub)
    assert current is not None and serial(current[1]) == serial(replaced) + 1
    other_setting = f"{current[1].rpartition('.')[0]}.{serial(replaced)}"  # same time
    for stale in (replaced, other_setting, "alarm:1000", "alarm:1000.1"):
        fire(shared, "ring", stale)
        assert shared.status("ring")["pending"] == "0"
        assert dropped(shared, "ring")[-1]["id"] == stale
        assert alarm_of(shared, npub) == current  # the agent's alarm stays as it was
    assert shared.status("ring")["ticks"] == "2"
    assert len((tmp_path / "triggers").read_text().splitlines()) == 1


def test_two_drivers_firing_one_alarm_make_one_tick_and_a_dropped_line(shared: Mount,
                                                                        tmp_path: Path) -> None:
    """As when two timer drivers watch one mount: both write the alarm, at once."""
    program = script(tmp_path, "twice.sh", READ_TRIGGER + """
printf '%s\\n' "$trigger" >> "$1/triggers"
""")
    shared.new_agent("twice", program, str(tmp_path))
    shared.created("twice")
    ctl(shared, "twice", "alarm at 2020-01-01T00:00:00Z")  # due already
    npub = os.readlink(shared.agent("twice"))
    _due, ident = alarm_of(shared, npub) or (0.0, "")
    fire(shared, "twice", ident)
    fire(shared, "twice", ident)
    # Once both writes are in, nothing is pending: whatever ticks will run have run.
    wait_until(lambda: (s := shared.status("twice"))["pending"] == "0" and s["ticks"] == "2",
               what="the alarm's tick")
    ticks = [r for r in shared.log("twice") if r["event"] == "tick"]
    assert [r["trigger"]["type"] for r in ticks].count("alarm") == 1
    assert [json.loads(t)["id"] for t in (tmp_path / "triggers").read_text().splitlines()] == \
        [ident]
    [line] = dropped(shared, "twice")
    assert line["id"] == ident and line["dropped"].startswith("duplicate") and \
        TIME.match(line["time"])


def test_an_alarm_wakes_a_dormant_agent(shared: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "types.sh", """
read -r trigger
printf '%s\\n' "$trigger" | jq -r .type >> "$1/types"
""")
    npub = shared.new_agent("sleeper")
    ctl(shared, "sleeper", "idle 0")
    ctl(shared, "sleeper", f"program {program} {tmp_path}")
    wait_until(lambda: (s := shared.status("sleeper"))["status"] == "dormant" and
               s["ticks"] == "2", what="sleeper to hibernate")
    ctl(shared, "sleeper", "alarm 1h")
    _due, ident = alarm_of(shared, npub) or (0.0, "")
    fire(shared, "sleeper", ident)
    assert shared.status("sleeper")["status"] == "active"
    wait_until(lambda: (s := shared.status("sleeper"))["status"] == "dormant" and
               s["ticks"] == "5", what="sleeper to hibernate again")
    assert (tmp_path / "types").read_text().split() == \
        ["create", "sleep", "wake", "alarm", "sleep"]


def test_an_alarm_set_again_for_a_time_that_fired_fires_again(shared: Mount) -> None:
    npub = shared.new_agent("again")  # no program: what fires stays in its inbox to be read
    ctl(shared, "again", "alarm at 2030-01-01T00:00:00Z")
    _due, first = alarm_of(shared, npub) or (0.0, "")
    fire(shared, "again", first)
    ctl(shared, "again", "alarm at 2030-01-01T00:00:00Z")
    _due, second = alarm_of(shared, npub) or (0.0, "")
    # Another setting, another id: its firing is no retry of the first.
    assert second != first and serial(second) == serial(first) + 1
    fire(shared, "again", second)
    assert [m["id"] for m in shared.inbox("again")] == [first, second]
    assert alarm_of(shared, npub) is None and dropped(shared, "again") == []


def test_a_periodic_alarm_fired_late_fires_once_and_moves_past_now(shared: Mount) -> None:
    npub = shared.new_agent("every")  # no program: what fires stays in its inbox to be read
    ctl(shared, "every", "alarm every 1s")
    due, ident = alarm_of(shared, npub) or (0.0, "")
    # As after downtime: the firing comes more than two periods late.
    wait_until(lambda: time.time() > due + 2.5, 10, "the alarm to be overdue")
    fire(shared, "every", ident)
    fired_at = time.time()
    [message] = shared.inbox("every")
    assert (message["type"], message["id"]) == ("alarm", ident)
    missed = message["missed"]
    assert isinstance(missed, int) and missed >= 2
    assert abs(unix(message["due"]) - due) < 0.001
    # One firing for all the missed periods; the next is the first one after now.
    following, next_id = alarm_of(shared, npub) or (0.0, "")
    assert following == pytest.approx(due + missed + 1, abs=0.002)
    assert serial(next_id) == serial(ident)  # the same setting, moved on
    assert following > fired_at - 1  # after the time of the firing (its commit was before now)
    assert shared.status("every")["alarm"].endswith(" every 1s")
    # The old id again: a retry, not applied twice.
    fire(shared, "every", ident)
    assert len(shared.inbox("every")) == 1
    # Fired on time (here: early), the next firing says nothing missed.
    fire(shared, "every", next_id)
    latest = shared.inbox("every")[-1]
    assert latest["id"] == next_id and "missed" not in latest
    assert (alarm_of(shared, npub) or (0.0, ""))[0] == pytest.approx(following + 1, abs=0.002)


# -- bad input -----------------------------------------------------------------------------------


BAD = [
    "alarm", "alarm 0x", "alarm at yesterday", "alarm every 0.5s", "alarm at 2026-13-01T00:00:00Z",
    "alarm at 2026-02-30T00:00:00Z", "alarm at 2026-12-01 08:00:00", "alarm at", "alarm every",
    "alarm every 0", "alarm -5s", "alarm 5 s", "alarm cancel now", "alarm soon", "alarm 101y",
    "alarm every 36501d", "alarm at 2026-12-01T08:00:00", "token short", "token",
    "token two words here-and-there", "token " + "x" * 257, "token caf\u00e9-caf\u00e9-caf\u00e9-x",
    "idle", "idle -1s", "idle 1x", "idle 5m 3", "idle nan", "idle 36501d",
    "idle 0\nalarm 0x",  # all or nothing: the good line is not applied either
]


def test_bad_alarm_token_and_idle_lines_are_refused(shared: Mount) -> None:
    npub = shared.new_agent("picky")
    agent = shared.agent("picky")
    for line in ("alarm every 1h", f"token {SECRET}", "idle 5m"):
        ctl(shared, "picky", line)
    before = (shared.status("picky"), alarm_of(shared, npub), (shared.mp / "tokens").read_text(),
              len(shared.log("picky")))
    for line in BAD:
        assert errno_of(partial(write_once, agent / "ctl", line + "\n")) == errno.EINVAL, line
        refused = shared.log("picky")[-1]
        assert (refused["event"], refused["op"], refused["errno"]) == \
            ("refused", "write ctl", "EINVAL"), line
        assert refused["error"], line
    after = (shared.status("picky"), alarm_of(shared, npub), (shared.mp / "tokens").read_text(),
             len(shared.log("picky")) - len(BAD))
    assert after == before
    assert SECRET not in (agent / "log").read_text()


def test_an_alarm_before_1970_is_refused(mount: Mount) -> None:
    mount.new_agent("old")
    ctl_file = mount.agent("old") / "ctl"
    for line in ("alarm at 1969-12-31T23:59:59Z", "alarm at 0001-01-01T00:00:00+01:00"):
        assert errno_of(partial(write_once, ctl_file, line + "\n")) == errno.EINVAL
    assert mount.status("old")["alarm"] == "-"


# -- tokens --------------------------------------------------------------------------------------


def test_a_token_is_kept_as_its_hash_only(shared: Mount) -> None:
    npub = shared.new_agent("door")
    other = shared.new_agent("gate")
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    ctl(shared, "door", f"token {SECRET}")
    ctl(shared, "gate", "token another-secret-0123456789")
    assert shared.status("door")["token"] == "set"
    lines = (shared.mp / "tokens").read_text().splitlines()
    assert f"{npub} door {digest}" in lines
    assert f"{other} gate {hashlib.sha256(b'another-secret-0123456789').hexdigest()}" in lines
    assert commands(shared, "door") == ["token set"]
    # Nowhere in the tree (ctl, log, tokens...) nor in the daemon's log is the token itself.
    found = sh(f"grep -r -l -F {SECRET} {shared.mp} {shared.store.path}/daemon.log", check=False)
    assert found.returncode == 1, found.stdout + found.stderr
    ctl(shared, "door", "token none")
    assert shared.status("door")["token"] == "-"
    assert not [line for line in (shared.mp / "tokens").read_text().splitlines()
                if line.startswith(npub)]
    assert commands(shared, "door") == ["token set", "token none"]


def test_a_tick_cannot_set_a_token_or_read_tokens(shared: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "sneak.sh", READ_TRIGGER + """
try() { if "$@" 2>/dev/null; then echo ok; else echo refused; fi; }
try sh -c 'echo "token sneaky-token-0123456789" > "$AGENT_DIR/ctl"' > "$1/token"
try cat "$2/tokens" > "$1/tokens"
echo "$(try sh -c 'echo "alarm at 2031-01-01T00:00:00Z" > "$AGENT_DIR/ctl"')" > "$1/alarm"
echo "$(try sh -c 'echo "idle 7m" > "$AGENT_DIR/ctl"')" > "$1/idle"
""")
    npub = shared.new_agent("sneak", program, str(tmp_path), str(shared.mp))
    ctl(shared, "sneak", f"token {SECRET}")  # a token to steal
    write_once(shared.agent("sneak") / "inbox", "go\n")
    shared.wait_ticks("sneak", 2)
    results = {name: (tmp_path / name).read_text().strip()
               for name in ("token", "tokens", "alarm", "idle")}
    assert results == {"token": "refused", "tokens": "refused", "alarm": "ok", "idle": "ok"}
    status = shared.status("sneak")
    # Its own alarm and idle time it may set: they took effect with the tick's commit.
    assert (status["token"], status["alarm"], status["idle"]) == \
        ("set", "2031-01-01T00:00:00.000Z", "7m")
    assert alarm_of(shared, npub) == (1924992000.0, "alarm:1924992000000.1")
    assert f"{npub} sneak {hashlib.sha256(SECRET.encode()).hexdigest()}" in \
        (shared.mp / "tokens").read_text().splitlines()
    [refused] = [r for r in shared.log("sneak") if r["event"] == "refused" and
                 r["op"] == "write ctl"]
    assert refused["errno"] == "EINVAL" and "token" in refused["error"]
    [read] = [r for r in shared.log("sneak") if r["event"] == "refused" and "tokens" in r["error"]]
    assert read["errno"] == "EACCES"
