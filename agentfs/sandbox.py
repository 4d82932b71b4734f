"""The tick sandbox, seen from the daemon: start it once per mount, hand it each tick.

Once per mount, bubblewrap makes the namespaces every tick shares (PID, network with only
loopback, IPC, UTS) and a mount view of the read-only system, the agentfs mount, and the
operator's tool directories; nothing else of the host (the store, home directories,
daemon.log) is in it.  Inside, the zygote (`zygote.py`) forks each tick's program in a mount
namespace of its own, as the agent's own uid, under Landlock, seccomp and rlimits.

Who is who: agent n runs as uid `uid_base + n` (and that gid), so the kernel's permission
checks on the mount, on signals, on ptrace and on /proc keep agents apart, and the mount
knows a tick's process by its uid exactly.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from . import confine
from .spawn import pipes_for_child

DEFAULT_UID_BASE = 0x70000000  # systemd's unused range (UIDS-GIDS.md), past container uids
UID_SPAN = 1 << 24  # agents a mount can give uids to
SYSTEM_VIEW = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
TMP_SIZE = 64 << 20
MAX_TOOLS = 64  # as zygote.MAX_TOOLS
# What a tick's environment holds besides AGENT, AGENT_NAME, AGENT_DIR and its
# capabilities': never the daemon's own.
BASE_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
DEFAULT_LIMITS = confine.Limits(memory=1 << 30, processes=128, files=256, file_size=64 << 20)


class SandboxUnavailable(Exception):
    """The kernel or the machine cannot enforce the sandbox: ticks are refused."""


def clean_environment(extra: dict[str, str]) -> dict[str, str]:
    env = {"PATH": BASE_PATH, "LANG": "C.UTF-8", "HOME": "/tmp", "TMPDIR": "/tmp"}
    env.update(extra)
    return env


def check_machine() -> None:
    """Raise SandboxUnavailable saying what is missing, or return."""
    if os.geteuid() != 0:
        raise SandboxUnavailable(
            "the daemon must run as root to give each agent a uid of its own")
    if shutil.which("bwrap") is None:
        raise SandboxUnavailable("bwrap (Debian package bubblewrap) is not installed")
    try:
        import landlockpy
        import pyseccomp  # noqa: F401 - loads libseccomp
    except (ImportError, OSError) as e:
        raise SandboxUnavailable(f"a sandbox binding is missing: {e}") from None
    abi = landlockpy.abi_version() if landlockpy.supported() else 0
    if abi < 6:
        raise SandboxUnavailable(
            f"the kernel's Landlock ABI is {abi}; the sandbox needs 6 (Linux 6.12) for TCP "
            "rules and scoped signals and sockets")


_libc = ctypes.CDLL(None, use_errno=True)
SYS_OPEN_TREE = 428  # the same number on every architecture (a 5.2-era syscall)
OPEN_TREE_CLONE, AT_EMPTY_PATH, AT_RECURSIVE = 1, 0x1000, 0x8000


def clone_tree(path: str) -> int:
    """A detached copy of the mount tree at `path` (open_tree(2)): a descriptor the
    sandbox's child can attach in its own mount namespace, where a bind from this one is
    refused."""
    fd = _libc.syscall(SYS_OPEN_TREE, -100, path.encode(),
                       OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC)
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return int(fd)


def _covered(path: str, view: Iterable[str]) -> bool:
    return any(path == v or path.startswith(v.rstrip("/") + "/") for v in view)


def _zygote_paths() -> list[str]:
    """Where this interpreter and this package live: the zygote needs them to start, the
    ticks must not see them."""
    here = str(Path(__file__).resolve().parent)  # this package alone: a mount point may
    # lie beside it (./demo in a checkout), and detaching its parent would take the mount
    wanted = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, here)}
    wanted.add(os.path.realpath(sys.executable))
    outside = {p for p in wanted if not _covered(p, SYSTEM_VIEW)}
    return sorted(p for p in outside if not _covered(p, outside - {p}))


@dataclass
class SandboxedProgram:
    """A program the zygote started: the same face as spawn.Program."""

    sandbox: Sandbox
    job: int
    stdin: trio.lowlevel.FdStream | None
    stdin_sent: int
    stdout: trio.lowlevel.FdStream
    stderr: trio.lowlevel.FdStream
    returncode: int | None = None
    error: str | None = None  # why the program could not start, said before its exit
    _exited: trio.Event = field(default_factory=trio.Event)

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def kill_group(self, signum: int = signal.SIGKILL) -> None:
        if self.returncode is None:
            self.sandbox.signal(self.job, signum)

    async def aclose(self) -> None:
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                await stream.aclose()


class Sandbox:
    def __init__(self, mountpoint: str, uid_base: int = DEFAULT_UID_BASE,
                 tools: Iterable[str] = (), shared: Iterable[str] = ()) -> None:
        self.mountpoint = mountpoint
        self.uid_base = uid_base
        self.tools = [os.path.realpath(t) for t in tools]  # read-only in every tick
        self.shared = [os.path.realpath(t) for t in shared]  # read-write in every tick
        self.proxy_listener: socket.socket | None = None
        self._control: socket.socket | None = None  # non-blocking; trio waits on it
        self._spawn: socket.socket | None = None
        self._jobs: dict[int, SandboxedProgram] = {}
        self._next_job = 1
        self._process: subprocess.Popen[bytes] | None = None

    def agent_of_uid(self, uid: int) -> int | None:
        """The agent whose tick runs as `uid`, or None for a uid no agent has."""
        index = uid - self.uid_base
        return index if 0 <= index < UID_SPAN else None

    def uid(self, index: int) -> int:
        return self.uid_base + index

    def _bwrap_argv(self, detach: list[str]) -> list[str]:
        argv = ["bwrap", "--die-with-parent", "--unshare-pid", "--unshare-net",
                "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--hostname", "agentfs"]
        for path in SYSTEM_VIEW:
            argv += ["--ro-bind-try", path, path]
        argv += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs", "/run"]
        for path in [*self.tools, *detach]:
            argv += ["--ro-bind", path, path]
        for path in self.shared:
            argv += ["--bind", path, path]
        # Last: a tool directory that holds the mount point must not cover the mount.
        argv += ["--bind", self.mountpoint, self.mountpoint]
        argv += ["--chdir", "/", "--", sys.executable, "-I", "-m", "agentfs.zygote"]
        return argv

    async def run(self, ready: Callable[[], object]) -> None:
        """Start bwrap and the zygote, call `ready`, and serve their messages until
        cancelled; SandboxUnavailable says why it could not start or ended."""
        check_machine()
        control, control_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        spawn, spawn_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        detach = _zygote_paths()
        pins = [p for p in [*self.tools, *self.shared, self.mountpoint]
                if _covered(p, ("/tmp",))]
        config = {"writable": [self.mountpoint, "/tmp", "/dev", *self.shared], "tmp_pins": pins,
                  "tmp_size": TMP_SIZE, "detach": detach}
        control.send(json.dumps(config).encode())
        env = {"PATH": BASE_PATH, "LANG": "C.UTF-8"}
        child_fds = (control_child.fileno(), spawn_child.fileno())
        # Started from this (the main) thread, not one of trio's workers: bwrap's
        # --die-with-parent is tied to the thread that forked it, and trio ends idle
        # worker threads after a while, which would end the sandbox with them.
        process = subprocess.Popen([*self._bwrap_argv(detach), *map(str, child_fds)],
                                   env=env, stdin=subprocess.DEVNULL, pass_fds=child_fds)
        process_fd = os.pidfd_open(process.pid)
        control_child.close()
        spawn_child.close()
        self._process = process
        control.setblocking(False)
        self._control = control
        self._spawn = spawn
        try:
            hello, fds = await self._receive()
            if not hello.get("ready"):
                raise SandboxUnavailable(f"the sandbox did not start: {hello.get('error')}")
            self.proxy_listener = socket.socket(fileno=fds[0])
            ready()
            while True:
                message, _fds = await self._receive()
                self._dispatch(message)
        finally:
            with trio.CancelScope(shield=True):
                self._control.close()
                spawn.close()
                process.kill()
                await trio.lowlevel.wait_readable(process_fd)
                process.wait()
                os.close(process_fd)
                for program in self._jobs.values():
                    program.returncode = -signal.SIGKILL
                    program._exited.set()

    async def _receive(self) -> tuple[dict[str, Any], list[int]]:
        assert self._control is not None
        while True:
            await trio.lowlevel.wait_readable(self._control)
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._control, 1 << 16, 4)
            except BlockingIOError:
                continue
            if not data:
                raise SandboxUnavailable("the sandbox ended")
            return json.loads(data), fds

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "failed" in message:
            # The child could not become the program; its exit is reported as any other.
            program = self._jobs.get(message["failed"])
            if program is not None:
                program.error = message["error"]
        elif "exit" in message:
            program = self._jobs.pop(message["exit"], None)
            if program is not None:
                program.returncode = os.waitstatus_to_exitcode(message["status"])
                program._exited.set()

    def signal(self, job: int, signum: int) -> None:
        if self._control is not None:
            with contextlib.suppress(OSError):  # the sandbox is gone, its processes with it
                self._control.send(json.dumps({"signal": signum, "job": job}).encode())

    def spawn(self, argv: list[str], env: dict[str, str], uid: int, stdin: bytes,
              tools: list[str] = [],  # noqa: B006 - never changed
              limits: confine.Limits = DEFAULT_LIMITS,
              keep_stdin: bool = False) -> SandboxedProgram:
        """Hand a program to the zygote.  `tools` are the agent's own tool paths beyond
        what every tick sees."""
        if self._spawn is None:
            raise SandboxUnavailable("the sandbox is not running")
        extra = [t for t in tools if not _covered(t, (*SYSTEM_VIEW, *self.tools))]
        if len(extra) > MAX_TOOLS:
            raise ValueError(f"more than {MAX_TOOLS} tools")
        opened: list[int] = []
        try:
            for path in extra:
                try:
                    opened.append(clone_tree(path))
                except OSError as e:
                    raise ValueError(f"tool {path}: {e.strerror}") from None
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        ends = pipes_for_child(stdin, keep_stdin)
        job = self._next_job
        self._next_job += 1
        message = {"job": job, "argv": argv, "env": env, "uid": uid, "tools": extra,
                   "limits": limits.__dict__, "cwd": "/tmp"}
        try:
            socket.send_fds(self._spawn, [json.dumps(message).encode()],
                            [*ends.child_fds, *opened])
        finally:
            ends.close_child()
            for fd in opened:
                os.close(fd)
        program = SandboxedProgram(self, job, ends.stdin, ends.stdin_sent, ends.stdout,
                                   ends.stderr)
        self._jobs[job] = program
        return program
