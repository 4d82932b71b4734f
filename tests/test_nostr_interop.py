"""Our Nostr code against an independent implementation, rust-nostr's nostr-sdk: events, NIP-44,
NIP-04 and NIP-17 each made by one side and checked or opened by the other."""

from __future__ import annotations

import asyncio
import datetime
import json
import os

import nostr_sdk as sdk
import pytest
from relay import Relay, publish, query

from agentfs.nostr import nip04, nip17, nip44
from agentfs.nostr.event import Event, from_json, sign, to_json, unsigned, verify
from agentfs.nostr.keys import public_key

ALICE = bytes.fromhex("00" * 31 + "0a")
BOB = bytes.fromhex("00" * 31 + "0b")
# Random keys too: about half of all public keys have an odd y, which x-only keys hide.
PAIRS = [(ALICE, BOB), (os.urandom(32), os.urandom(32)), (os.urandom(32), os.urandom(32))]
PAIR_IDS = ["fixed", "random-1", "random-2"]

# Contents that test the serialization: escapes, controls, non-BMP, U+2028, DEL, NUL.
CONTENTS = [
    "",
    "hello",
    "quote \" backslash \\ slash / tab \t newline \n return \r",
    "controls \x00\x01\x08\x0c\x1f and DEL \x7f",
    "unicode é ü 漢字 🦄 \u2028 \u2029 \ufeff",
    "long " * 2000,
]
TAGS = [["t", "agentfs"], ["p", "00" * 32, "", "petname"], ["e", "ab" * 32], ["empty", ""]]


def sdk_keys(secret: bytes) -> sdk.Keys:
    return sdk.Keys(sdk.SecretKey.from_bytes(secret))


def sdk_pub(secret: bytes) -> sdk.PublicKey:
    return sdk.PublicKey.from_bytes(public_key(secret))


def to_sdk(event: Event) -> sdk.Event:
    return sdk.Event.from_json(to_json(event))


def from_sdk(event: sdk.Event) -> Event:
    return from_json(event.as_json())


# -- NIP-01 events ---------------------------------------------------------------------------


@pytest.mark.parametrize("content", CONTENTS)
def test_our_event_verifies_in_nostr_sdk(content: str) -> None:
    ours = sign(ALICE, 1, content, TAGS, created_at=1_700_000_000)
    theirs = to_sdk(ours)
    assert theirs.verify_id() and theirs.verify_signature() and theirs.verify()
    assert theirs.id().to_hex() == ours.id
    assert theirs.author().to_hex() == ours.pubkey
    assert json.loads(theirs.as_json()) == ours.to_dict()


@pytest.mark.parametrize("content", CONTENTS)
def test_nostr_sdk_event_verifies_in_ours(content: str) -> None:
    builder = sdk.EventBuilder(sdk.Kind(30023), content)
    builder = builder.tags([sdk.Tag.parse(tag) for tag in TAGS])
    theirs = builder.custom_created_at(sdk.Timestamp.from_secs(1_700_000_000)).finalize(
        sdk_keys(ALICE))
    ours = from_sdk(theirs)
    assert verify(ours)
    assert ours.id == theirs.id().to_hex()
    assert ours.id == Event.compute_id(ours.pubkey, 1_700_000_000, 30023, TAGS, content)
    assert ours.pubkey == public_key(ALICE).hex()


@pytest.mark.parametrize("content", CONTENTS)
def test_ids_agree(content: str) -> None:
    pubkey = public_key(BOB).hex()
    theirs = sdk.EventId.compute(sdk.PublicKey.parse(pubkey), sdk.Timestamp.from_secs(12345),
                                 sdk.Kind(1), [sdk.Tag.parse(tag) for tag in TAGS], content)
    assert theirs.to_hex() == Event.compute_id(pubkey, 12345, 1, TAGS, content)


def test_tampered_events_fail_on_both_sides() -> None:
    ours = sign(ALICE, 1, "original")
    assert ours.sig is not None
    forged_content = Event(ours.id, ours.pubkey, ours.created_at, ours.kind, ours.tags,
                           "forged", ours.sig)
    # The id is recomputed honestly, so only the signature is wrong.
    rehashed = unsigned(ours.pubkey, 1, "forged", created_at=ours.created_at)
    forged_sig = Event(rehashed.id, ours.pubkey, ours.created_at, 1, (), "forged", ours.sig)
    for forged in (forged_content, forged_sig):
        assert not verify(forged)
        assert not to_sdk(forged).verify()
    assert to_sdk(forged_content).verify_signature() and not to_sdk(forged_content).verify_id()
    assert to_sdk(forged_sig).verify_id() and not to_sdk(forged_sig).verify_signature()


