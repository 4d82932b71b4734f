"""Nostr inside the daemon: what leaves is signed at commit, what arrives is opened here.

An agent's message that the plumb rules send to the `nostr` port becomes a signed event
in the sender's commit, with the sender's key, derived from the store's mnemonic (or
unsealed, for an imported agent: see keyring.py) for that moment only: no key reaches a
program, a file or a log.  A DM is a NIP-17 gift wrap
unless the message asks for NIP-04 (`"dm": "nip04"`, as replies to a NIP-04 DM do); a
message of type `note` is a public kind 1 note that mentions its `to`.  The Nostr driver
publishes the queued events and writes what relays bring into inboxes as
`{"type": "nostr", "event": {...}}`, which `incoming` verifies and decrypts into the
entry the agent's program reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from plumber import Message as PlumbMessage

from .. import errors
from ..identity import npub_decode, npub_encode
from ..keyring import agent_secret
from ..store import NOSTR_SINCE_KEY as SINCE_KEY
from ..store import AgentRecord, Txn
from . import nip04, nip17
from .event import Event, check, from_dict, from_json, sign, to_json

if TYPE_CHECKING:
    from ..runtime import Runtime

PORT = "nostr"
RELAYS_KEY = b"nostr-relays"
MAX_RELAYS = 64
NOTE_KIND, DM04_KIND = 1, 4
# Fields of an agent's message that the rules see as attrs and the signer reads.
ATTRS = ("dm", "kind")


def _recipient(address: str) -> bytes:
    try:
        if address.startswith("npub1"):
            return npub_decode(address)
        raw = bytes.fromhex(address)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise errors.invalid(f"nostr: {address[:70]!r} is not an npub or a 64-digit hex key")
    return raw


class NostrBridge:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.store = runtime.store

    def _secret(self, txn: Txn, index: int) -> bytes:
        return agent_secret(self.store, txn, index)

    # -- out: sign at commit ---------------------------------------------------------

    def outgoing(self, txn: Txn, message: PlumbMessage, sender: int | None) -> PlumbMessage:
        """The queued form of a message routed to the `nostr` port: a signed event."""
        if sender is None:
            # From plumb/send: nobody's key signs it, so it must be a complete event already.
            try:
                event = from_json(message.data)
                check(event)
            except (ValueError, RecursionError) as e:
                raise errors.invalid(f"nostr: plumb/send needs a signed event: {e}") from None
            return self._queued(message, event)
        secret = self._secret(txn, sender)
        kind = message.attr.get("kind", "")
        try:
            if message.type == "note" or kind == str(NOTE_KIND):
                tags = [["p", _recipient(message.dst).hex()]] if message.dst else []
                event = sign(secret, NOTE_KIND, message.data, tags)
            elif message.attr.get("dm") == "nip04" or kind == str(DM04_KIND):
                recipient = _recipient(message.dst)
                content = nip04.encrypt(message.data, secret, recipient)
                event = sign(secret, DM04_KIND, content, [["p", recipient.hex()]])
            else:
                event = nip17.wrap(secret, _recipient(message.dst), message.data)
        except (ValueError, UnicodeError) as e:
            # Too long for NIP-44, not a key on the curve, text that is not Unicode: the
            # message is undelivered (and logged so), the tick that sent it stands.
            raise errors.invalid(f"nostr: cannot make the event: {e}") from None
        return self._queued(message, event)

    @staticmethod
    def published(npub: str, event: Event) -> PlumbMessage:
        """The queued form of an event of the agent's own to publish (its log's head)."""
        return NostrBridge._queued(PlumbMessage(src=npub, dst="", wdir="", type="nostr",
                                                attr={}, data=""), event)

    @staticmethod
    def _queued(message: PlumbMessage, event: Event) -> PlumbMessage:
        attr = {"id": event.id, "kind": str(event.kind)}
        if message.attr.get("id"):
            attr["message"] = message.attr["id"]  # the agent's own id for what it sent
        return PlumbMessage(src=message.src, dst=message.dst, wdir="", type="nostr",
                            attr=attr, data=to_json(event))

    # -- in: verify and open ----------------------------------------------------------

    def incoming(self, txn: Txn, record: AgentRecord, message: dict[str, Any]) -> dict[str, Any]:
        """The inbox entry for an event the driver wrote: verified, and decrypted."""
        try:
            event = from_dict(message["event"])
            check(event)
        except (KeyError, TypeError, ValueError, RecursionError) as e:
            raise errors.invalid(f"nostr: not a valid signed event: {e}") from None
        if not any(len(t) > 1 and t[0] == "p" and t[1] == record.pubkey for t in event.tags):
            raise errors.invalid(f"nostr: event {event.id} has no p tag naming this agent")
        about: dict[str, Any] = {"id": event.id, "kind": event.kind,
                                 "created_at": event.created_at}
        author = bytes.fromhex(event.pubkey)  # the signature says it is theirs
        try:
            if event.kind == nip17.GIFT_WRAP_KIND:
                rumor, author = nip17.unwrap(self._secret(txn, record.index), event)
                kind, dm, text = "dm", "nip17", rumor.content
                about.update(rumor=rumor.id, created_at=rumor.created_at)
            elif event.kind == DM04_KIND:
                kind, dm = "dm", "nip04"
                text = nip04.decrypt(event.content, self._secret(txn, record.index), author)
            elif event.kind == NOTE_KIND:
                kind, dm, text = "mention", "", event.content
            else:
                raise ValueError(f"kind {event.kind} is not one agentfs reads (1, 4, 1059)")
        except (ValueError, RecursionError, UnicodeError) as e:
            # Whatever a stranger can put in a ciphertext must end here, as EINVAL.
            raise errors.invalid(f"nostr: event {event.id}: {e}") from None
        entry = {"id": nostr_id(event.id), "type": kind, "from": npub_encode(author),
                 "data": text, "nostr": about}
        if dm:
            entry["dm"] = dm
        return entry

    # -- the driver's files ---------------------------------------------------------

    def relays_text(self) -> bytes:
        with self.store.read() as txn:
            return bytes(txn.get(RELAYS_KEY, db=self.store.db["meta"]) or b"")

    def since_text(self) -> bytes:
        with self.store.read() as txn:
            raw = txn.get(SINCE_KEY, db=self.store.db["meta"])
        return b"" if raw is None else bytes(raw) + b"\n"

    @staticmethod
    def check_relays(data: bytes, complete: bool = True) -> bytes:
        """The relay list as stored (one URL a line), or EINVAL naming the bad line."""
        try:
            lines = [line.strip() for line in data.decode("utf-8").splitlines()]
        except UnicodeDecodeError:
            raise errors.invalid("nostr/relays: not UTF-8 text") from None
        urls = [line for line in lines if line and not line.startswith("#")]
        for url in urls:
            try:
                parts = urlsplit(url)
                ok = parts.scheme in ("ws", "wss") and bool(parts.hostname) and \
                    parts.port != 0 and " " not in url and len(url) <= 512
            except ValueError:  # a port that is not a number, or out of range
                ok = False
            if not ok:
                raise errors.invalid(f"nostr/relays: {url[:80]!r} is not a ws:// or wss:// URL")
        if len(urls) > MAX_RELAYS:
            raise errors.invalid(f"nostr/relays: more than {MAX_RELAYS} relays")
        return "".join(f"{url}\n" for url in dict.fromkeys(urls)).encode()

    @staticmethod
    def check_since(data: bytes, complete: bool = True) -> bytes:
        text = data.decode("utf-8", errors="replace").strip()
        if not text and not complete:
            return b""
        if not text.isascii() or not text.isdigit() or len(text) > 12:
            raise errors.invalid(f"nostr/since: {text[:40]!r} is not a unix time in seconds")
        return str(int(text)).encode()

    async def set_relays(self, data: bytes) -> None:
        await self._set(RELAYS_KEY, self.check_relays(data))

    async def set_since(self, data: bytes) -> None:
        await self._set(SINCE_KEY, self.check_since(data))

    async def _set(self, key: bytes, value: bytes) -> None:
        def apply(txn: Txn) -> None:
            txn.put(key, value, db=self.store.db["meta"])

        await self.runtime.committer.commit(apply)


def json_event(message: dict[str, Any]) -> bool:
    """Whether an inbox message is an event for `incoming` to open."""
    return message.get("type") == "nostr" and isinstance(message.get("event"), dict)


def nostr_id(event_id: object) -> str | None:
    """The inbox id of an event the driver wrote: `nostr:` and the event's id."""
    return f"nostr:{event_id}" if isinstance(event_id, str) else None
