"""Who may claim what: the policy checked once, when a function is set up.

The policy is a TOML file (``/etc/arrakis/policy.toml`` unless ``--policy`` says otherwise)
of rules tried in order; the first rule that matches the caller's uid, the protocol and
the port decides::

    [[rule]]
    uid = 1000            # a uid, or "*" for anyone
    proto = "udp"         # "udp", "tcp" or "*"
    ports = "5000-5999"   # one port, a range, or "*"
    allow = true

With no file, the rule Linux applies to its own sockets: root may claim any port, other
users only ports from 1024 up.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_POLICY_PATH = Path("/etc/arrakis/policy.toml")
PROTOCOLS = ("udp", "tcp")


class PolicyError(Exception):
    """The policy file is malformed."""


@dataclass(frozen=True)
class Rule:
    uid: int | None  # None: anyone
    proto: str | None  # None: any protocol
    first_port: int
    last_port: int
    allow: bool

    def matches(self, uid: int, proto: str, port: int) -> bool:
        return (
            (self.uid is None or self.uid == uid)
            and (self.proto is None or self.proto == proto)
            and self.first_port <= port <= self.last_port
        )


DEFAULT_RULES = (
    Rule(uid=0, proto=None, first_port=1, last_port=65535, allow=True),
    Rule(uid=None, proto=None, first_port=1024, last_port=65535, allow=True),
)


def _parse_ports(value: object) -> tuple[int, int]:
    if value == "*":
        return 1, 65535
    if isinstance(value, int):
        first = last = value
    elif isinstance(value, str) and "-" in value:
        low, _, high = value.partition("-")
        try:
            first, last = int(low), int(high)
        except ValueError:
            raise PolicyError(f"bad port range {value!r}") from None
    elif isinstance(value, str):
        try:
            first = last = int(value)
        except ValueError:
            raise PolicyError(f"bad port {value!r}") from None
    else:
        raise PolicyError(f"bad ports {value!r}")
    if not 1 <= first <= last <= 65535:
        raise PolicyError(f"bad port range {value!r}")
    return first, last


def parse_rules(text: str) -> tuple[Rule, ...]:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy is not valid TOML: {exc}") from None
    rules = document.get("rule", [])
    if not isinstance(rules, list):
        raise PolicyError("'rule' must be an array of tables ([[rule]])")
    parsed = []
    for number, rule in enumerate(rules, 1):
        if not isinstance(rule, dict):
            raise PolicyError(f"rule {number} is not a table")
        unknown = set(rule) - {"uid", "proto", "ports", "allow"}
        if unknown:
            raise PolicyError(f"rule {number}: unknown keys {sorted(unknown)}")
        uid = rule.get("uid", "*")
        if uid != "*" and (not isinstance(uid, int) or isinstance(uid, bool) or uid < 0):
            raise PolicyError(f"rule {number}: uid must be a number or '*'")
        proto = rule.get("proto", "*")
        if proto != "*" and proto not in PROTOCOLS:
            raise PolicyError(f"rule {number}: proto must be one of {PROTOCOLS} or '*'")
        allow = rule.get("allow", True)
        if not isinstance(allow, bool):
            raise PolicyError(f"rule {number}: allow must be true or false")
        first, last = _parse_ports(rule.get("ports", "*"))
        parsed.append(
            Rule(
                uid=None if uid == "*" else int(uid),
                proto=None if proto == "*" else str(proto),
                first_port=first,
                last_port=last,
                allow=allow,
            )
        )
    return tuple(parsed)


class Policy:
    def __init__(self, rules: tuple[Rule, ...] = DEFAULT_RULES, source: str = "built-in") -> None:
        self.rules = rules
        self.source = source

    @classmethod
    def load(cls, path: Path | None) -> Policy:
        if path is None:
            path = DEFAULT_POLICY_PATH
            if not path.exists():
                return cls()
        return cls(parse_rules(path.read_text()), str(path))

    def allows(self, uid: int, proto: str, port: int) -> bool:
        for rule in self.rules:
            if rule.matches(uid, proto, port):
                return rule.allow
        return False
