"""Why a raw row is quarantined, and the bounds behind those reasons: plain data, importable
without polars (the `quarantine list` command explains the reasons and starts fast)."""

from __future__ import annotations

# The longest series name the store takes (schema.series.name is String(512)); PostgreSQL
# refuses a longer one, and any text holding NUL, so such a name would fail its whole batch.
MAX_SERIES_NAME = 512
# A raw ts or value text over this many characters is not read: no timestamp or number needs
# it, and parsing megabytes of text per row is how one line once cost a gigabyte.
MAX_FIELD_CHARS = 4096
# Quarantine keeps at most this many characters of a raw text, then its length and sha256:
# enough to recognise the row, and a 50 MB field no longer lands whole in the store.
QUARANTINE_TEXT_CHARS = 1024

# Reasons a raw row is quarantined instead of stored. Stable strings: they are a metric label.
REASONS = {
    "bad_record": "the source could not read the row as written: a line over the length "
    "limit, quotes that do not balance, or a field count unlike the header's (see detail)",
    "missing_series": "the row names no series",
    "bad_series": f"the series name is over {MAX_SERIES_NAME} characters or holds a NUL character",
    "bad_ts": "the timestamp could not be read (ISO 8601 or epoch seconds expected) or is over "
    f"{MAX_FIELD_CHARS} characters",
    "bad_value": f"the value is missing, not a number, or over {MAX_FIELD_CHARS} characters",
    "non_finite": "the value is NaN or infinite",
    "conflicting_duplicate": "another value for the same series and time arrived later in the batch",
    "unknown_series": "the series does not exist and auto_create is off",
    "too_late": "older than the series' watermark minus the allowed lateness",
    "future": "the timestamp lies ahead of the clock",
}
