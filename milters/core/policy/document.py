"""The policy document: top-level layout, the sections each milter contributes, and loading.

Core knows no milter by name. Each milter describes its part of the policy as a
PolicyExtension (its settings section, the action its rules may set, the expectations its
`tests:` may state and how to run them); the command line passes the extensions in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..auth_results import POLICY_METHODS
from ..errors import ConfigError
from ..message import Envelope, Recipient
from .matching import NetworkPattern, parse_network_pattern
from .rules import CONDITIONS, Conditions, CountRange, Decision, Facts, Rule, SizeRange, decide
from .schema import (Address, Bool, Field, GroupName, ListOf, MapOf, Network, Number, Pattern,
                     Size, Spec, Str, Struct)
from .yamlnodes import MappingNode, Node, Problems, compose_file, compose_text

LOOPBACK = (parse_network_pattern("127.0.0.0/8"), parse_network_pattern("::1/128"))


@dataclass(frozen=True)
class TestMessage:
    client_ip: str = "192.0.2.1"
    client_name: str = "unknown"
    helo: str = "client.example"
    mail_from: str = ""
    rcpt: tuple[str, ...] = ()
    auth_user: str | None = None
    subject: str = ""
    auth: dict[str, str] | None = None  # what our auth milter found: {"dmarc": "fail"}
    attachments: tuple[str, ...] = ()  # its attachments' file names
    size: int = 10240  # its bytes

    def envelope(self) -> Envelope:
        """The test message's envelope, as a milter would have it at end of message."""
        return Envelope(client_ip=self.client_ip, client_name=self.client_name,
                        helo=self.helo, mail_from=self.mail_from, auth_user=self.auth_user,
                        recipients=[Recipient(r) for r in self.rcpt])


@dataclass(frozen=True)
class PolicyTest:
    name: str
    message: TestMessage
    repeat: int
    expect: dict[str, Any]
    line: int


@dataclass
class Policy:
    source: str
    internal_networks: tuple[NetworkPattern, ...]
    sections: dict[str, Any]
    rules: list[Rule]
    defaults: dict[str, Any]
    tests: list[PolicyTest] = field(default_factory=list)
    # Recipient domains that are ours (subdomains included): the others are outside.
    own_domains: tuple[str, ...] = ()

    def decide(self, milter: str, facts: Facts) -> Decision:
        return decide(self.rules, self.defaults, milter, facts, self.own_domains)


@dataclass(frozen=True)
class PolicyExtension:
    """What one milter adds to the policy language."""

    name: str
    settings: Struct
    action: Spec
    default_action: Any
    expect: Spec
    # Runs one `tests:` case; returns the list of failed expectations ('' when none).
    run_test: Callable[[Policy, PolicyTest, Any], list[str]]
    # Conditions a rule setting this milter's action may not use -> why (shown as the fix):
    # the milter decides before that fact exists.
    unusable_conditions: dict[str, str] = field(default_factory=dict)
    # A problem with one action in its policy (a rule's or the default's), or None: e.g. an
    # action that needs settings the policy does not have.
    action_check: Callable[[Policy, Any], str | None] | None = None
    # Lines for `mailmoat policy explain`: what this milter would do with such a message
    # (envelope, decoded subject, and auth results as method -> result when given).
    explain: Callable[[Policy, Envelope, str, dict[str, str] | None], list[str]] | None = None
    # The same from the whole described message (attachments, size: `policy explain
    # --attachment/--size`), for milters whose rules read the content; used over `explain`.
    explain_message: Callable[[Policy, "TestMessage"], list[str]] | None = None


def decision_failures(milter: str, action: Any, decided_by: str, expected: Any) -> list[str]:
    """The failed `action:` and `rule:` expectations of a `tests:` case (the shared part of
    every milter's test runner); `expected` has `action` and `rule`, None = not stated."""
    failures = []
    if expected.action is not None and action != expected.action:
        failures.append(f"{milter} action is {action} (by {decided_by}), expected "
                        f"{expected.action}")
    if expected.rule is not None and decided_by != expected.rule:
        failures.append(f"{milter} was decided by {decided_by}, expected {expected.rule}")
    return failures


