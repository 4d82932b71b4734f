"""The LMDB store: one environment holding every agent's record, memory, queues and journals.

Layout (named databases; an agent is its 4-byte big-endian creation index `ix`):
    meta      b"mnemonic", b"next_index", b"version"
    agents    ix -> AgentRecord as JSON
    pubkeys   32-byte x-only pubkey -> ix
    names     name -> ix
    state     ix + parent path + b"\\0" + name -> entry: a file's size and blob (state.py)
    chunks    blob + chunk number + gen (8 bytes each) -> up to 256 KiB of a value (values.py)
    drafts    gen -> ix + blob: drafts not yet published, whose chunks readers skip
    inbox     ix + seq (8 bytes) -> message JSON (pending triggers; consumed ones are deleted)
    outbox    ix + byte offset (8 bytes) -> one JSON line (see journal.py)
    log       ix + byte offset (8 bytes) -> one JSON line
    counters  ix + counter name -> 8-byte integer
    seen      ix + message id -> seq: ids accepted (pending or consumed), so a retry is dropped
    ports     port name + b"\\0" + seq (8 bytes) -> a plumb message queued for drivers
    alarms    due time (8 bytes, unix ms) + ix -> b"": every agent's alarm (see alarms.py)
    awake     ix -> b"": agents the daemon must keep an eye on after a restart (creating,
              active, or with a lifecycle trigger to run); kept by `put_agent`
    tokens    ix -> b"": agents with a bearer token (the root file `tokens`); by `put_agent`
    secrets   name -> the root file `secrets`' entry, its value sealed (see factotum.py)
    keys      ix -> the private key of an agent imported from a store of another mnemonic,
              sealed (see keyring.py); every other agent's key derives from the mnemonic
    heads     ix -> the signed head of the agent's log, a Nostr event as JSON (see audit.py)
    publish   ix -> b"": agents whose heads go out through the nostr port; by `put_agent`
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from . import errors, values
from .identity import npub_encode

# 2: lifecycle hooks, the awake index, alarms; 3: imported keys, which an agentfs that
# knew only derived keys would silently sign with the wrong key for; 4: the log's hash
# chain and its signed heads, which an older agentfs would break with unchained records;
# 5: state values in chunks (values.py), which an older agentfs would read as garbage.
STORE_VERSION = 5
# How far the Nostr driver has read (unix seconds): from the store's birth at first.
NOSTR_SINCE_KEY = b"nostr-since"
DB_NAMES = ("meta", "agents", "pubkeys", "names", "state", "inbox", "outbox", "log", "counters",
            "seen", "ports", "alarms", "awake", "tokens", "secrets", "keys", "heads", "publish",
            "chunks", "drafts")

# Address space only: LMDB grows the file as pages are written, not to the map size.
DEFAULT_MAP_SIZE = (1 << 40) if sys.maxsize > 2**32 else (1 << 30)
# A daemon maps twice what the file holds (at least this), and doubles the map when a
# commit finds it full, up to its largest (`-o map_size`): so a full map is a real limit.
MIN_MAP_SIZE = 8 << 20

Txn = lmdb.Transaction


def _pages(size: int) -> int:
    """`size` rounded up to whole pages, as LMDB wants a map size."""
    page = os.sysconf("SC_PAGE_SIZE")
    return -(-size // page) * page


def agent_key(index: int) -> bytes:
    return index.to_bytes(4, "big")


def scan_prefix(txn: Txn, db: Any, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Every (key after `prefix`, value) whose key starts with `prefix`, in key order."""
    cursor = txn.cursor(db=db)
    if not cursor.set_range(prefix):
        return
    for key, value in cursor:
        key = bytes(key)
        if not key.startswith(prefix):
            return
        yield key[len(prefix):], bytes(value)


def default_store_path() -> Path:
    if env := os.environ.get("AGENTFS_STORE"):
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(data) / "agentfs"


