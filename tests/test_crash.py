"""kill -9 the daemon during inbox writes and ticks: nothing acknowledged is lost or done twice."""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

from conftest import READ_TRIGGER, InboxWriter, Mount, MountFactory, json_lines, wait_until

PROGRAM = "#!/bin/sh\n" + READ_TRIGGER + """
id=$(printf '%s\\n' "$trigger" | jq -r .id)
echo "$id" > "$AGENT_DIR/state/a/$id"
echo "$id" > "$AGENT_DIR/state/b/$id"
echo "done $id"
"""


def check_consistent(mount: Mount, acked: set[str], attempted: set[str]) -> set[str]:
    """Every acknowledged message consumed exactly once, no partial tick; returns the done ids."""
    agent = mount.agent("crash")
    done_a = set(os.listdir(agent / "state/a"))
    done_b = set(os.listdir(agent / "state/b"))
    assert done_a == done_b, f"partial ticks: {done_a ^ done_b}"
    assert acked <= done_a, f"acknowledged but lost: {sorted(acked - done_a)[:10]}"
    assert done_a <= attempted
    for ident in done_a:
        assert (agent / "state/a" / ident).read_text() == f"{ident}\n"
    replies = Counter(m["in_reply_to"] for m in json_lines(agent / "outbox"))
    assert set(replies) == done_a and set(replies.values()) == {1}
    ticks = [r for r in json_lines(agent / "log") if r["event"] == "tick" and r["result"] == "ok"]
    # The create trigger ran once, before the first crash; no other lifecycle trigger did.
    assert [r["trigger"]["type"] for r in ticks if r["trigger"].get("lifecycle")] == ["create"]
    ok = Counter(r["trigger"]["id"] for r in ticks if not r["trigger"].get("lifecycle"))
    assert set(ok) == done_a and set(ok.values()) == {1}
    assert mount.status("crash")["ticks"] == str(len(done_a) + 1)
    return done_a


def test_kill_9_during_writes_and_ticks(mount: Mount, tmp_path: Path) -> None:
    crash_rounds(mount, tmp_path)


def test_kill_9_with_durability_daemon(make_mount: MountFactory, tmp_path: Path) -> None:
    # Commits reach the file at once but the disk only within 0.1 s: the daemon's death
    # loses nothing acknowledged all the same (the kernel holds what it wrote).
    mount = make_mount("daemon", args=("-o", "durability=daemon"))
    assert "durability daemon" in (mount.mp / "status").read_text().splitlines()
    crash_rounds(mount, tmp_path)


def crash_rounds(mount: Mount, tmp_path: Path) -> None:
    program = tmp_path / "program.sh"
    program.write_text(PROGRAM)
    program.chmod(0o755)
    mount.new_agent("crash", str(program))
    assert mount.created("crash")["status"] == "active"
    agent = mount.agent("crash")
    os.mkdir(agent / "state/a")
    os.mkdir(agent / "state/b")
    rng = random.Random()
    acked: set[str] = set()
    attempted: set[str] = set()
    for round_number in range(3):
        writer = InboxWriter(agent / "inbox", f"r{round_number}", 200)
        kill_at = rng.randint(10, 150)
        writer.start()

        def enough(w: InboxWriter = writer, k: int = kill_at) -> bool:
            return len(w.acked) >= k or not w.is_alive()

        wait_until(enough, 30, "enough acknowledged writes")
        mount.kill()
        writer.join(30)
        assert not writer.is_alive()
        assert len(writer.acked) >= min(kill_at, 200)
        acked.update(writer.acked)
        attempted.update(writer.attempted)
        mount.restart()
        wait_until(lambda: mount.status("crash")["pending"] == "0", 60, "the queue to drain")
        done = check_consistent(mount, acked, attempted)
        assert len(done) >= len(acked)
    assert len(acked) >= 30
