"""The tick engine: run an agent's program once per trigger, then commit or roll back.

A tick's writes go to its `TickOverlay`; when the program exits 0 the overlay, the
trigger's consumption and the tick's log record become one transaction, handed to the
group committer with whatever other ticks finished meanwhile.  Anything else (non-zero
exit, a signal, the time limit) discards the overlay and leaves the trigger pending.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import trio

from . import budget, caps, errors, lifecycle, values
from .confine import PROXY_PORT
from .inbox import Message, rfc3339_now
from .overlay import TickOverlay
from .plumbing import Delivered
from .sandbox import Sandbox, SandboxedProgram, SandboxUnavailable, clean_environment
from .served import ServedProgram, tick_end
from .spawn import Program, spawn
from .state import TxnState
from .status import RecentEvents
from .store import AgentRecord, Txn
from .units import format_duration

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("agentfs")

STDERR_TAIL = 4096
MAX_STDOUT = 16 << 20
GRACE = 2.0  # seconds between SIGTERM and SIGKILL at max_tick_duration
SWEEP_INTERVAL = 2.0  # seconds between sweeps for processes that ticks left behind
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
    storage_base: int = 0  # the agent's stored bytes when the tick (or its checkpoint) began
    checkpoints: int = 0
    delivered: Delivered = field(default_factory=Delivered)  # where its messages went
    finished: bool = False  # its program ended: its overlay is frozen for the commit
    asleep: bool = False  # it wrote `sleep`, committed at a checkpoint
    terminated: bool = False  # it wrote `terminate`, committed at a checkpoint
    hook: str | None = None  # the lifecycle trigger it runs, if not a queued message

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


def hops(message: Message) -> int:
    """How many agents a message has passed through (0 for one from outside)."""
    value = message.get("hops", 0)
    return value if isinstance(value, int) and value >= 0 else 0


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
        if trigger.get("dm"):
            message.setdefault("dm", trigger["dm"])  # answer a NIP-04 DM as NIP-04
    message.setdefault("in_reply_to", trigger.get("id"))
    return message


@dataclass(frozen=True)
class TickStatistics:
    running: int  # ticks whose programs run now
    jobs: int  # how many may run at once
    committed: RecentEvents  # ticks committed since the mount, and lately
    failed: RecentEvents  # ticks that failed (rolled back) since the mount, and lately


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
        self._waiting_reset: set[int] = set()
        self._idle_timers: dict[int, trio.CancelScope] = {}  # active agents with nothing to do
        self._zombies: set[int] = set()
        self._limiter = trio.CapacityLimiter(jobs)
        self._nursery: trio.Nursery | None = None
        self.stopping = False  # the mount is ending: no tick starts, none is counted failed
        self._sandbox_scope = trio.CancelScope()
        self.sandbox_up = trio.Event()  # set once the sandbox serves, or failed to
        self.sandbox_problem: str | None = None  # why ticks are refused, if they are
        self._served: dict[int, ServedProgram] = {}  # agents' programs in `serve on` mode
        self._committed, self._failed = RecentEvents(), RecentEvents()

    def statistics(self) -> TickStatistics:
        return TickStatistics(len(self.running), int(self._limiter.total_tokens),
                              self._committed, self._failed)

    # -- who is asking -------------------------------------------------------

    def tick_of_caller(self, pid: int, uid: int) -> RunningTick | None:
        """The running tick that a request's process belongs to, or None for an outsider.

        Sandboxed, the kernel says it: agent n's ticks, and only they, run as agent n's
        uid; a process of that uid while no tick of the agent runs is one left behind,
        and is refused.  Unconfined (sandbox=off), the process tree is walked instead.
        """
        box = self.runtime.sandbox
        if box is not None:
            index = box.agent_of_uid(uid)
            if index is None:
                return None
            tick = self.running.get(index)
            if tick is None or tick.finished:
                raise errors.denied("a process of an agent with no running tick may not use "
                                    "the mount")
            return tick
        return self._tick_of_process(pid)

    def _tick_of_process(self, pid: int) -> RunningTick | None:
        """sandbox=off: the running tick that process `pid` belongs to, by its ancestry.

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

    def _reap_orphans(self) -> None:
        """Kill and collect what ticks left behind: as subreaper, the daemon inherits it.

        The daemon's only children are tick programs, which their own tasks wait for; any
        other child is a leftover of a finished tick.
        """
        programs = {t.pid for t in self._sessions.values()} | \
            {s.proc.pid for s in self._served.values() if isinstance(s.proc, Program)}
        try:
            entries = os.listdir("/proc")
        except OSError:
            return
        for name in entries:
            if not name.isdigit() or int(name) in programs:
                continue
            stat = proc_stat(int(name))
            if stat is not None and stat.ppid == self._daemon_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(name), signal.SIGKILL)
                self._zombies.add(int(name))
        for pid in list(self._zombies):
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self._zombies.discard(pid)

    async def run_sandbox(self, box: Sandbox) -> None:
        """Serve the sandbox for the mount's life; if it cannot start, say why and refuse
        ticks (they fail with that reason, in their log and ctl)."""
        def ready() -> None:
            log.info("sandbox: ready; agent n runs as uid %d+n", box.uid_base)
            assert box.proxy_listener is not None and self._nursery is not None
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(box.proxy_listener))
            self.runtime.egress.port = PROXY_PORT  # before the first tick's environment
            self._nursery.start_soon(self.runtime.egress.serve, [listener])
            self.sandbox_up.set()

        try:
            with self._sandbox_scope:
                await box.run(ready)
        except (SandboxUnavailable, OSError) as e:
            self.sandbox_problem = str(e) or type(e).__name__
            log.error("sandbox unavailable: %s; ticks are refused (mount with -o sandbox=off "
                      "to run them unconfined)", self.sandbox_problem)
        finally:
            self.sandbox_problem = self.sandbox_problem or "the sandbox ended"
            self.sandbox_up.set()

    def stop(self) -> None:
        """Kill every tick's processes now; their triggers stay pending, as after a crash."""
        self.stopping = True
        self._sandbox_scope.cancel()  # bwrap's end ends every process of every tick
        for tick in self.running.values():
            if tick.pid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(tick.pid, signal.SIGKILL)
        for served in self._served.values():
            served.proc.kill_group()
        if self.runtime.sandbox is None:
            self._reap_orphans()

    async def _sweep(self) -> None:
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            if self._ever_ticked:
                self._reap_orphans()

    # -- scheduling ----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.runtime.sandbox is None:
                nursery.start_soon(self._sweep)  # sandboxed, the zygote ends leftovers
            store, inbox = self.runtime.store, self.runtime.inbox
            with store.read() as txn:
                for index in {*store.awake(txn), *inbox.agents_with_pending(txn)}:
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
                    try:
                        outcome = await self._tick_once(index)
                    except Exception:
                        # A bug must not end the engine (and the mount) with it.
                        log.exception("agent %d: tick engine error", index)
                        return
                if outcome is None:
                    return
                if not outcome.ok:
                    with self.runtime.store.read() as txn:
                        record = self.runtime.store.require_agent(txn, index)
                    if record.status == "active" and record.failures:
                        await trio.sleep(min(MAX_BACKOFF, 2.0 ** (record.failures - 1)))
        finally:
            self._scheduled.discard(index)

    # -- hibernation -----------------------------------------------------------

    def _idle_from_now(self, index: int, record: AgentRecord) -> None:
        """An active agent has nothing to do: it hibernates if it stays so for its idle time."""
        idle = lifecycle.DEFAULT_IDLE if record.idle is None else record.idle
        deadline = trio.current_time() + idle
        timer = self._idle_timers.get(index)
        if timer is not None and not timer.cancel_called:  # (one that expired is done for)
            timer.deadline = deadline
            return
        timer = self._idle_timers[index] = trio.CancelScope(deadline=deadline)
        if self._nursery is not None:
            self._nursery.start_soon(self._watch_idle, index, timer)

    async def _watch_idle(self, index: int, timer: trio.CancelScope) -> None:
        try:
            with timer:
                await trio.sleep_forever()
        finally:
            if self._idle_timers.get(index) is timer:
                del self._idle_timers[index]  # from now on a drain that ends sets a new timer
        if index in self._scheduled or index in self._idle_timers:
            return  # busy again, or idle again since: a drain's end set a newer timer
        try:
            asleep = await self.runtime.committer.commit(lambda t: self._hibernate(t, index))
        except Exception:  # noqa: BLE001 - a store that cannot commit must not end the mount
            log.exception("agent %d: could not hibernate; it stays awake", index)
            return
        if asleep:
            self.notify(index)

    def _drop_hook(self, txn: Txn, index: int) -> bool:
        """An agent with no program drops its pending hook (not `create`): no one to tell."""
        record = self.runtime.store.require_agent(txn, index)
        if record.program or not lifecycle.drop_without_program(record):
            return False
        self.runtime.store.put_agent(txn, record)
        return True

    def _skip_hook(self, txn: Txn, index: int, hook: str) -> AgentRecord:
        record = self.runtime.store.require_agent(txn, index)
        if record.hook == hook:
            lifecycle.finished(record, hook)
            self.runtime.store.put_agent(txn, record)
        return record

    async def _end_served_unless_active(self, record: AgentRecord) -> None:
        """An agent that hibernated, failed or ended, or left `serve on`, keeps no
        served program."""
        if record.index in self._served and (record.status != "active" or not record.serve):
            await self._end_served(record.index)

    def _hibernate(self, txn: Txn, index: int) -> bool:
        """Put an agent that stayed idle to sleep; True if its `sleep` trigger is to run."""
        store = self.runtime.store
        record = store.agent(txn, index)
        if record is None or record.status != "active" or record.hook is not None or \
                index in self.running or self.runtime.inbox.first(txn, index) is not None:
            return False
        lifecycle.sleep(record)
        if not record.program:
            lifecycle.drop_without_program(record)
        store.put_agent(txn, record)
        return record.hook is not None

    async def _tick_once(self, index: int) -> Outcome | None:
        runtime = self.runtime
        async with runtime.agent_lock(index):
            with runtime.store.read() as txn:
                record = runtime.store.require_agent(txn, index)
                first = runtime.inbox.first(txn, index)
            hook = record.hook
            if hook is not None and not record.program:
                if await runtime.committer.commit(lambda t: self._drop_hook(t, index)):
                    return Outcome(True)  # look again: the agent may have work
                return None
            if hook is not None and not lifecycle.runs_program(record, hook):
                # Its `hooks` setting leaves this one out: done, without a run.
                record = await runtime.committer.commit(
                    lambda t: self._skip_hook(t, index, hook))
                await self._end_served_unless_active(record)  # a sleep it did not run
                return Outcome(True)
            if hook is None and record.status != "active":
                return None
            await runtime.settle(index, locked=True)  # files made outside go in before the tick
            if hook is None and (first is None or not record.program):
                if first is None:
                    self._idle_from_now(index, record)
                return None
            if self._compute_spent(record):
                await runtime.committer.commit(lambda t: self._refuse_compute(t, index))
                self._nursery_start(self._wake_at_reset, index)
                return None
            if hook is not None:
                seq, trigger = 0, lifecycle.trigger(record)
            else:
                assert first is not None
                seq, trigger = first
            # A report (sleep, terminate, error) is never retried: it has no attempt but one.
            trigger["attempt"] = 1 if hook in lifecycle.REPORTS else record.failures + 1
            if record.checkpoint is not None and record.checkpoint.get("seq") == seq and \
                    record.checkpoint.get("hook") == hook:  # hooks all have seq 0
                trigger["resume"] = {"checkpoint": record.checkpoint["count"]}
            tick = RunningTick(record, record.npub, seq, trigger,
                               TickOverlay(runtime.store, index, runtime.ids), hook=hook)
            tick.terminated = hook == "terminate"
            with runtime.store.read() as txn:
                tick.storage_base = runtime.storage_bytes(txn, index)
            tick.checkpoints = (record.checkpoint or {}).get("count", 0) \
                if "resume" in trigger else 0
            self.running[index] = tick
            try:
                outcome = await self._run_program(tick)
            finally:
                tick.finished = True
                del self.running[index]
                self._register(tick, None)
            if self.stopping and not outcome.ok:
                return None  # killed by the mount's end: not the program's failure
            await tick.overlay.wait_writes()
            if outcome.ok:
                try:
                    await runtime.committer.commit(lambda t: self._commit(t, tick, outcome))
                    self._committed.add()
                    _published(tick.overlay)
                    self._notify_delivered(tick)
                    for old in tick.dropped_names:
                        await runtime.name_dropped(old)
                except Exception as e:  # noqa: BLE001 - a commit that fails is a failed tick
                    outcome = Outcome(False, f"commit failed: {e}", stderr=outcome.stderr,
                                      duration=outcome.duration)
            if not outcome.ok:
                await runtime.committer.commit(lambda t: self._fail(t, tick, outcome))
                self._failed.add()
            await self._end_served_unless_active(tick.record)
            return outcome

    def _notify_delivered(self, tick: RunningTick) -> None:
        tick.delivered.agents.discard(tick.index)  # its own drain goes on anyway
        self.runtime.plumbing.announce(tick.delivered)
        tick.delivered = Delivered()

    # -- the daily compute budget ----------------------------------------------

    @staticmethod
    def _compute_spent(record: AgentRecord) -> bool:
        budget.roll_day(record)
        used = float(record.usage.get("used_daily_compute", 0))
        return used >= budget.limit(record, "max_daily_compute")

    def _refuse_compute(self, txn: Txn, index: int) -> None:
        """Say once a day that ticks wait for the reset; the triggers stay queued."""
        record = self.runtime.store.require_agent(txn, index)
        budget.roll_day(record)
        if record.usage.get("compute_refused"):
            return
        record.usage["compute_refused"] = True
        self.runtime.store.put_agent(txn, record)
        reset = budget.next_reset().isoformat().replace("+00:00", "Z")
        self.runtime.log.append(txn, index, {
            "time": rfc3339_now(), "event": "budget",
            "refused": f"max_daily_compute is spent: ticks wait until {reset}"})

    async def _wake_at_reset(self, index: int) -> None:
        if index in self._waiting_reset:
            return
        self._waiting_reset.add(index)
        try:
            delay = (budget.next_reset() - datetime.now(UTC)).total_seconds()
            await trio.sleep(max(0.0, delay) + 0.01)
        finally:
            self._waiting_reset.discard(index)
        self.notify(index)

    def _nursery_start(self, fn: Callable[[int], Awaitable[None]], index: int) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, index)

    # -- running the program -------------------------------------------------

    def _environment(self, tick: RunningTick,
                     proxy: dict[str, str] | None = None) -> dict[str, str]:
        """What a tick's environment holds: never the daemon's own (it may hold keys)."""
        return clean_environment({
            "AGENT": tick.npub,
            "AGENT_NAME": tick.record.name or "",
            "AGENT_DIR": os.path.join(self.mountpoint, ".tick", tick.npub),
            **(self.runtime.egress.environment(tick) if proxy is None else proxy),
        })

    async def _start(self, tick: RunningTick, argv: list[str], trigger_line: bytes,
                     proxy: dict[str, str] | None = None,
                     keep_stdin: bool = False) -> Program | SandboxedProgram | str:
        """Start the tick's program, sandboxed unless the mount says otherwise; a string
        says why it could not start."""
        box = self.runtime.sandbox
        if self.stopping:
            return "the mount is ending"
        env = self._environment(tick, proxy)
        if box is None:
            try:
                proc = spawn(argv, env, trigger_line, keep_stdin)
            except OSError as e:
                return f"cannot start program: {e.strerror}: {argv[0]}"
            except ValueError as e:
                return f"cannot start program: {e}"
            self._register(tick, proc.pid)
            return proc
        await self.sandbox_up.wait()
        if self.sandbox_problem is not None:
            return f"sandbox unavailable: {self.sandbox_problem}"
        try:
            boxed = box.spawn(argv, env, box.uid(tick.index), trigger_line,
                              caps.tools(tick.record), keep_stdin=keep_stdin)
        except (OSError, ValueError, SandboxUnavailable) as e:
            return f"cannot start program: {e}"
        return boxed

    async def _run_program(self, tick: RunningTick) -> Outcome:
        record = tick.record
        assert record.program is not None
        if record.serve:
            return await self._run_served(tick)
        limit = budget.limit(record, "max_tick_duration")
        started = time.monotonic()
        stdout = _Stdout()
        stderr = bytearray()
        trigger_line = json.dumps(tick.trigger, separators=(",", ":")).encode() + b"\n"
        proc = await self._start(tick, record.program, trigger_line)
        if isinstance(proc, str):
            return Outcome(False, proc)
        timed_out = False
        try:
            async with trio.open_nursery() as nursery:
                if proc.stdin is not None:
                    nursery.start_soon(_feed, proc.stdin, trigger_line[proc.stdin_sent:])
                nursery.start_soon(_collect_lines, proc.stdout, stdout)
                nursery.start_soon(_collect_tail, proc.stderr, stderr)
                with trio.move_on_after(limit) as scope:
                    await proc.wait()
                if scope.cancelled_caught:
                    # SIGTERM first: the program may still checkpoint before it goes.
                    timed_out = True
                    proc.kill_group(signal.SIGTERM)
                    with trio.move_on_after(GRACE):
                        await proc.wait()
                # Anything the program left running would outlive the tick.
                proc.kill_group()
                tick.finished = True  # what is written from now on is not the tick's
                # A process that left the group may hold the pipes open: read on briefly.
                nursery.cancel_scope.deadline = trio.current_time() + 0.5
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
        if isinstance(proc, SandboxedProgram) and proc.error is not None:
            return Outcome(False, f"cannot start program: {proc.error}", [], tail, duration)
        if status != 0:
            return Outcome(False, _exit_described(status), stdout.lines, tail, duration)
        if stdout.overflow:
            return Outcome(False, f"stdout over {MAX_STDOUT} bytes", [], tail, duration)
        # A served program's end line means the same in an exec tick (so one program runs
        # either way): `done` is no reply, `failed` fails the tick.
        replies = []
        for line in stdout.lines:
            end = tick_end(line)
            if end is None:
                replies.append(line)
            elif not end[0]:
                return Outcome(False, end[1], [], tail, duration)
        return Outcome(True, "", replies, tail, duration)

    # -- served programs (`serve on`): one program, many ticks ---------------

    async def _served_program(self, tick: RunningTick) -> ServedProgram | str:
        """The agent's served program, started if it has none (or its program changed)."""
        index, argv = tick.index, tick.record.program
        assert argv is not None
        served = self._served.get(index)
        if served is not None and (served.ended or served.argv != argv):
            await self._end_served(index)
            served = None
        if served is not None:
            return served
        proxy, token = self.runtime.egress.served_environment(
            index, active=lambda: (t := self.running.get(index)) is not None and not t.finished)
        proc = await self._start(tick, argv, b"", proxy, keep_stdin=True)
        if isinstance(proc, str):
            if token is not None:
                self.runtime.egress.revoke(token)
            return proc
        served = ServedProgram(list(argv), proc, token)
        self._served[index] = served
        assert self._nursery is not None
        self._nursery.start_soon(served.pump, STDERR_TAIL)
        return served

    async def _end_served(self, index: int, ask: bool = True) -> None:
        """End the agent's served program: asked (stdin closed) first, unless `ask` is
        False (at max_tick_duration: SIGTERM at once, as an exec tick's)."""
        served = self._served.pop(index, None)
        if served is None:
            return
        if served.token is not None:
            self.runtime.egress.revoke(served.token)
        await served.end(GRACE, ask)

    async def _run_served(self, tick: RunningTick) -> Outcome:
        """One tick of a served program: its trigger in, its replies and end line out."""
        limit = budget.limit(tick.record, "max_tick_duration")
        started = time.monotonic()
        served = await self._served_program(tick)
        if isinstance(served, str):
            return Outcome(False, served)
        if isinstance(served.proc, Program):  # sandbox=off: its requests are this tick's
            self._register(tick, served.proc.pid)
        served.stderr.clear()
        trigger_line = json.dumps(tick.trigger, separators=(",", ":")).encode() + b"\n"
        replies: list[bytes] = []
        size = 0
        end: tuple[bool, str] | None = None
        with trio.move_on_after(limit) as scope:
            if await served.give(trigger_line):
                async for line in served.lines:
                    if line is not None:
                        end = tick_end(line)
                        if end is not None:
                            break
                        size += len(line)
                        replies.append(line)
                    else:
                        size = MAX_STDOUT + 1
        tick.finished = True  # what is written from now on is not the tick's
        duration = time.monotonic() - started
        tail = bytes(served.stderr[-STDERR_TAIL:])
        if scope.cancelled_caught:
            await self._end_served(tick.index, ask=False)
            why = f"killed after {format_duration(limit)} (max_tick_duration)"
            return Outcome(False, why, replies, tail, duration)
        if end is None:  # its stdout closed: it died, or is dying
            proc = served.proc
            await self._end_served(tick.index)
            if isinstance(proc, SandboxedProgram) and proc.error is not None:
                return Outcome(False, f"cannot start program: {proc.error}", [], tail, duration)
            how = _exit_described(proc.returncode or 0)
            return Outcome(False, f"the served program ended ({how}) before the tick did",
                           replies, tail, duration)
        ok, error = end
        if size > MAX_STDOUT:
            return Outcome(False, f"stdout over {MAX_STDOUT} bytes", [], tail, duration)
        return Outcome(ok, error, replies if ok else [], tail, duration)

    # -- commit and rollback (run inside the committer's transaction) ---------

    def _apply_overlay(self, txn: Txn, tick: RunningTick, record: AgentRecord,
                       extra: list[Message], now: str,
                       overlay: TickOverlay | None = None) -> tuple[int, bool]:
        """Write the tick's effects (or a snapshot of them); returns (messages sent, asked
        to sleep)."""
        runtime, store, index = self.runtime, self.runtime.store, tick.index
        overlay = tick.overlay if overlay is None else overlay
        view = TxnState(store, txn, index)
        for path, entry in overlay.changes.items():
            view.set(path, entry)
        view.finish()
        kept = {id(d) for e in overlay.changes.values() if e is not None and e.draft is not None
                for d in e.draft.chain()}
        for draft in overlay.unpublished():  # written, then removed or replaced in the tick
            if id(draft) not in kept:
                values.discard(txn, store, draft)
        runtime.add_storage(txn, index, view.bytes_delta)
        sent = [*overlay.outbox, *extra]
        for message in sent:
            outgoing = runtime.outgoing(message, tick.npub, now)
            outgoing["hops"] = hops(tick.trigger) + 1
            runtime.outbox.append(txn, index, outgoing)
            runtime.deliver(txn, index, outgoing, now, tick.delivered)
        for message in overlay.inbox:
            runtime.inbox.append(txn, index, message)
        asleep = False
        for command in overlay.ctl:
            if command.verb == "sleep":
                asleep = True  # takes effect once the tick's commit has settled the status
                continue
            if command.verb == "name" and record.name not in (None, command.args[0]):
                tick.dropped_names.append(record.name)
            runtime.apply_ctl(txn, record, command)
        budget.roll_day(record)
        for key, amount in overlay.charges.items():
            record.usage[key] = record.usage.get(key, 0) + amount
        if overlay.charges:
            runtime.log.append(txn, index, {"time": now, "event": "budget",
                                            "charged": overlay.charges,
                                            "spends": overlay.spends})
        return len(sent), asleep

    async def checkpoint(self, tick: RunningTick) -> None:
        """Commit what the tick wrote so far; a failure later rolls back only to here."""
        tick.checkpoints += 1
        count = tick.checkpoints
        async with AsyncExitStack() as held:  # no write to a file is half done
            for draft in tick.overlay.draft_locks():
                await held.enter_async_context(draft.lock)
            frozen = tick.overlay.snapshot()

        def apply(txn: Txn) -> None:
            record = self.runtime.store.require_agent(txn, tick.index)
            if record.status == "terminated" and not tick.terminated:
                raise errors.denied("the agent was terminated while the tick ran")
            now = rfc3339_now()
            sent, _asleep = self._apply_overlay(txn, tick, record, [], now, frozen)
            record.checkpoint = {"seq": tick.seq, "count": count}
            if tick.hook is not None:
                record.checkpoint["hook"] = tick.hook
            self.runtime.store.put_agent(txn, record)
            self.runtime.log.append(txn, tick.index, {
                "time": now, "event": "checkpoint", "count": count,
                "trigger": {"id": tick.trigger.get("id"), "seq": tick.seq},
                "state_changes": len(frozen.changes), "sent": sent})

        await self.runtime.committer.commit(apply)
        _published(frozen)
        tick.asleep = tick.asleep or any(c.verb == "sleep" for c in frozen.ctl)
        tick.terminated = tick.terminated or any(c.verb == "terminate" for c in frozen.ctl)
        self._notify_delivered(tick)
        with self.runtime.store.read() as txn:  # what it committed, and the log meanwhile
            tick.storage_base = self.runtime.storage_bytes(txn, tick.index)
        tick.overlay.forget(frozen)
        for old in tick.dropped_names:
            await self.runtime.name_dropped(old)
        tick.dropped_names.clear()

    def _commit(self, txn: Txn, tick: RunningTick, outcome: Outcome) -> None:
        runtime, store, index = self.runtime, self.runtime.store, tick.index
        record = store.require_agent(txn, index)
        if record.status == "terminated" and not tick.terminated:
            raise errors.denied("the agent was terminated while the tick ran")
        now = rfc3339_now()
        replies = [reply_for(line, tick.trigger) for line in outcome.stdout]
        changes = len(tick.overlay.changes)
        sent, asleep = self._apply_overlay(txn, tick, record, replies, now)
        asleep = asleep or tick.asleep
        if tick.hook is None:
            runtime.inbox.consume(txn, index, tick.seq)
        else:
            lifecycle.finished(record, tick.hook)
        record.usage["used_daily_compute"] = record.usage.get("used_daily_compute", 0) + \
            outcome.duration
        record.usage["last_tick_duration"] = outcome.duration
        record.ticks += 1
        record.failures = 0
        record.checkpoint = None
        record.last = f"{now} ok"
        if asleep:
            lifecycle.sleep(record)
        runtime.warn_budget(txn, record, now)
        store.put_agent(txn, record)
        entry: dict[str, Any] = {
            "time": now, "event": "tick", "tick": record.ticks, "result": "ok",
            "trigger": _described(tick),
            "duration": round(outcome.duration, 6), "state_changes": changes, "sent": sent,
        }
        if outcome.stderr:
            entry["stderr"] = outcome.stderr.decode("utf-8", errors="replace")
        if runtime.sandbox is None:
            entry["sandbox"] = "off"  # unconfined: every record says so
        runtime.log.append(txn, index, entry)
        tick.record = record  # as committed: whether its served program goes on

    def _fail(self, txn: Txn, tick: RunningTick, outcome: Outcome) -> None:
        store, index = self.runtime.store, tick.index
        for draft in tick.overlay.unpublished():  # rolled back: what it wrote goes
            values.discard(txn, store, draft)
        record = store.require_agent(txn, index)
        now = rfc3339_now()
        report = tick.hook if tick.hook in lifecycle.REPORTS else None
        budget.roll_day(record)
        record.usage["used_daily_compute"] = record.usage.get("used_daily_compute", 0) + \
            outcome.duration
        record.last = f"{now} error: {outcome.error}"
        if report is not None:  # the transition it reports stands: nothing to retry or count
            record.checkpoint = None
            lifecycle.finished(record, report)
        else:
            record.failures += 1
            if tick.hook == "create" and record.status == "creating":  # not if terminated
                lifecycle.fail(record, f"create: {outcome.error}")
            elif record.failures >= record.max_failures and record.status == "active":
                lifecycle.fail(record, outcome.error)
        self.runtime.warn_budget(txn, record, now)
        store.put_agent(txn, record)
        entry: dict[str, Any] = {
            "time": now, "event": "tick", "result": "error", "error": outcome.error,
            "trigger": _described(tick),
            "attempt": 1 if report is not None else record.failures,
            "duration": round(outcome.duration, 6),
            "stderr": outcome.stderr.decode("utf-8", errors="replace"),
        }
        if self.runtime.sandbox is None:
            entry["sandbox"] = "off"
        if record.status == "failed" and record.hook == "error":
            entry["status"] = "failed: create failed" if tick.hook == "create" else \
                f"failed after {record.failures} consecutive errors"
        self.runtime.log.append(txn, index, entry)
        tick.record = record


def _published(overlay: TickOverlay) -> None:
    """Mark the drafts a durable commit of `overlay` published."""
    for entry in overlay.changes.values():
        if entry is not None and entry.draft is not None:
            values.published(entry.draft)


def _exit_described(status: int) -> str:
    """A program's exit as the log says it (`status` as os.waitstatus_to_exitcode gives)."""
    return f"killed by signal {-status}" if status < 0 else f"exit status {status}"


def _described(tick: RunningTick) -> dict[str, Any]:
    """The trigger as a log line names it."""
    if tick.hook is not None:
        return {"type": tick.hook, "lifecycle": True}
    return {"id": tick.trigger.get("id"), "seq": tick.seq, "type": tick.trigger.get("type")}


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


