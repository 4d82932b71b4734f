"""kill -9 the daemon while ticks checkpoint: nothing acknowledged is lost, nothing is half done.

The program does three steps per trigger with a checkpoint after each of the first two, and
on a retry reads `resume` from its trigger to skip the steps already checkpointed.
"""

from __future__ import annotations

import json
import os
import random
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from conftest import READ_TRIGGER, InboxWriter, Mount, json_lines, processes_of, wait_until

STEPS = """#!/bin/sh
# $1: a directory outside the mount, for what the test wants to know about the runs.
""" + READ_TRIGGER + """set -- "$1" $(printf '%s\\n' "$trigger" |
  jq -r '"\\(.id) \\(.resume.checkpoint // 0) \\(.attempt)"')
id=$2 resumed=$3
steps="$AGENT_DIR/state/steps"
echo "$id $resumed $4" >> "$1/runs"
# A resumed trigger finds the steps it checkpointed in the state it sees (if the mount still
# answers: a run the kill cut short sees nothing at all).
step=1
while [ "$step" -le "$resumed" ]; do
  if [ ! -f "$steps/$id.$step" ] && [ -d "$steps" ]; then
    echo "$id resumes at $resumed without step $step" >> "$1/violations"
  fi
  step=$((step + 1))
done
# After checkpoint N, if the test asks for it in $1/pause: say so, and wait there for the kill.
pause() {
  [ -e "$1/pause" ] && read -r at < "$1/pause" && [ "$at" = "$2" ] || return 0
  echo "$id $2" > "$1/paused.tmp" && mv "$1/paused.tmp" "$1/paused"
  while [ -e "$1/pause" ]; do sleep 0.01; done
}
if [ "$resumed" -lt 1 ]; then
  echo "$id" > "$steps/$id.1" || exit 1
  echo checkpoint > "$AGENT_DIR/ctl" || exit 1
  pause "$1" 1
fi
if [ "$resumed" -lt 2 ]; then
  echo "$id" > "$steps/$id.2" || exit 1
  echo checkpoint > "$AGENT_DIR/ctl" || exit 1
  pause "$1" 2
fi
echo "$id" > "$steps/$id.3" || exit 1
echo "done $id"
"""


