"""Bounded reading of a text file's lines, and strict splitting of one CSV record per line.

No line is ever held whole past MAX_LINE_BYTES: the stream is read CHUNK_BYTES at a time and
an over-long line is hashed as it streams by, so a 50 MB line costs a few chunks of memory,
each read returns to Python within microseconds (a signal handler runs promptly), and what
is reported of such a line is its length and sha256, never its text.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import polars as pl

MAX_LINE_BYTES = 64 * 1024
CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Encoding:
    """How a file's bytes are text: the codec and its code unit. The newline is looked for
    at unit-aligned positions only: in UTF-16, the byte 0x0A is half of many characters."""

    codec: str
    unit: int
    newline: bytes


UTF8 = Encoding("utf-8", 1, b"\n")
_BOMS = (
    (b"\xef\xbb\xbf", UTF8),
    (b"\xff\xfe", Encoding("utf-16-le", 2, b"\n\x00")),
    (b"\xfe\xff", Encoding("utf-16-be", 2, b"\x00\n")),
)
_UTF32_BOMS = (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")


def sniff(head: bytes) -> Encoding | str:
    """The encoding the first bytes of a file announce (UTF-8 when no byte-order mark), or
    why the file cannot be read."""
    if head.startswith(_UTF32_BOMS):
        return "it starts with a UTF-32 byte-order mark; save it as UTF-8 (or UTF-16)"
    for bom, enc in _BOMS:
        if head.startswith(bom):
            return enc
    return UTF8


@dataclass(frozen=True, slots=True)
class Block:
    """Consecutive lines of a file as read: whole lines (each with its line end), or one
    last line without a line end (`ended` False), or one line over MAX_LINE_BYTES, which
    is not kept (`data` None) but measured and hashed."""

    data: bytes | None
    size: int  # bytes
    ended: bool
    digest: str | None = None  # sha256 of an over-long line, when read to its end


class LineReader:
    """Blocks of lines of `f` from its current position `start` (counted from the file's
    start), read CHUNK_BYTES at a time.

    limit: read no further than this many bytes from the start (a file's size when it was
    stat'ed). `complete` tells, once the blocks run out, whether a last line without a line
    end is whole: False when the file grew past `limit` or a gzip stream was cut short."""

    def __init__(self, f: Any, encoding: Encoding, *, start: int, limit: int | None) -> None:
        self._f = f
        self._enc = encoding
        self._pos = start
        self._limit = limit
        self.complete = True

    def __iter__(self) -> Iterator[Block]:
        buf = b""  # starts at a line start
        while True:
            cut = self._last_line_end(buf)
            if cut:
                yield from self._whole(buf[:cut])
                buf = buf[cut:]
            if len(buf) > MAX_LINE_BYTES:
                block, buf = self._long(buf)
                yield block
                continue  # what followed the long line may hold whole lines already
            chunk = self._read()
            if not chunk:
                if buf:
                    yield self._tail(buf)
                return
            buf += chunk

    def first_line(self) -> Block | None:
        """The first line only (a header), read no further than needed to find its end or
        to know it is over MAX_LINE_BYTES (then neither hashed nor read to its end)."""
        buf = b""
        while True:
            end = _line_end(buf, 0, self._enc)
            if end >= 0 and end <= MAX_LINE_BYTES:
                return Block(buf[:end], end, True)
            if len(buf) > MAX_LINE_BYTES:
                return Block(None, len(buf), False)
            chunk = self._read()
            if not chunk:
                return Block(buf, len(buf), False) if buf else None
            buf += chunk

    def _whole(self, data: bytes) -> Iterator[Block]:
        """Whole lines as blocks, an over-long one among them on its own."""
        if len(data) <= MAX_LINE_BYTES:
            yield Block(data, len(data), True)
            return
        start = 0
        while start < len(data):
            end = _line_end(data, start, self._enc)
            if end - start > MAX_LINE_BYTES:
                digest = hashlib.sha256(data[start:end]).hexdigest()
                yield Block(None, end - start, True, digest)
                start = end
                continue
            # Extend over the following lines up to the next over-long one (or the end).
            stop = end
            while stop < len(data):
                nxt = _line_end(data, stop, self._enc)
                if nxt - stop > MAX_LINE_BYTES:
                    break
                stop = nxt
            yield Block(data[start:stop], stop - start, True)
            start = stop

    def _long(self, buf: bytes) -> tuple[Block, bytes]:
        """An over-long line that starts `buf`, hashed to its end: its block and the bytes
        after it."""
        digest = hashlib.sha256()
        size = 0
        while True:
            end = _line_end(buf, 0, self._enc)
            if end >= 0:
                digest.update(buf[:end])
                return Block(None, size + end, True, digest.hexdigest()), buf[end:]
            keep = len(buf) % self._enc.unit  # half a code unit waits for its other half
            digest.update(buf[: len(buf) - keep])
            size += len(buf) - keep
            buf = buf[len(buf) - keep :]
            chunk = self._read()
            if not chunk:
                digest.update(buf)
                return Block(None, size + len(buf), False, digest.hexdigest()), b""
            buf += chunk

    def _tail(self, buf: bytes) -> Block:
        if len(buf) > MAX_LINE_BYTES:
            return Block(None, len(buf), False, hashlib.sha256(buf).hexdigest())
        return Block(buf, len(buf), False)

    def _last_line_end(self, buf: bytes) -> int:
        """The end (after its line end) of the last whole line in `buf`, 0 if none."""
        nl, unit = self._enc.newline, self._enc.unit
        at = buf.rfind(nl)
        while at >= 0 and at % unit:
            at = buf.rfind(nl, 0, at + len(nl) - 1)
        return 0 if at < 0 else at + len(nl)

    def _read(self) -> bytes:
        n = CHUNK_BYTES
        if self._limit is not None:
            n = min(n, self._limit - self._pos)
            if n <= 0:
                # The stat'ed size is reached: a byte more means the file grew since, and
                # its last line may be mid-write.
                self.complete = self.complete and not self._f.read(1)
                return b""
        try:
            # read1: one underlying read at a time, so a gzip stream cut short loses only
            # the call that meets its end, not a whole chunk decompressed before it.
            chunk = self._f.read1(n)
        except EOFError:  # a gzip stream cut short: what came before is whole
            self.complete = False
            return b""
        self._pos += len(chunk)
        return chunk


def _line_end(buf: bytes, start: int, enc: Encoding) -> int:
    """The end (after its line end) of the line starting at `start`, or -1."""
    at = buf.find(enc.newline, start)
    while at >= 0 and (at - start) % enc.unit:
        at = buf.find(enc.newline, at + 1)
    return -1 if at < 0 else at + len(enc.newline)


_SURROGATE = re.compile("[\ud800-\udfff]")


def split_lines(block: Block, enc: Encoding) -> tuple[list[str], list[int]]:
    """A block's lines as text (line ends removed, CR kept) and their sizes in bytes. Bytes
    not valid in the encoding become U+FFFD, so one bad byte costs its row, not the file."""
    data = block.data or b""
    if enc.unit == 1:
        # Decoding before splitting is safe: a newline byte is never part of a multi-byte
        # sequence, nor swallowed by a replacement.
        texts = data.decode(enc.codec, "replace").split("\n")
        sizes = [len(r) + 1 for r in data.split(b"\n")]
    else:
        text = data.decode(enc.codec, "surrogatepass" if len(data) % 2 == 0 else "replace")
        texts = text.split("\n")
        sizes = [len(t.encode(enc.codec, "surrogatepass")) + enc.unit for t in texts]
        if len(data) % 2:  # an odd last byte: a cut-off tail, one line
            sizes = [len(data) + enc.unit]
        texts = [_SURROGATE.sub("\ufffd", t) for t in texts]
    if block.ended:  # what follows the last line end is empty
        texts.pop()
        sizes.pop()
    else:
        sizes[-1] -= enc.unit  # the last line has no line end
    return texts, sizes


# RFC 4180 on one line: a field is quoted (quotes inside doubled; spaces around allowed) or
# holds no quote at all.
_QUOTED = r'[ \t]*"[^"]*(?:""[^"]*)*"[ \t]*'
_FIELD = rf'(?:{_QUOTED}|[^,"]*)'
_RECORD = re.compile(rf"{_FIELD}(?:,{_FIELD})*")
_FIELDS = re.compile(r'(?:^|,)(?:[ \t]*"([^"]*(?:""[^"]*)*)"[ \t]*|([^,"]*))')


def split_record(text: str) -> list[str | None] | None:
    """The fields of one CSV record on one line (an empty unquoted field is None), or None
    when the line is not one: a quoted field that does not close on it (a record spanning
    lines), a quote inside an unquoted field, text after a closing quote."""
    if '"' not in text:
        return [f or None for f in text.split(",")]
    if not _RECORD.fullmatch(text):
        return None
    return [
        quoted.replace('""', '"') if quoted is not None else (plain or None)
        for quoted, plain in (m.groups() for m in _FIELDS.finditer(text))
    ]


def as_it_stands(text: str) -> list[str | None]:
    """A line that is not a CSV record, split on its commas, quotes and all: what its row
    shows in quarantine."""
    return [f or None for f in text.split(",")]


_BLANK = " \t\r\n\x0b\x0c"  # what bytes.strip() strips: a line of only these is no row
_LINES = {"n": pl.Int64, "text": pl.Utf8, "problem": pl.Utf8}
QUOTES_PROBLEM = (
    "its quotes do not balance: a quoted field must close on the same line (a record spanning "
    "lines is not read) and a quote inside a field must be doubled"
)


def numbered_lines(block: Block, enc: Encoding, *, first: int) -> tuple[pl.DataFrame, list[int]]:
    """A block's non-blank lines (n: line number, counting from `first`; text; problem, set
    for an over-long line) and the sizes in bytes of all its lines, blank ones included."""
    if block.data is None:
        problem = f"the line is {block.size} bytes, over the limit of {MAX_LINE_BYTES}"
        if block.digest:
            problem += f"; sha256 {block.digest}"
        return pl.DataFrame({"n": [first], "text": [None], "problem": [problem]}, _LINES), [
            block.size
        ]
    texts, sizes = split_lines(block, enc)
    frame = pl.DataFrame(
        {
            "n": pl.int_range(first, first + len(texts), eager=True),
            "text": pl.Series(texts, dtype=pl.Utf8),
            "problem": pl.repeat(None, len(texts), dtype=pl.Utf8, eager=True),
        },
        _LINES,
    )
    return frame.filter(pl.col("text").str.strip_chars(_BLANK) != ""), sizes


def records(
    lines: pl.DataFrame, width: int, at: dict[str, int]
) -> tuple[pl.DataFrame, pl.Series, pl.Series]:
    """Lines (as numbered_lines gives them) -> the fields at positions `at` (one text
    column per name, an empty field null), the line numbers, and per line why it is not
    one record of `width` fields (null: it is).

    Lines without a quote are split in bulk; the few with one go through split_record."""
    lines = lines.with_columns(pl.col("text").str.strip_suffix("\r"))
    bulk = pl.col("text").is_not_null() & ~pl.col("text").str.contains('"', literal=True)
    fields = pl.col("text").str.split(",")
    names = [f"f{i}" for i in range(len(at))]
    plain = lines.filter(bulk).select(
        "n",
        *(
            fields.list.get(i, null_on_oob=True).alias(f)
            for f, i in zip(names, at.values(), strict=True)
        ),
        pl.when(fields.list.len() != width)
        .then(pl.format(f"it has {{}} fields where the header has {width}", fields.list.len()))
        .otherwise(pl.col("problem"))
        .alias("problem"),
    )
    plain = plain.with_columns(pl.when(pl.col(f) != "").then(pl.col(f)).alias(f) for f in names)
    rest = []
    for n, text, problem in lines.filter(~bulk).iter_rows():
        got: list[str | None] = []
        if text is not None:
            split = split_record(text)
            if split is None:
                got, problem = as_it_stands(text), QUOTES_PROBLEM
            else:
                got = split
                if len(got) != width:
                    problem = f"it has {len(got)} fields where the header has {width}"
        rest.append([n, *(got[i] if i < len(got) else None for i in at.values()), problem])
    schema = {"n": pl.Int64, **dict.fromkeys(names, pl.Utf8), "problem": pl.Utf8}
    both = pl.concat([plain, pl.DataFrame(rest, schema, orient="row")]).sort("n")
    values = both.select(pl.col(f).alias(c) for f, c in zip(names, at, strict=True))
    return values, both["n"], both["problem"]
