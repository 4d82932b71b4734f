"""NIP-04 (legacy) direct-message encryption: AES-256-CBC keyed by the raw ECDH x coordinate.

NIP-04 is kept for older clients; new messages go out as NIP-17. The key is the shared x
itself, unhashed: that is what NIP-04 specifies and what go-nostr and nostr-tools do.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .keys import shared_x

__all__ = ["decrypt", "encrypt"]

_SEPARATOR = "?iv="
_BLOCK = 16


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"NIP-04 {what} is not base64") from exc


def encrypt(plaintext: str, secret: bytes, public: bytes, iv: bytes | None = None) -> str:
    """Return `base64(ciphertext)?iv=base64(iv)`; `iv` (16 bytes) is random unless given."""
    if iv is None:
        iv = os.urandom(_BLOCK)
    if len(iv) != _BLOCK:
        raise ValueError("NIP-04 iv must be 16 bytes")
    try:
        data = plaintext.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("plaintext is not valid Unicode (lone surrogate)") from exc
    padder = padding.PKCS7(128).padder()
    padded = padder.update(data) + padder.finalize()
    encryptor = Cipher(algorithms.AES256(shared_x(secret, public)), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    return f"{base64.b64encode(ciphertext).decode()}{_SEPARATOR}{base64.b64encode(iv).decode()}"


def decrypt(content: str, secret: bytes, public: bytes) -> str:
    """Decrypt NIP-04 content with our secret and the peer's public key (either direction)."""
    parts = content.strip().split(_SEPARATOR)
    if len(parts) != 2:
        raise ValueError("NIP-04 content must be base64 ciphertext, '?iv=', base64 iv")
    ciphertext, iv = _b64(parts[0], "ciphertext"), _b64(parts[1], "iv")
    if len(iv) != _BLOCK:
        raise ValueError("NIP-04 iv must be 16 bytes")
    if not ciphertext or len(ciphertext) % _BLOCK:
        raise ValueError("NIP-04 ciphertext must be a non-empty multiple of 16 bytes")
    decryptor = Cipher(algorithms.AES256(shared_x(secret, public)), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        data = unpadder.update(padded) + unpadder.finalize()
    except ValueError as exc:
        raise ValueError("NIP-04 decryption failed: bad padding (wrong key?)") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("NIP-04 decryption failed: not UTF-8 (wrong key?)") from exc