# -- NIP-44 v2 -------------------------------------------------------------------------------

# rust-nostr will not encrypt more than 65408 bytes (the largest length whose padded size is
# below 65536), though NIP-44 and its official vectors go to 65535; it decrypts up to 65535.
SDK_MAX_NIP44 = 65408
NIP44_TEXTS = ["x", "hello, bob", "unicode é 漢字 🦄 \u2028", "\x00 nul", "y" * 32, "z" * 33,
               "w" * SDK_MAX_NIP44]


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("text", NIP44_TEXTS, ids=lambda t: f"{len(t.encode())}B")
def test_nip44_nostr_sdk_to_ours(a: bytes, b: bytes, text: str) -> None:
    payload = sdk.nip44_encrypt(sdk.SecretKey.from_bytes(a), sdk_pub(b), text,
                                sdk.Nip44Version.V2)
    assert nip44.decrypt(payload, nip44.get_conversation_key(b, public_key(a))) == text


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("text", [*NIP44_TEXTS, "v" * 65535],
                         ids=lambda t: f"{len(t.encode())}B")
def test_nip44_ours_to_nostr_sdk(a: bytes, b: bytes, text: str) -> None:
    payload = nip44.encrypt(text, nip44.get_conversation_key(a, public_key(b)))
    assert sdk.nip44_decrypt(sdk.SecretKey.from_bytes(b), sdk_pub(a), payload) == text


def test_nip44_conversation_key_is_symmetric_across_implementations() -> None:
    # Each side encrypts to the other with the keys swapped; both decrypt both.
    mine = nip44.encrypt("from alice", nip44.get_conversation_key(ALICE, public_key(BOB)))
    theirs = sdk_keys(BOB).nip44_encrypt(sdk_pub(ALICE), "from bob")
    assert sdk_keys(BOB).nip44_decrypt(sdk_pub(ALICE), mine) == "from alice"
    assert nip44.decrypt(theirs, nip44.get_conversation_key(ALICE, public_key(BOB))) == "from bob"


# -- NIP-04 ----------------------------------------------------------------------------------

NIP04_TEXTS = ["", "a", "p" * 15, "q" * 16, "r" * 17, "unicode é 漢字 🦄", "s" * 5000]


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("text", NIP04_TEXTS, ids=lambda t: f"{len(t.encode())}B")
def test_nip04_both_ways(a: bytes, b: bytes, text: str) -> None:
    theirs = sdk.nip04_encrypt(sdk.SecretKey.from_bytes(a), sdk_pub(b), text)
    assert nip04.decrypt(theirs, b, public_key(a)) == text
    mine = nip04.encrypt(text, a, public_key(b))
    assert sdk.nip04_decrypt(sdk.SecretKey.from_bytes(b), sdk_pub(a), mine) == text


# -- NIP-17 gift wraps -----------------------------------------------------------------------


def sdk_gift_wrap(sender: bytes, recipient: bytes, content: str) -> tuple[sdk.Event, str]:
    """A kind 14 DM gift-wrapped by nostr-sdk, as its private_msg does; and the rumor's id."""
    rumor = sdk.EventBuilder(sdk.Kind(nip17.CHAT_KIND), content).tags(
        [sdk.Tag.public_key(sdk_pub(recipient))]).finalize_unsigned(sdk_pub(sender))
    rumor_id = rumor.ensure_id().id()
    assert rumor_id is not None
    return sdk.nip59_make_gift_wrap(sdk_keys(sender), sdk_pub(recipient), rumor), rumor_id.to_hex()


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=PAIR_IDS)
def test_nip17_nostr_sdk_wraps_we_unwrap(a: bytes, b: bytes) -> None:
    text = "a private note 🦄\nline two"
    wrapped, rumor_id = sdk_gift_wrap(a, b, text)
    ours = from_sdk(wrapped)
    assert ours.kind == nip17.GIFT_WRAP_KIND and ours.tags[0] == ("p", public_key(b).hex())
    assert ours.pubkey != public_key(a).hex()  # a one-time key signs the wrap
    rumor, sender = nip17.unwrap(b, ours)
    assert sender == public_key(a)
    assert (rumor.kind, rumor.content, rumor.id, rumor.sig) == (nip17.CHAT_KIND, text, rumor_id,
                                                               None)
    assert ("p", public_key(b).hex()) in rumor.tags


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=PAIR_IDS)
def test_nip17_we_wrap_nostr_sdk_unwraps(a: bytes, b: bytes) -> None:
    text = "from agentfs 🦄\nline two"
    rumor = unsigned(public_key(a).hex(), nip17.CHAT_KIND, text,
                     [["p", public_key(b).hex()], ["subject", "test"]])
    wrapped = nip17.gift_wrap(nip17.seal(a, public_key(b), rumor), public_key(b))
    opened = sdk.UnwrappedGift.from_gift_wrap(sdk_keys(b), to_sdk(wrapped))
    assert opened.sender().to_hex() == public_key(a).hex()
    theirs = opened.rumor()
    assert theirs.kind().as_u16() == nip17.CHAT_KIND and theirs.content() == text
    assert theirs.author().to_hex() == public_key(a).hex()
    rumor_id = theirs.id()
    assert rumor_id is not None and rumor_id.to_hex() == rumor.id
    assert [t.to_vec() for t in theirs.tags()] == [list(t) for t in rumor.tags]


