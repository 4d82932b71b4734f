"""The plumb matcher and messages: routing by realistic rules, wire and JSON round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plumber import Message, MessageError, NoRoute, Route, parse_rules, route
from plumber.message import split_wire

BASIC = r"""
# first rule that fires wins
editor = acme
addr=':(#?[0-9]+)'

plumb to seemail

# urls go to the web browser
type is text
data matches '(https?|ftp)://[a-zA-Z0-9_@\-]+([.:][a-zA-Z0-9_@\-]+)*/?[a-zA-Z0-9_?,%#~&/\-+=]+([:.][a-zA-Z0-9_?,%#~&/\-+=]+)*'
plumb to web
plumb start web $0

# image files go to page
type is text
data matches '[a-zA-Z0-9_\-./]+'
data matches '([a-zA-Z0-9_\-./]+)\.(jpe?g|gif|png)'
arg isfile $0
plumb to image
plumb start page $file

# existing files, possibly tagged by line number, go to the editor
type is text
data matches '([.a-zA-Z0-9_/\-]*[a-zA-Z0-9_/\-])('$addr')?'
arg isfile $1
data set $file
attr add addr=$3
plumb to edit
plumb client $editor

# directories go to the editor too
type is text
data matches '[a-zA-Z0-9_\-./]+'
arg isdir $0
attr add action=showdir 'label=a dir'
plumb to edit

# man pages are synthesized by a command, with no port
type is text
data matches '([a-zA-Z0-9_\-./]+)\(([1-8])\)'
plumb start rc -c 'man '$2' '$1' | plumb -i -d edit'
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "mem.c").write_text("int x;\n")
    (tmp_path / "pic.png").write_bytes(b"\x89PNG")
    (tmp_path / "src").mkdir()
    return tmp_path


def text(data: str, wdir: Path | str = "", dst: str = "") -> Message:
    return Message(src="test", dst=dst, wdir=str(wdir), type="text", data=data)


RULES = parse_rules(BASIC)


def test_url_goes_to_web() -> None:
    r = route(RULES, text("https://9p.io/sys/doc/plumb.html"))
    assert (r.port, r.start, r.client) == (
        "web", ("web", "https://9p.io/sys/doc/plumb.html"), None)
    assert r.message.dst == "web"


def test_file_with_address_goes_to_editor(tree: Path) -> None:
    original = text("mem.c:27", tree)
    r = route(RULES, original)
    assert r.port == "edit"
    assert r.client == ("acme",)
    assert r.message.data == f"{tree}/mem.c"
    assert r.message.attr == {"addr": "27"}
    assert original.data == "mem.c:27" and original.attr == {}  # the caller's copy stays


def test_file_without_address_gets_empty_addr(tree: Path) -> None:
    r = route(RULES, text("./src/../mem.c", tree))
    assert r.message.data == f"{tree}/mem.c"
    assert r.message.attr == {"addr": ""}


def test_image_before_editor(tree: Path) -> None:
    r = route(RULES, text("pic.png", tree))
    assert (r.port, r.start) == ("image", ("page", f"{tree}/pic.png"))


def test_directory(tree: Path) -> None:
    r = route(RULES, text("src", tree))
    assert r.port == "edit" and r.client is None and r.start is None
    assert r.message.attr == {"action": "showdir", "label": "a dir"}


def test_start_without_port() -> None:
    r = route(RULES, text("plumb(1)"))
    assert r.port == ""
    assert r.start == ("rc", "-c", "man 1 plumb | plumb -i -d edit")


def test_no_rule_matches(tree: Path) -> None:
    with pytest.raises(NoRoute, match="couldn't find destination"):
        route(RULES, text("no such file", tree))
    with pytest.raises(NoRoute):
        route(RULES, text("missing.c", tree))


def test_dst_skips_other_ports(tree: Path) -> None:
    r = route(RULES, text("pic.png", tree, dst="edit"))
    assert r.port == "edit" and r.message.data == f"{tree}/pic.png"


def test_unmatched_message_goes_unchanged_to_its_declared_port() -> None:
    m = text("anything at all", dst="seemail")
    assert route(RULES, m) == Route("seemail", m)
    assert route(RULES, text("x y", dst="agent1"), ports={"agent1"}).port == "agent1"
    with pytest.raises(NoRoute, match="does not exist"):
        route(RULES, text("x y", dst="nowhere"))