# internal_domains was parsed and never read. Its only meaning a gateway could act on is
# forgeable: any client can write MAIL FROM:<x@example.jp>, so a sender domain must never make
# mail "ours" (outbound, exempt, skipped). What is safe is already said in rules, where
# `policy explain` shows it: recipients (`recipient: ["@example.jp"]`) or our own domain
# claimed from outside (`when: {direction: inbound, sender: ["@example.jp"]}`).
REMOVED_KEYS = {"internal_domains": (
    "internal_domains is not a setting: a sender's domain is forged at will, so it never "
    "makes mail internal. Direction comes from internal_networks and SMTP AUTH; name your "
    "domains in a rule instead, e.g. when: {recipient: [\"@example.jp\"]} or, for mail "
    "claiming your domain from outside, when: {direction: inbound, sender: "
    "[\"@example.jp\"]}; delete this key")}

# The results RFC 8601 registers for the methods our auth milter writes.
AUTH_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror",
                "policy")
# spf is the MAIL FROM result (RFC 7489's use), spf_helo the HELO check on its own.
AUTH_METHODS = POLICY_METHODS


def _conditions_spec() -> Struct:
    return Struct({
        "direction": Field(Str(("inbound", "outbound")), None,
                           doc="inbound or outbound: outbound is mail from internal_networks or "
                               "an SMTP-authenticated user."),
        "client_ip": Field(ListOf(Network(), min_items=1), None,
                           doc="Client addresses as IPs or CIDRs; ! excludes."),
        "sender": Field(ListOf(Address(), min_items=1), None,
                        doc="Envelope senders as patterns: user@example.jp, @example.jp (and "
                            "subdomains), !excludes, *."),
        "recipient": Field(ListOf(Address(), min_items=1), None,
                           doc="Envelope recipients, the same patterns as sender."),
        "authenticated": Field(Bool(), None, doc="Whether the client logged in with SMTP AUTH."),
        "auth": Field(MapOf(Str(AUTH_METHODS), ListOf(Str(AUTH_RESULTS), min_items=1),
                            "a mapping of method to results, e.g. {dmarc: [fail, none]}"),
                      None,
                      doc="What the auth milter found, for milters after it: method to results, "
                          "e.g. {dmarc: [fail, none]}; a method not checked reads as none."),
        "subject": Field(ListOf(Pattern(), min_items=1), None,
                         doc="Regular expressions searched in the decoded Subject, "
                             "case-insensitively."),
        "outside_recipients": Field(Bool(), None,
                                    doc="true: some recipient is outside own_domains; false: "
                                        "every recipient is inside."),
        "outside_domains": Field(Struct({
            "min": Field(Number(0, 10000, integer=True), None, doc="At least this many."),
            "max": Field(Number(0, 10000, integer=True), None, doc="At most this many."),
        }, build=_count_range, expected="a count like {min: 2} or {min: 1, max: 3}"), None,
            doc="How many distinct recipient domains outside own_domains, e.g. {min: 2}."),
        "attachments": Field(Bool(), None,
                             doc="Whether the message has attachments (known at end of "
                                 "message: review, attachments, neutralize)."),
        "size": Field(Struct({
            "over": Field(Size(), None, doc="More bytes than this (10MB = 10 x 1024 x 1024)."),
            "under": Field(Size(), None, doc="Fewer bytes than this."),
        }, build=_size_range, expected="a size range like {over: 10MB}"), None,
            doc="The message's size, e.g. {over: 10MB} (known at end of message)."),
        "sender_groups": Field(ListOf(GroupName(), min_items=1), None,
                               doc="The sender's groups in the directory (console.ldap): "
                                   "group DNs or cn names; any one matches. Read by the review "
                                   "milter; elsewhere never matches (needs LDAP)."),
    }, build=lambda **kw: Conditions(**{k: _frozen(v) for k, v in kw.items()}),
        expected="a mapping of conditions (" + ", ".join(CONDITIONS) + ")")


def _count_range(min: int | None, max: int | None) -> CountRange:  # noqa: A002 -- YAML keys
    if min is None and max is None:
        raise ValueError("name min, max or both, e.g. {min: 2}")
    if min is not None and max is not None and min > max:
        raise ValueError(f"min {min} is above max {max}: no count can match")
    return CountRange(min, max)


def _size_range(over: int | None, under: int | None) -> SizeRange:
    if over is None and under is None:
        raise ValueError("name over, under or both, e.g. {over: 10MB}")
    if over is not None and under is not None and over >= under:
        raise ValueError(f"over {over} is not below under {under}: no size can match")
    return SizeRange(over, under)


def _own_domain(text: str) -> str:
    domain = text.strip().lstrip("@").rstrip(".").lower()
    if not domain or "@" in domain or any(c.isspace() or ord(c) < 32 for c in domain) \
            or "." not in domain or domain.startswith("."):
        raise ValueError("expected a mail domain like example.jp (subdomains are included)")
    return domain


