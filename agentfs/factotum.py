"""Secrets, the factotum way: the owner hands them to the daemon, agents only get them used.

The root file `secrets` takes `NAME VALUE host=HOST [header=HEADER]` lines (a NAME written
again is rotated) and `delete NAME`; reading it lists `NAME host=HOST [header=HEADER]`,
never a value.  The egress proxy adds a secret to a request of an agent that holds it
(`grant secret NAME`) for its host; the value is in no file, log or environment.

At rest each value is sealed with ChaCha20-Poly1305 under a key derived (HKDF-SHA256) from
the store's BIP-39 seed, with a random nonce per value and the secret's name, host and
header as associated data, so a sealed value cannot be moved to another name or host.  The
mnemonic is in the same store: this keeps values out of the file's plain bytes (a grep, a
backup read by the wrong tool), not from someone who holds the whole store.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import errors
from .caps import SECRET_NAME_RE, normal_host
from .committer import CommitQueue
from .identity import bip39_seed
from .store import AgentStore, Txn, scan_prefix

INFO = b"agentfs secrets v1"
MAX_VALUE = 4096
MAX_SECRETS = 1024
VALUE_RE = re.compile(r"[\x21-\x7e]{1,4096}")  # 4096: MAX_VALUE
HEADER_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
# Headers that frame the request or talk to the proxy: a secret may not be one of them.
FRAMING_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive",
                   "proxy-authorization", "proxy-connection", "te", "trailer", "upgrade",
                   "expect"}
DEFAULT_HEADER = "Authorization"  # as `Authorization: Bearer VALUE`


@dataclass(frozen=True)
class Secret:
    """What may be said about a secret: everything but its value."""

    name: str
    host: str
    header: str | None = None  # None: `Authorization: Bearer VALUE`

    def line(self) -> str:
        return f"{self.name} host={self.host}" + (f" header={self.header}" if self.header
                                                  else "")

    def field(self, value: str) -> tuple[str, str]:
        """The request header that carries `value`."""
        if self.header is None:
            return DEFAULT_HEADER, f"Bearer {value}"
        return self.header, value

    @property
    def header_name(self) -> str:
        return self.header or DEFAULT_HEADER

    def associated_data(self) -> bytes:
        return b"\0".join((b"agentfs secret", self.name.encode(), self.host.encode(),
                           (self.header or "").encode()))


@dataclass(frozen=True)
class Change:
    """One line of a write: a secret set (with its value) or, with no value, deleted."""

    name: str
    secret: Secret | None
    value: str | None = None


def parse(data: bytes) -> list[Change]:
    """Every line of one write, or EINVAL naming the first bad line (never a value)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.invalid("secrets: not UTF-8 text") from None
    changes: list[Change] = []
    for number, line in enumerate(text.split("\n"), 1):
        words = line.split()
        if not words:
            continue
        changes.append(_line(number, words))
    if not changes:
        raise errors.invalid("secrets: nothing to do (write `NAME VALUE host=HOST "
                             "[header=HEADER]` or `delete NAME` lines)")
    names = [c.name for c in changes]
    if len(set(names)) != len(names):
        raise errors.invalid("secrets: the same NAME twice in one write")
    return changes


