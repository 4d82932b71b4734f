"""Local delivery: what a tick sends to an agent on this mount lands in its inbox at commit."""

from __future__ import annotations

from pathlib import Path

from conftest import READ_TRIGGER, Mount, json_lines, script, wait_until, write_once

# A program that answers every trigger but lifecycle ones on stdout with $1.
ANSWER = """read -r t; case "$t" in *'"lifecycle":true'*) exit 0 ;; esac; echo $1"""


def test_messages_arrive_once_in_order_with_the_commit(mount: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "send.sh", READ_TRIGGER + """
n=$(printf '%s' "$trigger" | sed 's/.*"data":"\\([0-9]*\\)".*/\\1/')
for k in 1 2 3; do
  printf '{"to":"bob","type":"count","data":"%s.%s"}\\n' "$n" "$k" >> "$AGENT_DIR/outbox"
done
[ "$n" = 2 ] && exit 1  # this tick's messages must never arrive
true
""")
    alice = mount.new_agent("alice", program)
    bob = mount.new_agent("bob")  # no program: its triggers stay pending for us to read
    write_once(mount.agent("alice") / "ctl", "retries 1\n")
    for n in (1, 2):
        write_once(mount.agent("alice") / "inbox", f'{{"type":"text","data":"{n}"}}\n')
    mount.wait_ticks("alice", 2)  # its create, then 1
    inbox = mount.inbox("bob")
    assert [m["data"] for m in inbox] == ["1.1", "1.2", "1.3"]
    assert all(m["from"] == alice and m["type"] == "count" for m in inbox)
    assert [m["seq"] for m in inbox] == [1, 2, 3]
    sent = mount.outbox("alice")
    assert [m["id"] for m in sent] == [m["id"] for m in inbox]
    assert all(m["to"] == "bob" for m in sent)
    assert mount.status("bob")["pending"] == "3"
    assert bob != alice


def test_replies_reach_a_local_sender_and_wake_it(mount: Mount, tmp_path: Path) -> None:
    # bob answers every message on stdout; alice records what she hears and stays quiet.
    # She hibernates as soon as she has nothing to do, so the reply has to wake her.
    heard = tmp_path / "heard"
    alice = mount.new_agent("alice", "/bin/sh", "-c", f"cat >> {heard}")
    write_once(mount.agent("alice") / "ctl", "idle 0\n")
    mount.new_agent("bob", "/bin/sh", "-c", ANSWER, "sh", "pong")
    wait_until(lambda: mount.status("alice")["status"] == "dormant", what="alice to sleep")
    write_once(mount.agent("bob") / "inbox", f'{{"from":"{alice}","data":"ping"}}\n')
    mount.wait_ticks("bob", 2)
    # create, sleep, then the wake that the reply caused, the reply, and sleep again.
    mount.wait_ticks("alice", 5)
    assert [m["type"] for m in json_lines(heard)] == ["create", "sleep", "wake", "text", "sleep"]
    assert json_lines(heard)[3]["data"] == "pong"
    assert mount.outbox("bob")[0]["to"] == alice


def test_undeliverable_messages_stay_in_the_outbox(mount: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "send.sh", READ_TRIGGER + """
echo '{"to":"carol","data":"to a terminated agent"}' >> "$AGENT_DIR/outbox"
echo '{"to":"nobody-here","data":"for the plumber"}' >> "$AGENT_DIR/outbox"
""")
    mount.new_agent("alice", program)
    mount.new_agent("carol")
    write_once(mount.agent("carol") / "ctl", "terminate\n")
    write_once(mount.agent("alice") / "inbox", "go\n")
    mount.wait_ticks("alice", 2)
    assert mount.status("carol")["pending"] == "0"
    assert [m["to"] for m in mount.outbox("alice")] == ["carol", "nobody-here"]
    undelivered = [r for r in mount.log("alice") if r["event"] == "undelivered"]
    assert [r["to"] for r in undelivered] == ["carol", "nobody-here"]
    assert "terminated" in undelivered[0]["error"]
    assert undelivered[1]["error"].startswith("plumb: ")  # no rules route it


def test_two_agents_that_answer_everything_stop_at_the_hop_limit(mount: Mount) -> None:
    alice = mount.new_agent("alice", "/bin/sh", "-c", ANSWER, "sh", "ping")
    bob = mount.new_agent("bob", "/bin/sh", "-c", ANSWER, "sh", "pong")
    for name in ("alice", "bob"):  # so that they settle, dormant, once the exchange ends
        write_once(mount.agent(name) / "ctl", "idle 0\n")
    write_once(mount.agent("bob") / "inbox", f'{{"from":"{alice}","data":"start"}}\n')
    wait_until(lambda: any(r["event"] == "undelivered" for r in
                           mount.log("alice") + mount.log("bob")))
    wait_until(lambda: mount.status("alice")["pending"] == mount.status("bob")["pending"] == "0")
    wait_until(lambda: mount.status("alice")["status"] == mount.status("bob")["status"]
               == "dormant")
    sent = mount.outbox("alice") + mount.outbox("bob")
    assert max(m["hops"] for m in sent) == 17 and len(sent) == 17
    assert bob != alice