def test_first_matching_ruleset_wins() -> None:
    rules = parse_rules("data is a\nplumb to one\n\ndata is a\nplumb to two\n")
    assert route(rules, Message(data="a")).port == "one"


def test_rewrites_of_failed_rulesets_stay() -> None:
    rules = parse_rules("src set changed\ndata is never\nplumb to one\n\n"
                        "src is changed\nplumb to two\n")
    assert route(rules, Message(src="orig", data="a")).message.src == "changed"


def test_set_each_field_and_variables() -> None:
    rules = parse_rules("x=X\n\ndata matches '(a)(b)?(c)'\nsrc set $src.$x\ndst set p\n"
                        "wdir set /$1$2$3\ntype set t$0\ndata set [$data|$wdir|$9]\n"
                        "plumb to p\n")
    m = route(rules, Message(src="s", data="ac")).message
    assert (m.src, m.dst, m.wdir, m.type, m.data) == ("s.X", "p", "/ac", "tac", "[ac|/ac|]")


def test_set_dst_to_another_port_and_header_newline() -> None:
    rules = parse_rules("plumb to other\n\ndata is a\ndst set other\nplumb start x\n\n"
                        "src set $data\nplumb to p\n")
    assert route(rules, Message(data="a")).port == "other"
    with pytest.raises(NoRoute):  # src cannot take a newline, so the set fails
        route(rules, Message(data="two\nlines"))


def test_attr_add_and_delete() -> None:
    rules = parse_rules("attr add a=1 b='x y' 'c=it''s'\nattr delete old\n"
                        "attr delete absent\nplumb to p\n")
    m = route(rules, Message(attr={"old": "o", "a": "0"})).message
    assert m.attr == {"a": "1", "b": "x y", "c": "it's"}
    assert m.to_wire().split(b"\n")[4] == b"a=1 b='x y' c='it''s'"


def test_attr_variable() -> None:
    rules = parse_rules("data is x\ndata set $attr\nplumb to p\n")
    assert route(rules, Message(data="x", attr={"k": "a b"})).message.data == "k='a b'"


def test_isfile_isdir_objects(tree: Path) -> None:
    rules = parse_rules("wdir isdir -\ndata isfile (ignored)\ndata set $dir:$file\nplumb to p\n\n"
                        "arg isfile /etc/hostname-does-not-exist\nplumb to q\n")
    r = route(rules, Message(wdir=str(tree), data="mem.c"))
    assert r.message.data == f"{tree}:{tree}/mem.c"
    with pytest.raises(NoRoute):
        route(rules, Message(wdir=str(tree), data="src"))


def test_file_variable_without_isfile() -> None:
    rules = parse_rules("data is x\ndata set $file\nplumb to p\n")
    assert route(rules, Message(wdir="/a/b/", data="x")).message.data == "/a/b/x"
    assert route(rules, Message(wdir="/a", data="x"), ).message.data == "/a/x"


def test_isfile_uses_the_given_stat(tree: Path) -> None:
    seen: list[str] = []

    def fake_stat(path: str) -> object:
        seen.append(path)
        raise FileNotFoundError(path)

    rules = parse_rules("arg isfile $data\nplumb to p\n")
    with pytest.raises(NoRoute):
        route(rules, Message(wdir="/w", data="f"), stat=fake_stat)  # type: ignore[arg-type]
    assert seen == ["/w/f"]


def test_matches_other_fields_and_full_text() -> None:
    rules = parse_rules("src matches 'agent-([0-9]+)'\ndata set $1\nplumb to p\n")
    assert route(rules, Message(src="agent-42")).message.data == "42"
    with pytest.raises(NoRoute):
        route(rules, Message(src="my-agent-42"))


def test_click_selects_the_span_around_it() -> None:
    rules = parse_rules("data matches '[a-z]+\\.c'\nplumb to edit\n")
    m = route(rules, Message(data="see mem.c here", attr={"click": "6", "x": "1"})).message
    assert m.data == "mem.c" and m.attr == {"x": "1"}
    with pytest.raises(NoRoute):
        route(rules, Message(data="see mem.c here", attr={"click": "1"}))


