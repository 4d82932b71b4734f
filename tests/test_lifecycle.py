"""Lifecycle triggers (agentfs(4) Lifecycle): create, wake, sleep, terminate and error, each run
once, in order, through the real mount; hibernation after the idle time; restarts."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Mount,
    Store,
    errno_of,
    module_mount,
    pid_alive,
    release_fifo,
    script,
    wait_until,
    write_once,
)

from agentfs.store import AgentRecord, AgentStore

# $1: a directory outside the mount.  Each run appends its trigger to $1/triggers first (so
# failed and killed runs show too) and its pid to $1/pids; a trigger whose type has a fifo
# $1/hold.TYPE waits there until the test opens it; one with a file $1/fail.TYPE exits 1.
# Committed runs leave their type in state/heard.
RECORDER = """
read -r trigger
type=$(printf '%s\\n' "$trigger" | jq -r .type)
printf '%s\\n' "$trigger" >> "$1/triggers"
echo $$ >> "$1/pids"
[ -p "$1/hold.$type" ] && read -r _ < "$1/hold.$type"
[ -e "$1/fail.$type" ] && exit 1
echo "$type" >> "$AGENT_DIR/state/heard"
case "$type" in wake) [ -e "$1/checkpoint.wake" ] && echo checkpoint > "$AGENT_DIR/ctl" ;; esac
[ -e "$1/fail.after.$type" ] && exit 1
exit 0
"""


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One mount for the tests that do not restart it: each uses agents of its own."""
    yield from module_mount(tmp_path_factory, "lifecycle")


class Recorder:
    """An agent running RECORDER, with what its runs left outside the mount."""

    def __init__(self, mount: Mount, tmp_path: Path, name: str) -> None:
        self.mount, self.name = mount, name
        self.dir = tmp_path / name
        self.dir.mkdir()
        self.program = script(tmp_path, f"{name}.sh", RECORDER)

    def new(self, with_program: bool = True) -> str:
        if with_program:
            return self.mount.new_agent(self.name, self.program, str(self.dir))
        return self.mount.new_agent(self.name)

    def set_program(self) -> None:
        self.ctl(f"program {self.program} {self.dir}")

    def ctl(self, line: str) -> None:
        write_once(self.mount.agent(self.name) / "ctl", line + "\n")

    def send(self, data: str) -> None:
        write_once(self.mount.agent(self.name) / "inbox", data + "\n")

    def triggers(self) -> list[dict[str, Any]]:
        path = self.dir / "triggers"
        return [json.loads(line) for line in path.read_text().splitlines()] \
            if path.exists() else []

    def runs(self) -> list[str]:
        """The type of every trigger the program was started with, in order."""
        return [t["type"] for t in self.triggers()]

    def heard(self) -> list[str]:
        """The type of every trigger whose tick committed, in order."""
        path = self.mount.agent(self.name) / "state" / "heard"
        return path.read_text().split() if path.exists() else []

    def status(self) -> dict[str, str]:
        return self.mount.status(self.name)

    def wait_status(self, status: str, ticks: int) -> dict[str, str]:
        return wait_until(lambda: (s := self.status())["status"] == status and
                          s["ticks"] == str(ticks) and s, 15, f"{self.name}: {status}, {ticks}")

    def hold(self, kind: str) -> Path:
        fifo = self.dir / f"hold.{kind}"
        os.mkfifo(fifo)
        return fifo

    def wait_held(self, kind: str) -> None:
        wait_until(lambda: self.runs().count(kind) > 0 and self.runs()[-1] == kind, 15,
                   f"{self.name}'s {kind} trigger to start")

    def release(self, kind: str) -> None:
        """Let the run waiting on hold.KIND go on; later runs of KIND do not wait."""
        release_fifo(self.dir / f"hold.{kind}", unlink=True)

    def kill_leftovers(self) -> None:
        path = self.dir / "pids"
        for pid in (map(int, path.read_text().split()) if path.exists() else ()):
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def lifecycle_log(mount: Mount, name: str) -> list[tuple[str, str]]:
    """(trigger type, result) of the agent's lifecycle tick records."""
    return [(r["trigger"]["type"], r["result"]) for r in mount.log(name)
            if r["event"] == "tick" and r["trigger"].get("lifecycle")]


