"""Bounded HTTP answers for the HTTP JSON and Prometheus sources.

A body is read in chunks up to MAX_BODY_BYTES (counted after decompression, so a small gzip
bomb is no way around it) and within the source's timeout for the whole answer (httpx's
timeout is per read: a server dripping a byte a second would otherwise hold a read for
ever).
"""

from __future__ import annotations

import time

import httpx

from forecaster.errors import SourceError
from pipelines.sources.base import clip

MAX_BODY_BYTES = 128 * 1024 * 1024


def read_body(
    resp: httpx.Response, *, source: str, where: str, started: float, timeout: float
) -> bytes:
    """The body of a streamed response, or a SourceError once it is too big or too slow."""
    declared = resp.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise SourceError(source, _too_big(where, f"announced {int(declared)} bytes"))
    parts: list[bytes] = []
    size = 0
    for chunk in resp.iter_bytes():  # as they arrive: the deadline is checked between them
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise SourceError(source, _too_big(where, "sent more"))
        if time.monotonic() - started > timeout:
            raise SourceError(
                source, f"{where} did not finish its answer within {timeout:g}s (timeout)"
            )
        parts.append(chunk)
    return b"".join(parts)


def _too_big(where: str, what: str) -> str:
    return (
        f"{where} {what}, over the limit of {MAX_BODY_BYTES} bytes for one answer; ask for "
        "less at a time (a narrower query or range, fewer series)"
    )


def content_type(resp: httpx.Response) -> str:
    """The Content-Type a server declared, as an error message may show it."""
    return clip(resp.headers.get("content-type", "no content type"), 80)
