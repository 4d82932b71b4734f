"""NIP-01 events: canonical serialization, id, BIP-340 signature, and the JSON wire form."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coincurve import PrivateKey, PublicKeyXOnly

from .keys import public_key

__all__ = [
    "Event",
    "Tags",
    "check",
    "from_dict",
    "from_json",
    "sign",
    "sign_digest",
    "to_json",
    "unsigned",
    "verify",
    "verify_digest",
]

Tags = tuple[tuple[str, ...], ...]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
_MAX_KIND = 65535


def _as_tags(tags: Sequence[Sequence[str]]) -> Tags:
    # Only arrays: a dict or a string is iterable too, and must not pass for a tag list.
    if not isinstance(tags, list | tuple):
        raise ValueError("tags must be an array of arrays of strings")
    out = []
    for tag in tags:
        if not isinstance(tag, list | tuple):
            raise ValueError("each tag must be an array of strings")
        if not all(isinstance(item, str) for item in tag):
            raise ValueError("tag elements must be strings (NIP-01: non-null strings)")
        out.append(tuple(tag))
    return tuple(out)


def _is_int(value: object) -> bool:
    # bool is an int subclass; JSON true is not a number.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Event:
    """A Nostr event. `sig` is None for an unsigned event (a NIP-59 rumor).

    Construction checks the shape of every field (lowercase hex, kind range, string tags);
    whether id and sig are right is `check`'s and `verify`'s business.
    """

    id: str
    pubkey: str
    created_at: int
    kind: int
    tags: Tags
    content: str
    sig: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _HEX64.fullmatch(self.id):
            raise ValueError("id must be 64 lowercase hex digits")
        if not isinstance(self.pubkey, str) or not _HEX64.fullmatch(self.pubkey):
            raise ValueError("pubkey must be 64 lowercase hex digits")
        if not _is_int(self.created_at) or self.created_at < 0:
            raise ValueError("created_at must be a non-negative integer (unix seconds)")
        if not _is_int(self.kind) or not 0 <= self.kind <= _MAX_KIND:
            raise ValueError(f"kind must be an integer in [0, {_MAX_KIND}]")
        if not isinstance(self.content, str):
            raise ValueError("content must be a string")
        if self.sig is not None and (
            not isinstance(self.sig, str) or not _HEX128.fullmatch(self.sig)
        ):
            raise ValueError("sig must be 128 lowercase hex digits")
        # Normalise lists to tuples so a frozen Event is immutable all the way down.
        object.__setattr__(self, "tags", _as_tags(self.tags))

    @staticmethod
    def serialize(
        pubkey: str, created_at: int, kind: int, tags: Sequence[Sequence[str]], content: str
    ) -> bytes:
        """Return the NIP-01 serialization `[0,pubkey,created_at,kind,tags,content]`, UTF-8.

        No whitespace; non-ASCII verbatim; `"` `\\` and the control characters escaped as
        JSON.stringify and serde_json do (\\n \\r \\t \\b \\f by name, the rest as \\u00XX).
        A string with a lone surrogate has no UTF-8 form: ValueError.
        """
        text = json.dumps(
            [0, pubkey, created_at, kind, [list(tag) for tag in tags], content],
            ensure_ascii=False,
            separators=(",", ":"),
        )
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError("event text is not valid Unicode (lone surrogate)") from exc

    @staticmethod
    def compute_id(
        pubkey: str, created_at: int, kind: int, tags: Sequence[Sequence[str]], content: str
    ) -> str:
        """Return the event id: lowercase hex sha256 of the serialization."""
        return hashlib.sha256(Event.serialize(pubkey, created_at, kind, tags, content)).hexdigest()

    def expected_id(self) -> str:
        """The id this event's fields hash to (equal to `id` when the event is intact)."""
        return Event.compute_id(self.pubkey, self.created_at, self.kind, self.tags, self.content)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object form; an unsigned event has no `sig` key."""
        out: dict[str, Any] = {
            "id": self.id,
            "pubkey": self.pubkey,
            "created_at": self.created_at,
            "kind": self.kind,
            "tags": [list(tag) for tag in self.tags],
            "content": self.content,
        }
        if self.sig is not None:
            out["sig"] = self.sig
        return out


def from_dict(obj: Mapping[str, Any]) -> Event:
    """Build an Event from a JSON object; unknown keys are ignored, `sig` may be absent."""
    if not isinstance(obj, Mapping):
        raise ValueError("an event must be a JSON object")
    missing = [k for k in ("id", "pubkey", "created_at", "kind", "tags", "content") if k not in obj]
    if missing:
        raise ValueError(f"event lacks {', '.join(missing)}")
    return Event(
        id=obj["id"],
        pubkey=obj["pubkey"],
        created_at=obj["created_at"],
        kind=obj["kind"],
        tags=obj["tags"],
        content=obj["content"],
        sig=obj.get("sig"),
    )


def from_json(text: str | bytes) -> Event:
    """Parse one event from JSON text (ValueError on bad JSON or a malformed event)."""
    return from_dict(json.loads(text))


def to_json(event: Event) -> str:
    """The event as compact JSON, non-ASCII verbatim, keys in NIP-01's order."""
    return json.dumps(event.to_dict(), ensure_ascii=False, separators=(",", ":"))