def script(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text(body)
    path.chmod(0o755)
    return path


def committed_ticks(mount: Mount, name: str) -> int:
    return int(mount.status(name)["ticks"])


def acknowledged(writer: InboxWriter, count: int, or_done: bool = False) -> Callable[[], bool]:
    return lambda: len(writer.acked) >= count or (or_done and not writer.is_alive())


def ticked(mount: Mount, target: int) -> Callable[[], bool]:
    """`target` ticks committed, or nothing left to run."""
    return lambda: committed_ticks(mount, "steps") >= target or \
        mount.status("steps")["pending"] == "0"


def check_invariants(mount: Mount, acked: set[str], attempted: set[str]) -> set[str]:
    """After draining: every acked id done once, whole; nothing for an id never written."""
    agent = mount.agent("steps")
    files = os.listdir(agent / "state/steps")
    by_step = {n: {f.rsplit(".", 1)[0] for f in files if f.endswith(f".{n}")} for n in (1, 2, 3)}
    assert len(files) == sum(len(ids) for ids in by_step.values()), files
    done = by_step[3]
    # No partial tick: a later step never without the earlier ones.
    assert by_step[2] <= by_step[1], f"step 2 without step 1: {by_step[2] - by_step[1]}"
    assert by_step[3] <= by_step[2], f"step 3 without step 2: {by_step[3] - by_step[2]}"
    # Drained, so every trigger that got in ran to the end.
    assert by_step[1] == done, f"begun but never finished: {sorted(by_step[1] - done)}"
    assert acked <= done, f"acknowledged but lost: {sorted(acked - done)[:10]}"
    # attempted = acked + at most one write per round cut short by the kill (it may have been
    # committed without its acknowledgement reaching the writer).
    assert done <= attempted, f"done but never written: {sorted(done - attempted)[:10]}"
    for ident in done:
        for n in (1, 2, 3):
            assert (agent / "state/steps" / f"{ident}.{n}").read_text() == f"{ident}\n"
    replies = Counter(m["in_reply_to"] for m in json_lines(agent / "outbox"))
    assert set(replies) == done, f"replies vs done: {set(replies) ^ done}"
    assert set(replies.values()) <= {1}, [i for i, n in replies.items() if n > 1]
    for message in json_lines(agent / "outbox"):
        assert message["data"] == f"done {message['in_reply_to']}"
    ticks = [r for r in json_lines(agent / "log") if r["event"] == "tick"]
    # The create trigger ran once, before the first crash; no other lifecycle trigger did.
    assert [r["trigger"]["type"] for r in ticks if r["trigger"].get("lifecycle")] == ["create"]
    ok = Counter(r["trigger"]["id"] for r in ticks
                 if r["result"] == "ok" and not r["trigger"].get("lifecycle"))
    assert set(ok) == done and set(ok.values()) <= {1}, ok
    assert mount.status("steps")["ticks"] == str(len(done) + 1)
    return done


def test_kill_9_while_ticks_checkpoint(mount: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "steps.sh", STEPS)
    mount.new_agent("steps", str(program), str(tmp_path))
    assert mount.created("steps")["status"] == "active"
    agent = mount.agent("steps")
    os.mkdir(agent / "state/steps")
    rng = random.Random()
    acked: set[str] = set()
    attempted: set[str] = set()
    expected_resumes: list[str] = []
    for round_number, mode in enumerate(["writes", "checkpoint", "writes", "checkpoint",
                                         "checkpoint"]):
        writer = InboxWriter(agent / "inbox", f"r{round_number}", rng.randint(10, 30), "job")
        writer.start()
        if mode == "checkpoint":
            # Kill while a tick waits right after its checkpoint 1 or 2 (committed, the rest
            # not): the retry must resume there.
            kill_at = rng.randint(0, writer.count // 2)
            wait_until(acknowledged(writer, kill_at), 30, "acknowledged writes")
            step = rng.choice((1, 2))
            (tmp_path / "pause").write_text(f"{step}\n")
            paused = wait_until(lambda: (tmp_path / "paused").exists() and
                                (tmp_path / "paused").read_text().split(), 30, "a pause")
            expected_resumes.append(f"{paused[0]} {step}")
            assert paused[1] == str(step)
            steps_dir = agent / "state/steps"
            assert (steps_dir / f"{paused[0]}.{step}").read_text() == f"{paused[0]}\n"
            assert not (steps_dir / f"{paused[0]}.3").exists()
            mount.kill()
            (tmp_path / "pause").unlink()  # the orphaned program goes on, to find no mount
            (tmp_path / "paused").unlink()
        else:
            # Kill after a random number of acknowledged writes, then of committed ticks.
            kill_at = rng.randint(1, writer.count)
            wait_until(acknowledged(writer, kill_at, or_done=True), 30, "acknowledged writes")
            target = committed_ticks(mount, "steps") + rng.randint(0, 4)
            wait_until(ticked(mount, target), 30, "some ticks")
            mount.kill()
        writer.join(30)
        assert not writer.is_alive()
        acked.update(writer.acked)
        attempted.update(writer.attempted)
        mount.restart()
        wait_until(lambda: mount.status("steps")["pending"] == "0", 60, "the queue to drain")
        done = check_invariants(mount, acked, attempted)
        assert len(done) >= len(acked)
    runs = (tmp_path / "runs").read_text().splitlines()
    assert not (tmp_path / "violations").exists(), (tmp_path / "violations").read_text()
    # Crashes record no failure: every run was a first attempt (the program never fails).
    assert {line.split()[2] for line in runs} == {"1"}
    assert len(acked) >= 5
    # Each trigger killed after its checkpoint N was re-run resuming at N, not from scratch.
    resumed = {" ".join(line.split()[:2]) for line in runs if line.split()[1] != "0"}
    assert set(expected_resumes) <= resumed, (expected_resumes, resumed)


BLOCKING = """#!/bin/sh
# $1: a directory outside the mount; $1/fifo blocks the first run until the test opens it.
""" + READ_TRIGGER + """t=$trigger
echo "$t" >> "$1/triggers"
case "$t" in
  *'"resume"'*) ;;
  *)
    echo one > "$AGENT_DIR/state/one" || exit 1
    echo checkpoint > "$AGENT_DIR/ctl" || exit 1
    echo $$ > "$1/blocked.pid"
    read -r _ < "$1/fifo"
    # Left behind by the killed daemon: may it still write into the agent?
    if echo lost > "$AGENT_DIR/state/lost" 2>/dev/null; then r=wrote; else r=refused; fi
    echo "$r" > "$1/orphan.tmp" && mv "$1/orphan.tmp" "$1/orphan"
    exit 0
    ;;
esac
echo two > "$AGENT_DIR/state/two"
echo finished
"""


def test_kill_9_while_a_tick_waits_after_its_checkpoint(mount: Mount, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    program = script(tmp_path, "blocking.sh", BLOCKING)
    mount.new_agent("alice", str(program), str(tmp_path))
    assert mount.created("alice")["ticks"] == "1"
    agent = mount.agent("alice")
    message = '{"id":"job-1","type":"job"}\n'
    assert os.write(fd := os.open(agent / "inbox", os.O_WRONLY), message.encode()) == \
        len(message)
    os.close(fd)
    blocked = wait_until(lambda: (tmp_path / "blocked.pid").exists() and
                         (tmp_path / "blocked.pid").read_text().strip(), 15, "the checkpoint")
    assert int(blocked) > 0
    uid = mount.uid("alice")
    try:
        # The checkpoint is committed: visible from outside the tick, and in the log.
        assert (agent / "state/one").read_text() == "one\n"
        assert [r["count"] for r in mount.log("alice") if r["event"] == "checkpoint"] == [1]
        assert mount.status("alice")["ticks"] == "1"  # its create
        assert processes_of(uid)  # still blocked on the fifo: the tick is in flight
        mount.kill()
        # The sandbox's PID namespace ends with the daemon: nothing of the tick outlives it.
        wait_until(lambda: not processes_of(uid), 10, "the tick's processes to die")
        mount.restart()
        status = mount.wait_ticks("alice", 2)
        assert status["pending"] == "0" and status["status"] == "active"
        first, second = (json.loads(line)
                         for line in (tmp_path / "triggers").read_text().splitlines())
        assert first["id"] == second["id"] == "job-1"
        assert first["attempt"] == 1 and "resume" not in first
        # Re-run from the checkpoint; a crash is no recorded failure, so still attempt 1.
        assert second["attempt"] == 1 and second["resume"] == {"checkpoint": 1}
        state = agent / "state"
        assert sorted(p.name for p in state.iterdir()) == ["one", "two"]
        assert (state / "one").read_text() == "one\n" and (state / "two").read_text() == "two\n"
        replies = mount.outbox("alice")
        assert [(m["data"], m["in_reply_to"]) for m in replies] == [("finished", "job-1")]
        log = mount.log("alice")
        ticks = [r for r in log if r["event"] == "tick"]
        assert [(r["result"], r["trigger"].get("id")) for r in ticks] == \
            [("ok", None), ("ok", "job-1")]
        assert ticks[0]["trigger"] == {"type": "create", "lifecycle": True}
        assert [r["count"] for r in log if r["event"] == "checkpoint"] == [1]
        assert "error" not in mount.status("alice")["last"]
    finally:
        for pid in processes_of(uid):
            os.kill(pid, signal.SIGKILL)
