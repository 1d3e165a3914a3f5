"""Hostile and malformed input, property-based: random CSV files and JSON responses go
through the real file and HTTP JSON sources and the real ingest into a real SQLite store,
and the store is compared row by row with an oracle that classifies each generated row
from the documented rules (forecaster.frames REASONS, pipelines.ingest):

- CSV: a line that is not one record of the header's width (ragged, extra fields, quotes
  that do not balance) -> bad_record, its fields shown as far as they go;
- parse: no series -> missing_series; a name over 512 characters or holding NUL ->
  bad_series; an unreadable ts -> bad_ts (ISO 8601 with or without offset, naive = UTC,
  epoch seconds); a value that is no number -> bad_value; NaN/inf -> non_finite;
- a ts past now + max(5 min, freq) -> future;
- same series and exact ts again in a batch: the later row wins; an earlier row with
  another value -> conflicting_duplicate, with the same value it is dropped silently;
- a ts before the stored watermark minus allowed_lateness -> too_late, unless the batch's
  too-late rows of that hour aggregate to the observed value stored there: a re-send of
  what is stored, dropped silently;
- the rest: floored to the hour, averaged per bucket, stored as observed; the hours between
  a series' previous watermark (or first point) and its newest point are stored as missing;
- quarantine keeps a text over 1024 characters as its prefix, length and sha256.

Never a crash: the only exception allowed is the documented SourceError for a payload that
cannot be read at all (a CSV without its ts/value column, a body that is not JSON).

Examples per property: FORECASTER_FUZZ_EXAMPLES (default 60; e.g. 2000 for a long run).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forecaster import schema
from forecaster.config import FileSource, HttpJsonSource, SeriesDefaults
from forecaster.errors import SourceError
from forecaster.store import Store
from pipelines.ingest import run_ingest
from pipelines.sources import build_source

EXAMPLES = int(os.environ.get("FORECASTER_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
T0 = datetime(2024, 3, 1, tzinfo=UTC)
NOW = T0 + timedelta(days=3)
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)
DEFAULTS = SeriesDefaults()  # 1h buckets, mean, 7 days lateness, gaps left missing
HORIZON = NOW + max(timedelta(minutes=5), DEFAULTS.freq)
ANY = object()  # a quarantined raw field whose exact text the oracle does not predict


# -- a temporary store per example, copied from one migrated template ----------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "store.db"
    st_ = Store(f"sqlite:///{path}")
    st_.upgrade()
    st_.close()
    return path


class _Workdir:
    def __init__(self, template: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fuzz-"))
        shutil.copy(template, self.dir / "store.db")
        self.store = Store(f"sqlite:///{self.dir / 'store.db'}")

    def close(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the generated cells: what is written, and what the rules make of it -------------------


@dataclass(frozen=True)
class Name:
    csv: bytes | None  # the field as written in CSV
    json: Any  # the JSON value
    stored: str | None  # the name after decoding and stripping; None: missing
    bad: bool = False  # bad_series


@dataclass(frozen=True)
class Ts:
    text: str | None  # as written (None: null / empty field)
    instant: datetime | None  # None: bad_ts
    json: Any = None  # JSON value when not text (an epoch number)


@dataclass(frozen=True)
class Value:
    text: str | None
    number: float | None  # None: bad_value; nan/inf: non_finite
    json: Any = None


HOSTILE_NAMES = [
    "'; DROP TABLE observations; --",
    'a"} 1\nevil{x="',
    "back\\slash\\",
    "température ☃",
    "a,b",
    'q"uote',
    "tab\there",
    "emoji 🚀",
]


def _csv_field(text: str) -> bytes:
    if any(c in text for c in ',"\r\n') or text != text.strip():
        return b'"' + text.replace('"', '""').encode() + b'"'
    return text.encode()


# What polars' strip_chars() strips: Unicode White_Space (str.strip() also strips \x1c-\x1f).
WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"


def _name(text: str) -> Name:
    stored = text.strip(WHITE_SPACE) or None
    bad = stored is not None and (len(stored) > 512 or "\x00" in stored)
    return Name(_csv_field(text), text, stored, bad)


names = st.one_of(
    st.sampled_from(["meter.a", "meter.b", "  meter.a  ", "x"]).map(_name),
    st.sampled_from(HOSTILE_NAMES).map(_name),
    st.sampled_from(["", "   "]).map(_name),
    st.sampled_from([511, 512, 513, 2000]).map(lambda n: _name("n" * n)),
    st.just(_name("nul\x00byte")),
    # latin-1 bytes in a UTF-8 file: read lossily, one U+FFFD per bad byte
    st.just(Name(b"caf\xe9", None, "caf\ufffd")),
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12).map(_name),
)


def _render_ts(t: datetime, style: int, offset_min: int) -> str:
    local = (t + timedelta(minutes=offset_min)).replace(tzinfo=None)
    sign = "+" if offset_min >= 0 else "-"
    hh, mm = divmod(abs(offset_min), 60)
    frac = f".{t.microsecond:06d}" if t.microsecond else ""
    base = local.strftime("%Y-%m-%dT%H:%M:%S") + frac
    return [
        t.strftime("%Y-%m-%dT%H:%M:%S") + frac + "Z",
        f"{base}{sign}{hh:02d}:{mm:02d}",
        f"{base}{sign}{hh:02d}{mm:02d}",
        base.replace("T", " ") + f"{sign}{hh:02d}:{mm:02d}",
        t.strftime("%Y-%m-%d %H:%M:%S") + frac,  # naive: UTC
        t.strftime("%Y-%m-%dT%H:%M:%S") + frac + "z",
        f"{(t - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(seconds=1):.6f}",  # epoch
        "  " + t.strftime("%Y-%m-%dT%H:%M:%S") + frac + "Z ",
    ][style]


instants = st.one_of(
    st.integers(0, 71).map(lambda h: T0 + h * HOUR),  # on the grid: collisions likely
    st.tuples(st.integers(0, 71), st.integers(0, 3599_999_999)).map(
        lambda p: T0 + p[0] * HOUR + timedelta(microseconds=p[1] % 3_600_000_000)
    ),
    st.integers(8, 30).map(lambda d: T0 - timedelta(days=d)),  # very late
    st.integers(2, 500).map(lambda h: NOW + h * HOUR),  # future
    st.sampled_from([NOW + HOUR, NOW + HOUR + timedelta(microseconds=1)]),  # the bound
)

good_ts = st.builds(
    lambda t, style, off: Ts(_render_ts(t, style, off), t),
    instants,
    st.integers(0, 7),
    st.sampled_from([0, 330, -480, 60, -30, 840, -720]),
)
bad_ts = st.sampled_from(
    [
        "yesterday",
        "2024-13-01T00:00:00Z",
        "2024-02-30T00:00:00Z",
        "2024-03-01T24:30:00Z",
        "12:00",
        "2024-03-01T00:00:00 Europe/Paris",
        "2024-03-01T00:00:00+25:00",
        "1e9",
        "2024-03-01T00:00:00.Z",
        "0x65e11a00",
        "T" * 5000,
    ]
).map(lambda s: Ts(s, None))
epoch_numbers = st.builds(
    lambda t, half: Ts(
        None,
        t + timedelta(seconds=0.5 * half),
        (t - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(seconds=1) + 0.5 * half
        if half
        else (t - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(seconds=1),
    ),
    st.integers(0, 71).map(lambda h: T0 + h * HOUR),
    st.booleans(),
)
stamps = st.one_of(good_ts, good_ts, bad_ts, st.just(Ts(None, None)))


def _render_value(x: float, style: int) -> str:
    return [
        repr(x),
        f"{x:.17g}",
        f"{x:e}",
        f" {x!r} ",
        f"+{x!r}" if math.copysign(1, x) > 0 else repr(x),
    ][style]


finite = st.floats(allow_nan=False, allow_infinity=False)
good_values = st.one_of(
    st.builds(lambda x, s: Value(t := _render_value(x, s), float(t)), finite, st.integers(0, 4)),
    st.sampled_from(["1", "-0", ".5", "5.", "1E-3", "1e-400", "5e-324", "0"]).map(
        lambda t: Value(t, float(t))
    ),
    st.integers(-(10**6), 10**6).map(lambda i: Value(str(i), float(i))),
)
non_finite = st.sampled_from(
    ["nan", "NaN", "inf", "-inf", "Infinity", "-Infinity", "1e309", "-1e999", "1" * 400]
).map(lambda t: Value(t, float(t)))
bad_values = st.sampled_from(
    ["abc", "1,5", "1;5", "0x1g", "1.2.3", "--1", "1e", "", "  ", "1_000", "١٢", "9" * 5000 + "x"]
).map(lambda t: Value(t or None, None))
values = st.one_of(good_values, good_values, non_finite, bad_values)


@dataclass(frozen=True)
class Row:
    name: Name
    ts: Ts
    value: Value
    whole: bool = True  # False: not one record of the header's width -> bad_record


rows = st.builds(Row, names, stamps, values)


@st.composite
def batches(draw: st.DrawFn) -> list[Row]:
    """Rows with deliberate duplicates: some re-send an earlier row's series and instant,
    with the same value or another, written the same way or another."""
    out: list[Row] = []
    for _ in range(draw(st.integers(0, 40))):
        if out and draw(st.integers(0, 4)) == 0:
            prev = draw(st.sampled_from(out))
            if prev.ts.instant is not None:
                ts = prev.ts
                if draw(st.booleans()) and ts.text is not None:
                    ts = Ts(_render_ts(ts.instant, draw(st.integers(0, 7)), 330), ts.instant)
                same = draw(st.booleans())
                out.append(Row(prev.name, ts, prev.value if same else draw(good_values)))
                continue
        out.append(draw(rows))
    return out


# -- the oracle ----------------------------------------------------------------------------


@dataclass
class Expected:
    observed: dict[tuple[str, datetime], float]
    missing: set[tuple[str, datetime]]
    quarantine: list[tuple[str, str, Any, Any, Any]]  # origin, reason, series, ts, value raw
    watermark: dict[str, datetime]


def _bucket(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def _mean(vals: list[float]) -> float:
    """The exact mean, rounded once; of shares where the sum overflows (as frames.resample)."""
    try:
        return math.fsum(vals) / len(vals)
    except OverflowError:  # fsum raises where the sum of finite values is past float's range
        return math.fsum(v / len(vals) for v in vals)


def oracle(batches_: list[list[tuple[str, Row, Any, Any, Any]]]) -> Expected:
    """batches_: per batch, (origin, row, series_raw, ts_raw, value_raw) in arrival order,
    the raw texts being what quarantine should keep (ANY: not predicted)."""
    exp = Expected({}, set(), [], {})
    for batch in batches_:
        alive: list[tuple[int, str, datetime, float, tuple]] = []
        for seq, (origin, row, s_raw, t_raw, v_raw) in enumerate(batch):
            raw = (origin, s_raw, t_raw, v_raw)

            def reject(reason: str, raw: tuple = raw) -> None:
                exp.quarantine.append((raw[0], reason, *raw[1:]))

            if not row.whole:
                reject("bad_record")
            elif row.name.stored is None:
                reject("missing_series")
            elif row.name.bad:
                reject("bad_series")
            elif row.ts.instant is None:
                reject("bad_ts")
            elif row.value.number is None:
                reject("bad_value")
            elif not math.isfinite(row.value.number):
                reject("non_finite")
            elif row.ts.instant > HORIZON:
                reject("future")
            else:
                alive.append((seq, row.name.stored, row.ts.instant, row.value.number, raw))
        winners: dict[tuple[str, datetime], tuple] = {}
        for item in alive:
            winners[(item[1], item[2])] = item  # the later in arrival order wins
        kept = []
        for item in alive:
            win = winners[(item[1], item[2])]
            if item is win:
                kept.append(item)
            elif item[3] != win[3]:
                exp.quarantine.append((item[4][0], "conflicting_duplicate", *item[4][1:]))
        previous = dict(exp.watermark)
        buckets: dict[tuple[str, datetime], list[float]] = {}
        too_late: dict[tuple[str, datetime], list[tuple[float, tuple]]] = {}
        for _, name, t, v, raw in sorted(kept, key=lambda i: i[0]):
            mark = previous.get(name)
            if mark is not None and t < mark - DEFAULTS.allowed_lateness:
                too_late.setdefault((name, _bucket(t)), []).append((v, raw))
                continue
            buckets.setdefault((name, _bucket(t)), []).append(v)
        for key, late in too_late.items():
            resent = _mean([v for v, _ in late])
            if key in exp.observed and key not in exp.missing and resent == exp.observed[key]:
                continue  # already stored as sent
            exp.quarantine.extend((raw[0], "too_late", *raw[1:]) for _, raw in late)
        for key, vals in buckets.items():
            exp.observed[key] = _mean(vals)
            exp.missing.discard(key)
        for name in {n for n, _ in buckets}:
            new = [
                b for n, b in buckets if n == name and (name not in previous or b > previous[name])
            ]
            if new:
                lo = previous[name] + HOUR if name in previous else min(new)
                slot = lo
                while slot <= max(new):
                    if (name, slot) not in exp.observed:
                        exp.missing.add((name, slot))
                    slot += HOUR
            newest = max(b for n, b in buckets if n == name)
            exp.watermark[name] = max(newest, previous.get(name, newest))
    return exp


def _kept(text: str) -> str:
    """What quarantine keeps of a raw text: up to 1024 characters whole; a longer one as its
    first 1024, its length and the sha256 of all of it (forecaster.frames.bounded_text)."""
    if len(text) <= 1024:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{text[:1024]}… ({len(text)} characters, sha256 {digest})"


def check_store(store: Store, exp: Expected, source: str, tolerance: dict) -> None:
    obs = store.read_observations()
    observed = {
        (s, t): v
        for s, t, v, q in obs.select("series", "ts", "value", "quality").rows()
        if q == "observed"
    }
    missing = {
        (s, t)
        for s, t, v, q in obs.select("series", "ts", "value", "quality").rows()
        if q != "observed"
    }
    assert set(observed) == set(exp.observed), "observed points differ"
    for key, want in exp.observed.items():
        # a mean is exact up to summation error: n * eps * the largest magnitude in it
        allowed = 1e-12 * abs(want) + tolerance.get(key, 0.0) * sys.float_info.epsilon * 4
        assert abs(observed[key] - want) <= allowed, (key, observed[key], want)
        assert math.isfinite(observed[key])
    assert missing == exp.missing, "gap points differ"
    assert (obs.filter(pl.col("quality") != "observed")["value"].null_count()) == len(missing)
    stored_q, _ = store.list_quarantine(source=source, limit=1_000_000)
    got_q = sorted(
        (
            (
                r["origin"],
                r["reason"],
                r["series"] or None,
                r["ts_raw"] or None,
                r["value_raw"] or None,
            )
            for r in stored_q
        ),
        key=repr,
    )
    want_q = [
        tuple(
            None if x == "" else _kept(x).replace("\x00", "\ufffd") if isinstance(x, str) else x
            for x in q
        )
        for q in exp.quarantine
    ]

    # Each expected row matches a stored one (ANY: whatever text was kept); identical rows
    # (same source, origin, reason and texts) are one fingerprint, stored once. A row whose
    # text is ANY may be that twin of a row predicted exactly (a record re-sent at the same
    # index, read once as a number and once as text).
    def fits(want: tuple, got: tuple) -> bool:
        return all(w is ANY or w == g for w, g in zip(want, got, strict=True))

    exact = sorted({w for w in want_q if ANY not in w}, key=repr)
    loose = [w for w in want_q if ANY in w]  # not collapsed: their real texts may differ
    pool = list(got_q)
    for want in exact:
        assert want in pool, f"no quarantined row {want!r}; have {pool!r}"
        pool.remove(want)
    for want in loose:
        match = next((g for g in pool if fits(want, g)), None)
        if match is None:
            assert any(fits(want, g) for g in got_q), f"no quarantined row like {want!r}"
        else:
            pool.remove(match)
    assert pool == [], f"quarantined rows no rule explains: {pool!r}"
    with store.engine.connect() as conn:
        marks = dict(
            conn.execute(
                sa.select(schema.series.c.name, schema.watermarks.c.ts).join(
                    schema.watermarks, schema.watermarks.c.series_id == schema.series.c.id
                )
            ).all()
        )
        windows = conn.execute(
            sa.select(
                schema.windows.c.series_id,
                schema.windows.c.window_id,
                schema.windows.c.n_points,
                schema.windows.c.n_observed,
            )
        ).all()
        counts = conn.execute(
            sa.select(
                schema.observations.c.series_id,
                schema.observations.c.window_id,
                sa.func.count(),
                sa.func.sum(sa.case((schema.observations.c.quality == "observed", 1), else_=0)),
            ).group_by(schema.observations.c.series_id, schema.observations.c.window_id)
        ).all()
    assert {k: v.astimezone(UTC) for k, v in marks.items()} == exp.watermark
    assert sorted(map(tuple, windows)) == sorted(map(tuple, counts))


def _tolerance(batches_: list[list[tuple[str, Row, Any, Any, Any]]]) -> dict:
    out: dict[tuple[str, datetime], float] = {}
    for batch in batches_:
        for _, row, *_ in batch:
            if row.name.stored and row.ts.instant and row.value.number is not None:
                key = (row.name.stored, _bucket(row.ts.instant))
                if math.isfinite(row.value.number):
                    out[key] = out.get(key, 0.0) + abs(row.value.number)
    return out


# -- CSV through the real file source ------------------------------------------------------


@st.composite
def csv_files(
    draw: st.DrawFn,
) -> tuple[list[bytes], list[list[tuple[int, Row, Any, Any, Any]]], bool]:
    """Two CSV files (read one ingest run apart) with random column order, an optional
    BOM, UTF-8 or UTF-16, extra columns, ragged lines, stray quotes, newlines inside quoted
    names; returns (files, per file
    (line number, row, series_raw, ts_raw, value_raw), has series column)."""
    has_series = draw(st.integers(0, 5)) > 0
    extra = draw(st.booleans())
    columns = ["ts", "value"] + (["series"] if has_series else []) + (["note"] if extra else [])
    columns = draw(st.permutations(columns))
    files, expected = [], []
    for stem in "ab":
        header = ",".join(columns).encode() + b"\n"
        if draw(st.integers(0, 4)) == 0:
            header = b"\xef\xbb\xbf" + header
        lines, exp = [header], []
        for row in draw(batches()):
            if not has_series:
                row = Row(_name(stem), row.ts, row.value)
            if row.ts.text is None and row.ts.json is not None:
                row = Row(row.name, Ts(None, None), row.value)
            kind = draw(st.integers(0, 9))
            texts = {
                "series": row.name.csv,
                "ts": _csv_field(row.ts.text) if row.ts.text is not None else b"",
                "value": _csv_field(row.value.text) if row.value.text is not None else b"",
                "note": _csv_field(draw(st.sampled_from(["", "x", "a,b", 'say "hi"']))),
            }
            fields = [texts[c] for c in columns]
            name, ts, value, whole = row.name, row.ts, row.value, True
            # A line that is not one record of the header's width is quarantined whole
            # (bad_record), its fields shown as far as they go.
            if kind == 0:  # ragged: the line stops early; what is left out is null
                cut = draw(st.integers(1, len(columns)))
                fields = fields[:cut]
                whole = cut == len(columns)
                gone = set(columns[cut:])
                if "series" in gone:
                    name = _name("")
                if "ts" in gone:
                    ts = Ts(None, None)
                if "value" in gone:
                    value = Value(None, None)
            elif kind == 1:  # too many fields
                fields = fields + [b"junk", b"1"]
                whole = False
            elif kind == 2 and has_series:
                # A stray quote: the line is not CSV, shown split on its commas as it stands.
                whole = False
                plain = draw(st.sampled_from(["meter.a", "meter.b", "x"]))
                where = draw(st.sampled_from(["series", "ts", "value"]))
                texts = {
                    "series": plain,
                    "ts": row.ts.text.strip() if row.ts.instant and row.ts.text else "2024-03-01",
                    "value": "1.5",
                    "note": "n",
                }
                pos = draw(st.sampled_from(["start", "mid", "end"]))
                t = texts[where]
                t = {"start": '"' + t, "mid": t[:1] + '"' + t[1:], "end": t + '"'}[pos]
                texts[where] = t
                fields = [texts[c].encode() for c in columns]
                name = _name(texts["series"])
                instant = (
                    (row.ts.instant if row.ts.instant and row.ts.text else T0)
                    if where != "ts"
                    else None
                )
                ts = Ts(texts["ts"], instant)
                value = Value(texts["value"], None if where == "value" else 1.5)
            line = b",".join(fields) + draw(st.sampled_from([b"\n", b"\r\n"]))
            if line.count(b"\n") > 1:
                # A newline inside a quoted name: records spanning lines are not read, so
                # each of its lines is quarantined on its own (as it stands: texts not
                # predicted); blank ones are no rows at all.
                for piece in line.split(b"\n")[:-1]:
                    if piece.strip():
                        lines.append(piece + b"\n")
                        exp.append((len(lines), Row(name, ts, value, False), ANY, ANY, ANY))
                continue
            if not line.strip():
                continue  # a blank line is not a row (pipelines.sources.file)
            lines.append(line)
            raw_ts = None if ts.text is None else (ts.text if "\ufffd" not in ts.text else ANY)
            exp.append((len(lines), Row(name, ts, value, whole), name.stored, raw_ts, value.text))
        data = b"".join(lines)
        codec = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-16-le", "utf-16-be"]))
        if codec != "utf-8":  # UTF-16 with its BOM reads the same (unless not UTF-8 text)
            try:
                data = ("\ufeff" + data.decode().removeprefix("\ufeff")).encode(codec)
            except UnicodeDecodeError:
                pass
        files.append(data)
        expected.append(exp)
    return files, expected, has_series


@pytest.mark.slow
@FUZZ
@given(case=csv_files())
def test_random_csv_files_are_stored_or_quarantined_row_by_row(template: Path, case) -> None:
    files, expected, _ = case
    work = _Workdir(template)
    try:
        src = build_source("fz", FileSource(path=str(work.dir / "in" / "*.csv")))
        (work.dir / "in").mkdir()
        per_batch = []
        for i, (data, exp) in enumerate(zip(files, expected, strict=True)):
            path = work.dir / "in" / f"{'ab'[i]}.csv"  # the stem names a series-less file's rows
            path.write_bytes(data)
            run_ingest(work.store, src, DEFAULTS, now=NOW)
            per_batch.append([(f"{path}:{n}", *rest) for n, *rest in exp])
        want = oracle(per_batch)
        check_store(work.store, want, "fz", _tolerance(per_batch))
        before = work.store.table_counts()
        again = run_ingest(work.store, src, DEFAULTS, now=NOW)
        assert again.rows_read == 0 and work.store.table_counts() == before
    finally:
        work.close()


# -- JSON through the real HTTP JSON source ------------------------------------------------


@dataclass
class _Served:
    body: bytes = b"[]"
    content_type: str = "application/json"


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, _Served]]:
    """A real HTTP server on 127.0.0.1 answering every GET with the bytes it holds."""
    served = _Served()

    class _Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            self.send_response(200)
            self.send_header("Content-Type", served.content_type)
            self.send_header("Content-Length", str(len(served.body)))
            self.end_headers()
            self.wfile.write(served.body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/points", served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


SURROGATE = "lone \ud800 surrogate"  # JSON may escape it; no UTF-8 string can hold it
MARK = "\u2603MARK\u2603"  # replaced by a latin-1 byte in the body


@dataclass(frozen=True)
class Record:
    doc: Any  # the JSON value sent (a dict, or anything else)
    series: Any  # str | None (missing_series) | "BAD"
    bad_series: bool
    ts: Any  # the JSON ts value; _MISSING when the key is absent
    ts_instant: datetime | None  # when the ts is text or a number
    value: Any
    value_number: float | None  # as text, parsed by the rules; for numbers float(v)
    ts_text: str | None = None  # the rule-level text when ts is a string
    value_text: str | None = None


_MISSING = object()


@st.composite
def records(draw: st.DrawFn) -> Record:
    if draw(st.integers(0, 19)) == 0:  # not an object: a row of nulls under the source's name
        doc = draw(st.sampled_from([5, "x", None, [1, 2], True]))
        return Record(doc, "api", False, _MISSING, None, _MISSING, None)
    row = draw(rows)
    doc: dict[str, Any] = {}
    kind = draw(st.integers(0, 9))
    if kind == 0:
        series, bad = "api", False  # no series key: the source's name
    elif kind == 1:
        doc["series"], series, bad = None, None, False
    elif kind == 2:
        n = draw(st.integers(-5, 10**20))
        doc["series"], series, bad = n, str(n), False
    elif kind == 3:
        doc["series"], series, bad = SURROGATE, SURROGATE.replace("\ud800", "\ufffd"), False
    elif kind == 4:
        doc["series"], series, bad = f"caf{MARK}", "caf\ufffd", False
    else:
        text = row.name.json if row.name.json is not None else "meter.a"
        name = _name(text)
        doc["series"], series, bad = text, name.stored, name.bad
    tk = draw(st.integers(0, 9))
    ts_text = None
    if tk == 0:
        ts, instant = _MISSING, None
    elif tk == 1:
        ep = draw(epoch_numbers)
        ts, instant = ep.json, ep.instant
    elif tk == 2:
        ts, instant = draw(st.sampled_from([float("nan"), 1e20, True, -1e300])), None
    elif tk == 3:
        ts, instant = None, None
    else:
        ts, instant, ts_text = row.ts.text, row.ts.instant, row.ts.text
    vk = draw(st.integers(0, 9))
    value_text = None
    if vk == 0:
        value, number = _MISSING, None
    elif vk == 1:
        value = draw(st.one_of(finite, st.integers(-(10**25), 10**25)))
        number = float(str(value)) if isinstance(value, int) else value
    elif vk == 2:
        value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf"), 10**400]))
        number = float(str(value)) if isinstance(value, int) else value
    elif vk == 3:
        value, number = draw(st.sampled_from([True, False, None, {"a": 1}, [1.5]])), None
    else:
        value, number, value_text = row.value.text, row.value.number, row.value.text
    if ts is not _MISSING:
        doc["ts"] = ts
    if value is not _MISSING:
        doc["value"] = value
    if draw(st.booleans()):
        doc[draw(st.sampled_from(["extra", "note", "value2"]))] = draw(
            st.sampled_from([None, 1, "x" * 3000, {"deep": [1, {"x": None}]}])
        )
    return Record(doc, series, bad, ts, instant, value, number, ts_text, value_text)


def _column_kinds(vals: list[Any]) -> set[str]:
    """pipelines.sources.loose_column's view of a column."""
    out = set()
    for v in vals:
        if v is None or v is _MISSING:
            continue
        out.add(
            "int"
            if isinstance(v, int) and not isinstance(v, bool)
            else "float"
            if isinstance(v, float)
            else "other"
        )
    return out


