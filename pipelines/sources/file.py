"""Files matched by a glob: CSV (.csv, .csv.gz) and Parquet, read incrementally.

Cursor: {"files": {path: {"size", "mtime_ns", "rows", "offset"}}}, per file as last seen:
size and mtime_ns from stat, rows = lines consumed after the header (CSV) or rows read
(Parquet), offset = bytes of the (decompressed) CSV text consumed. An unchanged file is
skipped; a grown CSV resumes at `offset`; a changed Parquet file is read again whole (the
ingest upserts make that harmless). A file shorter than the offset was replaced: read anew.

A CSV's last line without a newline may still be being written, so it is left for the next
read. If the file has not changed by then, the writer is taken to be done and the line is
read as it is; a gzip stream's last line is read once the stream is complete.

Lines are read in bounded chunks (pipelines.sources.lines): a line over 64 KiB is never held,
only hashed. Records are one per line, which keeps origins exact. A data line that is not
exactly one record of the header's width (a line over the limit, quotes that do not balance,
such as a quoted field running onto the next line, or too few or too many fields) still
becomes a row, quarantined as bad_record with the reason, never a row misread. The file is
UTF-8 (a BOM allowed) or UTF-16 with a BOM; a header that is not one clean record (NUL bytes,
bare CR line ends, a column the config names given twice) stops the file with an error that
names positions and counts, never the file's text.
"""

from __future__ import annotations

import glob
import gzip
import os
import zlib
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl

from forecaster.config import FileSource
from forecaster.errors import SourceError
from pipelines.sources.base import Batch, clip, raw_frame, required_columns
from pipelines.sources.lines import (
    MAX_LINE_BYTES,
    Encoding,
    LineReader,
    numbered_lines,
    records,
    sniff,
    split_record,
)

