"""Nostr identities: BIP-39 mnemonics, NIP-06 key derivation, NIP-19 npub/nsec encoding.

User key: m/44'/1237'/0'/0/0; agent n: m/44'/1237'/(n+1)'/0/0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from bech32 import bech32_decode, bech32_encode, convertbits
from bip32 import BIP32
from coincurve import PrivateKey, PublicKeyXOnly
from mnemonic import Mnemonic

__all__ = [
    "Identity",
    "agent_private_key",
    "bip39_seed",
    "derive_private_key",
    "generate_mnemonic",
    "normalize_mnemonic",
    "npub_decode",
    "npub_encode",
    "nsec_decode",
    "nsec_encode",
    "public_key",
    "user_private_key",
]

_HARDENED = 0x8000_0000
# m/44'/1237' (BIP-44 purpose, SLIP-44 coin type for Nostr) is shared by every account.
_COIN_TYPE_PATH = "m/44'/1237'"
_WORD_COUNTS = (12, 15, 18, 21, 24)
_KEY_LEN = 32


@functools.cache
def _english() -> Mnemonic:
    # Loading the word list reads a file; do it once, and only when first needed.
    return Mnemonic("english")


@functools.cache
def _english_words() -> frozenset[str]:
    # Mnemonic's own lookups are list.index (linear); a set makes the unknown-word check cheap.
    return frozenset(_english().wordlist)


def generate_mnemonic() -> str:
    """Return a new 24-word English BIP-39 mnemonic (256 bits of entropy from `secrets`)."""
    return _english().generate(strength=256)


def normalize_mnemonic(text: str) -> str:
    """Return `text` as a canonical mnemonic: single spaces, lower case.

    Raises ValueError on a wrong word count, an unknown word (named, with its position),
    or a bad BIP-39 checksum.
    """
    words = text.lower().split()
    if len(words) not in _WORD_COUNTS:
        raise ValueError(f"mnemonic has {len(words)} words; expected 12, 15, 18, 21 or 24")
    known = _english_words()
    for position, word in enumerate(words, start=1):
        if word not in known:
            raise ValueError(
                f"mnemonic word {position} {word!r} is not in the BIP-39 English word list"
            )
    phrase = " ".join(words)
    if not _english().check(phrase):
        raise ValueError("mnemonic checksum is invalid (words mistyped or out of order?)")
    return phrase


@functools.lru_cache(maxsize=8)
def _coin_type_node(mnemonic: str) -> Any:
    """BIP-32 node at m/44'/1237' for `mnemonic`, a bip32.BIP32.

    Cached so that per-agent work is only the last three levels: the BIP-39 seed (PBKDF2,
    2048 rounds, ~1.5 ms), validation (~0.3 ms) and each bip32 level (~0.14 ms, coincurve
    computes public keys eagerly) would otherwise be repeated for every agent. Keyed on the
    text as given, so repeated calls skip validation too. The cache keeps key material in
    memory for the life of the process; callers already hold the mnemonic, so this adds no
    new exposure.
    """
    phrase = normalize_mnemonic(mnemonic)
    # Empty passphrase, as NIP-06 specifies.
    master = BIP32.from_seed(Mnemonic.to_seed(phrase, passphrase=""))
    # Round-trip through the xpriv so the node keeps correct depth/fingerprint metadata.
    return BIP32.from_xpriv(master.get_xpriv_from_path(_COIN_TYPE_PATH))


def bip39_seed(mnemonic: str) -> bytes:
    """The 64-byte BIP-39 seed of `mnemonic` (empty passphrase): every key of a store
    derives from it."""
    return Mnemonic.to_seed(normalize_mnemonic(mnemonic), passphrase="")


def derive_private_key(mnemonic: str, account: int) -> bytes:
    """Return the 32-byte secp256k1 private key at NIP-06 path m/44'/1237'/{account}'/0/0."""
    if isinstance(account, bool) or not 0 <= account < _HARDENED:
        raise ValueError(f"account must be an integer in [0, 2**31), got {account!r}")
    node = _coin_type_node(mnemonic)
    key: bytes = node.get_privkey_from_path([account | _HARDENED, 0, 0])
    return key


