"""The ctl text protocol: newline-terminated verbs, several per write, anything unknown refused."""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass, field

from . import alarms, caps, errors, lifecycle
from .tree import ROOT_FILES
from .units import parse_duration

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
# An agent's name is a link in the root: a root file's name would hide it, or the file.
RESERVED_NAMES = frozenset({f.name for f in ROOT_FILES} | {".tick"})


def check_name(name: str) -> str:
    if name in RESERVED_NAMES:
        raise errors.invalid(f"name {name!r}: the root has a file of that name "
                             f"(reserved: {' '.join(sorted(RESERVED_NAMES))})")
    if not NAME_RE.match(name) or name.startswith("npub1"):
        raise errors.invalid(
            f"name {name[:70]!r}: use 1-64 of A-Z a-z 0-9 . _ -, not starting with '.', '-' "
            "or npub1")
    return name


def _words(rest: str, verb: str) -> list[str]:
    try:
        return shlex.split(rest)
    except ValueError as e:
        raise errors.invalid(f"{verb}: {e}") from None


@dataclass(frozen=True)
class Command:
    verb: str
    args: tuple[str, ...] = ()
    text: str = ""


@dataclass(frozen=True)
class NewAgent:
    name: str
    program: list[str] | None
    grants: list[Command] = field(default_factory=list)  # `grant` lines after its `new`
    settings: list[Command] = field(default_factory=list)  # `serve`, `hooks`, `idle` after it


AGENT_VERBS = {"wake", "program", "name", "sleep", "terminate", "recover", "retries",
               "checkpoint", "charge", "spend", "alarm", "idle", "serve", "hooks", "token",
               "publish", *caps.VERBS}
# Settings a root ctl `new` may be followed by, for the agent it makes (as `grant` is).
NEW_SETTINGS = ("serve", "hooks", "idle")
# Verbs only a running tick may write, through its own AGENT_DIR/ctl.
TICK_VERBS = {"checkpoint", "charge", "spend"}
# Verbs only written from outside the agent: its owner's settings.
OWNER_VERBS = {"retries", "token", "publish"}
TOKEN_RE = re.compile(r"^[\x21-\x7e]{16,256}$")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _positive(text: str, what: str) -> int:
    if not re.fullmatch(r"[0-9]{1,15}", text, re.ASCII) or int(text) < 1:
        raise errors.invalid(f"ctl: {what} must be a whole number of at least 1, not {text!r}")
    return int(text)


def _lines(data: bytes, what: str) -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.invalid(f"{what}: not UTF-8 text") from None
    if "\0" in text:
        raise errors.invalid(f"{what}: a NUL byte in a command")
    return [line for line in text.splitlines() if line.strip()]


def parse_agent_ctl(data: bytes) -> list[Command]:
    """Every command in one write, or EINVAL naming the first bad one."""
    commands: list[Command] = []
    lines = _lines(data, "ctl")
    if not lines:
        raise errors.invalid("ctl: empty command")
    for line in lines:
        verb, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if commands and commands[-1].verb == "terminate":
            # A terminated agent changes no more: what follows it in the write would.
            raise errors.invalid(f"ctl: {verb!r} after terminate: terminate comes last")
        if verb not in AGENT_VERBS:
            raise errors.invalid(
                f"ctl: unknown command {verb!r} (known: {' '.join(sorted(AGENT_VERBS))})")
        if verb == "wake":
            commands.append(Command(verb, text=rest))
        elif verb == "program":
            argv = _words(rest, verb)
            if not argv:
                raise errors.invalid("ctl: program needs a PROGRAM to run")
            commands.append(Command(verb, tuple(argv)))
        elif verb == "name":
            words = _words(rest, verb)
            if len(words) != 1:
                raise errors.invalid("ctl: name takes exactly one NAME")
            commands.append(Command(verb, (check_name(words[0]),)))
        elif verb == "retries":
            commands.append(Command(verb, (str(_positive(rest, "retries")),)))
        elif verb == "charge":
            words = rest.split()
            if len(words) != 2 or words[0] != "api":
                raise errors.invalid("ctl: usage: charge api N")
            commands.append(Command(verb, ("api", str(_positive(words[1], "charge")))))
        elif verb == "alarm":
            alarm = alarms.parse(rest.split())
            commands.append(Command(verb, (alarms.CANCEL if alarm is None else alarm.to_arg(),)))
        elif verb == "idle":
            if not rest:
                raise errors.invalid("ctl: usage: idle DURATION (0 hibernates at once)")
            commands.append(Command(verb, (repr(parse_duration(rest)),)))
        elif verb == "serve":
            if rest not in ("on", "off"):
                raise errors.invalid("ctl: usage: serve on|off (on: one program serves "
                                     "many ticks)")
            commands.append(Command(verb, (rest,)))
        elif verb == "hooks":
            commands.append(Command(verb, parse_hooks(rest.split())))
        elif verb == "token":
            # Only the token's hash goes further: the log and ctl never see the token.
            if rest == "none":
                commands.append(Command(verb, ("",)))
            elif TOKEN_RE.match(rest):
                commands.append(Command(verb, (token_hash(rest),)))
            else:
                raise errors.invalid("ctl: usage: token SECRET (16-256 printable ASCII "
                                     "characters, no spaces) | token none")
        elif verb == "publish":
            if rest not in ("heads", "none"):
                raise errors.invalid("ctl: usage: publish heads | publish none")
            commands.append(Command(verb, (rest,)))
        elif verb in caps.VERBS:
            commands.append(Command(verb, caps.parse(verb, _words(rest, verb))))
        elif verb == "spend":
            sats, _, memo = rest.partition(" ")
            commands.append(Command(verb, (str(_positive(sats, "spend")),), text=memo.strip()))
        else:
            if rest:
                raise errors.invalid(f"ctl: {verb} takes no arguments")
            commands.append(Command(verb))
    return commands


def parse_root_ctl(data: bytes) -> list[NewAgent]:
    agents: list[NewAgent] = []
    lines = _lines(data, "ctl")
    if not lines:
        raise errors.invalid("ctl: empty command")
    for line in lines:
        words = _words(line, "ctl")
        if words[0] == "grant" and agents:  # gives the agent of the `new` above it
            agents[-1].grants.append(Command("grant", caps.parse("grant", words[1:])))
            continue
        if words[0] in NEW_SETTINGS and agents:  # likewise, a setting of it
            agents[-1].settings.extend(parse_agent_ctl(line.encode()))
            continue
        if words[0] != "new":
            raise errors.invalid(f"ctl: unknown command {words[0]!r} (known: new, and "
                                 "grant, serve, hooks or idle after a new)")
        if len(words) < 2:
            raise errors.invalid("ctl: usage: new NAME [PROGRAM ARG...]")
        agents.append(NewAgent(check_name(words[1]), words[2:] or None))
    names = [a.name for a in agents]
    if len(set(names)) != len(names):
        raise errors.invalid("ctl: the same name twice in one write")
    return agents


def parse_hooks(words: list[str]) -> tuple[str, ...]:
    """`hooks all`, `hooks none`, or the lifecycle triggers that run the program."""
    if words in (["all"], ["none"]):
        return tuple(words)
    unknown = [w for w in words if w not in lifecycle.HOOKS]
    if not words or unknown:
        raise errors.invalid(f"ctl: usage: hooks all | none | HOOK... (of "
                             f"{' '.join(lifecycle.HOOKS)})"
                             + (f"; not a hook: {unknown[0][:40]!r}" if unknown else ""))
    return tuple(dict.fromkeys(words))


def quote_program(program: list[str] | None) -> str:
    return "-" if not program else shlex.join(program)
