"""The plumbing rules parser: Plan 9's plumb(6) language into rule sets.

Where agentfs differs from Plan 9 (plumb(6)/plumb(7) and plan9port's rules.c, match.c):

- Object/verb pairs Plan 9 accepts but never matches (`attr is`, `arg matches`, `src isfile`,
  `attr set`, ...) are syntax errors. Legal: is, matches, set on src dst wdir type data;
  isfile, isdir on arg data wdir; add, delete on attr; to, client, start on plumb.
- Single-word arguments (all verbs but add, start, client) may be followed only by a `#`
  comment; Plan 9 silently ignores any extra words.
- `attr add` takes every blank-separated word as a name=value pair, as the man page says
  (`attr add a=1 b=2` adds both; `k='a b'` gives k=a b); Plan 9's code adds only the first word.
- `attr delete` of an absent attribute still matches, as the man page says (the code fails).
- Attributes are a map: a repeated name keeps its first place and takes its last value, on
  `attr add` and when read from the wire; Plan 9 keeps a duplicate that lookups never see.
  A malformed attr line is an error, not silently truncated.
- A message no rule set matches whose dst names no port is refused with an error (the man
  page); Plan 9's code drops it silently. Such a message goes to its dst unchanged, without
  the rewrites of rule sets that failed.
- An unterminated quote is always a syntax error, found when the rules are read.
- `$0`..`$9` are one digit (`$10` is `$1` then 0), as on 9front; names are
  `[A-Za-z_][A-Za-z0-9_]*`. A group that did not take part in the match is empty, without
  emptying the groups after it.
- `include` names a file relative to the include directory and may not leave it; absolute
  names and the `$PLAN9/plumb` fallback are refused. Loops are errors, and so is depth > 10.
- Ports `.`, `..`, `send`, `rules`, the empty name and names holding `/` are illegal.
- `plumb start`/`client` yield an argv (no shell, as Plan 9's code); running it is the server's.
- Regular expressions are Plan 9's syntax run by Python `re`; submatches follow Python's
  leftmost-first choice where Plan 9 picks leftmost-longest. With a `click` attribute, `$` also
  matches at the end of a candidate span.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from plumber.regexp import RegexpError, compile_regexp

OBJECTS = ("arg", "attr", "data", "dst", "plumb", "src", "type", "wdir")
VERBS = ("add", "client", "delete", "is", "isdir", "isfile", "matches", "set", "start", "to")
FIELDS = frozenset({"src", "dst", "wdir", "type", "data"})
LEGAL_OBJECTS: dict[str, frozenset[str]] = {
    "is": FIELDS,
    "matches": FIELDS,
    "set": FIELDS,
    "isfile": frozenset({"arg", "data", "wdir"}),
    "isdir": frozenset({"arg", "data", "wdir"}),
    "add": frozenset({"attr"}),
    "delete": frozenset({"attr"}),
    "to": frozenset({"plumb"}),
    "client": frozenset({"plumb"}),
    "start": frozenset({"plumb"}),
}
MULTI_WORD_VERBS = frozenset({"add", "client", "start"})
BAD_PORTS = frozenset({"", ".", "..", "send", "rules"})
MAX_INCLUDE_DEPTH = 10

_ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*(.*)", re.DOTALL)
_RULE = re.compile(r"([^ \t]+)[ \t]+([^ \t]+)[ \t]+(.*[^ \t])[ \t]*", re.DOTALL)
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")

Lookup = Callable[[str], "str | None"]


class RulesError(Exception):
    """A syntax error in a rules text, naming the line (and the included file, if any)."""

    def __init__(self, lineno: int, message: str, file: str | None = None) -> None:
        self.lineno = lineno
        self.message = message
        self.file = file
        where = f"{file}:{lineno}" if file else f"line {lineno}"
        super().__init__(f"{where}: {message}")


class QuoteError(ValueError):
    """An argument that ends inside a quoted string."""


# -- quoting and $ expansion (rules.c expand, dollar) -------------------------------------


def _scan_name(text: str, i: int) -> str:
    if i < len(text) and text[i].isdigit() and text[i].isascii():
        return text[i]
    j = i
    while j < len(text) and text[j] in _NAME_CHARS:
        j += 1
    return text[i:j]


def expand_word(text: str, pos: int, lookup: Lookup) -> tuple[str, int]:
    """Expand the blank-terminated word at `pos`: remove quotes, substitute `$name`.

    An unknown `$name` stays as written. Returns the word and the index after it.
    """
    out: list[str] = []
    quoting = False
    i, n = pos, len(text)
    while i < n and (quoting or text[i] not in " \t"):
        c = text[i]
        if c == "'":
            i += 1
            if not quoting:
                quoting = True
            elif i < n and text[i] == "'":
                out.append("'")
                i += 1
            else:
                quoting = False
            continue
        if quoting or c != "$":
            out.append(c)
            i += 1
            continue
        i += 1
        name = _scan_name(text, i)
        value = lookup(name) if name else None
        if value is None:
            out.append("$")
            continue
        out.append(value)
        i += len(name)
    if quoting:
        raise QuoteError("unterminated quoted string")
    return "".join(out), i


def split_words(text: str, lookup: Lookup) -> list[str]:
    """Split at unquoted blanks and expand each word alone (match.c buildargv)."""
    words: list[str] = []
    i = 0
    while True:
        while i < len(text) and text[i] in " \t":
            i += 1
        if i == len(text):
            return words
        word, i = expand_word(text, i, lookup)
        words.append(word)


# -- parsed rules -------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One line: object, verb, the argument as written, and as expanded when read."""

    obj: str
    verb: str
    arg: str
    qarg: str
    lineno: int
    file: str | None = None
    regex: re.Pattern[str] | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.obj}\t{self.verb}\t{self.arg}"