def _line(number: int, words: list[str]) -> Change:
    where = f"secrets line {number}"
    if words[0] == "delete" and len(words) == 2:
        if not SECRET_NAME_RE.fullmatch(words[1]):
            raise errors.invalid(f"{where}: delete NAME: not a secret name")
        return Change(words[1], None)
    name = words[0]
    if not SECRET_NAME_RE.fullmatch(name) or name == "delete":
        raise errors.invalid(f"{where}: a NAME is 1-64 of A-Z a-z 0-9 . _ -, not starting "
                             "with '.' or '-', and not 'delete'")
    if len(words) < 3:
        raise errors.invalid(f"{where}: usage: NAME VALUE host=HOST [header=HEADER]")
    if not VALUE_RE.fullmatch(words[1]):
        # The value is not echoed: it is a secret, even when it is malformed.
        raise errors.invalid(f"{where}: a VALUE is 1-{MAX_VALUE} printable ASCII "
                             "characters without spaces")
    fields: dict[str, str] = {}
    for word in words[2:]:
        key, eq, value = word.partition("=")
        if not eq or key not in ("host", "header") or key in fields:
            raise errors.invalid(f"{where}: after the VALUE come host=HOST and maybe "
                                 "header=HEADER, once each")
        fields[key] = value
    if "host" not in fields:
        raise errors.invalid(f"{where}: host=HOST is required")
    try:
        host = normal_host(fields["host"])
    except errors.FsError:
        raise errors.invalid(f"{where}: host=: not a host name or IP address") from None
    header = fields.get("header")
    if header is not None and (not HEADER_RE.fullmatch(header) or
                               header.lower() in FRAMING_HEADERS):
        raise errors.invalid(f"{where}: header=: not a header name, or one that frames the "
                             "request (Host, Content-Length, Connection...)")
    return Change(name, Secret(name, host, header), words[1])


class Factotum:
    """The sealed secrets of one store."""

    def __init__(self, store: AgentStore, committer: CommitQueue) -> None:
        self.store = store
        self.db = store.db["secrets"]
        self.committer = committer
        self._aead: ChaCha20Poly1305 | None = None

    def _cipher(self, txn: Txn) -> ChaCha20Poly1305:
        if self._aead is None:  # PBKDF2 of the mnemonic, then HKDF: once per daemon
            key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=INFO).derive(
                bip39_seed(self.store.mnemonic(txn)))
            self._aead = ChaCha20Poly1305(key)
        return self._aead

    async def write(self, data: bytes) -> None:
        """Apply one write of the `secrets` file: all its lines, or none."""
        changes = parse(data)

        def apply(txn: Txn) -> None:
            for change in changes:
                key = change.name.encode()
                if change.secret is None:
                    if not txn.delete(key, db=self.db):
                        raise errors.not_held(f"secrets: delete {change.name}: no such secret")
                    continue
                if txn.get(key, db=self.db) is None and self._count(txn) >= MAX_SECRETS:
                    raise errors.no_space(f"secrets: at most {MAX_SECRETS} secrets")
                assert change.value is not None
                txn.put(key, self._seal(txn, change.secret, change.value), db=self.db)

        await self.committer.commit(apply)

    def _count(self, txn: Txn) -> int:
        return int(txn.stat(self.db)["entries"])

    def _seal(self, txn: Txn, secret: Secret, value: str) -> bytes:
        nonce = os.urandom(12)
        sealed = self._cipher(txn).encrypt(nonce, value.encode(), secret.associated_data())
        return json.dumps({"host": secret.host, "header": secret.header,
                           "nonce": nonce.hex(), "sealed": sealed.hex()},
                          separators=(",", ":")).encode()

    def text(self) -> bytes:
        with self.store.read() as txn:
            return b"".join(_secret(bytes(k).decode(), raw)[0].line().encode() + b"\n"
                            for k, raw in scan_prefix(txn, self.db, b""))

    def secret(self, txn: Txn, name: str) -> Secret | None:
        raw = txn.get(name.encode(), db=self.db)
        return None if raw is None else _secret(name, bytes(raw))[0]

    def reveal(self, name: str) -> tuple[Secret, str] | None:
        """The secret and its value, for the egress proxy's request, or None if none."""
        with self.store.read() as txn:
            raw = txn.get(name.encode(), db=self.db)
            if raw is None:
                return None
            secret, fields = _secret(name, bytes(raw))
            value = self._cipher(txn).decrypt(bytes.fromhex(fields["nonce"]),
                                              bytes.fromhex(fields["sealed"]),
                                              secret.associated_data())
        return secret, value.decode()


def _secret(name: str, raw: bytes) -> tuple[Secret, dict[str, Any]]:
    fields: dict[str, Any] = json.loads(raw)
    return Secret(name, fields["host"], fields.get("header")), fields
