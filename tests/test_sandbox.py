"""The sandbox, attacked as an agent program would: every tick runs as its agent's uid, in a
PID, network, mount and IPC namespace of the sandbox, under Landlock, seccomp and rlimits.

Each test runs the attack through a real mount and fails if it succeeds.  The probes are
Python programs that record, for each attempt, "ok" or the errno's name in their own state.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    AGENT_PYTHON,
    READ_TRIGGER,
    UID_BASE,
    Mount,
    init_store,
    pid_alive,
    processes_of,
    release_fifo,
    script,
    sh,
    wait_until,
    write_once,
)

# A probe's preamble: `attempt(name, call)` records the outcome in state/<name>.
PROBE_HEAD = """
import ctypes, errno, json, os, signal, socket, sys
own = os.environ["AGENT_DIR"]
if json.loads(sys.stdin.readline()).get("lifecycle"):
    sys.exit(0)
libc = ctypes.CDLL(None, use_errno=True)


def attempt(name, call):
    try:
        value = call()
        result = "ok" if value in (None, True, "") else f"ok {value}"
    except OSError as e:
        result = errno.errorcode.get(e.errno, str(e.errno))
    with open(os.path.join(own, "state", name), "w") as f:
        f.write(result)


def sys_call(result, what):
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, what)
    return None
"""


def probe(mount: Mount, directory: Path, name: str, body: str, *args: str) -> dict[str, str]:
    """Run `body` (after PROBE_HEAD) as one tick of a new agent `name`; its results."""
    path = directory / f"{name}.py"
    path.write_text(PROBE_HEAD + body)
    mount.new_agent(name, AGENT_PYTHON, str(path), *args)
    mount.created(name)
    write_once(mount.agent(name) / "inbox", "probe\n")
    status = mount.wait_ticks(name, 2, timeout=30)
    assert status["last"].endswith(" ok"), mount.log(name)[-1]
    state = mount.agent(name) / "state"
    return {entry: (state / entry).read_text() for entry in os.listdir(state)}


def bob_waits(mount: Mount, directory: Path) -> tuple[Path, int]:
    """Agent bob in a tick that waits on a fifo (released with release_fifo): the gate, and
    bob's pid in the sandbox."""
    gate = directory / "gate"
    os.mkfifo(gate)
    gate.chmod(0o666)
    bob = script(directory, "bob.sh", READ_TRIGGER + 'echo $$ > "$1/bob.pid"; cat "$1/gate"\n')
    mount.new_agent("bob", bob, str(directory))
    mount.created("bob")
    write_once(mount.agent("bob") / "inbox", "wait\n")
    pid = wait_until(lambda: (directory / "bob.pid").exists() and
                     (directory / "bob.pid").read_text().strip(), 15, "bob's tick")
    return gate, int(pid)


@pytest.fixture
def apart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, Path]]:
    """A mount whose store lies apart from the directory shared with the ticks, as in real
    use: the shared directory holds only the programs."""
    store = init_store(tmp_path_factory.mktemp("hidden") / "store")
    shared = tmp_path_factory.mktemp("programs")
    shared.chmod(0o777)
    (shared / "mnt").mkdir()
    mount = Mount(store, shared / "mnt", extra_args=["-o", f"shared={shared}"])
    try:
        yield mount.start(), shared
    finally:
        mount.stop()


def test_a_tick_runs_as_its_agents_uid_without_privilege(mount: Mount, tmp_path: Path) -> None:
    results = probe(mount, tmp_path, "alice", """
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
for key in ("Uid", "Gid", "Groups", "CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs",
            "Seccomp"):
    attempt(key, lambda key=key: " ".join(status[key].split()))
attempt("setuid0", lambda: os.setuid(0))
attempt("chown", lambda: os.chown(os.path.join(own, "state"), 0, 0))
""")
    uid = str(mount.uid("alice"))
    assert int(uid) >= UID_BASE
    assert results["Uid"] == results["Gid"] == f"ok {uid} {uid} {uid} {uid}"
    assert results["Groups"] == "ok"  # none
    for caps in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert results[caps] == "ok 0000000000000000", caps
    assert results["NoNewPrivs"] == "ok 1"
    assert results["Seccomp"] == "ok 2"
    assert results["setuid0"] == "EPERM"
    assert results["chown"] in ("EPERM", "EACCES")
    assert mount.status("alice")["sandbox"] == "on"


