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
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

import httpx
import polars as pl

from forecaster.config import HttpJsonSource, mask_url
from forecaster.errors import SourceError
from forecaster.frames import parse_ts
from pipelines.sources import invalid_url, loose_column, no_surrogates
from pipelines.sources.base import Batch, clip, raw_frame
from pipelines.sources.web import content_type, read_body


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
        started = time.monotonic()
        try:
            with (
                httpx.Client(transport=self._transport, timeout=timeout) as client,
                client.stream("GET", cfg.url, params=params, headers=headers) as resp,
            ):
                if resp.status_code >= 400:
                    # Not the body: it is the server's content, may echo the request (the
                    # auth header) and may be anything at all.
                    denied = resp.status_code in (401, 403)
                    hint = (
                        f" (check the value of {cfg.auth_env})" if denied and cfg.auth_env else ""
                    )
                    raise SourceError(
                        self.name,
                        f"HTTP {resp.status_code} {clip(resp.reason_phrase, 60)} from {url}{hint}",
                    )
                body = read_body(
                    resp, source=self.name, where=url, started=started, timeout=timeout
                )
        except httpx.InvalidURL:  # its message quotes the URL's pieces, a password's too
            raise SourceError(self.name, invalid_url(url)) from None
        except httpx.TimeoutException as exc:
            raise SourceError(self.name, f"no answer from {url} within {timeout:g}s") from exc
        except httpx.HTTPError as exc:
            raise SourceError(self.name, f"cannot reach {url}: {type(exc).__name__}") from exc
        try:
            return _json(body, resp.charset_encoding)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            # json's messages give positions ("line 1 column 5 (char 4)"), never the text.
            raise SourceError(
                self.name,
                f"{url} did not return JSON ({content_type(resp)}): "
                f"{type(exc).__name__}: {clip(exc, 100)}",
            ) from exc

    def _records(self, doc: Any) -> list[Any]:
        path = self.config.records_path
        node = doc
        walked: list[str] = []
        for key in path.split(".") if path else []:
            if not isinstance(node, dict) or key not in node:
                where = ".".join(walked) or "the top level"
                # Counted, not listed: the keys are the server's content.
                found = (
                    f"an object with {len(node)} keys"
                    if isinstance(node, dict)
                    else f"a {_json_type(node)}"
                )
                raise SourceError(
                    self.name,
                    f"the response has no {key!r} under {where} (found {found}); fix records_path",
                )
            node = node[key]
            walked.append(key)
        if not isinstance(node, list):
            raise SourceError(
                self.name,
                f"expected a list of records at {path or 'the top level'}, got a "
                f"{_json_type(node)}; fix records_path",
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


def _json(body: bytes, charset: str | None) -> Any:
    """The body as JSON. Bytes that are not UTF-8 (or not the declared charset) become
    U+FFFD, as the file source reads CSV, so one bad byte quarantines its record rather than
    refusing the whole response; a leading BOM is allowed."""
    if charset is None:
        try:
            return json.loads(body)  # RFC 8259 detection: UTF-8 (BOM or not), UTF-16/32
        except UnicodeDecodeError:
            pass
    try:
        text = body.decode(charset or "utf-8", "replace")
    except LookupError:  # a charset Python does not know: as UTF-8
        text = body.decode("utf-8", "replace")
    return json.loads(text.removeprefix("\ufeff"))


def _json_type(node: Any) -> str:
    """A JSON value's type, in JSON's words."""
    if isinstance(node, dict):
        return "object"
    if isinstance(node, list):
        return "list"
    if isinstance(node, str):
        return "string"
    if isinstance(node, bool):
        return "boolean"
    return "null" if node is None else "number"


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
