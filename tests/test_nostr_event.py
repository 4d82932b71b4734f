"""NIP-01 events: serialization, pinned id and signature, BIP-340 vectors, verify, JSON form."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from agentfs.nostr.event import (
    Event,
    check,
    from_dict,
    from_json,
    sign,
    sign_digest,
    to_json,
    unsigned,
    verify,
    verify_digest,
)

VECTORS = Path(__file__).parent / "vectors"
SECRET3 = bytes.fromhex("00" * 31 + "03")
PUB3 = "f9308a019258c31049344f85f89d5229b531c845836f99b08601f113bce036f9"
PEER = "c6047f9441ed7d6d3045406e95c07cd85c778e4b8cef3ca7abac09b95c709ee5"
# Every character NIP-01 names, plus a control character it does not (\x01, written \u0001
# as JSON.stringify and serde_json do), DEL and '/' (both verbatim), and non-ASCII (verbatim).
CONTENT = 'say "hi"\\\n\t\r\b\f日本 🎉\x01\x7f/'
TAGS = [["p", PEER], ["t", "nostr"]]
# The serialization written out by hand, independently of json.dumps.
BY_HAND = (
    '[0,"' + PUB3 + '",1700000000,1,[["p","' + PEER + '"],["t","nostr"]],'
    '"say \\"hi\\"\\\\\\n\\t\\r\\b\\f日本 🎉\\u0001\x7f/"]'
).encode("utf-8")
PINNED_ID = "de03e793cccd27669d7a4544f9a26b0cabd6ff9ac826cf8c3052ffe4eba2e3c5"
# BIP-340 with aux_rand = 32 zero bytes is deterministic, so the signature can be pinned.
PINNED_SIG = (
    "9ed9ecdb94028c4b967cf304491793f57db46084191115b05dbc79d92c986b20"
    "6d8ace9f6ea9435f35e49791571853652a95556fef6c5439237eeb4d652e7b33"
)


def _pinned() -> Event:
    return sign(SECRET3, 1, CONTENT, TAGS, 1700000000, aux_rand=bytes(32))


def test_serialize_matches_hand_written_nip01_form() -> None:
    assert Event.serialize(PUB3, 1700000000, 1, TAGS, CONTENT) == BY_HAND


def test_pinned_id_is_sha256_of_hand_serialization() -> None:
    assert hashlib.sha256(BY_HAND).hexdigest() == PINNED_ID
    assert Event.compute_id(PUB3, 1700000000, 1, TAGS, CONTENT) == PINNED_ID


def test_sign_pins_id_and_signature() -> None:
    event = _pinned()
    assert (event.id, event.pubkey, event.sig) == (PINNED_ID, PUB3, PINNED_SIG)
    assert event.tags == (("p", PEER), ("t", "nostr"))
    assert verify(event)


def test_sign_with_fresh_randomness_verifies() -> None:
    a, b = sign(SECRET3, 1, "x", created_at=5), sign(SECRET3, 1, "x", created_at=5)
    assert a.id == b.id and a.sig != b.sig
    assert verify(a) and verify(b)


def test_sign_defaults_created_at_to_now() -> None:
    import time

    event = sign(SECRET3, 1, "x")
    assert abs(event.created_at - time.time()) < 60


def test_published_events_verify() -> None:
    # Events signed by other software: the gift wraps published in NIP-17's example.
    example = json.loads((VECTORS / "nip17_example.json").read_text())
    for obj in example["gift_wraps"]:
        event = from_dict(obj)
        assert event.expected_id() == obj["id"]
        assert verify(event)


@pytest.mark.parametrize(
    "change",
    [
        {"content": CONTENT + " "},
        {"kind": 2},
        {"created_at": 1700000001},
        {"tags": (("p", PEER),)},
        {"pubkey": PEER},
    ],
    ids=["content", "kind", "created_at", "tags", "pubkey"],
)
def test_verify_rejects_tampered_fields(change: dict[str, object]) -> None:
    tampered = dataclasses.replace(_pinned(), **change)  # type: ignore[arg-type]
    assert not verify(tampered)
    with pytest.raises(ValueError, match="id does not match"):
        check(tampered)


def test_verify_rejects_tampered_signature_even_with_a_recomputed_id() -> None:
    event = _pinned()
    assert event.sig is not None
    bad_sig = event.sig[:-1] + ("0" if event.sig[-1] != "0" else "1")
    assert not verify(dataclasses.replace(event, sig=bad_sig))
    # Content changed and id recomputed: the id holds, the signature does not.
    other = unsigned(event.pubkey, event.kind, "changed", event.tags, event.created_at)
    forged = dataclasses.replace(other, sig=event.sig)
    with pytest.raises(ValueError, match="signature is not valid"):
        check(forged)
    # Someone else's signature over the same id.
    theirs = sign(bytes.fromhex("00" * 31 + "04"), 1, CONTENT, TAGS, 1700000000)
    assert not verify(dataclasses.replace(event, sig=theirs.sig))


def test_unsigned_event_does_not_verify() -> None:
    rumor = unsigned(PUB3, 14, "hi", created_at=1)
    assert rumor.sig is None and rumor.expected_id() == rumor.id
    assert not verify(rumor)
    with pytest.raises(ValueError, match="unsigned"):
        check(rumor)
    assert "sig" not in json.loads(to_json(rumor))


def test_json_round_trip() -> None:
    event = _pinned()
    text = to_json(event)
    assert list(json.loads(text)) == ["id", "pubkey", "created_at", "kind", "tags", "content",
                                      "sig"]
    assert "日本" in text
    assert from_json(text) == event
    assert from_json(text.encode()) == event


def test_from_json_ignores_unknown_keys() -> None:
    obj = _pinned().to_dict() | {"relay": "wss://x"}
    assert verify(from_dict(obj))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "AB" * 32),
        ("id", "ab" * 31),
        ("pubkey", 5),
        ("created_at", -1),
        ("created_at", "1"),
        ("created_at", True),
        ("kind", 65536),
        ("kind", 1.0),
        ("tags", [["p", None]]),
        ("tags", ["p"]),
        ("tags", {"p": "x"}),
        ("tags", [{"p": "x"}]),
        ("content", None),
        ("sig", "00" * 63),
    ],
)
def test_malformed_events_are_refused(field: str, value: object) -> None:
    obj = _pinned().to_dict()
    obj[field] = value
    with pytest.raises(ValueError):
        from_dict(obj)


@pytest.mark.parametrize("text", ["[]", "{}", '{"id": 1', "null"])
def test_bad_json_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        from_json(text)


def test_lone_surrogate_content_is_refused() -> None:
    with pytest.raises(ValueError, match="surrogate"):
        Event.serialize(PUB3, 1, 1, [], "\ud83e")


def _bip340_rows() -> list[dict[str, str]]:
    with (VECTORS / "bip340-test-vectors.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("row", _bip340_rows(), ids=lambda r: f"bip340-{r['index']}")
def test_bip340_vectors(row: dict[str, str]) -> None:
    pub = bytes.fromhex(row["public key"])
    msg = bytes.fromhex(row["message"])
    sig = bytes.fromhex(row["signature"])
    expected = row["verification result"] == "TRUE"
    if row["secret key"]:
        secret = bytes.fromhex(row["secret key"])
        assert sign_digest(secret, msg, bytes.fromhex(row["aux_rand"])) == sig
    assert verify_digest(pub, msg, sig) is expected


def test_bip340_vectors_file_is_the_copied_one() -> None:
    sources = json.loads((VECTORS / "nostr_sources.json").read_text())
    data = (VECTORS / "bip340-test-vectors.csv").read_bytes()
    assert hashlib.sha256(data).hexdigest() == sources["bip340-test-vectors.csv"]["sha256"]
    assert len(_bip340_rows()) == 15