def _numeric(kinds: set[str], vals: list[Any]) -> bool:
    if kinds <= {"int"}:
        return all(v is None or v is _MISSING or -(2**63) <= v < 2**63 for v in vals)
    return kinds <= {"int", "float"}


def _as_text(v: Any) -> str | None:
    if v is None or v is _MISSING:
        return None
    if isinstance(v, str):
        return v.replace("\ud800", "\ufffd")
    if isinstance(v, dict | list):
        return json.dumps(v)
    return str(v)


def _expect_json(batch: list[Record], url: str) -> list[tuple[str, Row, Any, Any, Any]]:
    """Each record as the oracle's Row, with the quarantine texts it should leave."""
    ts_vals = [r.ts for r in batch]
    v_vals = [r.value for r in batch]
    ts_kinds, v_kinds = _column_kinds(ts_vals), _column_kinds(v_vals)
    ts_numeric, v_numeric = _numeric(ts_kinds, ts_vals), _numeric(v_kinds, v_vals)
    out = []
    for i, r in enumerate(batch):
        # ts: a number is epoch seconds, as a number or as its text (str(int), repr(float))
        if r.ts_text is not None:
            instant, ts_raw = r.ts_instant, r.ts_text
        elif r.ts is None or r.ts is _MISSING:
            instant, ts_raw = None, None
        elif isinstance(r.ts, bool):
            instant, ts_raw = None, "True" if r.ts else "False"
        else:
            instant = r.ts_instant
            ts_raw = ANY if ts_numeric and "float" in ts_kinds else str(r.ts)
        if r.value_text is not None:
            number, v_raw = r.value_number, r.value_text
        elif r.value is None or r.value is _MISSING or isinstance(r.value, bool | dict | list):
            number, v_raw = None, _as_text(r.value)
        else:
            number = r.value_number
            # a Float64 column's text is polars' formatting; a text column's is repr()
            v_raw = ANY if v_numeric and "float" in v_kinds else _as_text(r.value)
        name = Name(None, None, r.series, r.bad_series)
        row = Row(name, Ts(None, instant), Value(None, number))
        series_raw = r.series if r.series is not None else None
        out.append((f"{url}#{i}", row, series_raw, ts_raw, v_raw))
    return out


