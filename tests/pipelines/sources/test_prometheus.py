"""PrometheusSourceReader against a real Prometheus server scraping a real exporter."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import polars as pl
import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from forecaster.config import PrometheusSource
from forecaster.errors import SourceError
from forecaster.frames import parse_ts
from pipelines.sources import RAW_COLUMNS, build_source
from pipelines.sources.prometheus import PrometheusSourceReader, render_labels
from tests.conftest import require_binary
from tests.pipelines.sources.conftest import free_port

pytestmark = pytest.mark.prometheus

QUERY = "room_temperature"


@pytest.fixture(scope="module")
def exporter() -> Iterator[str]:
    """A prometheus_client exporter on loopback with one gauge, two label sets."""
    registry = CollectorRegistry()
    gauge = Gauge(QUERY, "test gauge", ["room"], registry=registry)
    gauge.labels(room="kitchen").set(21.5)
    gauge.labels(room="cellar").set(12.25)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def prometheus(exporter: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus scraping `exporter` every second; its URL once both series are in."""
    binary = require_binary("prometheus")
    tmp: Path = tmp_path_factory.mktemp("prometheus")
    (tmp / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: rooms\n    static_configs:\n      - targets: ['{exporter}']\n"
    )
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address={url.removeprefix('http://')}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "prometheus.log").open("wb"),
    )
    try:
        _wait_for_series(url, proc, tmp / "prometheus.log")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_series(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited with {proc.returncode}: {log.read_text()[-2000:]}")
        # Evaluated a step before now: a source's range ends at now floored to its step, so
        # samples only just scraped are not in it yet.
        params = {"query": QUERY, "time": str(int(time.time()) - 1)}
        try:
            r = httpx.get(f"{url}/api/v1/query", params=params, timeout=2)
            if r.status_code == 200 and len(r.json()["data"]["result"]) == 2:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.2)
    pytest.fail(f"prometheus had no data for {QUERY} within 30 s: {log.read_text()[-2000:]}")


def reader(url: str, **kw: object) -> PrometheusSourceReader:
    cfg = PrometheusSource(url=url, query=kw.pop("query", QUERY), step="1s", lookback="2m", **kw)
    src = build_source("prom", cfg)
    assert isinstance(src, PrometheusSourceReader)
    return src


def test_reads_both_series_then_only_newer_points(prometheus: str, exporter: str) -> None:
    src = reader(prometheus)
    now = datetime.now(UTC)  # the test's clock: Prometheus holds real, current samples
    batches = list(src.read(None, now))
    rows = pl.concat([b.rows for b in batches])
    assert rows.columns == list(RAW_COLUMNS)
    assert set(rows["series"].unique().to_list()) == {
        f'{QUERY}{{instance="{exporter}",job="rooms",room="{room}"}}'
        for room in ("cellar", "kitchen")
    }
    by_series = dict(
        zip(*rows.group_by("series").agg(pl.col("value").unique()).to_dict().values(), strict=True)
    )
    assert sorted(v for vals in by_series.values() for v in vals) == ["12.25", "21.5"]  # strings
    end = datetime.fromisoformat(batches[-1].cursor["end"])
    assert end <= now and end.timestamp() % 1 == 0  # floored to the step grid
    ts = parse_ts(rows["ts"])
    assert ts.max() <= end and ts.min() >= now - timedelta(minutes=2, seconds=1)

    time.sleep(2.2)
    later = list(src.read(batches[-1].cursor, datetime.now(UTC)))
    newer = pl.concat([b.rows for b in later])
    assert newer.height >= 2
    assert parse_ts(newer["ts"]).min() > end  # no overlap with the first read
    assert list(src.read(later[-1].cursor, datetime.fromisoformat(later[-1].cursor["end"]))) == []


def test_series_label_and_small_chunks(prometheus: str) -> None:
    src = reader(prometheus, series_label="room", max_points=7, batch_rows=5)
    now = datetime.now(UTC)
    batches = list(src.read(None, now))
    assert all(b.rows.height <= 5 for b in batches)
    rows = pl.concat([b.rows for b in batches])
    assert set(rows["series"].to_list()) == {"kitchen", "cellar"}
    assert rows.select("series", "ts").is_duplicated().sum() == 0  # chunks do not overlap

    missing = pl.concat([b.rows for b in reader(prometheus, series_label="floor").read(None, now)])
    assert missing.height > 0 and missing["series"].null_count() == missing.height


def test_bad_query_is_a_source_error(prometheus: str) -> None:
    with pytest.raises(SourceError, match="bad_data.*parse error"):
        list(reader(prometheus, query="rate(room_temperature[").read(None, datetime.now(UTC)))


def test_render_labels_is_canonical() -> None:
    assert (
        render_labels({"job": "b", "__name__": "up", "instance": "a"}) == 'up{instance="a",job="b"}'
    )
    assert render_labels({"path": 'C:\\x "y"'}) == '{path="C:\\\\x \\"y\\""}'
