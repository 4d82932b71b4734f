"""What the served files mean: the operations the FUSE layer delegates to.

`Runtime` owns the store, the group committer and the tick engine.  Every mutation is
a function of a write transaction handed to the committer; a write from a running
tick goes to that tick's overlay instead.
"""

from __future__ import annotations

import errno
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import TypeVar

import trio

from . import budget, caps, errors, lifecycle, state, status, values
from .alarms import Alarm, Alarms
from .audit import AuditLog, HeadPublisher
from .committer import CommitQueue
from .ctl import OWNER_VERBS, TICK_VERBS, Command, parse_agent_ctl, parse_root_ctl, quote_program
from .egress import Egress
from .factotum import Factotum
from .identity import agent_private_key, npub_decode, npub_encode, public_key
from .inbox import Inbox, Message, check_agent_id, parse_lines, rfc3339_now, stamp_id
from .journal import Journal, encode_line
from .nostr.bridge import NostrBridge, json_event, nostr_id
from .plumbing import Delivered, Plumbing, from_outbox
from .refusals import RefusalLog, clip
from .sandbox import Sandbox
from .store import AgentRecord, AgentStore, Txn, agent_key
from .ticks import MAX_STDOUT, RunningTick, TickEngine, hops
from .units import format_duration

T = TypeVar("T")
MAX_HOPS = 16  # agents a message may pass through, each answering the last
# Bytes of messages the daemon holds for one tick until it commits (what it sent, queued
# for itself, and its partial lines): as much as it may print on standard output.
MAX_TICK_MESSAGES = MAX_STDOUT


