"""Ticks: one program run per trigger, committed atomically on exit 0, rolled back otherwise."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest
from conftest import (
    AGENT_PYTHON,
    READ_TRIGGER,
    Mount,
    errno_of,
    pid_alive,
    processes_of,
    release_fifo,
    script,
    sh,
    wait_until,
    write_once,
)

SENDER = "npub1sender0000000000000000000000000000000000000000000000000000"


def make_fifo(directory: Path, name: str = "gate") -> Path:
    fifo = directory / name
    os.mkfifo(fifo)
    return fifo


def tick_records(mount: Mount, name: str, result: str | None = None) -> list[dict[str, object]]:
    """The agent's tick records for queued triggers (not lifecycle ones), with `result`."""
    return [r for r in mount.log(name)
            if r["event"] == "tick" and (result is None or r["result"] == result)
            and not r["trigger"].get("lifecycle")]


# -- commit ------------------------------------------------------------------------------------


def test_tick_commits_state_reply_and_consumption(mount: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "reply.sh", READ_TRIGGER + """
printf '%s' "$trigger" > "$AGENT_DIR/state/trigger"
mkdir -p "$AGENT_DIR/state/dir" && echo nested > "$AGENT_DIR/state/dir/f"
echo "reply to $(printf '%s' "$trigger" | jq -r .data)"
echo
echo '{"type":"note","data":{"n":1}}'
echo "to the log" >&2
""")
    npub = mount.new_agent("alice", program)
    agent = mount.agent("alice")
    assert mount.created("alice")["ticks"] == "1"
    message = {"type": "text", "data": "ping", "from": SENDER, "id": "m-1"}
    sh(f"echo '{json.dumps(message)}' > {agent}/inbox")
    status = mount.wait_ticks("alice", 2)
    # Awake until its idle time (30s) has passed with nothing to do.
    assert (status["pending"], status["status"]) == ("0", "active")
    assert status["last"].endswith(" ok")
    trigger = json.loads((agent / "state/trigger").read_text())
    assert {k: trigger[k] for k in message} == message
    assert trigger["seq"] == 1
    assert (agent / "state/dir/f").read_text() == "nested\n"
    assert (agent / "inbox").read_text() == ""
    replies = mount.outbox("alice")
    assert [(r["type"], r["data"]) for r in replies] == [("text", "reply to ping"),
                                                        ("note", {"n": 1})]
    for reply in replies:
        assert reply["to"] == SENDER and reply["in_reply_to"] == "m-1"
        assert reply["from"] == npub and reply["id"] and reply["time"]
    assert len({r["id"] for r in replies}) == 2
    [record] = tick_records(mount, "alice")
    assert record["result"] == "ok" and record["tick"] == 2
    assert record["trigger"] == {"id": "m-1", "seq": 1, "type": "text"}
    assert "to the log" in str(record["stderr"])
    usage = dict(line.split(" ", 1) for line in (agent / "budget").read_text().splitlines())
    stored = len((agent / "state/trigger").read_bytes()) + len("nested\n")
    journals = (agent / "outbox").stat().st_size + (agent / "log").stat().st_size
    assert usage["used_storage_bytes"] == str(stored + journals)  # the journals count too
    assert usage["used_daily_compute"] != "0s"
    # jq picks the reply out of outbox as a user would.
    assert sh(f"jq -c 'select(.in_reply_to == \"m-1\") | .data' {agent}/outbox").stdout \
        .splitlines() == ['"reply to ping"', '{"n":1}']


def test_tick_environment_and_stdin(mount: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "env.sh", """
cat > "$AGENT_DIR/state/stdin"
printf '%s' "$AGENT" > "$AGENT_DIR/state/AGENT"
printf '%s' "$AGENT_NAME" > "$AGENT_DIR/state/AGENT_NAME"
printf '%s' "$AGENT_DIR" > "$AGENT_DIR/state/AGENT_DIR"
""")
    npub = mount.new_agent("alice", program)
    agent = mount.agent("alice")
    # The first tick is the agent's create trigger, which it hears as any other.
    mount.wait_ticks("alice", 1)
    assert json.loads((agent / "state/stdin").read_text()) == \
        {"type": "create", "lifecycle": True, "status": "creating", "attempt": 1}
    message = {"type": "task", "data": {"list": [1, "two"]}, "from": SENDER, "extra": "kept"}
    write_once(agent / "inbox", json.dumps(message) + "\n")
    mount.wait_ticks("alice", 2)
    stdin = (agent / "state/stdin").read_text()
    assert stdin.endswith("\n") and stdin.count("\n") == 1
    trigger = json.loads(stdin)
    assert {k: trigger[k] for k in message} == message
    assert set(trigger) == {*message, "id", "seq", "time", "attempt"}
    assert trigger["attempt"] == 1
    assert (agent / "state/AGENT").read_text() == npub
    assert (agent / "state/AGENT_NAME").read_text() == "alice"
    assert (agent / "state/AGENT_DIR").read_text() == f"{mount.mp.resolve()}/.tick/{npub}"