def test_the_store_mnemonic_and_daemon_are_out_of_reach(apart: tuple[Mount, Path]) -> None:
    mount, shared = apart
    store = mount.store.path
    results = probe(mount, shared, "alice", f"""
attempt("store", lambda: os.listdir({str(store)!r}))
attempt("data_mdb", lambda: open({str(store / "data.mdb")!r}, "rb").read(1))
attempt("daemon_log", lambda: open({str(store / "daemon.log")!r}).read(1))
attempt("root_home", lambda: os.listdir("/root"))
attempt("home", lambda: os.listdir("/home"))
attempt("daemon_proc", lambda: open("/proc/{mount.pid}/environ", "rb").read(1))
# Descriptors the tick inherited: none of the daemon's (the store's, the mount's).
fds = sorted(int(n) for n in os.listdir("/proc/self/fd"))
attempt("fds", lambda: " ".join(os.readlink(f"/proc/self/fd/{{n}}") for n in fds if n > 2
                                and os.path.exists(f"/proc/self/fd/{{n}}")))
attempt("write_usr", lambda: open("/usr/agentfs-was-here", "w"))
attempt("write_etc", lambda: open("/etc/agentfs-was-here", "w"))
""")
    assert results["store"] == results["data_mdb"] == results["daemon_log"] == "ENOENT"
    assert results["root_home"] == "ENOENT"  # the daemon's interpreter lives there: gone
    assert results["home"] == "ENOENT"
    assert results["daemon_proc"] == "ENOENT"  # another PID namespace: no such pid
    assert "data.mdb" not in results["fds"] and "/dev/fuse" not in results["fds"]
    assert results["write_usr"] == results["write_etc"] == "EROFS"


def test_a_tick_cannot_signal_trace_or_read_outside_processes(mount: Mount,
                                                               tmp_path: Path) -> None:
    # bob's tick waits on the gate while alice tries to reach it, the daemon and the zygote.
    gate, bob_pid = bob_waits(mount, tmp_path)
    results = probe(mount, tmp_path, "alice", f"""
me = os.getpid()
attempt("procs", lambda: " ".join(sorted(n for n in os.listdir("/proc") if n.isdigit()
                                          and int(n) != me)))
attempt("kill_ppid", lambda: os.kill(os.getppid(), signal.SIGKILL))
attempt("kill_init", lambda: os.kill(1, signal.SIGKILL))
attempt("kill_bob", lambda: os.kill({bob_pid}, signal.SIGKILL))
attempt("kill_daemon", lambda: os.kill({mount.pid}, signal.SIGKILL))
PTRACE_ATTACH = 16
attempt("ptrace_bob", lambda: sys_call(libc.ptrace(PTRACE_ATTACH, {bob_pid}, 0, 0), "ptrace"))
attempt("ptrace_parent",
        lambda: sys_call(libc.ptrace(PTRACE_ATTACH, os.getppid(), 0, 0), "ptrace"))
attempt("bob_environ", lambda: open("/proc/{bob_pid}/environ", "rb").read(1))


def getfd(pid):
    pidfd = os.pidfd_open(pid)
    try:
        return sys_call(libc.syscall(438, pidfd, 3, 0), "pidfd_getfd")  # pidfd_getfd
    finally:
        os.close(pidfd)


attempt("getfd_bob", lambda: getfd({bob_pid}))
attempt("getfd_parent", lambda: getfd(os.getppid()))


class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def vm_read(pid):
    buf = ctypes.create_string_buffer(8)
    local = iovec(ctypes.cast(buf, ctypes.c_void_p), 8)
    remote = iovec(0x400000, 8)
    return sys_call(libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote),
                                          1, 0), "process_vm_readv")


attempt("vm_read_bob", lambda: vm_read({bob_pid}))
attempt("vm_read_parent", lambda: vm_read(os.getppid()))
""")
    try:
        assert results["procs"] == "ok"  # it sees no process but its own
        for attack in ("kill_ppid", "kill_init", "kill_bob", "ptrace_bob", "ptrace_parent",
                       "getfd_bob", "getfd_parent", "vm_read_bob", "vm_read_parent"):
            assert results[attack] in ("EPERM", "ESRCH"), (attack, results[attack])
        # The daemon's pid means nothing in the sandbox: no such process, or not one to kill.
        assert results["kill_daemon"] in ("EPERM", "ESRCH")
        assert results["bob_environ"] in ("ENOENT", "EACCES")
        assert pid_alive(mount.pid)
        assert processes_of(mount.uid("bob")), "bob's tick was killed"
    finally:
        release_fifo(gate)
    mount.wait_ticks("bob", 2)