@dataclass
class AgentRecord:
    """What the store keeps about one agent besides its memory and queues."""

    index: int
    pubkey: str
    name: str | None = None
    program: list[str] | None = None
    status: str = "creating"  # creating | active | dormant | failed | terminated
    ticks: int = 0
    last: str | None = None
    created: str = ""
    limits: dict[str, float] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)
    failures: int = 0
    max_failures: int = 3
    checkpoint: dict[str, Any] | None = None  # {"seq": trigger seq, "count": n} mid-tick
    hook: str | None = None  # a lifecycle trigger still to run: create wake sleep terminate error
    hook_error: str | None = None  # why the agent failed, for its `error` trigger
    failed_hook: str | None = None  # the create or wake whose failure failed it: owed again
    idle: float | None = None  # seconds idle before it hibernates (None: the default)
    serve: bool = False  # one long-lived program serves its ticks (served.py)
    hooks: list[str] | None = None  # the lifecycle triggers that run its program (None: all)
    alarm: dict[str, Any] | None = None  # see alarms.Alarm
    token: str | None = None  # SHA-256 (hex) of the bearer token the HTTP driver checks
    caps: dict[str, list[str]] = field(default_factory=dict)  # granted: see caps.py
    publish: bool = False  # its log's signed heads go out through the nostr port

    @property
    def awake(self) -> bool:
        """Whether the daemon must hold anything for it: a timer, or a trigger to run."""
        return self.status in ("creating", "active") or self.hook is not None

    @property
    def npub(self) -> str:
        return _npub(self.pubkey)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> AgentRecord:
        return cls(**json.loads(raw))


@functools.lru_cache(maxsize=16384)
def _npub(pubkey: str) -> str:
    # bech32 in pure Python costs more than the rest of a getattr: keep recent ones.
    return npub_encode(bytes.fromhex(pubkey))


class StoreInUse(Exception):
    pass


