"""NIP-17 gift wraps: NIP-17's published example unwraps; wrap/unwrap round trip; forgeries."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from agentfs.nostr import nip17, nip44
from agentfs.nostr.event import Event, from_dict, from_json, sign, to_json, unsigned, verify
from agentfs.nostr.keys import parse_secret, public_key

EXAMPLE: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "nip17_example.json").read_text()
)
SENDER = parse_secret(EXAMPLE["sender_nsec"])
RECEIVER = parse_secret(EXAMPLE["receiver_nsec"])
ALICE = bytes.fromhex("00" * 31 + "0a")
BOB = bytes.fromhex("00" * 31 + "0b")
MALLORY = bytes.fromhex("00" * 31 + "0c")
# The rumor inside NIP-17's example (both gift wraps hold the same one).
EXAMPLE_RUMOR_ID = "cf4d60706f9681a31c1cd5850779bcabe1578c1ae293296be20748c2e0771749"


@pytest.mark.parametrize(("index", "secret"), [(0, RECEIVER), (1, SENDER)],
                         ids=["to-receiver", "senders-copy"])
def test_published_example_unwraps(index: int, secret: bytes) -> None:
    wrapped = from_dict(EXAMPLE["gift_wraps"][index])
    assert wrapped.tags[0] == ("p", public_key(secret).hex())
    rumor, sender = nip17.unwrap(secret, wrapped)
    assert sender == public_key(SENDER)
    assert rumor.content == EXAMPLE["content"]
    assert rumor.kind == nip17.CHAT_KIND
    assert rumor.id == EXAMPLE_RUMOR_ID and rumor.sig is None
    assert ("p", public_key(RECEIVER).hex()) in rumor.tags


def test_example_refuses_the_wrong_recipient() -> None:
    with pytest.raises(ValueError, match="gift wrap"):
        nip17.unwrap(SENDER, from_dict(EXAMPLE["gift_wraps"][0]))


def test_wrap_unwrap_round_trip() -> None:
    before = int(time.time())
    wrapped = nip17.wrap(ALICE, public_key(BOB), "hello\nbob 🎉", [["subject", "s"]])
    assert wrapped.kind == nip17.GIFT_WRAP_KIND and verify(wrapped)
    assert wrapped.tags == (("p", public_key(BOB).hex()),)
    # Signed by a one-time key, not Alice's, dated up to two days back.
    assert wrapped.pubkey != public_key(ALICE).hex()
    assert before - nip17.TWO_DAYS <= wrapped.created_at <= int(time.time())
    rumor, sender = nip17.unwrap(BOB, wrapped)
    assert sender == public_key(ALICE)
    assert rumor.content == "hello\nbob 🎉" and rumor.kind == 14
    assert rumor.tags == (("p", public_key(BOB).hex()), ("subject", "s"))
    assert abs(rumor.created_at - before) <= 5


def test_seal_is_signed_tagless_and_dated_back() -> None:
    wrapped = nip17.wrap(ALICE, public_key(BOB), "x")
    key = nip44.get_conversation_key(BOB, bytes.fromhex(wrapped.pubkey))
    sealed = from_json(nip44.decrypt(wrapped.content, key))
    assert sealed.kind == nip17.SEAL_KIND and sealed.tags == () and verify(sealed)
    assert sealed.pubkey == public_key(ALICE).hex()
    assert int(time.time()) - nip17.TWO_DAYS <= sealed.created_at <= int(time.time())


def test_each_wrap_uses_a_fresh_key() -> None:
    a = nip17.wrap(ALICE, public_key(BOB), "x")
    b = nip17.wrap(ALICE, public_key(BOB), "x")
    assert a.pubkey != b.pubkey


def test_random_past_time_spans_two_days() -> None:
    times = {nip17.random_past_time(1_000_000) for _ in range(200)}
    assert all(1_000_000 - nip17.TWO_DAYS <= t <= 1_000_000 for t in times)
    assert len(times) > 150


def test_given_p_tags_are_kept() -> None:
    carol = public_key(MALLORY).hex()
    wrapped = nip17.wrap(ALICE, public_key(ALICE), "copy", [["p", carol]])
    rumor, _ = nip17.unwrap(ALICE, wrapped)
    assert rumor.tags == (("p", carol),)


def _wrap_seal(sealed: Event, recipient: bytes) -> Event:
    return nip17.gift_wrap(sealed, public_key(recipient))


def _seal_of(rumor: Event, signer: bytes, recipient: bytes, tags: list[list[str]] | None = None
             ) -> Event:
    key = nip44.get_conversation_key(signer, public_key(recipient))
    return sign(signer, nip17.SEAL_KIND, nip44.encrypt(to_json(rumor), key), tags or [])


def test_impersonation_is_refused() -> None:
    # Mallory seals (and signs) a rumor that claims Alice wrote it.
    rumor = unsigned(public_key(ALICE).hex(), 14, "send money", [["p", public_key(BOB).hex()]])
    forged = _wrap_seal(_seal_of(rumor, MALLORY, BOB), BOB)
    with pytest.raises(ValueError, match="impersonation"):
        nip17.unwrap(BOB, forged)


def test_bad_seal_signature_is_refused() -> None:
    rumor = unsigned(public_key(ALICE).hex(), 14, "x")
    sealed = _seal_of(rumor, ALICE, BOB)
    assert sealed.sig is not None
    broken = Event(sealed.id, sealed.pubkey, sealed.created_at, sealed.kind, sealed.tags,
                   sealed.content, sealed.sig[:-2] + ("00" if sealed.sig[-2:] != "00" else "11"))
    with pytest.raises(ValueError, match="seal"):
        nip17.unwrap(BOB, _wrap_seal(broken, BOB))


def test_seal_with_tags_is_refused() -> None:
    rumor = unsigned(public_key(ALICE).hex(), 14, "x")
    with pytest.raises(ValueError, match="tags"):
        nip17.unwrap(BOB, _wrap_seal(_seal_of(rumor, ALICE, BOB, [["p", "x"]]), BOB))


def test_rumor_with_wrong_id_is_refused() -> None:
    good = unsigned(public_key(ALICE).hex(), 14, "x")
    bad = Event("00" * 32, good.pubkey, good.created_at, good.kind, good.tags, good.content)
    with pytest.raises(ValueError, match="rumor id"):
        nip17.unwrap(BOB, _wrap_seal(_seal_of(bad, ALICE, BOB), BOB))


def test_tampered_gift_wrap_is_refused() -> None:
    wrapped = nip17.wrap(ALICE, public_key(BOB), "x")
    obj = wrapped.to_dict() | {"content": wrapped.content[:-4] + "AAA="}
    with pytest.raises(ValueError, match="id does not match"):
        nip17.unwrap(BOB, from_dict(obj))


def test_not_a_gift_wrap_is_refused() -> None:
    with pytest.raises(ValueError, match="kind"):
        nip17.unwrap(BOB, sign(ALICE, 1, "hi"))


def test_gift_wrap_holding_a_non_seal_is_refused() -> None:
    inner = sign(ALICE, 1, "hi")
    with pytest.raises(ValueError, match="not a seal"):
        nip17.unwrap(BOB, _wrap_seal(inner, BOB))


def test_seal_refuses_signed_or_foreign_rumors() -> None:
    with pytest.raises(ValueError, match="unsigned"):
        nip17.seal(ALICE, public_key(BOB), sign(ALICE, 14, "x"))
    with pytest.raises(ValueError, match="sender"):
        nip17.seal(ALICE, public_key(BOB), unsigned(public_key(BOB).hex(), 14, "x"))


def test_garbage_inside_the_wrap_is_refused() -> None:
    eph = os.urandom(32)
    key = nip44.get_conversation_key(eph, public_key(BOB))
    wrapped = sign(eph, 1059, nip44.encrypt("not json", key), [["p", public_key(BOB).hex()]])
    with pytest.raises(ValueError, match="cannot open"):
        nip17.unwrap(BOB, wrapped)
