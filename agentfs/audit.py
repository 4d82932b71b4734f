"""The verifiable audit trail: each `log` record names the hash of the one before it, and
each commit signs the head of every log it grew, as a Nostr event of the agent's key.

The chain: a record's `prev` is the SHA-256 (hex) of the previous record's line, its bytes
exactly as the log serves them, newline included; the first record's `prev` is the agent's
public key (hex).  The head: a NIP-78 event (kind 30078, `d` tag `agentfs/log`) whose
`size` tag is the log's length in bytes and whose `head` tag is the SHA-256 of its last
line.  `check_log` is the other side: what a third party runs over a copy of the log and
the head, as `agentfs verify` does over the store.  agentfs(4) describes both in prose.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from coincurve import PrivateKey

from . import errors, keyring
from .identity import public_key
from .journal import Journal, encode_line
from .nostr.bridge import PORT as NOSTR_PORT
from .nostr.event import Event, check, from_json, to_json, unsigned
from .plumbing import Delivered
from .store import AgentStore, Txn, agent_key

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("agentfs")
# NIP-78's kind, "arbitrary custom app data", addressable: a relay keeps one head per agent.
HEAD_KIND = 30078
HEAD_D = "agentfs/log"
HEAD_ALT = "agentfs: the signed head of an agent's audit log"
# Seconds between two heads of one agent sent out: a relay keeps, of an agent's heads, the
# one with the latest created_at (in seconds), so each must be a second later than the last.
PUBLISH_INTERVAL = 1.0


def line_hash(line: bytes) -> str:
    """What the next record's `prev` holds, and a head's `head` tag: SHA-256, hex."""
    return hashlib.sha256(line).hexdigest()


# Agents whose signing keys the daemon keeps (see `SigningKeys`).
KEPT_KEYS = 4096


class SigningKeys:
    """A store's agents' keys, as signing keys: deriving one costs 0.5 ms and making its
    PrivateKey a third of what a signature does, and every commit signs, so recent agents'
    keys are kept (the daemon holds the mnemonic, and the seal of imported keys, anyway).
    An agent's index never changes hands: what is kept stays right."""

    def __init__(self, store: AgentStore) -> None:
        self.store = store
        self._kept: dict[int, tuple[PrivateKey, str]] = {}

    def get(self, txn: Txn, index: int) -> tuple[PrivateKey, str]:
        kept = self._kept.get(index)
        if kept is None:
            if len(self._kept) >= KEPT_KEYS:
                self._kept.pop(next(iter(self._kept)))  # the oldest kept
            secret = keyring.agent_secret(self.store, txn, index)
            kept = self._kept[index] = (PrivateKey(secret), public_key(secret).hex())
        return kept


def sign_head(signer: tuple[PrivateKey, str], size: int, head: str,
              created_at: int | None = None) -> Event:
    """The head signed by `signer` (a `SigningKeys` entry) for a log of `size` bytes whose
    last line hashes to `head`."""
    key, pubkey = signer
    tags = [["d", HEAD_D], ["size", str(size)], ["head", head], ["alt", HEAD_ALT]]
    draft = unsigned(pubkey, HEAD_KIND, "", tags,
                     int(time.time()) if created_at is None else created_at)
    # BIP-340 with fresh auxiliary randomness, as nostr.event.sign_digest does.
    sig = key.sign_schnorr(bytes.fromhex(draft.id), os.urandom(32)).hex()
    return Event(draft.id, draft.pubkey, draft.created_at, draft.kind, draft.tags,
                 draft.content, sig)


class AuditLog(Journal):
    """The `log` journal, chained; `seal`, run once at the end of every group commit, signs
    the heads of the logs that grew in it."""

    def __init__(self, store: AgentStore) -> None:
        super().__init__(store, "log")
        self.heads = store.db["heads"]
        self.keys = SigningKeys(store)
        # Agents whose log had a record appended since the last seal.  Only the committer's
        # thread appends and seals: no lock.  A record rolled back with its transaction
        # leaves its agent here: its head is signed again, unchanged, which is harmless.
        self._grown: set[int] = set()
        # Of those, the agents with `publish heads`: for the HeadPublisher (same thread).
        self.to_publish: set[int] = set()

    def append(self, txn: Txn, index: int, record: dict[str, Any]) -> int:
        offset, line = self.chained(txn, index, record)
        self.put(txn, index, offset, line)
        self._grown.add(index)
        return offset

    def chained(self, txn: Txn, index: int, record: dict[str, Any]) -> tuple[int, bytes]:
        """Where `record` goes in the agent's log, and its line with `prev`."""
        last = self.last(txn, index)
        if last is None:
            offset, prev = 0, self.store.require_agent(txn, index).pubkey
        else:
            offset, prev = last[0] + len(last[1]), line_hash(last[1])
        return offset, encode_line({**record, "prev": prev})

    def seal(self, txn: Txn) -> None:
        """Sign the head of each log that grew: in the batch's transaction, before its commit."""
        grown, self._grown = self._grown, set()
        if not grown:
            return
        now = int(time.time())
        for index in grown:
            if self.sign(txn, index, now) and \
                    txn.get(agent_key(index), db=self.store.db["publish"]) is not None:
                self.to_publish.add(index)

    def sign(self, txn: Txn, index: int, now: int | None = None) -> bool:
        """Sign and keep the head of the agent's log as it is in `txn`; False if it has none
        (the agent's making was rolled back)."""
        last = self.last(txn, index)
        if last is None:
            return False
        event = sign_head(self.keys.get(txn, index), last[0] + len(last[1]),
                          line_hash(last[1]), now)
        txn.put(agent_key(index), to_json(event).encode(), db=self.heads)
        return True

    def head(self, txn: Txn, index: int) -> bytes | None:
        raw = txn.get(agent_key(index), db=self.heads)
        return None if raw is None else bytes(raw)