def test_wake_via_ctl(mount: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "save.sh",
                     'cat >> "$AGENT_DIR/state/triggers"\n')
    mount.new_agent("alice", program)
    agent = mount.agent("alice")
    sh(f"echo 'wake hello there' > {agent}/ctl")
    mount.wait_ticks("alice", 2)
    sh(f"echo wake > {agent}/ctl")
    mount.wait_ticks("alice", 3)
    create, *triggers = [json.loads(line)
                         for line in (agent / "state/triggers").read_text().splitlines()]
    # The create trigger runs first, before the wake queued while the agent was creating.
    assert (create["type"], create["lifecycle"]) == ("create", True)
    assert [(t["type"], t["data"]) for t in triggers] == [("wake", "hello there"), ("wake", "")]
    assert [t["seq"] for t in triggers] == [1, 2]
    assert all(t["id"] and t["time"] and "lifecycle" not in t for t in triggers)


def test_no_program_keeps_triggers_pending_until_one_is_set(mount: Mount, tmp_path: Path) -> None:
    mount.new_agent("alice")
    agent = mount.agent("alice")
    sh(f"printf 'one\\ntwo\\n' > {agent}/inbox; echo 'wake three' > {agent}/ctl; "
       f"echo four >> {agent}/inbox")
    status = mount.status("alice")
    assert (status["pending"], status["ticks"], status["program"], status["status"]) == \
        ("4", "0", "-", "creating")
    assert [m["data"] for m in mount.inbox("alice")] == ["one", "two", "three", "four"]
    assert tick_records(mount, "alice") == []
    program = script(tmp_path, "seq.sh", READ_TRIGGER + """
printf '%s\\n' "$trigger" | jq -r .data >> "$AGENT_DIR/state/seen"
""")
    write_once(agent / "ctl", f"program {program}\n")
    mount.wait_ticks("alice", 5)  # its create, then the four
    assert (agent / "state/seen").read_text().split() == ["one", "two", "three", "four"]
    assert mount.status("alice")["pending"] == "0"


# -- atomicity ---------------------------------------------------------------------------------


def test_uncommitted_writes_are_visible_only_to_the_tick(mount: Mount, tmp_path: Path) -> None:
    gate = make_fifo(tmp_path)
    program = script(tmp_path, "slow.sh", READ_TRIGGER + """
echo v1 > "$AGENT_DIR/state/k"
echo '{"type":"text","data":"early"}' >> "$AGENT_DIR/outbox"
{ cat "$AGENT_DIR/state/k"; ls "$AGENT_DIR/state"; cat "$AGENT_DIR/outbox"; } > "$1/seen"
touch "$1/started"
read -r go < "$2"
echo done
""")
    npub = mount.new_agent("alice", program, str(tmp_path), str(gate))
    agent = mount.agent("alice")
    mount.created("alice")
    write_once(agent / "inbox", "go\n")
    wait_until(lambda: (tmp_path / "started").exists(), 15, "the tick to start")
    seen = (tmp_path / "seen").read_text().splitlines()
    assert seen[:2] == ["v1", "k"] and '"data":"early"' in seen[2]
    # Nobody else sees the tick's writes while it runs.
    assert os.listdir(agent / "state") == []
    assert errno_of(lambda: (agent / "state/k").read_bytes()) == errno.ENOENT
    assert (agent / "outbox").read_text() == ""
    assert mount.status("alice")["status"] == "active"
    assert mount.status("alice")["pending"] == "1"
    # Nor through the tick's own directory.
    tick_dir = mount.mp / ".tick" / npub
    assert errno_of(lambda: os.listdir(tick_dir)) == errno.EACCES
    assert errno_of(lambda: (tick_dir / "state/k").read_bytes()) == errno.EACCES
    release_fifo(gate)
    mount.wait_ticks("alice", 2)
    assert (agent / "state/k").read_text() == "v1\n"
    assert [m["data"] for m in mount.outbox("alice")] == ["early", "done"]


