"""HttpJsonSourceReader against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import polars as pl
import pytest

from forecaster.config import HttpJsonSource
from forecaster.errors import SourceError
from pipelines.sources import RAW_COLUMNS, build_source
from pipelines.sources.http_json import HttpJsonSourceReader
from tests.pipelines.sources.conftest import LocalHttpServer, free_port

TOKEN = "Bearer s3cret-token-value"
RECORDS = [
    {"series": "a", "ts": "2024-01-01T00:00:00Z", "value": 1.5},
    {"series": "b", "ts": "2024-01-01T01:00:00Z", "value": "7"},
    {"series": "a", "ts": "2024-01-01T02:00:00+00:00", "value": None},
]


def serve_since(server: LocalHttpServer, records: list[dict[str, Any]], wrap: str = "") -> None:
    """The endpoint: records newer than ?since=, wrapped under `wrap` (dotted), token required."""

    def handler(path: str, query: dict[str, str], headers: dict[str, str]) -> tuple[int, Any]:
        if headers.get("x-api-key") != TOKEN:
            return 401, {"error": "unauthorized"}
        since = query.get("since")
        out: Any = [
            r
            for r in records
            if since is None or datetime.fromisoformat(r["ts"]) > datetime.fromisoformat(since)
        ]
        for key in reversed(wrap.split(".") if wrap else []):
            out = {key: out, "meta": {"count": len(records)}}
        return 200, out

    server.handler = handler


def reader(server: LocalHttpServer, **kw: Any) -> HttpJsonSourceReader:
    cfg = HttpJsonSource(
        url=f"{server.url}/points", auth_header="X-Api-Key", auth_env="PTS_TOKEN", **kw
    )
    src = build_source("api", cfg)
    assert isinstance(src, HttpJsonSourceReader)
    return src


def test_incremental_reads_with_since_and_auth(
    http_server: LocalHttpServer, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PTS_TOKEN", TOKEN)
    records = list(RECORDS)
    serve_since(http_server, records)
    src = reader(http_server)

    batches = list(src.read(None, now))
    rows = pl.concat([b.rows for b in batches])
    assert rows.columns == list(RAW_COLUMNS)
    assert rows["series"].to_list() == ["a", "b", "a"]
    assert rows["value"].to_list() == ["1.5", "7", None]  # mixed types -> text, nothing lost
    assert rows["origin"].to_list() == [f"{http_server.url}/points#{i}" for i in range(3)]
    cursor = batches[-1].cursor
    assert datetime.fromisoformat(cursor["since"]) == datetime.fromisoformat("2024-01-01T02:00:00Z")
    assert "since" not in http_server.requests[0].query

    assert list(src.read(cursor, now)) == []  # nothing newer
    assert http_server.requests[-1].query["since"] == cursor["since"]

    records.append({"series": "b", "ts": "2024-01-01T03:00:00Z", "value": 4})
    batches = list(src.read(cursor, now))
    assert [b.rows["value"].to_list() for b in batches] == [[4]]
    assert batches[-1].cursor["since"].startswith("2024-01-01T03:00:00")


def test_nested_records_path_missing_fields_and_batches(
    http_server: LocalHttpServer, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PTS_TOKEN", TOKEN)
    records = [*RECORDS, {"ts": "2024-01-01T05:00:00Z"}]
    serve_since(http_server, records, wrap="data.items")
    src = reader(http_server, records_path="data.items", series_field="series", batch_rows=3)
    batches = list(src.read(None, now))
    assert [b.rows.height for b in batches] == [3, 1]
    assert batches[0].cursor == {"since": None}  # only the last batch moves the watermark
    last = batches[-1].rows.row(0, named=True)
    assert last["series"] is None and last["value"] is None  # ingest quarantines it

    with pytest.raises(SourceError, match="'records'.*data"):
        list(reader(http_server, records_path="data.records").read(None, now))


def test_series_name_when_records_have_no_series_field(
    http_server: LocalHttpServer, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PTS_TOKEN", TOKEN)
    serve_since(http_server, [{"t": 1704067200, "v": 3}])
    src = reader(http_server, ts_field="t", value_field="v", series_name="temp")
    rows = next(iter(src.read(None, now))).rows
    assert rows.row(0) == ("temp", 1704067200, 3, f"{http_server.url}/points#0")


def test_errors_are_actionable_and_never_leak_the_token(
    http_server: LocalHttpServer, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SourceError, match="PTS_TOKEN"):
        list(reader(http_server).read(None, now))

    monkeypatch.setenv("PTS_TOKEN", "Bearer wrong")
    serve_since(http_server, RECORDS)
    with pytest.raises(SourceError, match="HTTP 401.*check the value of PTS_TOKEN") as err:
        list(reader(http_server).read(None, now))
    assert "wrong" not in str(err.value)

    monkeypatch.setenv("PTS_TOKEN", TOKEN)
    http_server.handler = lambda path, query, headers: (500, {"echo": headers.get("x-api-key")})
    with pytest.raises(SourceError, match="HTTP 500") as err:
        list(reader(http_server).read(None, now))
    assert "s3cret" not in str(err.value)
    assert http_server.requests[-1].headers["x-api-key"] == TOKEN  # it was sent

    http_server.handler = lambda path, query, headers: (200, b"<html>oops</html>")
    with pytest.raises(SourceError, match="did not return JSON"):
        list(reader(http_server).read(None, now))

    http_server.handler = lambda path, query, headers: (200, {"not": "a list"})
    with pytest.raises(SourceError, match="list of records"):
        list(reader(http_server).read(None, now))


def test_unreachable_server(now: datetime) -> None:
    cfg = HttpJsonSource(url=f"http://127.0.0.1:{free_port()}/x", timeout="2s")
    with pytest.raises(SourceError, match="cannot reach"):
        list(build_source("api", cfg).read(None, now))
