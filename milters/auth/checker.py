"""One message through SPF, DKIM, ARC and DMARC, and what the policy makes of the results:
the Authentication-Results header, forged ones removed, and tag, quarantine, reject or
tempfail. Plain logic over the message model; milter.py is the pymilter side."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from typing import Callable

from milters.core.dns import Resolver
from milters.core.edits import AddHeader, ChangeHeader, Edit, EomResult, Quarantine
from milters.core.errors import StoreError
from milters.core.eventlog import log_event
from milters.core.message import Message
from milters.core.policy.document import Policy
from milters.core.store.base import Store
from milters.core.verdict import SmtpReply, Verdict

from . import dmarc as dmarc_mod
from . import reports
from .dmarc import DmarcResult
from .decision import Decision, decide
from .body_hash import SignedParts
from .dkim_check import ArcResult, TxtLookup, signed_parts, verify_arc, verify_dkim
from .results_header import HEADER, AuthResults, compose, forged_indexes
from .settings import MILTER, AuthSettings
from .spf import SpfLookup, SpfResult, check_helo, check_spf, resolver_lookup

# Several author domains (RFC 7489 6.6.1): the strictest outcome wins. A reject is final; a
# tempfail comes before a quarantine, as the retry may still end in a reject.
_SEVERITY = ("tag", "quarantine", "tempfail", "reject")
_DMARC_WORST_FIRST = ("fail", "permerror", "temperror", "none", "pass")


def _strictness(outcome: "Outcome") -> tuple[int, int]:
    """The action first, then the DMARC result (fail before permerror ... before pass)."""
    result = outcome.dmarc.result if outcome.dmarc else "none"
    return (_SEVERITY.index(outcome.action),
            -(_DMARC_WORST_FIRST.index(result) if result in _DMARC_WORST_FIRST else 9))


@dataclass
class Outcome:
    results: AuthResults | None
    action: str  # what we did: skip, tag, quarantine, reject, tempfail
    reason: str = ""
    reply: SmtpReply | None = None  # for a reject other than the DMARC one
    dmarc: DmarcResult | None = None  # the author domain's result that decided


class AuthChecker:
    """Shared by every session of the milter process (its DNS cache is the point)."""

    def __init__(self, hostname: str, resolver: Resolver,
                 sample: Callable[[], float] = random.random,
                 store: Store | None = None) -> None:
        self.hostname = hostname
        self.store = store  # where DMARC evaluations are tallied, when the policy says so
        self.resolver = resolver
        self.spf_lookup: SpfLookup = resolver_lookup(resolver)
        self.txt_lookup: TxtLookup = resolver.txt
        self.sample = sample

    def check(self, message: Message, policy: Policy,
              signed: SignedParts | None = None) -> EomResult:
        """`signed`: the header section and body hashes the milter made as the body came
        (message.raw then has no body); without it they are made from message.raw."""
        settings: AuthSettings = policy.sections[MILTER]
        authserv_id = self.hostname  # gateway.hostname: the id later milters trust
        headers = message.raw_headers()
        # Highest first: each removal shifts the positions of the ones below it.
        edits: list[Edit] = [ChangeHeader(HEADER, index, "")
                             for index in reversed(forged_indexes(headers, authserv_id))]
        decision = decide(policy, message)
        if decision.action == "skip":
            self._log(message, None, "skip", decision.why, len(edits))
            return EomResult(Verdict.cont(), edits)
        results = self.evaluate(message, settings, [v for n, v in headers if n.lower() == "from"],
                                signed)
        outcome = self.act(results, settings, decision)
        results = outcome.results = replace(results, dmarc=outcome.dmarc)
        message.results[MILTER] = results
        edits.append(AddHeader(HEADER, compose(authserv_id, results), index=0))
        if settings.record_results and self.store is not None:
            self._record(results, message, outcome.action, settings)
        self._log(message, results, outcome.action, decision.why, len(edits) - 1,
                  outcome.reason)
        if outcome.action == "reject":
            return EomResult(Verdict.reject(outcome.reply or settings.reject_reply,
                                            reason=outcome.reason), edits)
        if outcome.action == "tempfail":
            return EomResult(Verdict.tempfail(settings.temperror_reply, reason=outcome.reason),
                             edits)
        if outcome.action == "quarantine":
            edits.append(Quarantine(f"DMARC: {outcome.reason}"))
        return EomResult(Verdict.cont(), edits)

    def evaluate(self, message: Message, settings: AuthSettings,
                 from_values: list[str], signed: SignedParts | None = None) -> AuthResults:
        env = message.envelope
        spf: SpfResult | None
        helo: SpfResult | None = None
        mail_from = env.mail_from or ""
        if env.client_ip is None or env.client_address is None:
            spf = SpfResult("none", "mailfrom" if mail_from else "helo",
                            mail_from.rpartition("@")[2] if mail_from else env.helo or "",
                            "no client IP address")
        else:
            spf = check_spf(env.client_ip, mail_from, env.helo or "", self.spf_lookup,
                            settings.spf, receiver=self.hostname)
            if settings.check_helo and mail_from and env.helo:
                helo = check_helo(env.client_ip, env.helo, self.spf_lookup, settings.spf,
                                  receiver=self.hostname)
        if signed is None:  # hashed once for DKIM and ARC
            signed = signed_parts(message.raw, settings.max_signatures)
        dkim = verify_dkim(signed, self.txt_lookup, settings.dkim, settings.max_signatures)
        arc = (verify_arc(signed, self.txt_lookup, settings.dkim)
               if any(name.lower() == "arc-seal" for name, _ in message.raw_headers())
               else ArcResult("none"))
        each = tuple(dmarc_mod.evaluate(author, spf, dkim, self.txt_lookup, self.sample)
                     for author in dmarc_mod.author_domains(from_values))
        # act() picks the one that decides; until then, the first.
        return AuthResults(spf, helo, dkim, arc, each[0], each if len(each) > 1 else ())

    def act(self, results: AuthResults, settings: AuthSettings, decision: Decision) -> Outcome:
        """What the DMARC results ask for; with several author domains (RFC 7489 6.6.1),
        each is judged on its own and the strictest outcome is taken."""
        outcomes = []
        for d in results.dmarc_results:
            outcome = self._outcome(d, results, settings, decision)
            outcome.dmarc = d
            outcomes.append(outcome)
        if not outcomes:
            return Outcome(results, "tag", "dmarc=none")
        worst = max(outcomes, key=_strictness)
        if len(outcomes) > 1:
            worst.reason += f" (strictest of {len(outcomes)} author domains)"
        return worst

    def _outcome(self, d: DmarcResult, results: AuthResults, settings: AuthSettings,
                 decision: Decision) -> Outcome:
        if d.result in ("pass", "none"):
            return Outcome(results, "tag", f"dmarc={d.result}")
        if decision.action == "tag":
            return Outcome(results, "tag", f"dmarc={d.result}, policy says tag only")
        if d.result == "temperror":
            action = "tempfail" if settings.on_temperror == "tempfail" else "tag"
            return Outcome(results, action, f"dmarc=temperror: {d.reason}")
        if d.result == "permerror":
            if d.domain:  # a broken DMARC record: the domain's problem, not a verdict
                return Outcome(results, "tag", f"dmarc=permerror: {d.reason}")
            return Outcome(results, "reject" if settings.on_bad_from == "reject" else "tag",
                           f"bad From: {d.reason}", settings.bad_from_reply)
        arc = results.arc
        if arc is not None and arc.result == "pass" and arc.sealers \
                and arc.sealers[0] in settings.trusted_arc_sealers:
            # RFC 7489 7.2 local policy: a forwarder we trust vouches for the original.
            return Outcome(results, "tag", f"dmarc=fail overridden: ARC sealed by trusted "
                                           f"{arc.sealers[0]}")
        disposition = d.disposition if settings.honour_pct else d.policy
        action = settings.actions_for(d.domain).for_disposition(disposition)
        return Outcome(results, action, f"dmarc=fail p={d.policy} dis={disposition} "
                                        f"from={d.domain}")

    def _record(self, results: AuthResults, message: Message, action: str,
                settings: AuthSettings) -> None:
        env = message.envelope
        disposition = {"reject": "reject", "quarantine": "quarantine"}.get(action, "none")
        row = reports.row_for(results, env.client_ip or "", disposition,
                              (env.mail_from or "").rpartition("@")[2].lower())
        if row is None:
            return
        try:
            reports.record(self.store, row, settings.keep_results)  # type: ignore[arg-type]
        except StoreError as exc:  # a report tally never stops mail
            log_event("store_unavailable", level=logging.WARNING, milter=MILTER,
                      stage="eom", error=str(exc), queue_id=env.queue_id)

    def _log(self, message: Message, results: AuthResults | None, action: str, why: str,
             removed: int, reason: str = "") -> None:
        env = message.envelope
        fields: dict[str, object] = {"queue_id": env.queue_id, "ip": env.client_ip,
                                     "action": action, "decided_by": why}
        if results is not None:
            fields["spf"] = results.spf.result if results.spf else None
            fields["dkim"] = ",".join(f"{s.result}:{s.domain}" for s in results.dkim) or "none"
            fields["arc"] = results.arc.result if results.arc else None
            fields["dmarc"] = results.dmarc.result if results.dmarc else None
            fields["from_domain"] = results.dmarc.domain if results.dmarc else None
            if results.dmarc_each:  # several authors: each domain's verdict
                fields["dmarc_each"] = ",".join(f"{d.result}:{d.domain or '(none)'}"
                                                for d in results.dmarc_each)
        if removed:
            fields["forged_removed"] = removed
        if reason:
            fields["reason"] = reason
        log_event("auth", **fields)