def _body(batch: list[Record], mode: str) -> tuple[bytes, str]:
    docs = [r.doc for r in batch]
    text = json.dumps(docs, ensure_ascii=mode == "ascii")
    if mode == "latin-1" and all(ord(c) < 256 for c in text.replace(MARK, "")):
        return text.replace(MARK, "\xe9").encode("latin-1"), "application/json; charset=iso-8859-1"
    if "\ud800" in text:  # a lone surrogate cannot be UTF-8: send it escaped
        text = json.dumps(docs)
    data = text.encode()
    data = data.replace(MARK.encode(), b"\xe9").replace(json.dumps(MARK)[1:-1].encode(), b"\xe9")
    if mode == "bom":
        data = b"\xef\xbb\xbf" + data
    return data, "application/json"


def _declared_latin1(r: Record) -> Record:
    if isinstance(r.doc, dict) and r.doc.get("series") == f"caf{MARK}":
        return Record(**{**r.__dict__, "series": "café"})
    return r


@pytest.mark.slow
@FUZZ
@given(
    polls=st.lists(st.lists(records(), max_size=30), min_size=2, max_size=2),
    modes=st.lists(st.sampled_from(["utf-8", "ascii", "bom", "latin-1"]), min_size=2, max_size=2),
)
def test_random_json_responses_are_stored_or_quarantined_row_by_row(
    template: Path, server: tuple[str, _Served], polls: list[list[Record]], modes: list[str]
) -> None:
    url, served = server
    work = _Workdir(template)
    try:
        src = build_source("api", HttpJsonSource(url=url))
        per_batch = []
        for batch, mode in zip(polls, modes, strict=True):
            served.body, served.content_type = _body(batch, mode)
            if "charset" in served.content_type:  # declared and honoured: the byte is é
                batch = [_declared_latin1(r) for r in batch]
            run_ingest(work.store, src, DEFAULTS, now=NOW)
            per_batch.append(_expect_json(batch, url))
        want = oracle(per_batch)
        check_store(work.store, want, "api", _tolerance(per_batch))
    finally:
        work.close()


