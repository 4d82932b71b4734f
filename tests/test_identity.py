"""Tests for agentfs.identity: NIP-06 vectors, agent account mapping, NIP-19 encoding, mnemonics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from bip32 import BIP32
from mnemonic import Mnemonic

from agentfs import identity
from agentfs.identity import (
    Identity,
    agent_private_key,
    derive_private_key,
    generate_mnemonic,
    normalize_mnemonic,
    npub_decode,
    npub_encode,
    nsec_decode,
    nsec_encode,
    public_key,
    user_private_key,
)

VECTORS_FILE = Path(__file__).parent / "vectors" / "nip06.json"
NIP06: dict[str, Any] = json.loads(VECTORS_FILE.read_text())
VECTORS: list[dict[str, str]] = NIP06["vectors"]
M12 = VECTORS[0]["mnemonic"]
M24 = VECTORS[1]["mnemonic"]


def _flip_last_char(s: str) -> str:
    # Any single-character change is caught by bech32's checksum.
    return s[:-1] + ("q" if s[-1] != "q" else "p")


def test_vectors_file_names_its_source() -> None:
    assert "nostr-protocol/nips" in NIP06["source"]
    assert "06.md" in NIP06["source"]
    assert len(VECTORS) == 2


@pytest.mark.parametrize("v", VECTORS, ids=["12-words", "24-words"])
def test_nip06_vectors(v: dict[str, str]) -> None:
    priv = user_private_key(v["mnemonic"])
    assert priv.hex() == v["private_key_hex"]
    assert derive_private_key(v["mnemonic"], 0) == priv
    assert nsec_encode(priv) == v["nsec"]
    pub = public_key(priv)
    assert pub.hex() == v["public_key_hex"]
    assert npub_encode(pub) == v["npub"]
    assert npub_decode(v["npub"]) == pub
    assert nsec_decode(v["nsec"]) == priv


@pytest.mark.parametrize("mnemonic", [M12, M24])
def test_agent_n_is_account_n_plus_1(mnemonic: str) -> None:
    user = user_private_key(mnemonic)
    agent0 = agent_private_key(mnemonic, 0)
    assert agent0 == derive_private_key(mnemonic, 1)
    assert agent0 != user
    assert agent_private_key(mnemonic, 7) == derive_private_key(mnemonic, 8)
    # Cross-check against a plain bip32 derivation from the seed, bypassing the module's cache
    # of the m/44'/1237' node.
    master = BIP32.from_seed(Mnemonic.to_seed(mnemonic))
    assert agent0 == master.get_privkey_from_path("m/44'/1237'/1'/0/0")
    assert agent_private_key(mnemonic, 41) == master.get_privkey_from_path("m/44'/1237'/42'/0/0")


def test_agents_have_distinct_keys() -> None:
    keys = {agent_private_key(M24, n) for n in range(50)}
    keys.add(user_private_key(M24))
    assert len(keys) == 51


def test_agent_number_must_be_non_negative() -> None:
    with pytest.raises(ValueError):
        agent_private_key(M24, -1)


@pytest.mark.parametrize("account", [-1, 2**31])
def test_account_out_of_range(account: int) -> None:
    with pytest.raises(ValueError):
        derive_private_key(M24, account)


def test_derivation_normalizes_mnemonic() -> None:
    messy = "  " + M12.upper().replace(" ", " \n\t ") + "\n"
    assert user_private_key(messy).hex() == VECTORS[0]["private_key_hex"]


def test_derivation_rejects_invalid_mnemonic() -> None:
    with pytest.raises(ValueError):
        user_private_key("abandon " * 12)


def test_identity() -> None:
    ident = Identity.of_agent(M24, 3)
    pub = public_key(agent_private_key(M24, 3))
    assert ident == Identity(3, pub)
    assert ident.hex == pub.hex()
    assert len(ident.hex) == 64
    assert ident.npub == npub_encode(pub)
    assert ident.npub.startswith("npub1")
    with pytest.raises(ValueError):
        Identity(0, b"\x01" * 31)


def test_public_key_rejects_bad_private_keys() -> None:
    with pytest.raises(ValueError):
        public_key(b"\x01" * 31)
    with pytest.raises(ValueError):
        public_key(bytes(32))  # zero is not a valid secp256k1 scalar
    with pytest.raises(ValueError):
        public_key(b"\xff" * 32)  # above the group order


def test_npub_nsec_round_trip() -> None:
    for n in range(5):
        priv = agent_private_key(M12, n)
        pub = public_key(priv)
        nsec = nsec_encode(priv)
        npub = npub_encode(pub)
        assert nsec.startswith("nsec1")
        assert npub.startswith("npub1")
        assert len(npub) == len(nsec) == 63
        assert nsec_decode(nsec) == priv
        assert npub_decode(npub) == pub


def test_decode_accepts_upper_case_and_surrounding_whitespace() -> None:
    v = VECTORS[0]
    assert npub_decode(" " + v["npub"].upper() + "\n").hex() == v["public_key_hex"]


def test_decode_rejects_bad_checksum() -> None:
    v = VECTORS[1]
    with pytest.raises(ValueError, match="checksum"):
        npub_decode(_flip_last_char(v["npub"]))
    with pytest.raises(ValueError, match="checksum"):
        nsec_decode(_flip_last_char(v["nsec"]))


def test_decode_rejects_wrong_hrp() -> None:
    v = VECTORS[1]
    with pytest.raises(ValueError, match="npub"):
        npub_decode(v["nsec"])
    with pytest.raises(ValueError, match="nsec"):
        nsec_decode(v["npub"])


def test_bad_nsec_is_not_echoed() -> None:
    bad = _flip_last_char(VECTORS[1]["nsec"])
    with pytest.raises(ValueError) as info:
        nsec_decode(bad)
    assert bad not in str(info.value)
    assert bad[5:20] not in str(info.value)


def test_decode_rejects_wrong_length() -> None:
    from bech32 import bech32_encode, convertbits

    data = convertbits(b"\x02" * 31, 8, 5)
    assert data is not None
    with pytest.raises(ValueError, match="32 bytes"):
        npub_decode(bech32_encode("npub", data))
    with pytest.raises(ValueError):
        npub_encode(b"\x02" * 33)
    with pytest.raises(ValueError):
        nsec_encode(b"\x02" * 31)


def test_npub_decode_rejects_point_off_curve() -> None:
    # x = 5 is not the x-coordinate of a secp256k1 point (5^3 + 7 = 132 is a non-residue).
    off_curve = (5).to_bytes(32, "big")
    with pytest.raises(ValueError, match="valid"):
        npub_decode(npub_encode(off_curve))


def test_normalize_mnemonic_canonical_form() -> None:
    assert normalize_mnemonic(M24) == M24
    messy = "\n" + M24.replace(" ", "   ").title() + "  \n"
    assert normalize_mnemonic(messy) == M24


def test_normalize_mnemonic_rejects_bad_checksum() -> None:
    # "abandon" x 12 decodes (all words are valid) but its checksum does not match;
    # "abandon" x 11 + "about" is the valid one.
    assert normalize_mnemonic("abandon " * 11 + "about")
    with pytest.raises(ValueError, match="checksum"):
        normalize_mnemonic("abandon " * 12)
    # Swapping two words of a valid mnemonic also breaks the checksum.
    words = M24.split()
    words[0], words[1] = words[1], words[0]
    with pytest.raises(ValueError, match="checksum"):
        normalize_mnemonic(" ".join(words))


def test_normalize_mnemonic_names_unknown_word() -> None:
    words = M12.split()
    words[4] = "gxide"
    with pytest.raises(ValueError, match=r"word 5 'gxide'"):
        normalize_mnemonic(" ".join(words))


@pytest.mark.parametrize("count", [0, 1, 11, 13, 25])
def test_normalize_mnemonic_rejects_word_count(count: int) -> None:
    with pytest.raises(ValueError, match="words"):
        normalize_mnemonic(" ".join(["abandon"] * count))


def test_generate_mnemonic() -> None:
    a = generate_mnemonic()
    b = generate_mnemonic()
    assert len(a.split()) == 24
    assert len(b.split()) == 24
    assert normalize_mnemonic(a) == a
    assert normalize_mnemonic(b) == b
    assert a != b
    assert Mnemonic("english").check(a)


def test_seed_computed_once_per_mnemonic(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = Mnemonic.to_seed

    def counting(mnemonic: str, passphrase: str = "") -> bytes:
        nonlocal calls
        calls += 1
        return real(mnemonic, passphrase)

    identity._coin_type_node.cache_clear()
    monkeypatch.setattr(Mnemonic, "to_seed", staticmethod(counting))
    try:
        for n in range(20):
            agent_private_key(M24, n)
        user_private_key(M24)
        assert calls == 1
    finally:
        identity._coin_type_node.cache_clear()
