"""NIP-49 (ncryptsec) against the NIP's own test data, and with nostr-sdk both ways."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nostr_sdk
import pytest
from bech32 import bech32_decode, bech32_encode, convertbits

from agentfs.nostr import nip49

VECTOR = json.loads((Path(__file__).parent / "vectors" / "nip49.json").read_text())
LOG_N = 4  # scrypt's cost does not change the format: keep the round trips quick


def _raw(ncryptsec: str) -> bytearray:
    _hrp, data = bech32_decode(ncryptsec)
    assert data is not None
    decoded = convertbits(data, 5, 8, pad=False)
    assert decoded is not None
    return bytearray(decoded)


def _encode(raw: bytes) -> str:
    data = convertbits(raw, 8, 5, pad=True)
    assert data is not None
    return bech32_encode("ncryptsec", data)


def test_the_published_ncryptsec_decrypts_to_its_key() -> None:
    private, security = nip49.decrypt(VECTOR["ncryptsec"], VECTOR["password"])
    assert private.hex() == VECTOR["private_key"]
    raw = _raw(VECTOR["ncryptsec"])
    assert (len(raw), raw[0], raw[1], security) == (91, 2, VECTOR["log_n"], raw[42])


def test_encrypt_then_decrypt_gives_the_key_back_and_a_fresh_nonce_each_time() -> None:
    key = os.urandom(32)
    one = nip49.encrypt(key, "pass phrase", log_n=LOG_N)
    two = nip49.encrypt(key, "pass phrase", log_n=LOG_N)
    assert one.startswith("ncryptsec1") and one != two
    assert nip49.decrypt(one, "pass phrase") == (key, nip49.KEY_UNTRACKED)
    assert _raw(one)[1] == LOG_N


def test_passphrases_are_nfkc_normalised() -> None:
    key = os.urandom(32)
    # U+212B ANGSTROM SIGN and U+00C5 are one letter once normalised (NFKC).
    sealed = nip49.encrypt(key, "\u212bngstr\u00f6m", log_n=LOG_N)
    assert nip49.decrypt(sealed, "\u00c5ngstro\u0308m")[0] == key


def test_nostr_sdk_reads_ours_and_we_read_nostr_sdk_s() -> None:
    key = os.urandom(32)
    ours = nip49.encrypt(key, "correct horse", log_n=LOG_N, key_security=nip49.KEY_SECURE)
    theirs = nostr_sdk.EncryptedSecretKey.from_bech32(ours)
    assert theirs.decrypt("correct horse").to_hex() == key.hex()
    assert theirs.key_security() == nostr_sdk.KeySecurity.MEDIUM
    made = nostr_sdk.EncryptedSecretKey(nostr_sdk.SecretKey.from_bytes(key), "battery",
                                        LOG_N, nostr_sdk.KeySecurity.WEAK)
    assert nip49.decrypt(made.to_bech32(), "battery") == (key, nip49.KEY_INSECURE)


def test_a_wrong_passphrase_is_refused() -> None:
    with pytest.raises(ValueError, match="wrong passphrase"):
        nip49.decrypt(VECTOR["ncryptsec"], "nostr ")


@pytest.mark.parametrize("flaw", ["version", "security byte", "ciphertext", "length",
                                  "log_n", "hrp", "checksum"])
def test_a_damaged_ncryptsec_is_refused(flaw: str) -> None:
    raw = _raw(nip49.encrypt(os.urandom(32), "pw", log_n=LOG_N))
    text = None
    if flaw == "version":
        raw[0] = 1
    elif flaw == "security byte":
        raw[42] = 3
    elif flaw == "ciphertext":
        raw[50] ^= 1
    elif flaw == "length":
        raw = raw[:-1]
    elif flaw == "log_n":
        raw[1] = nip49.MAX_LOG_N + 1
    elif flaw == "hrp":
        data = convertbits(raw, 8, 5, pad=True)
        assert data is not None
        text = bech32_encode("nsec", data)
    if text is None:
        text = _encode(bytes(raw))
    if flaw == "checksum":
        text = text[:-1] + ("q" if text[-1] != "q" else "p")
    with pytest.raises(ValueError, match="ncryptsec"):
        nip49.decrypt(text, "pw")


def test_no_empty_passphrase_and_no_invalid_key() -> None:
    with pytest.raises(ValueError, match="empty"):
        nip49.encrypt(os.urandom(32), "")
    with pytest.raises(ValueError):
        nip49.encrypt(b"\0" * 32, "pw")
