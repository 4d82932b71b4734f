"""Seeing the fleet: the root `status`, `agentfs ps` and `agentfs top`, through a real mount.

ps is driven as scripts drive it (its text through awk-like splitting, its JSON through jq);
top in batch mode, and under a real terminal: a tmux pane, read with capture-pane.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import AGENTFS, Mount, MountFactory, Store, module_mount, sh, wait_until

from agentfs.fleet import Agent, Sample, Usage, by_activity, parse_last, rates
from agentfs.identity import agent_private_key, npub_encode, public_key
from agentfs.status import WINDOW, RecentEvents
from agentfs.store import AgentRecord, AgentStore
from agentfs.units import parse_duration

AGENTFS_SH = shlex.join(AGENTFS)
STATUS_KEYS = ["pid", "started", "uptime", "agents", "awake", "running", "jobs", "ticks",
               "failed_ticks", "ticks_per_s", "commits", "transactions_per_s",
               "commit_latency_p50", "commit_latency_p99", "rss_bytes", "sandbox", "durability",
               "time"]
PS_HEADER = ["NAME", "STATUS", "TICKS", "PENDING", "LAST", "RESULT", "COMPUTE", "STORAGE",
             "NPUB"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """A mount with three agents: `busy` (three messages answered), `broken` (its create
    tick failed: failed at once) and `blank` (no program: creating for ever).  busy stays
    awake for the module (idle 1h): its figures change only when a test makes it tick."""
    mounted = module_mount(tmp_path_factory, "fleet")
    mount = next(mounted)
    try:
        mount.new_agent("busy", "/bin/sh", "-c", "read -r m; echo counted")
        mount.new_agent("broken", "/bin/sh", "-c", "echo oops >&2; exit 3")
        mount.new_agent("blank")
        sh(f"echo 'idle 1h' > {mount.mp}/busy/ctl")
        mount.created("busy")
        for n in range(3):
            sh(f"echo message-{n} > {mount.mp}/busy/inbox")
        mount.wait_ticks("busy", 4)  # its create, then the three
        wait_until(lambda: mount.status("broken")["status"] == "failed", 15, "broken to fail")
        yield mount
    finally:
        mounted.close()  # unmounts


def status_file(mp: Path) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in (mp / "status").read_text().splitlines())


def ps(*args: str) -> subprocess.CompletedProcess[str]:
    return sh(f"{AGENTFS_SH} ps {shlex.join(args)}", check=False)


def ps_rows(mp: Path, *args: str) -> dict[str, list[str]]:
    """`agentfs ps`'s text, split on blanks as awk would: its rows by name."""
    done = ps(*args, str(mp))
    assert done.returncode == 0, done.stderr
    header, *rows = [line.split() for line in done.stdout.splitlines()]
    assert header == PS_HEADER
    assert all(len(row) == len(header) for row in rows), done.stdout
    return {row[0]: row for row in rows}


# -- units: what ps and top make of what they read --------------------------------------------


def test_parse_last() -> None:
    assert parse_last("-") == (None, None, None)
    assert parse_last("2026-11-24T22:36:12.983Z ok") == ("2026-11-24T22:36:12.983Z", "ok", None)
    assert parse_last("2026-11-24T22:36:11.980Z error: exit status 3") == \
        ("2026-11-24T22:36:11.980Z", "error", "exit status 3")
    assert parse_last("2026-11-24T22:36:11.980Z error: commit failed: no: room") == \
        ("2026-11-24T22:36:11.980Z", "error", "commit failed: no: room")


def _agent(name: str, ticks: int, pending: int = 0, last: str | None = None) -> Agent:
    return Agent(f"npub1{name}", name, "active", ticks, pending, last, None, None,
                 {"compute": Usage(0, 1), "storage": Usage(0, 1)})


def test_top_sorts_by_activity() -> None:
    before = Sample(10.0, {}, [_agent("a", 5), _agent("b", 5), _agent("c", 0), _agent("d", 9)])
    now = Sample(12.0, {}, [_agent("a", 6), _agent("b", 9), _agent("c", 0, pending=2),
                            _agent("d", 9, last="2026-12-01T00:00:00Z"), _agent("e", 0)])
    rate = rates(now, before)
    assert rate == {"npub1a": 0.5, "npub1b": 2.0, "npub1c": 0.0, "npub1d": 0.0, "npub1e": 0.0}
    # Busiest first; then pending; then the latest last tick; never ticked last.
    assert [a.name for a in by_activity(now.agents, rate)] == ["b", "a", "c", "d", "e"]
    assert set(rates(now, None).values()) == {None}  # the first frame has no rates


