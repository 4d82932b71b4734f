"""`agentfs nostr …` run as `python -m agentfs.nostr.cli`: stdin byte-exact, JSON out, errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agentfs.nostr import nip04, nip44
from agentfs.nostr.cli import add_parser
from agentfs.nostr.event import from_json, verify
from agentfs.nostr.keys import encode_bech32, public_key

ROOT = Path(__file__).resolve().parent.parent
VECTORS = Path(__file__).parent / "vectors"
ALICE = "00" * 31 + "0a"
BOB = "00" * 31 + "0b"
ALICE_PUB = public_key(bytes.fromhex(ALICE)).hex()
BOB_PUB = public_key(bytes.fromhex(BOB)).hex()
BOB_NPUB = encode_bech32("npub", bytes.fromhex(BOB_PUB))
ALICE_NSEC = encode_bech32("nsec", bytes.fromhex(ALICE))


def nostr(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "agentfs.nostr.cli", *args], input=stdin,
                          capture_output=True, cwd=ROOT, timeout=60)


def ok(*args: str, stdin: bytes = b"") -> bytes:
    result = nostr(*args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    return result.stdout


def refused(*args: str, stdin: bytes = b"") -> str:
    result = nostr(*args, stdin=stdin)
    assert result.returncode != 0
    assert result.stdout == b""
    return result.stderr.decode()


def one_line_error(*args: str, stdin: bytes = b"") -> str:
    err = refused(*args, stdin=stdin)
    assert err.startswith("agentfs nostr: ") and err.count("\n") == 1, err
    return err


def test_encode_decode() -> None:
    assert ok("encode", "npub", BOB_PUB).decode().strip() == BOB_NPUB
    assert ok("encode", "nsec", ALICE).decode().strip() == ALICE_NSEC
    out = json.loads(ok("decode", BOB_NPUB))
    assert out == {"type": "npub", "hex": BOB_PUB}
    assert json.loads(ok("decode", ALICE_NSEC)) == {"type": "nsec", "hex": ALICE}
    note = ok("encode", "note", "ab" * 32).decode().strip()
    assert json.loads(ok("decode", note)) == {"type": "note", "hex": "ab" * 32}


def test_encode_decode_refusals() -> None:
    one_line_error("encode", "npub", "ff" * 32)
    one_line_error("encode", "npub", "abc")
    one_line_error("decode", BOB_NPUB[:-1] + "x")
    refused("encode", "nprofile", BOB_PUB)  # argparse: not a choice


def test_event_sign_verify_id() -> None:
    partial = {"kind": 1, "content": "hi\n\"there\" 日本", "tags": [["t", "x"]],
               "created_at": 1700000000}
    signed = ok("event", "sign", "--sec", ALICE_NSEC, stdin=json.dumps(partial).encode())
    event = from_json(signed)
    assert verify(event) and event.pubkey == ALICE_PUB and event.content == partial["content"]
    assert event.created_at == 1700000000
    out = json.loads(ok("event", "verify", stdin=signed))
    assert out == {"id": event.id, "pubkey": ALICE_PUB, "valid": True}
    assert ok("event", "id", stdin=signed).decode().strip() == event.id
    # id needs no id or sig field.
    bare = {k: v for k, v in json.loads(signed).items() if k not in ("id", "sig")}
    assert ok("event", "id", stdin=json.dumps(bare).encode()).decode().strip() == event.id


def test_event_sign_defaults() -> None:
    event = from_json(ok("event", "sign", "--sec", ALICE, stdin=b'{"kind":1,"content":""}'))
    assert verify(event) and event.tags == ()


def test_event_verify_refuses_tampering() -> None:
    signed = json.loads(ok("event", "sign", "--sec", ALICE, stdin=b'{"kind":1,"content":"a"}'))
    err = one_line_error("event", "verify", stdin=json.dumps(signed | {"content": "b"}).encode())
    assert "id" in err
    sig = signed["sig"]
    bad = signed | {"sig": sig[:-1] + ("0" if sig[-1] != "0" else "1")}
    assert "signature" in one_line_error("event", "verify", stdin=json.dumps(bad).encode())


@pytest.mark.parametrize(
    ("args", "stdin"),
    [
        (("event", "verify"), b"not json"),
        (("event", "verify"), b"[1]"),
        (("event", "id"), b'{"kind":1}'),
        (("event", "id"), b'{"kind":"1","content":"","pubkey":"' + b"ab" * 32
         + b'","created_at":1}'),
        (("event", "sign", "--sec", "00" * 32), b'{"kind":1,"content":""}'),
        (("event", "sign", "--sec", ALICE), b'{"kind":1,"content":"","pubkey":"'
         + BOB_PUB.encode() + b'"}'),
        (("event", "sign", "--sec", ALICE), b'{"kind":1,"content":"","tags":[[1]]}'),
        (("event", "sign", "--sec", ALICE), b"\xff"),
    ],
)
def test_event_refusals(args: tuple[str, ...], stdin: bytes) -> None:
    one_line_error(*args, stdin=stdin)


PLAINTEXTS = [b"a", "héllo\n日本 🎉\r\n".encode(), b"\n\n", b"x" * 65535]


@pytest.mark.parametrize("plaintext", PLAINTEXTS, ids=["1", "utf8", "newlines", "max"])
def test_nip44_byte_exact(plaintext: bytes) -> None:
    payload = ok("nip44", "encrypt", "--sec", ALICE, "--pub", BOB_NPUB, stdin=plaintext)
    assert payload.endswith(b"\n") and payload.count(b"\n") == 1
    key = nip44.get_conversation_key(bytes.fromhex(BOB), bytes.fromhex(ALICE_PUB))
    assert nip44.decrypt_bytes(payload.decode().strip(), key) == plaintext
    out = ok("nip44", "decrypt", "--sec", BOB, "--pub", ALICE_PUB, stdin=payload)
    assert out == plaintext


def test_nip44_vector_via_cli() -> None:
    valid = json.loads((VECTORS / "nip44.vectors.json").read_text())["v2"]["valid"]
    v = valid["encrypt_decrypt"][0]
    sec2_pub = public_key(bytes.fromhex(v["sec2"])).hex()
    out = ok("nip44", "decrypt", "--sec", v["sec1"], "--pub", sec2_pub,
             stdin=v["payload"].encode())
    assert out == v["plaintext"].encode()


def test_nip44_refusals() -> None:
    assert "plaintext length" in one_line_error("nip44", "encrypt", "--sec", ALICE, "--pub",
                                                BOB_PUB, stdin=b"")
    one_line_error("nip44", "encrypt", "--sec", ALICE, "--pub", BOB_PUB, stdin=b"x" * 65536)
    payload = ok("nip44", "encrypt", "--sec", ALICE, "--pub", BOB_PUB, stdin=b"hi")
    assert "MAC" in one_line_error("nip44", "decrypt", "--sec", ALICE, "--pub", ALICE_PUB,
                                   stdin=payload)
    one_line_error("nip44", "decrypt", "--sec", BOB, "--pub", ALICE_PUB, stdin=b"#abc")
    one_line_error("nip44", "encrypt", "--sec", "nope", "--pub", BOB_PUB, stdin=b"x")
    refused("nip44", "encrypt", "--pub", BOB_PUB, stdin=b"x")  # argparse: --sec required


def test_nip04_via_cli() -> None:
    v = json.loads((VECTORS / "nip04.json").read_text())["nostr_sdk_produced"][1]
    out = ok("nip04", "decrypt", "--sec", v["recipient_sec"], "--pub", v["sender_pub"],
             stdin=v["content"].encode() + b"\n")
    assert out == v["plaintext"].encode()
    text = "line\nnext 🎉".encode()
    content = ok("nip04", "encrypt", "--sec", ALICE, "--pub", BOB_PUB, stdin=text)
    assert nip04.decrypt(content.decode(), bytes.fromhex(BOB), bytes.fromhex(ALICE_PUB)) \
        == text.decode()
    assert ok("nip04", "decrypt", "--sec", BOB, "--pub", ALICE_PUB, stdin=content) == text


def test_nip04_non_conformant_refused_via_cli() -> None:
    v = json.loads((VECTORS / "nip04.json").read_text())["non_conformant"][0]
    one_line_error("nip04", "decrypt", "--sec", v["recipient_sec"], "--pub", v["sender_pub"],
                   stdin=v["content"].encode())


def test_nip17_wrap_unwrap() -> None:
    wrapped = ok("nip17", "wrap", "--sec", ALICE_NSEC, "--pub", BOB_NPUB, stdin=b"hi bob\n")
    event = from_json(wrapped)
    assert event.kind == 1059 and verify(event)
    out: dict[str, Any] = json.loads(ok("nip17", "unwrap", "--sec", BOB, stdin=wrapped))
    assert out["sender"] == ALICE_PUB
    assert out["sender_npub"] == encode_bech32("npub", bytes.fromhex(ALICE_PUB))
    assert out["rumor"]["content"] == "hi bob\n" and out["rumor"]["kind"] == 14
    assert out["rumor"]["tags"] == [["p", BOB_PUB]]
    assert "sig" not in out["rumor"]
    one_line_error("nip17", "unwrap", "--sec", ALICE, stdin=wrapped)


def test_nip17_published_example_via_cli() -> None:
    example = json.loads((VECTORS / "nip17_example.json").read_text())
    out = json.loads(ok("nip17", "unwrap", "--sec", example["receiver_nsec"],
                        stdin=json.dumps(example["gift_wraps"][0]).encode()))
    assert out["rumor"]["content"] == example["content"]


def test_add_parser_plugs_into_a_top_level_parser() -> None:
    top = argparse.ArgumentParser(prog="agentfs")
    add_parser(top.add_subparsers(dest="command", required=True))
    args = top.parse_args(["nostr", "decode", BOB_NPUB])
    assert callable(args.run)
    args = top.parse_args(["nostr", "nip17", "unwrap", "--sec", BOB])
    assert callable(args.run)
