"""Files matched by a glob: CSV (.csv, .csv.gz) and Parquet, read incrementally.

Cursor: {"files": {path: {"size", "mtime_ns", "rows", "offset"}}}, per file as last seen:
size and mtime_ns from stat, rows = lines consumed after the header (CSV) or rows read
(Parquet), offset = bytes of the (decompressed) CSV text consumed. An unchanged file is
skipped; a grown CSV resumes at `offset`; a changed Parquet file is read again whole (the
ingest upserts make that harmless). A file shorter than the offset was replaced: read anew.

A CSV's last line without a newline may still be being written, so it is left for the next
read. If the file has not changed by then, the writer is taken to be done and the line is
read as it is; a gzip stream's last line is read once the stream is complete. Records are
taken to be one per line (no newlines inside quoted fields), which keeps origins exact: a
line that is not CSV on its own (a stray quote) is split on its commas as it stands.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import zlib
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl

from forecaster.config import FileSource
from forecaster.errors import SourceError
from pipelines.sources.base import Batch, raw_frame, required_columns

_GZIP_MAGIC = b"\x1f\x8b"
_CSV_OPTIONS: dict[str, Any] = {
    "infer_schema": False,  # every column as text: a malformed value reaches quarantine as is
    "truncate_ragged_lines": True,  # one bad line must not stop the file
    "encoding": "utf8-lossy",
}

# rows, the file's cursor entry after them (None: not read yet), a note for logs
Piece = tuple[pl.DataFrame, dict[str, Any] | None, str]


class FileSourceReader:
    """Reads new and grown files matching `config.path`, in sorted path order."""

    def __init__(self, name: str, config: FileSource) -> None:
        self.name = name
        self.config = config

    def read(self, cursor: Mapping[str, Any] | None, now: datetime) -> Iterator[Batch]:
        paths = self._paths()
        before = dict((cursor or {}).get("files", {}))
        # Forget files no longer matched, so the cursor does not grow forever.
        state = {p: e for p, e in before.items() if p in paths}
        frames: list[pl.DataFrame] = []
        notes: list[str] = []
        for path in paths:
            for rows, entry, note in self._read_file(path, state.get(path)):
                if (
                    rows.height
                    and frames
                    and (
                        frames[0].schema != rows.schema
                        or sum(f.height for f in frames) + rows.height > self.config.batch_rows
                    )
                ):
                    yield self._batch(frames, notes, state)
                    frames, notes = [], []
                if entry is None:
                    state.pop(path, None)
                else:
                    state[path] = entry
                if rows.height:
                    frames.append(rows)
                    notes.append(note)
        if frames or state != before:
            yield self._batch(frames, notes, state)

    def _batch(self, frames: list[pl.DataFrame], notes: list[str], state: dict[str, Any]) -> Batch:
        rows = pl.concat(frames) if frames else raw_frame([], [], [], [])
        files = {p: dict(e) for p, e in state.items()}
        return Batch(rows=rows, cursor={"files": files}, note="; ".join(notes) or "no new rows")

    def _paths(self) -> list[str]:
        pattern = os.path.expanduser(self.config.path)
        paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not paths and not glob.has_magic(pattern):
            raise SourceError(
                self.name, f"file {pattern} does not exist; fix `path` or create the file"
            )
        return paths

    def _read_file(self, path: str, prev: Mapping[str, Any] | None) -> Iterator[Piece]:
        try:
            st = os.stat(path)
            fmt = self._format(path)
            if fmt == "parquet":
                yield from self._read_parquet(path, st, prev)
            else:
                yield from self._read_csv(path, st, prev)
        except (zlib.error, gzip.BadGzipFile) as exc:  # BadGzipFile is an OSError: first
            raise SourceError(self.name, f"{path} is not a valid gzip file: {exc}") from exc
        except OSError as exc:
            raise SourceError(self.name, f"cannot read {path}: {exc.strerror or exc}") from exc

    def _format(self, path: str) -> str:
        if self.config.format != "auto":
            return self.config.format
        lower = path.lower()
        if lower.endswith((".csv", ".csv.gz")):
            return "csv"
        if lower.endswith((".parquet", ".pq")):
            return "parquet"
        raise SourceError(
            self.name,
            f"cannot tell the format of {path} from its name; set format = 'csv' or 'parquet'",
        )

    def _required(self, path: str, columns: list[str]) -> None:
        missing = [c for c in required_columns(self.config) if c not in columns]
        if missing:
            raise SourceError(
                self.name,
                f"{path} has no column {missing[0]!r} (its columns: {', '.join(columns) or 'none'});"
                " rename the column or set ts_column/value_column/series_column",
            )

    def _rows(self, path: str, df: pl.DataFrame, origin: pl.Series) -> pl.DataFrame:
        cfg = self.config
        if cfg.series_column and cfg.series_column in df.columns:
            series: pl.Series = df[cfg.series_column].cast(pl.Utf8)
        else:
            name = cfg.series_name or _stem(path)
            series = pl.Series([name] * df.height, dtype=pl.Utf8)
        return raw_frame(series, _loose(df[cfg.ts_column]), _loose(df[cfg.value_column]), origin)

    # CSV ----------------------------------------------------------------------------------

    def _read_csv(
        self, path: str, st: os.stat_result, prev: Mapping[str, Any] | None
    ) -> Iterator[Piece]:
        size, mtime = st.st_size, st.st_mtime_ns
        unchanged = prev is not None and prev["size"] == size and prev["mtime_ns"] == mtime
        offset = int(prev.get("offset", prev["size"])) if prev else 0
        with open(path, "rb") as raw:
            gz = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            if unchanged and (gz or offset >= size):
                return
            if prev is None or (not gz and size < offset) or (gz and size < prev["size"]):
                prev, offset = None, 0  # new, or truncated/replaced: from the top
            rows = int(prev["rows"]) if prev else 0
            # gzip: a truncated stream never yields its partial last line, so any line it
            # yields is whole. Plain: a last line without newline waits one unchanged read.
            take_tail = gz or unchanged
            f = gzip.GzipFile(fileobj=raw) if gz else raw
            entry = {"size": size, "mtime_ns": mtime, "rows": rows, "offset": offset}
            try:
                header = f.readline()
            except EOFError:  # a gzip stream cut short inside its first line
                header = b""
            if not header.endswith(b"\n") and not (take_tail and header):
                yield _empty(), entry, ""
                return
            columns = pl.read_csv(io.BytesIO(header), n_rows=0, **_CSV_OPTIONS).columns
            self._required(path, columns)
            yield from self._csv_lines(
                path, f, header, entry, limit=None if gz else size, take_tail=take_tail
            )

    def _csv_lines(
        self,
        path: str,
        f: Any,
        header: bytes,
        entry: dict[str, Any],
        *,
        limit: int | None,
        take_tail: bool,
    ) -> Iterator[Piece]:
        consumed = max(entry["offset"], len(header))
        line_no = entry["rows"] + 1  # the header is line 1
        lines: list[bytes] = []
        numbers: list[int] = []
        try:
            f.seek(consumed)
            for line in f:
                if limit is not None and consumed + len(line) > limit:
                    break  # grew after stat: read the file as it was then
                if not line.endswith(b"\n") and not take_tail:
                    break
                line_no += 1
                consumed += len(line)
                if line.strip():  # blank lines are not rows
                    lines.append(line)
                    numbers.append(line_no)
                if len(lines) >= self.config.batch_rows:
                    yield self._csv_piece(path, header, lines, numbers, line_no, consumed, entry)
                    lines, numbers = [], []
        except EOFError:
            pass  # a gzip file still being written ends early: keep what was whole, wait
        # Always, even without rows: the new size/mtime decide whether a tail has settled.
        yield self._csv_piece(path, header, lines, numbers, line_no, consumed, entry)

    def _csv_piece(
        self,
        path: str,
        header: bytes,
        lines: list[bytes],
        numbers: list[int],
        line_no: int,
        consumed: int,
        entry: dict[str, Any],
    ) -> Piece:
        entry.update(rows=line_no - 1, offset=consumed)
        if not lines:
            return _empty(), dict(entry), ""
        cfg = self.config
        wanted = [c for c in (cfg.series_column, cfg.ts_column, cfg.value_column) if c]
        df = _parse_lines(header, lines)
        df = df.select(c for c in dict.fromkeys(wanted) if c in df.columns)
        origin = (pl.lit(f"{path}:") + pl.Series(numbers).cast(pl.Utf8)).alias("o")
        rows = self._rows(path, df, pl.select(origin).to_series())
        return rows, dict(entry), f"{Path(path).name} lines {numbers[0]}-{numbers[-1]}"

    # Parquet ------------------------------------------------------------------------------

    def _read_parquet(
        self, path: str, st: os.stat_result, prev: Mapping[str, Any] | None
    ) -> Iterator[Piece]:
        if prev is not None and prev["size"] == st.st_size and prev["mtime_ns"] == st.st_mtime_ns:
            return
        try:
            columns = list(pl.read_parquet_schema(path))
            self._required(path, columns)
            cfg = self.config
            wanted = [
                c
                for c in dict.fromkeys((cfg.series_column, cfg.ts_column, cfg.value_column))
                if c and c in columns
            ]
            total = pl.scan_parquet(path).select(pl.len()).collect().item()
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "rows": total, "offset": 0}
            if total == 0:
                yield _empty(), entry, ""
            step = cfg.batch_rows
            for start in range(0, total, step):
                df = pl.scan_parquet(path).select(wanted).slice(start, step).collect()
                origin = pl.select(
                    pl.lit(f"{path}:")
                    + pl.int_range(start + 1, start + 1 + df.height).cast(pl.Utf8)
                ).to_series()
                last = start + df.height >= total
                # Until the last slice is in, a crash must re-read the file from the top.
                at = entry if last else (dict(prev) if prev else None)
                yield (
                    self._rows(path, df, origin),
                    at,
                    f"{Path(path).name} rows {start + 1}-{start + df.height}",
                )
        except pl.exceptions.PolarsError as exc:
            raise SourceError(self.name, f"cannot read Parquet file {path}: {exc}") from exc


def _parse_lines(header: bytes, lines: list[bytes]) -> pl.DataFrame:
    """One row per line, every column text. A chunk polars cannot read, or reads into other
    than one row per line (a stray quote opens a field that swallows the next lines), is
    halved until each bad line stands alone; that line is split on its commas as it stands,
    quotes and all. So a malformed line becomes one row the ingest stores or quarantines
    under its own line number, and never stops the file nor takes its neighbours along."""
    try:
        df = pl.read_csv(io.BytesIO(header + b"".join(lines)), **_CSV_OPTIONS)
        if df.height == len(lines):
            return df
    except pl.exceptions.PolarsError:
        pass
    if len(lines) == 1:
        columns = pl.read_csv(io.BytesIO(header), n_rows=0, **_CSV_OPTIONS).columns
        try:
            raw = pl.read_csv(
                io.BytesIO(lines[0]), has_header=False, quote_char=None, **_CSV_OPTIONS
            )
            fields: tuple[Any, ...] = raw.row(0) if raw.height else ()
        except pl.exceptions.PolarsError:
            fields = tuple(lines[0].decode("utf-8", "replace").rstrip("\r\n").split(","))
        return pl.DataFrame(
            {c: [fields[i] if i < len(fields) else None] for i, c in enumerate(columns)},
            schema=dict.fromkeys(columns, pl.Utf8),
        )
    mid = len(lines) // 2
    return pl.concat([_parse_lines(header, lines[:mid]), _parse_lines(header, lines[mid:])])


def _empty() -> pl.DataFrame:
    return raw_frame([], [], [], [])


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".gz", ".csv", ".parquet", ".pq"):
        name = name.removesuffix(suffix)
    return name


def _loose(col: pl.Series) -> pl.Series:
    """A column in the loose types a Batch allows (text, Int64, Float64, Datetime)."""
    dtype = col.dtype
    if dtype == pl.Utf8 or isinstance(dtype, pl.Datetime):
        return col
    if dtype == pl.Date:
        return col.cast(pl.Datetime("us"))
    if dtype.is_integer():
        return col.cast(pl.Int64, strict=False)
    if dtype.is_numeric():
        return col.cast(pl.Float64, strict=False)
    return col.cast(pl.Utf8, strict=False)
