"""FileSourceReader against real CSV, gzip CSV and Parquet files in tmp_path."""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from forecaster.config import FileSource
from forecaster.errors import SourceError
from pipelines.sources import RAW_COLUMNS, Batch, build_source
from pipelines.sources.base import PROBLEM
from pipelines.sources.file import FileSourceReader

HEADER = "series,ts,value\n"


def read(
    src: FileSourceReader, cursor: Mapping[str, Any] | None, now: datetime
) -> tuple[pl.DataFrame, Mapping[str, Any] | None, list[Batch]]:
    batches = list(src.read(cursor, now))
    for b in batches:
        assert b.rows.columns == [*RAW_COLUMNS, PROBLEM]
        assert b.rows.height <= src.config.batch_rows
        json.dumps(b.cursor)  # the ingest job stores it as JSON
    rows = pl.concat([b.rows for b in batches if b.rows.height]) if batches else None
    out = rows if rows is not None and rows.height else pl.DataFrame()
    return out, (batches[-1].cursor if batches else cursor), batches


def source(path: Path | str, **kw: Any) -> FileSourceReader:
    src = build_source("files", FileSource(path=str(path), **kw))
    assert isinstance(src, FileSourceReader)
    return src


def test_csv_values_pass_through_as_text_with_line_origins(tmp_path: Path, now: datetime) -> None:
    f = tmp_path / "a.csv"
    f.write_text(
        HEADER + "s1,2024-01-01T00:00:00Z,1.5\n\ns1,not-a-time,abc\ns2,2024-01-01T01:00:00Z,\n"
    )
    rows, cursor, _ = read(source(f), None, now)
    assert rows["series"].to_list() == ["s1", "s1", "s2"]
    assert rows["ts"].to_list() == ["2024-01-01T00:00:00Z", "not-a-time", "2024-01-01T01:00:00Z"]
    assert rows["value"].to_list() == ["1.5", "abc", None]  # malformed kept, ingest quarantines
    assert rows["origin"].to_list() == [f"{f}:2", f"{f}:4", f"{f}:5"]  # line 3 is blank
    entry = cursor["files"][str(f)]
    assert entry["rows"] == 4 and entry["size"] == f.stat().st_size


def test_gzip_csv_and_series_from_file_stem(tmp_path: Path, now: datetime) -> None:
    f = tmp_path / "meter-7.csv.gz"
    f.write_bytes(gzip.compress(b"ts,value\n2024-01-01,1\n2024-01-02,2\n"))
    rows, _, _ = read(source(f), None, now)
    assert rows["series"].to_list() == ["meter-7", "meter-7"]
    assert rows["value"].to_list() == ["1", "2"]
    rows, _, _ = read(source(f, series_name="kwh"), None, now)
    assert rows["series"].unique().to_list() == ["kwh"]