# -- regressions: one per bug the properties found -----------------------------------------


def _ingest_file(store: Store, path: Path, data: bytes, **series: Any) -> None:
    path.write_bytes(data)
    src = build_source("f", FileSource(path=str(path)))
    run_ingest(store, src, SeriesDefaults(**series), now=NOW)


def _stored(store: Store) -> dict[tuple[str, str], float]:
    obs = store.read_observations().filter(pl.col("quality") == "observed")
    return {(s, t.strftime("%dT%H")): v for s, t, v in obs.select("series", "ts", "value").rows()}


def _quarantined(store: Store) -> dict[str, tuple[str, str | None]]:
    rows, _ = store.list_quarantine(limit=1000)
    return {r["origin"].rsplit(":", 1)[-1]: (r["reason"], r["series"]) for r in rows}


def test_a_stray_quote_costs_only_its_own_line(tmp_path: Path) -> None:
    """A quote that opens a field and never closes used to fail the whole chunk (SourceError,
    the source stuck on it forever) or swallow the lines up to the next quote. Then such a
    line was split on its commas and stored: '"b' and 'c"' became series, which is also how
    a quoted newline inside a name was misread (tests/pipelines/sources/test_csv_lines.py).
    Now each such line is quarantined as bad_record, its neighbours untouched."""
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.upgrade()
    data = (
        b"series,ts,value\n"
        b"a,2024-03-01T00:00:00Z,1\n"
        b'"b,2024-03-01T00:00:00Z,2\n'  # opens a quote
        b"a,2024-03-01T01:00:00Z,3\n"
        b'c",2024-03-01T00:00:00Z,4\n'  # ...which this one would close
        b'a,2024-03-01T02:00:00Z,5"\n'
        b'"d,e",2024-03-01T00:00:00Z,6\n'  # proper quoting still works
    )
    _ingest_file(store, tmp_path / "q.csv", data)
    assert _stored(store) == {("a", "01T00"): 1.0, ("a", "01T01"): 3.0, ("d,e", "01T00"): 6.0}
    assert _quarantined(store) == {
        "3": ("bad_record", '"b'),  # shown split on its commas as it stands
        "5": ("bad_record", 'c"'),
        "6": ("bad_record", "a"),
    }
    store.close()


