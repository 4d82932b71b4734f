"""The matcher: the first rule set whose patterns all match routes the message.

One function per verb, as in Plan 9's match.c. Rewrites (set, add, delete) act on a working
copy of the message and, as in Plan 9, stay for later rule sets even if their own rule set
then fails; the caller's message is never changed.
"""

from __future__ import annotations

import os
import posixpath
import stat as statmod
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from plumber.message import Message, MessageError, check_attr_name, pack_attr
from plumber.rules import Rule, Rules, RuleSet, expand_word, split_words

Stat = Callable[[str], os.stat_result]
NGROUPS = 10


class NoRoute(Exception):
    """No rule routes the message; `reason` says why, in Plan 9's words where it has them."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class Route:
    """Where a message goes.

    `port` is the destination port ("" when only `start` applies); `start` and `client` are
    the argv of the rule set's command. The server delivers to the port's readers; if none
    has it open, it runs `start` (and discards the message) or runs `client` (and holds the
    message for the next reader), else refuses the message. `ruleset` is None when no rule
    set matched and the message went to the port its dst names, unchanged.
    """

    port: str
    message: Message
    start: tuple[str, ...] | None = None
    client: tuple[str, ...] | None = None
    ruleset: RuleSet | None = None


def clean_name(path: str) -> str:
    """Plan 9's cleanname: collapse //, drop ., resolve .. lexically; "" is "."."""
    if not path:
        return "."
    cleaned = posixpath.normpath(path)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned


def absolute(wdir: str, name: str) -> str:
    """`name` taken in `wdir` (match.c absolute): absolute names stay as they are."""
    if name.startswith("/"):
        return name
    return clean_name(f"{wdir}/{name}")


@dataclass
class Exec:
    """The state of one rule set's evaluation: the message, $0..$9, $file, $dir, click span."""

    msg: Message
    variables: Mapping[str, str]
    stat: Stat
    groups: list[str] = field(default_factory=lambda: [""] * NGROUPS)
    file: str = ""
    dir: str = ""
    p0: int = -1
    p1: int = -1
    clear_click: bool = False
    set_data: bool = False

    def filename(self, name: str) -> str:
        """$file or $dir: the name found, else data taken as a file name in wdir."""
        if name:
            return clean_name(name)
        data, wdir = self.msg.data, self.msg.wdir
        if data.startswith("/") or not wdir:
            return clean_name(data)
        return clean_name(f"{wdir}/{data}")

    def lookup(self, name: str) -> str | None:
        if name.isdigit():
            return self.groups[int(name)]
        if name in ("src", "dst", "wdir", "type", "data"):
            return str(getattr(self.msg, name))
        if name == "attr":
            return pack_attr(self.msg.attr)
        if name == "file":
            return self.filename(self.file)
        if name == "dir":
            return self.filename(self.dir)
        return self.variables.get(name)

    def expand(self, rule: Rule) -> str:
        return expand_word(rule.arg, 0, self.lookup)[0]

    def set_groups(self, groups: list[str | None]) -> None:
        self.groups = [(g or "") for g in groups[:NGROUPS]]
        self.groups += [""] * (NGROUPS - len(self.groups))


# -- verbs --------------------------------------------------------------------------------


def verb_is(rule: Rule, e: Exec) -> bool:
    """The field's text is the argument, as expanded when the rules were read."""
    return str(getattr(e.msg, rule.obj)) == rule.qarg


def _atoi(text: str) -> int:
    digits = ""
    for c in text.lstrip(" \t"):
        if not (c.isascii() and c.isdigit()):
            break
        digits += c
    return int(digits) if digits else 0


def _click_match(rule: Rule, e: Exec) -> bool:
    """The leftmost-longest match that contains or abuts the click (match.c clickmatch)."""
    assert rule.regex is not None
    data = e.msg.data
    click = min(_atoi(e.msg.attr.get("click", "")), len(data))
    for i in range(click + 1):
        sub = data[i:]
        first = rule.regex.search(sub)
        if first is None:
            continue
        start = first.start()
        for end in range(len(sub), start - 1, -1):
            m = rule.regex.fullmatch(sub, start, end)
            if m is not None:
                break
        else:
            m = first
        p0, p1 = i + m.start(), i + m.end()
        if not p0 <= click <= p1:
            continue
        if e.p0 >= 0 and (p0, p1) != (e.p0, e.p1):
            return False
        e.clear_click = e.set_data = True
        e.p0, e.p1 = p0, p1
        e.set_groups([m.group(0), *m.groups()])
        return True
    return False


def verb_matches(rule: Rule, e: Exec) -> bool:
    """The field's whole text matches the regular expression; sets $0..$9."""
    assert rule.regex is not None
    if rule.obj == "data" and "click" in e.msg.attr:
        return _click_match(rule, e)
    m = rule.regex.fullmatch(str(getattr(e.msg, rule.obj)))
    if m is None:
        return False
    e.set_groups([m.group(0), *m.groups()])
    return True


