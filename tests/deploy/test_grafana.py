"""deploy/grafana: the committed dashboard is what its script writes, holds the panels the
README describes, every query parses (promtool), and the provisioning files point at it."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from tests.deploy.conftest import DEPLOY, GRAFANA, binary, dashboard_queries, run

BOARD_PATH = GRAFANA / "dashboards" / "forecaster.json"


def _script():
    spec = importlib.util.spec_from_file_location("build_dashboard", GRAFANA / "build_dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _board() -> dict:
    return json.loads(BOARD_PATH.read_text())


def test_the_committed_json_is_what_the_script_writes():
    assert BOARD_PATH.read_text() == _script().render(), (
        "run: python deploy/grafana/build_dashboard.py"
    )


def test_the_series_variable_and_the_datasource_variable():
    variables = {v["name"]: v for v in _board()["templating"]["list"]}
    assert variables["series"]["query"] == "label_values(forecaster_observation, series)"
    assert variables["series"]["datasource"]["uid"] == "${datasource}"
    assert variables["datasource"]["query"] == "prometheus"


def test_panels_are_laid_out_and_each_queries_through_the_datasource_variable():
    panels = _board()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert len({p["title"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        if p["type"] != "row":
            assert p["description"] and p["targets"], p["title"]
            assert p["datasource"]["uid"] == "${datasource}"
            assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])


def test_the_panels_the_readme_describes():
    board = _board()
    by_title = {p["title"]: p for p in board["panels"] if p["type"] != "row"}
    exprs = {t: " ".join(x["expr"] for x in p["targets"]) for t, p in by_title.items()}
    band = exprs["Actual vs forecast: $series"]
    for name in ("observation", "forecast_median", "forecast_band_lower", "forecast_band_upper"):
        assert f'forecaster_{name}{{series="$series"}}' in band
    assert exprs["Forecast horizon: $series"] == 'forecaster_forecast{series="$series", q="0.5"}'
    assert "forecaster_mase" in exprs["MASE per model: $series"]
    assert "forecaster_band_coverage_ratio" in exprs["Band coverage"]
    assert "increase(forecaster_anomalies_total" in exprs["Anomalies per hour: $series"]
    assert "histogram_quantile(0.95" in exprs["Job duration (p50, p95 over 1 h)"]
    failures = exprs["Job failures and missed runs per hour"]
    assert "forecaster_job_failures_total" in failures and "forecaster_job_missed_total" in failures
    assert "forecaster_ingested_rows_total" in exprs["Ingested rows per hour"]
    assert "forecaster_quarantined_rows_total" in exprs["Quarantined rows per hour"]
    (annotation,) = board["annotations"]["list"]
    assert annotation["expr"].startswith('increase(forecaster_anomalies_total{series="$series"}')
    readme = (DEPLOY / "README.md").read_text()
    for title in by_title:
        assert f"**{title}**" in readme, f"deploy/README.md does not describe panel {title!r}"


@pytest.mark.prometheus
def test_every_query_parses(tmp_path):
    """Each query as a recording rule: `promtool check rules` parses them all."""
    promtool = binary("promtool")
    queries = dashboard_queries("flights.JFK")
    rules = [{"record": f"dashboard:query_{i}", "expr": q} for i, (_, q) in enumerate(queries)]
    path = tmp_path / "dashboard_rules.yml"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}, indent=1))
    out = run([promtool, "check", "rules", str(path)])
    assert f"SUCCESS: {len(rules)} rules found" in out


def test_provisioning_points_at_the_dashboard_and_the_datasource():
    datasource = (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    uid = re.search(r"^\s+uid: (\S+)$", datasource, flags=re.M)
    assert uid, datasource
    default = {v["name"]: v for v in _board()["templating"]["list"]}["datasource"]["current"]
    assert default["value"] == uid[1]
    assert re.search(r"^\s+type: prometheus$", datasource, flags=re.M)
    provider = (GRAFANA / "provisioning" / "dashboards" / "forecaster.yml").read_text()
    assert re.search(r"^\s+type: file$", provider, flags=re.M)
    assert re.search(r"^\s+path: /\S+$", provider, flags=re.M)
