"""Nostr keys as the command line gives them (hex or NIP-19 bech32), and raw ECDH.

The npub/nsec codecs are agentfs.identity's; this adds `note` and the hex forms.
"""

from __future__ import annotations

import re

from bech32 import bech32_decode, bech32_encode, convertbits
from coincurve import PrivateKey, PublicKey, PublicKeyXOnly

from agentfs.identity import npub_decode, npub_encode, nsec_decode, nsec_encode, public_key

__all__ = [
    "BECH32_TYPES",
    "decode_bech32",
    "encode_bech32",
    "parse_public",
    "parse_secret",
    "public_key",
    "shared_x",
]

_KEY_LEN = 32
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
BECH32_TYPES = ("npub", "nsec", "note")


def _check_secret(secret: bytes) -> bytes:
    if len(secret) != _KEY_LEN:
        raise ValueError(f"secret key must be {_KEY_LEN} bytes, got {len(secret)}")
    try:
        PrivateKey(secret)
    except ValueError as exc:
        # Not echoed: it is a secret.
        raise ValueError("secret key is not in [1, n-1] (invalid secp256k1 scalar)") from exc
    return secret


def _check_public(public: bytes) -> bytes:
    if len(public) != _KEY_LEN:
        raise ValueError(f"public key must be {_KEY_LEN} bytes, got {len(public)}")
    try:
        PublicKeyXOnly(public)
    except ValueError as exc:
        raise ValueError(f"public key {public.hex()} is not on secp256k1") from exc
    return public


def parse_secret(text: str) -> bytes:
    """Return the 32-byte secret key in `text`: 64 hex digits or an nsec."""
    text = text.strip()
    if text.lower().startswith("nsec1"):
        return nsec_decode(text)
    if _HEX64.fullmatch(text):
        return _check_secret(bytes.fromhex(text))
    raise ValueError("secret key must be 64 hex digits or an nsec1… string")


def parse_public(text: str) -> bytes:
    """Return the 32-byte x-only public key in `text`: 64 hex digits or an npub."""
    text = text.strip()
    if text.lower().startswith("npub1"):
        return npub_decode(text)
    if _HEX64.fullmatch(text):
        return _check_public(bytes.fromhex(text))
    raise ValueError(f"public key must be 64 hex digits or an npub1… string, got {text!r}")


def encode_bech32(kind: str, data: bytes) -> str:
    """Return the NIP-19 form (`npub`, `nsec` or `note`) of 32 bytes."""
    if kind == "npub":
        return npub_encode(_check_public(data))
    if kind == "nsec":
        return nsec_encode(_check_secret(data))
    if kind == "note":
        if len(data) != _KEY_LEN:
            raise ValueError(f"note payload must be {_KEY_LEN} bytes, got {len(data)}")
        words = convertbits(data, 8, 5, pad=True)
        assert words is not None  # only fails on out-of-range input values, impossible for bytes
        return bech32_encode("note", words)
    raise ValueError(f"unsupported NIP-19 type {kind!r} (supported: {', '.join(BECH32_TYPES)})")


def decode_bech32(text: str) -> tuple[str, bytes]:
    """Return (type, 32 bytes) for an npub, nsec or note; ValueError for anything else."""
    text = text.strip()
    hrp, words = bech32_decode(text)
    if hrp is None or words is None:
        raise ValueError("not a valid bech32 string: bad checksum or characters")
    if hrp == "npub":
        return hrp, npub_decode(text)
    if hrp == "nsec":
        return hrp, nsec_decode(text)
    if hrp == "note":
        data = convertbits(words, 5, 8, pad=False)
        if data is None or len(data) != _KEY_LEN:
            raise ValueError(f"note does not encode {_KEY_LEN} bytes")
        return hrp, bytes(data)
    raise ValueError(f"unsupported NIP-19 type {hrp!r} (supported: {', '.join(BECH32_TYPES)})")


def shared_x(secret: bytes, public: bytes) -> bytes:
    """Return the raw x coordinate of secret·P, P the even-y point of x-only `public`.

    Unhashed, as both NIP-04 and NIP-44 require (coincurve's `ecdh` would sha256 it).
    """
    _check_secret(secret)
    _check_public(public)
    point = PublicKey(b"\x02" + public).multiply(secret)
    shared: bytes = point.format(compressed=True)[1:]
    return shared