def test_truncated_gzip_yields_only_whole_lines(tmp_path: Path, now: datetime) -> None:
    f = tmp_path / "g.csv.gz"
    whole = gzip.compress(("ts,value\n" + "".join(f"{i},{i}\n" for i in range(2000))).encode())
    f.write_bytes(whole[: len(whole) * 2 // 3])  # a writer still busy
    rows, cursor, _ = read(source(f), None, now)
    got = rows["ts"].to_list()
    assert 0 < len(got) < 2000 and got == [str(i) for i in range(len(got))]
    f.write_bytes(whole)
    more, _, _ = read(source(f), cursor, now)
    assert more["ts"].to_list() == [str(i) for i in range(len(got), 2000)]


def test_parquet_typed_values_and_reread_when_changed(tmp_path: Path, now: datetime) -> None:
    f = tmp_path / "p.parquet"
    df = pl.DataFrame(
        {"sensor": ["a", "b"], "when": [datetime(2024, 1, 1), datetime(2024, 1, 2)], "v": [1, 2]}
    )
    df.write_parquet(f)
    src = source(f, series_column="sensor", ts_column="when", value_column="v")
    rows, cursor, _ = read(src, None, now)
    assert rows["series"].to_list() == ["a", "b"]
    assert rows["ts"].dtype == pl.Datetime("us") and rows["value"].dtype == pl.Int64
    assert rows["origin"].to_list() == [f"{f}:1", f"{f}:2"]
    assert read(src, cursor, now)[2] == []  # unchanged: skipped
    pl.concat([df, df.with_columns(pl.lit("c").alias("sensor"))]).write_parquet(f)
    rows, _, _ = read(src, cursor, now)
    assert rows["series"].to_list() == ["a", "b", "c", "c"]  # whole file again


def test_new_file_grown_file_and_unchanged_file(tmp_path: Path, now: datetime) -> None:
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text(HEADER + "a,1,1\na,2,2\n")
    src = source(tmp_path / "*.csv")
    _, cursor, _ = read(src, None, now)
    assert read(src, cursor, now)[2] == []  # nothing changed: not even a batch

    with a.open("a") as fh:
        fh.write("a,3,3\n")
    b.write_text(HEADER + "b,1,10\n")
    rows, cursor, _ = read(src, cursor, now)
    assert rows.select("series", "ts", "value").rows() == [("a", "3", "3"), ("b", "1", "10")]
    assert rows["origin"].to_list() == [f"{a}:4", f"{b}:2"]
    assert set(cursor["files"]) == {str(a), str(b)}


def test_partial_last_line_is_read_whole_later(tmp_path: Path, now: datetime) -> None:
    f = tmp_path / "live.csv"
    f.write_text(HEADER + "s,2024-01-01T00:00:00Z,1\ns,2024-01-01T01:0")
    src = source(f)
    rows, cursor, _ = read(src, None, now)
    assert rows["ts"].to_list() == ["2024-01-01T00:00:00Z"]

    with f.open("a") as fh:
        fh.write("0:00Z,2\ns,2024-01-01T02:00:00Z,3")  # completes it, starts another
    rows, cursor, _ = read(src, cursor, now)
    assert rows.select("ts", "value").rows() == [("2024-01-01T01:00:00Z", "2")]
    assert rows["origin"].to_list() == [f"{f}:3"]

    # The file did not change since: the writer is done, so the last line counts as written.
    rows, cursor, _ = read(src, cursor, now)
    assert rows.select("ts", "value", "origin").rows() == [("2024-01-01T02:00:00Z", "3", f"{f}:4")]
    assert read(src, cursor, now)[2] == []


def test_batches_are_bounded_and_each_cursor_resumes_after_its_batch(
    tmp_path: Path, now: datetime
) -> None:
    for name, n in (("a", 5), ("b", 2), ("c", 1)):
        (tmp_path / f"{name}.csv").write_text(
            HEADER + "".join(f"{name},{i},{i}\n" for i in range(n))
        )
    src = source(tmp_path / "*.csv", batch_rows=3)
    rows, _, batches = read(src, None, now)
    assert [b.rows.height for b in batches] == [3, 2, 3]  # small files b and c share one batch
    assert rows.height == 8
    # Resuming from every intermediate cursor reads exactly the rest.
    for k in range(1, len(batches)):
        rest, _, _ = read(src, batches[k - 1].cursor, now)
        expected = pl.concat([b.rows for b in batches[k:]])
        assert rest["origin"].to_list() == expected["origin"].to_list()


def test_missing_column_names_the_file_the_column_and_counts_what_it_has(
    tmp_path: Path, now: datetime
) -> None:
    """The file's own column names are its content: counted, not quoted (see
    test_errors_never_quote_the_file)."""
    f = tmp_path / "bad.csv"
    f.write_text("series,time,val\ns,1,2\n")
    with pytest.raises(SourceError) as err:
        read(source(f), None, now)
    msg = str(err.value)
    assert str(f) in msg and "'ts'" in msg and "among its 3 columns" in msg
    assert "time" not in msg
    f.write_text("series,TS ,value\ns,1,2\n")
    with pytest.raises(SourceError, match="column 2 differs only in case or spaces"):
        read(source(f), None, now)

    p = tmp_path / "bad.parquet"
    pl.DataFrame({"ts": [1]}).write_parquet(p)
    with pytest.raises(SourceError, match="'value'"):
        read(source(p), None, now)


def test_chosen_series_column_is_required_default_is_not(tmp_path: Path, now: datetime) -> None:
    f = tmp_path / "x.csv"
    f.write_text("ts,value\n1,2\n")
    assert read(source(f), None, now)[0]["series"].to_list() == ["x"]
    with pytest.raises(SourceError, match="'sensor'"):
        read(source(f, series_column="sensor"), None, now)


def test_missing_path_and_empty_glob(tmp_path: Path, now: datetime) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        read(source(tmp_path / "nope.csv"), None, now)
    assert read(source(tmp_path / "*.csv"), None, now)[2] == []


def test_replaced_shorter_file_is_read_from_the_top(tmp_path: Path, now: datetime) -> None:
    f = tmp_path / "r.csv"
    f.write_text(HEADER + "s,1,1\ns,2,2\ns,3,3\n")
    src = source(f)
    _, cursor, _ = read(src, None, now)
    f.write_text(HEADER + "s,9,9\n")
    rows, _, _ = read(src, cursor, now)
    assert rows.select("ts", "origin").rows() == [("9", f"{f}:2")]


def test_unknown_extension_asks_for_format(tmp_path: Path, now: datetime) -> None:
    f = tmp_path / "data.bin"
    f.write_text(HEADER + "s,1,1\n")
    with pytest.raises(SourceError, match="format"):
        read(source(f), None, now)
    assert read(source(f, format="csv"), None, now)[0].height == 1


def test_corrupt_gzip_is_a_source_error(tmp_path: Path, now: datetime) -> None:
    f = tmp_path / "c.csv.gz"
    f.write_bytes(b"\x1f\x8b" + b"definitely not deflate data" * 10)
    with pytest.raises(SourceError, match="not a valid gzip file"):
        read(source(f), None, now)
