"""Served programs (`serve on`): one long-lived program per awake agent serves many ticks,
each still a transaction of its own, through the real mount with the sandbox on."""

from __future__ import annotations

from pathlib import Path

from conftest import (
    AGENT_PYTHON,
    Mount,
    script,
    sh,
    wait_until,
    write_once,
)

# The example of agentfs(4), SERVED PROGRAMS, with what the tests ask of it: it counts its
# triggers in state/count and notes its pid in state/pids; `fail`, `die` and `hang` misbehave
# at a trigger's first attempt; `late` probes the mount and the proxy after its tick ended.
SERVED_PY = r"""
import json, os, sys, time, urllib.error, urllib.request
state = os.path.join(os.environ["AGENT_DIR"], "state")
late = proxy_late = "-"

def proxy_status():  # through HTTP_PROXY, to a host no grant names
    try:
        urllib.request.urlopen("http://example.invalid/", timeout=10)
        return "200"
    except urllib.error.HTTPError as e:
        return str(e.code)

for line in sys.stdin:
    trigger = json.loads(line)
    data, first = trigger.get("data"), trigger.get("attempt") == 1
    if not trigger.get("lifecycle"):
        path = os.path.join(state, "count")
        n = int(open(path).read()) if os.path.exists(path) else 0
        open(path, "w").write(str(n + 1))
        open(os.path.join(state, "pids"), "a").write(f"{os.getpid()}\n")
        open(os.path.join(state, "late"), "w").write(late)
        open(os.path.join(state, "proxy_late"), "w").write(proxy_late)
        if data == "next":
            open(os.path.join(state, "proxy_now"), "w").write(proxy_status())
        if first and data == "fail":
            print(json.dumps({"tick": "failed", "error": "asked to"}), flush=True)
            continue
        if first and data == "die":
            os._exit(3)
        if first and data == "hang":
            time.sleep(1000)
        print(f"got {data}")
    print(json.dumps({"tick": "done"}), flush=True)
    if data == "late":  # the tick is over: the mount must refuse this process now
        for _ in range(10000):
            try:
                open(os.path.join(state, "count")).read()
            except OSError as e:
                late = type(e).__name__
                break
        proxy_late = proxy_status()
"""

SERVED_SH = """
while read -r trigger; do
    case $trigger in *'"lifecycle":true'*) echo '{"tick":"done"}'; continue ;; esac
    n=$(cat "$AGENT_DIR/state/count" 2>/dev/null || echo 0)
    echo $((n + 1)) > "$AGENT_DIR/state/count"
    echo "count $((n + 1))"
    echo '{"tick":"done"}'
done
"""


def served_agent(mount: Mount, tmp_path: Path, name: str = "alice") -> Path:
    program = tmp_path / "served.py"
    program.write_text(SERVED_PY)
    mount.new_agent(name, AGENT_PYTHON, str(program))
    mount.created(name)
    sh(f"echo serve on > {mount.agent(name)}/ctl")
    assert mount.status(name)["serve"] == "on"
    return mount.agent(name)


def send(mount: Mount, name: str, text: str, ticks: int) -> None:
    write_once(mount.agent(name) / "inbox", text + "\n")
    mount.wait_ticks(name, ticks)


def pids(agent: Path) -> list[str]:
    return (agent / "state/pids").read_text().split()


def test_one_program_serves_many_ticks(mount: Mount, tmp_path: Path) -> None:
    agent = served_agent(mount, tmp_path)
    for n in range(1, 6):
        send(mount, "alice", f"m{n}", n + 1)  # tick 1 was create's
    assert (agent / "state/count").read_text() == "5"
    assert len(set(pids(agent))) == 1, pids(agent)  # one program for all five
    replies = [m.get("data") for m in mount.outbox("alice")]
    assert replies == [f"got m{n}" for n in range(1, 6)], mount.outbox("alice")
    # Between ticks it lives on, as the agent's uid, alone.
    assert len(mount.processes_of("alice")) == 1
    records = [r for r in mount.log("alice") if r.get("event") == "tick"]
    assert [r["result"] for r in records] == ["ok"] * 6


def test_failed_rolls_back_and_the_program_stays(mount: Mount, tmp_path: Path) -> None:
    agent = served_agent(mount, tmp_path)
    send(mount, "alice", "fail", 2)  # attempt 1 says failed, attempt 2 done
    assert (agent / "state/count").read_text() == "1"  # attempt 1's write rolled back
    assert len(pids(agent)) == 1 and len(set(pids(agent))) == 1
    errors = [r for r in mount.log("alice") if r.get("result") == "error"]
    assert [e["error"] for e in errors] == ["the program said failed: asked to"]
    assert [m["data"] for m in mount.outbox("alice")] == ["got fail"]