class HeadPublisher:
    """With `publish heads` in its ctl, an agent's signed heads go out through the nostr port
    for the Nostr driver: the latest one, at most once a second, signed again with a
    created_at later than the last one sent (heads signed within a second share one)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._wakeup = trio.Event()
        self._sent: dict[int, int] = {}  # agent -> created_at of the last head it sent

    def committed(self) -> None:
        """After each commit, in the event loop: a seal may have left heads to send."""
        if self.runtime.log.to_publish:
            self._wakeup.set()

    async def run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            await trio.sleep(PUBLISH_INTERVAL)  # what a second brings goes in one commit
            try:
                delivered = await self.runtime.committer.commit(self._queue)
            except errors.FsError as e:  # the store could not commit: the next commit retries
                log.error("publishing signed heads failed: %s", e.message)
                continue
            self.runtime.plumbing.announce(delivered)

    def _queue(self, txn: Txn) -> Delivered:
        # In the committer's thread, as the seals that fill `to_publish`.
        log = self.runtime.log
        agents, log.to_publish = log.to_publish, set()
        delivered = Delivered()
        for index in sorted(agents):
            raw = log.head(txn, index)
            record = self.runtime.store.agent(txn, index)
            if raw is None or record is None or not record.publish:
                continue  # turned off since
            tags = {t[0]: t[1] for t in from_json(raw).tags if len(t) >= 2}
            created = max(int(time.time()), self._sent.get(index, 0) + 1)
            event = sign_head(log.keys.get(txn, index), int(tags["size"]), tags["head"],
                              created)
            self.runtime.plumbing.enqueue(txn, NOSTR_PORT,
                                          self.runtime.nostr.published(record.npub, event))
            self._sent[index] = created
            delivered.ports.add(NOSTR_PORT)
        return delivered


# -- checking -------------------------------------------------------------------------------


@dataclass
class Verdict:
    """What `check_log` found: `problem` is None when everything checks."""

    records: int = 0  # records read
    unchained: int = 0  # leading records from before the chain (a store older than it)
    signed: int = 0  # records the head covers
    head_time: int | None = None  # the head's created_at
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def head_fields(event: Event, pubkey: str) -> tuple[int, str]:
    """The (size, head) a signed head states; ValueError saying what is wrong with it."""
    check(event)
    if event.pubkey != pubkey:
        raise ValueError(f"the head is signed by {event.pubkey}, not the agent ({pubkey})")
    tags = {tag[0]: tag[1] for tag in event.tags if len(tag) >= 2}
    if event.kind != HEAD_KIND or tags.get("d") != HEAD_D:
        raise ValueError(f"the head is not a kind {HEAD_KIND} event with d tag {HEAD_D}")
    size, head = tags.get("size", ""), tags.get("head", "")
    if not size.isdigit() or len(head) != 64:
        raise ValueError("the head lacks a size tag (bytes) or a head tag (a SHA-256)")
    return int(size), head


def check_log(lines: Iterable[bytes], pubkey: str, head: Event | None,
              tail_allowed: bool = False) -> Verdict:
    """Check a log's lines (each with its newline) against its chain and its signed head.

    `pubkey` is the agent's (hex).  `head` None: the log has no signed head, which is a
    problem unless every record is from before the chain.  With `tail_allowed`, records
    after the head are fine (a copy of the log made after the head was read); in the
    store, where every commit signs, they are not.
    """
    verdict = Verdict()
    signed_size, signed_hash = None, ""
    if head is not None:
        try:
            signed_size, signed_hash = head_fields(head, pubkey)
        except ValueError as e:
            verdict.problem = f"the signed head does not check: {e}"
            return verdict
        verdict.head_time = head.created_at
    end, prev = 0, pubkey
    for n, line in enumerate(lines, start=1):
        verdict.records = n
        where = f"record {n} (byte {end})"
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not line.endswith(b"\n") or not isinstance(record, dict):
            verdict.problem = f"{where} is not a JSON object on one line"
            return verdict
        if "prev" not in record and verdict.unchained == n - 1:
            verdict.unchained = n  # every record so far predates the chain
        elif record.get("prev") != prev:
            if "prev" not in record:
                why = "it has no prev"
            elif n == 1:
                why = "its prev is not the agent's public key: records before it were removed"
            else:
                why = (f"its prev is not the SHA-256 of record {n - 1}: record {n - 1} was "
                       "changed, or records were removed or moved between them")
            verdict.problem = f"{where} does not follow the chain: {why}"
            return verdict
        end += len(line)
        prev = line_hash(line)
        if signed_size is not None and verdict.signed == 0 and end >= signed_size:
            if end != signed_size:
                verdict.problem = (f"{where} does not check: the signed head ends at byte "
                                   f"{signed_size}, inside it")
                return verdict
            if prev != signed_hash:
                verdict.problem = (f"{where} does not check: it is the last record the head "
                                   "signs, and its SHA-256 is not the head's")
                return verdict
            verdict.signed = n
    if signed_size is None:
        if verdict.records > verdict.unchained:
            verdict.problem = (f"records {verdict.unchained + 1}-{verdict.records} are "
                               "chained but no signed head covers them")
    elif verdict.signed == 0:
        verdict.problem = (f"the log ends at byte {end}, before the {signed_size} bytes its "
                           "signed head covers: records were removed from its end")
    elif verdict.signed < verdict.records and not tail_allowed:
        verdict.problem = (f"record {verdict.signed + 1} does not check: no signed head covers "
                           f"it (the head signs records 1-{verdict.signed})")
    return verdict
