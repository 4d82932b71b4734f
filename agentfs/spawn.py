"""Start a tick's program with posix_spawn in a session of its own, and wait on a pidfd.

No thread is involved, so the program's pid (which is also its session id) is known
before the program can make its first request of the mount.
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


def spawn(argv: list[str], env: dict[str, str], stdin: bytes = b"") -> Program:
    """Start `argv` (searched in PATH) with pipes for its standard streams.

    Input that fits in the pipe is written and its end closed here, which spares the
    caller a task to feed it; larger input is left to the caller through `stdin`.
    """
    pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(3)]
    child_ends = (pipes[0][0], pipes[1][1], pipes[2][1])
    try:
        pid = os.posix_spawnp(
            argv[0], argv, env, setsid=True,
            file_actions=[(os.POSIX_SPAWN_DUP2, fd, n) for n, fd in enumerate(child_ends)],
        )
    except BaseException:
        for read_end, write_end in pipes:
            os.close(read_end)
            os.close(write_end)
        raise
    for fd in child_ends:
        os.close(fd)
    stdin_stream: trio.lowlevel.FdStream | None = None
    writer = pipes[0][1]
    os.set_blocking(writer, False)
    try:
        written = os.write(writer, stdin) if stdin else 0
    except BlockingIOError:
        written = 0
    except BrokenPipeError:
        written = len(stdin)  # the program exited without reading its input: its choice
    if written < len(stdin):
        stdin_stream = trio.lowlevel.FdStream(writer)  # the caller feeds the rest
    else:
        os.close(writer)
    return Program(
        pid,
        stdin_stream,
        written,
        trio.lowlevel.FdStream(pipes[1][0]),
        trio.lowlevel.FdStream(pipes[2][0]),
        os.pidfd_open(pid),
    )
