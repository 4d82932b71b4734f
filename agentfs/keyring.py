"""Agents' private keys: derived from the store's mnemonic, or imported and kept sealed.

An agent made in a store has the NIP-06 key of its index under the store's mnemonic, and
nothing about it is stored.  An agent imported from a store of another mnemonic (an archive
made with `agentfs export --with-key`) keeps its own key, which no mnemonic here derives:
the `keys` database holds it sealed as the store seals secrets (factotum.py), with
ChaCha20-Poly1305 under a key derived by HKDF-SHA256 from the store's BIP-39 seed, a random
nonce, and the agent's index and public key as associated data, so a sealed key cannot be
moved to another agent.  The mnemonic is in the same store: sealing keeps the key out of the
file's plain bytes, not from someone who holds the whole store; the archive it came in (an
NIP-49 `ncryptsec`) is its only other copy, and its backup.
"""

from __future__ import annotations

import functools
import json
import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .identity import agent_private_key, bip39_seed, public_key
from .store import AgentStore, Txn, agent_key

INFO = b"agentfs keys v1"


@functools.lru_cache(maxsize=8)
def _cipher(mnemonic: str) -> ChaCha20Poly1305:
    # PBKDF2 of the mnemonic, then HKDF: once per store a process opens, not once per key.
    return ChaCha20Poly1305(HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                                 info=INFO).derive(bip39_seed(mnemonic)))


def _associated_data(index: int, pubkey: bytes) -> bytes:
    return b"agentfs key\0" + agent_key(index) + pubkey


def is_imported(store: AgentStore, txn: Txn, index: int) -> bool:
    return txn.get(agent_key(index), db=store.db["keys"]) is not None


def agent_secret(store: AgentStore, txn: Txn, index: int) -> bytes:
    """Agent `index`'s private key: its imported one, or the one its index derives."""
    mnemonic = store.mnemonic(txn)
    raw = txn.get(agent_key(index), db=store.db["keys"])
    if raw is None:
        return agent_private_key(mnemonic, index)
    fields = json.loads(bytes(raw))
    pubkey = bytes.fromhex(fields["pubkey"])
    return _cipher(mnemonic).decrypt(bytes.fromhex(fields["nonce"]),
                                     bytes.fromhex(fields["sealed"]),
                                     _associated_data(index, pubkey))


def derives(store: AgentStore, txn: Txn, index: int, pubkey: bytes) -> bool:
    """Whether this store's mnemonic gives `pubkey` at `index`: the agent needs no key."""
    return public_key(agent_private_key(store.mnemonic(txn), index)) == pubkey


def put_imported(store: AgentStore, txn: Txn, index: int, private: bytes) -> None:
    """Keep an imported agent's key, sealed; the caller has checked it is the agent's."""
    pubkey = public_key(private)
    nonce = os.urandom(12)
    sealed = _cipher(store.mnemonic(txn)).encrypt(nonce, private,
                                                  _associated_data(index, pubkey))
    txn.put(agent_key(index), json.dumps(
        {"pubkey": pubkey.hex(), "nonce": nonce.hex(), "sealed": sealed.hex()},
        separators=(",", ":")).encode(), db=store.db["keys"], overwrite=False)
