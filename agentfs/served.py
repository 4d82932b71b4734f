"""Served programs: one long-lived program per awake agent that serves many ticks.

An exec tick starts its program, which reads one trigger and exits; a program with a slow
start (a venv's Python, a language-model client) pays that start every tick.  With `serve on`
in its ctl, an agent's program is started once and kept while the agent is awake:

    daemon -> program, stdin:   one trigger per line, as an exec tick's stdin
    program -> daemon, stdout:  reply lines, as an exec tick's, then one line that ends the
                                tick: {"tick":"done"} or {"tick":"failed","error":"why"}

Each tick is still a transaction of its own: what the program writes through $AGENT_DIR
between the trigger and `done` commits with the trigger's consumption; `failed`, the time
limit or the program's death rolls it back (the program is started again at the next tick,
after the engine's backoff).  Between ticks the program may not use the mount or the proxy.
The agent's hibernation ends the program; a wake starts it again.
"""

from __future__ import annotations

import contextlib
import json
import signal
from dataclasses import dataclass, field

import trio

from .sandbox import SandboxedProgram
from .spawn import Program

MAX_LINE = 1 << 20  # one stdout line; a longer one fails the tick (as an exec tick's stdout)
END_KEY = "tick"  # the key of the line that ends a tick: a reply may not use it alone


def tick_end(line: bytes) -> tuple[bool, str] | None:
    """(ok, error) if `line` ends the tick, None if it is a reply."""
    text = line.strip()
    if not text.startswith(b"{") or END_KEY.encode() not in text:
        return None
    try:
        parsed = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(parsed, dict) or set(parsed) - {END_KEY, "error"}:
        return None
    if parsed.get(END_KEY) == "done":
        return True, ""
    if parsed.get(END_KEY) == "failed":
        error = parsed.get("error")
        return False, f"the program said failed: {error}" if error else "the program said failed"
    return None


@dataclass
class ServedProgram:
    """A running served program and what it has said that no tick has taken yet."""

    argv: list[str]
    proc: Program | SandboxedProgram
    token: str | None  # its proxy token, good while it lives and only during its ticks
    lines: trio.MemoryReceiveChannel[bytes | None] = field(init=False)
    _send: trio.MemorySendChannel[bytes | None] = field(init=False)
    stderr: bytearray = field(default_factory=bytearray)
    ended: bool = False  # it exited, was killed, or its stdout closed

    def __post_init__(self) -> None:
        # Unbounded is not needed: a tick takes lines as they come; between ticks a program
        # that writes blocks when the buffer fills, and its next tick drains it.
        self._send, self.lines = trio.open_memory_channel(256)

    async def pump(self, stderr_tail: int) -> None:
        """Read its stdout into lines (None: a line over MAX_LINE) and keep its stderr's
        tail, until both close; then it has ended."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump_stderr, stderr_tail)
                async with self._send:
                    await self._pump_stdout()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # ended by `end`, which closed the streams under the pump
        finally:
            self.ended = True

    async def _pump_stdout(self) -> None:
        buffer = bytearray()
        while chunk := await self.proc.stdout.receive_some(65536):
            buffer += chunk
            while (end := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:end])
                del buffer[:end + 1]
                if line.strip():
                    await self._send.send(line if len(line) <= MAX_LINE else None)
            if len(buffer) > MAX_LINE:
                await self._send.send(None)
                buffer.clear()
        if buffer.strip():
            await self._send.send(bytes(buffer))

    async def _pump_stderr(self, tail: int) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while chunk := await self.proc.stderr.receive_some(65536):
                self.stderr += chunk
                del self.stderr[:-tail]

    async def give(self, trigger_line: bytes) -> bool:
        """Write one trigger; False if the program no longer reads."""
        if self.proc.stdin is None:
            return False
        try:
            await self.proc.stdin.send_all(trigger_line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def end(self, grace: float, ask: bool = True) -> None:
        """Close its stdin (its cue to exit: with `ask`), then SIGTERM, then SIGKILL, each
        `grace` apart; wait for it."""
        self.ended = True
        if ask and self.proc.stdin is not None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.proc.stdin.aclose()
            with trio.move_on_after(grace):
                await self.proc.wait()
        if self.proc.returncode is None:
            self.proc.kill_group(signal.SIGTERM)
            with trio.move_on_after(grace):
                await self.proc.wait()
        with trio.CancelScope(shield=True):
            self.proc.kill_group()
            await self.proc.wait()
            await self.proc.aclose()
