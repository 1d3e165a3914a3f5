"""Running it again is a no-op: a finished backtest or demo run again, the same rows sent
again (under another file name, by an HTTP JSON source, by a rewound replay), `ingest`,
`predict` and `evaluate` run again with nothing new. After the second run every table the
chaos suite compares (tests/pipelines/chaos.py) holds the rows it held after the first, and
the counters /metrics serves from the store (rows ingested and quarantined, anomalies) did
not move. A re-sent point that differs from what is stored is not a re-send: beyond the
lateness bound it is still quarantined too_late, within it it is stored as a late point."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from forecaster import schema
from forecaster.config import FileSource, HttpJsonSource, SeriesDefaults
from forecaster.store import Store
from pipelines.cli import app
from pipelines.ingest import run_ingest
from pipelines.sources import build_source
from tests.pipelines import chaos
from tests.pipelines.sources.conftest import http_server  # noqa: F401 - a fixture

T0 = datetime(2024, 1, 1, tzinfo=UTC)
NOW = datetime(2024, 6, 1, tzinfo=UTC)
DAYS = 10  # longer than the default allowed_lateness (7 days): re-sends on both sides of it


@pytest.fixture
def store(db_url):
    st = Store(db_url)
    st.upgrade()
    yield st
    st.close()


def _iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def _rows(days: int = DAYS) -> list[tuple[str, str, str]]:
    return [
        (s, _iso(T0 + timedelta(hours=h)), f"{(h * 7 + i) % 50}.25")
        for h in range(days * 24)
        for i, s in enumerate(("a", "b"))
    ]


def _write_csv(path: Path, rows: list[tuple[str, str, str]]) -> None:
    path.write_text("series,ts,value\n" + "".join(",".join(r) + "\n" for r in rows))


def _without_cursor(snap: dict[str, list[tuple]]) -> dict[str, list[tuple]]:
    """The snapshot with each source's cursor left out (its rows_total kept): a file source
    must remember a new file as read, even when every row in it was stored before."""
    cols = [c.name for c in schema.source_cursors.columns if c.name not in chaos.VOLATILE]
    at = cols.index("cursor")
    return {
        **snap,
        "source_cursors": [r[:at] + r[at + 1 :] for r in snap["source_cursors"]],
    }


# -- the same rows sent again -------------------------------------------------------------


def test_the_same_rows_under_another_file_name_are_already_stored_not_too_late(
    store, db_url, tmp_path
):
    (tmp_path / "in").mkdir()
    _write_csv(tmp_path / "in" / "a.csv", _rows())
    src = build_source("files", FileSource(path=str(tmp_path / "in" / "*.csv")))
    first = run_ingest(store, src, SeriesDefaults(), now=NOW)
    assert first.observed == 2 * DAYS * 24 and not first.quarantined
    before, counted = chaos.snapshot(db_url), chaos.counters(db_url)

    shutil.copy(tmp_path / "in" / "a.csv", tmp_path / "in" / "a-sent-again.csv")
    again = run_ingest(store, src, SeriesDefaults(), now=NOW)
    assert again.rows_read == 2 * DAYS * 24
    assert again.quarantined == Counter()  # before the fix: every row older than 7 days
    assert (again.observed, again.filled, again.unchanged) == (0, 0, 2 * DAYS * 24)
    assert again.windows_completed == 0  # nothing for predict to do
    assert "480 already stored" in again.line()
    assert _without_cursor(chaos.snapshot(db_url)) == _without_cursor(before)
    assert chaos.counters(db_url) == counted  # rows_total did not move
    assert "a-sent-again.csv" in str(store.get_cursor("files"))  # not read a third time


def test_a_resent_point_that_differs_is_too_late_beyond_the_bound_and_late_within_it(
    store, tmp_path
):
    (tmp_path / "in").mkdir()
    _write_csv(tmp_path / "in" / "a.csv", _rows())
    src = build_source("files", FileSource(path=str(tmp_path / "in" / "*.csv")))
    run_ingest(store, src, SeriesDefaults(), now=NOW)
    old, recent = T0 + timedelta(hours=5), T0 + timedelta(days=DAYS, hours=-5)
    stored = {
        (s, _iso(t)): v
        for s, t, v in store.read_observations().select("series", "ts", "value").rows()
    }
    _write_csv(
        tmp_path / "in" / "b.csv",
        [
            ("a", _iso(old), str(stored[("a", _iso(old))])),  # the same: already stored
            ("b", _iso(old), "999"),  # differs, 9+ days before the watermark: too late
            ("b", _iso(recent), "998"),  # differs, within the bound: a late correction
        ],
    )
    result = run_ingest(store, src, SeriesDefaults(), now=NOW)
    assert result.quarantined == Counter({"too_late": 1})
    assert (result.observed, result.unchanged) == (1, 1)
    (row,), _ = store.list_quarantine(reason="too_late")
    assert (row["series"], row["ts_raw"], row["value_raw"]) == ("b", _iso(old), "999")
    b = store.read_observations("b")
    assert b.filter(pl.col("ts") == recent)["value"].to_list() == [998.0]
    assert b.filter(pl.col("ts") == old)["value"].to_list() == [stored[("b", _iso(old))]]
    assert store.source_rows()["files"] == 2 * DAYS * 24 + 1


def test_the_same_records_resent_by_an_http_json_source_change_nothing(
    store,
    db_url,
    http_server,  # noqa: F811 - the fixture imported above
):
    """A server that ignores `since` answers every poll with every record it has."""
    records = [{"series": s, "ts": t, "value": float(v)} for s, t, v in _rows()]
    http_server.handler = lambda path, query, headers: (200, records)
    src = build_source("api", HttpJsonSource(url=f"{http_server.url}/points"))
    first = run_ingest(store, src, SeriesDefaults(), now=NOW)
    assert first.observed == len(records)
    before, counted = chaos.snapshot(db_url), chaos.counters(db_url)
    again = run_ingest(store, src, SeriesDefaults(), now=NOW)
    assert len(http_server.requests) == 2 and again.rows_read == len(records)
    assert chaos.snapshot(db_url) == before
    assert chaos.counters(db_url) == counted
    assert (again.observed, again.unchanged, again.quarantined) == (0, len(records), Counter())
    assert again.windows_completed == 0


def test_ingest_run_again_on_an_ingested_file_is_a_no_op(tmp_path):
    db = tmp_path / "s.db"
    cfg = tmp_path / "f.toml"
    cfg.write_text(
        f'database_url = "sqlite:///{db}"\n'
        f'[sources.meters]\nkind = "file"\npath = "{tmp_path / "*.csv"}"\n'
    )
    _write_csv(tmp_path / "a.csv", _rows())  # 2024: in the past of the command's wall clock
    runner = CliRunner()
    assert runner.invoke(app, ["--config", str(cfg), "db", "upgrade"]).exit_code == 0
    args = ["--config", str(cfg), "ingest", "--source", "meters"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0 and "480 points stored" in first.output, first.output
    before, counted = chaos.snapshot(db), chaos.counters(db)
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "0 rows read" in again.output, again.output
    assert chaos.snapshot(db) == before
    assert chaos.counters(db) == counted


# -- a finished backtest or demo run again -------------------------------------------------


@pytest.fixture(scope="module")
def backtested(chaos_backtest) -> tuple[Path, Path]:
    """A finished backtest (the chaos suite's, tests/pipelines/conftest): its folder and
    config."""
    return chaos_backtest


@pytest.fixture
def finished(backtested, tmp_path) -> tuple[Path, Path]:
    """A copy of the finished backtest this test may change."""
    src, _ = backtested
    shutil.copy(src / "store.db", tmp_path / "store.db")
    shutil.copytree(src / "checkpoints", tmp_path / "checkpoints")
    return tmp_path, chaos.write_config(tmp_path)


@pytest.mark.slow
def test_a_finished_backtest_run_again_and_its_data_sent_again_change_nothing(finished):
    """Before the fix the second run stepped a simulated day past the end: new job runs,
    and housekeeping deleted the oldest."""
    tmp, cfg = finished
    report = chaos.ChaosReport()
    chaos.run_again(tmp, cfg, report)
    assert report.differences == []
    assert report.reruns == 2


@pytest.mark.slow
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_predict_and_evaluate_run_again_with_nothing_new_change_nothing(finished, command):
    tmp, cfg = finished
    db = tmp / "store.db"
    before, counted = chaos.snapshot(db), chaos.counters(db)
    done = subprocess.run(
        [chaos.FORECASTER, "--config", str(cfg), command],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    if command == "predict":
        assert "0 forecast rows written" in done.stdout
    else:
        assert "0 new anomalies" in done.stdout
    assert chaos.compare(chaos.snapshot(db), before, command) == []
    assert chaos.counters(db) == counted


@pytest.mark.slow
def test_the_demo_run_again_until_its_end_changes_nothing(tmp_path):
    cfg = chaos.write_config(tmp_path, end="2013-02-16T00:00:00Z", training='challenger = "none"')
    db = tmp_path / "store.db"
    cmd = [chaos.FORECASTER, "--config", str(cfg), "--database-url", f"sqlite:///{db}"]
    cmd += ["run", "--demo", "--until-end"]
    first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before, counted = chaos.snapshot(db), chaos.counters(db)
    assert before["forecasts"], "the demo wrote no forecasts: nothing was compared"
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert chaos.compare(chaos.snapshot(db), before, "the demo run again") == []
    assert chaos.counters(db) == counted


@pytest.mark.slow
def test_retrain_run_again_with_nothing_new_changes_nothing(finished):
    tmp, cfg = finished
    db = tmp / "store.db"
    cmd = [chaos.FORECASTER, "--config", str(cfg), "retrain"]
    first = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    before, counted = chaos.snapshot(db), chaos.counters(db)
    again = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert chaos.compare(chaos.snapshot(db), before, "retrain run again") == []
    assert chaos.counters(db) == counted