def test_the_oracle_expects_a_too_late_resend_of_the_stored_value_dropped(template: Path) -> None:
    """Too-late rows whose hour aggregates to the observed value stored there are a re-send,
    dropped silently (pipelines.ingest); the oracle expected them quarantined too_late. The
    rest of the too-late rows (another value; an hour stored as missing) still are."""
    work = _Workdir(template)
    late = T0 - timedelta(days=10)  # older than the second file's watermark minus 7 days

    def row(t: datetime, value: str) -> Row:
        return Row(_name("x"), Ts(_render_ts(t, 0, 0), t), Value(value, float(value)))

    files = [
        [row(late, "5"), row(late - HOUR, "4"), row(late + HOUR, "2"), row(T0, "1")],
        [
            row(late, "5"),  # as stored: dropped
            row(late - HOUR + 10 * MINUTE, "3"),  # with the next row averages 4, as stored
            row(late - HOUR + 20 * MINUTE, "5"),
            row(late + HOUR, "2.5"),  # another value: too_late
            row(late + 2 * HOUR, "2"),  # stored as missing: too_late
        ],
    ]
    try:
        src = build_source("fz", FileSource(path=str(work.dir / "in" / "*.csv")))
        (work.dir / "in").mkdir()
        per_batch = []
        for stem, rows_ in zip("ab", files, strict=True):
            path = work.dir / "in" / f"{stem}.csv"
            lines = [b"series,ts,value"] + [
                b"x," + r.ts.text.encode() + b"," + r.value.text.encode() for r in rows_
            ]
            path.write_bytes(b"\n".join(lines) + b"\n")
            run_ingest(work.store, src, DEFAULTS, now=NOW)
            per_batch.append(
                [(f"{path}:{n}", r, "x", r.ts.text, r.value.text) for n, r in enumerate(rows_, 2)]
            )
        want = oracle(per_batch)
        assert [(q[1], q[4]) for q in want.quarantine] == [("too_late", "2.5"), ("too_late", "2")]
        check_store(work.store, want, "fz", _tolerance(per_batch))
    finally:
        work.close()


