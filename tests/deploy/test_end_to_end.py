"""The deploy/ files against the real thing: the demo daemon on a small replay, scraped by a
real Prometheus that runs deploy/prometheus/prometheus.yml (intervals shortened to 1 s) with
both rule files. Every rule loads and evaluates without error, every dashboard query returns
data, and the alerts that must stay silent on a healthy daemon do. One Prometheus for the
whole module, and one daemon (tests/deploy/conftest.py's, which the browser tests read too)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import served_url, stop
from tests.deploy.conftest import DEMO_SERIES, DISRUPTED, PROMETHEUS, binary, dashboard_queries
from tests.pipelines.sources.conftest import free_port

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]
SERIES = DEMO_SERIES
INCIDENT_ALERT_FOR = "expr: forecaster_incident_open == 1\n        for: 5m\n"
SILENT_WHEN_HEALTHY = {
    "ForecasterForecastsStale",
    "ForecasterIngestionStale",
    "ForecasterJobFailing",
    "ForecasterDown",
    "ForecasterTargetMissing",
}


def _wait(what: str, check: Callable[[], Any], timeout: float, log: Path | None = None) -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
        except httpx.HTTPError:
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            pytest.fail(f"{what}: not within {timeout:.0f} s\n{tail}")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def daemon(demo_lines) -> str:
    """`forecaster run --demo` serving after its replay (tests/deploy/conftest.py's, three
    series up to 2013-02-20, the last twelve hours of flights.LGA ten times their values):
    host:port of /metrics."""
    url = served_url(demo_lines, "serving")
    return url.removeprefix("http://").removesuffix("/metrics")


def _scrape_config(daemon: str) -> str:
    """deploy/prometheus/prometheus.yml, 1 s intervals, pointed at the test's daemon."""
    text = (PROMETHEUS / "prometheus.yml").read_text()
    for old, new, n in [
        ("scrape_interval: 15s", "scrape_interval: 1s", 2),
        ("evaluation_interval: 15s", "evaluation_interval: 1s", 1),
        ("scrape_timeout: 10s", "scrape_timeout: 1s", 1),
        ('"127.0.0.1:9464"', f'"{daemon}"', 1),
    ]:
        assert text.count(old) == n, f"prometheus.yml changed: {old!r} x{n} expected"
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def prometheus(request, tmp_path_factory) -> Iterator[str]:
    """A real Prometheus scraping the daemon: its base URL."""
    exe = binary("prometheus")  # before the daemon: skip without spending its start-up
    daemon: str = request.getfixturevalue("daemon")
    tmp = tmp_path_factory.mktemp("prometheus")
    (tmp / "prometheus.yml").write_text(_scrape_config(daemon))
    shutil.copy(PROMETHEUS / "recording_rules.yml", tmp)  # both relative to the config
    # The incident alert's 5 minutes become 3 seconds: the test waits for firing, not 5 min.
    alerts = (PROMETHEUS / "alert_rules.yml").read_text()
    assert alerts.count(INCIDENT_ALERT_FOR) == 1, "alert_rules.yml: the incident alert changed"
    short = INCIDENT_ALERT_FOR.replace("for: 5m", "for: 3s")
    (tmp / "alert_rules.yml").write_text(alerts.replace(INCIDENT_ALERT_FOR, short))
    url = f"http://127.0.0.1:{free_port()}"
    log = tmp / "prometheus.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [
                exe,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address={url.removeprefix('http://')}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        _wait(
            "Prometheus ready", lambda: httpx.get(f"{url}/-/ready", timeout=1).is_success, 30, log
        )
        up = 'up{job="forecaster"} == 1'
        _wait("the first scrape", lambda: _query(url, up), 30, log)
        yield url
    finally:
        stop(proc)


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5)
    body = r.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _rules(url: str) -> list[dict[str, Any]]:
    groups = httpx.get(f"{url}/api/v1/rules", timeout=5).json()["data"]["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_the_rules_load_and_evaluate_without_error(prometheus):
    def evaluated() -> list[dict[str, Any]] | None:
        rules = _rules(prometheus)
        done = rules and all(r["health"] != "unknown" for r in rules)
        return rules if done else None

    rules = _wait("every rule evaluated once", evaluated, 30)
    bad = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not bad
    names = {r["name"] for r in rules}
    for path in ("recording_rules.yml", "alert_rules.yml"):
        text = (PROMETHEUS / path).read_text()
        for line in text.splitlines():
            key, _, name = line.strip().removeprefix("- ").partition(": ")
            if key in ("record", "alert"):
                assert name in names, f"{name} did not load"
    assert len(names) == len(rules)


def test_every_dashboard_query_returns_data(prometheus):
    queries = dict(dashboard_queries("flights.JFK"))
    panels = {where: q for where, q in queries.items() if where.startswith("panel ")}

    def empty() -> dict[str, str]:
        return {w: q for w, q in panels.items() if not _query(prometheus, q)}

    # Rates need two scrapes and recorded series a rule evaluation: a few seconds.
    deadline = time.monotonic() + 30
    while (missing := empty()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not missing, f"dashboard queries without data: {missing}"
    for q in queries.values():  # annotations: they run (no anomaly may be recent)
        _query(prometheus, q)
    # The `series` variable: label_values(forecaster_observation, series).
    values = httpx.get(
        f"{prometheus}/api/v1/label/series/values",
        params={"match[]": "forecaster_observation"},
        timeout=5,
    ).json()["data"]
    assert values == SERIES
    lower, upper = (
        float(
            _query(prometheus, f'forecaster_forecast_band_{edge}{{series="flights.JFK"}}')[0][
                "value"
            ][1]
        )
        for edge in ("lower", "upper")
    )
    assert 0 <= lower <= upper


def test_the_alerts_a_healthy_daemon_must_not_raise_are_silent(prometheus):
    alerts = {r["name"]: r for r in _rules(prometheus) if r["type"] == "alerting"}
    assert SILENT_WHEN_HEALTHY <= set(alerts)
    for name in sorted(SILENT_WHEN_HEALTHY):
        # The condition itself, not only the state: `for` has not passed in a short test.
        assert _query(prometheus, alerts[name]["query"]) == [], name
        assert alerts[name]["state"] == "inactive", name
    # The new timestamps, as Prometheus sees them: the forecasts have absorbed every actual,
    # and the source committed its last batch moments ago by the wall clock.
    lag = "forecaster_observation_timestamp_seconds - forecaster_forecast_origin_timestamp_seconds"
    assert {r["metric"]["series"] for r in _query(prometheus, lag)} == set(SERIES)
    assert all(float(r["value"][1]) <= 0 for r in _query(prometheus, lag))
    age = _query(prometheus, "time() - forecaster_source_last_ingest_timestamp_seconds")
    assert [r["metric"]["source"] for r in age] == ["nycflights"]
    assert 0 <= float(age[0]["value"][1]) < 600


def test_the_incident_alert_fires_for_the_disrupted_series_only(prometheus):
    """The injected disruption (ten times flights.LGA's values for its last twelve hours)
    scores far above 1: an incident is open for it, and for no other series, and Prometheus
    takes the alert through pending to firing."""
    score = {
        r["metric"]["series"]: float(r["value"][1])
        for r in _query(prometheus, "forecaster_anomaly_score")
    }
    assert score[DISRUPTED] > 1 and set(score) == set(SERIES)
    open_ = _query(prometheus, "forecaster_incident_open == 1")
    assert {r["metric"]["series"] for r in open_} == {DISRUPTED}

    def firing() -> list[dict[str, Any]]:
        alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
        return [
            a
            for a in alerts
            if a["labels"]["alertname"] == "ForecasterAnomalyIncident"
            and a["labels"]["series"] == DISRUPTED
            and a["state"] == "firing"
        ]

    alert = _wait("the incident alert firing", firing, 60)[0]
    assert alert["labels"]["severity"] == "warning"
    assert alert["annotations"]["runbook"].endswith("#forecasteranomalyincident")
    assert DISRUPTED in alert["annotations"]["summary"]
