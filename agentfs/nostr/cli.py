"""`agentfs nostr`: Nostr by hand, like the `nak` tool: keys, events, NIP-44/04/17.

Keys come from the command line (hex or bech32); nothing here reads or writes a store.
Runnable alone as `python -m agentfs.nostr.cli ARGS`.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from typing import Any

from . import nip04, nip17, nip44
from .event import check, from_dict, from_json, sign, to_json, unsigned
from .keys import (
    BECH32_TYPES,
    decode_bech32,
    encode_bech32,
    parse_public,
    parse_secret,
    public_key,
)

__all__ = ["add_parser", "main"]

PROG = "agentfs nostr"
Command = Callable[[argparse.Namespace], int]


def _reports_errors(command: Command) -> Command:
    """Turn a ValueError (bad key, JSON, payload, signature...) into one line and status 1."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except ValueError as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 1

    return run


def _stdin_bytes() -> bytes:
    return sys.stdin.buffer.read()


def _stdin_text() -> str:
    try:
        return _stdin_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError("standard input is not valid UTF-8") from e


def _stdin_object() -> dict[str, Any]:
    try:
        obj = json.loads(_stdin_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"standard input is not JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError("standard input must be one JSON object (an event)")
    return obj


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))


def _write_raw(text: str) -> None:
    sys.stdout.buffer.write(text.encode("utf-8"))
    sys.stdout.buffer.flush()


def _hex32(text: str) -> bytes:
    try:
        data = bytes.fromhex(text.strip())
    except ValueError as e:
        raise ValueError("expected 64 hex digits") from e
    if len(data) != 32:
        raise ValueError(f"expected 64 hex digits (32 bytes), got {len(data)} bytes")
    return data


@_reports_errors
def cmd_encode(args: argparse.Namespace) -> int:
    print(encode_bech32(args.type, _hex32(args.hex)))
    return 0


@_reports_errors
def cmd_decode(args: argparse.Namespace) -> int:
    kind, data = decode_bech32(args.bech32)
    _print_json({"type": kind, "hex": data.hex()})
    return 0


def _template(obj: dict[str, Any], *, need_pubkey: bool) -> tuple[str, int, int, Any, str]:
    """pubkey, created_at, kind, tags, content of a partial event; shape-checked by Event."""
    required = ["kind", "content"] + (["pubkey", "created_at"] if need_pubkey else [])
    missing = [k for k in required if k not in obj]
    if missing:
        raise ValueError(f"event lacks {', '.join(missing)}")
    return (obj.get("pubkey", ""), obj.get("created_at", 0), obj["kind"], obj.get("tags", []),
            obj["content"])


@_reports_errors
def cmd_event_id(args: argparse.Namespace) -> int:
    pubkey, created_at, kind, tags, content = _template(_stdin_object(), need_pubkey=True)
    # `unsigned` checks every field's shape first, so a malformed template is refused.
    event_id = unsigned(pubkey, kind, content, tags, created_at).id
    print(event_id)
    return 0


@_reports_errors
def cmd_event_sign(args: argparse.Namespace) -> int:
    obj = _stdin_object()
    _, _, kind, tags, content = _template(obj, need_pubkey=False)
    secret = parse_secret(args.sec)
    if "pubkey" in obj and obj["pubkey"] != public_key(secret).hex():
        raise ValueError("the event's pubkey is not the --sec key's")
    event = sign(secret, kind, content, tags, obj.get("created_at"))
    print(to_json(event))
    return 0


@_reports_errors
def cmd_event_verify(args: argparse.Namespace) -> int:
    event = from_dict(_stdin_object())
    check(event)
    _print_json({"id": event.id, "pubkey": event.pubkey, "valid": True})
    return 0


@_reports_errors
def cmd_nip44_encrypt(args: argparse.Namespace) -> int:
    key = nip44.get_conversation_key(parse_secret(args.sec), parse_public(args.pub))
    print(nip44.encrypt_bytes(_stdin_bytes(), key))
    return 0


@_reports_errors
def cmd_nip44_decrypt(args: argparse.Namespace) -> int:
    key = nip44.get_conversation_key(parse_secret(args.sec), parse_public(args.pub))
    sys.stdout.buffer.write(nip44.decrypt_bytes(_stdin_text().strip(), key))
    sys.stdout.buffer.flush()
    return 0


@_reports_errors
def cmd_nip04_encrypt(args: argparse.Namespace) -> int:
    print(nip04.encrypt(_stdin_text(), parse_secret(args.sec), parse_public(args.pub)))
    return 0


@_reports_errors
def cmd_nip04_decrypt(args: argparse.Namespace) -> int:
    _write_raw(nip04.decrypt(_stdin_text(), parse_secret(args.sec), parse_public(args.pub)))
    return 0


