"""Hostile CSV files through the real file source: bounded reading, errors that never quote
the file, and no silent misreads (pipelines.sources.lines, pipelines.sources.file)."""

from __future__ import annotations

import gzip
import hashlib
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from forecaster.config import FileSource, SeriesDefaults
from forecaster.errors import SourceError
from forecaster.store import Store
from pipelines.ingest import run_ingest
from pipelines.sources import build_source
from pipelines.sources.file import FileSourceReader
from pipelines.sources.lines import MAX_LINE_BYTES

HEADER = b"series,ts,value\n"


def source(path: Path | str, **kw: Any) -> FileSourceReader:
    src = build_source("files", FileSource(path=str(path), **kw))
    assert isinstance(src, FileSourceReader)
    return src


def read_all(src: FileSourceReader, now: datetime, cursor: Any = None) -> tuple[pl.DataFrame, Any]:
    batches = list(src.read(cursor, now))
    rows = [b.rows for b in batches if b.rows.height]
    return (pl.concat(rows) if rows else pl.DataFrame()), (
        batches[-1].cursor if batches else cursor
    )


def error_of(src: FileSourceReader, now: datetime, cursor: Any = None) -> str:
    with pytest.raises(SourceError) as err:
        read_all(src, now, cursor)
    return str(err.value)


# -- unbounded input ----------------------------------------------------------------------


def test_a_huge_header_is_refused_at_once_in_a_short_message(tmp_path: Path, now: datetime) -> None:
    """A 20 MB header without a newline took 258 s to be refused, in a 21 MB message that
    listed every column; the first reads even waited for its newline."""
    f = tmp_path / "wide.csv"
    f.write_bytes(b"colname," * 200_000)  # 1.6 MB, no newline: a writer "still busy"
    started = time.monotonic()
    msg = error_of(source(f), now)
    assert time.monotonic() - started < 2
    assert f"line 1 (the header) is over {MAX_LINE_BYTES} bytes" in msg
    assert len(msg) < 400 and "colname" not in msg


def test_an_over_long_line_is_quarantined_by_size_and_hash_and_its_neighbours_read(
    tmp_path: Path, now: datetime
) -> None:
    """A 50 MB value line peaked at 1 GB RSS and was stored whole in quarantine. Now it is
    streamed past in chunks, never held: Python's peak memory stays a few chunks while
    reading a 20 MB line, and the row says where it is, how long and its sha256."""
    long_line = b"b,2024-03-01T01:00:00Z," + b"9" * 20_000_000 + b"\n"
    f = tmp_path / "big.csv"
    f.write_bytes(
        HEADER + b"a,2024-03-01T00:00:00Z,1\n" + long_line + b"c,2024-03-01T02:00:00Z,3\n"
    )
    tracemalloc.start()
    try:
        rows, _ = read_all(source(f), now)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, peak
    assert rows.select("series", "value", "origin").rows() == [
        ("a", "1", f"{f}:2"),
        (None, None, f"{f}:3"),
        ("c", "3", f"{f}:4"),
    ]
    digest = hashlib.sha256(long_line).hexdigest()
    assert rows["problem"].to_list() == [
        None,
        f"the line is {len(long_line)} bytes, over the limit of {MAX_LINE_BYTES}; sha256 {digest}",
        None,
    ]


def test_an_over_long_line_in_gzip_and_one_still_being_written(
    tmp_path: Path, now: datetime
) -> None:
    """The same bound inside a gzip stream; an unfinished over-long last line waits, like
    any unfinished line, and is not counted twice once it is finished."""
    big = b"b,2024-03-01T01:00:00Z," + b"7" * 300_000
    g = tmp_path / "g.csv.gz"
    g.write_bytes(gzip.compress(HEADER + big + b"\na,2024-03-01T00:00:00Z,1\n"))
    rows, _ = read_all(source(g), now)
    assert rows["origin"].to_list() == [f"{g}:2", f"{g}:3"]
    assert rows["problem"][0].startswith(f"the line is {len(big) + 1} bytes")

    f = tmp_path / "live.csv"
    f.write_bytes(HEADER + b"a,2024-03-01T00:00:00Z,1\n" + big)  # no newline yet
    src = source(f)
    rows, cursor = read_all(src, now)
    assert rows["origin"].to_list() == [f"{f}:2"]
    with f.open("ab") as fh:
        fh.write(b"\nc,2024-03-01T02:00:00Z,3\n")
    rows, cursor = read_all(src, now, cursor)
    assert rows["origin"].to_list() == [f"{f}:3", f"{f}:4"]
    assert rows["problem"].is_null().to_list() == [False, True]
    assert read_all(src, now, cursor)[0].is_empty()