def test_recent_events_rate_and_percentiles() -> None:
    now = [100.0]
    events = RecentEvents(clock=lambda: now[0])
    assert events.rate() == 0.0 and events.percentile(0.5) is None
    now[0] = 102.0
    for n in range(1, 101):  # 100 latencies, 1 ms to 100 ms, two seconds after the start
        events.add(n / 1000)
    assert events.rate() == 50.0  # since the start, sooner than the window
    assert events.percentile(0.5) == 0.05 and events.percentile(0.99) == 0.099
    now[0] = 100.0 + WINDOW + 1
    assert events.rate() == 100 / WINDOW  # all still within the last WINDOW seconds
    now[0] = 102.0 + WINDOW + 0.5  # and now all older than that
    assert events.rate() == 0.0 and events.percentile(0.99) is None
    assert events.total == 100


# -- the root status file ----------------------------------------------------------------------


def test_status_has_the_daemons_figures(fleet: Mount) -> None:
    mp = fleet.mp
    assert stat.S_IMODE(os.stat(mp / "status").st_mode) == 0o400  # the owner's, not agents'
    before = status_file(mp)
    assert list(before) == STATUS_KEYS
    assert before["pid"] == str(fleet.pid)
    assert before["agents"] == "3"
    assert before["sandbox"] == "on"
    assert int(before["ticks"]) >= 4  # busy's four; broken's create failed
    assert int(before["failed_ticks"]) >= 1
    assert 0 < int(before["rss_bytes"]) < 1 << 31
    assert int(before["jobs"]) >= 1
    sh(f"echo one-more > {mp}/busy/inbox")
    fleet.wait_ticks("busy", 5)
    after = status_file(mp)
    assert int(after["ticks"]) == int(before["ticks"]) + 1
    assert int(after["commits"]) > int(before["commits"])
    assert float(after["ticks_per_s"]) > 0  # a tick in the last 10 seconds
    p50, p99 = (parse_duration(after[k]) for k in ("commit_latency_p50", "commit_latency_p99"))
    assert 0 < p50 <= p99
    # blank is always awake (creating); busy may have gone to sleep since, broken too.
    assert 1 <= int(after["awake"]) <= 3


# -- agentfs ps --------------------------------------------------------------------------------


def test_ps_lists_every_agent_one_line_each(fleet: Mount) -> None:
    rows = ps_rows(fleet.mp)
    assert list(rows) == ["busy", "broken", "blank"]  # the order they were made
    for name, row in rows.items():
        ctl = fleet.status(name)
        assert row[1] == ctl["status"]
        assert row[2] == ctl["ticks"]
        assert row[3] == ctl["pending"]
        assert row[8] == ctl["npub"] == os.readlink(fleet.mp / name)
    assert rows["busy"][5] == "ok" and rows["broken"][5] == "error"
    assert rows["blank"][1] == "creating" and rows["blank"][4:6] == ["-", "-"]
    assert rows["busy"][4].endswith(("s", "m"))  # how long ago its last tick was
    assert rows["busy"][6:8] == ["0%", "0%"]  # today's compute, storage: of 1h and 100 MB


def test_ps_counts_the_budget_it_reads(fleet: Mount) -> None:
    sh(f"echo 'max_storage_bytes 10000' > {fleet.mp}/busy/budget")
    budget = dict(line.split(" ", 1)
                  for line in (fleet.mp / "busy/budget").read_text().splitlines())
    used = int(budget["used_storage_bytes"])
    assert 0 < used < 10000
    assert ps_rows(fleet.mp)["busy"][7] == f"{100 * used / 10000:.0f}%"