_GZIP_MAGIC = b"\x1f\x8b"

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
        rows = pl.concat(frames) if frames else _empty()
        files = {p: dict(e) for p, e in state.items()}
        return Batch(rows=rows, cursor={"files": files}, note="; ".join(notes) or "no new rows")

    def _paths(self) -> list[str]:
        pattern = os.path.expanduser(self.config.path)
        paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not paths and not glob.has_magic(pattern):
            raise SourceError(
                self.name, f"file {_shown(pattern)} does not exist; fix `path` or create the file"
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
            # Not the exception's text: BadGzipFile quotes the file's first bytes.
            raise SourceError(
                self.name, f"{_shown(path)} is not a valid gzip file (its data is corrupt)"
            ) from exc
        except OSError as exc:
            raise SourceError(
                self.name, f"cannot read {_shown(path)}: {clip(exc.strerror or type(exc).__name__)}"
            ) from exc

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
            f"cannot tell the format of {_shown(path)} from its name; set format = 'csv' or "
            "'parquet'",
        )

    def _required(self, path: str, columns: list[str], where: str) -> None:
        """The configured columns are all there. The message counts the file's columns
        rather than listing them: they are the file's content (a path pointed at
        /etc/passwd printed its first line)."""
        missing = [c for c in required_columns(self.config) if c not in columns]
        if missing:
            name = missing[0]
            near = [i for i, c in enumerate(columns, 1) if c.strip().casefold() == name.casefold()]
            hint = f" (column {near[0]} differs only in case or spaces)" if near else ""
            raise SourceError(
                self.name,
                f"{where} has no column {name!r} among its {len(columns)} "
                f"column{'s' if len(columns) != 1 else ''}{hint}; rename the "
                "column or set ts_column/value_column/series_column",
            )

    def _rows(
        self,
        path: str,
        df: pl.DataFrame,
        origin: pl.Series,
        problems: pl.Series | None = None,
    ) -> pl.DataFrame:
        cfg = self.config
        if cfg.series_column and cfg.series_column in df.columns:
            series: pl.Series = df[cfg.series_column].cast(pl.Utf8)
        else:
            name = cfg.series_name or _stem(path)
            series = pl.Series([name] * df.height, dtype=pl.Utf8)
        if problems is None:
            problems = pl.repeat(None, df.height, dtype=pl.Utf8, eager=True)
        ts, value = _loose(df[cfg.ts_column]), _loose(df[cfg.value_column])
        return raw_frame(series, ts, value, origin, problems)

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
            f: Any = gzip.GzipFile(fileobj=raw) if gz else raw
            limit = None if gz else size
            entry = {"size": size, "mtime_ns": mtime, "rows": rows, "offset": offset}
            encoding = self._encoding(path, f)
            f.seek(0)
            reader = LineReader(f, encoding, start=0, limit=limit)
            header = reader.first_line()
            if header is not None and header.data is None:
                raise SourceError(
                    self.name,
                    f"{_shown(path)} line 1 (the header) is over {MAX_LINE_BYTES} bytes; "
                    "a CSV file's first line names its columns: check that `path` matches "
                    "only CSV files",
                )
            if header is None or not (header.ended or (take_tail and reader.complete)):
                yield _empty(), entry, ""
                return
            columns = self._header(path, header.data or b"", encoding)
            start = max(offset, header.size)
            f.seek(start)
            lines = LineReader(f, encoding, start=start, limit=limit)
            yield from self._csv_lines(path, lines, columns, encoding, entry, start, take_tail)

    def _encoding(self, path: str, f: Any) -> Encoding:
        try:
            head = f.read(4)
        except EOFError:  # a gzip stream cut short before 4 bytes
            head = b""
        enc = sniff(head)
        if isinstance(enc, str):
            raise SourceError(self.name, f"cannot read {_shown(path)}: {enc}")
        return enc

    def _header(self, path: str, data: bytes, encoding: Encoding) -> list[str]:
        """The column names of a header line, or a SourceError saying what is wrong with it
        by position and count: the line is the file's content, never quoted."""
        where = f"{_shown(path)} line 1 (the header)"
        if encoding.unit == 1 and b"\x00" in data:
            raise SourceError(
                self.name,
                f"{where} holds NUL bytes: the file is UTF-16 without a byte-order mark, or not "
                "text; save it as UTF-8 (or UTF-16 with a byte-order mark)",
            )
        text = data.decode(encoding.codec, "replace").removesuffix("\n").removesuffix("\r")
        text = text.removeprefix("\ufeff")
        if "\r" in text:
            raise SourceError(
                self.name,
                f"{where} holds a bare carriage return: lines must end in LF or CRLF (a file "
                "with CR line ends reads as one line); convert its line ends",
            )
        fields = split_record(text)
        if fields is None:
            raise SourceError(
                self.name, f"{where} is not one CSV record: its quotes do not balance"
            )
        columns = [c or "" for c in fields]
        wanted = [
            c
            for c in (self.config.series_column, self.config.ts_column, self.config.value_column)
            if c
        ]
        for name in dict.fromkeys(wanted):
            at = [i + 1 for i, c in enumerate(columns) if c == name]
            if len(at) > 1:
                raise SourceError(
                    self.name,
                    f"{where} names column {name!r} {len(at)} times (columns "
                    f"{', '.join(map(str, at))}), so which one to read is unclear; rename or "
                    "remove the others",
                )
        if len(columns) == 1 and any(c not in columns for c in required_columns(self.config)):
            if not text.strip():
                raise SourceError(self.name, f"{where} is blank: it must name the columns")
            for sep, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "vertical bars")):
                if sep in text:
                    raise SourceError(
                        self.name,
                        f"{where} has no comma but {name}: only comma-separated files are "
                        "read; convert the file",
                    )
        self._required(path, columns, where)
        return columns

    def _csv_lines(
        self,
        path: str,
        lines: LineReader,
        columns: list[str],
        encoding: Encoding,
        entry: dict[str, Any],
        consumed: int,
        take_tail: bool,
    ) -> Iterator[Piece]:
        line_no = entry["rows"] + 1  # the header is line 1; line_no: the last line consumed
        held: list[pl.DataFrame] = []  # lines for the next piece: n, text, problem
        n_held = 0
        room = self.config.batch_rows
        for block in lines:
            if not block.ended and not (take_tail and lines.complete):
                break  # may be mid-write: left for the next read
            frame, sizes = numbered_lines(block, encoding, first=line_no + 1)
            while frame.height and n_held + frame.height >= room:
                part, frame = frame.head(room - n_held), frame.slice(room - n_held)
                last = part["n"][-1]
                consumed += sum(sizes[: last - line_no])
                sizes = sizes[last - line_no :]
                line_no = last
                yield self._csv_piece(path, columns, [*held, part], line_no, consumed, entry)
                held, n_held = [], 0
            held.append(frame)
            n_held += frame.height
            consumed += sum(sizes)
            line_no += len(sizes)
        # Always, even without rows: the new size/mtime decide whether a tail has settled.
        yield self._csv_piece(path, columns, held, line_no, consumed, entry)

    def _csv_piece(
        self,
        path: str,
        columns: list[str],
        held: list[pl.DataFrame],
        line_no: int,
        consumed: int,
        entry: dict[str, Any],
    ) -> Piece:
        entry.update(rows=line_no - 1, offset=consumed)
        lines = pl.concat(held) if held else pl.DataFrame()
        if lines.is_empty():
            return _empty(), dict(entry), ""
        cfg = self.config
        wanted = [c for c in (cfg.series_column, cfg.ts_column, cfg.value_column) if c]
        at = {c: columns.index(c) for c in wanted if c in columns}
        df, numbers, problems = records(lines, len(columns), at)
        origin = pl.select(pl.lit(f"{path}:") + numbers.cast(pl.Utf8)).to_series()
        rows = self._rows(path, df, origin, problems)
        first, last = numbers[0], numbers[-1]
        return rows, dict(entry), f"{_shown(Path(path).name, 80)} lines {first}-{last}"

    # Parquet ------------------------------------------------------------------------------

    def _read_parquet(
        self, path: str, st: os.stat_result, prev: Mapping[str, Any] | None
    ) -> Iterator[Piece]:
        if prev is not None and prev["size"] == st.st_size and prev["mtime_ns"] == st.st_mtime_ns:
            return
        try:
            columns = list(pl.read_parquet_schema(path))
            self._required(path, columns, _shown(path))
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
            raise SourceError(
                self.name, f"cannot read Parquet file {_shown(path)}: {clip(exc)}"
            ) from exc


def _empty() -> pl.DataFrame:
    return raw_frame([], [], [], [], [])


def _shown(path: str, limit: int = 500) -> str:
    """A path as an error or a log line shows it: a file name may hold any byte but / and NUL."""
    return clip(path, limit)


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
