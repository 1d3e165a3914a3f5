"""Hostile answers to the HTTP JSON, Prometheus and SQL sources, from real local servers and
databases: bounded bodies and time, errors that name positions and counts and never quote
what the server or database sent."""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from forecaster.config import HttpJsonSource, PrometheusSource, SqlSource
from forecaster.errors import SourceError
from pipelines.sources import build_source
from pipelines.sources.web import MAX_BODY_BYTES
from tests.pipelines.sources.conftest import LocalHttpServer

SECRET = "root:x:0:0:SECRET-CONTENT"


def http_json(server: LocalHttpServer, **kw: Any) -> Any:
    return build_source("api", HttpJsonSource(url=f"{server.url}/points", **kw))


def prometheus(server: LocalHttpServer, **kw: Any) -> Any:
    return build_source("prom", PrometheusSource(url=server.url, query="up", **kw))


def error_of(src: Any, now: datetime) -> str:
    with pytest.raises(SourceError) as err:
        list(src.read(None, now))
    return str(err.value)


def _gzip_bomb(size: int) -> bytes:
    """`[`, `size` spaces, `]`, gzip-compressed: about a thousandth of its size on the wire."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip container
    out = [z.compress(b"[")]
    block = b" " * (1 << 20)
    for _ in range(size // len(block)):
        out.append(z.compress(block))
    out.append(z.compress(b"]") + z.flush())
    return b"".join(out)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return _gzip_bomb(MAX_BODY_BYTES + (16 << 20))


# -- HTTP JSON ----------------------------------------------------------------------------


def test_an_error_answer_is_named_by_status_not_quoted(
    http_server: LocalHttpServer, now: datetime
) -> None:
    """The first 200 characters of an error body used to be part of the message."""
    http_server.handler = lambda path, query, headers: (500, SECRET.encode() * 10)
    msg = error_of(http_json(http_server), now)
    assert "HTTP 500 Internal Server Error from" in msg and "SECRET" not in msg


def test_a_records_path_miss_counts_the_keys_it_found(
    http_server: LocalHttpServer, now: datetime
) -> None:
    http_server.handler = lambda path, query, headers: (200, {SECRET: 1, "other": [1]})
    msg = error_of(http_json(http_server, records_path="data"), now)
    assert "no 'data' under the top level (found an object with 2 keys)" in msg
    assert "SECRET" not in msg
    http_server.handler = lambda path, query, headers: (200, {"data": SECRET})
    msg = error_of(http_json(http_server, records_path="data"), now)
    assert "expected a list of records at data, got a string" in msg and "SECRET" not in msg


@pytest.mark.parametrize("kind", ["http", "prometheus"])
def test_an_answer_over_the_size_limit_is_refused_even_compressed(
    http_server: LocalHttpServer, now: datetime, bomb: bytes, kind: str
) -> None:
    """A small gzip body that inflates past the limit was inflated whole in memory."""
    http_server.handler = lambda path, query, headers: (200, bomb, {"Content-Encoding": "gzip"})
    src = http_json(http_server) if kind == "http" else prometheus(http_server)
    msg = error_of(src, now)
    assert f"over the limit of {MAX_BODY_BYTES} bytes for one answer" in msg


def _drip(seconds: float) -> Iterator[bytes]:
    yield b"["
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.1)
        yield b" "
    yield b"]"


@pytest.mark.parametrize("kind", ["http", "prometheus"])
def test_an_answer_dripping_past_the_timeout_is_cut_there(
    http_server: LocalHttpServer, now: datetime, kind: str
) -> None:
    """The timeout applied to each read: a byte every 0.1 s held the source for as long as
    the server pleased."""
    http_server.handler = lambda path, query, headers: (200, _drip(6))
    src = (
        http_json(http_server, timeout="1s")
        if kind == "http"
        else prometheus(http_server, timeout="1s")
    )
    started = time.monotonic()
    msg = error_of(src, now)
    assert time.monotonic() - started < 3
    assert "did not finish its answer within 1s" in msg


# -- Prometheus ---------------------------------------------------------------------------


def test_an_error_answer_in_prometheus_form_is_shown_bounded_any_other_is_not_quoted(
    http_server: LocalHttpServer, now: datetime
) -> None:
    answer: dict[str, Any] = {"status": "error", "errorType": "bad_data", "error": "parse error"}
    http_server.handler = lambda path, query, headers: (400, answer)
    assert "Prometheus rejected the query (bad_data): parse error" in error_of(
        prometheus(http_server), now
    )
    answer["error"] = "parse error " + "x" * 100_000
    msg = error_of(prometheus(http_server), now)
    assert len(msg) < 500 and "(100012 characters)" in msg
    answer.update(errorType="whatever", error=SECRET)
    msg = error_of(prometheus(http_server), now)
    assert "not in Prometheus' form" in msg and "SECRET" not in msg


@pytest.mark.parametrize(
    ("result", "where"),
    [
        ([{"metric": {}, "values": [["1717243200", "1"]]}], "sample 1 of series 1"),
        ([{"metric": {}, "values": [[1717243200, 1.5]]}], "sample 1 of series 1"),
        ([{"metric": {}, "values": [[1e300, "1"]]}], "sample 1 of series 1"),
        ([{"metric": {}, "values": [[1717243200, "1"], [1, 2, 3]]}], "sample 2 of series 1"),
        ([{"metric": {}, "values": []}, [SECRET]], "series 2"),
        ([{"metric": {"job": 5}, "values": []}], "series 1"),
        ({"not": "a list"}, "its result is not a list"),
    ],
)
def test_a_malformed_range_vector_is_a_clear_error_by_position(
    http_server: LocalHttpServer, now: datetime, result: Any, where: str
) -> None:
    """These used to escape as ValueError/TypeError/OverflowError/AttributeError, some
    quoting the content ("could not convert string to float: ...")."""
    answer = {"status": "success", "data": {"resultType": "matrix", "result": result}}
    http_server.handler = lambda path, query, headers: (200, answer)
    msg = error_of(prometheus(http_server, step="1h", lookback="1h"), now)
    assert "is not a Prometheus range vector" in msg and where in msg
    assert "SECRET" not in msg and "1717243200" not in msg


def test_a_non_prometheus_answer_is_named_by_status_and_content_type(
    http_server: LocalHttpServer, now: datetime
) -> None:
    http_server.handler = lambda path, query, headers: (200, SECRET.encode())
    msg = error_of(prometheus(http_server), now)
    assert "HTTP 200 (application/json)" in msg and "not a Prometheus API answer" in msg
    assert "SECRET" not in msg


# -- SQL ----------------------------------------------------------------------------------


def test_a_url_that_cannot_be_parsed_is_a_source_error(now: datetime) -> None:
    """A port that is not a number escaped as a bare ValueError ("invalid literal for
    int() with base 10: ..."), past the CLI's handling of source errors."""
    src = build_source(
        "db", SqlSource(url="postgresql://reader:hunter2@h:notaport/x", query="SELECT 1")
    )
    msg = error_of(src, now)
    assert "postgresql://reader:***@h:notaport/x: it cannot be parsed; fix `url`" in msg
    assert "hunter2" not in msg and "invalid literal" not in msg


def test_a_driver_message_is_bounded(tmp_path: Any, now: datetime) -> None:
    name = "t" + "x" * 5000
    src = build_source(
        "db", SqlSource(url=f"sqlite:///{tmp_path / 'd.db'}", query=f"SELECT * FROM {name}")
    )
    msg = error_of(src, now)
    assert "query on" in msg and "no such table" in msg and len(msg) < 600
