"""NIP-17 private direct messages: a kind 14 rumor, sealed (kind 13), gift-wrapped (kind 1059).

The seal and gift-wrap layers are NIP-59's: the seal is signed by the sender and NIP-44
encrypted to the recipient; the gift wrap is signed by a one-time key, so relays see only
the recipient. Both get a created_at up to two days in the past, so times don't link them.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Sequence

from . import nip44
from .event import Event, check, from_json, sign, to_json, unsigned
from .keys import public_key

__all__ = [
    "CHAT_KIND",
    "GIFT_WRAP_KIND",
    "SEAL_KIND",
    "TWO_DAYS",
    "gift_wrap",
    "random_past_time",
    "seal",
    "unwrap",
    "wrap",
]

CHAT_KIND = 14
SEAL_KIND = 13
GIFT_WRAP_KIND = 1059
TWO_DAYS = 2 * 24 * 60 * 60


def random_past_time(now: int | None = None) -> int:
    """A time uniformly in [now - 2 days, now] (NIP-59's timestamp tweak)."""
    current = int(time.time()) if now is None else now
    return current - secrets.randbelow(TWO_DAYS + 1)


def seal(sender_secret: bytes, recipient_pubkey: bytes, rumor: Event) -> Event:
    """Kind 13: the rumor's JSON, NIP-44 encrypted to the recipient, signed by the sender."""
    if rumor.sig is not None:
        # A signed rumor could be leaked and verified: NIP-17 says kind 14 MUST NOT be signed.
        raise ValueError("a rumor must be unsigned")
    if rumor.pubkey != public_key(sender_secret).hex():
        raise ValueError("the rumor's pubkey must be the sender's")
    key = nip44.get_conversation_key(sender_secret, recipient_pubkey)
    content = nip44.encrypt(to_json(rumor), key)
    return sign(sender_secret, SEAL_KIND, content, (), random_past_time())


def gift_wrap(
    sealed: Event, recipient_pubkey: bytes, extra_tags: Sequence[Sequence[str]] = ()
) -> Event:
    """Kind 1059: the seal's JSON encrypted to the recipient with a fresh one-time key."""
    ephemeral = os.urandom(32)
    key = nip44.get_conversation_key(ephemeral, recipient_pubkey)
    content = nip44.encrypt(to_json(sealed), key)
    tags = [["p", recipient_pubkey.hex()], *[list(t) for t in extra_tags]]
    return sign(ephemeral, GIFT_WRAP_KIND, content, tags, random_past_time())


def wrap(
    sender_secret: bytes,
    recipient_pubkey: bytes,
    content: str,
    tags: Sequence[Sequence[str]] = (),
    created_at: int | None = None,
) -> Event:
    """Gift-wrap a kind 14 chat message from `sender_secret` to `recipient_pubkey`.

    The rumor carries `tags`; if they name no receiver (no `p` tag), `["p", recipient]` is
    added, since NIP-17's p tags say who the room is. Sending the sender's own copy means
    calling this again with the sender's pubkey as recipient and the same tags.
    """
    rumor_tags = [list(t) for t in tags]
    if not any(t and t[0] == "p" for t in rumor_tags):
        rumor_tags.insert(0, ["p", recipient_pubkey.hex()])
    rumor = unsigned(public_key(sender_secret).hex(), CHAT_KIND, content, rumor_tags, created_at)
    return gift_wrap(seal(sender_secret, recipient_pubkey, rumor), recipient_pubkey)


def _inner_event(payload: str, secret: bytes, author: str, what: str) -> Event:
    key = nip44.get_conversation_key(secret, bytes.fromhex(author))
    try:
        return from_json(nip44.decrypt(payload, key))
    except ValueError as exc:  # bad payload, bad JSON (a ValueError too) or a malformed event
        raise ValueError(f"cannot open the {what}: {exc}") from exc


def unwrap(recipient_secret: bytes, wrapped: Event) -> tuple[Event, bytes]:
    """Open a gift wrap: return (rumor, sender's 32-byte pubkey), or raise ValueError.

    Checks the gift wrap's and the seal's ids and signatures, that the seal has no tags,
    that the rumor's id is its hash, and that the rumor's pubkey is the seal's: otherwise
    anyone could seal a rumor claiming another author.
    """
    if wrapped.kind != GIFT_WRAP_KIND:
        raise ValueError(f"not a gift wrap: kind {wrapped.kind}, expected {GIFT_WRAP_KIND}")
    check(wrapped)
    sealed = _inner_event(wrapped.content, recipient_secret, wrapped.pubkey, "gift wrap")
    if sealed.kind != SEAL_KIND:
        raise ValueError(f"gift wrap holds kind {sealed.kind}, not a seal (kind {SEAL_KIND})")
    try:
        check(sealed)
    except ValueError as exc:
        raise ValueError(f"seal: {exc}") from exc
    if sealed.tags:
        raise ValueError("seal has tags (NIP-59: a seal's tags MUST be empty)")
    rumor = _inner_event(sealed.content, recipient_secret, sealed.pubkey, "seal")
    if rumor.expected_id() != rumor.id:
        raise ValueError("rumor id does not match its serialization")
    if rumor.pubkey != sealed.pubkey:
        raise ValueError("rumor pubkey differs from the seal's signer (impersonation attempt)")
    return rumor, bytes.fromhex(sealed.pubkey)
