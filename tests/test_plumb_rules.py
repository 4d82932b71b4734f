"""The plumb rules parser: objects, verbs, quoting, variables, include, errors by line."""

from __future__ import annotations

from pathlib import Path

import pytest

from plumber import RulesError, parse_rules
from plumber.regexp import RegexpError, compile_regexp
from plumber.rules import LEGAL_OBJECTS, OBJECTS, VERBS


def test_ruleset_patterns_and_actions() -> None:
    rules = parse_rules("type is text\ndata matches 'a+'\nplumb to edit\nplumb client acme\n")
    (rs,) = rules.rulesets
    assert [(r.obj, r.verb, r.qarg) for r in rs.patterns] == [
        ("type", "is", "text"), ("data", "matches", "a+")]
    assert rs.port == "edit"
    assert rs.command is not None and rs.command.verb == "client"
    assert rules.ports == ("edit",)
    assert rs.lineno == 1


def test_blank_lines_and_comments_separate_rulesets() -> None:
    text = ("# leading comment\n\n\ntype is text\nplumb to a\n\n\n"
            "type is x\nplumb to b\n   # indented comment ends a set too\n"
            "type is y\nplumb to c\n")
    rules = parse_rules(text)
    assert [rs.port for rs in rules.rulesets] == ["a", "b", "c"]
    assert [rs.lineno for rs in rules.rulesets] == [4, 8, 11]


def test_hash_inside_a_line_is_text() -> None:
    (rs,) = parse_rules("data matches 'a#b'\nattr add addr=#0\nplumb to edit\n").rulesets
    assert rs.patterns[0].qarg == "a#b"
    assert rs.patterns[1].qarg == "addr=#0"


def test_port_declarations() -> None:
    rules = parse_rules("plumb to seemail\nplumb to showmail\n\ntype is text\nplumb to edit\n")
    assert rules.ports == ("seemail", "showmail", "edit")
    assert len(rules.rulesets) == 1


@pytest.mark.parametrize("verb", sorted(LEGAL_OBJECTS))
def test_every_legal_object_verb_pair_parses(verb: str) -> None:
    arg = {"add": "k=v", "matches": "[a-z]+"}.get(verb, "x")
    for obj in sorted(LEGAL_OBJECTS[verb]):
        if obj == "plumb":
            text = f"type is text\nplumb {verb} {arg}\n" + ("plumb to p\n" if verb != "to" else "")
        else:
            text = f"{obj} {verb} {arg}\nplumb start cmd\n"
        (rs,) = parse_rules(text).rulesets
        rule = (*rs.patterns, *rs.actions)[0 if obj != "plumb" else 1]
        assert (rule.obj, rule.verb) == (obj, verb)


@pytest.mark.parametrize("verb", VERBS)
def test_illegal_object_verb_pairs_are_errors(verb: str) -> None:
    for obj in OBJECTS:
        if obj in LEGAL_OBJECTS[verb]:
            continue
        with pytest.raises(RulesError) as e:
            parse_rules(f"type is text\n{obj} {verb} x\nplumb to p\n")
        assert e.value.lineno == 2
        assert f"{verb} not valid verb for object {obj}" in e.value.message


def test_kind_is_a_synonym_for_type() -> None:
    (rs,) = parse_rules("kind is text\nplumb to p\n").rulesets
    assert rs.patterns[0].obj == "type"


def test_quoting() -> None:
    text = ("data is 'a b'\nsrc is it''s\nwdir is 'don''t'\ntype is 'x'y'z'\n"
            "dst is ''\nplumb start cmd 'two words' '$notvar' x''y\nplumb to p\n")
    (rs,) = parse_rules(text).rulesets
    assert [r.qarg for r in rs.patterns] == ["a b", "its", "don't", "xyz", ""]
    assert rs.command is not None
    assert rs.command.qarg == "cmd two words $notvar xy"


def test_backslash_reaches_the_regexp() -> None:
    (rs,) = parse_rules(r"data matches '[a-z\-]+\.c'" + "\nplumb to p\n").rulesets
    assert rs.patterns[0].qarg == r"[a-z\-]+\.c"


def test_variables_expand_when_read() -> None:
    text = ("editor = acme\nsuffix='\\.(c|h)'\nboth=$editor-x\n\n"
            "data matches '[a-z]+'$suffix\ndata is $editor\nsrc is $unknown\n"
            "wdir is $0\nplumb client $editor $file\nplumb to edit\n")
    rules = parse_rules(text)
    assert rules.variables == {"editor": "acme", "suffix": "\\.(c|h)", "both": "acme-x"}
    (rs,) = rules.rulesets
    assert [r.qarg for r in rs.patterns] == ["[a-z]+\\.(c|h)", "acme", "$unknown", "$0"]
    assert rs.command is not None and rs.command.arg == "$editor $file"


def test_assignment_ends_a_ruleset_and_last_value_wins() -> None:
    rules = parse_rules("type is text\nplumb to a\nx=1\ntype is y\nplumb to b\nx=2\n")
    assert len(rules.rulesets) == 2
    assert rules.variables == {"x": "2"}