class _Domain(Str):
    expected = "a mail domain like example.jp"

    def parse(self, text: str) -> str:
        return _own_domain(super().parse(text))


def _frozen(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        return {key: tuple(items) for key, items in value.items()}
    return value


def _build_spec(extensions: list[PolicyExtension]) -> Struct:
    actions = Struct({ext.name: Field(ext.action, None, doc=f"The {ext.name} milter's action.")
                      for ext in extensions},
                     build=lambda **kw: {k: v for k, v in kw.items() if v is not None},
                     expected="a mapping of milter actions")
    rule = Struct({
        "name": Field(Str(max_len=100),
                      doc="The rule's name, shown by policy explain, logs and tests; unique."),
        "when": Field(_conditions_spec(), factory=Conditions,
                      doc="Conditions; all must hold. No conditions: the rule matches every "
                          "message."),
        "then": Field(actions,
                      doc="The action per milter; a milter not named here goes on to the next "
                          "rule."),
    }, build=Rule, pass_line=True)
    message = Struct({
        "client_ip": Field(Str(), "192.0.2.1", doc="The test message's client address."),
        "mail_from": Field(Str(), "", doc="Its envelope sender."),
        "rcpt": Field(ListOf(Str(), min_items=1), doc="Its envelope recipients."),
        "auth_user": Field(Str(), None, doc="The SMTP AUTH user, if it logged in."),
        "subject": Field(Str(), "", doc="Its Subject."),
        "auth": Field(MapOf(Str(AUTH_METHODS), Str(AUTH_RESULTS),
                            "a mapping of method to result, e.g. {dmarc: fail, spf: pass}"),
                      None, doc="Auth results it carries, for rules with `when: {auth: ...}`."),
        "attachments": Field(ListOf(Str(max_len=255)), (),
                             doc="Its attachments' file names, for rules with `when: "
                                 "{attachments: ...}`."),
        "size": Field(Size(), 10240, doc="Its size, e.g. 12MB, for rules with `when: {size: "
                                         "...}`."),
    }, build=lambda **kw: TestMessage(**{**kw, "rcpt": tuple(kw["rcpt"]),
                                         "attachments": tuple(kw["attachments"])}),
        removed={key: f"a test message has no {key}: no policy condition reads it, so no "
                      "test could depend on it; delete this key" for key in ("helo",
                                                                             "client_name")})
    expect = Struct({ext.name: Field(ext.expect, None, doc=f"What {ext.name} must decide.")
                     for ext in extensions},
                    build=lambda **kw: {k: v for k, v in kw.items() if v is not None})
    test = Struct({
        "name": Field(Str(max_len=200), doc="The test's name, printed when it fails."),
        "message": Field(message, doc="The message the test describes."),
        "repeat": Field(Number(1, 10000, integer=True), 1,
                        doc="Sends the message this many times at the same instant (for rate "
                            "limits)."),
        "expect": Field(expect,
                        doc="What each milter must decide; a milter not named is not checked."),
    }, build=PolicyTest, pass_line=True)
    defaults = Struct({ext.name: Field(ext.action, ext.default_action,
                                       doc=f"The {ext.name} milter's action when no rule sets "
                                           "one.")
                       for ext in extensions})
    fields = {
        "policy_version": Field(Number(1, 1, integer=True), 1, doc="The policy format; 1."),
        "internal_networks": Field(ListOf(Network()), factory=lambda: list(LOOPBACK),
                                   doc="Clients that are ours: their mail is outbound, and "
                                       "ratelimit exempts them by default."),
        "own_domains": Field(ListOf(_Domain()), (),
                             doc="Our mail domains (subdomains included), for recipients only: "
                                 "a recipient elsewhere is outside (when: outside_recipients, "
                                 "outside_domains). Never makes a sender internal."),
        "defaults": Field(defaults, factory=lambda: {e.name: e.default_action for e in extensions},
                          doc="The action of each milter when no rule sets one."),
        "rules": Field(ListOf(rule), factory=list,
                       doc="Ordered rules; for each milter the first matching rule that sets its "
                           "action decides."),
        "tests": Field(ListOf(test), factory=list,
                       doc="Test cases run by `mailmoat policy test`."),
    }
    for ext in extensions:
        fields[ext.name] = Field(ext.settings, None)
    return Struct(fields, expected="a policy mapping", removed=REMOVED_KEYS)


def _semantic_checks(policy: Policy, root: Node | None, extensions: list[PolicyExtension],
                     problems: Problems) -> None:
    """Checks across keys that a per-value schema cannot see."""
    rule_nodes = _list_nodes(root, "rules")
    seen: dict[str, int] = {}
    for index, rule in enumerate(policy.rules):
        node = rule_nodes[index] if index < len(rule_nodes) else None
        if rule.name in seen:
            problems.add(node, f"rules[{index}].name",
                         f"duplicate rule name; rule {seen[rule.name]} already uses it", rule.name)
        seen.setdefault(rule.name, index)
        if not rule.then:
            problems.add(node, f"rules[{index}].then", "the rule sets no action, so it can never "
                         "decide anything; add an action or delete the rule")
        if (rule.when.outside_recipients is not None or rule.when.outside_domains is not None) \
                and not policy.own_domains:
            problems.add(node, f"rules[{index}].when", "outside_recipients and outside_domains "
                         "need own_domains (your mail domains, usually the gateway's "
                         "relay_domains): add e.g. own_domains: [example.jp] at the top")
        for ext in extensions:
            if ext.name not in rule.then:
                continue
            problem = ext.action_check(policy, rule.then[ext.name]) if ext.action_check else None
            if problem:
                problems.add(node, f"rules[{index}].then.{ext.name}", problem,
                             rule.then[ext.name])
            for condition, reason in ext.unusable_conditions.items():
                if getattr(rule.when, condition) is not None:
                    problems.add(node, f"rules[{index}].when.{condition}",
                                 f"a rule that sets {ext.name} cannot use '{condition}': "
                                 f"{reason}")
    for ext in extensions:
        action = policy.defaults.get(ext.name)
        problem = ext.action_check(policy, action) if ext.action_check else None
        if problem:
            problems.add(_key_node(root, "defaults"), f"defaults.{ext.name}", problem, action)
    test_nodes = _list_nodes(root, "tests")
    for index, test in enumerate(policy.tests):
        node = test_nodes[index] if index < len(test_nodes) else None
        if not test.expect:
            problems.add(node, f"tests[{index}].expect", "states no expectation, so it cannot fail")
        for name, expectation in test.expect.items():
            rule_name = getattr(expectation, "rule", None)
            # "(defaults)", "(internal)"...: deciders other than rules; a typo there
            # fails when the test runs.
            if rule_name and not rule_name.startswith("(") and rule_name not in seen:
                problems.add(node, f"tests[{index}].expect.{name}.rule",
                             "no rule has this name", rule_name)


def _key_node(root: Node | None, key: str) -> Node | None:
    if isinstance(root, MappingNode):
        for key_node, value_node in root.value:
            if key_node.value == key:
                return value_node
    return None


def _list_nodes(root: Node | None, key: str) -> list[Node]:
    if isinstance(root, MappingNode):
        for key_node, value_node in root.value:
            if key_node.value == key and hasattr(value_node, "value") \
                    and isinstance(value_node.value, list):
                return list(value_node.value)
    return []


def parse_policy(root: Node | None, source: str, extensions: list[PolicyExtension]) -> Policy:
    problems = Problems(source)
    spec = _build_spec(extensions)
    values = spec.read(root, "", problems)
    problems.raise_if_any()
    sections = {}
    for ext in extensions:
        section = values[ext.name]
        sections[ext.name] = section if section is not None else ext.settings.read(None, ext.name,
                                                                                    problems)
    problems.raise_if_any()
    policy = Policy(source=source, internal_networks=tuple(values["internal_networks"]),
                    sections=sections, own_domains=tuple(values["own_domains"]),
                    rules=values["rules"], defaults=values["defaults"], tests=values["tests"])
    _semantic_checks(policy, root, extensions, problems)
    problems.raise_if_any()
    return policy


def load_policy(path: str | Path, extensions: list[PolicyExtension]) -> Policy:
    """Load and validate a policy file; raises ConfigError listing every problem."""
    path = Path(path)
    return parse_policy(compose_file(path), str(path), extensions)


def load_policy_text(text: str, extensions: list[PolicyExtension],
                     source: str = "<policy>") -> Policy:
    return parse_policy(compose_text(text, source), source, extensions)


__all__ = ["ConfigError", "Policy", "PolicyExtension", "PolicyTest", "TestMessage",
           "decision_failures",
           "load_policy", "load_policy_text", "parse_policy"]
