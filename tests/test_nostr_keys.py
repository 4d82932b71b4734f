"""Key parsing (hex or NIP-19), NIP-19 encode/decode including `note`, raw ECDH."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from coincurve import PrivateKey

from agentfs.nostr.keys import (
    decode_bech32,
    encode_bech32,
    parse_public,
    parse_secret,
    shared_x,
)

NIP06 = json.loads((Path(__file__).parent / "vectors" / "nip06.json").read_text())["vectors"][0]


def test_parse_hex_and_bech32_agree() -> None:
    sec, pub = NIP06["private_key_hex"], NIP06["public_key_hex"]
    assert parse_secret(sec) == parse_secret(NIP06["nsec"]) == bytes.fromhex(sec)
    assert parse_secret(sec.upper()) == bytes.fromhex(sec)
    assert parse_public(pub) == parse_public(NIP06["npub"]) == bytes.fromhex(pub)
    assert parse_public(f"  {pub}\n") == bytes.fromhex(pub)


@pytest.mark.parametrize("text", ["", "00" * 32, "ff" * 32, "abc", NIP06["npub"], "zz" * 32])
def test_bad_secrets_are_refused_without_echo(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_secret(text)
    if text:
        assert text not in str(info.value)


@pytest.mark.parametrize("text", ["", "ff" * 32, "12" * 31, NIP06["nsec"], "npub1qqqq"])
def test_bad_publics_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_public(text)


def test_nip19_round_trips() -> None:
    pub, sec = bytes.fromhex(NIP06["public_key_hex"]), bytes.fromhex(NIP06["private_key_hex"])
    assert encode_bech32("npub", pub) == NIP06["npub"]
    assert encode_bech32("nsec", sec) == NIP06["nsec"]
    assert decode_bech32(NIP06["npub"]) == ("npub", pub)
    assert decode_bech32(NIP06["nsec"]) == ("nsec", sec)
    note = encode_bech32("note", bytes(range(32)))
    assert note.startswith("note1")
    assert decode_bech32(note) == ("note", bytes(range(32)))


def test_nip19_refusals() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        encode_bech32("nprofile", bytes(32))
    with pytest.raises(ValueError):
        encode_bech32("note", bytes(31))
    with pytest.raises(ValueError):
        decode_bech32(NIP06["npub"][:-1] + "q")
    with pytest.raises(ValueError, match="unsupported"):
        # A valid bech32 string of another type (BIP-173's example).
        decode_bech32("bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4")


def test_shared_x_is_symmetric_and_unhashed() -> None:
    a, b = bytes.fromhex("00" * 31 + "01"), bytes.fromhex("00" * 31 + "02")
    pa, pb = PrivateKey(a).public_key_xonly.format(), PrivateKey(b).public_key_xonly.format()
    assert shared_x(a, pb) == shared_x(b, pa)
    # 1·(2G) = 2G: the shared x is B's own x coordinate.
    assert shared_x(a, pb) == pb