class AgentStore:
    """An open store: the LMDB environment, its databases and the daemon lock."""

    def __init__(self, path: Path, env: lmdb.Environment, create_dbs: bool = True,
                 max_map_size: int = DEFAULT_MAP_SIZE) -> None:
        self.path = path
        self.env = env
        self.db = {name: env.open_db(name.encode(), create=create_dbs) for name in DB_NAMES}
        self.max_map_size = max_map_size
        self._lock_fd: int | None = None
        self.synced = True  # every commit is on the disk when it returns (durability=disk)

    # -- opening ---------------------------------------------------------

    @staticmethod
    def _open_env(path: Path, map_size: int, sync: bool = True) -> lmdb.Environment:
        # sync=False: a commit is written to the file (the kernel holds it, and keeps it
        # through the death of this process) but not flushed to the disk; see `flush`.
        return lmdb.open(
            str(path), map_size=map_size, max_dbs=len(DB_NAMES) + 2, mode=0o600,
            subdir=True, create=False, readahead=False, sync=sync, metasync=sync,
            max_readers=256,
        )

    @classmethod
    def create(cls, path: Path, mnemonic: str, map_size: int = DEFAULT_MAP_SIZE) -> AgentStore:
        path = Path(path)
        if (path / "data.mdb").exists():
            raise FileExistsError(f"{path}: a store already exists")
        old_umask = os.umask(0o077)
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(path, 0o700)
            env = lmdb.open(str(path), map_size=map_size, max_dbs=len(DB_NAMES) + 2,
                            mode=0o600, subdir=True, create=True)
            store = cls(path, env)
            with env.begin(write=True) as txn:
                meta = store.db["meta"]
                txn.put(b"version", str(STORE_VERSION).encode(), db=meta)
                txn.put(b"mnemonic", mnemonic.encode(), db=meta)
                txn.put(b"next_index", b"0", db=meta)
                txn.put(NOSTR_SINCE_KEY, str(int(time.time())).encode(), db=meta)
        finally:
            os.umask(old_umask)
        return store

    @classmethod
    def open(cls, path: Path, map_size: int = DEFAULT_MAP_SIZE,
             sync: bool = True) -> AgentStore:
        """Open the store at `path`, whose map may grow to `map_size` bytes; with `sync`
        False, commits are not flushed to the disk as they happen but by `flush`
        (durability=daemon)."""
        path = Path(path)
        if not (path / "data.mdb").exists():
            raise FileNotFoundError(f"{path}: no store here (create one with `agentfs init`)")
        used = (path / "data.mdb").stat().st_size
        start = max(min(map_size, max(2 * used, MIN_MAP_SIZE)), used)
        store = cls(path, cls._open_env(path, _pages(start), sync), max_map_size=map_size)
        store.synced = sync
        with store.env.begin() as txn:
            version = txn.get(b"version", db=store.db["meta"])
        if version == b"1":
            store._migrate_from_1()
            version = b"2"
        if version in (b"2", b"3", b"4"):
            # Opening the store made the databases 3 and 4 add (`keys`, `heads`, `publish`).
            # Logs of before 4 have no hash chain: their records stay as they are (offsets
            # are stable), and the chain starts with the next record (see audit.py).  5
            # moves each state value into chunks, in the transaction that sets the version.
            with store.env.begin(write=True) as txn:
                values.migrate_inline_values(store, txn)
                txn.put(b"version", str(STORE_VERSION).encode(), db=store.db["meta"])
            version = str(STORE_VERSION).encode()
        if version != str(STORE_VERSION).encode():
            store.close()
            raise ValueError(
                f"{path}: store version {version!r}, this agentfs reads {STORE_VERSION}")
        return store

    @classmethod
    def open_readonly(cls, path: Path) -> AgentStore:
        """The store for reading only, beside a daemon that may be serving it (no lock, no
        migration): what `agentfs verify` reads."""
        path = Path(path)
        if not (path / "data.mdb").exists():
            raise FileNotFoundError(f"{path}: no store here")
        env = lmdb.open(str(path), max_dbs=len(DB_NAMES) + 2, subdir=True, readonly=True,
                        readahead=False, max_readers=256)
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            version = txn.get(b"version", db=meta)
        if version != str(STORE_VERSION).encode():
            env.close()
            raise ValueError(f"{path}: store version {version!r}, this agentfs reads "
                             f"{STORE_VERSION} (mount it once with this agentfs)")
        return cls(path, env, create_dbs=False)

    def _migrate_from_1(self) -> None:
        """Version 1 had no lifecycle: an agent still `creating` is owed its `create`, and
        every agent's record is put again, which fills the `awake` index."""
        with self.env.begin(write=True) as txn:
            for record in list(self.agents(txn)):
                if record.status == "creating" and record.hook is None:
                    record.hook = "create"
                self.put_agent(txn, record)
            meta = self.db["meta"]
            if txn.get(NOSTR_SINCE_KEY, db=meta) is None:
                txn.put(NOSTR_SINCE_KEY, str(int(time.time())).encode(), db=meta)
            txn.put(b"version", b"2", db=meta)

    def map_size(self) -> int:
        return int(self.env.info()["map_size"])

    def grow(self) -> int | None:
        """Double the map (up to its largest); returns the new size, or None if it is at
        its largest.  Only with no transaction open in this process (LMDB remaps)."""
        size = self.map_size()
        new = _pages(min(2 * size, self.max_map_size))
        if new <= size:
            return None
        self.env.set_mapsize(new)
        return new

    def lock(self) -> None:
        """Take the one-daemon-per-store lock; its file holds the daemon's pid."""
        fd = os.open(self.path / "daemon.pid", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode().strip() or "?"
            os.close(fd)
            raise StoreInUse(f"{self.path} is in use by pid {holder}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def flush(self) -> None:
        """Put what was committed on the disk (a no-op when every commit already is)."""
        if not self.synced:
            self.env.sync(True)

    def close(self) -> None:
        self.flush()
        self.env.close()
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)
            self._lock_fd = None

    def read(self) -> Txn:
        return self.env.begin(write=False)

    # -- meta --------------------------------------------------------------

    def mnemonic(self, txn: Txn) -> str:
        raw = txn.get(b"mnemonic", db=self.db["meta"])
        assert raw is not None
        return bytes(raw).decode()

    def next_index(self, txn: Txn) -> int:
        return int(bytes(txn.get(b"next_index", db=self.db["meta"]) or b"0"))

    def claim_index(self, txn: Txn) -> int:
        index = self.next_index(txn)
        txn.put(b"next_index", str(index + 1).encode(), db=self.db["meta"])
        return index

    # -- agents ------------------------------------------------------------

    def agent(self, txn: Txn, index: int) -> AgentRecord | None:
        raw = txn.get(agent_key(index), db=self.db["agents"])
        return None if raw is None else AgentRecord.decode(bytes(raw))

    def require_agent(self, txn: Txn, index: int) -> AgentRecord:
        record = self.agent(txn, index)
        if record is None:
            raise errors.no_such_file(f"agent {index}")
        return record

    def put_agent(self, txn: Txn, record: AgentRecord) -> None:
        key = agent_key(record.index)
        txn.put(key, record.encode(), db=self.db["agents"])
        for index_db, member in (("awake", record.awake), ("tokens", bool(record.token)),
                                 ("publish", record.publish)):
            if member:
                txn.put(key, b"", db=self.db[index_db])
            else:
                txn.delete(key, db=self.db[index_db])

    def awake(self, txn: Txn) -> Iterator[int]:
        """The agents that are not asleep: creating, active, or with a hook to run."""
        return self._members(txn, "awake")

    def with_tokens(self, txn: Txn) -> Iterator[int]:
        return self._members(txn, "tokens")

    def _members(self, txn: Txn, index_db: str) -> Iterator[int]:
        for key, _value in txn.cursor(db=self.db[index_db]):
            yield int.from_bytes(key, "big")

    def index_by_pubkey(self, txn: Txn, pubkey: bytes) -> int | None:
        raw = txn.get(pubkey, db=self.db["pubkeys"])
        return None if raw is None else int.from_bytes(raw, "big")

    def index_by_name(self, txn: Txn, name: str) -> int | None:
        raw = txn.get(name.encode(), db=self.db["names"])
        return None if raw is None else int.from_bytes(raw, "big")

    def add_agent(self, txn: Txn, record: AgentRecord) -> None:
        pub = bytes.fromhex(record.pubkey)
        if not txn.put(pub, agent_key(record.index), db=self.db["pubkeys"], overwrite=False):
            raise errors.exists(f"agent key {record.pubkey}")
        if record.name is not None:
            self.set_name(txn, record, record.name)
        self.put_agent(txn, record)

    def set_name(self, txn: Txn, record: AgentRecord, name: str) -> None:
        names = self.db["names"]
        holder = self.index_by_name(txn, name)
        if holder is not None and holder != record.index:
            raise errors.exists(f"name {name!r}")
        if record.name is not None and record.name != name:
            txn.delete(record.name.encode(), db=names)
        txn.put(name.encode(), agent_key(record.index), db=names)
        record.name = name

    def agents(self, txn: Txn, start: int = 0) -> Iterator[AgentRecord]:
        cursor = txn.cursor(db=self.db["agents"])
        if not cursor.set_range(agent_key(start)):
            return
        for _key, raw in cursor:
            yield AgentRecord.decode(bytes(raw))

    def count(self, txn: Txn, db_name: str) -> int:
        """The records in one of the databases (agents, awake...), without reading them."""
        entries: int = txn.stat(self.db[db_name])["entries"]
        return entries

    def names(self, txn: Txn) -> Iterator[tuple[str, int]]:
        for key, raw in txn.cursor(db=self.db["names"]):
            yield bytes(key).decode(), int.from_bytes(raw, "big")

    # -- counters ----------------------------------------------------------

    def bump_counter(self, txn: Txn, index: int | None, name: bytes) -> int:
        """The next value of a counter: an agent's, or the store's own (index None)."""
        key = (b"" if index is None else agent_key(index)) + name
        raw = txn.get(key, db=self.db["counters"])
        value = (0 if raw is None else int.from_bytes(raw, "big")) + 1
        txn.put(key, value.to_bytes(8, "big"), db=self.db["counters"])
        return value
