"""Budgets, retries, checkpoints and idempotent delivery, through the mounted tree."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from conftest import READ_TRIGGER, Mount, errno_of, script, wait_until, write_once


def budget(mount: Mount, name: str) -> dict[str, str]:
    text = (mount.agent(name) / "budget").read_text()
    return dict(line.split(" ", 1) for line in text.splitlines())


def refusals(mount: Mount, name: str) -> list[dict[str, object]]:
    return [r for r in mount.log(name) if r["event"] == "refused"]


def journals(mount: Mount, name: str) -> int:
    """The bytes of the agent's outbox and log: they count in its storage."""
    agent = mount.agent(name)
    return (agent / "outbox").stat().st_size + (agent / "log").stat().st_size


def leave_room(mount: Mount, name: str, room: int) -> None:
    """Set max_storage_bytes to leave `room` bytes free, once the log has the record of
    the setting (the log counts in the storage it limits)."""
    for _attempt in range(4):
        usage = budget(mount, name)
        used = int(usage["used_storage_bytes"])
        if int(usage["max_storage_bytes"]) - used == room:
            return
        # The next record is as long as the last one, a setting of as many digits.
        last = (mount.agent(name) / "log").read_bytes().splitlines(keepends=True)[-1]
        write_once(mount.agent(name) / "budget", f"max_storage_bytes {used + room + len(last)}\n")
    raise AssertionError(f"could not leave {room} bytes free: {budget(mount, name)}")


def test_storage_quota_refuses_growth_and_keeps_nothing_partial(mount: Mount) -> None:
    mount.new_agent("alice")
    state = mount.agent("alice") / "state"
    write_once(mount.agent("alice") / "budget", "warning_threshold 1\n")  # no warning records
    leave_room(mount, "alice", 1000)
    (state / "a").write_bytes(b"x" * 600)
    assert errno_of(lambda: (state / "b").write_bytes(b"y" * 600)) == errno.EDQUOT
    appending = os.O_WRONLY | os.O_APPEND
    assert errno_of(lambda: write_once(state / "a", b"z" * 500, appending)) == errno.EDQUOT
    assert (state / "a").read_bytes() == b"x" * 600
    assert (state / "b").read_bytes() == b""  # created, but its write was refused whole
    # The journals count: the two refusals' records took some of the room.
    assert int(budget(mount, "alice")["used_storage_bytes"]) == 600 + journals(mount, "alice")
    assert [r["errno"] for r in refusals(mount, "alice")] == ["EDQUOT", "EDQUOT"]
    # Shrinking is always allowed, and frees room: all of it but a byte can be taken again.
    (state / "a").write_bytes(b"x" * 100)
    usage = budget(mount, "alice")
    free = int(usage["max_storage_bytes"]) - int(usage["used_storage_bytes"])
    assert free > 400
    (state / "b").write_bytes(b"y" * (free - 1))
    usage = budget(mount, "alice")
    assert int(usage["used_storage_bytes"]) == int(usage["max_storage_bytes"]) - 1 == \
        100 + free - 1 + journals(mount, "alice")


def test_storage_quota_inside_a_tick(mount: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "big.sh", READ_TRIGGER + """
printf 'small' > "$AGENT_DIR/state/small"
if head -c 5000 /dev/zero > "$AGENT_DIR/state/big"; then echo wrote > "$1/result"
else echo refused > "$1/result"; fi
""")
    mount.new_agent("alice", program, str(tmp_path))
    mount.created("alice")
    leave_room(mount, "alice", 2000)
    write_once(mount.agent("alice") / "inbox", "go\n")
    mount.wait_ticks("alice", 2)
    assert (tmp_path / "result").read_text() == "refused\n"
    assert (mount.agent("alice") / "state" / "small").read_text() == "small"
    assert int(budget(mount, "alice")["used_storage_bytes"]) == 5 + journals(mount, "alice")


def flood(line: int, mib: int) -> str:
    """A program that writes `mib` MiB of `line`-byte messages to its outbox with dd, which
    stops at the first refused write; lines divide a block, so no partial line is left."""
    data = "x" * (line - len('{"type":"flood","data":""}\n'))
    return READ_TRIGGER + f"""
case "$trigger" in *'"type":"budget"'*) exit 0 ;; esac
yes '{{"type":"flood","data":"{data}"}}' | \\
    dd of="$AGENT_DIR/outbox" bs=64k count={16 * mib} iflag=fullblock 2> "$1/dd.err"
echo $? > "$1/status"
"""


