"""The OpenSPF RFC 7208 test suite (shipped with pyspf) through our SPF path.

scripts/fetch-test-data puts the suite's YAML in the virtualenv; each scenario's zone data
answers our check's DNS lookups, with the conventions of pyspf's own harness
(test/testspf.py): SPF records double as TXT records when a name lists no TXT record,
"NONE" is a listed but empty record, and a TIMEOUT entry makes every query type not
answered before it time out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import spf
import yaml

from milters.auth.spf import SpfLookup, check_spf

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / ".venv" / "share" / "mailmoat-testdata" / "rfc7208-tests.yml"

TIMEOUT = "TIMEOUT"
NONE = "NONE"
Answer = list[tuple[tuple[str, str], Any]]


def _name(name: str) -> str:
    """DNS names compare without case and without the root's trailing dot."""
    return name.rstrip(".").lower()


def _entries(records: list[Any]) -> list[tuple[str, Any] | str]:
    """One name's zone data in order: (qtype, value) pairs and TIMEOUT markers."""
    entries: list[tuple[str, Any] | str] = []
    for record in records:
        if record == TIMEOUT:
            entries.append(TIMEOUT)
            continue
        entries.extend((qtype.upper(), value) for qtype, value in record.items())
    # The suite writes SPF records once for both types; a listed TXT (even NONE) opts out.
    if not any(entry[0] == "TXT" for entry in entries if entry != TIMEOUT):
        entries.extend(("TXT", entry[1]) for entry in list(entries)
                       if entry != TIMEOUT and entry[0] == "SPF")
    return entries


def _rdata(qtype: str, value: Any) -> Any:
    """A record's value in pyspf's answer format."""
    if qtype in ("TXT", "SPF"):  # character strings, concatenated by pyspf
        strings = [value] if isinstance(value, str) else value
        return [s.encode("utf-8") for s in strings]
    if qtype == "MX":
        preference, exchange = value
        return (int(preference), str(exchange))
    return str(value)  # A and AAAA as address text; PTR and CNAME as name text


def _is_none(qtype: str, value: Any) -> bool:
    """TXT/SPF "NONE" is a placeholder for "no such record", not data."""
    return qtype in ("TXT", "SPF") and value in (NONE, [NONE])


class Zone:
    """A scenario's zone data, queried as a caching resolver would answer."""

    def __init__(self, zonedata: dict[str, list[Any]] | None) -> None:
        self.names = {_name(name): _entries(records or [])
                      for name, records in (zonedata or {}).items()}

    def lookup(self, name: str, qtype: str) -> Answer:
        return self._answer(_name(name), qtype, set())

    def _answer(self, name: str, qtype: str, seen: set[str]) -> Answer:
        answer: Answer = []
        found = False
        for entry in self.names.get(name, []):
            if entry == TIMEOUT:
                if not found:  # the server never answers this type for this name
                    raise spf.TempError(f"DNS timeout: {name} {qtype}")
                break
            rtype, value = entry
            if rtype == qtype and value == TIMEOUT:
                raise spf.TempError(f"DNS timeout: {name} {qtype}")
            if rtype == "CNAME":
                answer.extend(self._alias(name, _rdata(rtype, value), qtype, seen))
            elif rtype == qtype and not _is_none(rtype, value):
                found = True
                answer.append(((name, qtype), _rdata(rtype, value)))
        return answer

    def _alias(self, name: str, target: str, qtype: str, seen: set[str]) -> Answer:
        """The CNAME, then the target's answer; a loop ends the chain and pyspf,
        which follows the CNAME entries itself, detects it."""
        chain: Answer = [((name, "CNAME"), target)]
        if _name(target) not in seen | {name}:
            chain.extend(self._answer(_name(target), qtype, seen | {name}))
        return chain


def _scenarios() -> list[dict[str, Any]]:
    with SUITE.open("rb") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc]


def _cases() -> list[Any]:
    if not SUITE.is_file():  # a parameter that fails, so a missing suite cannot pass
        return [pytest.param(None, "", id="suite-missing")]
    return [pytest.param(scenario, test_name, id=test_name)
            for scenario in _scenarios() for test_name in scenario["tests"]]


def _expected_explanation(expected: str, result: str) -> str:
    """The suite's DEFAULT means the implementation's own default text for the result;
    pyspf's harness swaps in the word itself, our path keeps pyspf's default."""
    return spf.EXPLANATIONS[result] if expected == "DEFAULT" else expected


@pytest.mark.parametrize(("scenario", "test_name"), _cases())
def test_rfc7208_suite(scenario: dict[str, Any] | None, test_name: str) -> None:
    if scenario is None:
        pytest.fail(f"{SUITE} is missing: run scripts/setup "
                    "(it fetches pyspf's RFC 7208 test suite)", pytrace=False)
    case = scenario["tests"][test_name]
    lookup: SpfLookup = Zone(scenario.get("zonedata")).lookup
    # pyspf's harness passes no receiver, so %{r} expands to pyspf's "unknown"; same here.
    got = check_spf(str(case["host"]), case.get("mailfrom") or "", case.get("helo") or "",
                    lookup, receiver="unknown")
    expected = case["result"]
    allowed = [expected] if isinstance(expected, str) else list(expected)
    context = f"{test_name} (RFC 7208 {case.get('spec')}): {case.get('description', '')}"
    assert got.result in allowed, f"{context}\nexplanation: {got.explanation}"
    if case.get("explanation") is not None:
        assert got.explanation == _expected_explanation(str(case["explanation"]),
                                                        got.result), context
