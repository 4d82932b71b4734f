"""Plan 9 regular expressions (regexp(7)) translated into Python `re` patterns.

Differences in syntax are translated: `{` `}` are literals, `\\c` is always the literal c,
negated classes never match newline, `^` `$` match at line ends, and a closure of a closure
(`a**`, `a*?`) nests instead of meaning Python's lazy or possessive forms.
"""

from __future__ import annotations

import re

_CLOSURES = "*+?"


class RegexpError(ValueError):
    """A regular expression that Plan 9's regcomp would refuse."""


def _literal(c: str) -> str:
    return re.escape(c) if c != "\n" else "\\n"


def _class_char(c: str) -> str:
    if c in "\\]-^[":
        return "\\" + c
    return "\\n" if c == "\n" else c


def _translate_class(expr: str, i: int) -> tuple[str, int]:
    """Translate the class that starts after the `[` at expr[i-1]; return it and the next index."""
    negated = False
    if i < len(expr) and expr[i] == "^":
        negated = True
        i += 1
    spans: list[tuple[str, str]] = []
    while True:
        if i >= len(expr):
            raise RegexpError("malformed '[]': no closing ]")
        c = expr[i]
        quoted = c == "\\"
        if quoted:
            if i + 1 >= len(expr):
                raise RegexpError("malformed '[]': no closing ]")
            c = expr[i + 1]
            i += 2
        else:
            i += 1
        if not quoted and c == "]":
            break
        if not quoted and c == "-":
            if not spans or i >= len(expr):
                raise RegexpError("malformed '[]': - without a range start")
            hi = expr[i]
            if hi == "\\" and i + 1 < len(expr):
                hi = expr[i + 1]
                i += 2
            elif hi == "]":
                raise RegexpError("malformed '[]': - without a range end")
            else:
                i += 1
            spans[-1] = (spans[-1][0], hi)
            continue
        spans.append((c, c))
    # A reversed range matches nothing in Plan 9; Python would refuse it.
    body = "".join(_class_char(lo) if lo == hi else f"{_class_char(lo)}-{_class_char(hi)}"
                   for lo, hi in spans if lo <= hi)
    if negated:
        return f"[^\\n{body}]", i
    return (f"[{body}]" if body else "(?!)"), i


def translate(expr: str) -> str:
    """The Python pattern that matches what the Plan 9 expression matches."""
    out: list[str] = []
    atom: int | None = None  # index in out where the last operand starts
    after_closure = False
    groups: list[int] = []
    i = 0
    while i < len(expr):
        c = expr[i]
        i += 1
        if c in _CLOSURES:
            if atom is None:
                raise RegexpError(f"missing operand for {c}")
            if after_closure:
                out[atom:] = ["(?:" + "".join(out[atom:]) + ")"]
            out.append(c)
            after_closure = True
            continue
        after_closure = False
        if c == "\\":
            if i >= len(expr):
                raise RegexpError("trailing \\")
            atom = len(out)
            out.append(_literal(expr[i]))
            i += 1
        elif c == "[":
            atom = len(out)
            text, i = _translate_class(expr, i)
            out.append(text)
        elif c == "(":
            groups.append(len(out))
            out.append("(")
            atom = None
        elif c == ")":
            if not groups:
                raise RegexpError("unmatched right paren")
            atom = groups.pop()
            out.append(")")
        elif c == "|":
            out.append("|")
            atom = None
        elif c in ".^$":
            atom = len(out)
            out.append(c)
        else:
            atom = len(out)
            out.append(_literal(c))
    if groups:
        raise RegexpError("unmatched left paren")
    return "".join(out)


def compile_regexp(expr: str) -> re.Pattern[str]:
    """Compile a Plan 9 regular expression; raise RegexpError with the reason."""
    pattern = translate(expr)
    try:
        return re.compile(pattern, re.MULTILINE)
    except re.error as e:
        raise RegexpError(str(e)) from None