@dataclass(frozen=True)
class RuleSet:
    """Patterns then actions; `port` is the `plumb to` port, `command` the start/client rule."""

    patterns: tuple[Rule, ...]
    actions: tuple[Rule, ...]
    lineno: int
    file: str | None = None

    @property
    def port(self) -> str | None:
        return next((a.qarg for a in self.actions if a.verb == "to"), None)

    @property
    def command(self) -> Rule | None:
        return next((a for a in self.actions if a.verb in ("start", "client")), None)

    def __str__(self) -> str:
        return "".join(f"{rule}\n" for rule in (*self.patterns, *self.actions))


@dataclass(frozen=True)
class Rules:
    """A parsed rules text: rule sets in order, variables' final values, every port named."""

    rulesets: tuple[RuleSet, ...] = ()
    variables: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[str, ...] = ()
    text: str = ""


# -- reading lines, with include ----------------------------------------------------------


@dataclass(frozen=True)
class _Line:
    text: str
    lineno: int
    file: str | None


def _split_lines(text: str) -> list[str]:
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    return lines


def _resolve_include(name: str, include_dir: str | None, line: _Line) -> str:
    if include_dir is None:
        raise RulesError(line.lineno, "include: no include directory", line.file)
    if os.path.isabs(name):
        raise RulesError(line.lineno, f"include {name}: name must be relative", line.file)
    root = os.path.realpath(include_dir)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise RulesError(line.lineno, f"include {name}: outside the include directory",
                         line.file)
    return path


def _read_include(path: str, name: str, line: _Line) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise RulesError(line.lineno, f"can't open {name} for inclusion: {reason}",
                         line.file) from None


def _lines(text: str, file: str | None, include_dir: str | None,
           stack: tuple[str, ...]) -> Iterator[_Line]:
    """The lines of `text`, each include replaced by the included file's lines."""
    for lineno, raw in enumerate(_split_lines(text), 1):
        line = _Line(raw, lineno, file)
        words = raw.split()
        if not words or words[0] != "include":
            yield line
            continue
        if len(words) < 2 or words[1].startswith("#") or (len(words) > 2
                                                          and not words[2].startswith("#")):
            raise RulesError(lineno, "malformed include statement", file)
        name = words[1]
        path = _resolve_include(name, include_dir, line)
        if path in stack:
            raise RulesError(lineno, f"include loop: {name}", file)
        if len(stack) >= MAX_INCLUDE_DEPTH:
            raise RulesError(lineno, f"include stack too deep; max {MAX_INCLUDE_DEPTH}", file)
        included = _read_include(path, name, line)
        yield from _lines(included, name, include_dir, (*stack, path))


# -- the parser ---------------------------------------------------------------------------