def test_kill_minus_one_ends_only_the_ticks_own_processes(mount: Mount, tmp_path: Path) -> None:
    gate, _bob_pid = bob_waits(mount, tmp_path)
    alice = script(tmp_path, "alice.sh", READ_TRIGGER + "kill -9 -1; kill -9 $PPID; true\n")
    mount.new_agent("alice", alice)
    mount.created("alice")
    try:
        assert pid_alive(mount.pid)
        assert processes_of(mount.uid("bob")), "another agent's tick was killed"
    finally:
        release_fifo(gate)
    mount.wait_ticks("bob", 2)


def test_no_network_but_the_proxy(mount: Mount, tmp_path: Path) -> None:
    outside = socket.socket()
    outside.bind(("127.0.0.1", 0))
    outside.listen()
    port = outside.getsockname()[1]
    try:
        results = probe(mount, tmp_path, "alice", f"""
def connect(host, port):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((host, port))
    finally:
        s.close()


attempt("host_loopback", lambda: connect("127.0.0.1", {port}))
attempt("other_address", lambda: connect("10.255.255.1", 80))
attempt("proxy", lambda: connect("127.0.0.1", 3128))
attempt("bind_tcp", lambda: socket.socket().bind(("127.0.0.1", 8080)))
attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
attempt("udp6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
attempt("raw", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 1))
attempt("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))
attempt("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0))
attempt("unshare_user", lambda: sys_call(libc.unshare(0x10000000), "unshare"))
attempt("unshare_net", lambda: sys_call(libc.unshare(0x40000000), "unshare"))
attempt("io_uring", lambda: sys_call(libc.syscall(425, 8, ctypes.c_void_p(0)), "io_uring"))
attempt("abstract", lambda: socket.socket(socket.AF_UNIX).bind("\\0agentfs-probe"))
""")
    finally:
        outside.close()
    # The host's loopback is not the sandbox's: nothing listens there at that port.
    assert results["host_loopback"] in ("ECONNREFUSED", "EACCES")
    assert results["other_address"] in ("ENETUNREACH", "EACCES")
    assert results["proxy"] == "ok"
    assert results["bind_tcp"] == "EACCES"  # Landlock: no TCP bind at all
    for family in ("udp", "udp6", "raw"):
        assert results[family] == "EPERM", family
    assert results["netlink"] == results["packet"] == "EAFNOSUPPORT"
    assert results["unshare_user"] == results["unshare_net"] == "EPERM"
    assert results["io_uring"] == "EPERM"
    assert results["abstract"] == "ok"  # its own; another tick cannot connect to it