def test_a_tick_flooding_its_outbox_is_refused_at_its_storage(mount: Mount,
                                                               tmp_path: Path) -> None:
    # 64 MiB of messages against a limit of 1 MB: what the tick sends counts in its storage
    # as it writes, so the daemon holds no more than the limit for it.
    mount.new_agent("flood", script(tmp_path, "flood.sh", flood(64, 64)), str(tmp_path))
    mount.created("flood")
    write_once(mount.agent("flood") / "budget", "max_storage_bytes 1MB\n")
    before = mount.rss()
    write_once(mount.agent("flood") / "inbox", "go\n")
    mount.wait_ticks("flood", 3)  # go, then the budget trigger of the storage warning
    grown = mount.rss() - before
    assert (tmp_path / "status").read_text() != "0\n"
    assert "Disk quota exceeded" in (tmp_path / "dd.err").read_text()
    [refused] = refusals(mount, "flood")  # dd stops at the first refusal
    assert refused["op"] == "write outbox" and refused["errno"] == "EDQUOT"
    assert "max_storage_bytes 1000000" in str(refused["error"])
    sent = (mount.agent("flood") / "outbox").stat().st_size
    assert 500_000 < sent <= 1_000_000
    # What is committed is counted: the outbox and the log with the state.
    assert int(budget(mount, "flood")["used_storage_bytes"]) == journals(mount, "flood")
    # The messages held until the commit, then the pages of the store the commit touched.
    assert grown < 8_000_000, f"the daemon grew by {grown} bytes"


def test_a_tick_may_hold_only_so_much_of_messages(mount: Mount, tmp_path: Path) -> None:
    # Storage to spare, but the daemon holds at most 16 MiB of messages for one tick.
    mount.new_agent("flood", script(tmp_path, "flood.sh", flood(4096, 256)),
                    str(tmp_path))
    mount.created("flood")
    write_once(mount.agent("flood") / "budget", "max_storage_bytes 1GB\n")
    before = mount.rss()
    write_once(mount.agent("flood") / "inbox", "go\n")
    mount.wait_ticks("flood", 2)
    grown = mount.rss() - before
    assert "Disk quota exceeded" in (tmp_path / "dd.err").read_text()
    [refused] = refusals(mount, "flood")
    assert refused["errno"] == "EDQUOT"
    assert "16777216 bytes of messages a tick may hold" in str(refused["error"])
    assert 15 << 20 < (mount.agent("flood") / "outbox").stat().st_size <= 16 << 20
    # The 16 MiB held, then as much again of the commit's buffers and the store's pages.
    assert grown < 64 << 20, f"the daemon grew by {grown} bytes"


def test_partial_lines_count_in_what_a_tick_may_hold(mount: Mount, tmp_path: Path) -> None:
    # Seven files open on the outbox, each given 3 MB of a line it does not end: the sixth
    # passes the 16 MiB, and the seventh has no room at all.
    program = script(tmp_path, "partial.sh", READ_TRIGGER + """
o="$AGENT_DIR/outbox"
exec 3>>"$o" 4>>"$o" 5>>"$o" 6>>"$o" 7>>"$o" 8>>"$o" 9>>"$o"
for fd in 3 4 5 6 7 8 9; do
    head -c 3000000 /dev/zero | tr '\\0' x 2>/dev/null >&$fd || echo $fd >> "$1/refused"
done
exit 1
""")
    mount.new_agent("partial", program, str(tmp_path))
    mount.created("partial")
    write_once(mount.agent("partial") / "ctl", "retries 1\n")
    write_once(mount.agent("partial") / "inbox", "go\n")
    wait_until(lambda: mount.status("partial")["status"] == "failed")
    assert (tmp_path / "refused").read_text() == "8\n9\n"
    held = [r for r in refusals(mount, "partial") if r["errno"] == "EDQUOT"]
    assert held and all("a tick may hold" in str(r["error"]) for r in held)
    assert mount.outbox("partial") == []  # it failed: nothing was sent


def test_a_failed_tick_charges_nothing(mount: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "pay.sh", READ_TRIGGER + """
echo "charge api 5" > "$AGENT_DIR/ctl"
echo "spend 3" > "$AGENT_DIR/ctl"
exit 1
""")
    mount.new_agent("alice", program)
    write_once(mount.agent("alice") / "ctl", "retries 1\ngrant spend\n")
    write_once(mount.agent("alice") / "inbox", "go\n")
    status = wait_until(lambda: (s := mount.status("alice"))["status"] == "failed" and s)
    assert status["error"] == "exit status 1"  # the message's tick, not the create
    used = budget(mount, "alice")
    assert (used["used_daily_api_calls"], used["used_daily_spend_sats"]) == ("0", "0")
    # Outside a tick these verbs are refused.
    for verb in ("charge api 1\n", "spend 1\n", "checkpoint\n"):
        assert errno_of(lambda v=verb: write_once(mount.agent("alice") / "ctl", v)) == \
            errno.EINVAL