@pytest.mark.parametrize("failure", ["exit", "signal"])
def test_failed_tick_rolls_back(mount: Mount, tmp_path: Path, failure: str) -> None:
    end = "exit 3" if failure == "exit" else "kill -9 $$"
    program = script(tmp_path, "fail.sh", READ_TRIGGER + f"""
echo changed > "$AGENT_DIR/state/k"
echo new > "$AGENT_DIR/state/new"
echo 'a reply that must not be sent'
echo "something broke" >&2
{end}
""")
    mount.new_agent("alice", program)
    agent = mount.agent("alice")
    mount.created("alice")
    sh(f"echo orig > {agent}/state/k")
    write_once(agent / "inbox", '{"id":"t-1","data":"x"}\n')
    [record] = wait_until(lambda: tick_records(mount, "alice", "error"), 15, "a failed tick")
    expected = "exit status 3" if failure == "exit" else "killed by signal 9"
    assert record["error"] == expected
    assert "something broke" in str(record["stderr"])
    assert record["trigger"] == {"id": "t-1", "seq": 1, "type": "text"}
    assert (agent / "state/k").read_text() == "orig\n"
    assert not (agent / "state/new").exists()
    assert (agent / "outbox").read_text() == ""
    assert [m["id"] for m in mount.inbox("alice")] == ["t-1"]
    status = mount.status("alice")
    assert (status["ticks"], status["pending"]) == ("1", "1")  # the create tick, and t-1
    assert f"error: {expected}" in status["last"]
    # The trigger is still there for the next tick: a fixed program consumes it, once.
    fixed = script(tmp_path, "fixed.sh", 'read -r t; echo "$t" > "$AGENT_DIR/state/k"\n')
    write_once(agent / "ctl", f"program {fixed}\n")
    mount.wait_ticks("alice", 2)
    assert json.loads((agent / "state/k").read_text())["id"] == "t-1"
    assert (agent / "inbox").read_text() == ""
    assert len(tick_records(mount, "alice", "ok")) == 1


@pytest.mark.parametrize("exit_status", [0, 1])
def test_tick_ctl_and_inbox_writes_commit_with_the_tick(mount: Mount, tmp_path: Path,
                                                         exit_status: int) -> None:
    program = script(tmp_path, "chain.sh", READ_TRIGGER + f"""
printf '%s\\n' "$trigger" >> "$1/triggers"
case "$trigger" in
*'"data":"first"'*)
    echo "name renamed" > "$AGENT_DIR/ctl"
    echo "second" > "$AGENT_DIR/inbox"
    echo "wake third" > "$AGENT_DIR/ctl"
    exit {exit_status};;
esac
""")
    npub = mount.new_agent("alice", program, str(tmp_path))
    write_once(mount.agent("alice") / "inbox", "first\n")
    if exit_status == 0:
        mount.wait_ticks(npub, 4)  # its create, then the three
        assert os.readlink(mount.mp / "renamed") == npub
        assert not os.path.lexists(mount.mp / "alice")
        triggers = [json.loads(t) for t in (tmp_path / "triggers").read_text().splitlines()]
        assert [(t["type"], t["data"]) for t in triggers] == \
            [("text", "first"), ("text", "second"), ("wake", "third")]
        assert mount.status("renamed")["pending"] == "0"
    else:
        wait_until(lambda: tick_records(mount, "alice", "error"), 15, "the failed tick")
        write_once(mount.agent("alice") / "ctl", "sleep\n")
        assert os.readlink(mount.mp / "alice") == npub
        assert not os.path.lexists(mount.mp / "renamed")
        assert [m["data"] for m in mount.inbox("alice")] == ["first"]


def test_timeout_kills_the_process_group_and_rolls_back(mount: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "hang.sh", READ_TRIGGER + """
echo partial > "$AGENT_DIR/state/k"
sleep 30 &
echo "$$ $!" >> "$1/pids"
sleep 30
""")
    mount.new_agent("alice", program, str(tmp_path))
    agent = mount.agent("alice")
    write_once(agent / "budget", "max_tick_duration 1s\n")
    write_once(agent / "inbox", "hang\n")
    [record] = wait_until(lambda: tick_records(mount, "alice", "error"), 20, "the time limit")
    write_once(agent / "ctl", "sleep\n")  # no retries while we look
    assert record["error"] == "killed after 1s (max_tick_duration)"
    assert len((tmp_path / "pids").read_text().split()) == 2
    wait_until(lambda: not processes_of(mount.uid("alice")), 10,
               "the program and its background child to be gone")
    assert not (agent / "state/k").exists()
    assert (agent / "outbox").read_text() == ""
    assert mount.status("alice")["pending"] == "1"
    assert 1.0 <= float(str(record["duration"])) < 20


