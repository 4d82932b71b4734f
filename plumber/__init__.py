"""The plumber: Plan 9's plumbing rules language, its messages, and routing by rules."""

from plumber.match import NoRoute, Route, route
from plumber.message import Message, MessageError
from plumber.rules import Rules, RulesError, RuleSet, parse_rules

__all__ = [
    "Message",
    "MessageError",
    "NoRoute",
    "Route",
    "RuleSet",
    "Rules",
    "RulesError",
    "parse_rules",
    "route",
]
