"""`forecaster plot`: the PNG is drawn from what the store holds (actuals, the latest forecasts,
anomalies), through the function and through the command."""

from __future__ import annotations

import struct
from datetime import timedelta

import numpy as np
import pytest
import sqlalchemy as sa
from matplotlib.colors import to_rgb
from matplotlib.image import imread
from typer.testing import CliRunner

from forecaster import schema
from forecaster.errors import UnknownSeriesError
from forecaster.store import Store
from pipelines.cli import app
from pipelines.evaluate import run_evaluate
from pipelines.plot import DPI, SIZE_IN, plot_series, series_figure
from pipelines.predict import run_predict
from tests.pipelines.test_predict import START, WARMUP, _ingest_days, _setup, trained  # noqa: F401

DAYS_SHOWN = 5
SPIKE = START + timedelta(days=26, hours=12)


def _rolled(db_url: str, trained) -> Store:  # noqa: F811
    """20 days, then a week of (ingest a day, predict, evaluate), a spike on the last day."""
    store = _setup(db_url, trained)
    _ingest_days(store, 0, 20)
    run_predict(store, warmup_steps=WARMUP)
    for day in range(20, 27):
        _ingest_days(store, day, day + 1)
        if day == 26:
            with store.begin() as conn:
                conn.execute(
                    sa.update(schema.observations)
                    .where(schema.observations.c.ts == SPIKE)
                    .values(value=schema.observations.c.value + 100)
                )
        run_evaluate(store, prior_weight=10)
        run_predict(store, warmup_steps=WARMUP)
    return store


@pytest.fixture(scope="module")
def rolled(tmp_path_factory, trained):  # noqa: F811
    store = _rolled(f"sqlite:///{tmp_path_factory.mktemp('plot') / 'store.db'}", trained)
    yield store
    store.close()


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
    return struct.unpack(">II", head[16:24])


def _pixels_near(path, color: str, tol: float = 0.06) -> int:
    img = imread(path)[..., :3]  # (height, width, rgb) floats in 0..1
    return int((np.abs(img - np.array(to_rgb(color))).max(axis=-1) < tol).sum())


def _expected_forecast_rows(store: Store, series: str, start) -> list[dict]:
    return sorted(
        (
            r
            for r in store.latest_forecasts(series)
            if r["model"] == "v1" and r["target_ts"] > start
        ),
        key=lambda r: r["target_ts"],
    )


def test_the_png_shows_the_stored_actuals_forecast_band_and_anomalies(rolled, tmp_path):
    path = tmp_path / "out" / "sine0.png"
    summary = plot_series(rolled, "sine.0", path, days=DAYS_SHOWN)

    newest = START + timedelta(days=27) - timedelta(hours=1)
    start = newest - timedelta(days=DAYS_SHOWN)
    want = _expected_forecast_rows(rolled, "sine.0", start)
    # One row per hour from the window's start through the newest origin's 24-step horizon.
    assert len(want) == (DAYS_SHOWN + 1) * 24
    anomalies = [
        a
        for a in rolled.list_anomalies("sine.0", limit=1000)
        if a["ts"] > start and a["model"] == "v1"
    ]
    assert SPIKE in {a["ts"] for a in anomalies}
    assert summary.model == "v1"
    assert summary.points == DAYS_SHOWN * 24
    assert summary.forecast_rows == len(want)
    assert summary.anomalies == len(anomalies)
    assert summary.origin == newest
    assert summary.path == path
    assert f"{len(want)} forecast rows from v1" in summary.line()

    assert _png_size(path) == (int(SIZE_IN[0] * DPI), int(SIZE_IN[1] * DPI))
    assert _pixels_near(path, "tab:red") > 20  # the anomaly markers are drawn
    assert _pixels_near(path, "tab:blue") > 200  # and the forecast median

    # The artists carry exactly the stored numbers.
    fig, _ = series_figure(rolled, "sine.0", days=DAYS_SHOWN)
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    median = lines["forecast median (v1)"]
    np.testing.assert_allclose(median.get_ydata(), [r["yhat"] for r in want])
    assert "weekly seasonal naive" in lines and "now (newest origin)" in lines
    actual = lines["actual"].get_ydata()
    assert len(actual) == DAYS_SHOWN * 24 and actual.max() > 100  # the spike is in the window
    (band,) = ax.collections[:1]
    assert band.get_label() == "80% band"
    (markers,) = [c for c in ax.collections if c.get_label() == "anomaly"]
    assert len(markers.get_offsets()) == len(anomalies)


def test_the_command_writes_the_file_and_says_what_it_drew(rolled, tmp_path):
    url = str(rolled.engine.url)
    path = tmp_path / "sine1.png"
    result = CliRunner().invoke(
        app, ["--database-url", url, "plot", "sine.1", "-o", str(path), "--days", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "sine.1: 72 actuals over the last 3 days" in result.output
    assert "forecast rows from v1" in result.output
    assert _png_size(path) == (1200, 500)


def test_an_unknown_series_is_a_clear_error(rolled, tmp_path):
    path = tmp_path / "nope.png"
    result = CliRunner().invoke(
        app, ["--database-url", str(rolled.engine.url), "plot", "nope", "-o", str(path)]
    )
    assert result.exit_code == 1
    assert "no series named 'nope'" in result.output
    assert not path.exists()
    with pytest.raises(UnknownSeriesError):
        series_figure(rolled, "nope")


def test_a_model_without_forecasts_names_those_that_have_some(rolled, tmp_path):
    summary = plot_series(rolled, "sine.0", tmp_path / "v9.png", model="9")
    assert summary.model == "v9" and summary.forecast_rows == 0 and summary.anomalies == 0
    assert "no forecasts from v9" in summary.line() and "v1" in summary.line()


def test_a_series_without_forecasts_still_plots_its_actuals(sqlite_url, tmp_path, trained):  # noqa: F811
    bare = Store(sqlite_url)
    bare.upgrade()
    _ingest_days(bare, 0, 3)
    summary = plot_series(bare, "sine.0", tmp_path / "bare.png", days=2)
    assert summary.model is None and summary.points == 2 * 24 and summary.forecast_rows == 0
    assert "no champion" in summary.line()
    bare.close()

    store = _setup(sqlite_url.replace("store.db", "champion.db"), trained)
    _ingest_days(store, 0, 3)
    path = tmp_path / "no_forecasts.png"
    summary = plot_series(store, "sine.0", path)
    assert summary.model == "v1" and summary.points == 3 * 24 and summary.forecast_rows == 0
    assert "run `forecaster predict`" in summary.line()
    assert _png_size(path) == (1200, 500)
    assert _pixels_near(path, "tab:red") == 0
    store.close()


@pytest.mark.postgres
def test_plot_reads_the_same_on_postgresql_as_on_sqlite(pg_url, trained, tmp_path, rolled):  # noqa: F811
    store = _rolled(pg_url, trained)
    got = plot_series(store, "sine.0", tmp_path / "a.png", days=DAYS_SHOWN)
    ref = plot_series(rolled, "sine.0", tmp_path / "b.png", days=DAYS_SHOWN)
    assert (got.points, got.forecast_rows, got.anomalies, got.origin) == (
        ref.points,
        ref.forecast_rows,
        ref.anomalies,
        ref.origin,
    )
    store.close()