def test_unmount_during_a_tick_kills_it_and_keeps_the_trigger(mount: Mount,
                                                               tmp_path: Path) -> None:
    program = script(tmp_path, "once.sh", READ_TRIGGER + """
echo "$$" >> "$1/pids"
echo run > "$AGENT_DIR/state/k"
if [ ! -e "$1/ran" ]; then touch "$1/ran"; sleep 30; fi
""")
    mount.new_agent("alice", program, str(tmp_path))
    write_once(mount.agent("alice") / "inbox", "once\n")
    wait_until(lambda: (tmp_path / "ran").exists(), 15, "the tick to start")
    uid = mount.uid("alice")
    assert processes_of(uid)
    daemon = mount.pid
    sh(f"fusermount3 -u {mount.mp}")
    wait_until(lambda: not pid_alive(daemon), 10, "the daemon to exit")
    wait_until(lambda: not processes_of(uid), 10, "the tick's program to be killed")
    mount.start()
    mount.wait_ticks("alice", 2)
    assert (mount.agent("alice") / "state/k").read_text() == "run\n"
    assert len((tmp_path / "pids").read_text().split()) == 2
    assert len(tick_records(mount, "alice", "ok")) == 1
    assert mount.status("alice")["pending"] == "0"


# -- isolation ---------------------------------------------------------------------------------


PROBE = """
import errno, json, os, sys
mp, other = sys.argv[1], sys.argv[2]
own = os.environ["AGENT_DIR"]
tick_dir = os.path.join(mp, ".tick", other)


def attempt(name, call):
    try:
        call()
        result = "ok"
    except OSError as e:
        result = errno.errorcode[e.errno]
    with open(os.path.join(own, "state", name), "w") as f:
        f.write(result)


def write(path):
    with open(path, "w") as f:
        f.write("intruder")


if json.loads(sys.stdin.read()).get("lifecycle"):
    sys.exit(0)
attempt("read_state", lambda: open(os.path.join(mp, other, "state", "secret")).read())
attempt("write_state", lambda: write(os.path.join(mp, other, "state", "planted")))
attempt("list_state", lambda: os.listdir(os.path.join(mp, other, "state")))
attempt("read_by_name", lambda: open(os.path.join(mp, "bob", "state", "secret")).read())
attempt("write_inbox", lambda: write(os.path.join(mp, other, "inbox")))
attempt("read_ctl", lambda: open(os.path.join(mp, other, "ctl")).read())
attempt("read_tick_state", lambda: open(os.path.join(tick_dir, "state", "secret")).read())
attempt("write_tick_state", lambda: write(os.path.join(tick_dir, "state", "planted")))
attempt("list_tick_dir", lambda: os.listdir(tick_dir))
attempt("write_own_dir", lambda: write(os.path.join(own, "state", "mine")))
"""


