"""The served tree, declared once: which files exist, their kinds and modes, and their inodes."""

from __future__ import annotations

import enum
import stat
from dataclasses import dataclass

import pyfuse3


class Kind(enum.Enum):
    ROOT = "root"
    ROOT_CTL = "root ctl"
    ALARMS = "alarms"
    TOKENS = "tokens"
    SECRETS = "secrets"
    STATUS = "status"
    TICKS = ".tick"
    LINK = "name"
    AGENT = "agent"
    CTL = "ctl"
    STATE = "state"
    INBOX = "inbox"
    OUTBOX = "outbox"
    LOG = "log"
    HEAD = "head"
    BUDGET = "budget"
    PLUMB = "plumb"
    PLUMB_RULES = "plumb/rules"
    PLUMB_SEND = "plumb/send"
    PORT = "port"
    NOSTR = "nostr"
    NOSTR_RELAYS = "nostr/relays"
    NOSTR_SINCE = "nostr/since"


@dataclass(frozen=True)
class ServedFile:
    name: str
    kind: Kind
    mode: int
    tick_mode: int  # the mode a running tick sees in its own AGENT_DIR


ROOT_FILES = (
    ServedFile("ctl", Kind.ROOT_CTL, stat.S_IFREG | 0o600, stat.S_IFREG | 0o400),
    ServedFile("plumb", Kind.PLUMB, stat.S_IFDIR | 0o755, stat.S_IFDIR | 0o555),
    # For drivers: the timer's due times, and the HTTP driver's token hashes.
    ServedFile("alarms", Kind.ALARMS, stat.S_IFREG | 0o400, stat.S_IFREG | 0o400),
    ServedFile("tokens", Kind.TOKENS, stat.S_IFREG | 0o400, stat.S_IFREG | 0o000),
    ServedFile("nostr", Kind.NOSTR, stat.S_IFDIR | 0o755, stat.S_IFDIR | 0o555),
    # The owner's secrets, for the egress proxy: reads list them without their values.
    ServedFile("secrets", Kind.SECRETS, stat.S_IFREG | 0o600, stat.S_IFREG | 0o000),
    # The daemon's own figures (ticks/s, commit latency, memory): agentfs ps and top read it.
    ServedFile("status", Kind.STATUS, stat.S_IFREG | 0o400, stat.S_IFREG | 0o000),
)

# nostr/: the Nostr driver's relay list and how far it has read.
NOSTR_FILES = (
    ServedFile("relays", Kind.NOSTR_RELAYS, stat.S_IFREG | 0o600, stat.S_IFREG | 0o400),
    ServedFile("since", Kind.NOSTR_SINCE, stat.S_IFREG | 0o600, stat.S_IFREG | 0o400),
)
# Files whose text is replaced as a whole when a writer closes them.
REPLACED = {Kind.PLUMB_RULES, Kind.NOSTR_RELAYS, Kind.NOSTR_SINCE}
DIRS = {Kind.ROOT, Kind.TICKS, Kind.AGENT, Kind.PLUMB, Kind.NOSTR}

# plumb/ holds these and one file per port the rules name (mode PORT_MODE).
PLUMB_FILES = (
    ServedFile("rules", Kind.PLUMB_RULES, stat.S_IFREG | 0o600, stat.S_IFREG | 0o400),
    ServedFile("send", Kind.PLUMB_SEND, stat.S_IFREG | 0o200, stat.S_IFREG | 0o000),
)
PORT_MODE = stat.S_IFREG | 0o600

AGENT_FILES = (
    ServedFile("ctl", Kind.CTL, stat.S_IFREG | 0o600, stat.S_IFREG | 0o600),
    ServedFile("state", Kind.STATE, stat.S_IFDIR | 0o700, stat.S_IFDIR | 0o700),
    ServedFile("inbox", Kind.INBOX, stat.S_IFREG | 0o600, stat.S_IFREG | 0o600),
    ServedFile("outbox", Kind.OUTBOX, stat.S_IFREG | 0o400, stat.S_IFREG | 0o600),
    ServedFile("log", Kind.LOG, stat.S_IFREG | 0o400, stat.S_IFREG | 0o400),
    # The log's signed head (audit.py), for checking a copy of the log anywhere.
    ServedFile("head", Kind.HEAD, stat.S_IFREG | 0o400, stat.S_IFREG | 0o400),
    ServedFile("budget", Kind.BUDGET, stat.S_IFREG | 0o600, stat.S_IFREG | 0o400),
)
AGENT_FILE_BY_NAME = {f.name: f for f in AGENT_FILES}
SERVED_BY_KIND = {f.kind: f for f in (*ROOT_FILES, *AGENT_FILES, *PLUMB_FILES, *NOSTR_FILES)}
CHILDREN = {Kind.PLUMB: PLUMB_FILES, Kind.NOSTR: NOSTR_FILES}

JOURNALS = {Kind.OUTBOX, Kind.LOG}


@dataclass(frozen=True)
class Node:
    """One thing in the tree.  `tick` marks the running tick's view under `.tick/<npub>`."""

    kind: Kind
    index: int = -1
    path: str = ""
    tick: bool = False

    @property
    def is_dir(self) -> bool:
        return self.kind in DIRS or (
            self.kind is Kind.STATE and self.path == "")

    def child_state(self, name: str) -> Node:
        path = f"{self.path}/{name}" if self.path else name
        return Node(Kind.STATE, self.index, path, self.tick)


ROOT = Node(Kind.ROOT)


class InodeTable:
    """Inode numbers for nodes the kernel holds, dropped again when it forgets them."""

    def __init__(self) -> None:
        self._by_node: dict[Node, int] = {ROOT: pyfuse3.ROOT_INODE}
        self._by_inode: dict[int, Node] = {pyfuse3.ROOT_INODE: ROOT}
        self._lookups: dict[int, int] = {}
        self._next = pyfuse3.ROOT_INODE + 1

    def __len__(self) -> int:
        return len(self._by_inode)

    def inode(self, node: Node) -> int:
        """The inode for `node`, counting one more kernel reference to it."""
        inode = self._by_node.get(node)
        if inode is None:
            inode = self._next
            self._next += 1
            self._by_node[node] = inode
            self._by_inode[inode] = node
        self._lookups[inode] = self._lookups.get(inode, 0) + 1
        return inode

    def node(self, inode: int) -> Node | None:
        return self._by_inode.get(inode)

    def forget(self, inode: int, count: int) -> None:
        left = self._lookups.get(inode, 0) - count
        if left > 0:
            self._lookups[inode] = left
            return
        self._lookups.pop(inode, None)
        node = self._by_inode.pop(inode, None)
        if node is not None and node != ROOT:
            del self._by_node[node]
        elif node == ROOT:
            self._by_inode[inode] = ROOT

    def rename(self, old: Node, new: Node) -> None:
        """Keep inodes under a renamed path pointing at their new paths."""
        prefix = old.path + "/"
        moved = [
            (node, inode) for node, inode in self._by_node.items()
            if node.kind is Kind.STATE and node.index == old.index and node.tick == old.tick
            and (node.path == old.path or node.path.startswith(prefix))
        ]
        for node, _inode in moved:
            del self._by_node[node]
        for node, inode in moved:
            path = new.path + node.path[len(old.path):]
            renamed = Node(Kind.STATE, new.index, path, new.tick)
            stale = self._by_node.pop(renamed, None)
            if stale is not None:
                self._by_inode.pop(stale, None)
                self._lookups.pop(stale, None)
            self._by_node[renamed] = inode
            self._by_inode[inode] = renamed
