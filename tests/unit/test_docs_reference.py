"""The references in docs/ cannot drift from the code: the config reference is the schema's
own output, and every metric and log event the code emits has its entry."""
from __future__ import annotations

import ast
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from milters.core.policy.docgen import duration_text, undocumented
from milters.core.policy.schema import Field, ListOf, Str, Struct
from mta.delivery.agent import BOUNCED, DEFERRED, DELIVERED

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
GENERATOR = ROOT / "scripts/gen_config_reference"
SOURCES = sorted([*(ROOT / "milters").rglob("*.py"), *(ROOT / "mta").rglob("*.py")])
METRIC_CALLS = {"count", "observe", "observer", "gauge", "info"}


def _calls(name_of: "callable") -> dict[str, str]:
    """First-argument string of every call `name_of` picks out -> where it is."""
    found: dict[str, str] = {}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and name_of(node.func) and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                found.setdefault(node.args[0].value, f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def emitted_events() -> dict[str, str]:
    events = _calls(lambda f: isinstance(f, ast.Name) and f.id == "log_event")
    # mta/delivery/queue_run.py logs each recipient's outcome under the outcome's own name.
    events.update({status: "mta/delivery/queue_run.py (outcome.status)"
                   for status in (DELIVERED, DEFERRED, BOUNCED)})
    return events


def registered_metrics() -> dict[str, str]:
    return {name: where for name, where in _calls(
        lambda f: isinstance(f, ast.Attribute) and f.attr in METRIC_CALLS
        and isinstance(f.value, ast.Name) and f.value.id == "METRICS").items()}


def _entries(page: str) -> set[str]:
    """Names a reference page documents: the first `code` cell of each table row."""
    text = (DOCS / "reference" / page).read_text(encoding="utf-8")
    return set(re.findall(r"^\| `([a-z_]+)` \|", text, re.MULTILINE))


def run_generator(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(GENERATOR), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_the_config_reference_is_what_the_schema_generates_now() -> None:
    result = run_generator("--check")
    assert result.returncode == 0, result.stderr


def test_a_stale_config_reference_is_caught(tmp_path: Path) -> None:
    # The check must be able to fail: change one line of the page and run it again.
    page = DOCS / "reference/config.md"
    original = page.read_text(encoding="utf-8")
    try:
        page.write_text(original.replace("| 5d |", "| 4d |", 1), encoding="utf-8")
        result = run_generator("--check")
    finally:
        page.write_text(original, encoding="utf-8")
    assert result.returncode == 1
    assert "docs/reference/config.md is stale: run scripts/gen_config_reference" in result.stderr


def test_every_key_of_every_schema_carries_its_meaning() -> None:
    namespace = runpy.run_path(str(GENERATOR), run_name="reference")
    gaps = [path for _, _, spec, prefix in namespace["sections"]()
            for path in undocumented(spec, prefix)]
    assert gaps == []


def test_a_key_without_a_meaning_is_reported_with_its_path() -> None:
    spec = Struct({"hostname": Field(Str(), "x", doc="The name."),
                   "limits": Field(ListOf(Struct({"rate": Field(Str())})), (), doc="Buckets.")})
    assert undocumented(spec, "gateway") == ["gateway.limits[].rate"]


@pytest.mark.parametrize("seconds, text", [(432000.0, "5d"), (0.5, "500ms"), (90.0, "90s"),
                                           (3600.0, "1h"), (0.0, "0s"), (604800.0, "1w")])
def test_durations_are_written_the_way_a_config_file_writes_them(seconds: float,
                                                                  text: str) -> None:
    assert duration_text(seconds) == text


def test_every_log_event_the_code_emits_is_documented() -> None:
    events = emitted_events()
    assert len(events) > 50  # the scan itself found the calls
    missing = {name: where for name, where in events.items()
               if name not in _entries("log-events.md")}
    assert missing == {}


def test_every_documented_log_event_is_one_the_code_emits() -> None:
    assert _entries("log-events.md") - set(emitted_events()) == set()


def test_every_metric_the_code_registers_is_documented() -> None:
    metrics = registered_metrics()
    assert "mailmoat_milter_latency_seconds" in metrics  # a call spread over two lines
    missing = {name: where for name, where in metrics.items()
               if name not in _entries("metrics.md")}
    assert missing == {}


def test_every_documented_metric_is_one_the_code_registers() -> None:
    assert _entries("metrics.md") - set(registered_metrics()) == set()