def user_private_key(mnemonic: str) -> bytes:
    """Return the user's private key (NIP-06 account 0)."""
    return derive_private_key(mnemonic, 0)


def agent_private_key(mnemonic: str, n: int) -> bytes:
    """Return agent `n`'s private key (NIP-06 account n+1, so that account 0 stays the user's)."""
    if isinstance(n, bool) or not 0 <= n < _HARDENED - 1:
        raise ValueError(f"agent number must be an integer in [0, 2**31 - 1), got {n!r}")
    return derive_private_key(mnemonic, n + 1)


def public_key(private: bytes) -> bytes:
    """Return the 32-byte x-only (BIP-340) public key for a 32-byte private key."""
    # coincurve zero-pads short secrets, so the length must be checked here.
    if len(private) != _KEY_LEN:
        raise ValueError(f"private key must be {_KEY_LEN} bytes, got {len(private)}")
    # from_secret is unannotated in coincurve, hence the explicit type.
    pub: bytes = PublicKeyXOnly.from_secret(private).format()
    return pub


def _encode(hrp: str, payload: bytes) -> str:
    if len(payload) != _KEY_LEN:
        raise ValueError(f"{hrp} payload must be {_KEY_LEN} bytes, got {len(payload)}")
    data = convertbits(payload, 8, 5, pad=True)
    assert data is not None  # only fails on out-of-range input values, impossible for bytes
    return bech32_encode(hrp, data)


def _decode(hrp: str, text: str) -> bytes:
    got_hrp, data = bech32_decode(text.strip())
    if got_hrp is None or data is None:
        # The input is not echoed: it may be an nsec.
        raise ValueError(f"not a valid {hrp}: bad bech32 checksum or characters")
    if got_hrp != hrp:
        raise ValueError(f"expected an {hrp}1… string, got {got_hrp}1…")
    decoded = convertbits(data, 5, 8, pad=False)
    if decoded is None or len(decoded) != _KEY_LEN:
        raise ValueError(f"{hrp} does not encode {_KEY_LEN} bytes")
    return bytes(decoded)


def npub_encode(pub: bytes) -> str:
    """Return the NIP-19 npub for a 32-byte x-only public key."""
    return _encode("npub", pub)


def npub_decode(s: str) -> bytes:
    """Return the 32-byte public key in an npub; ValueError if malformed or not on the curve."""
    pub = _decode("npub", s)
    try:
        PublicKeyXOnly(pub)
    except ValueError as exc:
        raise ValueError("npub does not encode a valid secp256k1 x-only public key") from exc
    return pub


def nsec_encode(priv: bytes) -> str:
    """Return the NIP-19 nsec for a 32-byte private key."""
    return _encode("nsec", priv)


def nsec_decode(s: str) -> bytes:
    """Return the 32-byte private key in an nsec; ValueError if malformed or out of range."""
    priv = _decode("nsec", s)
    try:
        PrivateKey(priv)
    except ValueError as exc:
        # Do not echo the value: it is a secret.
        raise ValueError("nsec does not encode a valid secp256k1 private key") from exc
    return priv


@dataclass(frozen=True)
class Identity:
    """An agent's public identity: agent number `index` (NIP-06 account index+1) and its key."""

    index: int
    public: bytes

    def __post_init__(self) -> None:
        if len(self.public) != _KEY_LEN:
            raise ValueError(f"public key must be {_KEY_LEN} bytes, got {len(self.public)}")

    @classmethod
    def of_agent(cls, mnemonic: str, n: int) -> Identity:
        """Derive agent `n`'s identity from `mnemonic`."""
        return cls(n, public_key(agent_private_key(mnemonic, n)))

    @property
    def npub(self) -> str:
        return npub_encode(self.public)

    @property
    def hex(self) -> str:
        return self.public.hex()