class _Parser:
    def __init__(self) -> None:
        self.variables: dict[str, str] = {}
        self.rulesets: list[RuleSet] = []
        self.ports: list[str] = []
        self.rules: list[Rule] = []
        self.start: _Line | None = None

    def lookup(self, name: str) -> str | None:
        return self.variables.get(name)

    def add_port(self, port: str) -> None:
        if port not in self.ports:
            self.ports.append(port)

    def feed(self, line: _Line) -> None:
        text = line.text.lstrip(" \t")
        if not text or text.startswith("#"):
            self.end_ruleset()
            return
        assignment = _ASSIGNMENT.fullmatch(text)
        if assignment:
            self.end_ruleset()
            name, value = assignment.groups()
            self.variables[name] = self.single_word(value, line, f"{name}=")
            return
        rule = self.parse_rule(text, line)
        if self.start is None:
            self.start = line
        self.rules.append(rule)

    def single_word(self, arg: str, line: _Line, what: str) -> str:
        """Expand the first word of `arg`; anything after it must be a comment."""
        try:
            word, end = expand_word(arg, 0, self.lookup)
        except QuoteError as e:
            raise RulesError(line.lineno, str(e), line.file) from None
        rest = arg[end:].strip(" \t")
        if rest and not rest.startswith("#"):
            raise RulesError(line.lineno, f"unexpected {rest!r} after argument of {what}",
                             line.file)
        return word

    def parse_rule(self, text: str, line: _Line) -> Rule:
        parts = _RULE.fullmatch(text)
        if parts is None:
            raise RulesError(line.lineno, "malformed rule: want object verb argument",
                             line.file)
        obj, verb, arg = parts.groups()
        if obj == "kind":  # Plan 9 keeps this old name for type
            obj = "type"
        if obj not in OBJECTS:
            raise RulesError(line.lineno, f"unknown object {obj}", line.file)
        if verb not in VERBS:
            raise RulesError(line.lineno, f"unknown verb {verb}", line.file)
        if obj not in LEGAL_OBJECTS[verb]:
            raise RulesError(line.lineno, f"{verb} not valid verb for object {obj}", line.file)
        if verb in MULTI_WORD_VERBS:
            try:
                words = split_words(arg, self.lookup)
            except QuoteError as e:
                raise RulesError(line.lineno, str(e), line.file) from None
            qarg = " ".join(words)
            if verb == "add":
                self.check_pairs(words, line)
        else:
            qarg = self.single_word(arg, line, f"{obj} {verb}")
        regex = None
        if verb == "matches":
            try:
                regex = compile_regexp(qarg)
            except RegexpError as e:
                raise RulesError(line.lineno, f"bad regular expression {qarg!r}: {e}",
                                 line.file) from None
        if verb == "to" and (qarg in BAD_PORTS or "/" in qarg or "\0" in qarg):
            raise RulesError(line.lineno, f"illegal port name {qarg!r}", line.file)
        return Rule(obj, verb, arg, qarg, line.lineno, line.file, regex)

    @staticmethod
    def check_pairs(words: list[str], line: _Line) -> None:
        for word in words:
            if "$" in word:  # a message variable: known only when the rule runs
                continue
            name, eq, _ = word.partition("=")
            if not eq or not name or any(c in name for c in " \t'"):
                raise RulesError(line.lineno, f"attr add: {word!r} is not name=value",
                                 line.file)

    def end_ruleset(self) -> None:
        rules, start = self.rules, self.start
        self.rules, self.start = [], None
        if start is None:
            return
        patterns = tuple(r for r in rules if r.obj != "plumb")
        actions = tuple(r for r in rules if r.obj == "plumb")
        ports = [r for r in actions if r.verb == "to"]
        commands = [r for r in actions if r.verb != "to"]
        if len(commands) > 1:
            raise RulesError(commands[1].lineno,
                             "ruleset has more than one client or start action",
                             commands[1].file)
        if not patterns:
            if commands:
                raise RulesError(start.lineno, "ruleset must have patterns and actions",
                                 start.file)
            for r in ports:  # a set of nothing but plumb to lines declares ports
                self.add_port(r.qarg)
            return
        if not actions:
            raise RulesError(start.lineno, "ruleset must have patterns and actions",
                             start.file)
        if len(ports) > 1:
            raise RulesError(ports[1].lineno, "too many ports", ports[1].file)
        for r in ports:
            self.add_port(r.qarg)
        self.rulesets.append(RuleSet(patterns, actions, start.lineno, start.file))


def parse_rules(text: str, include_dir: str | os.PathLike[str] | None = None) -> Rules:
    """Parse a rules text; `include` names files in `include_dir`. Raises RulesError."""
    parser = _Parser()
    directory = os.fspath(include_dir) if include_dir is not None else None
    for line in _lines(text, None, directory, ()):
        parser.feed(line)
    parser.end_ruleset()
    return Rules(tuple(parser.rulesets), dict(parser.variables), tuple(parser.ports), text)
