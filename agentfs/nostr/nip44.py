"""NIP-44 version 2 encrypted payloads: ECDH + HKDF, padding, ChaCha20, HMAC-SHA256, base64."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from typing import NamedTuple

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from .keys import shared_x

__all__ = [
    "MAX_PLAINTEXT",
    "MIN_PLAINTEXT",
    "MessageKeys",
    "calc_padded_len",
    "decrypt",
    "decrypt_bytes",
    "encrypt",
    "encrypt_bytes",
    "get_conversation_key",
    "get_message_keys",
    "pad",
    "unpad",
]

VERSION = 2
MIN_PLAINTEXT = 1
MAX_PLAINTEXT = 65535
_SALT = b"nip44-v2"
# Raw payload: version (1) + nonce (32) + ciphertext (2+32 .. 2+65536, less the spec's
# 65603 cap) + mac (32).
_MIN_RAW, _MAX_RAW = 99, 65603
# Their base64 lengths: the spec's bound, checked before decoding to spare the decoder.
_MIN_B64, _MAX_B64 = 132, 87472


class MessageKeys(NamedTuple):
    chacha_key: bytes
    chacha_nonce: bytes
    hmac_key: bytes


def get_conversation_key(secret: bytes, public: bytes) -> bytes:
    """HKDF-extract(salt='nip44-v2', IKM=raw ECDH x): the same for (a, B) and (b, A)."""
    return hmac.new(_SALT, shared_x(secret, public), hashlib.sha256).digest()


def get_message_keys(conversation_key: bytes, nonce: bytes) -> MessageKeys:
    """HKDF-expand(conversation_key, info=nonce, L=76), sliced 32/12/32."""
    if len(conversation_key) != 32:
        raise ValueError("invalid conversation key length: must be 32 bytes")
    if len(nonce) != 32:
        raise ValueError("invalid nonce length: must be 32 bytes")
    keys = HKDFExpand(hashes.SHA256(), 76, nonce).derive(conversation_key)
    return MessageKeys(keys[0:32], keys[32:44], keys[44:76])


def calc_padded_len(unpadded_len: int) -> int:
    """Length the plaintext is padded to (before the 2-byte length prefix)."""
    if unpadded_len < 1:
        raise ValueError("invalid plaintext length: must be at least 1")
    if unpadded_len <= 32:
        return 32
    next_power = 1 << (unpadded_len - 1).bit_length()
    chunk = 32 if next_power <= 256 else next_power // 8
    return chunk * ((unpadded_len - 1) // chunk + 1)


def pad(plaintext: bytes) -> bytes:
    """[u16 big-endian length][plaintext][zeros up to calc_padded_len]."""
    n = len(plaintext)
    if not MIN_PLAINTEXT <= n <= MAX_PLAINTEXT:
        raise ValueError(
            f"invalid plaintext length {n}: must be {MIN_PLAINTEXT} to {MAX_PLAINTEXT} bytes"
        )
    return n.to_bytes(2, "big") + plaintext + bytes(calc_padded_len(n) - n)


def unpad(padded: bytes) -> bytes:
    """Inverse of pad; ValueError unless the length prefix and the padding are exactly right."""
    if len(padded) < 2:
        raise ValueError("invalid padding: too short")
    n = int.from_bytes(padded[0:2], "big")
    if n == 0 or len(padded) != 2 + calc_padded_len(n):
        raise ValueError("invalid padding")
    # The pad bytes are covered by the MAC, so they need not be checked to be zero.
    return padded[2 : 2 + n]


def _chacha20(key: bytes, nonce: bytes, data: bytes) -> bytes:
    # cryptography takes a 16-byte nonce: a 4-byte little-endian counter (0) then RFC 8439's 12.
    cipher = Cipher(algorithms.ChaCha20(key, bytes(4) + nonce), mode=None)
    encryptor = cipher.encryptor()
    return encryptor.update(data) + encryptor.finalize()


def _mac(hmac_key: bytes, nonce: bytes, ciphertext: bytes) -> bytes:
    return hmac.new(hmac_key, nonce + ciphertext, hashlib.sha256).digest()


def encrypt_bytes(plaintext: bytes, conversation_key: bytes, nonce: bytes | None = None) -> str:
    """Encrypt raw bytes (1..65535); `nonce` (32 bytes) is random unless given, for tests."""
    if nonce is None:
        nonce = os.urandom(32)
    keys = get_message_keys(conversation_key, nonce)
    ciphertext = _chacha20(keys.chacha_key, keys.chacha_nonce, pad(plaintext))
    mac = _mac(keys.hmac_key, nonce, ciphertext)
    return base64.b64encode(bytes([VERSION]) + nonce + ciphertext + mac).decode("ascii")


def encrypt(plaintext: str, conversation_key: bytes, nonce: bytes | None = None) -> str:
    """Encrypt a string (its UTF-8 form must be 1..65535 bytes) to a base64 payload."""
    try:
        data = plaintext.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("plaintext is not valid Unicode (lone surrogate)") from exc
    return encrypt_bytes(data, conversation_key, nonce)


def _decode_payload(payload: str) -> tuple[bytes, bytes, bytes]:
    if not payload:
        raise ValueError("invalid payload: empty")
    if payload[0] == "#":
        raise ValueError("unknown encryption version (non-base64 encoding, '#')")
    if not _MIN_B64 <= len(payload) <= _MAX_B64:
        raise ValueError(
            f"invalid payload length {len(payload)}: must be {_MIN_B64} to {_MAX_B64} characters"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("invalid payload: not base64") from exc
    if not _MIN_RAW <= len(data) <= _MAX_RAW:
        raise ValueError(f"invalid payload: decoded length {len(data)} out of range")
    if data[0] != VERSION:
        raise ValueError(f"unknown encryption version {data[0]}")
    return data[1:33], data[33:-32], data[-32:]


def decrypt_bytes(payload: str, conversation_key: bytes) -> bytes:
    """Decrypt a payload to raw bytes, checking version, lengths, MAC, then padding."""
    nonce, ciphertext, mac = _decode_payload(payload)
    keys = get_message_keys(conversation_key, nonce)
    if not hmac.compare_digest(_mac(keys.hmac_key, nonce, ciphertext), mac):
        raise ValueError("invalid MAC")
    return unpad(_chacha20(keys.chacha_key, keys.chacha_nonce, ciphertext))


def decrypt(payload: str, conversation_key: bytes) -> str:
    """Decrypt a payload to a string; ValueError (with the reason) on anything invalid."""
    data = decrypt_bytes(payload, conversation_key)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("plaintext is not valid UTF-8") from exc