class Runtime:
    def __init__(self, store: AgentStore, mountpoint: str, jobs: int = 8,
                 sandbox: Sandbox | None = None, proxy_ca: str | None = None) -> None:
        self.store = store
        self.started = (rfc3339_now(), time.monotonic())  # for the root `status`
        values.sweep(store)  # the drafts a crash left: their writers are gone
        self.ids = values.ValueIds(store)
        # None: ticks run unconfined (-o sandbox=off), which ctl and the log say.
        self.sandbox = sandbox
        self.inbox = Inbox(store)
        self.outbox = Journal(store, "outbox")
        self.log = AuditLog(store)
        self.alarms = Alarms(store)
        self.committer = CommitQueue(store, seal=self.log.seal)
        self.publisher = HeadPublisher(self)
        self.committer.committed = self.publisher.committed
        self.engine = TickEngine(self, mountpoint, jobs)
        self.plumbing = Plumbing(self)
        self.nostr = NostrBridge(self)
        self.secrets = Factotum(store, self.committer)
        self.egress = Egress(self, proxy_ca)
        self.refusals = RefusalLog(self._log_refusal)
        self._locks: dict[int, trio.Lock] = {}
        # Files made by create, or emptied by O_TRUNC, not yet committed: `state_empty`,
        # `state_publish`.
        self._unwritten: dict[int, dict[str, state.Entry]] = {}
        # Called with an agent's old name after it changed: the file server drops the link.
        self.name_dropped: Callable[[str], Awaitable[None]] = _nothing

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.committer.run)
            await nursery.start(self.engine.run)
            nursery.start_soon(self.publisher.run)
            self.refusals.nursery = nursery
            if self.sandbox is not None:
                # The proxy serves inside the sandbox's network namespace, once it is up.
                nursery.start_soon(self.engine.run_sandbox, self.sandbox)
            else:
                await nursery.start(self.egress.run)
            task_status.started()

    @asynccontextmanager
    async def agent_lock(self, index: int) -> AsyncIterator[None]:
        """Serialises a tick with writes to the agent's committed state from outside it."""
        lock = self._locks.setdefault(index, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            stats = lock.statistics()
            if not stats.locked and not stats.tasks_waiting:
                self._locks.pop(index, None)

    # -- names ---------------------------------------------------------------

    def resolve(self, txn: Txn, name: str) -> int | None:
        """An agent index from an npub or a name."""
        if name.startswith("npub1"):
            try:
                return self.store.index_by_pubkey(txn, npub_decode(name))
            except ValueError:
                return None
        return self.store.index_by_name(txn, name)

    # -- generated file contents ---------------------------------------------

    def storage_bytes(self, txn: Txn, index: int) -> int:
        """What counts against max_storage_bytes: the values in state/, outbox and log."""
        return self.state_bytes(txn, index) + self.outbox.size(txn, index) + \
            self.log.size(txn, index)

    def state_bytes(self, txn: Txn, index: int) -> int:
        raw = txn.get(agent_key(index) + b"storage-bytes", db=self.store.db["counters"])
        return 0 if raw is None else int.from_bytes(raw, "big", signed=True)

    def add_storage(self, txn: Txn, index: int, delta: int) -> None:
        """Count `delta` more bytes of values in state/ (the journals count themselves)."""
        if delta:
            value = self.state_bytes(txn, index) + delta
            txn.put(agent_key(index) + b"storage-bytes", value.to_bytes(8, "big", signed=True),
                    db=self.store.db["counters"])

    def ctl_text(self, index: int, tick: RunningTick | None = None) -> bytes:
        with self.store.read() as txn:
            record = self.store.require_agent(txn, index)
            pending = self.inbox.count(txn, index)
        if tick is not None:  # the tick sees its own uncommitted ctl and inbox writes
            pending += len(tick.overlay.inbox)
            for command in tick.overlay.ctl:
                if command.verb == "name":
                    record.name = command.args[0]
                elif command.verb == "program":
                    record.program = list(command.args)
        lines = [
            ("npub", record.npub),
            ("name", record.name or "-"),
            ("status", record.status),
            ("ticks", str(record.ticks)),
            ("pending", str(pending)),
            ("last", record.last or "-"),
            ("program", quote_program(record.program)),
            ("retries", str(record.max_failures)),
            ("idle", format_duration(lifecycle.DEFAULT_IDLE if record.idle is None
                                     else record.idle)),
            ("serve", "on" if record.serve else "off"),
            ("hooks", lifecycle.shown_hooks(record)),
            ("alarm", alarm.describe() if (alarm := Alarm.decode(record.alarm)) else "-"),
            ("token", "set" if record.token else "-"),
            ("publish", "heads" if record.publish else "none"),
            *caps.shown(record),
            ("sandbox", self.sandbox_state()),
        ]
        if self.sandbox is not None:
            lines.append(("uid", str(self.sandbox.uid(index))))
        if record.status == "failed" and record.hook_error:
            lines.append(("error", record.hook_error))
        return "".join(f"{k} {v}\n" for k, v in lines).encode()

    def sandbox_state(self) -> str:
        """How this mount's ticks run: `on`, `off` (-o sandbox=off, unconfined), or
        `unavailable: WHY` (ticks are refused)."""
        if self.sandbox is None:
            return "off"
        problem = self.engine.sandbox_problem
        return "on" if problem is None else f"unavailable: {problem}"

    def status_text(self) -> bytes:
        return status.render(self)

    def alarms_text(self) -> bytes:
        with self.store.read() as txn:
            return self.alarms.text(txn)

    def tokens_text(self) -> bytes:
        """`NPUB NAME SHA256` a line for each agent with a bearer token: the HTTP driver's."""
        lines = []
        with self.store.read() as txn:  # only the agents with tokens: a driver re-reads often
            for index in self.store.with_tokens(txn):
                record = self.store.require_agent(txn, index)
                lines.append(f"{record.npub} {record.name or '-'} {record.token}\n")
        return "".join(lines).encode()

    def budget_text(self, index: int) -> bytes:
        with self.store.read() as txn:
            record = self.store.require_agent(txn, index)
            stored = self.storage_bytes(txn, index) + self.pending_delta(txn, index)
            return budget.render(record, stored).encode()

    def head_text(self, index: int) -> bytes:
        """The log's signed head, a Nostr event as one JSON line (empty before any record)."""
        with self.store.read() as txn:
            self.store.require_agent(txn, index)
            head = self.log.head(txn, index)
        return b"" if head is None else head + b"\n"

    def inbox_text(self, index: int, tick: RunningTick | None = None) -> bytes:
        with self.store.read() as txn:
            text = b"".join(raw + b"\n" for _seq, raw in self.inbox.pending(txn, index))
        if tick is not None:  # queued by the tick, stamped when it commits
            text += b"".join(encode_line(m) for m in tick.overlay.inbox)
        return text

    def outgoing(self, message: Message, npub: str, now: str) -> Message:
        out = dict(message)
        check_agent_id(out)
        stamp_id(out)
        out.setdefault("type", "text")
        out["from"] = npub
        out["time"] = now
        return out

    def deliver(self, txn: Txn, sender: int, message: Message, now: str,
                delivered: Delivered) -> None:
        """Carry a message an agent sent: to a local agent's inbox, or by the plumb rules.

        Runs in the sender's commit, so a message is delivered exactly when it is sent, and
        the messages from one agent to another arrive in the order they were sent.  What
        cannot be delivered stays in the outbox, with an `undelivered` line in the log.
        """
        to = message.get("to")
        index = self.resolve(txn, to) if isinstance(to, str) and to else None
        try:
            if message.get("hops", 0) > MAX_HOPS:
                # Two agents that answer every message would answer each other forever.
                raise errors.invalid(f"passed through {MAX_HOPS} agents: a loop?")
            entry = {k: v for k, v in message.items() if k not in ("seq", "time", "to")}
            if index is None:
                self.plumbing.route(txn, from_outbox(message), delivered, sender)
            elif index == sender:
                # The sender's record is the committing tick's to put: queue only.
                self.inbox.append(txn, index, entry)
            elif self.accept(txn, index, entry):
                delivered.agents.add(index)
            else:
                raise errors.denied("the recipient is terminated")
        except errors.FsError as e:
            self.log.append(txn, sender, {"time": now, "event": "undelivered",
                                          "id": message["id"], "to": to, "error": e.message})

    def accept(self, txn: Txn, index: int, message: Message) -> bool:
        """Queue a delivered message in an agent's inbox; False if it takes none."""
        record = self.store.require_agent(txn, index)
        if record.status == "terminated":
            return False
        if self.queue_trigger(txn, record, message):
            self.store.put_agent(txn, record)
        return True

    def queue_trigger(self, txn: Txn, record: AgentRecord, message: Message) -> bool:
        """Queue one trigger for an agent, waking it if it was dormant.

        Returns whether `record` changed (the caller puts it).  An alarm's firing advances
        the alarm; a stale one (fired before, or cancelled) is dropped with a log line.
        """
        event = json_event(message)
        # A sender's retry (or the same event from another relay) is acknowledged, and not
        # applied twice: looked up before an event is verified and opened, which costs.
        if self.inbox.seen_before(txn, record.index,
                                  nostr_id(message["event"].get("id")) if event
                                  else message.get("id")):
            # Logged, unlike other duplicates, so that two timer drivers on one mount show.
            if not event and message.get("type") == "alarm":
                self.log.append(txn, record.index, {
                    "time": rfc3339_now(), "event": "alarm", "id": message["id"],
                    "dropped": "duplicate: fired already (a driver's retry, or a second driver)"})
            return False
        if event:
            message = self.nostr.incoming(txn, record, message)
        fired = self.alarms.fired(txn, record, message)
        if fired is False:
            self.log.append(txn, record.index, {
                "time": rfc3339_now(), "event": "alarm", "id": message["id"],
                "dropped": "not the agent's alarm now (it was replaced, or cancelled)"})
            return False
        queued = self.inbox.append(txn, record.index, message) is not None
        woke = queued and lifecycle.wake(record)
        return bool(fired) or woke

    def overlay_outbox_bytes(self, tick: RunningTick) -> bytes:
        return b"".join(encode_line(m) for m in tick.overlay.outbox)

    # -- writes ----------------------------------------------------------------

    def _writable(self, txn: Txn, index: int) -> AgentRecord:
        record = self.store.require_agent(txn, index)
        if record.status == "terminated":
            raise errors.denied("the agent is terminated: its files are read-only")
        return record

    async def create_agents(self, data: bytes) -> list[str]:
        """`new NAME [PROGRAM ARG...]` lines; returns the new agents' npubs."""
        wanted = parse_root_ctl(data)
        indexes: list[int] = []

        def apply(txn: Txn) -> list[str]:
            mnemonic = self.store.mnemonic(txn)
            created = []
            indexes.clear()  # run again if the map was full
            for new in wanted:
                if self.store.index_by_name(txn, new.name) is not None:
                    raise errors.exists(f"name {new.name!r}")
                index = self.store.claim_index(txn)
                pub = public_key(agent_private_key(mnemonic, index))
                record = AgentRecord(index, pub.hex(), new.name, new.program,
                                     created=rfc3339_now())
                lifecycle.create(record)
                for grant in new.grants:
                    caps.apply(record, grant)
                for setting in new.settings:
                    self.apply_ctl(txn, record, setting)
                self.store.add_agent(txn, record)
                indexes.append(index)
                self.log.append(txn, index, {
                    "time": record.created, "event": "create", "name": new.name,
                    "program": quote_program(new.program)})
                for command in [*new.grants, *new.settings]:
                    self.log.append(txn, index, {"time": record.created, "event": "ctl",
                                                 "command": _describe(command)})
                created.append(npub_encode(pub))
            return created

        npubs = await self.committer.commit(apply)
        for index in indexes:
            self.engine.notify(index)  # its `create` runs now, if it has a program
        return npubs

    async def agent_ctl(self, index: int, data: bytes, tick: RunningTick | None) -> None:
        commands = parse_agent_ctl(data)
        if tick is not None:
            _live(tick)
            await self._tick_ctl(tick, commands)
            return

        dropped: list[str] = []

        def apply(txn: Txn) -> bool:
            record = self._writable(txn, index)
            now = rfc3339_now()
            for command in commands:
                if command.verb == "name" and record.name not in (None, command.args[0]):
                    dropped.append(record.name)
                self.apply_ctl(txn, record, command)
                self.log.append(txn, index, {"time": now, "event": "ctl",
                                             "command": _describe(command)})
            self.store.put_agent(txn, record)
            return record.awake

        awake = await self.committer.commit(apply)
        for old in dropped:
            await self.name_dropped(old)
        if awake:
            self.engine.notify(index)

    def apply_ctl(self, txn: Txn, record: AgentRecord, command: Command) -> None:
        """One ctl command, from outside or from a committing tick (which handles sleep)."""
        verb = command.verb
        if verb in TICK_VERBS:
            raise errors.invalid(f"ctl: {verb} is for a running tick, through $AGENT_DIR/ctl")
        if verb == "retries":
            record.max_failures = int(command.args[0])
        elif verb == "wake":
            self.queue_trigger(txn, record, {"type": "wake", "data": command.text})
        elif verb == "program":
            record.program = list(command.args)
        elif verb == "name":
            self.store.set_name(txn, record, command.args[0])
        elif verb == "sleep":
            lifecycle.sleep(record)
        elif verb == "terminate":
            lifecycle.terminate(record)
            self.alarms.set(txn, record, None)
        elif verb == "recover":
            lifecycle.recover(record, self.inbox.first(txn, record.index) is not None)
        elif verb == "alarm":
            self.alarms.set(txn, record, Alarm.from_arg(command.args[0]))
        elif verb == "idle":
            record.idle = float(command.args[0])
        elif verb == "serve":
            record.serve = command.args[0] == "on"
        elif verb == "hooks":
            record.hooks = None if command.args == ("all",) else \
                [] if command.args == ("none",) else list(command.args)
        elif verb == "token":
            record.token = command.args[0] or None
        elif verb == "publish":
            record.publish = command.args[0] == "heads"
        elif verb in caps.VERBS:
            caps.apply(record, command)

    async def _tick_ctl(self, tick: RunningTick, commands: list[Command]) -> None:
        charges = dict(tick.overlay.charges)
        wakes = [{"type": "wake", "data": c.text} for c in commands if c.verb == "wake"]
        for command in commands:
            caps.refuse_in_tick(command)
            if command.verb in OWNER_VERBS:
                raise errors.invalid(f"ctl: {command.verb} is set from outside the agent")
            if command.verb in ("charge", "spend"):
                key = "used_daily_api_calls" if command.verb == "charge" else \
                    "used_daily_spend_sats"
                charges[key] = charges.get(key, 0) + int(command.args[-1])
                self._check_charge(tick, key, charges[key])
            if command.verb == "name":
                with self.store.read() as txn:
                    holder = self.store.index_by_name(txn, command.args[0])
                if holder not in (None, tick.index):
                    raise errors.exists(f"name {command.args[0]!r}")
            if command.verb == "recover":
                raise errors.invalid("ctl: recover is for an agent that is not running")
        self.check_hold(tick, "ctl: wake", inbox=sum(len(encode_line(m)) for m in wakes))
        for command in commands:
            if command.verb == "wake":
                wake = wakes.pop(0)
                tick.overlay.inbox.append(wake)
                tick.overlay.inbox_bytes += len(encode_line(wake))
            elif command.verb == "checkpoint":
                await self.engine.checkpoint(tick)
            elif command.verb in ("charge", "spend"):
                key = "used_daily_api_calls" if command.verb == "charge" else \
                    "used_daily_spend_sats"
                tick.overlay.charges[key] = tick.overlay.charges.get(key, 0) + \
                    int(command.args[-1])
                if command.verb == "spend":
                    tick.overlay.spends.append({"sats": int(command.args[0]),
                                                "memo": command.text})
            else:
                tick.overlay.ctl.append(command)

    def _check_charge(self, tick: RunningTick, key: str, pending: int) -> None:
        """EDQUOT if what the tick charged, with what the day already used, passes the limit."""
        with self.store.read() as txn:
            record = self.store.require_agent(txn, tick.index)
        if key == "used_daily_spend_sats":
            caps.require_spend(record)  # read now: a revoke counts from the next spend
        budget.roll_day(record)
        limit_key = key.replace("used_", "max_")
        used = int(record.usage.get(key, 0))
        most = budget.limit(record, limit_key)
        if used + pending > most:
            raise errors.over_quota(
                f"{limit_key} {int(most)}: {used} used today and {pending} charged by this tick")

    async def inbox_write(self, index: int, data: bytes, tick: RunningTick | None) -> None:
        messages = parse_lines(data)
        if not messages:
            return
        if tick is not None:
            _live(tick)
            for message in messages:
                check_agent_id(message)
            self.hold(tick, "inbox", inbox=sum(len(encode_line(m)) for m in messages))
            tick.overlay.inbox.extend(messages)
            return

        def apply(txn: Txn) -> bool:
            record = self._writable(txn, index)
            changed = [self.queue_trigger(txn, record, m) for m in messages]
            if any(changed):
                self.store.put_agent(txn, record)
            return record.awake

        if await self.committer.commit(apply):
            self.engine.notify(index)

    def outbox_write(self, data: bytes, tick: RunningTick | None) -> None:
        if tick is None:
            raise errors.denied(
                "outbox: only the agent's own ticks append to it, through $AGENT_DIR/outbox")
        _live(tick)
        messages = parse_lines(data, "outbox")
        for message in messages:
            check_agent_id(message)
        self.hold(tick, "outbox", outbox=sum(self._sent_size(tick, m) for m in messages))
        tick.overlay.outbox.extend(messages)

    def _sent_size(self, tick: RunningTick, message: Message) -> int:
        """The bytes `message` will take in the outbox, stamped as its commit will stamp it."""
        stamped = self.outgoing(message, tick.npub, rfc3339_now())
        stamped["hops"] = hops(tick.trigger) + 1
        return len(encode_line(stamped))

    def hold(self, tick: RunningTick, what: str, *, outbox: int = 0, inbox: int = 0,
             partial: int = 0) -> None:
        """Count messages the daemon is to hold for the tick until it commits, or EDQUOT."""
        self.check_hold(tick, what, outbox=outbox, inbox=inbox + partial)
        tick.overlay.outbox_bytes += outbox
        tick.overlay.inbox_bytes += inbox
        tick.overlay.partial_bytes += partial

    def check_hold(self, tick: RunningTick, what: str, *, outbox: int = 0,
                   inbox: int = 0) -> None:
        """EDQUOT if the daemon may not hold these bytes more of messages for the tick.

        Without a bound, a tick writing without end to its outbox grows the daemon without
        end.  What it sends also counts in its storage from now, so that the write
        past max_storage_bytes is the one refused.
        """
        overlay = tick.overlay
        held, more = overlay.held_bytes, outbox + inbox
        if held + more > MAX_TICK_MESSAGES:
            raise errors.over_quota(
                f"{what}: {more} more bytes would pass the {MAX_TICK_MESSAGES} bytes of "
                f"messages a tick may hold until it commits ({held} held)")
        if outbox:
            self.check_storage(tick.record, tick.storage_base + overlay.stored_delta, outbox,
                               what)

    async def budget_write(self, index: int, data: bytes, tick: RunningTick | None) -> None:
        if tick is not None:
            raise errors.denied("budget: an agent cannot change its own limits")
        try:
            settings = budget.parse_settings(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise errors.invalid("budget: not UTF-8 text") from None

        def apply(txn: Txn) -> None:
            record = self._writable(txn, index)
            record.limits.update(settings)
            self.store.put_agent(txn, record)
            shown = {k: budget.LIMIT_BY_KEY[k].render(v) for k, v in settings.items()}
            self.log.append(txn, index, {"time": rfc3339_now(), "event": "budget", "set": shown})

        await self.committer.commit(apply)
        self.engine.notify(index)  # a raised limit lets held triggers run

    async def state_op(self, index: int, tick: RunningTick | None,
                       op: Callable[[state.StateView], T]) -> T:
        """Run a `state` operation: in the tick's overlay, or committed durably."""
        if tick is not None:
            if tick.index != index:
                raise errors.denied("a tick may only touch its own agent's state")
            _live(tick)
            overlay = tick.overlay
            changes, delta = dict(overlay.changes), overlay.bytes_delta
            result = op(overlay)
            grew = overlay.bytes_delta - delta
            if grew > 0:
                try:
                    self.check_storage(tick.record,
                                       tick.storage_base + delta + overlay.outbox_bytes, grew)
                except errors.FsError:
                    overlay.changes, overlay.bytes_delta = changes, delta  # nothing partial
                    raise
            return result
        async with self.agent_lock(index):
            return await self.commit_state(index, op)

    @staticmethod
    def check_storage(record: AgentRecord, stored: int, growth: int, what: str = "state") -> None:
        most = budget.limit(record, "max_storage_bytes")
        if stored + growth > most:
            raise errors.over_quota(
                f"{what}: {growth} more bytes would pass max_storage_bytes {int(most)} "
                f"({stored} stored)")

    def warn_budget(self, txn: Txn, record: AgentRecord, now: str) -> bool:
        """Log and queue a `budget` trigger for each resource that crossed its warning line."""
        crossed = budget.new_warnings(record, self.storage_bytes(txn, record.index))
        for warning in crossed:
            self.log.append(txn, record.index, {"time": now, "event": "budget",
                                                "warning": warning})
            self.queue_trigger(txn, record, {"type": "budget", **warning})
        return bool(crossed)

    async def commit_state(self, index: int, op: Callable[[state.TxnState], T]) -> T:
        """Commit `op` on the agent's state, with its unwritten files first (lock held)."""
        unwritten = dict(self._unwritten.get(index, {}))

        def apply(txn: Txn) -> tuple[T, bool, list[values.Draft]]:
            record = self._writable(txn, index)
            view = state.TxnState(self.store, txn, index)
            for path, entry in unwritten.items():
                view.set(path, entry)
            result = op(view)
            view.finish()
            if view.bytes_delta > 0:
                self.check_storage(record, self.storage_bytes(txn, index), view.bytes_delta)
            self.add_storage(txn, index, view.bytes_delta)
            warned = self.warn_budget(txn, record, now=rfc3339_now())
            if warned:
                self.store.put_agent(txn, record)
            return result, warned and record.awake, view.published

        result, wake, published = await self.committer.commit(apply)
        for draft in published:
            values.published(draft)
        if wake:
            self.engine.notify(index)
        pending = self._unwritten.get(index, {})
        for path, entry in unwritten.items():
            if pending.get(path) is entry:
                del pending[path]
        if not pending:
            self._unwritten.pop(index, None)
        return result

    async def state_empty(self, index: int, tick: RunningTick | None, path: str) -> None:
        """A new empty file at `path` (O_CREAT).

        Outside a tick it is visible at once but committed with the file's first write, or
        when the file is closed: `echo x > f` then costs one durable commit, not two.
        """
        blob = self.ids.new()

        def empty(view: state.StateView) -> None:
            state.create(view, path, blob)

        if tick is not None:
            await self.state_op(index, tick, empty)
            return
        async with self.agent_lock(index):
            with self.store.read() as txn:
                self._writable(txn, index)
                empty(_UnwrittenView(self, txn, index))

    async def settle(self, index: int, *, locked: bool = False) -> None:
        """Commit the agent's unwritten files (at close, fsync, and before a tick); at a
        close, only if one was created (an emptied one waits for its last close)."""
        pending = self._unwritten.get(index, {})
        if not pending or not locked and all(e.draft is not None for e in pending.values()):
            return
        if locked:
            await self.commit_state(index, lambda view: None)
            return
        async with self.agent_lock(index):
            await self.commit_state(index, lambda view: None)

    def state_read(self, index: int, tick: RunningTick | None, path: str) -> state.Entry | None:
        if tick is not None:
            return tick.overlay.get(path)
        with self.store.read() as txn:
            return _UnwrittenView(self, txn, index).get(path)

    def state_read_at(self, index: int, tick: RunningTick | None, path: str, offset: int,
                      length: int, writing: OpenWrite | None = None) -> bytes:
        """Bytes of a file as the reader sees it: the tick's, or committed (with what the
        reader's own file descriptor wrote and has not yet closed)."""
        entry = self.state_read(index, tick, path)
        if entry is None:
            raise errors.no_such_file(f"state/{path}")
        draft, size = entry.draft, entry.size
        if writing is not None and writing.draft is not None:
            draft, size = writing.draft, writing.draft.size
        elif writing is not None and writing.emptied:
            return b""
        with self.store.read() as txn:
            return values.read(txn, self.store, entry.blob, size, draft, offset, length)

    # -- writing values: through a draft --------------------------------------------

    async def state_write(self, index: int, tick: RunningTick | None, path: str,
                          offset: int, data: bytes, append: bool,
                          writing: OpenWrite | None) -> None:
        """write(2) to a `state/` file: into the tick's draft of it, or from outside into
        the draft of the file descriptor (`writing`), committed whole at its close."""
        if tick is not None:
            await self._tick_draft(index, tick, path, lambda t, d: values.plan_write(
                t, self.store, d, d.size if append else offset, data))
            return
        assert writing is not None
        await self._outside_draft(writing, lambda t, d: values.plan_write(
            t, self.store, d, d.size if append else offset, data))

    async def state_truncate(self, index: int, tick: RunningTick | None, path: str, size: int,
                             writing: OpenWrite | None = None) -> None:
        """truncate(2): in the tick's draft; from outside through a file descriptor
        (ftruncate), in its draft; by path, committed at once."""
        if tick is not None:
            await self._tick_draft(index, tick, path,
                                   lambda t, d: values.plan_truncate(t, self.store, d, size))
            return
        if writing is not None:
            await self._outside_draft(
                writing, lambda t, d: values.plan_truncate(t, self.store, d, size))
            return

        def cut(view: state.TxnState) -> None:
            entry = state.file(view, path)
            draft = values.Draft(self.ids.new(), entry.blob, index, entry.size)
            staging = values.plan_truncate(view.txn, self.store, draft, size)
            values.absorb(staging)
            view.set(path, entry.changed(size, draft))

        async with self.agent_lock(index):
            await self.commit_state(index, cut)

    async def _tick_draft(self, index: int, tick: RunningTick, path: str,
                          plan: Callable[[Txn, values.Draft], values.Staging]) -> None:
        """Stage a change to a file in the tick's draft of it (made at its first change)."""
        if tick.index != index:
            raise errors.denied("a tick may only touch its own agent's state")
        overlay = tick.overlay
        while True:
            _live(tick)
            entry = state.file(overlay, path)
            draft = entry.draft
            if draft is None or draft.published:
                draft = overlay.new_draft(entry)
                overlay.set(path, entry._replace(draft=draft))
            async with draft.lock:
                _live(tick)  # it ended meanwhile: its commit has what it had
                if _holding(overlay.changes, draft) is None:
                    continue  # a checkpoint froze the draft, or the file went: look again
                with self.store.read() as txn:
                    staging = plan(txn, draft)
                grew = staging.size - draft.size
                if grew > 0:
                    self.check_storage(tick.record, tick.storage_base + overlay.bytes_delta +
                                       overlay.outbox_bytes, grew)
                await self._stage(staging)
                moved = _holding(overlay.changes, draft)  # renamed meanwhile, perhaps
                if moved is not None:
                    overlay.set(moved, overlay.changes[moved].changed(  # type: ignore[union-attr]
                        draft.size, draft))
                return

    async def _outside_draft(self, writing: OpenWrite,
                             plan: Callable[[Txn, values.Draft], values.Staging]) -> None:
        """Stage a change in the draft of a file descriptor opened from outside."""
        if writing.refused is not None:
            raise errors.FsError(writing.refused.errno,
                                 f"state/{writing.path}: a write through this file was refused "
                                 f"({writing.refused.message}); nothing more is taken, and "
                                 "closing it leaves the value as it was")
        # The agent's lock: a write waits for a running tick, so that it starts from what
        # the tick committed.
        async with writing.lock, self.agent_lock(writing.index):
            index, path = writing.index, writing.path
            with self.store.read() as txn:
                record = self._writable(txn, index)
                view = _UnwrittenView(self, txn, index)
                entry = state.file(view, path)
                draft = writing.draft
                if draft is None:
                    draft = values.Draft(self.ids.new(), entry.blob, index,
                                         0 if writing.emptied else entry.size)
                    if writing.emptied:
                        draft.cut = 0
                    else:
                        writing.base = (entry.mtime_ns, entry.size)
                staging = plan(txn, draft)
                grew = staging.size - entry.size
                stored = self.storage_bytes(txn, index) + self.pending_delta(txn, index)
            try:
                if staging.size > draft.size and grew > 0:
                    self.check_storage(record, stored, grew)
                writing.draft = draft
                await self._stage(staging)
            except errors.FsError as e:
                writing.refused = e  # the value stays as it was: nothing of this open counts
                self._unempty(writing)
                await self._drop_draft(writing)
                raise

    async def _stage(self, staging: values.Staging) -> None:
        """Take a change into its draft; past SPILL bytes held, put them in the store (a
        commit, but nobody sees them yet).  If that fails the draft is as it was."""
        draft = staging.draft
        before = (dict(draft.dirty), set(draft.staged), set(draft.doomed), draft.size,
                  draft.cut)
        values.absorb(staging)
        if not values.should_spill(draft):
            return
        try:
            await self.committer.commit(lambda t: values.spill(t, self.store, draft))
        except BaseException:
            draft.dirty, draft.staged, draft.doomed, draft.size, draft.cut = before
            raise
        values.spilled(draft)

    async def state_publish(self, writing: OpenWrite, last: bool) -> None:
        """Commit what a file descriptor wrote from outside, as a whole (close, fsync).

        Opened with O_TRUNC, with nothing written yet: a close empties the file for readers
        at once, but commits that only at the last close (`last`: release, fsync) or with
        the next commit of the agent's state.  dd, and a shell's `>`, close a duplicate of
        the descriptor before they write: the old value must outlive a crash until the new
        one is committed."""
        if writing.refused is not None:
            refused, writing.refused = writing.refused, None
            self._unempty(writing)
            raise errors.Repeated(refused.errno, f"state/{writing.path}: a write was refused "
                                 f"({refused.message}); the value is as it was")
        if writing.draft is None and not writing.emptied:
            return
        if writing.draft is None:
            await self._empty_later(writing, last)
            return
        async with writing.lock:
            index, path, draft = writing.index, writing.path, writing.draft
            blob = draft.blob if draft is not None else None

            def publish(view: state.TxnState) -> None:
                entry = view.get(path)
                if entry is None or entry.is_dir or blob not in (None, entry.blob):
                    raise errors.not_held(f"state/{path}: moved or removed while written; "
                                          "what was written through this file is dropped")
                if draft is not None and writing.base not in (None, (entry.mtime_ns,
                                                                     entry.size)):
                    # Its draft patched chunks of the value as it was: committing it would
                    # undo, unseen, what was committed since.
                    raise errors.busy(f"state/{path}: changed (by a tick, or another open "
                                      "file) while this file was open for writing; what was "
                                      "written through it is dropped")
                new = draft
                if new is None:  # emptied by O_TRUNC, nothing written
                    new = values.Draft(self.ids.new(), entry.blob, index, 0, cut=0)
                view.set(path, entry.changed(new.size, new))

            try:
                async with self.agent_lock(index):
                    await self.commit_state(index, publish)
            except errors.FsError:
                await self._drop_draft(writing)
                raise
            finally:
                writing.draft, writing.base, writing.emptied = None, None, False

    async def _empty_later(self, writing: OpenWrite, last: bool) -> None:
        """The file of an O_TRUNC open, empty: unwritten, or now committed (`last`)."""
        index, path = writing.index, writing.path
        async with self.agent_lock(index):
            pending = self._unwritten.setdefault(index, {})
            if path not in pending:
                with self.store.read() as txn:
                    self._writable(txn, index)
                    entry = state.file(_UnwrittenView(self, txn, index), path)
                pending[path] = writing.shown = state.Entry(
                    False, state.now_ns(), 0, entry.blob,
                    values.Draft(self.ids.new(), entry.blob, index, 0, cut=0))
            if last:
                writing.emptied = False
                await self.commit_state(index, lambda view: None)

    def _unempty(self, writing: OpenWrite) -> None:
        """A refused open: its O_TRUNC, if shown and not yet committed, is undone."""
        writing.emptied = False
        pending = self._unwritten.get(writing.index, {})
        if writing.shown is not None and pending.get(writing.path) is writing.shown:
            del pending[writing.path]
            if not pending:
                self._unwritten.pop(writing.index, None)
        writing.shown = None

    def pending_delta(self, txn: Txn, index: int) -> int:
        """What the agent's unwritten files change in its storage (an emptied one frees)."""
        committed = state.TxnState(self.store, txn, index)
        delta = 0
        for path, entry in self._unwritten.get(index, {}).items():
            old = committed.get(path)
            delta += entry.size - (0 if old is None or old.is_dir else old.size)
        return delta

    async def _drop_draft(self, writing: OpenWrite) -> None:
        draft, writing.draft = writing.draft, None
        if draft is not None and draft.registered and not draft.published:
            await self.committer.commit(lambda t: values.discard(t, self.store, draft))

    async def state_forget(self, writing: OpenWrite) -> None:
        """A file descriptor closed after an error: what it staged goes."""
        async with writing.lock:
            await self._drop_draft(writing)

    def state_list(self, index: int, tick: RunningTick | None,
                   path: str) -> list[tuple[str, state.Entry]]:
        if tick is not None:
            return list(tick.overlay.children(path))
        with self.store.read() as txn:
            return list(_UnwrittenView(self, txn, index).children(path))

    async def refused(self, index: int, what: str, error: errors.FsError) -> None:
        """Say in the agent's log what was refused and why, as often as `refusals` lets."""
        await self.refusals.refused(index, {
            "time": rfc3339_now(), "event": "refused", "op": clip(what),
            "errno": _errno_name(error.errno), "error": clip(error.message)})

    async def _log_refusal(self, index: int, entry: dict[str, object]) -> None:
        """A `refused` record, committed on its own."""
        def apply(txn: Txn) -> None:
            if self.store.agent(txn, index) is not None:
                self.log.append(txn, index, entry)

        await self.committer.commit(apply)


def _live(tick: RunningTick) -> None:
    if tick.finished:
        raise errors.FsError(errno.EBADF, "the tick this file was opened in has ended")


class _UnwrittenView:
    """Committed state with the unwritten files over it; `set` records an unwritten file."""

    def __init__(self, runtime: Runtime, txn: Txn, index: int) -> None:
        self.committed = state.TxnState(runtime.store, txn, index)
        self.unwritten = runtime._unwritten.get(index, {})
        self.runtime, self.index = runtime, index

    def get(self, path: str) -> state.Entry | None:
        entry = self.unwritten.get(path)
        return entry if entry is not None else self.committed.get(path)

    def children(self, path: str) -> Iterator[tuple[str, state.Entry]]:
        merged = dict(self.committed.children(path))
        for changed, entry in self.unwritten.items():
            parent, name = state.split(changed)
            if parent == path:
                merged[name] = entry
        yield from sorted(merged.items())

    def set(self, path: str, entry: state.Entry | None) -> None:
        assert entry is not None and not entry.is_dir and not entry.size
        pending = self.runtime._unwritten.setdefault(self.index, {})
        old = pending.get(path)
        if old is not None and old.draft is not None:  # emptied, then created: still empty
            entry = entry._replace(draft=old.draft)
        pending[path] = entry


@dataclass(eq=False)
class OpenWrite:
    """What a file descriptor opened from outside has written to a `state/` file and not
    yet committed: its draft, published whole at close or fsync."""

    index: int
    path: str
    emptied: bool = False  # opened with O_TRUNC: the value is to be empty but for writes
    draft: values.Draft | None = None
    base: tuple[int, int] | None = None  # (mtime, size) of the value the draft patches
    shown: state.Entry | None = None  # its O_TRUNC, shown empty, not yet committed
    refused: errors.FsError | None = None  # a write failed: the value stays as it was
    lock: trio.Lock = dataclass_field(default_factory=trio.Lock)


def _holding(changes: dict[str, state.Entry | None], draft: values.Draft) -> str | None:
    """The path whose entry in a tick's changes holds `draft` (a rename may move it)."""
    for path, entry in changes.items():
        if entry is not None and entry.draft is draft:
            return path
    return None


async def _nothing(name: str) -> None:
    pass


def _describe(command: Command) -> str:
    if command.verb in caps.VERBS:
        return caps.describe(command)
    if command.verb == "token":
        return "token set" if command.args[0] else "token none"
    if command.verb == "alarm":
        alarm = Alarm.from_arg(command.args[0])
        return f"alarm {alarm.describe()}" if alarm else "alarm cancel"
    if command.verb == "idle":
        return f"idle {format_duration(float(command.args[0]))}"
    if command.verb == "wake":
        return f"wake {command.text}".rstrip()
    return " ".join((command.verb, *command.args)) if command.verb != "program" else \
        f"program {quote_program(list(command.args))}"


def _errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


