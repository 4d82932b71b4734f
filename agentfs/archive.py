"""An agent's archive: one tar of everything the store keeps for it, with a manifest.

Members, in this order (agentfs(1) describes each):

    manifest.json   format, version, the agent's npub, pubkey, index and name, when it was
                    made, and every other member's name, type, size and SHA-256
    settings.json   its record: name, program, status, ticks, lifecycle, idle, token hash...
    budget.json     limits and usage
    alarm.json      its alarm, or null
    caps.json       granted capabilities, and each granted secret's name, host and header
                    (never its value, which stays in the store it was written to)
    counters.json   its counters (inbox seq, alarm serial): seqs and ids go on where they were
    inbox           pending triggers, one JSON line each, as queued
    seen            ids of the messages it accepted, one JSON line each: [id, seq]
    outbox, log     the files as they read
    key.ncryptsec   only with `--with-key`: its private key, NIP-49, under a passphrase
    state/...       its state/ tree: directories and files, with their times to the ns

An export is one read transaction, so every member is of the same commit.  An import
checks the whole archive first, then writes the agent in one transaction: all or nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from . import ctl, errors, keyring, values
from .alarms import Alarm, Alarms
from .audit import AuditLog
from .identity import npub_decode, npub_encode, public_key
from .inbox import rfc3339_now
from .state import MAX_NAME, Entry, TxnState, state_key
from .store import AgentRecord, AgentStore, Txn, agent_key, scan_prefix

FORMAT = "agentfs-agent"
VERSION = 1
MANIFEST = "manifest.json"
KEY_MEMBER = "key.ncryptsec"
STATE = "state"
# Every member but the manifest and state/, in the order they are written.
FILES = ("settings.json", "budget.json", "alarm.json", "caps.json", "counters.json",
         "inbox", "seen", "outbox", "log")
# The record's fields that go in members of their own, or in the manifest.
_ELSEWHERE = ("index", "pubkey", "limits", "usage", "alarm", "caps")
STATUSES = ("creating", "active", "dormant", "failed", "terminated")
MAX_INDEX = 2**31 - 1  # NIP-06 accounts are hardened indexes, and account 0 is the user's


class ArchiveError(Exception):
    """Why an archive cannot be imported here (or an agent exported): one sentence."""


@dataclass(frozen=True)
class Member:
    """One member: a file's bytes, or (data None) a directory; its time in ns."""

    name: str
    data: bytes | None
    mtime_ns: int

    def describe(self) -> dict[str, Any]:
        if self.data is None:
            return {"name": self.name, "type": "dir"}
        return {"name": self.name, "type": "file", "size": len(self.data),
                "sha256": hashlib.sha256(self.data).hexdigest()}


# -- export ------------------------------------------------------------------------------


def find_agent(store: AgentStore, txn: Txn, who: str) -> AgentRecord:
    """The agent named `who`, or whose npub it is."""
    index = store.index_by_name(txn, who)
    if index is None and who.startswith("npub1"):
        try:
            index = store.index_by_pubkey(txn, npub_decode(who))
        except ValueError as e:
            raise ArchiveError(f"{who[:70]}: {e}") from None
    record = None if index is None else store.agent(txn, index)
    if record is None:
        raise ArchiveError(f"{who[:70]!r}: no agent of that name or npub in {store.path}")
    return record


def snapshot(store: AgentStore, txn: Txn, record: AgentRecord,
             key: str | None = None) -> list[Member]:
    """Every member of `record`'s archive, from one transaction; `key` an ncryptsec."""
    index, now = record.index, time.time_ns()
    fields = asdict(record)
    settings = {k: v for k, v in fields.items() if k not in _ELSEWHERE}

    def rows(db: str) -> Iterator[tuple[bytes, bytes]]:
        return scan_prefix(txn, store.db[db], agent_key(index))

    secrets = []
    for name in record.caps.get("secret", []):
        raw = txn.get(name.encode(), db=store.db["secrets"])
        if raw is not None:  # the host and header only: the sealed value is not read
            entry = json.loads(bytes(raw))
            secrets.append({"name": name, "host": entry["host"], "header": entry.get("header")})
    files = {
        "settings.json": _json(settings),
        "budget.json": _json({"limits": record.limits, "usage": record.usage}),
        "alarm.json": _json(record.alarm),
        "caps.json": _json({"grants": record.caps, "secrets": secrets}),
        "counters.json": _json({name.decode(): int.from_bytes(value, "big")
                                for name, value in rows("counters")}),
        "inbox": b"".join(raw + b"\n" for _seq, raw in rows("inbox")),
        "seen": b"".join(_line([ident.decode(), int.from_bytes(seq, "big")])
                         for ident, seq in rows("seen")),
        "outbox": b"".join(line for _offset, line in rows("outbox")),
        "log": b"".join(line for _offset, line in rows("log")),
    }
    members = [Member(name, files[name], now) for name in FILES]
    if key is not None:
        members.append(Member(KEY_MEMBER, key.encode() + b"\n", now))
    for path, entry in TxnState(store, txn, index).descendants(""):
        data = None if entry.is_dir else \
            values.read(txn, store, entry.blob, entry.size, None, 0, entry.size)
        members.append(Member(f"{STATE}/{path}", data, entry.mtime_ns))
    manifest = {"format": FORMAT, "version": VERSION, "npub": record.npub,
                "pubkey": record.pubkey, "index": index, "name": record.name,
                "exported": rfc3339_now(), "members": [m.describe() for m in members]}
    return [Member(MANIFEST, _json(manifest), now), *members]


