"""deploy/prometheus: promtool accepts the config and both rule files and the rules' unit
tests pass; every alert is tested firing and silent, every recording rule's output is
tested, and every alert carries its annotations and a runbook section that exists."""

from __future__ import annotations

import re

import pytest

from tests.deploy.conftest import DEPLOY, PROMETHEUS, binary, run

ALERTS = (PROMETHEUS / "alert_rules.yml").read_text()
RECORDS = (PROMETHEUS / "recording_rules.yml").read_text()
UNIT_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))


def _names(kind: str, text: str) -> list[str]:
    return re.findall(rf"^\s+- {kind}: ([\w:]+)$", text, flags=re.M)


def _alert_blocks() -> dict[str, str]:
    """alert name -> its rule's text (up to the next rule)."""
    parts = re.split(r"^\s+- alert: (\w+)$", ALERTS, flags=re.M)
    return {
        name: body.split("\n\n")[0] for name, body in zip(parts[1::2], parts[2::2], strict=True)
    }


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_rule_files_hold_the_alerts_and_records_described():
    assert _names("alert", ALERTS) == [
        "ForecasterAnomalyIncident",
        "ForecasterFleetEvent",
        "ForecasterForecastsStale",
        "ForecasterIngestionStale",
        "ForecasterJobFailing",
        "ForecasterJobMissedRuns",
        "ForecasterAccuracyDegraded",
        "ForecasterBandCoverageOff",
        "ForecasterDown",
        "ForecasterTargetMissing",
    ]
    assert len(_names("record", RECORDS)) == len(set(_names("record", RECORDS))) > 5
    assert all(name.startswith("forecaster:") for name in _names("record", RECORDS))


@pytest.mark.prometheus
def test_promtool_checks_the_config_and_both_rule_files():
    promtool = binary("promtool")
    out = run(
        [promtool, "check", "rules", "recording_rules.yml", "alert_rules.yml"], cwd=PROMETHEUS
    )
    assert f"SUCCESS: {len(_names('record', RECORDS))} rules found" in out
    assert f"SUCCESS: {len(_names('alert', ALERTS))} rules found" in out
    # From the repository root: the rule files resolve relative to the config file.
    out = run([promtool, "check", "config", "deploy/prometheus/prometheus.yml"])
    assert "SUCCESS: 2 rule files found" in out


@pytest.mark.prometheus
def test_the_rules_unit_tests_pass():
    promtool = binary("promtool")
    out = run([promtool, "test", "rules", *map(str, UNIT_TESTS)])
    assert out.count("SUCCESS") == len(UNIT_TESTS) >= 2, out


def test_every_alert_is_tested_firing_and_silent():
    seen: dict[str, set[str]] = {}
    for path in UNIT_TESTS:
        text = path.read_text()
        for name, silent in re.findall(r"alertname: (\w+)\n\s+exp_alerts:( \[\])?", text):
            seen.setdefault(name, set()).add("silent" if silent else "fires")
    missing = {
        name: {"fires", "silent"} - seen.get(name, set())
        for name in _names("alert", ALERTS)
        if seen.get(name) != {"fires", "silent"}
    }
    assert not missing, f"alerts without a firing or a silent case: {missing}"


def test_every_recording_rule_output_is_tested():
    tested = " ".join(
        expr
        for path in UNIT_TESTS
        for expr in re.findall(r"^\s+- expr: (.+)$", path.read_text(), flags=re.M)
    )
    untested = [
        name for name in _names("record", RECORDS) if not re.search(rf"{name}(?![\w:])", tested)
    ]
    assert not untested


def test_every_alert_has_annotations_a_severity_and_a_runbook_section():
    runbook = (PROMETHEUS / "RUNBOOK.md").read_text()
    anchors = {_slug(h) for h in re.findall(r"^## (.+)$", runbook, flags=re.M)}
    readme = (DEPLOY / "README.md").read_text()
    for name, body in _alert_blocks().items():
        for key in ("summary", "description"):
            assert re.search(rf"^\s+{key}: \S", body, flags=re.M), (name, key)
        assert re.search(r"^\s+severity: (warning|critical)$", body, flags=re.M), name
        link = re.search(r"^\s+runbook: deploy/prometheus/RUNBOOK\.md#(\S+)$", body, flags=re.M)
        assert link and link[1] == name.lower() and link[1] in anchors, name
        assert f"`{name}`" in readme, f"deploy/README.md does not describe {name}"


def test_the_scrape_config_targets_the_daemon_every_15_seconds():
    text = (PROMETHEUS / "prometheus.yml").read_text()
    assert re.search(r"^\s+- job_name: forecaster$", text, flags=re.M)
    assert 'targets: ["127.0.0.1:9464"]' in text
    assert re.search(r"^\s+scrape_interval: 15s$", text, flags=re.M)
    rule_files = re.findall(r"^\s+- (\w+\.yml)$", text, flags=re.M)
    assert rule_files == ["recording_rules.yml", "alert_rules.yml"]
    assert all((PROMETHEUS / f).is_file() for f in rule_files)
