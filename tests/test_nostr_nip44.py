"""NIP-44 v2 against every group of the official vectors (paulmillr/nip44)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from agentfs.nostr import nip44
from agentfs.nostr.keys import public_key

VECTORS = Path(__file__).parent / "vectors"
FILE = VECTORS / "nip44.vectors.json"
SHA256 = "269ed0f69e4c192512cc779e78c555090cebc7c785b609e338a62afc3ce25040"
V2: dict[str, Any] = json.loads(FILE.read_text())["v2"]
VALID, INVALID = V2["valid"], V2["invalid"]


def _h(s: str) -> bytes:
    return bytes.fromhex(s)


def test_vectors_are_the_published_file() -> None:
    # The checksum NIP-44 itself publishes for nip44.vectors.json.
    assert hashlib.sha256(FILE.read_bytes()).hexdigest() == SHA256
    sources = json.loads((VECTORS / "nostr_sources.json").read_text())
    assert sources["nip44.vectors.json"]["sha256"] == SHA256
    assert "paulmillr/nip44" in sources["nip44.vectors.json"]["source"]


def test_every_group_is_tested() -> None:
    # If the file grows a group, this fails until a test covers it.
    assert set(VALID) == {"get_conversation_key", "get_message_keys", "calc_padded_len",
                          "encrypt_decrypt", "encrypt_decrypt_long_msg"}
    assert set(INVALID) == {"encrypt_msg_lengths", "get_conversation_key", "decrypt"}


@pytest.mark.parametrize("v", VALID["get_conversation_key"])
def test_get_conversation_key(v: dict[str, str]) -> None:
    assert nip44.get_conversation_key(_h(v["sec1"]), _h(v["pub2"])).hex() == v["conversation_key"]


@pytest.mark.parametrize("v", VALID["get_message_keys"]["keys"])
def test_get_message_keys(v: dict[str, str]) -> None:
    conversation_key = _h(VALID["get_message_keys"]["conversation_key"])
    keys = nip44.get_message_keys(conversation_key, _h(v["nonce"]))
    assert keys.chacha_key.hex() == v["chacha_key"]
    assert keys.chacha_nonce.hex() == v["chacha_nonce"]
    assert keys.hmac_key.hex() == v["hmac_key"]


@pytest.mark.parametrize(("unpadded", "padded"), VALID["calc_padded_len"])
def test_calc_padded_len(unpadded: int, padded: int) -> None:
    assert nip44.calc_padded_len(unpadded) == padded


@pytest.mark.parametrize("v", VALID["encrypt_decrypt"])
def test_encrypt_decrypt(v: dict[str, str]) -> None:
    sec1, sec2 = _h(v["sec1"]), _h(v["sec2"])
    key = nip44.get_conversation_key(sec1, public_key(sec2))
    assert key.hex() == v["conversation_key"]
    payload = nip44.encrypt(v["plaintext"], key, _h(v["nonce"]))
    assert payload == v["payload"]
    other_side = nip44.get_conversation_key(sec2, public_key(sec1))
    assert other_side == key
    assert nip44.decrypt(payload, other_side) == v["plaintext"]


@pytest.mark.parametrize("v", VALID["encrypt_decrypt_long_msg"])
def test_encrypt_decrypt_long_msg(v: dict[str, Any]) -> None:
    plaintext = v["pattern"] * v["repeat"]
    assert hashlib.sha256(plaintext.encode()).hexdigest() == v["plaintext_sha256"]
    key = _h(v["conversation_key"])
    payload = nip44.encrypt(plaintext, key, _h(v["nonce"]))
    assert hashlib.sha256(payload.encode()).hexdigest() == v["payload_sha256"]
    assert nip44.decrypt(payload, key) == plaintext


@pytest.mark.parametrize("length", INVALID["encrypt_msg_lengths"])
def test_invalid_encrypt_msg_lengths(length: int) -> None:
    with pytest.raises(ValueError, match="plaintext length"):
        nip44.encrypt_bytes(b"a" * length, bytes(32), bytes(32))
    with pytest.raises(ValueError, match="plaintext length"):
        nip44.pad(b"a" * length)


@pytest.mark.parametrize("v", INVALID["get_conversation_key"], ids=lambda v: v["note"])
def test_invalid_get_conversation_key(v: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        nip44.get_conversation_key(_h(v["sec1"]), _h(v["pub2"]))


@pytest.mark.parametrize("v", INVALID["decrypt"], ids=lambda v: v["note"])
def test_invalid_decrypt(v: dict[str, str]) -> None:
    with pytest.raises(ValueError) as info:
        nip44.decrypt(v["payload"], _h(v["conversation_key"]))
    note = v["note"]
    # The reason given matches the vector's note in kind.
    expected = {"unknown encryption version": "version", "invalid base64": "base64",
                "invalid MAC": "MAC", "invalid padding": "padding"}
    for prefix, word in expected.items():
        if note.startswith(prefix):
            assert word in str(info.value)
    if note.startswith("invalid payload length"):
        assert "payload" in str(info.value)


def test_plaintext_bounds_round_trip() -> None:
    key = bytes(range(32))
    for n in (1, 32, 33, 65535):
        data = bytes([n % 251]) * n
        assert nip44.decrypt_bytes(nip44.encrypt_bytes(data, key), key) == data


def test_random_nonce_differs_each_time() -> None:
    key = bytes(range(32))
    assert nip44.encrypt("hi", key) != nip44.encrypt("hi", key)


def test_wrong_key_is_refused() -> None:
    payload = nip44.encrypt("hi", bytes(32))
    with pytest.raises(ValueError, match="MAC"):
        nip44.decrypt(payload, bytes(31) + b"\x01")


def test_message_key_lengths_checked() -> None:
    with pytest.raises(ValueError, match="conversation key"):
        nip44.get_message_keys(bytes(31), bytes(32))
    with pytest.raises(ValueError, match="nonce"):
        nip44.get_message_keys(bytes(32), bytes(31))


def test_invalid_utf8_plaintext_is_refused_by_decrypt() -> None:
    key = bytes(32)
    payload = nip44.encrypt_bytes(b"\xff\xfe", key)
    assert nip44.decrypt_bytes(payload, key) == b"\xff\xfe"
    with pytest.raises(ValueError, match="UTF-8"):
        nip44.decrypt(payload, key)


def test_unpad_checks() -> None:
    with pytest.raises(ValueError):
        nip44.unpad(b"\x00")
    with pytest.raises(ValueError):
        nip44.unpad(b"\x00\x00" + bytes(32))
    assert nip44.unpad(nip44.pad(b"abc")) == b"abc"
    with pytest.raises(ValueError):
        nip44.unpad(nip44.pad(b"abc") + b"\x00")