def test_ps_json_through_jq(fleet: Mount) -> None:
    mp = fleet.mp
    out = sh(f"{AGENTFS_SH} ps --json {mp} | jq -c '.[]'").stdout
    agents = {a["name"]: a for a in map(json.loads, out.splitlines())}
    assert list(agents) == ["busy", "broken", "blank"]
    busy, broken, blank = agents["busy"], agents["broken"], agents["blank"]
    assert busy["npub"] == fleet.status("busy")["npub"]
    assert busy["ticks"] == int(fleet.status("busy")["ticks"]) and busy["pending"] == 0
    assert busy["last"] == fleet.status("busy")["last"].split()[0]
    assert (busy["last_result"], busy["last_error"]) == ("ok", None)
    assert (broken["status"], broken["last_result"], broken["last_error"]) == \
        ("failed", "error", "exit status 3")
    assert (blank["last"], blank["last_result"], blank["ticks"]) == (None, None, 0)
    assert busy["budget"]["compute"]["limit"] == 3600
    assert 0 < busy["budget"]["compute"]["used"] < 60  # seconds of today's ticks
    assert busy["budget"]["storage"]["used"] > 0  # its log and outbox
    assert set(busy["budget"]) == {"compute", "storage", "api_calls", "spend_sats"}
    # As a script would ask: the names of the agents that failed.
    failed = sh(f"{AGENTFS_SH} ps --json {mp} | jq -r '.[] | select(.status == \"failed\") "
                "| .name'").stdout
    assert failed == "broken\n"


def test_ps_filters_by_status(fleet: Mount) -> None:
    mp = fleet.mp
    assert list(ps_rows(mp, "--status", "failed")) == ["broken"]
    assert list(ps_rows(mp, "--status", "failed,creating")) == ["broken", "blank"]
    assert ps_rows(mp, "--status", "terminated") == {}  # the header alone
    names = sh(f"{AGENTFS_SH} ps --json --status creating {mp} | jq -r '.[].name'").stdout
    assert names == "blank\n"
    assert sh(f"{AGENTFS_SH} ps --json --status terminated {mp}").stdout == "[]\n"
    done = ps("--status", "sleeping", str(mp))
    assert done.returncode == 2 and done.stdout == ""
    assert "'sleeping': a status is one of creating, active, dormant, failed, terminated" in \
        done.stderr


def test_ps_in_the_mount_by_default(fleet: Mount) -> None:
    done = sh(f"{AGENTFS_SH} ps", cwd=fleet.mp)
    assert done.stdout.splitlines()[0].split() == PS_HEADER
    assert len(done.stdout.splitlines()) == 4


