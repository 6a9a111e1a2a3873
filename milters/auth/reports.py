"""DMARC aggregate reports (RFC 7489 7.2 and Appendix C): each evaluation tallied in the
Store, one counter per day and distinct row, and the XML a domain owner asks for with rua=.

A row is everything the report states about a group of messages: source IP, what we did,
the aligned DKIM and SPF verdicts, the identifiers and the raw results, and the policy the
domain published at the time. The counter key holds the row as compact JSON, so several
gateways sharing a Redis add into the same rows.
"""
from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from milters.core.store.base import Store

from .results_header import AuthResults

PREFIX = "dmarc:"
DAY = 86400


def _day(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y%m%d")


def row_for(results: AuthResults, client_ip: str, disposition: str,
            envelope_from: str) -> dict[str, Any] | None:
    """The report row of one evaluated message; None when DMARC had nothing to apply
    (no record, no From domain, a temporary error: nothing to report to anyone)."""
    d = results.dmarc
    if d is None or d.record is None or d.result not in ("pass", "fail"):
        return None
    record = d.record
    return {
        "ip": client_ip, "dis": disposition,
        "dkim": "pass" if d.dkim_aligned else "fail",
        "spf": "pass" if d.spf_aligned else "fail",
        "hf": d.domain, "ef": envelope_from,
        "ad": [[s.domain, s.selector, s.result] for s in results.dkim],
        "as": [results.spf.domain, results.spf.result] if results.spf else None,
        "pp": [record.policy, record.subdomain_policy or "", "s" if record.strict_dkim else "r",
               "s" if record.strict_spf else "r", record.percent],
        "override": "sampled_out" if d.sampled_out else "",
    }


def record(store: Store, row: dict[str, Any], keep: float, now: float | None = None) -> None:
    at = time.time() if now is None else now
    key = f"{PREFIX}{row['hf']}:{_day(at)}:{json.dumps(row, separators=(',', ':'))}"
    store.counter_add(key, 1, keep=keep, now=at)


@dataclass(frozen=True)
class Counted:
    day: str
    row: dict[str, Any]
    count: int


def counted(store: Store, domain: str, since: float, until: float) -> list[Counted]:
    """The tallies for `domain` on the days from `since` to `until` (UTC days)."""
    first, last = _day(since), _day(until)
    found = []
    for rec in store.records(f"{PREFIX}{domain.lower()}:"):
        _, _, rest = rec.key.partition(f"{PREFIX}{domain.lower()}:")
        day, _, row_text = rest.partition(":")
        if first <= day <= last:
            found.append(Counted(day, json.loads(row_text), round(rec.value)))
    return found


def _text(parent: ET.Element, tag: str, value: object) -> ET.Element:
    element = ET.SubElement(parent, tag)
    element.text = str(value)
    return element


def aggregate_xml(domain: str, rows: list[Counted], *, org_name: str, email: str,
                  since: float, until: float, report_id: str) -> bytes:
    """RFC 7489 Appendix C's feedback document; rows of different days are merged."""
    merged: dict[str, tuple[dict[str, Any], int]] = {}
    for item in rows:
        key = json.dumps(item.row, sort_keys=True)
        row, count = merged.get(key, (item.row, 0))
        merged[key] = (row, count + item.count)
    feedback = ET.Element("feedback")
    meta = ET.SubElement(feedback, "report_metadata")
    _text(meta, "org_name", org_name)
    _text(meta, "email", email)
    _text(meta, "report_id", report_id)
    span = ET.SubElement(meta, "date_range")
    _text(span, "begin", int(since))
    _text(span, "end", int(until))
    published = ET.SubElement(feedback, "policy_published")
    _text(published, "domain", domain)
    latest = max(rows, key=lambda c: c.day).row["pp"] if rows else ["none", "", "r", "r", 100]
    p, sp, adkim, aspf, pct = latest
    _text(published, "adkim", adkim)
    _text(published, "aspf", aspf)
    _text(published, "p", p)
    _text(published, "sp", sp or p)
    _text(published, "pct", pct)
    for row, count in sorted(merged.values(), key=lambda rc: (rc[0]["ip"], -rc[1])):
        record_el = ET.SubElement(feedback, "record")
        row_el = ET.SubElement(record_el, "row")
        _text(row_el, "source_ip", row["ip"])
        _text(row_el, "count", count)
        evaluated = ET.SubElement(row_el, "policy_evaluated")
        _text(evaluated, "disposition", row["dis"])
        _text(evaluated, "dkim", row["dkim"])
        _text(evaluated, "spf", row["spf"])
        if row.get("override"):
            reason = ET.SubElement(evaluated, "reason")
            _text(reason, "type", row["override"])
        identifiers = ET.SubElement(record_el, "identifiers")
        _text(identifiers, "header_from", row["hf"])
        if row.get("ef"):
            _text(identifiers, "envelope_from", row["ef"])
        auth = ET.SubElement(record_el, "auth_results")
        for sig_domain, selector, result in row["ad"]:
            dkim_el = ET.SubElement(auth, "dkim")
            _text(dkim_el, "domain", sig_domain)
            if selector:
                _text(dkim_el, "selector", selector)
            _text(dkim_el, "result", result)
        if row.get("as"):
            spf_el = ET.SubElement(auth, "spf")
            _text(spf_el, "domain", row["as"][0])
            _text(spf_el, "scope", "mfrom")
            _text(spf_el, "result", row["as"][1])
    ET.indent(feedback)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(feedback, "utf-8") + b"\n"