def test_another_agents_listener_is_unreachable(mount: Mount, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    gate.chmod(0o666)
    bob = tmp_path / "bob.py"
    bob.write_text("""
import json, os, socket, sys
if json.loads(sys.stdin.readline()).get("lifecycle"):
    sys.exit(0)
s = socket.socket(socket.AF_UNIX)
s.bind("\\0bob-listens")
s.listen()
open(sys.argv[1] + "/bob.up", "w").write("up")
open(sys.argv[1] + "/gate").read()
""")
    mount.new_agent("bob", AGENT_PYTHON, str(bob), str(tmp_path))
    mount.created("bob")
    write_once(mount.agent("bob") / "inbox", "listen\n")
    wait_until(lambda: (tmp_path / "bob.up").exists(), 15, "bob's listener")
    try:
        results = probe(mount, tmp_path, "alice", """
attempt("abstract", lambda: socket.socket(socket.AF_UNIX).connect("\\0bob-listens"))
""")
    finally:
        release_fifo(gate)
    assert results["abstract"] == "EPERM"  # Landlock scopes abstract sockets to the tick
    mount.wait_ticks("bob", 2)


def test_a_clean_environment(make_mount: object, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leak")
    monkeypatch.setenv("HOME", "/root")
    mount = make_mount()  # type: ignore[operator]
    results = probe(mount, tmp_path, "alice", """
attempt("env", lambda: json.dumps(dict(os.environ), sort_keys=True))
""")
    env = json.loads(results["env"][3:])
    assert "OPENAI_API_KEY" not in env and "sk-must-not-leak" not in results["env"]
    assert set(env) >= {"AGENT", "AGENT_NAME", "AGENT_DIR", "PATH", "LANG", "HOME"}
    assert env["HOME"] != "/root"
    assert env["AGENT_NAME"] == "alice"
    assert env["HTTP_PROXY"].endswith("@127.0.0.1:3128")


def test_tmp_is_private_to_each_tick(mount: Mount, tmp_path: Path) -> None:
    writer = script(tmp_path, "w.sh", READ_TRIGGER + """
ls -A /tmp /dev/shm > "$AGENT_DIR/state/seen"
echo mine > /tmp/left-behind && echo mine > /dev/shm/left-behind
""")
    for name in ("alice", "bob"):
        mount.new_agent(name, writer)
        mount.created(name)
    for round_ in (1, 2):
        for name in ("alice", "bob"):
            write_once(mount.agent(name) / "inbox", f"round {round_}\n")
            mount.wait_ticks(name, round_ + 1)
            seen = (mount.agent(name) / "state/seen").read_text()
            assert "left-behind" not in seen, (name, round_, seen)


def test_ipc_objects_stay_with_their_agent(mount: Mount, tmp_path: Path) -> None:
    # SysV IPC objects are namespaced per agent: one made open to all (mode 0666) is not
    # seen by another agent's tick, and no shared memory segment outlives its tick.
    program = script(tmp_path, "ipc.sh", READ_TRIGGER + """
echo "$(ipcs -q | grep -c '^0x') $(ipcs -m | grep -c '^0x')" > "$AGENT_DIR/state/seen"
ipcmk -Q -p 0666 >/dev/null && ipcmk -M 4096 -p 0666 >/dev/null
""")
    for name in ("alice", "bob"):
        mount.new_agent(name, program)
        mount.created(name)
    for round_, name in ((1, "alice"), (1, "bob"), (2, "alice")):
        write_once(mount.agent(name) / "inbox", "go\n")
        mount.wait_ticks(name, round_ + 1)
        queues, segments = map(int, (mount.agent(name) / "state/seen").read_text().split())
        # bob sees nothing of alice's; alice's second tick at most her own queue (kept
        # while her namespaces are), never her segment
        assert segments == 0 and queues <= round_ - 1, (name, round_, queues, segments)


def test_processes_die_with_a_killed_daemon(mount: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "stay.sh", READ_TRIGGER + """
( setsid sleep 1000 & ) ; echo up > "$1/up"; sleep 1000
""")
    mount.new_agent("alice", program, str(tmp_path))
    mount.created("alice")
    uid = mount.uid("alice")
    write_once(mount.agent("alice") / "inbox", "go\n")
    wait_until(lambda: (tmp_path / "up").exists(), 15, "the tick")
    assert len(processes_of(uid)) >= 2
    mount.kill()
    wait_until(lambda: not processes_of(uid), 10, "the tick's processes to die with the daemon")
    mount.restart()
    # The trigger is still there and runs again (the program waits again; enough).
    wait_until(lambda: processes_of(uid), 15, "the tick to run again after the remount")


def test_deep_setsid_chains_stay_the_agents(mount: Mount, tmp_path: Path) -> None:
    # 70 levels of setsid'ed processes, each the child of the last: the mount knows them by
    # their uid, not by walking their ancestry (which used to give up after 64).
    mount.new_agent("bob")
    sh(f"echo s3cret > {mount.mp}/bob/state/secret")
    results = probe(mount, tmp_path, "alice", f"""
mp = {str(mount.mp)!r}
for depth in range(70):
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status)) if depth else None
        break
    os.setsid()
else:
    attempt("depth", lambda: os.getsid(0) == os.getpid())
    attempt("read_bob", lambda: open(os.path.join(mp, "bob/state/secret")).read())
    attempt("tokens", lambda: open(os.path.join(mp, "tokens")).read())
    attempt("create_agent", lambda: open(os.path.join(mp, "ctl"), "w").write("new x\\n"))
    os._exit(0)
""")
    assert results["depth"] == "ok"
    assert results["read_bob"] == results["tokens"] == results["create_agent"] == "EACCES"
    assert "x" not in os.listdir(mount.mp)


def test_ports_rules_and_root_files_are_closed_to_ticks(mount: Mount, tmp_path: Path) -> None:
    write_once(mount.mp / "plumb/rules", "type is post\nplumb to http\n")
    write_once(mount.mp / "plumb/send", '{"type":"post","data":"queued for http"}\n')
    results = probe(mount, tmp_path, "alice", f"""
mp = {str(mount.mp)!r}
for name in ("plumb/http", "plumb/rules", "tokens", "alarms", "ctl", "nostr/relays",
             "secrets"):
    attempt(name.replace("/", "_"), lambda name=name: open(os.path.join(mp, name)).read(1))
attempt("send", lambda: open(os.path.join(mp, "plumb/send"), "w").write("x"))
attempt("list_ticks", lambda: os.listdir(os.path.join(mp, ".tick")))
""")
    for name in ("plumb_http", "plumb_rules", "tokens", "alarms", "ctl", "nostr_relays",
                 "secrets", "send", "list_ticks"):
        assert results[name] == "EACCES", (name, results[name])
    # The queued message is still there for the driver.
    fd = os.open(mount.mp / "plumb/http", os.O_RDONLY)
    try:
        assert b"queued for http" in os.read(fd, 65536)
    finally:
        os.close(fd)


def test_a_program_outside_the_view_fails_clearly(apart: tuple[Mount, Path],
                                                  tmp_path_factory: pytest.TempPathFactory,
                                                  ) -> None:
    mount, _shared = apart
    hidden = tmp_path_factory.mktemp("elsewhere")
    hidden.chmod(0o755)
    program = script(hidden, "p.sh", "exit 0\n")
    mount.new_agent("alice", program)
    status = mount.created("alice")
    assert status["status"] == "failed"
    assert "cannot start program: No such file or directory" in status["last"]


def test_sandbox_off_is_said_in_ctl(make_mount: object, tmp_path: Path) -> None:
    mount = make_mount(args=("-o", "sandbox=off"))  # type: ignore[operator]
    mount.new_agent("alice", "/bin/true")
    status = mount.created("alice")
    assert status["sandbox"] == "off"
    assert "uid" not in status
    [record] = [r for r in mount.log("alice") if r["event"] == "tick"]
    assert record["sandbox"] == "off"
    assert "ticks run unconfined" in (mount.store.path / "daemon.log").read_text()


def test_without_bwrap_ticks_are_refused_with_the_reason(tmp_path: Path) -> None:
    store = init_store(tmp_path / "store")
    mp = tmp_path / "mnt"
    mp.mkdir()
    mount = Mount(store, mp, extra_args=["-o", f"shared={tmp_path}"])
    env = dict(os.environ, PATH="/nonexistent")
    done = subprocess.run([*mount_command(mount)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    mount.pid = int((store.path / "daemon.pid").read_text())
    try:
        mount.new_agent("alice", "/bin/true")
        status = mount.created("alice")
        assert status["sandbox"].startswith("unavailable: bwrap")
        assert status["status"] == "failed"
        assert "sandbox unavailable: bwrap" in status["last"]
        assert any("sandbox unavailable" in r.get("error", "") for r in mount.log("alice"))
    finally:
        mount.stop()
    assert not pid_alive(mount.pid) or os.kill(mount.pid, signal.SIGKILL) is None


def mount_command(mount: Mount) -> list[str]:
    from conftest import AGENTFS
    return [*AGENTFS, "mount", "--store", str(mount.store.path), *mount.extra_args,
            str(mount.mp)]


def test_a_tool_is_seen_only_by_the_agent_granted_it(apart: tuple[Mount, Path],
                                                     tmp_path_factory: pytest.TempPathFactory,
                                                     ) -> None:
    mount, tmp_path = apart
    tools = tmp_path_factory.mktemp("tools")
    tools.chmod(0o755)
    tool = script(tools, "greet.sh", 'echo "hello from a tool"\n')
    program = script(tmp_path, "use.sh", READ_TRIGGER + f"""
ls {tools} > "$AGENT_DIR/state/listing" 2>&1
{tool} > "$AGENT_DIR/state/ran" 2>&1 || true
( echo x > {tool} ) 2> "$AGENT_DIR/state/w"; true
""")
    for name in ("alice", "bob"):
        mount.new_agent(name, program)
        mount.created(name)
    write_once(mount.agent("alice") / "ctl", f"grant tool {tools}\n")
    for name in ("alice", "bob"):
        write_once(mount.agent(name) / "inbox", "go\n")
        mount.wait_ticks(name, 2)
    alice, bob = mount.agent("alice") / "state", mount.agent("bob") / "state"
    assert (alice / "ran").read_text() == "hello from a tool\n"
    assert (alice / "listing").read_text() == "greet.sh\n"
    assert "No such file" in (bob / "listing").read_text()
    assert "hello" not in (bob / "ran").read_text()
    # Read-only, even to the agent that holds it.
    assert "Read-only" in (alice / "w").read_text()
    assert Path(tool).read_text().endswith('echo "hello from a tool"\n')