def test_the_mean_of_huge_values_is_finite(tmp_path: Path) -> None:
    """mean(1e308, 1e308) overflowed to inf and inf was stored, past the non_finite rule."""
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.upgrade()
    data = b"series,ts,value\na,2024-03-01T00:00:00Z,1e308\na,2024-03-01T00:30:00Z,1e308\n"
    _ingest_file(store, tmp_path / "m.csv", data)
    assert _stored(store) == {("a", "01T00"): 1e308}
    store.close()


def test_a_sum_that_overflows_is_quarantined_not_stored_as_inf(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.upgrade()
    data = (
        b"series,ts,value\n"
        b"a,2024-03-01T00:00:00Z,1e308\n"
        b"a,2024-03-01T00:30:00Z,1e308\n"
        b"a,2024-03-01T01:00:00Z,1e308\n"
        b"b,2024-03-01T00:10:00Z,2\n"
    )
    _ingest_file(store, tmp_path / "s.csv", data, aggregate="sum")
    assert _stored(store) == {("a", "01T01"): 1e308, ("b", "01T00"): 2.0}
    rows, counts = store.list_quarantine()
    assert counts == {"non_finite": 2}
    assert {r["detail"] for r in rows} == {"the sum of its 1h bucket overflows"}
    store.close()


def test_names_and_text_the_store_cannot_hold_are_quarantined_on_every_dialect(db_url) -> None:
    """On PostgreSQL a series name over 512 characters, or NUL in any text, failed the whole
    batch (psycopg DataError) for ever; now such rows are quarantined alike on both."""
    from pipelines.ingest import ingest_batch
    from pipelines.sources.base import Batch, raw_frame

    store = Store(db_url)
    store.upgrade()
    names = ["n" * 512, "n" * 513, "nul\x00name", "ok", "ok"]
    ts = ["2024-03-01T00:00:00Z"] * 3 + ["2024-03-01\x00", "2024-03-01T01:00:00Z"]
    values = ["1", "2", "3", "4", "5\x00"]
    batch = Batch(raw_frame(names, ts, values, [f"o{i}" for i in range(5)]), {"n": 1})
    result = ingest_batch(store, "t", batch, SeriesDefaults(), NOW)
    assert result.quarantined == {"bad_series": 2, "bad_ts": 1, "bad_value": 1}
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(schema.series.c.name)).scalars().all() == ["n" * 512]
    rows, _ = store.list_quarantine()
    got = {r["origin"]: (r["reason"], r["series"], r["ts_raw"], r["value_raw"]) for r in rows}
    assert got == {
        "o1": ("bad_series", "n" * 513, "2024-03-01T00:00:00Z", "2"),
        "o2": ("bad_series", "nul\ufffdname", "2024-03-01T00:00:00Z", "3"),
        "o3": ("bad_ts", "ok", "2024-03-01\ufffd", "4"),
        "o4": ("bad_value", "ok", "2024-03-01T01:00:00Z", "5\ufffd"),
    }
    store.close()