def test_charges_and_spends_commit_with_the_tick(mount: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "pay.sh", READ_TRIGGER + """
echo "charge api 2" > "$AGENT_DIR/ctl"
echo "spend 7 coffee" > "$AGENT_DIR/ctl"
if echo "charge api 9" > "$AGENT_DIR/ctl"; then echo yes > "$1/over"; else echo no > "$1/over"; fi
""")
    mount.new_agent("alice", program, str(tmp_path))
    write_once(mount.agent("alice") / "ctl", "grant spend\n")  # no agent spends without it
    write_once(mount.agent("alice") / "budget", "max_daily_api_calls 10\nwarning_threshold 1\n")
    write_once(mount.agent("alice") / "inbox", "go\n")
    mount.wait_ticks("alice", 2)
    assert (tmp_path / "over").read_text() == "no\n"  # 2 + 9 > 10: EDQUOT
    used = budget(mount, "alice")
    assert (used["used_daily_api_calls"], used["used_daily_spend_sats"]) == ("2", "7")
    charged = [r for r in mount.log("alice") if r["event"] == "budget" and "charged" in r]
    assert charged[-1]["spends"] == [{"sats": 7, "memo": "coffee"}]


def test_warning_threshold_queues_one_budget_trigger(mount: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "charge.sh", READ_TRIGGER + """
echo "$trigger" >> "$1/triggers"
echo "charge api 3" > "$AGENT_DIR/ctl"
""")
    mount.new_agent("alice", program, str(tmp_path))
    write_once(mount.agent("alice") / "budget", "max_daily_api_calls 100\nwarning_threshold 0.05\n")
    write_once(mount.agent("alice") / "inbox", "one\n")
    # 3 of 100 is under 5%; the second tick crosses it and queues a budget trigger.
    # (The first tick of all is the create trigger, which charges nothing.)
    mount.wait_ticks("alice", 2)
    write_once(mount.agent("alice") / "inbox", "two\n")
    mount.wait_ticks("alice", 4)
    write_once(mount.agent("alice") / "inbox", "three\n")
    mount.wait_ticks("alice", 5)
    triggers = [json.loads(line) for line in (tmp_path / "triggers").read_text().splitlines()]
    kinds = [t["type"] for t in triggers]
    assert kinds == ["text", "text", "budget", "text"]
    warning = next(t for t in triggers if t["type"] == "budget")
    assert warning["resource"] == "api_calls" and warning["limit"] == 100
    warnings = [r for r in mount.log("alice") if r["event"] == "budget" and "warning" in r]
    assert len(warnings) == 1


def test_a_message_id_is_accepted_once(mount: Mount) -> None:
    mount.new_agent("alice")
    inbox = mount.agent("alice") / "inbox"
    message = '{"id":"retry-1","type":"text","data":"hello"}\n'
    assert write_once(inbox, message) == len(message)
    assert write_once(inbox, message) == len(message)  # acknowledged, dropped
    assert [m["id"] for m in mount.inbox("alice")] == ["retry-1"]
    assert mount.status("alice")["pending"] == "1"
    assert errno_of(lambda: write_once(inbox, json.dumps({"id": "x" * 300}) + "\n")) == \
        errno.EINVAL


def test_consumed_ids_are_remembered(mount: Mount) -> None:
    mount.new_agent("alice", "/bin/true")
    inbox = mount.agent("alice") / "inbox"
    assert mount.created("alice")["ticks"] == "1"
    write_once(inbox, '{"id":"once"}\n')
    mount.wait_ticks("alice", 2)
    write_once(inbox, '{"id":"once"}\n')
    assert mount.status("alice")["pending"] == "0"
    assert mount.status("alice")["ticks"] == "2"


def test_checkpoint_survives_a_failure_and_the_retry_resumes(mount: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "steps.sh", READ_TRIGGER + """
t=$trigger
echo "$t" >> "$1/triggers"
case "$t" in
  *'"resume"'*) echo second > "$AGENT_DIR/state/step2"; exit 0 ;;
esac
echo first > "$AGENT_DIR/state/step1"
echo checkpoint > "$AGENT_DIR/ctl"
echo lost > "$AGENT_DIR/state/lost"
exit 3
""")
    mount.new_agent("alice", program, str(tmp_path))
    write_once(mount.agent("alice") / "inbox", "go\n")
    mount.wait_ticks("alice", 2)
    state = mount.agent("alice") / "state"
    assert sorted(p.name for p in state.iterdir()) == ["step1", "step2"]
    first, second = (json.loads(line) for line in (tmp_path / "triggers").read_text().split())
    assert first["attempt"] == 1 and "resume" not in first
    assert second["attempt"] == 2 and second["resume"] == {"checkpoint": 1}
    events = [r["event"] for r in mount.log("alice")]
    assert events.count("checkpoint") == 1


