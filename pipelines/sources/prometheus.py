"""A Prometheus server, read with range queries on a fixed step grid.

First read: from now - lookback; then from cursor["end"] + step. The range ends at now
floored to a multiple of step (so every read lands on the same grid) and is cut into queries
of at most max_points steps. Each label set of the answer is one series, named by
`series_label` or by the whole label set (`up{instance="a",job="b"}`). Values stay the
strings Prometheus sends ("1.5", "NaN", "+Inf"): the ingest job decides what they mean.
Cursor: {"end": the end of the last range read, ISO 8601}.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
import polars as pl

from forecaster.config import PrometheusSource, mask_url
from forecaster.errors import SourceError
from pipelines.sources import invalid_url
from pipelines.sources.base import Batch, clip, raw_frame
from pipelines.sources.web import content_type, read_body

# What the Prometheus HTTP API calls its errors. Only an answer naming one of these is
# taken for Prometheus' own, and its message shown: anything else is some other server's
# content, not quoted.
_ERROR_TYPES = {
    "bad_data",
    "timeout",
    "canceled",
    "execution",
    "internal",
    "unavailable",
    "not_found",
    "not_acceptable",
}


class PrometheusSourceReader:
    """Reads `config.query` over the range not read yet; see the module docstring."""

    def __init__(
        self, name: str, config: PrometheusSource, *, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.name = name
        self.config = config
        self._transport = transport

    def read(self, cursor: Mapping[str, Any] | None, now: datetime) -> Iterator[Batch]:
        cfg = self.config
        step = cfg.step.total_seconds()
        end = math.floor(now.timestamp() / step) * step
        if cursor and cursor.get("end"):
            start = datetime.fromisoformat(cursor["end"]).timestamp() + step
        else:
            start = math.floor((now.timestamp() - cfg.lookback.total_seconds()) / step) * step
        if start > end:
            return
        chunks = math.ceil((end - start) / step / cfg.max_points) or 1
        base = cfg.url.rstrip("/")
        with httpx.Client(transport=self._transport, timeout=cfg.timeout.total_seconds()) as client:
            chunk_start = start
            while chunk_start <= end:
                chunk_end = min(end, chunk_start + (cfg.max_points - 1) * step)
                rows = self._frame(self._query(client, base, chunk_start, chunk_end, step))
                done = _iso(chunk_end)
                span = f"{_iso(chunk_start)}..{done}"
                for i in range(0, max(rows.height, 1), cfg.batch_rows):
                    last = i + cfg.batch_rows >= rows.height
                    # Mid-chunk, keep the old end: a crash re-queries the chunk (upserts).
                    keep = cursor.get("end") if cursor else None
                    yield Batch(
                        rows=rows.slice(i, cfg.batch_rows),
                        cursor={"end": done} if last else ({"end": keep} if keep else {}),
                        note=f"{self.name} {span}",
                        total_hint=None if chunks > 1 else rows.height,
                    )
                cursor = {"end": done}
                chunk_start = chunk_end + step

    def _query(
        self, client: httpx.Client, base: str, start: float, end: float, step: float
    ) -> list[dict[str, Any]]:
        where = mask_url(base)
        params = {
            "query": self.config.query,
            "start": _num(start),
            "end": _num(end),
            "step": _num(step),
        }
        timeout = self.config.timeout.total_seconds()
        started = time.monotonic()
        api = f"{where}/api/v1/query_range"
        try:
            with client.stream("GET", f"{base}/api/v1/query_range", params=params) as resp:
                body = read_body(
                    resp, source=self.name, where=api, started=started, timeout=timeout
                )
        except httpx.InvalidURL:  # its message quotes the URL's pieces, a password's too
            raise SourceError(self.name, invalid_url(where)) from None
        except httpx.TimeoutException as exc:
            raise SourceError(self.name, f"Prometheus at {where} did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise SourceError(
                self.name, f"cannot reach Prometheus at {where}: {type(exc).__name__}"
            ) from exc
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict) or doc.get("status") not in ("success", "error"):
            raise SourceError(
                self.name,
                f"HTTP {resp.status_code} ({content_type(resp)}) from {api}, not a Prometheus "
                "API answer; check that url points at the Prometheus server",
            )
        if doc["status"] != "success":
            kind = doc.get("errorType")
            if kind not in _ERROR_TYPES or not isinstance(doc.get("error"), str):
                raise SourceError(
                    self.name,
                    f"HTTP {resp.status_code} from {api}: an error answer, but not in Prometheus' "
                    "form; check that url points at the Prometheus server",
                )
            raise SourceError(
                self.name, f"Prometheus rejected the query ({kind}): {clip(doc['error'])}"
            )
        data = doc.get("data")
        if not isinstance(data, dict) or data.get("resultType") != "matrix":
            kind = data.get("resultType") if isinstance(data, dict) else None
            got = repr(kind) if kind in ("vector", "scalar", "string") else "no result type"
            raise SourceError(self.name, f"expected a range vector (matrix), got {got}")
        result = data.get("result") or []
        if not isinstance(result, list):
            raise SourceError(self.name, _malformed(api, "its result is not a list"))
        return result

    def _frame(self, result: list[Any]) -> pl.DataFrame:
        label = self.config.series_label
        series: list[str | None] = []
        ts_ms: list[int] = []  # Prometheus timestamps are float seconds, millisecond-exact
        values: list[str] = []
        origins: list[str] = []
        api = f"{mask_url(self.config.url.rstrip('/'))}/api/v1/query_range"
        for i, item in enumerate(result):
            metric, samples = _series(item)
            if metric is None or samples is None:
                raise SourceError(
                    self.name, _malformed(api, f"series {i + 1} is not a label set with values")
                )
            rendered = render_labels(metric)
            # A result without the naming label gets null: the ingest job quarantines it.
            name = metric.get(label) if label else rendered
            for k, sample in enumerate(samples):
                point = _sample(sample)
                if point is None:
                    where = f"sample {k + 1} of series {i + 1}"
                    raise SourceError(
                        self.name,
                        _malformed(api, f'{where} is not a [seconds, "value"] pair'),
                    )
                series.append(name)
                ts_ms.append(point[0])
                values.append(point[1])
                origins.append(rendered)
        base = mask_url(self.config.url.rstrip("/"))
        return raw_frame(
            pl.Series(series, dtype=pl.Utf8),
            pl.Series(ts_ms, dtype=pl.Int64).cast(pl.Datetime("ms")).dt.replace_time_zone("UTC"),
            pl.Series(values, dtype=pl.Utf8),
            pl.Series([f"{base}#{o}" for o in origins], dtype=pl.Utf8),
        )


def _series(item: Any) -> tuple[dict[str, str] | None, list[Any] | None]:
    """A matrix entry's labels and samples, or None for what is not as the API documents."""
    if not isinstance(item, dict):
        return None, None
    metric = item.get("metric") or {}
    samples = item.get("values") or []
    if not isinstance(metric, dict) or not isinstance(samples, list):
        return None, None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metric.items()):
        return None, None
    return metric, samples


# Milliseconds that a datetime holds (years 1..9999): a timestamp past them is not a sample.
_MS_RANGE = (-62_135_596_800_000, 253_402_300_799_000)


def _sample(sample: Any) -> tuple[int, str] | None:
    """A [seconds, "value"] pair as (epoch milliseconds, value text), or None."""
    if not isinstance(sample, list) or len(sample) != 2:
        return None
    t, v = sample
    if isinstance(t, bool) or not isinstance(t, int | float) or not isinstance(v, str):
        return None
    if not math.isfinite(t) or not _MS_RANGE[0] <= t * 1000 <= _MS_RANGE[1]:
        return None
    return round(t * 1000), v


def _malformed(api: str, what: str) -> str:
    return f"the answer from {api} is not a Prometheus range vector: {what}"


def render_labels(metric: Mapping[str, str]) -> str:
    """A label set as PromQL writes it: `name{a="x",b="y"}`, labels sorted, values escaped."""
    name = metric.get("__name__", "")
    pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(metric.items()) if k != "__name__")
    return f"{name}{{{pairs}}}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else repr(seconds)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()