def _serve(served: _Served, body: bytes, content_type: str = "application/json") -> None:
    served.body, served.content_type = body, content_type


def test_json_with_bad_bytes_a_bom_or_a_lone_surrogate_is_read_record_by_record(
    tmp_path: Path, server: tuple[str, _Served]
) -> None:
    """A latin-1 byte in a UTF-8 body and a lone surrogate escape used to refuse or crash
    the whole response (UnicodeDecodeError as 'did not return JSON'; UnicodeEncodeError
    out of polars); now they read as U+FFFD, like the file source's lossy UTF-8."""
    url, served = server
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.upgrade()
    src = build_source("api", HttpJsonSource(url=url))
    bodies = [
        (b'[{"series": "caf\xe9", "ts": "2024-03-01T00:00:00Z", "value": 1}]', "application/json"),
        (
            b'\xef\xbb\xbf[{"series": "bom", "ts": "2024-03-01T00:00:00Z", "value": 2}]',
            "application/json",
        ),
        (
            b'[{"series": "s\\ud800", "ts": "2024-03-01T00:00:00Z", "value": "3\\udfff"}]',
            "application/json",
        ),
        (
            '[{"series": "café", "ts": "2024-03-01T01:00:00Z", "value": 4}]'.encode("latin-1"),
            "application/json; charset=iso-8859-1",
        ),
    ]
    for body, content_type in bodies:
        _serve(served, body, content_type)
        run_ingest(store, src, DEFAULTS, now=NOW)
    assert _stored(store) == {
        ("caf\ufffd", "01T00"): 1.0,
        ("bom", "01T00"): 2.0,
        ("café", "01T01"): 4.0,
    }
    rows, _ = store.list_quarantine()
    assert [(r["reason"], r["series"], r["value_raw"]) for r in rows] == [
        ("bad_value", "s\ufffd", "3\ufffd")
    ]
    store.close()


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"[" * 100_000, "RecursionError"),  # used to escape as a bare RecursionError
        (b'[{"series": "a", "ts": 1', "JSONDecodeError"),
        (b"<html>busy</html>", "JSONDecodeError"),
        (b"", "JSONDecodeError"),
    ],
)
def test_a_body_that_is_no_json_is_one_clear_source_error(
    tmp_path: Path, server: tuple[str, _Served], body: bytes, why: str
) -> None:
    url, served = server
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.upgrade()
    _serve(served, body)
    with pytest.raises(SourceError, match=rf"source 'api': {url} did not return JSON .*{why}"):
        run_ingest(store, build_source("api", HttpJsonSource(url=url)), DEFAULTS, now=NOW)
    assert store.table_counts()["observations"] == 0 and store.get_cursor("api") is None
    store.close()


