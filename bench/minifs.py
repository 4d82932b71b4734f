#!/usr/bin/env python3
"""A minimal pyfuse3 file system, the yardstick `bench/run` holds agentfs's `state/` against.

    python bench/minifs.py MOUNTPOINT      # serves in the foreground until unmounted

A small tree kept in memory (files and directories; create, write, read, stat, truncate,
unlink, mkdir, rmdir, readdir, rename).  It is deliberately configured like agentfs so the
comparison is like for like: the same pyfuse3 + trio main loop (min_tasks=4, max_tasks=512),
the same mount options (pyfuse3.default_options), entry_timeout = attr_timeout = 0 on every
reply (so the kernel asks again for each path walk, as it must for agentfs's `state/`), and
direct_io on every open file (no page cache: each read and write reaches the daemon).
What it leaves out is exactly what agentfs adds: durability, transactions, permissions by
caller, the store.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import time
from collections.abc import Sequence

import pyfuse3
import trio


class Node:
    __slots__ = ("inode", "mode", "data", "children", "nlink", "mtime_ns", "lookups")

    def __init__(self, inode: int, mode: int) -> None:
        self.inode = inode
        self.mode = mode
        self.data = bytearray()
        self.children: dict[bytes, int] | None = {} if stat.S_ISDIR(mode) else None
        self.nlink = 2 if stat.S_ISDIR(mode) else 1
        self.mtime_ns = time.time_ns()
        self.lookups = 0


class MiniFs(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self) -> None:
        super().__init__()
        root = Node(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755)
        self.nodes: dict[int, Node] = {root.inode: root}
        self.next_inode = pyfuse3.ROOT_INODE + 1
        self.uid, self.gid = os.getuid(), os.getgid()
        self.dir_handles: dict[int, list[tuple[bytes, int]]] = {}
        self.next_fh = 1

    # -- helpers ---------------------------------------------------------------

    def _node(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _dir(self, inode: int) -> Node:
        node = self._node(inode)
        if node.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return node

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_size = len(node.data)
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        a.entry_timeout = a.attr_timeout = 0.0  # as agentfs: no kernel caching of names/attrs
        return a

    def _new(self, parent_inode: int, name: bytes, mode: int) -> Node:
        parent = self._dir(parent_inode)
        assert parent.children is not None
        if name in parent.children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        node = Node(self.next_inode, mode)
        self.next_inode += 1
        self.nodes[node.inode] = node
        parent.children[name] = node.inode
        if stat.S_ISDIR(mode):
            parent.nlink += 1
        parent.mtime_ns = time.time_ns()
        node.lookups += 1
        return node

    def _drop_if_unused(self, node: Node) -> None:
        if node.nlink == 0 and node.lookups <= 0 and node.inode != pyfuse3.ROOT_INODE:
            self.nodes.pop(node.inode, None)

    def _remove(self, parent_inode: int, name: bytes, want_dir: bool) -> None:
        parent = self._dir(parent_inode)
        assert parent.children is not None
        inode = parent.children.get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = self.nodes[inode]
        if want_dir:
            if node.children is None:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            if node.children:
                raise pyfuse3.FUSEError(errno.ENOTEMPTY)
            parent.nlink -= 1
        elif node.children is not None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        del parent.children[name]
        parent.mtime_ns = time.time_ns()
        node.nlink = 0
        self._drop_if_unused(node)

    # -- names -------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._dir(parent_inode)
        assert parent.children is not None
        inode = parent.children.get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = self.nodes[inode]
        node.lookups += 1
        return self._attrs(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            node = self.nodes.get(inode)
            if node is not None:
                node.lookups -= count
                self._drop_if_unused(node)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if fields.update_size:
            size = attr.st_size
            if size < len(node.data):
                del node.data[size:]
            else:
                node.data.extend(bytes(size - len(node.data)))
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_mtime or fields.update_size:
            node.mtime_ns = attr.st_mtime_ns if fields.update_mtime else time.time_ns()
        return self._attrs(node)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = data.f_bfree = data.f_bavail = 1 << 20
        data.f_files = data.f_ffree = data.f_favail = 1 << 20
        data.f_namemax = 255
        return data

    # -- directories ---------------------------------------------------------------

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._new(parent_inode, name, stat.S_IFDIR | (mode & 0o7777)))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._remove(parent_inode, name, want_dir=True)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._remove(parent_inode, name, want_dir=False)

    async def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old_dir, new_dir = self._dir(parent_old), self._dir(parent_new)
        assert old_dir.children is not None and new_dir.children is not None
        inode = old_dir.children.get(name_old)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name_new in new_dir.children:
            target = self.nodes[new_dir.children[name_new]]
            self._remove(parent_new, name_new, want_dir=target.children is not None)
        del old_dir.children[name_old]
        new_dir.children[name_new] = inode
        if self.nodes[inode].children is not None and parent_old != parent_new:
            old_dir.nlink -= 1
            new_dir.nlink += 1

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._dir(inode)
        assert node.children is not None
        fh = self.next_fh
        self.next_fh += 1
        self.dir_handles[fh] = list(node.children.items())
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self.dir_handles[fh]
        for position in range(start_id, len(entries)):
            name, inode = entries[position]
            node = self.nodes.get(inode)
            if node is None:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attrs(node), position + 1):
                return
            node.lookups += 1

    async def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    # -- files ---------------------------------------------------------------------

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = self._new(parent_inode, name, stat.S_IFREG | (mode & 0o7777))
        return pyfuse3.FileInfo(fh=node.inode, direct_io=True, keep_cache=False), self._attrs(node)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.children is not None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC:
            node.data.clear()
            node.mtime_ns = time.time_ns()
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(self._node(fh).data[off:off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self._node(fh)
        data = node.data
        if off > len(data):
            data.extend(bytes(off - len(data)))
        data[off:off + len(buf)] = buf
        node.mtime_ns = time.time_ns()
        return len(buf)

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(stop_on_signal)
        await pyfuse3.main(min_tasks=4, max_tasks=512)  # as agentfs's daemon
        nursery.cancel_scope.cancel()


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: minifs.py MOUNTPOINT", file=sys.stderr)
        return 2
    options = set(pyfuse3.default_options)  # as agentfs: default_permissions
    options.add("fsname=minifs")
    options.add("subtype=minifs")
    pyfuse3.init(MiniFs(), sys.argv[1], options)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
