"""The daemon's HTTP app: a real server on loopback, real requests, a real store behind it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from forecaster.clock import FixedClock
from forecaster.config import HttpSettings, MetricsSettings, SeriesDefaults
from forecaster.metrics import ServiceMetrics
from forecaster.store import Store
from pipelines.http import HttpApp
from pipelines.ingest import ingest_batch
from pipelines.sources.base import Batch, raw_frame

TOKEN = "s3cret-t0ken"
START = datetime(2024, 1, 1, tzinfo=UTC)
NOW = START + timedelta(days=1)


@pytest.fixture
def store(sqlite_url: str) -> Iterator[Store]:
    st = Store(sqlite_url)
    st.upgrade()
    hours = [START + timedelta(hours=h) for h in range(24)]
    rows = raw_frame(
        ["a"] * 24 + ["b"] * 24,
        [h.isoformat() for h in hours] * 2,
        [str(float(h)) for h in range(24)] + [str(100.0 + h) for h in range(24)],
        "test",
    )
    ingest_batch(st, "test", Batch(rows, {"day": 1}), SeriesDefaults(), NOW)
    yield st
    st.close()


@pytest.fixture
def serve(store: Store) -> Iterator[Callable[..., HttpApp]]:
    """serve(token=None, readiness=None, store=None) -> a started app on 127.0.0.1:<free>."""
    apps: list[HttpApp] = []

    def start(
        token: str | None = None,
        readiness: Callable[[], dict[str, bool]] | None = None,
        behind: Store | None = None,
    ) -> HttpApp:
        metrics = ServiceMetrics(
            behind or store, MetricsSettings(), FixedClock(NOW), job_ids=["predict"]
        )
        app = HttpApp(
            host=HttpSettings().host,
            port=0,
            token=token,
            metrics=metrics,
            readiness=readiness or (lambda: {"database": True}),
        )
        app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop()


def test_binds_loopback_by_default_on_a_free_port(serve):
    assert HttpSettings().host == "127.0.0.1"
    app = serve()
    assert app.port != 0
    assert app.url == f"http://127.0.0.1:{app.port}"


def test_healthz_metrics_and_unknown_paths(serve, store):
    app = serve()
    r = httpx.get(f"{app.url}/healthz")
    assert r.status_code == 200 and r.text == "ok\n"

    r = httpx.get(f"{app.url}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }
    # The store's newest observed value of each series (the last hour of the day).
    for name in ("a", "b"):
        newest = store.read_observations(name).sort("ts").row(-1, named=True)
        assert newest["ts"] == START.replace(hour=23)
        assert samples[("forecaster_observation", (("series", name),))] == newest["value"]
    assert samples[("forecaster_observation", (("series", "b"),))] == 123.0
    assert samples[("forecaster_job_failures_total", (("job", "predict"),))] == 0
    assert samples[("forecaster_series", ())] == 2

    for path in ("/", "/nope", "/metrics/extra", "/healthz/x"):
        assert httpx.get(f"{app.url}{path}").status_code == 404, path
    assert httpx.get(f"{app.url}/metrics?x=1").status_code == 200  # the query is not the path


def test_readyz_follows_the_checks(serve):
    checks = {"database": True, "scheduler": True}
    app = serve(readiness=lambda: dict(checks))
    r = httpx.get(f"{app.url}/readyz")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"ready": True, "checks": {"database": True, "scheduler": True}}
    checks["scheduler"] = False
    r = httpx.get(f"{app.url}/readyz")
    assert r.status_code == 503
    assert r.json() == {"ready": False, "checks": {"database": True, "scheduler": False}}
    assert httpx.get(f"{app.url}/healthz").status_code == 200  # alive all the same


def test_readyz_that_raises_is_not_ready_and_leaks_no_secret(serve, caplog):
    def broken() -> dict[str, bool]:
        raise RuntimeError(
            "could not connect to postgresql://forecaster:hunter2@db.internal:5432/prod "
            "(password=hunter2)"
        )

    app = serve(readiness=broken)
    with caplog.at_level(logging.ERROR, logger="pipelines.http"):
        r = httpx.get(f"{app.url}/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["ready"] is False and body["checks"] == {}
    assert body["error"].startswith("RuntimeError: could not connect to <url>")
    assert "hunter2" not in r.text and "db.internal" not in r.text
    assert any("readiness check raised" in rec.getMessage() for rec in caplog.records)


def test_a_scrape_that_raises_answers_500_and_logs_it(serve, tmp_path, caplog):
    unmigrated = Store(f"sqlite:///{tmp_path / 'empty.db'}")  # no tables: every read fails
    app = serve(behind=unmigrated)
    with caplog.at_level(logging.ERROR, logger="pipelines.http"):
        r = httpx.get(f"{app.url}/metrics")
    assert r.status_code == 500
    assert r.text == "scrape failed; see the service log\n"
    assert "no such table" not in r.text
    (record,) = [
        rec
        for rec in caplog.records
        if rec.name == "pipelines.http" and rec.levelno >= logging.ERROR
    ]
    assert record.exc_info is not None and "no such table" in str(record.exc_info[1])
    assert httpx.get(f"{app.url}/healthz").status_code == 200  # the server lives on
    unmigrated.close()


@pytest.mark.parametrize("path", ["/metrics", "/readyz", "/nope"])
def test_a_token_guards_everything_but_healthz(serve, path):
    app = serve(token=TOKEN)
    url = f"{app.url}{path}"
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ):
        r = httpx.get(url, headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"] == "Bearer"
        assert TOKEN not in r.text
    r = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == (404 if path == "/nope" else 200)
    assert httpx.get(f"{app.url}/healthz").status_code == 200


def test_access_logs_go_to_logging_at_debug_not_stderr(serve, caplog, capfd, monkeypatch):
    # No handler but caplog's (another test may have configured the process's logging):
    # anything on stderr then comes from a print or the stdlib server's own stderr writes.
    root = logging.getLogger()
    pytest_own = [h for h in root.handlers if type(h).__module__.startswith("_pytest")]
    monkeypatch.setattr(root, "handlers", pytest_own)
    app = serve()
    with caplog.at_level(logging.DEBUG, logger="pipelines.http"):
        httpx.get(f"{app.url}/healthz")
        httpx.get(f"{app.url}/nope")
    # The access log lines (the start-up line is INFO, seen when another test set the
    # process's logging to info).
    lines = [
        rec
        for rec in caplog.records
        if rec.name == "pipelines.http" and '"GET ' in rec.getMessage()
    ]
    assert any('"GET /healthz HTTP/1.1" 200' in rec.getMessage() for rec in lines)
    assert any('"GET /nope HTTP/1.1" 404' in rec.getMessage() for rec in lines)
    assert all(rec.levelno == logging.DEBUG for rec in lines)
    assert capfd.readouterr().err == ""


def test_stop_closes_the_port_and_start_twice_is_refused(serve):
    app = serve()
    url = f"{app.url}/healthz"
    with pytest.raises(RuntimeError, match="already serving"):
        app.start()
    app.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url)
    app.stop()  # idempotent


def test_an_empty_token_is_refused(store):
    metrics = ServiceMetrics(store, MetricsSettings(), FixedClock(NOW), job_ids=[])
    with pytest.raises(ValueError, match="empty"):
        HttpApp(host="127.0.0.1", port=0, token=" ", metrics=metrics, readiness=dict)