def test_time_limit_sends_sigterm_first(mount: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "slow.sh", READ_TRIGGER + """
case "$trigger" in *'"attempt":1'*) ;; *) exit 0 ;; esac
trap 'echo saved > "$AGENT_DIR/state/saved"; echo checkpoint > "$AGENT_DIR/ctl"; exit 1' TERM
echo started > "$1/started"
while :; do sleep 0.05; done
""")
    mount.new_agent("alice", program, str(tmp_path))
    write_once(mount.agent("alice") / "budget", "max_tick_duration 500ms\n")
    write_once(mount.agent("alice") / "inbox", "go\n")
    mount.wait_ticks("alice", 2)
    assert (mount.agent("alice") / "state" / "saved").read_text() == "saved\n"
    errors = [r for r in mount.log("alice") if r.get("result") == "error"]
    assert errors[0]["error"] == "killed after 500ms (max_tick_duration)"


def test_daily_compute_spent_holds_triggers(mount: Mount) -> None:
    # No program yet, so that its first tick (the create trigger) runs under the limit.
    mount.new_agent("alice")
    write_once(mount.agent("alice") / "budget", "max_daily_compute 1ms\n")
    write_once(mount.agent("alice") / "ctl", "program /bin/sh -c 'read -r t; sleep 0.01'\n")
    mount.wait_ticks("alice", 1)
    write_once(mount.agent("alice") / "inbox", "two\nthree\n")
    wait_until(lambda: any("refused" in r for r in mount.log("alice") if r["event"] == "budget"))
    # Held: the two messages and the budget warning that the first tick's compute raised.
    assert sorted(m["type"] for m in mount.inbox("alice")) == ["budget", "text", "text"]
    assert mount.status("alice")["ticks"] == "1"
    assert "next_reset" in budget(mount, "alice")
    # Raising the limit does not wake it by itself; a new trigger does.
    write_once(mount.agent("alice") / "budget", "max_daily_compute 1h\n")
    write_once(mount.agent("alice") / "ctl", "wake\n")
    mount.wait_ticks("alice", 5)
    refused = [r for r in mount.log("alice") if r["event"] == "budget" and "refused" in r]
    assert len(refused) == 1


def test_retries_setting(mount: Mount) -> None:
    mount.new_agent("alice", "/bin/sh", "-c",
                    """read -r t; case "$t" in *'"lifecycle":true'*) exit 0 ;; esac; exit 1""")
    write_once(mount.agent("alice") / "ctl", "retries 1\n")
    assert mount.status("alice")["retries"] == "1"
    write_once(mount.agent("alice") / "inbox", "x\n")
    wait_until(lambda: mount.status("alice")["status"] == "failed")
    assert len([r for r in mount.log("alice") if r.get("result") == "error"]) == 1
    for bad in ("retries 0\n", "retries x\n", "retries\n"):
        assert errno_of(lambda bad=bad: write_once(mount.agent("alice") / "ctl", bad)) == \
            errno.EINVAL


def test_sleep_and_terminate_written_before_a_checkpoint_hold(mount: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "quit.sh", READ_TRIGGER + """
echo terminate > "$AGENT_DIR/ctl"
echo checkpoint > "$AGENT_DIR/ctl"
echo done > "$AGENT_DIR/state/last"
""")
    mount.new_agent("alice", program)
    write_once(mount.agent("alice") / "inbox", "go\n")
    wait_until(lambda: mount.status("alice")["status"] == "terminated")
    mount.wait_ticks("alice", 3)  # create, go, and the terminate trigger it caused
    assert (mount.agent("alice") / "state" / "last").read_text() == "done\n"
    assert not [r for r in mount.log("alice") if r.get("result") == "error"]


def test_retries_inside_a_tick_refuses_the_whole_write(mount: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "mixed.sh", READ_TRIGGER + """
case "$trigger" in *wake*) exit 0 ;; esac
printf 'wake again\\nretries 5\\n' > "$AGENT_DIR/ctl" || echo refused > "$1/result"
""")
    mount.new_agent("alice", program, str(tmp_path))
    write_once(mount.agent("alice") / "inbox", "go\n")
    mount.wait_ticks("alice", 2)
    assert (tmp_path / "result").read_text() == "refused\n"
    assert mount.status("alice")["pending"] == "0"  # the wake did not take effect either
    assert mount.status("alice")["retries"] == "3"