def test_frames_series_limit_is_the_schemas() -> None:
    from forecaster.frames import MAX_SERIES_NAME

    assert schema.series.c.name.type.length == MAX_SERIES_NAME


# -- hostile names: verbatim through the real sources, escaped in /metrics ---------------------


@pytest.mark.prometheus
def test_hostile_names_from_csv_and_json_are_stored_verbatim_and_exposed_parseably(
    tmp_path: Path, server: tuple[str, _Served]
) -> None:
    """tests/forecaster/test_metrics.py feeds hostile names to ingest_batch directly; here they
    come through the CSV parser and the JSON source, under a hostile source name too, and
    are read back from SQL and from a /metrics body that promtool accepts."""
    import subprocess

    from prometheus_client.parser import text_string_to_metric_families

    from forecaster.clock import FixedClock
    from forecaster.config import MetricsSettings
    from forecaster.metrics import ServiceMetrics, render
    from tests.conftest import require_binary

    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.upgrade()
    csv_names = [n for n in HOSTILE_NAMES if "\n" not in n]
    lines = [b"series,ts,value"] + [
        _csv_field(n) + f",2024-03-01T0{i}:00:00Z,{i}.5".encode() for i, n in enumerate(csv_names)
    ]
    _ingest_file(store, tmp_path / "hostile.csv", b"\n".join(lines) + b"\n")
    url, served = server
    json_names = [f"json {n}" for n in HOSTILE_NAMES]
    docs = [
        {"series": n, "ts": f"2024-03-01T0{i}:00:00Z", "value": i + 0.25}
        for i, n in enumerate(json_names)
    ] + [{"series": HOSTILE_NAMES[0], "ts": "never", "value": 1}]
    _serve(served, json.dumps(docs).encode())
    source = 'src"\n\\'
    run_ingest(store, build_source(source, HttpJsonSource(url=url)), DEFAULTS, now=NOW)

    with store.engine.connect() as conn:
        stored = set(conn.execute(sa.select(schema.series.c.name)).scalars())
    assert stored == set(csv_names) | set(json_names)
    newest = {name: store.read_observations(name).row(-1, named=True)["value"] for name in stored}
    assert newest == {n: i + 0.5 for i, n in enumerate(csv_names)} | {
        n: i + 0.25 for i, n in enumerate(json_names)
    }

    metrics = ServiceMetrics(store, MetricsSettings(), FixedClock(NOW), job_ids=[])
    body, _ = render(metrics.registry)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body.decode())
        for s in fam.samples
    }
    for name, value in newest.items():
        assert samples[("forecaster_observation", (("series", name),))] == value
    quarantined = ("forecaster_quarantined_rows_total", (("reason", "bad_ts"), ("source", source)))
    assert samples[quarantined] == 1
    proc = subprocess.run(
        [require_binary("promtool"), "check", "metrics"],
        input=body,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()
    store.close()
