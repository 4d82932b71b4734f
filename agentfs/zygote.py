"""The sandbox's zygote: one process per mount, inside the namespaces bwrap made, that
starts every tick's program.

bwrap builds the shared part once (a PID, network, IPC and UTS namespace; a read-only view
of the system with the agentfs mount in it).  The zygote keeps a few children forked ahead
of need, each already in a mount namespace of its own with a fresh /tmp, its capability
bounding set empty and the seccomp filter loaded.  A tick then costs only what depends on
its agent: the child that takes the job drops to the agent's uid, applies Landlock and the
resource limits, and execs.  Forking is done off the tick's path.

Wire (SOCK_SEQPACKET, one JSON object a message):
  daemon -> spawn socket: {"job", "argv", "env", "uid", "limits"} + fds stdin, stdout, stderr
  child  -> control socket: {"started": job, "pid"} | {"failed": job, "error"}
  daemon -> control socket: {"signal": N, "pid": P}        (to P's process group)
  zygote -> control socket: {"exit": P, "status": S}      (after P's uid has no process left)
  zygote -> control socket, once: {"ready": true, "proxy": true} + the proxy's listening fd
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import selectors
import signal
import socket
import sys
from typing import Any

from . import confine

MAX_MESSAGE = 1 << 20
POOL = 4  # children kept forked ahead of need
MAX_TOOLS = 64  # tool paths one agent may hold

CLONE_NEWNS, CLONE_NEWIPC = 0x00020000, 0x08000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC = 1, 2, 4, 32, 4096, 8192, \
    16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, flags,
                       data.encode() if data else None), f"mount {target}")


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    try:
        if fds:
            socket.send_fds(sock, [data], fds)
        else:
            sock.send(data)
    except (BrokenPipeError, ConnectionResetError):
        os._exit(0)  # the daemon is gone, and the sandbox ends with it


class Zygote:
    def __init__(self, control: socket.socket, config: dict[str, Any]) -> None:
        self.control = control
        self.spawn = socket.socket(fileno=int(sys.argv[2]))
        self.tmp_pins: list[str] = config["tmp_pins"]  # paths under /tmp a tick must still see
        self.tmp_size: int = config["tmp_size"]
        self.writable: list[str] = config["writable"]
        # landlockpy finds libc with ctypes.util.find_library (which runs ldconfig) at its
        # first call: make that call here, once, not in every child.
        confine.landlock_abi()
        self.filter = confine.compiled(confine.seccomp_filter())
        self.idle: set[int] = set()  # forked ahead, no job yet
        self.running: set[int] = set()  # took a job: their exit is reported
        self.taken_r, self.taken_w = os.pipe()
        os.set_blocking(self.taken_r, False)

    # -- set-up, once --------------------------------------------------------

    def prepare(self, config: dict[str, Any]) -> None:
        _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "subreaper")
        mount(None, "/proc", None, MS_REMOUNT | MS_NOSUID | MS_NODEV, "hidepid=invisible")
        # The stash: where each pinned path under /tmp is kept while a child mounts its own
        # /tmp over them (see _own_tmp).
        for n, path in enumerate(self.tmp_pins):
            stash = f"/run/agentfs/pin{n}"
            os.makedirs(stash, exist_ok=True)
            mount(path, stash, None, MS_BIND | MS_REC)
        # What only the zygote needed (its interpreter and this package, when they live
        # outside the system view) goes before any tick runs.
        for path in config["detach"]:
            _check(_libc.umount2(path.encode(), MNT_DETACH), f"umount {path}")
            with contextlib.suppress(OSError):  # and the empty directories bwrap made for it
                os.removedirs(path)
        # The root stays writable to root alone (mode 0755; Landlock lets no tick write
        # there): a child makes the mount points of its agent's tools in it.
        mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
        proxy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        proxy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        proxy.bind(("127.0.0.1", confine.PROXY_PORT))
        proxy.listen(128)
        send(self.control, {"ready": True}, [proxy.fileno()])
        proxy.close()

    # -- children --------------------------------------------------------------

    def fork_ahead(self) -> None:
        while len(self.idle) < POOL:
            pid = os.fork()
            if pid == 0:
                code = 127
                try:
                    self._child()
                except BaseException as e:  # noqa: BLE001 - the child must never return
                    sys.stderr.write(f"agentfs sandbox: {e}\n")
                finally:
                    os._exit(code)
            self.idle.add(pid)

    def _own_tmp(self) -> None:
        """A mount namespace whose /tmp is a fresh tmpfs, with the pinned paths kept."""
        # A System V IPC namespace of its own too: shared memory and queues are no channel
        # between agents.
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWIPC), "unshare")
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        for shared in ("/tmp", "/dev/shm"):
            if os.path.isdir(shared):
                mount("tmpfs", shared, "tmpfs", MS_NOSUID | MS_NODEV,
                      f"size={self.tmp_size},nr_inodes=16384,mode=1777")
        for n, path in enumerate(self.tmp_pins):
            os.makedirs(path, exist_ok=True)
            mount(f"/run/agentfs/pin{n}", path, None, MS_BIND | MS_REC)

    def _child(self) -> None:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        self.control.setblocking(True)
        os.setsid()
        self._own_tmp()
        # Landlock's rules name inodes, not paths: made after this child's own /tmp.
        ruleset = confine.landlock_ruleset(self.writable)
        confine.drop_bounding_set()
        confine.load_compiled(self.filter)
        # The job: who the program runs as comes with it.
        data, fds, _flags, _addr = socket.recv_fds(self.spawn, MAX_MESSAGE, 3 + MAX_TOOLS)
        if not data:
            os._exit(0)  # the daemon is gone: no job will come
        job: dict[str, Any] = json.loads(data)
        os.write(self.taken_w, os.getpid().to_bytes(4, "little"))
        try:
            show_tools(job.get("tools", []), fds[3:])
            for n, fd in enumerate(fds[:3]):
                os.dup2(fd, n)
            for fd in fds:
                if fd > 2:
                    os.close(fd)
            confine.become(job["uid"], job["uid"])
            confine.Limits(**job["limits"]).apply()
            ruleset.restrict()
            os.chdir(job.get("cwd", "/tmp"))
            send(self.control, {"started": job["job"], "pid": os.getpid()})
            os.execvpe(job["argv"][0], job["argv"], job["env"])
        except OSError as e:
            send(self.control, {"failed": job["job"], "pid": os.getpid(),
                                "error": f"{e.strerror or e}: {job['argv'][0]}"})
        except Exception as e:  # noqa: BLE001 - any failure is the job's failure
            send(self.control, {"failed": job["job"], "pid": os.getpid(), "error": str(e)})

    # -- the loop --------------------------------------------------------------

    def serve(self) -> None:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        selector = selectors.DefaultSelector()
        selector.register(self.control, selectors.EVENT_READ, "control")
        selector.register(wake_r, selectors.EVENT_READ, "child")
        selector.register(self.taken_r, selectors.EVENT_READ, "taken")
        self.fork_ahead()
        while True:
            for key, _events in selector.select():
                if key.data == "control":
                    data = self.control.recv(MAX_MESSAGE)
                    if not data:
                        return  # the daemon is gone
                    self._request(json.loads(data))
                elif key.data == "taken":
                    self._taken()
                    self.fork_ahead()
                else:
                    while len(os.read(wake_r, 4096)) == 4096:
                        pass
                    self._reap()

    def _taken(self) -> None:
        """Children that took a job say so (4 bytes, their pid) before anything else."""
        while True:
            try:
                raw = os.read(self.taken_r, 4096)
            except BlockingIOError:
                return
            for i in range(0, len(raw) - 3, 4):
                pid = int.from_bytes(raw[i:i + 4], "little")
                self.idle.discard(pid)
                self.running.add(pid)

    def _request(self, request: dict[str, Any]) -> None:
        pid, signum = int(request["pid"]), int(request["signal"])
        if pid in self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signum)

    def _reap(self) -> None:
        self._taken()  # a child that took a job and ended at once is not an idle one
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                info = None
            if info is None:
                break
            pid = info.si_pid
            self._taken()  # it may have taken a job since the last look
            uid = _uid_of(pid)
            _pid, status = os.waitpid(pid, 0)
            if pid in self.running:
                self.running.discard(pid)
                if uid is not None:
                    end_uid(uid)
                send(self.control, {"exit": pid, "status": status})
            elif pid in self.idle:
                self.idle.discard(pid)
        self.fork_ahead()  # children that took jobs, or died, are replaced


SYS_MOVE_MOUNT, MOVE_MOUNT_F_EMPTY_PATH = 429, 0x4


def show_tools(paths: list[str], fds: list[int]) -> None:
    """Attach the agent's tools (`grant tool PATH`), each a detached mount tree the daemon
    cloned (open_tree(2)), read-only at their own paths in this child's mount namespace."""
    for path, fd in zip(paths, fds, strict=True):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if not os.path.lexists(path):
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
        _check(_libc.syscall(SYS_MOVE_MOUNT, fd, b"", -100, path.encode(),
                             MOVE_MOUNT_F_EMPTY_PATH), f"move_mount {path}")
        mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _uid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def end_uid(uid: int) -> None:
    """Kill every process of `uid` in the sandbox: what the tick left behind.  A process
    killed cannot fork any more, so a few passes catch what was forking meanwhile."""
    me = os.getpid()
    for _pass in range(32):
        found = False
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == me:
                continue
            try:
                with open(f"/proc/{name}/status", "rb") as f:
                    status = f.read()
            except OSError:
                continue
            fields = dict(line.split(b":", 1) for line in status.splitlines() if b":" in line)
            if int(fields.get(b"Uid", b"-1 0").split()[0]) != uid or \
                    fields.get(b"State", b"").strip().startswith(b"Z"):
                continue
            found = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(name), signal.SIGKILL)
        if not found:
            return


def main() -> None:
    control = socket.socket(fileno=int(sys.argv[1]))
    config = json.loads(control.recv(MAX_MESSAGE))
    zygote = Zygote(control, config)
    try:
        zygote.prepare(config)
    except OSError as e:
        send(zygote.control, {"ready": False, "error": str(e)})
        raise SystemExit(1) from None
    zygote.serve()


if __name__ == "__main__":
    main()