def _line(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _json(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, indent=1).encode() + b"\n"


def write(members: list[Member], out: IO[bytes]) -> None:
    """The members as a POSIX (pax) tar on `out`, which need not be seekable."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            info = tarfile.TarInfo(member.name)
            seconds, ns = divmod(member.mtime_ns, 10**9)
            info.mtime = seconds
            info.pax_headers = {"mtime": f"{seconds}.{ns:09d}"}  # the ns a float would lose
            if member.data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o700
                tar.addfile(info)
            else:
                info.size, info.mode = len(member.data), 0o600
                tar.addfile(info, io.BytesIO(member.data))


# -- reading an archive ----------------------------------------------------------------------


@dataclass
class Archive:
    """An archive read whole and checked against its manifest."""

    manifest: dict[str, Any]
    files: dict[str, bytes]
    state: list[tuple[str, Member]] = field(default_factory=list)

    @property
    def npub(self) -> str:
        return str(self.manifest["npub"])

    @property
    def pubkey(self) -> bytes:
        return bytes.fromhex(self.manifest["pubkey"])

    @property
    def index(self) -> int:
        return int(self.manifest["index"])

    @property
    def key(self) -> str | None:
        raw = self.files.get(KEY_MEMBER)
        return None if raw is None else raw.decode().strip()

    def json(self, name: str) -> Any:
        return json.loads(self.files[name])


def read(source: IO[bytes]) -> Archive:
    """Read and check an archive: ArchiveError for anything damaged, missing or unknown."""
    try:
        with tarfile.open(fileobj=source, mode="r|") as tar:
            members = list(_members(tar))
    except (tarfile.TarError, EOFError) as e:
        raise ArchiveError(f"not a complete tar archive ({e}): truncated, or not an "
                           "agentfs export") from None
    if not members or members[0].name != MANIFEST or members[0].data is None:
        raise ArchiveError(f"not an agentfs archive: its first member is not {MANIFEST}")
    manifest = _manifest(members[0].data)
    listed = {m["name"]: m for m in manifest["members"]}
    found = {m.name: m for m in members[1:]}
    if len(found) != len(members) - 1:
        raise ArchiveError("damaged archive: a member appears twice")
    for name, wanted in listed.items():
        member = found.get(name)
        if member is None:
            raise ArchiveError(f"damaged archive: member {name} is missing (the archive is "
                               "incomplete: truncated?)")
        got = member.describe()
        if got["type"] != wanted.get("type"):
            raise ArchiveError(f"damaged archive: member {name} is a {got['type']}, "
                               f"the manifest says {wanted.get('type')}")
        if got.get("size") != wanted.get("size") or got.get("sha256") != wanted.get("sha256"):
            raise ArchiveError(f"damaged archive: member {name} does not match its checksum "
                               "in the manifest")
    extra = sorted(set(found) - set(listed))
    if extra:
        raise ArchiveError(f"damaged archive: member {extra[0]} is not in the manifest")
    for name in FILES:
        if listed.get(name, {}).get("type") != "file":
            raise ArchiveError(f"damaged archive: the manifest lists no file {name}")
    archive = Archive(manifest, {m.name: m.data for m in members[1:]
                                 if m.data is not None and not m.name.startswith(STATE + "/")})
    archive.state = _state(members[1:])
    return archive


def _members(tar: tarfile.TarFile) -> Iterator[Member]:
    for info in tar:
        if info.isdir():
            data = None
        elif info.isreg():
            f = tar.extractfile(info)
            assert f is not None
            data = f.read()
            if len(data) != info.size:
                raise EOFError("unexpected end of data")
        else:
            raise ArchiveError(f"not an agentfs archive: member {info.name} is neither a "
                               "file nor a directory")
        yield Member(info.name.rstrip("/"), data, _mtime_ns(info))


def _mtime_ns(info: tarfile.TarInfo) -> int:
    text = info.pax_headers.get("mtime")
    if text is not None:
        seconds, _, fraction = text.partition(".")
        if seconds.isdigit() and (not fraction or fraction.isdigit()):
            return int(seconds) * 10**9 + int((fraction + "0" * 9)[:9])
    return int(info.mtime) * 10**9


def _manifest(raw: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise ArchiveError(f"damaged archive: {MANIFEST} is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArchiveError(f"not an agentfs archive: {MANIFEST} is not of format {FORMAT}")
    if manifest.get("version") != VERSION:
        raise ArchiveError(f"archive version {manifest.get('version')!r}: this agentfs "
                           f"reads version {VERSION}")
    try:
        pubkey = bytes.fromhex(manifest["pubkey"])
        ok = len(pubkey) == 32 and npub_encode(pubkey) == manifest["npub"] and \
            isinstance(manifest["index"], int) and 0 <= manifest["index"] < MAX_INDEX and \
            all(isinstance(m, dict) and isinstance(m.get("name"), str)
                for m in manifest["members"])
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ArchiveError(f"damaged archive: {MANIFEST} lacks a valid npub, pubkey, index "
                           "or member list")
    return manifest


def _state(members: list[Member]) -> list[tuple[str, Member]]:
    """The state/ members by path, parents before children, each path checked."""
    entries: list[tuple[str, Member]] = []
    dirs = {""}
    for member in members:
        if member.name == STATE and member.data is None:
            continue
        if not member.name.startswith(STATE + "/"):
            continue
        path = member.name[len(STATE) + 1:]
        parts = path.split("/")
        if any(p in ("", ".", "..") or len(p.encode()) > MAX_NAME or "\0" in p for p in parts):
            raise ArchiveError(f"damaged archive: {member.name} is not a state path")
        parent = "/".join(parts[:-1])
        if parent not in dirs:
            raise ArchiveError(f"damaged archive: {member.name} comes before its directory")
        if member.data is None:
            dirs.add(path)
        entries.append((path, member))
    return entries


# -- import --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where an archive's agent goes in a store: its own index (its key derives here), or
    the next free one, with the archive's key."""

    index: int | None  # None: the store's next index
    needs_key: bool


def place(store: AgentStore, txn: Txn, archive: Archive) -> Placement:
    holder = store.index_by_pubkey(txn, archive.pubkey)
    if holder is not None:
        held = store.agent(txn, holder)
        raise ArchiveError(f"{archive.npub} is in this store already (agent {holder}, "
                           f"{held.name if held else '?'})")
    if store.agent(txn, archive.index) is None and \
            keyring.derives(store, txn, archive.index, archive.pubkey):
        return Placement(archive.index, needs_key=False)
    if archive.key is None:
        raise ArchiveError(f"{archive.npub} is not agent {archive.index} of this store's "
                           "mnemonic, and the archive holds no key: export it with "
                           "--with-key to move it to a store of another mnemonic")
    return Placement(None, needs_key=True)


def check_name(store: AgentStore, txn: Txn, name: str | None) -> None:
    if name is None:
        return
    try:
        ctl.check_name(name)
    except errors.FsError as e:
        raise ArchiveError(str(e)) from None
    holder = store.index_by_name(txn, name)
    if holder is not None:
        raise ArchiveError(f"name {name!r} is taken in this store (by agent {holder}): "
                           "give the agent another with --name NEW")


def install(store: AgentStore, txn: Txn, archive: Archive, name: str | None,
            private: bytes | None) -> AgentRecord:
    """Write the archive's agent into the store in `txn` (the caller commits, or aborts
    on any exception); `private` is the archive's key, if the placement needs it."""
    spot = place(store, txn, archive)
    name = archive.manifest.get("name") if name is None else name
    check_name(store, txn, name)
    if spot.index is None:
        if private is None or public_key(private) != archive.pubkey:
            raise ArchiveError(f"the key in the archive is not {archive.npub}'s")
        index = store.claim_index(txn)
    else:
        index = spot.index
        if index >= store.next_index(txn):  # the numbers up to it are skipped, never reused
            txn.put(b"next_index", str(index + 1).encode(), db=store.db["meta"])
    record = _record(archive, index, name)
    store.add_agent(txn, record)
    if spot.index is None:
        assert private is not None
        keyring.put_imported(store, txn, index, private)
    if record.alarm is not None:
        Alarms(store).restore(txn, record)
    _restore_rows(store, txn, archive, index)
    for path, member in archive.state:
        entry = Entry(True, member.mtime_ns)
        if member.data is not None:  # a file: its bytes in chunks of a value of its own
            entry = Entry(False, member.mtime_ns, len(member.data),
                          values.take_ids(txn, store, 1))
            values.put_whole(txn, store, entry.blob, member.data)
        txn.put(state_key(index, path), entry.encode(), db=store.db["state"])
    _journal(store, txn, "log", index, b"".join(_lines(archive, "log")))
    # The import's own record goes on the log's chain, and the head is signed here: the
    # records before it are the archive's, whose chain verify checks as any other.
    audit_log = AuditLog(store)
    audit_log.append(txn, index, {
        "time": rfc3339_now(), "event": "import", "from_index": archive.index,
        "exported": archive.manifest.get("exported"),
        "key": "imported" if spot.index is None else "derived"})
    audit_log.seal(txn)
    return record


def _record(archive: Archive, index: int, name: str | None) -> AgentRecord:
    settings = _object(archive, "settings.json")
    budget = _object(archive, "budget.json")
    caps = _object(archive, "caps.json")
    alarm = archive.json("alarm.json")
    try:
        settings.pop("name", None)
        record = AgentRecord(index=index, pubkey=archive.pubkey.hex(), name=name,
                             limits=budget["limits"], usage=budget["usage"],
                             alarm=alarm, caps=caps["grants"], **settings)
    except (KeyError, TypeError) as e:
        raise ArchiveError(f"damaged archive: settings, budget or caps: {e}") from None
    try:
        Alarm.decode(alarm)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ArchiveError("damaged archive: alarm.json is not an alarm") from None
    ok = record.status in STATUSES and isinstance(record.ticks, int) and \
        (record.program is None or (isinstance(record.program, list) and
                                    all(isinstance(w, str) for w in record.program))) and \
        isinstance(record.limits, dict) and isinstance(record.usage, dict) and \
        isinstance(record.caps, dict) and (alarm is None or isinstance(alarm, dict))
    if not ok:
        raise ArchiveError("damaged archive: settings.json, budget.json, caps.json or "
                           "alarm.json holds a value of the wrong kind")
    return record


def _object(archive: Archive, name: str) -> dict[str, Any]:
    try:
        value = archive.json(name)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ArchiveError(f"damaged archive: {name} is not a JSON object")
    return value


def _lines(archive: Archive, name: str) -> list[bytes]:
    lines = archive.files[name].splitlines(keepends=True)
    for number, line in enumerate(lines, 1):
        try:
            ok = line.endswith(b"\n") and isinstance(json.loads(line), dict | list)
        except ValueError:
            ok = False
        if not ok:
            raise ArchiveError(f"damaged archive: {name} line {number} is not a JSON line")
    return lines


def _restore_rows(store: AgentStore, txn: Txn, archive: Archive, index: int) -> None:
    key = agent_key(index)
    try:
        for name, value in _object(archive, "counters.json").items():
            txn.put(key + name.encode(), int(value).to_bytes(8, "big"), db=store.db["counters"])
        for line in _lines(archive, "inbox"):
            seq = int(json.loads(line)["seq"])
            txn.put(key + seq.to_bytes(8, "big"), line.rstrip(b"\n"), db=store.db["inbox"])
        for line in _lines(archive, "seen"):
            ident, seq = json.loads(line)
            txn.put(key + str(ident).encode(), int(seq).to_bytes(8, "big"),
                    db=store.db["seen"])
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise ArchiveError(f"damaged archive: counters, inbox or seen: {e!r}") from None
    _journal(store, txn, "outbox", index, b"".join(_lines(archive, "outbox")))


def _journal(store: AgentStore, txn: Txn, db: str, index: int, data: bytes) -> None:
    """An outbox or log, keyed by the offset each line starts at (as journal.py keeps it)."""
    offset = 0
    for line in data.splitlines(keepends=True):
        txn.put(agent_key(index) + offset.to_bytes(8, "big"), line, db=store.db[db])
        offset += len(line)


def missing_secrets(store: AgentStore, txn: Txn, archive: Archive) -> list[str]:
    """A line for each secret the agent was granted that this store lacks, or holds for
    another host: the value never travels, so its owner must write it here."""
    notes = []
    for secret in _object(archive, "caps.json").get("secrets", []):
        raw = txn.get(str(secret.get("name", "")).encode(), db=store.db["secrets"])
        here = None if raw is None else json.loads(bytes(raw))
        if here is None:
            notes.append(f"secret {secret['name']} (host={secret['host']}) is not in this "
                         "store: write it to the root file `secrets` for the agent to use it")
        elif (here["host"], here.get("header")) != (secret["host"], secret.get("header")):
            notes.append(f"secret {secret['name']} is here for host={here['host']}, the "
                         f"agent's store had it for host={secret['host']}")
    return notes
