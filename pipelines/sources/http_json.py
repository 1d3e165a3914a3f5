"""An HTTP endpoint returning JSON records, polled with a `since` watermark.

GET `url`?{since_param}={cursor["since"]}; the records sit at the dotted `records_path` of
the response ('' = the response is the list). Cursor: {"since": the latest parseable ts
seen so far, ISO 8601}. Only the last batch of a response carries the new `since`: the
server need not sort its records, so a crash mid-response re-fetches all of it (harmless,
the ingest upserts).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

import httpx
import polars as pl

from forecaster.config import HttpJsonSource, mask_url
from forecaster.errors import SourceError
from forecaster.frames import parse_ts
from pipelines.sources import invalid_url, loose_column, no_surrogates
from pipelines.sources.base import Batch, raw_frame


class HttpJsonSourceReader:
    """Polls one JSON endpoint; see the module docstring for the protocol."""

    def __init__(
        self, name: str, config: HttpJsonSource, *, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.name = name
        self.config = config
        self._transport = transport

    def read(self, cursor: Mapping[str, Any] | None, now: datetime) -> Iterator[Batch]:
        since = (cursor or {}).get("since")
        records = self._records(self._fetch(since))
        if not records:
            return
        rows = self._frame(records)
        new_since = _later(since, parse_ts(rows["ts"]).max())
        step = self.config.batch_rows
        for start in range(0, rows.height, step):
            last = start + step >= rows.height
            yield Batch(
                rows=rows.slice(start, step),
                cursor={"since": new_since if last else since},
                note=f"{self.name} records {start}-{min(start + step, rows.height) - 1}",
                total_hint=rows.height,
            )

    def _fetch(self, since: str | None) -> Any:
        cfg = self.config
        url = mask_url(cfg.url)
        params = {cfg.since_param: since} if cfg.since_param and since else {}
        headers = {}
        if cfg.auth_env:
            value = os.environ.get(cfg.auth_env)
            if value is None:
                raise SourceError(
                    self.name,
                    f"environment variable {cfg.auth_env} (the {cfg.auth_header} header) is not "
                    "set; export it or remove auth_env",
                )
            headers[cfg.auth_header] = value
        timeout = cfg.timeout.total_seconds()
        try:
            with httpx.Client(transport=self._transport, timeout=timeout) as client:
                resp = client.get(cfg.url, params=params, headers=headers)
        except httpx.InvalidURL:  # its message quotes the URL's pieces, a password's too
            raise SourceError(self.name, invalid_url(url)) from None
        except httpx.TimeoutException as exc:
            raise SourceError(self.name, f"no answer from {url} within {timeout:g}s") from exc
        except httpx.HTTPError as exc:
            raise SourceError(self.name, f"cannot reach {url}: {type(exc).__name__}") from exc
        if resp.status_code >= 400:
            body = resp.text[:200]
            for secret in headers.values():  # a server may echo the request back
                body = body.replace(secret, "***")
            denied = resp.status_code in (401, 403)
            hint = f" (check the value of {cfg.auth_env})" if denied and cfg.auth_env else ""
            raise SourceError(
                self.name,
                f"HTTP {resp.status_code} {resp.reason_phrase} from {url}{hint}: {body}".rstrip(
                    ": "
                ),
            )
        try:
            return _json(resp)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise SourceError(
                self.name,
                f"{url} did not return JSON ({resp.headers.get('content-type')}): "
                f"{type(exc).__name__}: {str(exc)[:100]}",
            ) from exc

    def _records(self, doc: Any) -> list[Any]:
        path = self.config.records_path
        node = doc
        walked: list[str] = []
        for key in path.split(".") if path else []:
            if not isinstance(node, dict) or key not in node:
                where = ".".join(walked) or "the top level"
                keys = ", ".join(map(str, node)) if isinstance(node, dict) else type(node).__name__
                raise SourceError(
                    self.name,
                    f"the response has no {key!r} under {where} (found: {keys}); fix records_path",
                )
            node = node[key]
            walked.append(key)
        if not isinstance(node, list):
            raise SourceError(
                self.name,
                f"expected a list of records at {path or 'the top level'}, got "
                f"{type(node).__name__}; fix records_path",
            )
        return node

    def _frame(self, records: list[Any]) -> pl.DataFrame:
        cfg = self.config
        # Not-a-dict records become rows of nulls: the ingest job quarantines them visibly.
        recs = [r if isinstance(r, dict) else {} for r in records]
        # The default series_field is used when present; one the user chose is required.
        required = "series_field" in cfg.model_fields_set
        fallback = cfg.series_name or self.name
        series = []
        for r in recs:
            if cfg.series_field and (cfg.series_field in r or required):
                v = r.get(cfg.series_field)
                series.append(None if v is None else no_surrogates(str(v)))
            else:
                series.append(fallback)
        return raw_frame(
            series,
            loose_column([r.get(cfg.ts_field) for r in recs]),
            loose_column([r.get(cfg.value_field) for r in recs]),
            [f"{mask_url(cfg.url)}#{i}" for i in range(len(recs))],
        )


def _json(resp: httpx.Response) -> Any:
    """The body as JSON. Bytes that are not UTF-8 (or not the declared charset) become
    U+FFFD, as the file source reads CSV, so one bad byte quarantines its record rather than
    refusing the whole response; a leading BOM is allowed."""
    if resp.charset_encoding is None:
        try:
            return json.loads(resp.content)  # RFC 8259 detection: UTF-8 (BOM or not), UTF-16/32
        except UnicodeDecodeError:
            pass
    return json.loads(resp.text.removeprefix("\ufeff"))


def _later(since: str | None, seen: datetime | None) -> str | None:
    """The later of the stored watermark and the newest ts just seen, as ISO 8601."""
    if seen is None:
        return since
    if since is not None:
        try:
            prev = datetime.fromisoformat(since)
        except ValueError:
            prev = None
        if prev is not None and prev.tzinfo is not None and prev >= seen:
            return since
    return seen.isoformat()