def _cli(config: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORECASTER_")}
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "--config", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def test_forecaster_ingest_on_a_huge_header_stops_within_seconds_of_sigterm(
    tmp_path: Path,
) -> None:
    """The reported case: a 20 MB header without a newline, read once the file had settled,
    kept `forecaster ingest` busy for minutes in one native call, deaf to SIGTERM, and then
    printed a 21 MB error. Now it is refused at once, and the process is gone within a
    couple of seconds of a SIGTERM whatever it was doing."""
    data = tmp_path / "wide.csv"
    data.write_bytes(b"a," * 10_000_000)
    config = tmp_path / "f.toml"
    config.write_text(
        f'database_url = "sqlite:///{tmp_path / "s.db"}"\n'
        f'[sources.wide]\nkind = "file"\npath = "{data}"\ninterval = "1s"\n'
    )
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.upgrade()
    store.close()
    # A first pass used to wait for the header's newline and store the file's size, so
    # that the next found it settled and took the line as it is.
    first = _cli(config, "ingest", "--source", "wide")
    first.communicate(timeout=60)
    proc = _cli(config, "ingest", "--source", "wide", "--follow")
    try:
        time.sleep(3)  # past start-up, into reading
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=30)
        waited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert waited < 2, f"still running {waited:.1f}s after SIGTERM"
    assert proc.returncode == 1, err[-2000:]
    assert len(err) < 2000 and b"a,a,a" not in err
    assert b"is over 65536 bytes" in err


# -- errors that quote positions, never content -------------------------------------------


