"""DMARC aggregate reports: tallies in the Store, merged across days, as RFC 7489
Appendix C XML."""
from __future__ import annotations

import xml.etree.ElementTree as ET

from milters.auth.dkim_check import DkimResult
from milters.auth.dmarc import DmarcRecord, DmarcResult
from milters.auth.reports import aggregate_xml, counted, record, row_for
from milters.auth.results_header import AuthResults
from milters.auth.spf import SpfResult
from milters.core.store import open_store

DAY1 = 1_795_000_000.0  # 2026-11-18 UTC
RECORD = DmarcRecord("reject", "quarantine", strict_dkim=True, percent=50)


def results(dmarc: str, sampled_out: bool = False) -> AuthResults:
    dkim = [DkimResult("pass" if dmarc == "pass" else "fail", "example.com", "sel",
                       "rsa-sha256", "abcdefgh")]
    return AuthResults(SpfResult("softfail", "mailfrom", "bounce.example.com"), None, dkim,
                       None, DmarcResult(dmarc, "example.com", "reject", "quarantine", RECORD,
                                         sampled_out,
                                         dkim_aligned=("example.com",) if dmarc == "pass"
                                         else ()))


def test_rows_are_counted_per_day_and_merged_in_the_report() -> None:
    store = open_store("memory://")
    fail = row_for(results("fail", sampled_out=True), "192.0.2.7", "quarantine",
                   "bounce.example.com")
    ok = row_for(results("pass"), "192.0.2.8", "none", "bounce.example.com")
    assert fail is not None and ok is not None
    for at in (DAY1, DAY1 + 60, DAY1 + 86400):  # two days, same row
        record(store, fail, keep=40 * 86400, now=at)
    record(store, ok, keep=40 * 86400, now=DAY1)
    rows = counted(store, "EXAMPLE.com", DAY1 - 3600, DAY1 + 2 * 86400)
    assert sorted(c.count for c in rows) == [1, 1, 2]
    xml = ET.fromstring(aggregate_xml("example.com", rows, org_name="mx.example.jp",
                                      email="postmaster@example.jp", since=DAY1,
                                      until=DAY1 + 2 * 86400, report_id="r1"))
    assert xml.findtext("report_metadata/date_range/begin") == str(int(DAY1))
    assert [xml.findtext(f"policy_published/{k}") for k in ("adkim", "aspf", "p", "sp", "pct")] \
        == ["s", "r", "reject", "quarantine", "50"]
    by_ip = {r.findtext("row/source_ip"): r for r in xml.findall("record")}
    assert set(by_ip) == {"192.0.2.7", "192.0.2.8"}
    failed = by_ip["192.0.2.7"]
    assert failed.findtext("row/count") == "3"
    assert failed.findtext("row/policy_evaluated/disposition") == "quarantine"
    assert failed.findtext("row/policy_evaluated/reason/type") == "sampled_out"
    assert failed.findtext("identifiers/envelope_from") == "bounce.example.com"
    assert failed.findtext("auth_results/spf/result") == "softfail"
    assert by_ip["192.0.2.8"].findtext("row/policy_evaluated/dkim") == "pass"
    # Days outside the range are left out.
    assert [c.count for c in counted(store, "example.com", DAY1 + 86400, DAY1 + 86400)] == [1]


def test_nothing_to_report_without_a_record_or_on_temperror() -> None:
    none = AuthResults(None, None, [], None, DmarcResult("none", "example.com"))
    temp = AuthResults(None, None, [], None, DmarcResult("temperror", "example.com",
                                                          record=RECORD))
    assert row_for(none, "192.0.2.1", "none", "") is None
    assert row_for(temp, "192.0.2.1", "none", "") is None