def test_a_program_that_dies_is_rolled_back_and_started_again(mount: Mount,
                                                              tmp_path: Path) -> None:
    agent = served_agent(mount, tmp_path)
    send(mount, "alice", "one", 2)
    first = pids(agent)
    send(mount, "alice", "die", 3)  # exits 3 mid-tick; the retry runs in a new program
    assert (agent / "state/count").read_text() == "2"
    assert pids(agent)[:1] == first and len(set(pids(agent))) == 2
    errors = [r["error"] for r in mount.log("alice") if r.get("result") == "error"]
    assert errors == ["the served program ended (exit status 3) before the tick did"]


def test_the_time_limit_kills_and_rolls_back(mount: Mount, tmp_path: Path) -> None:
    agent = served_agent(mount, tmp_path)
    sh(f"echo max_tick_duration 1s > {agent}/budget")
    send(mount, "alice", "hang", 2)
    assert (agent / "state/count").read_text() == "1"
    errors = [r["error"] for r in mount.log("alice") if r.get("result") == "error"]
    assert errors == ["killed after 1s (max_tick_duration)"]
    assert len(mount.processes_of("alice")) == 1  # the new one only


def test_between_ticks_the_mount_refuses_it(mount: Mount, tmp_path: Path) -> None:
    agent = served_agent(mount, tmp_path)
    send(mount, "alice", "late", 2)
    send(mount, "alice", "next", 3)  # it reports what its probe after `late` met
    assert (agent / "state/late").read_text() == "PermissionError"
    # The proxy: 403 for a host it holds no grant for within a tick, 407 (no live token)
    # between ticks.
    assert (agent / "state/proxy_now").read_text() == "403"
    assert (agent / "state/proxy_late").read_text() == "407"
    assert len(set(pids(agent))) == 1


def test_hibernation_ends_the_program_and_a_wake_starts_it(mount: Mount,
                                                           tmp_path: Path) -> None:
    agent = served_agent(mount, tmp_path)
    send(mount, "alice", "one", 2)
    sh(f"echo sleep > {agent}/ctl")
    wait_until(lambda: mount.status("alice")["status"] == "dormant" and
               not mount.processes_of("alice"), 15, "the program to end with the agent's sleep")
    write_once(agent / "inbox", "two\n")  # wakes it: wake's tick, then this one's
    wait_until(lambda: (agent / "state/count").read_text() == "2", 15, "the woken tick")
    assert len(set(pids(agent))) == 2
    hooks = [r["trigger"]["type"] for r in mount.log("alice")
             if r.get("event") == "tick" and r["trigger"].get("lifecycle")]
    assert hooks == ["create", "sleep", "wake"]


def test_a_shell_served_program(mount: Mount, tmp_path: Path) -> None:
    mount.new_agent("bob", script(tmp_path, "served.sh", SERVED_SH))
    mount.created("bob")
    sh(f"echo serve on > {mount.agent('bob')}/ctl")
    for n in range(1, 4):
        send(mount, "bob", f"m{n}", n + 1)
    assert [m["data"] for m in mount.outbox("bob")] == ["count 1", "count 2", "count 3"]
    assert len(mount.processes_of("bob")) == 1


def test_serve_takes_on_or_off(mount: Mount) -> None:
    mount.new_agent("carol")
    done = sh(f"echo serve maybe > {mount.agent('carol')}/ctl", check=False)
    assert done.returncode != 0 and "Invalid argument" in done.stderr
    assert mount.status("carol")["serve"] == "off"
    assert any("serve on|off" in r.get("error", "") for r in mount.log("carol"))


def test_a_sleep_that_runs_no_program_still_ends_it(mount: Mount, tmp_path: Path) -> None:
    # `hooks none`: hibernation runs no tick, and the served program must end all the same.
    program = tmp_path / "served.py"
    program.write_text(SERVED_PY)
    write_once(mount.mp / "ctl",
               f"new dora {AGENT_PYTHON} {program}\nserve on\nhooks none\nidle 1s\n")
    mount.created("dora")
    send(mount, "dora", "one", 1)
    assert len(mount.processes_of("dora")) == 1  # alive between ticks while awake
    wait_until(lambda: mount.status("dora")["status"] == "dormant" and
               not mount.processes_of("dora"), 15, "the program to end with the agent's sleep")
