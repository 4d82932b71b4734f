"""NIP-49 private key encryption: scrypt of a passphrase, XChaCha20-Poly1305, bech32 `ncryptsec`.

The 91 bytes under the bech32 are version 0x02, log_n, a 16-byte salt, a 24-byte nonce, the
key security byte (also the associated data) and the 48-byte ciphertext of the 32-byte key.
hashlib's scrypt derives the key; libsodium (PyNaCl) does XChaCha20-Poly1305, which the
`cryptography` package lacks.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata

from bech32 import bech32_decode, bech32_encode, convertbits
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from .keys import parse_secret

__all__ = [
    "DEFAULT_LOG_N",
    "KEY_INSECURE",
    "KEY_SECURE",
    "KEY_UNTRACKED",
    "MAX_LOG_N",
    "decrypt",
    "encrypt",
]

HRP = "ncryptsec"
VERSION = 0x02
KEY_INSECURE, KEY_SECURE, KEY_UNTRACKED = 0x00, 0x01, 0x02
DEFAULT_LOG_N = 16  # 64 MiB and about 0.1-0.3 s: NIP-49's first row
# scrypt needs 128 * r * 2**log_n bytes: 22 is 4 GiB.  An archive asking more is refused
# rather than letting a stranger's file take the machine's memory.
MIN_LOG_N, MAX_LOG_N = 1, 22
_R, _P = 8, 1
_SALT, _NONCE, _KEY = 16, 24, 32
_RAW = 1 + 1 + _SALT + _NONCE + 1 + _KEY + 16  # 91


def _symmetric_key(passphrase: str, salt: bytes, log_n: int) -> bytes:
    if not MIN_LOG_N <= log_n <= MAX_LOG_N:
        raise ValueError(f"ncryptsec: log_n {log_n} is outside {MIN_LOG_N}-{MAX_LOG_N}")
    # NFKC, as NIP-49 asks, so the same passphrase typed elsewhere gives the same key.
    password = unicodedata.normalize("NFKC", passphrase).encode()
    n = 1 << log_n
    return hashlib.scrypt(password, salt=salt, n=n, r=_R, p=_P, dklen=32,
                          maxmem=129 * _R * n + (1 << 20))


def encrypt(private: bytes, passphrase: str, log_n: int = DEFAULT_LOG_N,
            key_security: int = KEY_UNTRACKED) -> str:
    """The `ncryptsec1...` form of a 32-byte private key under `passphrase`."""
    parse_secret(private.hex())  # a valid secp256k1 scalar, or ValueError
    if key_security not in (KEY_INSECURE, KEY_SECURE, KEY_UNTRACKED):
        raise ValueError(f"ncryptsec: key security byte {key_security} is not 0, 1 or 2")
    if not passphrase:
        raise ValueError("ncryptsec: the passphrase is empty")
    salt, nonce = os.urandom(_SALT), os.urandom(_NONCE)
    key = _symmetric_key(passphrase, salt, log_n)
    security = bytes([key_security])
    sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(private, security, nonce, key)
    raw = bytes([VERSION, log_n]) + salt + nonce + security + sealed
    data = convertbits(raw, 8, 5, pad=True)
    assert data is not None
    return bech32_encode(HRP, data)


def decrypt(ncryptsec: str, passphrase: str, max_log_n: int = MAX_LOG_N) -> tuple[bytes, int]:
    """(the private key, its key security byte); ValueError if malformed or the passphrase
    is wrong (the two look alike to Poly1305: it says only that the seal does not open)."""
    hrp, data = bech32_decode(ncryptsec.strip())
    if hrp is None or data is None:
        raise ValueError("ncryptsec: bad bech32 checksum or characters")
    if hrp != HRP:
        raise ValueError(f"expected an {HRP}1... string, got {hrp}1...")
    decoded = convertbits(data, 5, 8, pad=False)
    if decoded is None or len(decoded) != _RAW:
        raise ValueError(f"ncryptsec: not {_RAW} bytes")
    raw = bytes(decoded)
    if raw[0] != VERSION:
        raise ValueError(f"ncryptsec: version {raw[0]}, this reads {VERSION}")
    log_n = raw[1]
    if log_n > max_log_n:
        raise ValueError(f"ncryptsec: log_n {log_n} would need {128 * _R << log_n >> 20} MiB "
                         f"for scrypt; at most {max_log_n} is accepted")
    salt, nonce = raw[2:2 + _SALT], raw[2 + _SALT:2 + _SALT + _NONCE]
    security, sealed = raw[42:43], raw[43:]
    if security[0] not in (KEY_INSECURE, KEY_SECURE, KEY_UNTRACKED):
        raise ValueError(f"ncryptsec: key security byte {security[0]} is not 0, 1 or 2")
    key = _symmetric_key(passphrase, salt, log_n)
    try:
        private = crypto_aead_xchacha20poly1305_ietf_decrypt(sealed, security, nonce, key)
    except CryptoError:
        raise ValueError("ncryptsec: wrong passphrase (or a damaged key)") from None
    parse_secret(private.hex())
    return private, security[0]
