"""agentfs's one departure from Plan 9's routing: a dst that names no port is an address."""

from __future__ import annotations

import pytest

from plumber import Message, NoRoute, parse_rules, route

RULES = parse_rules(
    "dst matches 'npub1[02-9ac-hj-np-z]+'\nplumb to nostr\n\n"
    "dst matches 'https?://.+'\nplumb to http\n\n"
    "plumb to notes\n")
NPUB = "npub1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqsgeuxj"


def message(dst: str) -> Message:
    return Message(src="npub1sender", dst=dst, wdir="", type="text", attr={}, data="hi")


def test_plan9_skips_rule_sets_of_other_ports_for_an_unknown_dst() -> None:
    with pytest.raises(NoRoute):
        route(RULES, message(NPUB))


@pytest.mark.parametrize(("dst", "port"), [(NPUB, "nostr"), ("https://x.example/h", "http")])
def test_an_address_goes_to_the_port_of_the_rule_set_that_matches(dst: str, port: str) -> None:
    decision = route(RULES, message(dst), addresses=True)
    assert decision.port == port
    assert decision.message.dst == dst  # the driver learns where it goes


def test_a_dst_that_names_a_port_is_still_a_port() -> None:
    decision = route(RULES, message("notes"), addresses=True)
    assert decision.port == "notes"


def test_an_address_no_rule_matches_has_no_route() -> None:
    with pytest.raises(NoRoute):
        route(RULES, message("mailto:someone"), addresses=True)