@_reports_errors
def cmd_nip17_wrap(args: argparse.Namespace) -> int:
    tags = [["p", parse_public(p).hex()] for p in args.p]
    wrapped = nip17.wrap(parse_secret(args.sec), parse_public(args.pub), _stdin_text(), tags)
    print(to_json(wrapped))
    return 0


@_reports_errors
def cmd_nip17_unwrap(args: argparse.Namespace) -> int:
    rumor, sender = nip17.unwrap(parse_secret(args.sec), from_json(_stdin_text()))
    _print_json({"sender": sender.hex(), "sender_npub": encode_bech32("npub", sender),
                 "rumor": rumor.to_dict()})
    return 0


def _keys(p: argparse.ArgumentParser, *, pub: bool = True) -> None:
    p.add_argument("--sec", required=True, metavar="KEY", help="our secret key: hex or nsec1…")
    if pub:
        p.add_argument("--pub", required=True, metavar="KEY",
                       help="the peer's public key: hex or npub1…")


def _pair(sub: Any, name: str, what: str, enc: Command, dec: Command, stdin_note: str) -> None:
    p = sub.add_parser(name, help=f"{what} encrypt/decrypt",
                       description=f"{what} between --sec (ours) and --pub (theirs). {stdin_note}")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    e = actions.add_parser("encrypt", help="plaintext on stdin, payload line out")
    _keys(e)
    e.set_defaults(run=enc)
    d = actions.add_parser("decrypt", help="payload on stdin, raw plaintext out")
    _keys(d)
    d.set_defaults(run=dec)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `nostr` and its subcommands; each leaf sets `run` (args -> exit status)."""
    nostr = subparsers.add_parser(
        "nostr", help="Nostr by hand: keys, events, NIP-44/04/17 (never touches a store)",
        description="Nostr tools like nak's. Keys are given as hex or bech32 (npub/nsec); "
                    "input comes on stdin, byte-exact; anything invalid exits non-zero with "
                    "one `agentfs nostr: …` line on stderr.")
    sub = nostr.add_subparsers(dest="nostr_command", required=True, metavar="COMMAND")

    enc = sub.add_parser("encode", help="hex to NIP-19 bech32")
    enc.add_argument("type", choices=BECH32_TYPES)
    enc.add_argument("hex", metavar="HEX", help="32 bytes as 64 hex digits")
    enc.set_defaults(run=cmd_encode)

    dec = sub.add_parser("decode", help='NIP-19 bech32 to JSON {"type": …, "hex": …}')
    dec.add_argument("bech32", metavar="BECH32")
    dec.set_defaults(run=cmd_decode)

    ev = sub.add_parser("event", help="NIP-01 event id, sign, verify (event JSON on stdin)")
    evsub = ev.add_subparsers(dest="event_command", required=True, metavar="ACTION")
    ev_id = evsub.add_parser("id", help="print the id of an event (pubkey, created_at, kind, "
                                        "tags, content)")
    ev_id.set_defaults(run=cmd_event_id)
    ev_sign = evsub.add_parser("sign", help="sign a partial event {kind, content, tags?, "
                                            "created_at?}; print the event JSON")
    _keys(ev_sign, pub=False)
    ev_sign.set_defaults(run=cmd_event_sign)
    ev_verify = evsub.add_parser("verify", help="check an event's id and signature")
    ev_verify.set_defaults(run=cmd_event_verify)

    _pair(sub, "nip44", "NIP-44 v2", cmd_nip44_encrypt, cmd_nip44_decrypt,
          "Plaintexts of 1 to 65535 bytes.")
    _pair(sub, "nip04", "NIP-04 (legacy)", cmd_nip04_encrypt, cmd_nip04_decrypt,
          "Plaintext must be UTF-8.")

    n17 = sub.add_parser("nip17", help="NIP-17 private DM: gift wrap and unwrap")
    n17sub = n17.add_subparsers(dest="nip17_command", required=True, metavar="ACTION")
    wrap = n17sub.add_parser("wrap", help="message on stdin; print the kind 1059 gift wrap")
    _keys(wrap)
    wrap.add_argument("-p", action="append", default=[], metavar="KEY",
                      help="a receiver for the rumor's p tags (default: --pub); repeatable")
    wrap.set_defaults(run=cmd_nip17_wrap)
    unwrap = n17sub.add_parser("unwrap", help="gift wrap JSON on stdin; print the rumor and "
                                              "its verified sender")
    _keys(unwrap, pub=False)
    unwrap.set_defaults(run=cmd_nip17_unwrap)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="agentfs")
    add_parser(top.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return top


def main(argv: list[str] | None = None) -> int:
    """Run `agentfs nostr ARGV` (argv excludes the word `nostr`)."""
    args = parser().parse_args(["nostr", *(sys.argv[1:] if argv is None else argv)])
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