def sign_digest(secret: bytes, digest: bytes, aux_rand: bytes | None = None) -> bytes:
    """BIP-340 signature of a 32-byte digest. `aux_rand` defaults to 32 fresh random bytes."""
    if len(digest) != 32:
        raise ValueError("BIP-340 signs a 32-byte message")
    if aux_rand is None:
        aux_rand = os.urandom(32)
    if len(aux_rand) != 32:
        raise ValueError("BIP-340 auxiliary randomness must be 32 bytes")
    signature: bytes = PrivateKey(secret).sign_schnorr(digest, aux_rand)
    return signature


def verify_digest(pubkey: bytes, digest: bytes, signature: bytes) -> bool:
    """True if `signature` is a valid BIP-340 signature of `digest` by x-only `pubkey`."""
    if len(pubkey) != 32 or len(digest) != 32 or len(signature) != 64:
        return False
    try:
        key = PublicKeyXOnly(pubkey)
    except ValueError:
        return False
    ok: bool = key.verify(signature, digest)
    return ok


def unsigned(
    pubkey: str,
    kind: int,
    content: str,
    tags: Sequence[Sequence[str]] = (),
    created_at: int | None = None,
) -> Event:
    """An event with its id but no signature (what NIP-59 calls a rumor)."""
    when = int(time.time()) if created_at is None else created_at
    tag_tuple = _as_tags(tags)
    event_id = Event.compute_id(pubkey, when, kind, tag_tuple, content)
    return Event(event_id, pubkey, when, kind, tag_tuple, content)


def sign(
    secret: bytes,
    kind: int,
    content: str,
    tags: Sequence[Sequence[str]] = (),
    created_at: int | None = None,
    aux_rand: bytes | None = None,
) -> Event:
    """Return a signed event by `secret`'s key. created_at defaults to now."""
    draft = unsigned(public_key(secret).hex(), kind, content, tags, created_at)
    sig = sign_digest(secret, bytes.fromhex(draft.id), aux_rand)
    return Event(draft.id, draft.pubkey, draft.created_at, draft.kind, draft.tags, draft.content,
                 sig.hex())


def check(event: Event) -> None:
    """Raise ValueError saying what is wrong if `event`'s id or signature does not hold."""
    if event.expected_id() != event.id:
        raise ValueError("event id does not match its serialization")
    if event.sig is None:
        raise ValueError("event is unsigned")
    if not verify_digest(
        bytes.fromhex(event.pubkey), bytes.fromhex(event.id), bytes.fromhex(event.sig)
    ):
        raise ValueError("event signature is not valid for its pubkey and id")


def verify(event: Event) -> bool:
    """True if `event`'s id is the hash of its fields and its signature is valid."""
    try:
        check(event)
    except ValueError:
        return False
    return True
