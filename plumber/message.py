"""The plumb message: Plan 9's wire format (plumb(7)) and one JSON object per line.

Text is kept as `str`; bytes that are not UTF-8 survive as surrogate escapes, so any wire
message parses and packs back to the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

HEADERS = ("src", "dst", "wdir", "type")
JSON_KEYS = frozenset(HEADERS) | {"attr", "data", "ndata"}
_NEEDS_QUOTES = " '=\t"
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"


class MessageError(ValueError):
    """A message that cannot be parsed or cannot be carried in the wire format."""


def _encode(text: str) -> bytes:
    return text.encode(_ENCODING, _ERRORS)


def _decode(raw: bytes) -> str:
    return raw.decode(_ENCODING, _ERRORS)


def check_attr_name(name: str) -> None:
    """Refuse a name the attr line could not carry: empty, or holding blank, tab, = ' or newline."""
    if not name or any(c in name for c in " \t='\n"):
        raise MessageError(f"bad attribute name {name!r}")


def quote_value(value: str) -> str:
    """Quote an attribute value the way libplumb does: only if it holds blank, tab, ' or =."""
    if value and not any(c in value for c in _NEEDS_QUOTES):
        return value
    if not value:
        return ""
    return "'" + value.replace("'", "''") + "'"


def pack_attr(attr: dict[str, str]) -> str:
    """The attr line: name=value pairs separated by one blank."""
    return " ".join(f"{name}={quote_value(value)}" for name, value in attr.items())


def unpack_attr(text: str) -> dict[str, str]:
    """Parse an attr line; a repeated name keeps its first place and takes its last value."""
    attr: dict[str, str] = {}
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i == n:
            return attr
        eq = i
        while eq < n and text[eq] not in " \t=":
            eq += 1
        if eq in (n, i) or text[eq] != "=":
            raise MessageError(f"malformed attribute at {text[i:]!r}: want name=value")
        name = text[i:eq]
        i = eq + 1
        if i < n and text[i] == "'":
            value: list[str] = []
            i += 1
            while True:
                if i == n:
                    raise MessageError(f"unterminated quote in attribute {name}")
                if text[i] == "'":
                    if i + 1 < n and text[i + 1] == "'":
                        value.append("'")
                        i += 2
                        continue
                    i += 1
                    break
                value.append(text[i])
                i += 1
            if i < n and text[i] not in " \t":
                raise MessageError(f"text after quoted value of attribute {name}")
            attr[name] = "".join(value)
        else:
            start = i
            while i < n and text[i] not in " \t":
                i += 1
            attr[name] = text[start:i]


@dataclass
class Message:
    """A plumb message; `attr` is ordered, `ndata` is the length of the data in bytes."""

    src: str = ""
    dst: str = ""
    wdir: str = ""
    type: str = ""
    attr: dict[str, str] = field(default_factory=dict)
    data: str = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise MessageError unless the message can be packed into the wire format."""
        for name in HEADERS:
            value = getattr(self, name)
            if not isinstance(value, str):
                raise MessageError(f"{name} must be a string")
            if "\n" in value:
                raise MessageError(f"{name} must not contain a newline")
            self._check_encodable(name, value)
        if not isinstance(self.data, str):
            raise MessageError("data must be a string")
        self._check_encodable("data", self.data)
        if not isinstance(self.attr, dict):
            raise MessageError("attr must be a mapping of names to values")
        for name, value in self.attr.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise MessageError("attribute names and values must be strings")
            check_attr_name(name)
            if "\n" in value:
                raise MessageError(f"value of attribute {name} must not contain a newline")
            self._check_encodable(f"attribute {name}", value)

    @staticmethod
    def _check_encodable(what: str, text: str) -> None:
        try:
            _encode(text)
        except UnicodeEncodeError as e:
            raise MessageError(f"{what} is not valid text: {e.reason}") from None

    @property
    def ndata(self) -> int:
        return len(_encode(self.data))

    def copy(self) -> Message:
        return Message(self.src, self.dst, self.wdir, self.type, dict(self.attr), self.data)

    # -- wire format ------------------------------------------------------------------------

    def to_wire(self) -> bytes:
        """src, dst, wdir, type, attr, ndata, each on a line, then the data with no newline."""
        self.validate()
        header = "".join(f"{line}\n" for line in (*self.headers(), pack_attr(self.attr)))
        data = _encode(self.data)
        return _encode(header) + f"{len(data)}\n".encode() + data

    def headers(self) -> tuple[str, str, str, str]:
        return (self.src, self.dst, self.wdir, self.type)

    @classmethod
    def from_wire(cls, buf: bytes) -> Message:
        """Parse exactly one message; bytes beyond ndata are an error, as in plan9port."""
        parsed = split_wire(buf)
        if parsed is None:
            raise MessageError("incomplete message: header or data is short")
        message, rest = parsed
        if rest:
            raise MessageError(f"{len(rest)} bytes after the {message.ndata} bytes of data")
        return message

    # -- JSON -------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"src": self.src, "dst": self.dst, "wdir": self.wdir, "type": self.type,
                "attr": dict(self.attr), "data": self.data}

    def to_json_line(self) -> str:
        """One line of JSON; ASCII escapes only where the text holds undecodable bytes."""
        line = json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":"))
        try:
            line.encode(_ENCODING)
        except UnicodeEncodeError:
            line = json.dumps(self.to_json(), separators=(",", ":"))
        return line

    @classmethod
    def from_json(cls, obj: object) -> Message:
        """Build a message from a JSON object; absent fields are empty, unknown keys refused."""
        if not isinstance(obj, dict):
            raise MessageError("a JSON message must be an object")
        unknown = sorted(set(obj) - JSON_KEYS)
        if unknown:
            raise MessageError(f"unknown key {unknown[0]!r} in JSON message")
        fields: dict[str, str] = {}
        for name in (*HEADERS, "data"):
            value = obj.get(name, "")
            if not isinstance(value, str):
                raise MessageError(f"{name} must be a string")
            fields[name] = value
        attr = obj.get("attr", {})
        if not isinstance(attr, dict):
            raise MessageError("attr must be an object of strings")
        message = cls(fields["src"], fields["dst"], fields["wdir"], fields["type"],
                      dict(attr), fields["data"])
        if "ndata" in obj:
            ndata = obj["ndata"]
            if type(ndata) is not int or ndata != message.ndata:
                raise MessageError(f"ndata {ndata!r} is not the length of data "
                                   f"({message.ndata} bytes)")
        return message

    @classmethod
    def from_json_line(cls, line: str | bytes) -> Message:
        try:
            obj = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            raise MessageError(f"not a JSON object: {e}") from None
        return cls.from_json(obj)


def split_wire(buf: bytes) -> tuple[Message, bytes] | None:
    """Parse the first message in `buf` and return it with the bytes after it.

    None means more bytes are needed (like plumbunpackpartial); a malformed header raises.
    """
    lines = buf.split(b"\n", 6)
    if len(lines) < 7:
        return None
    src, dst, wdir, type_, attr, count, rest = lines
    text = count.strip(b" \t")
    if not text.isdigit():
        raise MessageError(f"bad ndata line {_decode(count)!r}: want a decimal count")
    ndata = int(text)
    if len(rest) < ndata:
        return None
    message = Message(_decode(src), _decode(dst), _decode(wdir), _decode(type_),
                      unpack_attr(_decode(attr)), _decode(rest[:ndata]))
    return message, rest[ndata:]
