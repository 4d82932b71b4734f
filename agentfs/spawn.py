"""Start a tick's program with posix_spawn in a session of its own, and wait on a pidfd.

No thread is involved, so the program's pid (which is also its session id) is known
before the program can make its first request of the mount.  This is how ticks start when
the sandbox is off; `pipes_for_child` serves the sandbox too.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass

import trio


@dataclass
class Program:
    pid: int
    stdin: trio.lowlevel.FdStream | None  # None: the input was written whole at spawn
    stdin_sent: int  # how much of the input was written at spawn
    stdout: trio.lowlevel.FdStream
    stderr: trio.lowlevel.FdStream
    pidfd: int
    returncode: int | None = None

    async def wait(self) -> int:
        if self.returncode is None:
            await trio.lowlevel.wait_readable(self.pidfd)
            _pid, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
            os.close(self.pidfd)
        return self.returncode

    def kill_group(self, signum: int = signal.SIGKILL) -> None:
        """Signal everything in the program's process group, the program included."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    async def aclose(self) -> None:
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                await stream.aclose()


# What a fresh pipe holds without a reader (Linux's default pipe capacity).
PIPE_CAPACITY = 65536


@dataclass
class Pipes:
    """A child's standard streams: its ends to hand over, ours as trio streams."""

    child_fds: list[int]
    stdin: trio.lowlevel.FdStream | None
    stdin_sent: int
    stdout: trio.lowlevel.FdStream
    stderr: trio.lowlevel.FdStream

    def close_child(self) -> None:
        for fd in self.child_fds:
            os.close(fd)
        self.child_fds = []


def pipes_for_child(stdin: bytes, keep_stdin: bool = False) -> Pipes:
    """Pipes for stdin, stdout and stderr; input that fits in the pipe is written now and
    its end closed, which spares the caller a task to feed it (larger input is left to the
    caller through `stdin`, and so is all input after it with `keep_stdin`)."""
    pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(3)]
    writer = pipes[0][1]
    os.set_blocking(writer, False)
    try:
        written = os.write(writer, stdin) if stdin else 0
    except BlockingIOError:
        written = 0
    stdin_stream: trio.lowlevel.FdStream | None = None
    if written < len(stdin) or keep_stdin:
        stdin_stream = trio.lowlevel.FdStream(writer)  # the caller feeds the rest
    else:
        os.close(writer)
    return Pipes([pipes[0][0], pipes[1][1], pipes[2][1]], stdin_stream, written,
                 trio.lowlevel.FdStream(pipes[1][0]), trio.lowlevel.FdStream(pipes[2][0]))


def spawn(argv: list[str], env: dict[str, str], stdin: bytes = b"",
          keep_stdin: bool = False) -> Program:
    """Start `argv` (searched in PATH) with pipes for its standard streams."""
    ends = pipes_for_child(stdin, keep_stdin)
    try:
        pid = os.posix_spawnp(
            argv[0], argv, env, setsid=True,
            file_actions=[(os.POSIX_SPAWN_DUP2, fd, n) for n, fd in enumerate(ends.child_fds)],
        )
    except BaseException:
        ends.close_child()
        for stream in (ends.stdin, ends.stdout, ends.stderr):
            if stream is not None:
                stream.close()
        raise
    ends.close_child()
    return Program(pid, ends.stdin, ends.stdin_sent, ends.stdout, ends.stderr,
                   os.pidfd_open(pid))