def test_a_tick_cannot_touch_another_agent(mount: Mount, tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    bob = mount.new_agent("bob")
    sh(f"echo s3cret > {mount.mp}/bob/state/secret")
    mount.new_agent("alice", AGENT_PYTHON, str(probe), str(mount.mp), bob)
    write_once(mount.agent("alice") / "inbox", "probe\n")
    mount.wait_ticks("alice", 2)
    state = mount.agent("alice") / "state"
    results = {name: (state / name).read_text() for name in os.listdir(state)}
    assert results.pop("mine") == "intruder"
    assert results.pop("write_own_dir") == "ok"
    assert results == dict.fromkeys(
        ["read_state", "write_state", "list_state", "read_by_name", "write_inbox", "read_ctl",
         "read_tick_state", "write_tick_state", "list_tick_dir"], "EACCES")
    assert os.listdir(mount.agent("bob") / "state") == ["secret"]
    assert mount.status("bob")["pending"] == "0"
    # The kernel refused these (the tree's owners and modes, checked by default_permissions):
    # the daemon never heard of them, so alice's log has nothing to say.


def test_a_tick_cannot_escape_isolation_with_setsid(mount: Mount, tmp_path: Path) -> None:
    # setsid(2) leaves the tick's session; a double fork also leaves its process tree.
    program = script(tmp_path, "escape.sh", READ_TRIGGER + """
setsid cat "$2/bob/state/secret" > "$1/stolen" 2>&1
setsid sh -c 'echo planted > "$1/bob/state/planted"' sh "$2" 2>/dev/null
( setsid sh -c 'cat "$2/bob/state/secret" > "$1/orphan" 2>&1
    echo done >> "$1/orphan"' sh "$1" "$2" & )
# else the tick's end kills it before it tries
while ! grep -q done "$1/orphan" 2>/dev/null; do :; done
""")
    mount.new_agent("bob")
    sh(f"echo s3cret > {mount.mp}/bob/state/secret")
    mount.new_agent("alice", program, str(tmp_path), str(mount.mp))
    write_once(mount.agent("alice") / "inbox", "escape\n")
    mount.wait_ticks("alice", 2)
    orphan = tmp_path / "orphan"
    wait_until(lambda: orphan.exists() and "done" in orphan.read_text())
    assert os.listdir(mount.agent("bob") / "state") == ["secret"]
    assert "s3cret" not in (tmp_path / "stolen").read_text()
    assert "Permission denied" in orphan.read_text()


def test_outsiders_cannot_enter_tick_dirs(mount: Mount) -> None:
    npub = mount.new_agent("alice")
    tick_dir = mount.mp / ".tick" / npub
    assert errno_of(lambda: os.listdir(tick_dir)) == errno.EACCES
    assert errno_of(lambda: os.stat(tick_dir / "state")) == errno.EACCES
    assert errno_of(lambda: write_once(tick_dir / "inbox", "x\n")) == errno.EACCES
    done = sh(f"cat {tick_dir}/ctl", check=False)
    assert done.returncode != 0 and "Permission denied" in done.stderr
    assert mount.status("alice")["pending"] == "0"


# -- concurrency -------------------------------------------------------------------------------


def test_outside_state_write_waits_for_the_running_tick(mount: Mount, tmp_path: Path) -> None:
    gate = make_fifo(tmp_path)
    program = script(tmp_path, "append.sh", READ_TRIGGER + """
echo tick >> "$AGENT_DIR/state/k"
touch "$1/started"
read -r go < "$2"
""")
    mount.new_agent("alice", program, str(tmp_path), str(gate))
    agent = mount.agent("alice")
    sh(f"echo base > {agent}/state/k")
    write_once(agent / "inbox", "go\n")
    wait_until(lambda: (tmp_path / "started").exists(), 15, "the tick to start")
    outside = threading.Thread(target=sh, args=(f"echo outside >> {agent}/state/k",))
    outside.start()
    try:
        assert outside.is_alive()
        release_fifo(gate)
        mount.wait_ticks("alice", 2)
    finally:
        outside.join(30)
    assert not outside.is_alive()
    # Serialised: the outside append came after the tick's commit, not lost under it.
    assert (agent / "state/k").read_text() == "base\ntick\noutside\n"


def test_one_agent_ticks_one_at_a_time_in_order(mount: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "serial.sh", READ_TRIGGER + """
mkdir "$1/running" 2>/dev/null || echo "overlap" >> "$1/overlaps"
printf '%s\\n' "$trigger" | jq -r .seq >> "$AGENT_DIR/state/order"
rmdir "$1/running"
""")
    mount.new_agent("alice", program, str(tmp_path))
    write_once(mount.agent("alice") / "inbox", "".join(f"m{i}\n" for i in range(8)))
    mount.wait_ticks("alice", 9)
    assert (mount.agent("alice") / "state/order").read_text().split() == \
        [str(i) for i in range(1, 9)]
    assert not (tmp_path / "overlaps").exists()


def test_many_agents_tick_in_parallel(mount: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "barrier.sh", READ_TRIGGER + """
echo "$AGENT_NAME" > "$AGENT_DIR/state/done"
touch "$1/started.$AGENT_NAME"
while [ ! -e "$1/go" ]; do sleep 0.01; done
echo "reply from $AGENT_NAME"
""")
    names = [f"agent{i}" for i in range(12)]
    for name in names:
        mount.new_agent(name, program, str(tmp_path))
    for name in names:
        write_once(mount.agent(name) / "inbox", f"hello {name}\n")
    # At least four ticks (the smallest pool) run at once: each waits for the others to start.
    wait_until(lambda: len(list(tmp_path.glob("started.*"))) >= 4, 20, "four ticks at once")
    (tmp_path / "go").touch()
    for name in names:
        mount.wait_ticks(name, 2, timeout=30)
    for name in names:
        assert (mount.agent(name) / "state/done").read_text() == f"{name}\n"
        assert [m["data"] for m in mount.outbox(name)] == [f"reply from {name}"]
        assert mount.status(name)["pending"] == "0"


def test_processes_a_tick_leaves_behind_are_killed(mount: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "leave.sh", READ_TRIGGER + """
( setsid sh -c 'echo $$ > "$1/pid"; exec sleep 1000' sh "$1" & )
while [ ! -s "$1/pid" ]; do :; done
""")
    mount.new_agent("alice", program, str(tmp_path))
    write_once(mount.agent("alice") / "inbox", "go\n")
    mount.wait_ticks("alice", 2)
    assert (tmp_path / "pid").read_text().strip()
    wait_until(lambda: not processes_of(mount.uid("alice")), timeout=10)


def test_a_checkpoint_while_another_process_of_the_tick_writes(mount: Mount,
                                                                tmp_path: Path) -> None:
    # The commit of a checkpoint runs beside the tick: writes that land meanwhile are not
    # lost, nor committed twice, and nothing fails.
    program = script(tmp_path, "busy.sh", READ_TRIGGER + """
d="$AGENT_DIR/state"
( i=0; while [ $i -lt 300 ]; do echo "$i" > "$d/w$i"; i=$((i+1)); done ) &
j=0; while [ $j -lt 20 ]; do echo checkpoint > "$AGENT_DIR/ctl" || exit 3; j=$((j+1)); done
wait
""")
    mount.new_agent("busy", program)
    mount.created("busy")
    write_once(mount.agent("busy") / "inbox", "go\n")
    status = mount.wait_ticks("busy", 2, timeout=60)
    assert status["last"].endswith(" ok")
    state = mount.agent("busy") / "state"
    assert len(os.listdir(state)) == 300
    assert all((state / f"w{i}").read_text() == f"{i}\n" for i in range(300))
    usage = dict(line.split(" ", 1) for line in (mount.agent("busy") / "budget").read_text()
                 .splitlines() if line.startswith("used_storage_bytes"))
    assert usage  # the stored bytes are counted once
    journals = sum((mount.agent("busy") / j).stat().st_size for j in ("outbox", "log"))
    assert int(usage["used_storage_bytes"].split()[0]) == sum(
        len(f"{i}\n") for i in range(300)) + journals


def test_refusals_in_a_loop_leave_a_bounded_log(mount: Mount, tmp_path: Path) -> None:
    # 10,000 refused writes: the log takes a burst of them, then says how many more it left
    # out.  (Bad ctl verbs: the kernel itself refuses what the modes forbid, unlogged.)
    program = script(tmp_path, "refuse.sh", READ_TRIGGER + """
exec 2>/dev/null
i=0
while [ $i -lt 10000 ]; do echo no-such-verb > "$AGENT_DIR/ctl"; i=$((i+1)); done
""")
    mount.new_agent("noisy", program)
    mount.created("noisy")
    write_once(mount.agent("noisy") / "inbox", "go\n")
    assert mount.wait_ticks("noisy", 2, timeout=60)["last"].endswith(" ok")

    def all_counted() -> list[dict[str, object]] | None:
        refused = [r for r in mount.log("noisy") if r["event"] == "refused"]
        counted = sum(int(str(r.get("suppressed", 1))) for r in refused)
        assert counted <= 10000
        return refused if counted == 10000 else None

    refused = wait_until(all_counted, 15, "every refusal logged or counted")
    assert all(r["op"] == "write ctl" and r["errno"] == "EINVAL" for r in refused)
    one_by_one = [r for r in refused if "suppressed" not in r]
    reports = [r for r in refused if "suppressed" in r]
    assert len(one_by_one) == 32  # the burst; then the records are reports of counts
    assert reports and len(refused) < 100, len(refused)


def test_a_refusal_quotes_at_most_512_characters(mount: Mount) -> None:
    mount.new_agent("alice")
    agent = mount.agent("alice")
    assert errno_of(lambda: write_once(agent / "ctl", "x" * 100_000 + "\n")) == errno.EINVAL
    [record] = [r for r in mount.log("alice") if r["event"] == "refused"]
    error = str(record["error"])
    assert error.startswith("ctl: unknown command 'xxx") and error.endswith("\u2026")
    assert len(error) == 512