def test_ps_refuses_what_is_not_agentfs(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (tmp_path / "proc-like").mkdir()
    (tmp_path / "proc-like" / "status").write_text("Name: bash\nPid: 1\n")
    for where, why in [(plain, "not an agentfs mount (it has no status file)"),
                       (tmp_path / "nowhere", "no such directory"),
                       (tmp_path / "proc-like",
                        f"not an agentfs mount ({tmp_path}/proc-like/status is not agentfs's "
                        "status file)")]:
        for command in ("ps", "ps --json", "top -b -n 1"):
            done = sh(f"{AGENTFS_SH} {command} {where}", check=False)
            assert done.returncode == 1, (command, where)
            assert done.stdout == ""
            assert done.stderr == f"agentfs: {where}: {why}\n"


def test_ps_as_another_user(fleet: Mount) -> None:
    """The tree's files are its owner's: anyone else hears so, not a bare EACCES."""
    # From within the mount (pytest's temporary directories are closed to other users).
    done = sh(f"setpriv --reuid=65534 --regid=65534 --clear-groups {AGENTFS_SH} ps",
              check=False, cwd=fleet.mp)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == ("agentfs: ./status: permission denied: the tree's files are the "
                           "mount owner's (run this as the user that mounted it)\n")


def test_ps_on_a_mount_whose_daemon_died(make_mount: MountFactory) -> None:
    mount = make_mount("dead")
    mount.kill()
    done = ps(str(mount.mp))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (f"agentfs: {mount.mp}: not connected: its agentfs daemon is gone "
                           f"(unmount it with fusermount3 -uz {mount.mp})\n")


def test_an_agent_named_status_before_the_file_came(store: Store, tmp_path: Path) -> None:
    """A store made before the root had `status` may hold an agent of that name: the file
    hides its link (listed once), ps still shows it, and a new name brings the link back."""
    s = AgentStore.open(store.path)
    try:
        with s.env.begin(write=True) as txn:
            index = s.claim_index(txn)
            pub = public_key(agent_private_key(store.mnemonic, index))
            s.add_agent(txn, AgentRecord(index, pub.hex(), "status", None, "creating"))
    finally:
        s.close()
    npub = npub_encode(pub)
    (tmp_path / "mnt").mkdir()
    m = Mount(store, tmp_path / "mnt").start()
    try:
        assert sh(f"ls {m.mp}").stdout.split().count("status") == 1
        assert not os.path.islink(m.mp / "status")
        assert status_file(m.mp)["agents"] == "1"  # the daemon's file, not the agent's link
        assert ps_rows(m.mp)["status"][8] == npub
        sh(f"echo 'name old-status' > {m.mp}/{npub}/ctl")
        assert os.readlink(m.mp / "old-status") == npub
        assert ps_rows(m.mp)["old-status"][8] == npub
    finally:
        m.stop()


# -- agentfs top -------------------------------------------------------------------------------


def test_top_batch_prints_n_frames(fleet: Mount) -> None:
    done = sh(f"{AGENTFS_SH} top -b -n 2 -d 0.1 {fleet.mp}")
    # Each frame starts with its `agentfs top - ` line; a blank line ends all but the last.
    frames = done.stdout.split("\n\nagentfs top - ")
    assert len(frames) == 2 and done.stdout.count("agentfs top - ") == 2
    frames[1] = "agentfs top - " + frames[1]
    busy_ticks = fleet.status("busy")["ticks"]
    for number, text in enumerate(frames):
        lines = text.splitlines()
        assert lines[0].startswith("agentfs top - ") and str(fleet.mp) in lines[0]
        assert f"pid {fleet.pid}" in lines[0]
        assert lines[1].startswith("Agents: 3 total, ")
        assert "1 creating" in lines[1] and "1 failed" in lines[1]
        assert lines[2].startswith("Ticks: ") and lines[3].startswith("Commits: ")
        assert "MiB resident" in lines[3]
        header, *rows = [line.split() for line in lines[5:]]
        assert header[:4] == ["NAME", "STATUS", "TICKS/S", "TICKS"]
        by_name = {row[0]: row for row in rows}
        assert set(by_name) == {"busy", "broken", "blank"}
        assert by_name["busy"][3] == busy_ticks
        # No rate before a second sample; then ticks a second since the first.
        assert by_name["busy"][2] == ("-" if number == 0 else "0.0")


def test_top_without_a_terminal_says_to_use_batch_mode(fleet: Mount) -> None:
    done = sh(f"{AGENTFS_SH} top -n 1 {fleet.mp} < /dev/null | cat", check=False)
    assert done.stdout == ""
    assert done.stderr == ("agentfs: top draws on a terminal, and this is none: use -b (batch "
                           "mode) to print frames\n")
    assert sh(f"{AGENTFS_SH} top -n 1 {fleet.mp} > /dev/null", check=False).returncode == 1


def tmux(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tmux", "-S", str(socket), *args], capture_output=True, text=True,
                          timeout=30)


def test_top_under_a_terminal(make_mount: MountFactory, tmp_path: Path) -> None:
    """top in a tmux pane: it shows an agent's ticks and their rate as they happen, and q
    ends it with status 0."""
    mount = make_mount("top")
    mount.new_agent("ticker", "/bin/sh", "-c", "read -r m; echo tock")
    mount.created("ticker")
    socket, rc = tmp_path / "tmux.sock", tmp_path / "top.rc"
    command = f"{AGENTFS_SH} top -d 0.2 {mount.mp}; echo $? > {rc}"
    started = tmux(socket, "new-session", "-d", "-s", "top", "-x", "180", "-y", "30",
                   "/bin/sh", "-c", command)
    assert started.returncode == 0, started.stderr
    try:
        def ticker_row() -> list[str] | None:
            screen = tmux(socket, "capture-pane", "-p", "-t", "top").stdout
            return next((line.split() for line in screen.splitlines()
                         if line.startswith("ticker ")), None)

        first = wait_until(ticker_row, 30, "top to show ticker")
        assert first[3] == "1"  # its create tick
        sent = 0

        def ticking() -> list[str] | None:
            nonlocal sent
            sent += 1  # one message a look, so that ticks go on while top samples
            sh(f"echo m{sent} > {mount.mp}/ticker/inbox")
            row = ticker_row()
            return row if row and int(row[3]) >= 6 and row[2] not in ("-", "0.0") else None

        row = wait_until(ticking, 30, "top to show ticker's ticks and their rate")
        assert float(row[2]) > 0 and row[1] == "active"
        screen = tmux(socket, "capture-pane", "-p", "-t", "top").stdout
        assert screen.startswith("agentfs top - ")
        assert "Agents: 1 total" in screen
        tmux(socket, "send-keys", "-t", "top", "q")
        assert wait_until(lambda: rc.exists() and rc.read_text(), 15, "top to quit") == "0\n"
        wait_until(lambda: tmux(socket, "has-session", "-t", "top").returncode != 0, 15,
                   "the pane to close")
    finally:
        tmux(socket, "kill-server")