def log_time(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(record["time"]).replace("Z", "+00:00")).timestamp()


def stays(predicate: Any, seconds: float) -> bool:
    """Whether `predicate` holds throughout a bounded wait (for what must NOT happen)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(0.02)
    return bool(predicate())


# -- each transition, once, in order -------------------------------------------------------------


def test_each_transition_runs_its_trigger_once_in_order(shared: Mount, tmp_path: Path) -> None:
    alice = Recorder(shared, tmp_path, "alice")
    alice.new()
    status = alice.wait_status("active", 1)
    assert status["idle"] == "30s" and "error" not in status
    # Outside `sleep`: dormant at once, and its sleep trigger runs.
    alice.ctl("sleep")
    assert alice.status()["status"] == "dormant"
    alice.wait_status("dormant", 2)
    # A message wakes it: its wake trigger runs before the message.
    alice.send("hello")
    assert alice.status()["status"] == "active"
    alice.wait_status("active", 4)
    # Failures in a row make it failed; its error trigger runs once.
    alice.ctl("retries 1")
    (alice.dir / "fail.text").touch()
    alice.send("boom")
    status = alice.wait_status("failed", 5)
    assert status["error"] == "exit status 1" and status["pending"] == "1"
    # recover: active again, no trigger of its own; the failed message is tried again.
    (alice.dir / "fail.text").unlink()
    alice.ctl("recover")
    alice.wait_status("active", 6)
    alice.ctl("terminate")
    assert alice.status()["status"] == "terminated"
    alice.wait_status("terminated", 7)

    assert alice.runs() == ["create", "sleep", "wake", "text", "text", "error", "text",
                            "terminate"]
    assert alice.heard() == ["create", "sleep", "wake", "text", "error", "text", "terminate"]
    hooks = [t for t in alice.triggers() if t.get("lifecycle")]
    assert [(t["type"], t["status"], t["attempt"]) for t in hooks] == [
        ("create", "creating", 1), ("sleep", "dormant", 1), ("wake", "active", 1),
        ("error", "failed", 1), ("terminate", "terminated", 1)]
    assert (hooks[3]["error"], hooks[3]["failures"]) == ("exit status 1", 1)
    # Lifecycle triggers are not queued messages: no id, no seq.
    assert all(set(t) <= {"type", "lifecycle", "status", "attempt", "error", "failures"}
               for t in hooks)
    assert [t["data"] for t in alice.triggers() if not t.get("lifecycle")] == \
        ["hello", "boom", "boom"]
    assert lifecycle_log(shared, "alice") == [
        ("create", "ok"), ("sleep", "ok"), ("wake", "ok"), ("error", "ok"), ("terminate", "ok")]
    # Terminated is final: its files are read-only, and nothing runs any more.
    assert errno_of(lambda: alice.send("late")) == errno.EACCES
    assert errno_of(lambda: alice.ctl("recover")) == errno.EACCES


# -- create --------------------------------------------------------------------------------------


def test_a_failing_create_fails_the_agent_and_keeps_its_triggers(shared: Mount,
                                                                  tmp_path: Path) -> None:
    bob = Recorder(shared, tmp_path, "bob")
    bob.hold("create")
    (bob.dir / "fail.create").touch()
    bob.new()
    bob.wait_held("create")
    bob.send("one")  # queued behind the create trigger
    assert bob.status()["status"] == "creating"
    bob.release("create")
    status = bob.wait_status("failed", 1)  # the create failed; the error trigger committed
    assert status["error"] == "create: exit status 1"
    assert status["pending"] == "1"
    bob.send("two")
    assert bob.status()["pending"] == "2"
    # No retries: neither the create trigger nor anything else runs again.
    assert stays(lambda: bob.runs() == ["create", "error"], 1.5)
    error = bob.triggers()[1]
    assert (error["error"], error["failures"], error["status"]) == \
        ("create: exit status 1", 1, "failed")
    failed = [r for r in shared.log("bob") if r["event"] == "tick" and r["result"] == "error"]
    assert [r["status"] for r in failed] == ["failed: create failed"]
    # recover: the create it never got right runs again, then the queued triggers in order.
    (bob.dir / "fail.create").unlink()
    bob.ctl("recover")
    bob.wait_status("active", 4)
    assert bob.runs() == ["create", "error", "create", "text", "text"]
    assert [t.get("data") for t in bob.triggers()[3:]] == ["one", "two"]
    assert "error" not in bob.status()


def test_an_agent_without_a_program_stays_creating_until_it_has_one(shared: Mount,
                                                                      tmp_path: Path) -> None:
    carol = Recorder(shared, tmp_path, "carol")
    carol.new(with_program=False)
    carol.send("queued")
    for line in ("wake hi", "sleep", "idle 0"):
        carol.ctl(line)
    status = carol.status()
    assert (status["status"], status["ticks"], status["pending"], status["idle"]) == \
        ("creating", "0", "2", "0s")
    assert stays(lambda: carol.status()["status"] == "creating", 0.5)
    carol.set_program()
    # Its create trigger first, then the queued ones; then, idle 0, it hibernates at once.
    carol.wait_status("dormant", 4)
    assert carol.runs() == ["create", "text", "wake", "sleep"]
    assert carol.triggers()[0]["status"] == "creating"
    assert [t.get("data") for t in carol.triggers()[1:3]] == ["queued", "hi"]


def test_terminated_while_creating_stays_terminated(shared: Mount, tmp_path: Path) -> None:
    dave = Recorder(shared, tmp_path, "dave")
    dave.hold("create")
    dave.new()
    dave.wait_held("create")
    dave.ctl("terminate")
    dave.release("create")
    # The create's commit is refused (terminated meanwhile): no error, no failed status; the
    # terminate trigger runs, and is the last.
    dave.wait_status("terminated", 1)
    assert dave.runs() == ["create", "terminate"]
    assert dave.heard() == ["terminate"]
    assert "error" not in dave.status()
    assert lifecycle_log(shared, "dave") == [("create", "error"), ("terminate", "ok")]


# -- sleep and wake ------------------------------------------------------------------------------


def test_idle_zero_hibernates_at_once(shared: Mount, tmp_path: Path) -> None:
    erin = Recorder(shared, tmp_path, "erin")
    erin.new(with_program=False)
    erin.ctl("idle 0")
    erin.set_program()
    erin.wait_status("dormant", 2)
    assert erin.runs() == ["create", "sleep"]
    erin.send("one")
    erin.wait_status("dormant", 5)
    assert erin.runs() == ["create", "sleep", "wake", "text", "sleep"]
    assert erin.status()["pending"] == "0"


def test_a_longer_idle_keeps_the_agent_active(shared: Mount, tmp_path: Path) -> None:
    fay = Recorder(shared, tmp_path, "fay")
    fay.new(with_program=False)
    fay.ctl("idle 1h")
    fay.set_program()
    fay.wait_status("active", 1)
    fay.send("one")
    fay.wait_status("active", 2)
    assert stays(lambda: fay.status()["status"] == "active", 1.0)
    assert fay.runs() == ["create", "text"]
    # A shorter idle time takes effect at once...
    fay.ctl("idle 1500ms")
    assert fay.status()["idle"] == "1.5s"
    fay.wait_status("dormant", 3)
    # ...and is honoured: the sleep came no sooner than 1.5s after the ctl write.
    log = shared.log("fay")
    idle_set = next(r for r in log if r["event"] == "ctl" and r["command"] == "idle 1.5s")
    slept = next(r for r in log if r["event"] == "tick" and r["trigger"]["type"] == "sleep")
    assert log_time(slept) - log_time(idle_set) >= 1.5 - 0.002  # (log times are in ms)
    assert fay.runs() == ["create", "text", "sleep"]


def test_hooks_choose_which_lifecycle_triggers_run_the_program(shared: Mount,
                                                              tmp_path: Path) -> None:
    gil = Recorder(shared, tmp_path, "gil")
    # `hooks` (and `serve`) may follow a root `new` in the same write, as `grant` does.
    write_once(shared.mp / "ctl", f"new gil {gil.program} {gil.dir}\nhooks wake\nidle 0\n")
    status = gil.wait_status("dormant", 0)  # its create and sleep passed without a run
    assert status["hooks"] == "wake" and gil.runs() == []
    gil.send("one")
    gil.wait_status("dormant", 2)  # wake, then the message; its sleep, again no run
    assert gil.runs() == ["wake", "text"]
    assert lifecycle_log(shared, "gil") == [("wake", "ok")]
    commands = [r["command"] for r in shared.log("gil") if r["event"] == "ctl"]
    assert commands[:1] == ["hooks wake"]
    gil.ctl("hooks none")
    gil.send("two")
    gil.wait_status("dormant", 3)
    assert gil.runs() == ["wake", "text", "text"] and gil.status()["hooks"] == "none"
    gil.ctl("hooks all")
    assert gil.status()["hooks"] == "all"


def test_hooks_refuses_what_is_not_a_hook(shared: Mount) -> None:
    shared.new_agent("hooky")
    for bad in ("hooks", "hooks fly", "hooks wake fly", "hooks all none"):
        code = errno_of(lambda bad=bad: write_once(shared.agent("hooky") / "ctl", bad + "\n"))
        assert code == errno.EINVAL, bad
    assert shared.status("hooky")["hooks"] == "all"
    refused = [r["error"] for r in shared.log("hooky") if r["event"] == "refused"]
    assert len(refused) == 4 and "not a hook: 'fly'" in refused[1]


def test_a_failing_sleep_trigger_changes_nothing_but_the_log(shared: Mount,
                                                              tmp_path: Path) -> None:
    gus = Recorder(shared, tmp_path, "gus")
    gus.new()
    gus.wait_status("active", 1)
    (gus.dir / "fail.sleep").touch()
    gus.ctl("sleep")
    wait_until(lambda: lifecycle_log(shared, "gus")[-1] == ("sleep", "error"), 15,
               "the failed sleep trigger")
    # Not retried, not counted as a failure: still dormant, its next tick is attempt 1.
    assert stays(lambda: gus.runs() == ["create", "sleep"], 1.5)
    status = gus.status()
    assert (status["status"], status["ticks"]) == ("dormant", "1")
    assert "error: exit status 1" in status["last"]
    assert gus.heard() == ["create"]
    gus.send("hello")
    gus.wait_status("active", 3)
    assert gus.runs() == ["create", "sleep", "wake", "text"]
    assert [t["attempt"] for t in gus.triggers()[2:]] == [1, 1]


def test_woken_while_its_sleep_trigger_runs_it_hears_wake(shared: Mount, tmp_path: Path) -> None:
    hal = Recorder(shared, tmp_path, "hal")
    hal.new()
    hal.wait_status("active", 1)
    hal.hold("sleep")
    hal.ctl("sleep")
    hal.wait_held("sleep")
    hal.send("hello")  # wakes it while the program is being told it sleeps
    assert hal.status()["status"] == "active"
    hal.release("sleep")
    hal.wait_status("active", 4)
    # Told it slept, so told it woke before the message: never a message while "asleep".
    assert hal.runs() == ["create", "sleep", "wake", "text"]


def test_a_failing_wake_is_retried_and_its_checkpoint_is_its_own(shared: Mount,
                                                                  tmp_path: Path) -> None:
    ivy = Recorder(shared, tmp_path, "ivy")
    ivy.new()
    ivy.wait_status("active", 1)
    ivy.ctl("retries 2")
    ivy.ctl("sleep")
    ivy.wait_status("dormant", 2)
    (ivy.dir / "checkpoint.wake").touch()
    (ivy.dir / "fail.after.wake").touch()
    ivy.send("hello")
    ivy.wait_status("failed", 3)  # sleep, then the error trigger
    assert ivy.runs() == ["create", "sleep", "wake", "wake", "error"]
    first, second, error = ivy.triggers()[2:]
    assert first["attempt"] == 1 and "resume" not in first
    assert second["attempt"] == 2 and second["resume"] == {"checkpoint": 1}
    # The error trigger is not the wake's retry: it resumes nothing.
    assert "resume" not in error and error["failures"] == 2
    assert ivy.status()["pending"] == "1"


# -- restarts ------------------------------------------------------------------------------------


def test_pending_triggers_survive_a_crash(mount: Mount, tmp_path: Path) -> None:
    jan, kim = Recorder(mount, tmp_path, "jan"), Recorder(mount, tmp_path, "kim")
    try:
        # kill -9 while the create trigger runs: it is still pending after the restart.
        jan.hold("create")
        jan.new()
        jan.wait_held("create")
        mount.kill()
        os.unlink(jan.dir / "hold.create")
        mount.restart()
        jan.wait_status("active", 1)
        assert jan.runs() == ["create", "create"]
        # And so while the terminate trigger runs.
        jan.hold("terminate")
        jan.ctl("terminate")
        jan.wait_held("terminate")
        mount.kill()
        os.unlink(jan.dir / "hold.terminate")
        mount.restart()
        jan.wait_status("terminated", 2)
        assert jan.runs() == ["create", "create", "terminate", "terminate"]
        assert jan.heard() == ["create", "terminate"]
        # A dormant agent's sleep trigger too; and a clean restart keeps a dormant agent so.
        kim.new()
        kim.wait_status("active", 1)
        kim.hold("sleep")
        kim.ctl("sleep")
        kim.wait_held("sleep")
        mount.kill()
        os.unlink(kim.dir / "hold.sleep")
        mount.restart()
        kim.wait_status("dormant", 2)
        mount.restart()
        assert stays(lambda: kim.status()["status"] == "dormant", 0.5)
        assert kim.runs() == ["create", "sleep", "sleep"]
    finally:  # the runs the kills left behind, blocked on fifos nobody can open any more
        jan.kill_leftovers()
        kim.kill_leftovers()


def test_a_version_1_store_is_migrated(store: Store, tmp_path: Path) -> None:
    # Version 1 had no lifecycle: an agent made with a program was `creating` with no hook.
    program = script(tmp_path, "old.sh", 'read -r t; echo "$t" >> "$0.seen"\n')
    s = AgentStore.open(store.path)
    try:
        with s.env.begin(write=True) as txn:
            pub = "aa" * 32
            s.add_agent(txn, AgentRecord(s.claim_index(txn), pub, "old", [program], "creating"))
            txn.delete(b"\0\0\0\0", db=s.db["awake"])  # version 1 had no awake index
            txn.put(b"version", b"1", db=s.db["meta"])
    finally:
        s.close()
    (tmp_path / "mnt").mkdir()
    m = Mount(store, tmp_path / "mnt").start()
    try:
        wait_until(lambda: m.status("old")["status"] == "active", 10, "the create to run")
        assert [json.loads(line)["type"] for line in
                Path(program + ".seen").read_text().splitlines()] == ["create"]
    finally:
        m.stop()