def _named_file(rule: Rule, e: Exec) -> str:
    if rule.obj == "arg":
        return absolute(e.msg.wdir, e.expand(rule))
    return absolute(e.msg.wdir, e.msg.data if rule.obj == "data" else e.msg.wdir)


def _mode(path: str, e: Exec) -> int | None:
    try:
        return e.stat(path).st_mode
    except (OSError, ValueError):
        return None


def verb_isfile(rule: Rule, e: Exec) -> bool:
    """The object names an existing file that is not a directory; sets $file."""
    path = _named_file(rule, e)
    mode = _mode(path, e)
    if mode is None or statmod.S_ISDIR(mode):
        return False
    e.file = path
    return True


def verb_isdir(rule: Rule, e: Exec) -> bool:
    """The object names an existing directory; sets $dir."""
    path = _named_file(rule, e)
    mode = _mode(path, e)
    if mode is None or not statmod.S_ISDIR(mode):
        return False
    e.dir = path
    return True


def verb_set(rule: Rule, e: Exec) -> bool:
    """The field becomes the argument; a header field cannot take a newline."""
    value = e.expand(rule)
    if rule.obj == "data":
        e.msg.data = value
        e.p0 = e.p1 = -1
        e.set_data = False
        return True
    if "\n" in value:
        return False
    setattr(e.msg, rule.obj, value)
    return True


def verb_add(rule: Rule, e: Exec) -> bool:
    """Each name=value word of the argument becomes an attribute (replacing one of that name)."""
    pairs: list[tuple[str, str]] = []
    for word in split_words(rule.arg, e.lookup):
        name, eq, value = word.partition("=")
        try:
            check_attr_name(name)
        except MessageError:
            return False
        if not eq or "\n" in value:
            return False
        pairs.append((name, value))
    e.msg.attr.update(pairs)
    return True


def verb_delete(rule: Rule, e: Exec) -> bool:
    """Delete the named attribute; matches whether or not it was there (plumb(7))."""
    e.msg.attr.pop(e.expand(rule), None)
    return True


VERBS: dict[str, Callable[[Rule, Exec], bool]] = {
    "is": verb_is,
    "matches": verb_matches,
    "isfile": verb_isfile,
    "isdir": verb_isdir,
    "set": verb_set,
    "add": verb_add,
    "delete": verb_delete,
}


# -- rule sets and routing ----------------------------------------------------------------


def match_ruleset(ruleset: RuleSet, msg: Message, e: Exec, address: bool = False) -> bool:
    """Run the patterns in order; on success fill in dst and apply the click rewrite.

    `address`: the message's dst names no port (an agentfs address, such as an npub
    elsewhere or a URL), so rule sets of every port may take it, dst unchanged.
    """
    port = ruleset.port
    if msg.dst and port is not None and msg.dst != port and not address:
        return False  # the one rule evaluated out of order
    if not all(VERBS[rule.verb](rule, e) for rule in ruleset.patterns):
        return False
    if port is not None and not msg.dst:
        msg.dst = port
    if e.clear_click:
        msg.attr.pop("click", None)
        if e.set_data:
            msg.data = e.groups[0]
    return True


def _dispose(ruleset: RuleSet, e: Exec, ports: Collection[str], address: bool) -> Route:
    command = ruleset.command
    argv = tuple(split_words(command.arg, e.lookup)) if command is not None else None
    start = argv if command is not None and command.verb == "start" else None
    client = argv if command is not None and command.verb == "client" else None
    dst = ruleset.port if address and ruleset.port is not None else e.msg.dst
    if not dst:
        if start is not None:
            return Route("", e.msg, start, None, ruleset)
        if client is not None:
            raise NoRoute('no port for "client" rule')
        raise NoRoute("no start action for plumb message")
    if dst not in ports:
        raise NoRoute(f"destination port {dst!r} does not exist")
    return Route(dst, e.msg, start, client, ruleset)


def route(rules: Rules, message: Message, *, ports: Collection[str] = (),
          stat: Stat = os.stat, addresses: bool = False) -> Route:
    """Route `message` by the first rule set that matches it, or raise NoRoute.

    `ports` names ports that exist besides those of the rules; `stat` tests files for
    isfile and isdir.  With `addresses` (agentfs's extension), a dst that names no port is
    an address: any rule set may match it, and sends it to its port with dst unchanged.
    """
    known = set(rules.ports) | set(ports)
    msg = message.copy()
    address = bool(message.dst) and message.dst not in known and addresses
    for ruleset in rules.rulesets:
        e = Exec(msg, rules.variables, stat)
        if match_ruleset(ruleset, msg, e, address and msg.dst == message.dst):
            return _dispose(ruleset, e, known, address and msg.dst == message.dst)
    if message.dst:
        if message.dst in known:
            return Route(message.dst, message.copy())
        raise NoRoute(f"no rule matched and destination port {message.dst!r} does not exist")
    raise NoRoute("couldn't find destination for message: no rule matched")
