"""A Prometheus server, read with range queries on a fixed step grid.

First read: from now - lookback; then from cursor["end"] + step. The range ends at now
floored to a multiple of step (so every read lands on the same grid) and is cut into queries
of at most max_points steps. Each label set of the answer is one series, named by
`series_label` or by the whole label set (`up{instance="a",job="b"}`). Values stay the
strings Prometheus sends ("1.5", "NaN", "+Inf"): the ingest job decides what they mean.
Cursor: {"end": the end of the last range read, ISO 8601}.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
import polars as pl

from forecaster.config import PrometheusSource, mask_url
from forecaster.errors import SourceError
from pipelines.sources import invalid_url
from pipelines.sources.base import Batch, raw_frame


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
        try:
            resp = client.get(f"{base}/api/v1/query_range", params=params)
        except httpx.InvalidURL:  # its message quotes the URL's pieces, a password's too
            raise SourceError(self.name, invalid_url(where)) from None
        except httpx.TimeoutException as exc:
            raise SourceError(self.name, f"Prometheus at {where} did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise SourceError(
                self.name, f"cannot reach Prometheus at {where}: {type(exc).__name__}"
            ) from exc
        try:
            doc = resp.json()
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise SourceError(
                self.name,
                f"HTTP {resp.status_code} from {where}/api/v1/query_range, not a Prometheus "
                "API answer; check that url points at the Prometheus server",
            )
        if doc.get("status") != "success":
            raise SourceError(
                self.name,
                f"Prometheus rejected the query ({doc.get('errorType', f'HTTP {resp.status_code}')}): "
                f"{doc.get('error', 'no message')}",
            )
        data = doc.get("data") or {}
        if data.get("resultType") != "matrix":
            raise SourceError(
                self.name, f"expected a range vector (matrix), got {data.get('resultType')!r}"
            )
        return data.get("result") or []

    def _frame(self, result: list[dict[str, Any]]) -> pl.DataFrame:
        label = self.config.series_label
        series: list[str | None] = []
        ts_ms: list[int] = []  # Prometheus timestamps are float seconds, millisecond-exact
        values: list[str] = []
        origins: list[str] = []
        for item in result:
            metric = item.get("metric") or {}
            rendered = render_labels(metric)
            # A result without the naming label gets null: the ingest job quarantines it.
            name = metric.get(label) if label else rendered
            for t, v in item.get("values") or []:
                series.append(name)
                ts_ms.append(round(float(t) * 1000))
                values.append(v)
                origins.append(rendered)
        base = mask_url(self.config.url.rstrip("/"))
        return raw_frame(
            pl.Series(series, dtype=pl.Utf8),
            pl.Series(ts_ms, dtype=pl.Int64).cast(pl.Datetime("ms")).dt.replace_time_zone("UTC"),
            pl.Series(values, dtype=pl.Utf8),
            pl.Series([f"{base}#{o}" for o in origins], dtype=pl.Utf8),
        )


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
