"""The tick engine: run an agent's program once per trigger, then commit or roll back.

A tick's writes go to its `TickOverlay`; when the program exits 0 the overlay, the
trigger's consumption and the tick's log record become one transaction, handed to the
group committer with whatever other ticks finished meanwhile.  Anything else (non-zero
exit, a signal, the time limit) discards the overlay and leaves the trigger pending.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import trio

from . import budget, errors
from .inbox import Message, rfc3339_now
from .overlay import TickOverlay
from .spawn import spawn
from .state import TxnState
from .store import AgentRecord, Txn
from .units import format_duration

if TYPE_CHECKING:
    from .runtime import Runtime

STDERR_TAIL = 4096
MAX_STDOUT = 16 << 20
MAX_FAILURES = 3
MAX_BACKOFF = 60.0


@dataclass
class RunningTick:
    """What the daemon holds for one agent while its program runs."""

    record: AgentRecord
    npub: str
    seq: int
    trigger: Message
    overlay: TickOverlay
    started: float = field(default_factory=time.monotonic)
    pid: int | None = None
    dropped_names: list[str] = field(default_factory=list)

    @property
    def index(self) -> int:
        return self.record.index


# What `_attribute` finds for a process orphaned by a tick: a marker, never a real tick.
ORPHAN = cast(RunningTick, object())


@dataclass
class Outcome:
    ok: bool
    error: str = ""
    stdout: list[bytes] = field(default_factory=list)
    stderr: bytes = b""
    duration: float = 0.0


class ProcStat(NamedTuple):
    ppid: int
    sid: int


def proc_stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    return ProcStat(int(fields[1]), int(fields[3]))


def reply_for(line: bytes, trigger: Message) -> Message:
    """One stdout line as an outgoing reply to the trigger's sender."""
    text = line.decode("utf-8", errors="replace")
    message: Message | None = None
    if text.lstrip().startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            message = parsed
    if message is None:
        message = {"type": "text", "data": text}
    if trigger.get("from") is not None:
        message.setdefault("to", trigger["from"])
    message.setdefault("in_reply_to", trigger.get("id"))
    return message


