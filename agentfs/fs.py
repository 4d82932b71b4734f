"""The FUSE operations: map inodes to nodes of the tree and delegate to the runtime.

Every handler is small: find the node, check who is asking (a tick may touch only its
own agent), call the runtime, and turn an `FsError` into its errno after logging it
in the agent's log.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyfuse3
import trio

from . import errors, state
from .inbox import MAX_LINE
from .refusals import clip
from .runtime import OpenWrite, Runtime
from .ticks import RunningTick
from .tree import (
    AGENT_FILE_BY_NAME,
    AGENT_FILES,
    CHILDREN,
    DIRS,
    JOURNALS,
    PORT_MODE,
    REPLACED,
    ROOT_FILES,
    SERVED_BY_KIND,
    InodeTable,
    Kind,
    Node,
)

T = TypeVar("T")
REFUSED = 1 << 40  # a handle flag beyond open(2)'s: a write through it was refused
TRUNCATED = 1 << 41  # opened with O_TRUNC: closing it replaces the text, even with nothing
OVERLONG = 1 << 42  # a line written through it passed MAX_LINE: it was dropped, and so is the rest
logger = logging.getLogger("agentfs")

# Directories and files of the fixed tree never move and their attributes do not change
# (but for journal sizes), so the kernel may cache them.  Access is still checked at every
# lookup, open and opendir: a cached entry grants nothing.  `state/` entries are not
# cached: a tick's commit changes them behind the kernel's back.
STABLE_TIMEOUT = 60.0
# `.tick/` may be passed through by agents' uids but not listed; an agent's directory is
# its owner's alone (the mount's owner, or under `.tick/` the agent's uid).
DIR_MODES = {Kind.TICKS: 0o711, Kind.AGENT: 0o700}
ROOT_NAMES = frozenset(f.name for f in ROOT_FILES)


@dataclass
class Handle:
    node: Node
    tick: RunningTick | None
    flags: int
    content: bytes | None = None  # a generated file's text, made when read from offset 0
    partial: bytearray = field(default_factory=bytearray)  # an inbox/outbox line not yet ended
    replies: bytearray = field(default_factory=bytearray)  # root ctl: the npubs created here
    writing: OpenWrite | None = None  # a state/ file opened from outside for writing


@dataclass
class DirHandle:
    node: Node
    tick: RunningTick | None
    entries: list[tuple[str, Node]]


class AgentFs(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, runtime: Runtime) -> None:
        super().__init__()
        self.runtime = runtime
        self.inodes = InodeTable()
        self._handles: dict[int, Handle | DirHandle] = {}
        self._next_fh = 1
        self._uid, self._gid = os.getuid(), os.getgid()
        self._mounted_ns = time.time_ns()
        runtime.name_dropped = self._drop_name

    async def _drop_name(self, name: str) -> None:
        """A name now means nothing (or another agent): the kernel must ask us again.

        Awaited, so the ctl write that renamed the agent returns only once the old name is
        gone; from a worker thread, since the kernel may call back into us meanwhile.
        """
        with contextlib.suppress(OSError):
            await trio.to_thread.run_sync(
                pyfuse3.invalidate_entry, pyfuse3.ROOT_INODE, os.fsencode(name))

    # -- plumbing --------------------------------------------------------------

    def _node(self, inode: int) -> Node:
        node = self.inodes.node(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _handle(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if not isinstance(handle, Handle):
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    def _new_fh(self, handle: Handle | DirHandle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    @asynccontextmanager
    async def _refusals(self, node: Node, what: str, log: bool = True) -> AsyncIterator[None]:
        """FsError -> FUSEError, with a line in the agent's log for what was refused."""
        try:
            yield
        except errors.FsError as e:
            log = log and not isinstance(e, errors.Repeated)
            if log and node.index >= 0:
                await self.runtime.refused(node.index, what, e)
            elif log:
                # No agent's log to say it in.
                logger.info("refused %s: %s", clip(what), clip(e.message))
            raise pyfuse3.FUSEError(e.errno) from None

    async def _check(self, node: Node, ctx: pyfuse3.RequestContext, write: bool,
                     what: str) -> RunningTick | None:
        """Who may touch `node`: returns the tick whose view it is, or None for committed.

        A tick's processes see only their own agent; its writes go through AGENT_DIR.
        Everyone else sees committed state and cannot enter `.tick/`.
        """
        engine = self.runtime.engine
        try:
            caller = engine.tick_of_caller(ctx.pid, ctx.uid)
        except errors.FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        refusal: errors.FsError | None = None
        if node.tick:
            tick = engine.running.get(node.index)
            if tick is not None and caller is tick:
                return tick
            refusal = errors.denied(f"{what}: .tick/ is only for the agent's running tick")
        elif caller is not None and node.kind is Kind.TOKENS:
            refusal = errors.denied(f"{what}: no agent reads the tokens' hashes")
        elif caller is not None and node.kind is Kind.SECRETS:
            refusal = errors.denied(f"{what}: secrets are the owner's; a tick's requests get "
                                    "them through the egress proxy")
        elif caller is not None and node.index >= 0 and node.index != caller.index:
            refusal = errors.denied(f"{what}: a tick may not touch another agent's files")
        elif caller is not None and write:
            refusal = errors.denied(f"{what}: a tick writes through $AGENT_DIR")
        if refusal is None:
            return None
        if caller is not None:
            await self.runtime.refused(caller.index, what, refusal)
        raise pyfuse3.FUSEError(refusal.errno)

    def _attrs(self, node: Node, inode: int,
               tick: RunningTick | None = None) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.st_uid, attrs.st_gid = self._owner(node)
        attrs.st_blksize = 4096
        attrs.entry_timeout = attrs.attr_timeout = 0.0
        mtime = self._mounted_ns
        kind = node.kind
        if kind is Kind.PORT:
            attrs.st_mode = PORT_MODE
            attrs.st_nlink = 1
        elif kind in DIRS:
            attrs.st_mode = stat.S_IFDIR | DIR_MODES.get(kind, 0o755)
            attrs.st_nlink = 2
            attrs.entry_timeout = attrs.attr_timeout = STABLE_TIMEOUT
        elif kind is Kind.LINK:
            attrs.st_mode = stat.S_IFLNK | 0o777
            attrs.st_nlink = 1
            attrs.st_size = len(self._link_target(node))
            attrs.entry_timeout = attrs.attr_timeout = STABLE_TIMEOUT  # see _drop_name
        elif kind is Kind.STATE:
            entry = self.runtime.state_read(node.index, tick, node.path)
            if entry is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            served = SERVED_BY_KIND[Kind.STATE]
            if entry.is_dir:
                attrs.st_mode = served.mode
                attrs.st_nlink = 2
                if node.path == "":
                    attrs.entry_timeout = attrs.attr_timeout = STABLE_TIMEOUT
            else:
                attrs.st_mode = stat.S_IFREG | 0o600
                attrs.st_nlink = 1
                attrs.st_size = entry.size
            mtime = entry.mtime_ns or mtime
        else:
            served = SERVED_BY_KIND[kind]
            attrs.st_mode = served.tick_mode if node.tick else served.mode
            attrs.st_nlink = 1
            attrs.entry_timeout = attrs.attr_timeout = STABLE_TIMEOUT
            if kind in JOURNALS:
                attrs.st_size = self._journal_size(node, tick)
                attrs.attr_timeout = 0.0  # they grow
                mtime = time.time_ns()
        attrs.st_size = max(attrs.st_size, 0)
        attrs.st_blocks = (attrs.st_size + 511) // 512
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = mtime
        return attrs

    def _owner(self, node: Node) -> tuple[int, int]:
        """Who owns a node, for the kernel's permission checks: a tick's own view belongs to
        its agent's uid (sandboxed), everything else to the mount's owner."""
        box = self.runtime.sandbox
        if node.tick and box is not None:
            uid = box.uid(node.index)
            return uid, uid
        return self._uid, self._gid

    def _link_target(self, node: Node) -> bytes:
        with self.runtime.store.read() as txn:
            record = self.runtime.store.require_agent(txn, node.index)
        return record.npub.encode()

    def _journal_size(self, node: Node, tick: RunningTick | None) -> int:
        journal = self.runtime.outbox if node.kind is Kind.OUTBOX else self.runtime.log
        with self.runtime.store.read() as txn:
            size = journal.size(txn, node.index)
        if tick is not None and node.kind is Kind.OUTBOX:
            size += len(self.runtime.overlay_outbox_bytes(tick))
        return size

    # -- names -------------------------------------------------------------------

    def _child(self, parent: Node, name: str) -> Node:
        if parent.kind is Kind.ROOT:
            for served in ROOT_FILES:
                if served.name == name:
                    return Node(served.kind)
            if name == ".tick":
                return Node(Kind.TICKS)
            with self.runtime.store.read() as txn:
                index = self.runtime.resolve(txn, name)
            if index is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return Node(Kind.AGENT if name.startswith("npub1") else Kind.LINK, index)
        if parent.kind is Kind.TICKS:
            with self.runtime.store.read() as txn:
                index = self.runtime.resolve(txn, name) if name.startswith("npub1") else None
            if index is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return Node(Kind.AGENT, index, tick=True)
        if parent.kind in CHILDREN:
            for served in CHILDREN[parent.kind]:
                if served.name == name:
                    return Node(served.kind)
            if parent.kind is Kind.PLUMB and name in self.runtime.plumbing.ports():
                return Node(Kind.PORT, path=name)
            raise pyfuse3.FUSEError(errno.ENOENT)
        if parent.kind is Kind.AGENT:
            file = AGENT_FILE_BY_NAME.get(name)
            if file is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return Node(file.kind, parent.index, tick=parent.tick)
        if parent.kind is Kind.STATE:
            return parent.child_state(name)
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        text = _name(name, errno.ENOENT)  # a name that is not UTF-8 names nothing here
        child = self._child(parent, text)
        tick = await self._check(child, ctx, write=False, what=f"lookup {text}")
        attrs = self._attrs(child, 0, tick)  # raises ENOENT before an inode is spent
        attrs.st_ino = self.inodes.inode(child)
        return attrs

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.inodes.forget(inode, count)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        tick = await self._check(node, ctx, write=False, what="stat")
        return self._attrs(node, inode, tick)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if node.kind is not Kind.LINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self._link_target(node)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        disk = os.statvfs(self.runtime.store.path)
        data = pyfuse3.StatvfsData()
        data.f_bsize, data.f_frsize = disk.f_bsize, disk.f_frsize
        data.f_blocks, data.f_bfree, data.f_bavail = disk.f_blocks, disk.f_bfree, disk.f_bavail
        data.f_files, data.f_ffree, data.f_favail = disk.f_files, disk.f_ffree, disk.f_favail
        data.f_namemax = state.MAX_NAME
        return data

    # -- directories -----------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        tick = await self._check(node, ctx, write=False, what="list")
        entries: list[tuple[str, Node]] = []
        if node.kind is Kind.ROOT:
            entries = [(f.name, Node(f.kind)) for f in ROOT_FILES]
            with self.runtime.store.read() as txn:
                for record in self.runtime.store.agents(txn):
                    entries.append((record.npub, Node(Kind.AGENT, record.index)))
                    # A name taken before a root file of that name came (`status`) is
                    # hidden by the file: listed once, as the file that lookup finds.
                    if record.name and record.name not in ROOT_NAMES:
                        entries.append((record.name, Node(Kind.LINK, record.index)))
        elif node.kind is Kind.AGENT:
            entries = [(f.name, Node(f.kind, node.index, tick=node.tick)) for f in AGENT_FILES]
        elif node.kind in CHILDREN:
            entries = [(f.name, Node(f.kind)) for f in CHILDREN[node.kind]]
            if node.kind is Kind.PLUMB:
                entries += [(p, Node(Kind.PORT, path=p)) for p in self.runtime.plumbing.ports()]
        elif node.kind is Kind.STATE:
            entry = self.runtime.state_read(node.index, tick, node.path)
            if entry is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if not entry.is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            entries = [(name, node.child_state(name))
                       for name, _e in self.runtime.state_list(node.index, tick, node.path)]
        elif node.kind is not Kind.TICKS:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return self._new_fh(DirHandle(node, tick, entries))

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._handles[fh]
        assert isinstance(handle, DirHandle)
        for position in range(start_id, len(handle.entries)):
            name, child = handle.entries[position]
            try:
                attrs = self._attrs(child, 0, handle.tick)
            except (pyfuse3.FUSEError, errors.FsError):
                continue  # gone since opendir
            # A reply the kernel accepts counts as a lookup; one it refuses does not.
            attrs.st_ino = self.inodes.inode(child)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, position + 1):
                self.inodes.forget(attrs.st_ino, 1)
                return

    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._state_child(parent_inode, name)
        tick = await self._check(node, ctx, write=True, what=f"mkdir state/{node.path}")
        async with self._refusals(node, f"mkdir state/{node.path}"):
            await self.runtime.state_op(node.index, tick, lambda v: state.mkdir(v, node.path))
        return self._attrs(node, self.inodes.inode(node), tick)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._state_child(parent_inode, name)
        tick = await self._check(node, ctx, write=True, what=f"rmdir state/{node.path}")
        async with self._refusals(node, f"rmdir state/{node.path}"):
            await self.runtime.state_op(node.index, tick, lambda v: state.rmdir(v, node.path))

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._state_child(parent_inode, name)
        tick = await self._check(node, ctx, write=True, what=f"rm state/{node.path}")
        async with self._refusals(node, f"rm state/{node.path}"):
            await self.runtime.state_op(node.index, tick, lambda v: state.unlink(v, node.path))

    async def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        old = self._state_child(parent_old, name_old)
        new = self._state_child(parent_new, name_new)
        what = f"mv state/{old.path} state/{new.path}"
        if (old.index, old.tick) != (new.index, new.tick):
            raise pyfuse3.FUSEError(errno.EXDEV)
        tick = await self._check(old, ctx, write=True, what=what)

        def move(view: state.StateView) -> None:
            if flags & pyfuse3.RENAME_EXCHANGE:
                raise errors.invalid(f"{what}: exchanging files is not supported")
            if flags & pyfuse3.RENAME_NOREPLACE and view.get(new.path) is not None:
                raise errors.exists(f"state/{new.path}")
            state.rename(view, old.path, new.path)

        async with self._refusals(old, what):
            await self.runtime.state_op(old.index, tick, move)
        self.inodes.rename(old, new)
        for handle in self._handles.values():  # what is written through them follows
            writing = handle.writing if isinstance(handle, Handle) else None
            if writing is not None and writing.index == old.index and tick is None and (
                    writing.path == old.path or writing.path.startswith(old.path + "/")):
                writing.path = new.path + writing.path[len(old.path):]

    def _state_child(self, parent_inode: int, name: bytes) -> Node:
        parent = self._node(parent_inode)
        if parent.kind is not Kind.STATE:
            raise pyfuse3.FUSEError(errno.EACCES if parent.kind is not Kind.ROOT else errno.EPERM)
        return parent.child_state(_name(name, errno.EINVAL))

    # -- files -----------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        tick = await self._check(node, ctx, write=writing and not node.tick,
                                 what=f"open {node.kind.value}")
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if writing and node.kind in (Kind.LOG, Kind.HEAD):
            await self._refuse(node, f"open {node.kind.value} for writing",
                               f"{node.kind.value}: the audit trail is read-only")
        if writing and node.kind is Kind.OUTBOX and tick is None:
            await self._refuse(node, "open outbox for writing",
                               "outbox: only the agent's own ticks append to it, through "
                               "$AGENT_DIR/outbox")
        if writing and node.kind is Kind.BUDGET and tick is not None:
            await self._refuse(node, "open budget for writing",
                               "budget: an agent cannot change its own limits")
        if node.kind is Kind.STATE and self.runtime.state_read(node.index, tick, node.path) is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        handle = Handle(node, tick, flags)
        if node.kind is Kind.STATE and writing and tick is not None and flags & os.O_TRUNC:
            async with self._refusals(node, f"truncate state/{node.path}"):
                await self.runtime.state_truncate(node.index, tick, node.path, 0)
        elif node.kind is Kind.STATE and writing and tick is None:
            # Emptied by O_TRUNC (atomic_o_trunc is on) when the new value is committed.
            handle.writing = OpenWrite(node.index, node.path, emptied=bool(flags & os.O_TRUNC))
        if node.kind in REPLACED and writing and flags & os.O_TRUNC:
            handle.flags |= TRUNCATED
        fh = self._new_fh(handle)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    async def _refuse(self, node: Node, what: str, why: str) -> None:
        async with self._refusals(node, what):
            raise errors.denied(why)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = self._state_child(parent_inode, name)
        tick = await self._check(node, ctx, write=True, what=f"create state/{node.path}")
        async with self._refusals(node, f"create state/{node.path}"):
            await self.runtime.state_empty(node.index, tick, node.path)
        writing = OpenWrite(node.index, node.path) if tick is None else None
        fh = self._new_fh(Handle(node, tick, flags, writing=writing))
        attrs = self._attrs(node, self.inodes.inode(node), tick)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False), attrs

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        changing = fields.update_size or fields.update_mtime
        tick = await self._check(node, ctx, write=bool(changing) and not node.tick,
                                 what=f"setattr {node.kind.value}")
        if node.kind is Kind.STATE and not node.is_dir:
            async with self._refusals(node, f"truncate state/{node.path}"):
                if fields.update_size:
                    # ftruncate(2) from outside goes in the file descriptor's draft.
                    handle = self._handles.get(fh) if fh is not None else None
                    writing = handle.writing if isinstance(handle, Handle) else None
                    await self.runtime.state_truncate(node.index, tick, node.path,
                                                      attr.st_size, writing)
                else:
                    await self.runtime.state_op(node.index, tick, lambda v: _touch(v, node.path))
        elif fields.update_size and node.kind in JOURNALS:
            await self._refuse(node, f"truncate {node.kind.value}",
                               f"{node.kind.value}: append-only, cannot be truncated")
        # Truncating ctl, inbox or budget (O_TRUNC from `>`) is a no-op: writes are commands.
        return self._attrs(node, inode, tick)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handle(fh)
        node, tick = handle.node, handle.tick
        kind = node.kind
        if kind is Kind.STATE:
            try:
                return self.runtime.state_read_at(node.index, tick, node.path, off, size,
                                                  handle.writing)
            except errors.FsError as e:
                raise pyfuse3.FUSEError(e.errno) from None
        if kind in JOURNALS:
            return self._read_journal(node, tick, off, size)
        if kind is Kind.PLUMB_SEND:
            return b""
        if kind is Kind.PORT:
            # One message a read (or several reads of a long one); waits until one is queued.
            if not handle.replies:
                handle.replies = bytearray(await self.runtime.plumbing.take(node.path, fh))
            chunk = bytes(handle.replies[:size])
            del handle.replies[:size]
            return chunk
        if kind is Kind.ROOT_CTL:
            # The fd's offset has moved past what was written; replies are read in order.
            reply = bytes(handle.replies[:size])
            del handle.replies[:size]
            return reply
        if handle.content is None or off == 0:
            async with self._refusals(node, f"read {kind.value}", log=False):
                handle.content = self._generate(node, tick)
        return handle.content[off:off + size]

    def _generate(self, node: Node, tick: RunningTick | None) -> bytes:
        if node.kind is Kind.CTL:
            return self.runtime.ctl_text(node.index, tick)
        if node.kind is Kind.BUDGET:
            return self.runtime.budget_text(node.index)
        if node.kind is Kind.HEAD:
            return self.runtime.head_text(node.index)
        if node.kind is Kind.PLUMB_RULES:
            return self.runtime.plumbing.rules_text()
        if node.kind is Kind.NOSTR_RELAYS:
            return self.runtime.nostr.relays_text()
        if node.kind is Kind.NOSTR_SINCE:
            return self.runtime.nostr.since_text()
        if node.kind is Kind.ALARMS:
            return self.runtime.alarms_text()
        if node.kind is Kind.TOKENS:
            return self.runtime.tokens_text()
        if node.kind is Kind.STATUS:
            return self.runtime.status_text()
        if node.kind is Kind.SECRETS:
            return self.runtime.secrets.text()
        return self.runtime.inbox_text(node.index, tick)

    def _read_journal(self, node: Node, tick: RunningTick | None, off: int, size: int) -> bytes:
        journal = self.runtime.outbox if node.kind is Kind.OUTBOX else self.runtime.log
        with self.runtime.store.read() as txn:
            committed = journal.size(txn, node.index)
            data = journal.read(txn, node.index, off, size) if off < committed else b""
        if tick is not None and node.kind is Kind.OUTBOX and len(data) < size:
            pending = self.runtime.overlay_outbox_bytes(tick)
            start = max(0, off - committed)
            data += pending[start:start + size - len(data)]
        return data

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handle(fh)
        node, tick, kind = handle.node, handle.tick, handle.node.kind
        runtime = self.runtime
        async with self._refusals(node, f"write {kind.value}"):
            if kind is Kind.STATE:
                await runtime.state_write(node.index, tick, node.path, off, buf,
                                          bool(handle.flags & os.O_APPEND), handle.writing)
            elif kind is Kind.ROOT_CTL:
                for npub in await runtime.create_agents(buf):
                    handle.replies += npub.encode() + b"\n"
            elif kind is Kind.CTL:
                await runtime.agent_ctl(node.index, buf, tick)
            elif kind is Kind.BUDGET:
                await runtime.budget_write(node.index, buf, tick)
            elif kind in REPLACED:
                # The new text takes effect as a whole at close; a text that ends a line is
                # checked at once, so that the writer hears of a mistake from write(2).
                text = bytes(handle.partial) + buf
                if text.endswith(b"\n"):
                    try:
                        self._replacer(kind)[0](text, False)
                    except errors.FsError:
                        handle.flags |= REFUSED  # nothing of this open replaces the text
                        raise
                handle.partial = bytearray(text)
            elif kind is Kind.PLUMB_SEND:
                await runtime.plumbing.send(buf)
            elif kind is Kind.SECRETS:
                await runtime.secrets.write(buf)
            elif kind is Kind.PORT:
                await runtime.plumbing.ack(node.path, buf, fh)
            elif kind in (Kind.INBOX, Kind.OUTBOX):
                return await self._write_lines(handle, buf)
            else:
                raise errors.denied(f"{kind.value}: read-only")
        return len(buf)

    async def _write_lines(self, handle: Handle, buf: bytes) -> int:
        """Deliver the lines `buf` ends; keep the partial line after them for the next write.

        Only `buf` is searched, and a partial line is appended to, never copied whole but
        when it ends: a long line written in small pieces costs its length, not its square.
        A write(2) comes in pieces of at most FUSE's max_write (1 MiB at most), so only the
        line it continues, or the one it leaves unended, can pass MAX_LINE.
        """
        kind = handle.node.kind.value
        if handle.flags & OVERLONG:
            raise errors.too_long(f"{kind}: a line over {MAX_LINE} bytes was dropped; "
                                  "nothing more is taken through this open file")
        end = buf.rfind(b"\n") + 1
        if not end:
            self._keep(handle, buf)
            return len(buf)
        if len(handle.partial) + buf.find(b"\n") > MAX_LINE:
            self._too_long(handle)
        before = self._unkept(handle)
        try:
            await self._deliver(handle, before + buf[:end])
        except errors.FsError:
            self._keep(handle, before, check=False)  # a refused write leaves it as it was
            raise
        try:
            self._keep(handle, buf[end:])
        except errors.FsError:
            return end  # a short write: the lines went, the writer hears why when it goes on
        return len(buf)

    def _keep(self, handle: Handle, data: bytes, check: bool = True) -> None:
        """Buffer `data`, more of a line not yet ended: the daemon holds it for the writer,
        and a tick's partial lines count in what it may hold (`Runtime.hold`)."""
        if check and len(handle.partial) + len(data) > MAX_LINE:
            self._too_long(handle)
        if handle.tick is not None and data:
            if check:
                self.runtime.hold(handle.tick, handle.node.kind.value, partial=len(data))
            else:
                handle.tick.overlay.partial_bytes += len(data)
        handle.partial += data

    def _unkept(self, handle: Handle) -> bytes:
        """The partial line, no longer buffered."""
        rest = bytes(handle.partial)
        self._drop(handle)
        return rest

    def _drop(self, handle: Handle) -> None:
        if handle.tick is not None:
            handle.tick.overlay.partial_bytes -= len(handle.partial)
        handle.partial = bytearray()

    def _too_long(self, handle: Handle) -> None:
        """Drop the line: what follows it in later writes would otherwise pass for a line."""
        self._drop(handle)
        handle.flags |= OVERLONG
        raise errors.too_long(f"{handle.node.kind.value}: a line over {MAX_LINE} bytes: "
                              "dropped, with all that follows through this open file")

    async def _deliver(self, handle: Handle, lines: bytes) -> None:
        node = handle.node
        if node.kind is Kind.INBOX:
            await self.runtime.inbox_write(node.index, lines, handle.tick)
        else:
            self.runtime.outbox_write(lines, handle.tick)

    async def flush(self, fh: int) -> None:
        await self._commit_pending(fh, last=False)

    async def _commit_pending(self, fh: int, last: bool) -> None:
        """What a close(2), the last close (`last`: release) or fsync(2) commits: a state/
        file's new value, a partial line."""
        handle = self._handles.get(fh)
        if isinstance(handle, Handle) and handle.node.kind is Kind.STATE and handle.tick is None:
            async with self._refusals(handle.node, f"close state/{handle.node.path}"):
                if handle.writing is not None:
                    await self.runtime.state_publish(handle.writing, last)
                await self.runtime.settle(handle.node.index)
        if isinstance(handle, Handle) and handle.partial:
            rest = self._unkept(handle)
            kind = handle.node.kind
            async with self._refusals(handle.node, f"write {kind.value}"):
                if kind in REPLACED:
                    handle.flags &= ~TRUNCATED  # replaced: the empty text is not wanted
                    if handle.flags & REFUSED:
                        raise errors.invalid(f"{kind.value}: a write was refused; unchanged")
                    await self._replacer(kind)[1](rest)
                else:
                    await self._deliver(handle, rest)

    def _replacer(self, kind: Kind) -> tuple[Callable[[bytes, bool], object],
                                              Callable[[bytes], Awaitable[None]]]:
        """How a file replaced as a whole is checked, and set."""
        runtime = self.runtime
        if kind is Kind.PLUMB_RULES:
            return runtime.plumbing.check_rules, runtime.plumbing.set_rules
        if kind is Kind.NOSTR_RELAYS:
            return runtime.nostr.check_relays, runtime.nostr.set_relays
        return runtime.nostr.check_since, runtime.nostr.set_since

    async def release(self, fh: int) -> None:
        handle = self._handles.get(fh)
        if not isinstance(handle, Handle):
            self._handles.pop(fh, None)
            return
        try:  # release cannot report an error: what it refuses is logged
            with trio.CancelScope(shield=True), contextlib.suppress(pyfuse3.FUSEError):
                if handle.partial or handle.writing is not None:
                    await self._commit_pending(fh, last=True)
                if handle.flags & TRUNCATED and not handle.flags & REFUSED:
                    # `: > rules` wrote nothing: the text is now empty.  Not at flush, which
                    # a shell's `>` calls (closing the fd it dup2'd) before anything is written.
                    kind = handle.node.kind
                    async with self._refusals(handle.node, f"truncate {kind.value}"):
                        await self._replacer(kind)[1](b"")
        finally:
            if handle.node.kind is Kind.PORT:
                self.runtime.plumbing.release(handle.node.path, fh)
            self._handles.pop(fh, None)

    async def fsync(self, fh: int, datasync: bool) -> None:
        # Other writes are durable when acknowledged; a state/ file's are committed now.
        await self._commit_pending(fh, last=True)

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True


def _name(name: bytes, code: int) -> str:
    """A file name as text: names are UTF-8 (they are LMDB keys and JSON in the log)."""
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise pyfuse3.FUSEError(code) from None


def _guarded(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """An unexpected exception in a handler becomes EIO: a bug must not end the mount."""

    @functools.wraps(handler)
    async def guarded(*args: Any) -> T:
        try:
            return await handler(*args)
        except (pyfuse3.FUSEError, trio.Cancelled):
            raise
        except errors.FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception:
            logger.exception("%s failed", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return guarded


for _op in ("lookup", "getattr", "readlink", "statfs", "opendir", "readdir", "mkdir", "rmdir",
            "unlink", "rename", "open", "create", "setattr", "read", "write", "flush", "release",
            "fsync", "forget", "releasedir"):
    setattr(AgentFs, _op, _guarded(getattr(AgentFs, _op)))


def _touch(view: state.StateView, path: str) -> None:
    entry = state.lookup(view, path)
    view.set(path, entry._replace(mtime_ns=state.now_ns()))
