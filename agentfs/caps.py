"""Capabilities: what an agent's owner lets it reach beyond its own files.

Four kinds, one table: `net` (hosts the egress proxy lets it reach), `secret` (the secrets
the proxy may add to its requests), `tool` (programs or directories the sandbox shows it,
read-only) and `spend` (whether its ticks may declare `spend`).  The owner writes
`grant KIND VALUE...` and `revoke KIND VALUE...` to the agent's ctl (or `grant` lines after
`new` in the root ctl); the record keeps, per kind, the sorted normalised values.  Nothing is
granted by default: an agent made before capabilities existed holds none, so it may not
spend and reaches no host until its owner says so.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import errors

if TYPE_CHECKING:  # ctl parses with this module: only the types go the other way
    from .ctl import Command
    from .store import AgentRecord

VERBS = ("grant", "revoke")
SECRET_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_PLAIN_RE = re.compile(r"[A-Za-z0-9_@%+=:,./\[\]-]+")
_LABEL_RE = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
MAX_PATH = 4096
MAX_VALUES = 64  # values of one kind an agent may hold: the record stays small
GRANTED = "granted"  # the one value of a kind that takes no argument (`spend`)
# The ports a grant of a bare HOST opens: TLS (CONNECT, or a request the proxy upgrades)
# and plain http.
DEFAULT_PORTS = (443, 80)


@dataclass(frozen=True)
class Endpoint:
    """A granted host, with the one port granted or None for the default ports."""

    host: str
    port: int | None

    def __str__(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return shown if self.port is None else f"{shown}:{self.port}"

    def allows(self, host: str, port: int) -> bool:
        return self.host == host and (port == self.port if self.port is not None
                                      else port in DEFAULT_PORTS)


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def normal_host(text: str) -> str:
    """A host name (ASCII, lower case, no trailing dot) or an IP address, as compared."""
    host = text.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise errors.invalid(f"host {text[:80]!r}: not an IPv6 address") from None
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    host = host.removesuffix(".")
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels) \
            or labels[-1].isdigit():
        raise errors.invalid(
            f"host {text[:80]!r}: not a host name (ASCII letters, digits, '-' and '.'; "
            "punycode for others), an IPv4 address or a bracketed IPv6 address")
    return host


def parse_port(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text, re.ASCII) or not 1 <= int(text) <= 65535:
        raise errors.invalid(f"port {text[:20]!r}: not a port number (1-65535)")
    return int(text)


def parse_endpoint(text: str) -> Endpoint:
    """`HOST`, `HOST:PORT`, `[V6]` or `[V6]:PORT`."""
    if text.startswith("["):
        close = text.find("]")
        host, rest = text[:close + 1], text[close + 1:]
        if close < 0 or (rest and not rest.startswith(":")):
            raise errors.invalid(f"{text[:80]!r}: use HOST, HOST:PORT or [IPV6]:PORT")
        port = parse_port(rest[1:]) if rest else None
        return Endpoint(normal_host(host), port)
    host, colon, port_text = text.partition(":")
    if ":" in port_text:
        raise errors.invalid(f"{text[:80]!r}: an IPv6 address goes in brackets, [::1]:443")
    return Endpoint(normal_host(host), parse_port(port_text) if colon else None)


def _net(values: list[str]) -> list[str]:
    return [str(parse_endpoint(value)) for value in values]


def _secret(values: list[str]) -> list[str]:
    for name in values:
        if not SECRET_NAME_RE.fullmatch(name):
            raise errors.invalid(f"{name[:80]!r}: a NAME is 1-64 of A-Z a-z 0-9 . _ -,"
                                 " not starting with '.' or '-'")
    return values


def _tool(values: list[str]) -> list[str]:
    paths = []
    for path in values:
        if not path.startswith("/") or len(path.encode()) > MAX_PATH or ".." in \
                path.split("/") or any(ord(c) < 0x20 or ord(c) == 0x7f for c in path):
            raise errors.invalid(f"{path[:80]!r}: an absolute path, without '..' or control "
                                 f"characters, of at most {MAX_PATH} bytes")
        # '//x' is '/x' too: POSIX leaves a leading '//' to the system, Linux ignores it.
        paths.append("/" + posixpath.normpath(path).lstrip("/"))
    return paths


def _flag(values: list[str]) -> list[str]:
    if values:
        raise errors.invalid("takes no value")
    return [GRANTED]


@dataclass(frozen=True)
class Kind:
    name: str
    usage: str
    parse: Callable[[list[str]], list[str]]  # the words after the kind -> normalised values


KINDS = {kind.name: kind for kind in (
    Kind("net", "net HOST[:PORT]...", _net),
    Kind("secret", "secret NAME...", _secret),
    Kind("tool", "tool PATH...", _tool),
    Kind("spend", "spend", _flag),
)}


def parse(verb: str, words: list[str]) -> tuple[str, ...]:
    """The words after `grant`/`revoke` as a command's arguments (kind, values...), or
    EINVAL."""
    kind = KINDS.get(words[0]) if words else None
    if kind is None:
        usage = " | ".join(k.usage for k in KINDS.values())
        raise errors.invalid(f"ctl: usage: {verb} {usage}")
    try:
        values = kind.parse(words[1:])
    except errors.FsError as e:
        raise errors.invalid(f"ctl: {verb} {kind.name}: {e.message}") from None
    if not values:
        raise errors.invalid(f"ctl: usage: {verb} {kind.usage}")
    return (kind.name, *dict.fromkeys(values))


def apply(record: AgentRecord, command: Command) -> None:
    """Grant or revoke; revoking what the agent does not hold is ENOENT (a typo, say)."""
    kind, *values = command.args
    held = set(record.caps.get(kind, []))
    if command.verb == "grant":
        held.update(values)
        if len(held) > MAX_VALUES:
            raise errors.invalid(f"ctl: an agent holds at most {MAX_VALUES} {kind} grants")
    else:
        missing = [v for v in values if v not in held]
        if missing:
            granted = " ".join(sorted(held)) or "none"
            raise errors.not_held(
                f"revoke {kind} {missing[0]}: not granted (granted: {granted})")
        held.difference_update(values)
    if held:
        record.caps[kind] = sorted(held)
    else:
        record.caps.pop(kind, None)


def _quoted(value: str) -> str:
    """A value as ctl would take it again: quoted only if the shell would need it
    (a path with a space, say); hosts and `[::1]` stay as they are."""
    return value if _PLAIN_RE.fullmatch(value) else shlex.quote(value)


def describe(command: Command) -> str:
    """The command as the log records it, and as it could be written again."""
    kind, *values = command.args
    if values == [GRANTED]:
        return f"{command.verb} {kind}"
    return " ".join((command.verb, kind, *map(_quoted, values)))


def shown(record: AgentRecord) -> list[tuple[str, str]]:
    """The ctl read-back lines: each kind and what it holds, or `-`."""
    return [(name, " ".join(map(_quoted, record.caps.get(name, []))) or "-") for name in KINDS]


def held(record: AgentRecord, kind: str) -> list[str]:
    return list(record.caps.get(kind, []))


def tools(record: AgentRecord) -> list[str]:
    """The absolute paths to show read-only in the agent's sandbox."""
    return held(record, "tool")


def secrets(record: AgentRecord) -> list[str]:
    return held(record, "secret")


def endpoints(record: AgentRecord) -> list[Endpoint]:
    return [parse_endpoint(value) for value in held(record, "net")]


def may_spend(record: AgentRecord) -> bool:
    return GRANTED in record.caps.get("spend", [])


def require_spend(record: AgentRecord) -> None:
    if not may_spend(record):
        raise errors.denied("spend: the agent does not hold `spend` (its owner writes "
                            "`grant spend` to its ctl)")


def refuse_in_tick(command: Command) -> None:
    """Capabilities are the owner's to give: a tick writing them is refused."""
    if command.verb in VERBS:
        raise errors.denied(f"ctl: {command.verb} is for the agent's owner, not its ticks")