def test_assignment_takes_the_first_word() -> None:
    assert parse_rules("v='a b'\n").variables == {"v": "a b"}
    assert parse_rules("v=a # note\n").variables == {"v": "a"}
    with pytest.raises(RulesError) as e:
        parse_rules("\nv=a b\n")
    assert e.value.lineno == 2


def test_trailing_comment_after_single_word() -> None:
    (rs,) = parse_rules("type is text # only text\nplumb to edit # the editor\n").rulesets
    assert rs.port == "edit"
    assert rs.patterns[0].qarg == "text"


def test_include(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "basic").write_text("include sub/more # note\n\ntype is text\nplumb to b\n")
    (tmp_path / "sub" / "more").write_text("plumb to declared\n")
    rules = parse_rules("v=1\ninclude basic\n\ntype is x\nplumb to c\n", include_dir=tmp_path)
    assert rules.ports == ("declared", "b", "c")


def test_include_is_text_substitution(tmp_path: Path) -> None:
    (tmp_path / "head").write_text("type is text\n")
    (rs,) = parse_rules("include head\nplumb to edit\n", include_dir=tmp_path).rulesets
    assert rs.patterns[0].file == "head" and rs.actions[0].file is None


def test_include_errors(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("\ninclude b\n")
    (tmp_path / "b").write_text("include a\n")
    (tmp_path / "bad").write_text("type is text\nplumb to p\n\nfoo is x\n")
    cases = [
        ("\n\ninclude a\n", 1, "b", "include loop"),
        ("include bad\n", 4, "bad", "unknown object foo"),
        ("x=1\ninclude missing\n", 2, None, "can't open missing"),
        ("include\n", 1, None, "malformed include"),
        ("include a b\n", 1, None, "malformed include"),
        ("include #a\n", 1, None, "malformed include"),
        ("include ../escape\n", 1, None, "outside the include directory"),
        ("include /etc/passwd\n", 1, None, "must be relative"),
    ]
    for text, lineno, file, message in cases:
        with pytest.raises(RulesError) as e:
            parse_rules(text, include_dir=tmp_path)
        assert (e.value.lineno, e.value.file) == (lineno, file), text
        assert message in e.value.message, text
    with pytest.raises(RulesError, match="no include directory"):
        parse_rules("include a\n")


def test_include_depth(tmp_path: Path) -> None:
    for i in range(12):
        (tmp_path / f"f{i}").write_text(f"include f{i + 1}\n")
    (tmp_path / "f12").write_text("")
    with pytest.raises(RulesError, match="too deep"):
        parse_rules("include f0\n", include_dir=tmp_path)


SYNTAX_ERRORS = [
    ("type is text\nplumb to p\n\ntype\n", 4, "malformed rule"),
    ("type is\n", 1, "malformed rule"),
    ("type is   \n", 1, "malformed rule"),
    ("\nfoo is x\nplumb to p\n", 2, "unknown object foo"),
    ("type foo x\n", 1, "unknown verb foo"),
    ("\n\ndata matches '(a'\nplumb to p\n", 3, "bad regular expression"),
    ("data matches '[a-'\nplumb to p\n", 1, "bad regular expression"),
    ("data matches 'a\nplumb to p\n", 1, "unterminated quoted string"),
    ("type is text\nplumb start rc -c 'echo\n", 2, "unterminated quoted string"),
    ("type is text\ndata is a b\nplumb to p\n", 2, "after argument"),
    ("type is text\nplumb to a\nplumb to b\n", 3, "too many ports"),
    ("type is text\nplumb to send\n", 2, "illegal port name"),
    ("type is text\nplumb to ..\n", 2, "illegal port name"),
    ("type is text\nplumb to a/b\n", 2, "illegal port name"),
    ("type is text\nplumb start a\nplumb client b\n", 3, "more than one client or start"),
    ("\ntype is text\ndata is x\n", 2, "must have patterns and actions"),
    ("\n\nplumb to a\nplumb start x\n", 3, "must have patterns and actions"),
    ("type is text\nattr add novalue\nplumb to p\n", 2, "not name=value"),
    ("type is text\nattr add =v\nplumb to p\n", 2, "not name=value"),
]


@pytest.mark.parametrize(("text", "lineno", "message"), SYNTAX_ERRORS)
def test_syntax_errors_name_the_line(text: str, lineno: int, message: str) -> None:
    with pytest.raises(RulesError) as e:
        parse_rules(text)
    assert e.value.lineno == lineno
    assert message in e.value.message
    assert str(e.value).startswith(f"line {lineno}: ")


def test_regexp_translation() -> None:
    assert compile_regexp("a{2}").fullmatch("a{2}")
    assert compile_regexp(r"\d").fullmatch("d")
    assert not compile_regexp("[^a]").fullmatch("\n")
    assert not compile_regexp(".").fullmatch("\n")
    assert compile_regexp("a**").fullmatch("aaa")
    assert compile_regexp("a*?").fullmatch("aaa")
    assert compile_regexp("[z-a]|b").fullmatch("b")
    assert compile_regexp(r"[\]\-\^]+").fullmatch("]-^")
    assert compile_regexp("[¡-￿]+").fullmatch("héllo"[1:2])
    for bad in ("(a", "a)", "*a", "(?:a)", "[a", "[-a]", "[a-]", "a\\"):
        with pytest.raises(RegexpError):
            compile_regexp(bad)