class TickEngine:
    def __init__(self, runtime: Runtime, mountpoint: str, jobs: int) -> None:
        self.runtime = runtime
        self.mountpoint = mountpoint
        self.running: dict[int, RunningTick] = {}
        self._sessions: dict[int, RunningTick] = {}
        # pid -> its tick, forgotten whenever a tick starts or ends.  A pid reused meanwhile
        # needs the kernel to cycle through pid_max; the one mistake it could cause is
        # refusing an outsider whose pid last belonged to an orphan.
        self._callers: dict[int, RunningTick | None] = {}
        self._ever_ticked = False
        self._daemon_pid = os.getpid()
        self._scheduled: set[int] = set()
        self._limiter = trio.CapacityLimiter(jobs)
        self._nursery: trio.Nursery | None = None

    # -- who is asking -------------------------------------------------------

    def tick_of_caller(self, pid: int) -> RunningTick | None:
        """The running tick that process `pid` belongs to, or None for an outsider.

        A tick's processes are its program and everything it starts: the program leads a
        session of its own, and a descendant that leaves it with setsid(2) still has the
        program among its ancestors.  One that double-forks away is orphaned to the daemon
        (a child subreaper) and is refused everything.
        """
        if not self._ever_ticked or pid <= 0:
            return None
        try:
            tick = self._callers[pid]
        except KeyError:
            stat = proc_stat(pid)
            tick = None if stat is None else self._attribute(pid, stat)
            self._callers[pid] = tick
        if tick is ORPHAN:
            raise errors.denied("a process left behind by a tick may not use the mount")
        return tick

    def _attribute(self, pid: int, stat: ProcStat) -> RunningTick | None:
        for _depth in range(64):
            tick = self._sessions.get(stat.sid) or self._sessions.get(pid)
            if tick is not None:
                return tick
            if stat.ppid == self._daemon_pid:
                return ORPHAN
            if stat.ppid <= 1:
                return None
            pid = stat.ppid
            parent = proc_stat(pid)
            if parent is None:
                return None
            stat = parent
        return None

    def _register(self, tick: RunningTick, pid: int | None) -> None:
        """Add (pid) or remove (None) a tick's session: who is whose changes."""
        self._callers.clear()
        if pid is not None:
            tick.pid = pid
            self._sessions[pid] = tick
            self._ever_ticked = True
        elif tick.pid is not None:
            self._sessions.pop(tick.pid, None)
            self._reap_orphans()

    def _reap_orphans(self) -> None:
        """Collect the exit status of processes that ticks left behind (we are their reaper)."""
        programs = {t.pid for t in self._sessions.values()}
        while True:
            try:
                child = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if child is None or child.si_pid in programs or child.si_pid == 0:
                return  # a running tick's program is waited for by its own task
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child.si_pid, 0)

    # -- scheduling ----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            store, inbox = self.runtime.store, self.runtime.inbox
            with store.read() as txn:
                for index in inbox.agents_with_pending(txn):
                    self.notify(index)
            task_status.started()
            await trio.sleep_forever()

    def notify(self, index: int) -> None:
        """An agent may have work: make sure one task is draining its queue."""
        if index in self._scheduled or self._nursery is None:
            return
        self._scheduled.add(index)
        self._nursery.start_soon(self._drain, index)

    async def _drain(self, index: int) -> None:
        try:
            while True:
                async with self._limiter:
                    outcome = await self._tick_once(index)
                if outcome is None:
                    return
                if not outcome.ok:
                    with self.runtime.store.read() as txn:
                        record = self.runtime.store.require_agent(txn, index)
                    if record.status != "active":
                        return
                    await trio.sleep(min(MAX_BACKOFF, 2.0 ** (record.failures - 1)))
        finally:
            self._scheduled.discard(index)

    async def _tick_once(self, index: int) -> Outcome | None:
        runtime = self.runtime
        async with runtime.agent_lock(index):
            with runtime.store.read() as txn:
                record = runtime.store.require_agent(txn, index)
                first = runtime.inbox.first(txn, index)
            if record.status != "active":
                return None
            await runtime.settle(index, locked=True)  # files made outside go in before the tick
            if first is None or not record.program:
                if first is None:
                    await runtime.committer.commit(lambda t: self._settle(t, index))
                return None
            seq, trigger = first
            tick = RunningTick(record, record.npub, seq, trigger,
                               TickOverlay(runtime.store, index))
            self.running[index] = tick
            try:
                outcome = await self._run_program(tick)
            finally:
                del self.running[index]
                self._register(tick, None)
            if outcome.ok:
                try:
                    await runtime.committer.commit(lambda t: self._commit(t, tick, outcome))
                    for old in tick.dropped_names:
                        await runtime.name_dropped(old)
                except Exception as e:  # noqa: BLE001 - a commit that fails is a failed tick
                    outcome = Outcome(False, f"commit failed: {e}", stderr=outcome.stderr,
                                      duration=outcome.duration)
            if not outcome.ok:
                await runtime.committer.commit(lambda t: self._fail(t, tick, outcome))
            return outcome

    # -- running the program -------------------------------------------------

    def _environment(self, tick: RunningTick) -> dict[str, str]:
        env = dict(os.environ)
        env["AGENT"] = tick.npub
        env["AGENT_NAME"] = tick.record.name or ""
        env["AGENT_DIR"] = os.path.join(self.mountpoint, ".tick", tick.npub)
        return env

    async def _run_program(self, tick: RunningTick) -> Outcome:
        record = tick.record
        assert record.program is not None
        limit = budget.limit(record, "max_tick_duration")
        started = time.monotonic()
        stdout = _Stdout()
        stderr = bytearray()
        trigger_line = json.dumps(tick.trigger, separators=(",", ":")).encode() + b"\n"
        try:
            proc = spawn(record.program, self._environment(tick), trigger_line)
        except OSError as e:
            return Outcome(False, f"cannot start program: {e.strerror}: {record.program[0]}")
        self._register(tick, proc.pid)
        timed_out = False
        try:
            with trio.move_on_after(limit) as scope:
                async with trio.open_nursery() as nursery:
                    if proc.stdin is not None:
                        nursery.start_soon(_feed, proc.stdin, trigger_line)
                    nursery.start_soon(_collect_lines, proc.stdout, stdout)
                    nursery.start_soon(_collect_tail, proc.stderr, stderr)
                    await proc.wait()
                    # Anything the program left running would outlive the tick.
                    proc.kill_group()
            timed_out = scope.cancelled_caught
        finally:
            with trio.CancelScope(shield=True):
                proc.kill_group()
                await proc.wait()
                await proc.aclose()
        duration = time.monotonic() - started
        tail = bytes(stderr[-STDERR_TAIL:])
        if timed_out:
            why = f"killed after {format_duration(limit)} (max_tick_duration)"
            return Outcome(False, why, stdout.lines, tail, duration)
        status = proc.returncode or 0
        if status != 0:
            how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
            return Outcome(False, how, stdout.lines, tail, duration)
        if stdout.overflow:
            return Outcome(False, f"stdout over {MAX_STDOUT} bytes", [], tail, duration)
        return Outcome(True, "", stdout.lines, tail, duration)

    # -- commit and rollback (run inside the committer's transaction) ---------

    def _settle(self, txn: Txn, index: int) -> None:
        """An active agent with nothing left to do goes dormant."""
        store = self.runtime.store
        record = store.require_agent(txn, index)
        if record.status == "active" and self.runtime.inbox.first(txn, index) is None:
            record.status = "dormant"
            store.put_agent(txn, record)

    def _commit(self, txn: Txn, tick: RunningTick, outcome: Outcome) -> None:
        runtime, store, index = self.runtime, self.runtime.store, tick.index
        record = store.require_agent(txn, index)
        view = TxnState(store, txn, index)
        for path, entry in tick.overlay.changes.items():
            view.set(path, entry)
        runtime.add_storage(txn, index, view.bytes_delta)
        now = rfc3339_now()
        sent = [*tick.overlay.outbox, *(reply_for(line, tick.trigger) for line in outcome.stdout)]
        for message in sent:
            runtime.outbox.append(txn, index, runtime.outgoing(message, tick.npub, now))
        for message in tick.overlay.inbox:
            runtime.inbox.append(txn, index, message)
        runtime.inbox.consume(txn, index, tick.seq)
        asleep = False
        for command in tick.overlay.ctl:
            if command.verb == "name":
                if record.name not in (None, command.args[0]):
                    tick.dropped_names.append(record.name)
                store.set_name(txn, record, command.args[0])
            elif command.verb == "program":
                record.program = list(command.args)
            elif command.verb == "sleep":
                asleep = True
            elif command.verb == "terminate":
                record.status = "terminated"
        budget.roll_day(record)
        record.usage["used_daily_compute"] = record.usage.get("used_daily_compute", 0) + \
            outcome.duration
        record.usage["last_tick_duration"] = outcome.duration
        record.ticks += 1
        record.failures = 0
        record.last = f"{now} ok"
        if record.status == "active":  # not if put to sleep, or terminated, meanwhile
            more = runtime.inbox.first(txn, index) is not None
            record.status = "active" if more and not asleep else "dormant"
        store.put_agent(txn, record)
        record_: dict[str, Any] = {
            "time": now, "event": "tick", "tick": record.ticks, "result": "ok",
            "trigger": {"id": tick.trigger.get("id"), "seq": tick.seq,
                        "type": tick.trigger.get("type")},
            "duration": round(outcome.duration, 6), "state_changes": len(tick.overlay.changes),
            "sent": len(sent),
        }
        if outcome.stderr:
            record_["stderr"] = outcome.stderr.decode("utf-8", errors="replace")
        runtime.log.append(txn, index, record_)

    def _fail(self, txn: Txn, tick: RunningTick, outcome: Outcome) -> None:
        store, index = self.runtime.store, tick.index
        record = store.require_agent(txn, index)
        now = rfc3339_now()
        record.failures += 1
        budget.roll_day(record)
        record.usage["used_daily_compute"] = record.usage.get("used_daily_compute", 0) + \
            outcome.duration
        record.last = f"{now} error: {outcome.error}"
        if record.failures >= MAX_FAILURES and record.status == "active":
            record.status = "failed"
        store.put_agent(txn, record)
        entry: dict[str, Any] = {
            "time": now, "event": "tick", "result": "error", "error": outcome.error,
            "trigger": {"id": tick.trigger.get("id"), "seq": tick.seq,
                        "type": tick.trigger.get("type")},
            "attempt": record.failures, "duration": round(outcome.duration, 6),
            "stderr": outcome.stderr.decode("utf-8", errors="replace"),
        }
        if record.status == "failed":
            entry["status"] = f"failed after {record.failures} consecutive errors"
        self.runtime.log.append(txn, index, entry)


async def _feed(stream: Any, data: bytes) -> None:
    try:
        await stream.send_all(data)
        await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


@dataclass
class _Stdout:
    lines: list[bytes] = field(default_factory=list)
    overflow: bool = False


async def _collect_lines(stream: Any, out: _Stdout) -> None:
    buffer = bytearray()
    total = 0
    while chunk := await stream.receive_some(65536):
        total += len(chunk)
        if total > MAX_STDOUT:
            out.overflow = True
            continue  # keep draining so the program is not blocked; the tick fails
        buffer += chunk
        *complete, rest = bytes(buffer).split(b"\n")
        out.lines.extend(line for line in complete if line.strip())
        buffer = bytearray(rest)
    if buffer.strip():
        out.lines.append(bytes(buffer))


async def _collect_tail(stream: Any, tail: bytearray) -> None:
    while chunk := await stream.receive_some(65536):
        tail += chunk
        del tail[:-STDERR_TAIL]