def test_client_without_port_is_refused() -> None:
    rules = parse_rules("data is a\nplumb client acme\n")
    with pytest.raises(NoRoute, match='no port for "client" rule'):
        route(rules, Message(data="a"))


# -- messages -----------------------------------------------------------------------------


def test_wire_format_example() -> None:
    wire = b"plumbtest\nedit\n/usr/rob/src\ntext\naddr=27\n5\nmem.c"
    m = Message.from_wire(wire)
    assert m == Message("plumbtest", "edit", "/usr/rob/src", "text", {"addr": "27"}, "mem.c")
    assert m.ndata == 5 and m.to_wire() == wire


def test_wire_errors() -> None:
    for bad, reason in [(b"a\nb\n", "incomplete"), (b"\n\n\n\n\n3\nab", "incomplete"),
                        (b"\n\n\n\n\nx\n", "ndata"), (b"\n\n\n\n\n1\nab", "after"),
                        (b"\n\n\n\nnoequals\n0\n", "malformed attribute"),
                        (b"\n\n\n\na='x\n0\n", "unterminated")]:
        with pytest.raises(MessageError, match=reason):
            Message.from_wire(bad)
    assert split_wire(b"\n\n\n\n\n3\nab") is None
    first, rest = split_wire(b"\n\n\n\n\n1\nab") or (None, b"")
    assert first == Message(data="a") and rest == b"b"


def test_json_errors() -> None:
    for bad in ['[]', '{"to": "x"}', '{"src": 1}', '{"attr": {"a b": "x"}}',
                '{"attr": {"a": "x\\ny"}}', '{"data": "ab", "ndata": 3}', "nope",
                '{"dst": "a\\nb"}']:
        with pytest.raises(MessageError):
            Message.from_json_line(bad)
    assert Message.from_json_line('{"data": "é", "ndata": 2}').ndata == 2


headers = st.text(st.characters(codec="utf-8", exclude_characters="\n"))
names = st.text(st.characters(codec="utf-8", exclude_characters=" \t='\n"),
                min_size=1)
messages = st.builds(Message, headers, headers, headers, headers,
                     st.dictionaries(names, headers, max_size=5),
                     st.text(st.characters(codec="utf-8")))


@given(messages)
def test_wire_round_trip(m: Message) -> None:
    assert Message.from_wire(m.to_wire()) == m


@given(messages)
def test_json_round_trip(m: Message) -> None:
    assert Message.from_json_line(m.to_json_line()) == m
    assert Message.from_json(m.to_json()) == m


@given(st.binary())
def test_any_data_bytes_round_trip(data: bytes) -> None:
    wire = b"src\n\n\ntext\n\n%d\n" % len(data) + data
    m = Message.from_wire(wire)
    assert m.ndata == len(data) and m.to_wire() == wire
    assert Message.from_json_line(m.to_json_line()).to_wire() == wire


@given(st.binary(max_size=200))
def test_random_wire_bytes_parse_or_refuse(buf: bytes) -> None:
    try:
        m = Message.from_wire(buf)
    except MessageError:
        return
    assert Message.from_wire(m.to_wire()) == m


data_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["mem.c", "mem.c:12", "pic.png", "src", "http://x.org/a", "plumb(1)",
                     "a", "/etc", "../..", "$0", "'", ""]),
)
random_messages = st.builds(
    Message, st.sampled_from(["", "test", "agent-7"]),
    st.sampled_from(["", "edit", "web", "image", "seemail", "nowhere"]),
    st.sampled_from(["", "/", "/tmp", "rel"]), st.sampled_from(["", "text", "image/png"]),
    st.dictionaries(st.sampled_from(["click", "addr", "action"]),
                    st.sampled_from(["", "0", "3", "x", "99"]), max_size=3),
    data_text)


@settings(max_examples=300)
@given(random_messages)
def test_random_messages_route_or_noroute(m: Message) -> None:
    try:
        r = route(RULES, m)
    except NoRoute as e:
        assert e.reason
        return
    assert r.port == r.message.dst or (r.port == "" and r.start)
    r.message.to_wire()
