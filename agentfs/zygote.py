"""The sandbox's zygote: one process per mount, inside the namespaces bwrap made, that
starts every tick's program.

bwrap builds the shared part once (a PID, network, IPC and UTS namespace; a read-only view
of the system with the agentfs mount in it).  For each tick the zygote calls `_spawn.spawn`,
which vforks a child that enters the agent's own mount and IPC namespaces (made at its first
tick, with a fresh /tmp, and kept for its next ticks while the tick leaves /tmp empty), drops
to the agent's uid, applies the resource limits and Landlock, and execs, all between vfork and
exec with system calls alone.  The policies are built once, here, at start; the capability
bounding set is emptied and the seccomp filter loaded on the zygote itself, and every tick
inherits both.

Wire (SOCK_SEQPACKET, one JSON object a message):
  daemon -> spawn socket: {"job", "argv", "env", "uid", "limits", "tools", "cwd"}
                          + fds stdin, stdout, stderr, then one mount tree per tool
  zygote -> control socket: {"failed": job, "error"}     (the job's program could not start)
  daemon -> control socket: {"signal": N, "job": J}       (to J's process group)
  zygote -> control socket: {"exit": J, "status": S}      (after J's uid has no process left)
  zygote -> control socket, once: {"ready": true} + the proxy's listening fd
A started job gets no message of its own (one hop fewer a tick): its exit says it all.  A
failed job's exit follows its failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import resource
import selectors
import signal
import socket
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from . import _spawn, confine

MAX_MESSAGE = 1 << 20
MAX_TOOLS = 64  # tool paths one agent may hold
MAX_VIEWS = 256  # agents' namespaces kept for their next tick (a few KiB and 4 fds each)
SPARE_FDS = 128  # what the zygote keeps free for a job's descriptors and its own

MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 2, 4, 32, 4096, 16384
MNT_DETACH = 2
PR_SET_CHILD_SUBREAPER, PR_CAPBSET_DROP = 36, 24
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


def top_of_tmp(path: str) -> str:
    """The name in /tmp under which `path` lies, or ""."""
    parts = path.split("/")
    return parts[2] if len(parts) > 2 and parts[:2] == ["", "tmp"] else ""


def candidates(program: str, path: str) -> list[str]:
    """Where execve(2) should look for `program`, in order, as execvp(3) would."""
    if "/" in program:
        return [program]
    return [os.path.join(d or ".", program) for d in path.split(":")]


@dataclass(frozen=True)
class Job:
    job: int  # the daemon's number for it
    uid: int


@dataclass(frozen=True)
class View:
    """An agent's mount namespace, kept after its tick for the agent's next ones: the
    descriptors of the namespace and of its /tmp and /dev/shm, and the tools it holds."""
    tools: tuple[str, ...]
    namespace: int
    ipc: int
    tmp: int
    shm: int

    def fds(self) -> tuple[int, ...]:
        return (self.namespace, self.ipc, self.tmp, self.shm)


class Zygote:
    def __init__(self, control: socket.socket, config: dict[str, Any]) -> None:
        self.control = control
        self.spawn = socket.socket(fileno=int(sys.argv[2]))
        self.writable: list[str] = config["writable"]
        self.tmp_options = f"size={config['tmp_size']},nr_inodes=16384,mode=1777"
        # Paths under /tmp a tick must still see, each kept at a stash while a child
        # mounts its own /tmp over them.
        self.pins = [(f"/run/agentfs/pin{n}", path) for n, path in enumerate(config["tmp_pins"])]
        self.landlock = confine.LandlockPolicy.for_kernel().as_tuple()
        # exec resets the signals this process handles, not the ones it ignores (SIGPIPE)
        self.ignored = [int(n) for n in signal.valid_signals()
                        if signal.getsignal(n) is signal.SIG_IGN]
        self.running: dict[int, Job] = {}  # by pid
        self.pids: dict[int, int] = {}  # job -> pid
        # Jobs come on one socket, signals on another: a signal may overtake its job.
        self.last_job = 0
        self.early_signals: dict[int, int] = {}  # job not seen yet -> signal
        # Closing the last hold on a tick's mount namespace unmounts its /tmp and the rest
        # synchronously (about 0.2 ms); a thread does it, off the path of the next job.
        self.to_close: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.views: OrderedDict[int, View] = OrderedDict()  # by uid, least recent first
        self.max_views = MAX_VIEWS  # fewer if the zygote may hold fewer descriptors
        # What a kept /tmp may hold: the directories made for pins and tools under it
        # (root's, 0755: no tick can write in them).
        self.tmp_names = {top_of_tmp(path) for _stash, path in self.pins} - {""}

    # -- set-up, once --------------------------------------------------------

    def prepare(self, config: dict[str, Any]) -> None:
        _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "subreaper")
        # Kept views hold 4 descriptors each: as many as the hard limit allows (each tick
        # gets its own RLIMIT_NOFILE all the same).
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        allowed = hard if hard != resource.RLIM_INFINITY else 4 * MAX_VIEWS + SPARE_FDS
        resource.setrlimit(resource.RLIMIT_NOFILE, (allowed, hard))
        self.max_views = max(0, min(MAX_VIEWS, (allowed - SPARE_FDS) // 4))
        # An empty bounding set, inherited by every child: nothing a tick execs can gain a
        # capability.  The zygote keeps the ones it holds, which it needs to set ticks up.
        for cap in range(confine.last_cap() + 1):
            _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
        mount(None, "/proc", None, MS_REMOUNT | MS_NOSUID | MS_NODEV, "hidepid=invisible")
        for stash, path in self.pins:
            os.makedirs(stash, exist_ok=True)
            mount(path, stash, None, MS_BIND | MS_REC)
        # What only the zygote needed (its interpreter and this package, when they live
        # outside the system view) goes before any tick runs.
        for path in config["detach"]:
            _check(_libc.umount2(path.encode(), MNT_DETACH), f"umount {path}")
            with contextlib.suppress(OSError):  # and the empty directories bwrap made for it
                os.removedirs(path)
        # The root stays writable to root alone (mode 0755; Landlock lets no tick write
        # there): the zygote makes the mount points of agents' tools in it.
        mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
        proxy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        proxy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        proxy.bind(("127.0.0.1", confine.PROXY_PORT))
        proxy.listen(128)
        # Last: the seccomp filter, on the zygote itself, which every tick then inherits
        # (loading it costs ~70 us, in each child that would be on every tick's path).
        confine.seccomp_filter().load()
        send(self.control, {"ready": True}, [proxy.fileno()])
        proxy.close()

    # -- a job -----------------------------------------------------------------

    def _job(self) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.spawn, MAX_MESSAGE, 3 + MAX_TOOLS)
        except ConnectionResetError:
            data, fds = b"", []
        if not data:
            raise SystemExit(0)  # the daemon is gone: no job will come
        job: dict[str, Any] = json.loads(data)
        self.last_job = max(self.last_job, job["job"])
        try:
            tools: list[str] = job.get("tools", [])
            if len(fds) != 3 + len(tools):
                raise ValueError("a job's descriptors do not match its tools")
            # A tool is a directory or a file: its mount point is made to match.
            attach = [(path, fd, os.path.isdir(f"/proc/self/fd/{fd}"))
                      for path, fd in zip(tools, fds[3:], strict=True)]
            env = job["env"]
            uid, tools_held = job["uid"], tuple(tools)
            view = self.views.get(uid)
            if view is not None and view.tools != tools_held:
                self._forget(uid)
                view = None
            pid, *held = _spawn.spawn(
                candidates(job["argv"][0], env.get("PATH", "")), job["argv"],
                [f"{k}={v}" for k, v in env.items()], tuple(fds[:3]), job["uid"],
                job["uid"], self.tmp_options, self.pins, attach,
                self.writable, self.landlock, confine.PROXY_PORT,
                confine.Limits(**job["limits"]).rlimits(), self.ignored,
                job.get("cwd", "/tmp"), (view.namespace, view.ipc) if view else (-1, -1))
            if view is not None:
                self.views.move_to_end(uid)
            elif min(held) >= 0:
                self._keep(uid, View(tools_held, *held))
            else:  # the program was gone before its namespaces could be held
                for fd in held:
                    if fd >= 0:
                        self.to_close.put(fd)
            self._track(Job(job["job"], uid), pid)
        except OSError as e:
            self._forget(job["uid"])
            error = e.strerror or str(e)
            if error.startswith("exec:"):
                error = f"{error.removeprefix('exec: ')}: {job['argv'][0]}"
            send(self.control, {"failed": job["job"], "error": error})
            # The child, if there was one, has exited 127; its pid rides in e.filename.
            if isinstance(e.filename, int):
                self._track(Job(job["job"], job["uid"]), e.filename)
            else:
                send(self.control, {"exit": job["job"], "status": 127 << 8})
        except (ValueError, TypeError, KeyError) as e:
            send(self.control, {"failed": job["job"], "error": str(e)})
            send(self.control, {"exit": job["job"], "status": 127 << 8})
        finally:
            for fd in fds:
                os.close(fd)
            self.early_signals.pop(job["job"], None)  # a job that never started

    def _track(self, job: Job, pid: int) -> None:
        self.running[pid] = job
        self.pids[job.job] = pid
        early = self.early_signals.pop(job.job, None)
        if early is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, early)

    # -- the loop --------------------------------------------------------------

    def _closer(self) -> None:
        while True:
            os.close(self.to_close.get())

    def serve(self) -> None:
        threading.Thread(target=self._closer, name="closer", daemon=True).start()
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        selector = selectors.DefaultSelector()
        selector.register(self.control, selectors.EVENT_READ, "control")
        selector.register(self.spawn, selectors.EVENT_READ, "job")
        selector.register(wake_r, selectors.EVENT_READ, "child")
        while True:
            for key, _events in selector.select():
                if key.data == "job":
                    self._job()
                elif key.data == "control":
                    try:
                        data = self.control.recv(MAX_MESSAGE)
                    except ConnectionResetError:  # the daemon is gone, its socket reset
                        data = b""
                    if not data:
                        return  # the daemon is gone
                    self._request(json.loads(data))
                else:
                    while len(os.read(wake_r, 4096)) == 4096:
                        pass
                    self._reap()

    def _request(self, request: dict[str, Any]) -> None:
        job, signum = int(request["job"]), int(request["signal"])
        pid = self.pids.get(job)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signum)
        elif job > self.last_job and self.early_signals.get(job) != signal.SIGKILL:
            self.early_signals[job] = signum  # delivered when the job arrives

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            job = self.running.pop(pid, None)
            if job is None:
                continue  # an orphan of a tick, reparented here
            del self.pids[job.job]
            if self._orphans():
                end_uid(job.uid)
            send(self.control, {"exit": job.job, "status": status})
            view = self.views.get(job.uid)
            if view is not None and not self._empty(view):
                self._forget(job.uid)  # the next tick gets a fresh /tmp

    def _keep(self, uid: int, view: View) -> None:
        self._forget(uid)
        self.views[uid] = view
        while len(self.views) > self.max_views:
            self._forget(next(iter(self.views)))

    def _forget(self, uid: int) -> None:
        view = self.views.pop(uid, None)
        if view is not None:
            # Closing the last hold on a namespace unmounts what is in it.
            for fd in view.fds():
                self.to_close.put(fd)

    def _empty(self, view: View) -> bool:
        """Whether the tick left its /tmp and /dev/shm as it found them."""
        try:
            made = self.tmp_names | {top_of_tmp(path) for path in view.tools}
            return set(os.listdir(view.tmp)) <= made and not os.listdir(view.shm)
        except OSError:
            return False

    def _orphans(self) -> bool:
        """Whether any process a tick left behind is still alive.  The zygote is the
        subreaper of the sandbox: whatever outlives its parent is reparented here, so a
        process left behind is, or descends from, a child of the zygote's that is not a
        running program."""
        try:
            with open(f"/proc/self/task/{os.getpid()}/children") as f:
                children = {int(pid) for pid in f.read().split()}
        except OSError:
            return True
        return not children <= self.running.keys()


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