def test_errors_never_quote_the_file(tmp_path: Path, now: datetime) -> None:
    """A path pointed (by a symlink) at a system file printed its first line."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"root:x:0:0:SECRET-TOKEN:/root:/bin/bash\nsecond line\n")
    link = tmp_path / "data.csv"
    link.symlink_to(secret)
    msg = error_of(source(link), now)
    assert "SECRET" not in msg and "root:x" not in msg
    assert f"{link} line 1 (the header) has no column 'ts' among its 1 column" in msg

    gz = tmp_path / "fake.csv.gz"
    gz.write_bytes(b"\x1f\x8bSECRET and more" * 3)
    msg = error_of(source(gz), now)
    assert "not a valid gzip file" in msg and "SECRET" not in msg

    pq = tmp_path / "fake.parquet"
    pq.write_bytes(b"SECRET" * 10)
    msg = error_of(source(pq), now)
    assert "cannot read Parquet file" in msg and "SECRET" not in msg


def test_a_file_name_with_control_characters_is_escaped_in_errors(
    tmp_path: Path, now: datetime
) -> None:
    f = tmp_path / "evil\n\x1b[2Jname.csv"
    f.write_bytes(b"nope\n")
    msg = error_of(source(f), now)
    assert "\n" not in msg and "\x1b" not in msg
    assert "evil\\x0a\\x1b[2Jname.csv" in msg


def test_a_header_with_a_quote_left_open_is_refused_by_position(
    tmp_path: Path, now: datetime
) -> None:
    f = tmp_path / "q.csv"
    f.write_bytes(b'series,"ts,value\na,1,2\n')
    msg = error_of(source(f), now)
    assert "line 1 (the header) is not one CSV record: its quotes do not balance" in msg


# -- silent misreads ----------------------------------------------------------------------


def test_a_duplicated_header_column_is_an_error_naming_it(tmp_path: Path, now: datetime) -> None:
    """`value` twice used to read the first and drop the second without a word."""
    f = tmp_path / "dup.csv"
    f.write_bytes(b"series,ts,value,value\na,2024-03-01T00:00:00Z,1,2\n")
    msg = error_of(source(f), now)
    assert "names column 'value' 2 times (columns 3, 4)" in msg
    # A column nobody reads may repeat: nothing is ambiguous.
    f.write_bytes(b"series,note,ts,value,note\na,x,2024-03-01T00:00:00Z,1,y\n")
    rows, _ = read_all(source(f), now)
    assert rows.select("series", "value", "problem").rows() == [("a", "1", None)]


def test_a_quoted_newline_in_a_name_is_quarantined_not_split_into_series(
    tmp_path: Path, now: datetime
) -> None:
    """`"a<newline>b",ts,1` was read as two rows: series '"a' (quarantined) and series
    'b"' with the value 1, stored. Records spanning lines are not read: both lines are
    quarantined, saying why."""
    f = tmp_path / "nl.csv"
    f.write_bytes(HEADER + b'"a\nb",2024-03-01T00:00:00Z,1\nc,2024-03-01T00:00:00Z,2\n')
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.upgrade()
    run_ingest(store, source(f), SeriesDefaults(), now=now)
    stored = store.read_observations()
    assert set(stored["series"]) == {"c"}
    rows, counts = store.list_quarantine()
    assert counts == {"bad_record": 2}
    assert sorted(r["origin"] for r in rows) == [f"{f}:2", f"{f}:3"]
    assert all("a record spanning lines is not read" in r["detail"] for r in rows)
    store.close()


def test_ragged_and_over_wide_lines_are_quarantined_not_padded_or_cut(
    tmp_path: Path, now: datetime
) -> None:
    """An extra field (a decimal comma: `1,5`) was dropped, storing 1; a missing one was
    padded with null. Either way the fields may not be where the header says."""
    f = tmp_path / "r.csv"
    f.write_bytes(
        HEADER
        + b"a,2024-03-01T00:00:00Z,1,5\n"
        + b"b,2024-03-01T00:00:00Z\n"
        + b'c,2024-03-01T00:00:00Z,"3"\n'
        + b'd,2024-03-01T00:00:00Z,"4",x\n'
    )
    rows, _ = read_all(source(f), now)
    assert rows.select("series", "value", "problem").rows() == [
        ("a", "1", "it has 4 fields where the header has 3"),
        ("b", None, "it has 2 fields where the header has 3"),
        ("c", "3", None),
        ("d", "4", "it has 4 fields where the header has 3"),
    ]


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_utf16_with_a_bom_reads_like_utf8_and_resumes_at_the_right_byte(
    tmp_path: Path, now: datetime, codec: str
) -> None:
    """UTF-16 used to come out as text full of NUL bytes, in an error message."""
    bom = "\ufeff".encode(codec)
    first = "series,ts,value\r\ntempérature ☃,2024-03-01T00:00:00Z,1.5\r\n\r\n𝄞,2024-03-01T01:00:00Z,2\r\n"
    more = "x,2024-03-01T02:00:00Z,3\r\n"
    f = tmp_path / "u.csv"
    f.write_bytes(bom + first.encode(codec))
    src = source(f)
    rows, cursor = read_all(src, now)
    assert rows.select("series", "ts", "value", "origin").rows() == [
        ("température ☃", "2024-03-01T00:00:00Z", "1.5", f"{f}:2"),
        ("𝄞", "2024-03-01T01:00:00Z", "2", f"{f}:4"),
    ]
    assert cursor["files"][str(f)]["offset"] == f.stat().st_size
    with f.open("ab") as fh:
        fh.write(more.encode(codec))
    rows, cursor = read_all(src, now, cursor)
    assert rows.select("series", "value", "origin").rows() == [("x", "3", f"{f}:5")]


def test_utf16_without_a_bom_and_utf32_are_refused_naming_the_encoding(
    tmp_path: Path, now: datetime
) -> None:
    f = tmp_path / "u.csv"
    f.write_bytes("series,ts,value\na,2024-03-01T00:00:00Z,1\n".encode("utf-16-le"))
    msg = error_of(source(f), now)
    assert "holds NUL bytes: the file is UTF-16 without a byte-order mark" in msg
    assert "\x00" not in msg
    f.write_bytes("series,ts,value\na,2024-03-01T00:00:00Z,1\n".encode("utf-32"))
    assert "UTF-32 byte-order mark" in error_of(source(f), now)


def test_utf8_bom_crlf_and_bad_bytes(tmp_path: Path, now: datetime) -> None:
    f = tmp_path / "b.csv"
    f.write_bytes(
        b"\xef\xbb\xbfseries,ts,value\r\ncaf\xe9,2024-03-01T00:00:00Z,1\r\n \t\r\nd,x,2\r\n"
    )
    rows, cursor = read_all(source(f), now)
    assert rows.select("series", "ts", "value", "origin", "problem").rows() == [
        ("caf\ufffd", "2024-03-01T00:00:00Z", "1", f"{f}:2", None),
        ("d", "x", "2", f"{f}:4", None),
    ]
    assert cursor["files"][str(f)]["offset"] == f.stat().st_size


def test_bare_cr_line_ends_are_refused(tmp_path: Path, now: datetime) -> None:
    """A classic-Mac file is one line to a LF reader: its header would swallow the data."""
    f = tmp_path / "cr.csv"
    f.write_bytes(b"series,ts,value\ra,2024-03-01T00:00:00Z,1\r")
    src = source(f)
    _, cursor = read_all(src, now)  # no newline yet: waits
    assert "bare carriage return" in error_of(src, now, cursor)


@pytest.mark.parametrize("codec", ["utf-8", "utf-16-le"])
@pytest.mark.parametrize("batch_rows", [1, 2, 3])
def test_resuming_from_any_cursor_reads_exactly_the_rest(
    tmp_path: Path, now: datetime, codec: str, batch_rows: int
) -> None:
    """Exactly once across hostile lines: blank, over-long, CRLF, unbalanced, ragged lines
    around batch boundaries; each batch's cursor resumes right after it."""
    long_value = "9" * (MAX_LINE_BYTES + 10)
    lines = [
        "series,ts,value",
        "a,2024-03-01T00:00:00Z,1",
        "",
        f"b,2024-03-01T00:00:00Z,{long_value}",
        "  ",
        'c,"2024-03-01T00:00:00Z",3\r',
        '"d,2024-03-01T00:00:00Z,4',
        f"e,2024-03-01T00:00:00Z,{long_value}",
        "f,2024-03-01T00:00:00Z",
        "g,2024-03-01T00:00:00Z,7",
    ]
    f = tmp_path / "r.csv"
    f.write_bytes(
        ("\ufeff" if codec != "utf-8" else "").encode(codec)
        + "\n".join(lines).encode(codec)
        + "\n".encode(codec)
    )
    src = source(f, batch_rows=batch_rows)
    batches = list(src.read(None, now))
    every = pl.concat([b.rows for b in batches if b.rows.height])
    assert every["origin"].to_list() == [f"{f}:{n}" for n in (2, 4, 6, 7, 8, 9, 10)]
    assert all(b.rows.height <= batch_rows for b in batches)
    assert batches[-1].cursor["files"][str(f)]["offset"] == f.stat().st_size
    for k in range(1, len(batches)):
        rest = [b.rows for b in src.read(batches[k - 1].cursor, now) if b.rows.height]
        want = [b.rows for b in batches[k:] if b.rows.height]
        got = pl.concat(rest)["origin"].to_list() if rest else []
        assert got == (pl.concat(want)["origin"].to_list() if want else [])


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (b"series;ts;value\n", "has no comma but semicolons"),
        (b"series\tts\tvalue\n", "has no comma but tabs"),
        (b"\n", "is blank: it must name the columns"),
    ],
)
def test_a_header_of_one_column_says_what_it_looks_like(
    tmp_path: Path, now: datetime, header: bytes, why: str
) -> None:
    f = tmp_path / "h.csv"
    f.write_bytes(header + b"a;2024-03-01T00:00:00Z;1\n")
    assert f"line 1 (the header) {why}" in error_of(source(f), now)