def test_nip17_wrap_helper_unwraps_in_nostr_sdk() -> None:
    opened = sdk.UnwrappedGift.from_gift_wrap(sdk_keys(BOB),
                                              to_sdk(nip17.wrap(ALICE, public_key(BOB), "hi")))
    assert (opened.sender().to_hex(), opened.rumor().content()) == (public_key(ALICE).hex(),
                                                                    "hi")


def test_nip17_impersonation_is_refused_by_both() -> None:
    # Mallory seals a rumor that claims Alice wrote it.
    mallory = bytes.fromhex("00" * 31 + "0c")
    rumor = unsigned(public_key(ALICE).hex(), nip17.CHAT_KIND, "forged",
                     [["p", public_key(BOB).hex()]])
    key = nip44.get_conversation_key(mallory, public_key(BOB))
    sealed = sign(mallory, nip17.SEAL_KIND, nip44.encrypt(to_json(rumor), key))
    wrapped = nip17.gift_wrap(sealed, public_key(BOB))
    with pytest.raises(ValueError, match="impersonation"):
        nip17.unwrap(BOB, wrapped)
    with pytest.raises(sdk.NostrSdkError):
        sdk.UnwrappedGift.from_gift_wrap(sdk_keys(BOB), to_sdk(wrapped))


# -- through a relay, with nostr-sdk's own client ------------------------------------------


def test_gift_wraps_cross_the_relay_between_nostr_sdk_client_and_ours(relay: Relay) -> None:
    theirs, their_rumor_id = sdk_gift_wrap(ALICE, BOB, "sent by nostr-sdk's client")
    mine = nip17.wrap(BOB, public_key(ALICE), "sent by agentfs")
    publish(relay.url, mine)

    async def nostr_sdk_side() -> list[sdk.Event]:
        client = sdk.Client()
        try:
            await client.add_relay(sdk.RelayUrl.parse(relay.url))
            await client.connect()
            sent = await client.send_event(theirs)
            assert sent.failed == {} and len(sent.success) == 1, sent
            for_alice = sdk.Filter().kind(sdk.Kind(nip17.GIFT_WRAP_KIND)).pubkey(sdk_pub(ALICE))
            found: list[sdk.Event] = await client.fetch_events(
                sdk.ReqTarget.auto([for_alice]), datetime.timedelta(seconds=10))
            return found
        finally:
            await client.shutdown()

    fetched = asyncio.run(nostr_sdk_side())
    assert [e.id().to_hex() for e in fetched] == [mine.id]
    opened = sdk.UnwrappedGift.from_gift_wrap(sdk_keys(ALICE), fetched[0])
    assert opened.sender().to_hex() == public_key(BOB).hex()
    assert opened.rumor().content() == "sent by agentfs"

    [stored] = query(relay.url, {"kinds": [nip17.GIFT_WRAP_KIND], "#p": [public_key(BOB).hex()]})
    assert stored == from_sdk(theirs)
    rumor, sender = nip17.unwrap(BOB, stored)
    assert (rumor.content, rumor.id, sender) == ("sent by nostr-sdk's client", their_rumor_id,
                                                 public_key(ALICE))
