"""frames: pure transforms checked against plain-Python references."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from forecaster import frames as F

H = 3600 * 10**6


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def raw(series, ts, value):
    return pl.DataFrame(
        {
            "series": series,
            "ts": ts,
            "value": value,
            "origin": [f"r{i}" for i in range(len(series))],
        }
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2013-01-01T05:00:00Z", utc(2013, 1, 1, 5)),
        ("2013-01-01T05:00:00z", utc(2013, 1, 1, 5)),
        ("2013-01-01 05:00:00+02:00", utc(2013, 1, 1, 3)),
        ("2013-01-01T05:00:00-0500", utc(2013, 1, 1, 10)),
        ("2013-01-01T05:00", utc(2013, 1, 1, 5)),
        ("2013-01-01", utc(2013, 1, 1)),
        ("2013-01-01T05:00:00.250", utc(2013, 1, 1, 5) + timedelta(milliseconds=250)),
        ("1356998400", utc(2013, 1, 1)),
        (" 2013-01-01T05:00Z ", utc(2013, 1, 1, 5)),
        ("2013-02-30T00:00:00", None),
        ("yesterday", None),
        ("", None),
    ],
)
def test_parse_ts_formats(text, expected):
    assert F.parse_ts(pl.Series([text])).to_list() == [expected]


def test_parse_ts_typed_columns():
    naive = pl.Series([datetime(2013, 1, 1, 5)])
    eastern = naive.dt.replace_time_zone("America/New_York")
    assert F.parse_ts(naive).to_list() == [utc(2013, 1, 1, 5)]
    assert F.parse_ts(eastern).to_list() == [utc(2013, 1, 1, 10)]
    assert F.parse_ts(pl.Series([1356998400.5])).to_list() == [
        utc(2013, 1, 1) + timedelta(seconds=0.5)
    ]


def test_parse_sorts_rows_into_good_and_bad_with_reasons():
    rows = raw(
        ["a", "a", None, " ", "a", "a", "a", "a", "a"],
        [
            "2013-01-01T00:00Z",
            "nope",
            "2013-01-01T00:00Z",
            "2013-01-01T00:00Z",
            "2013-01-01T01:00Z",
            "2013-01-01T02:00Z",
            "2013-01-01T03:00Z",
            "2013-01-01T04:00Z",
            "2013-01-01T05:00Z",
        ],
        ["1.5", "2", "3", "4", "abc", None, "NaN", "-inf", " 7 "],
    )
    good, bad = F.parse(rows)
    assert good["value"].to_list() == [1.5, 7.0]
    assert good["ts_raw"].to_list() == ["2013-01-01T00:00Z", "2013-01-01T05:00Z"]
    assert dict(zip(bad["origin"], bad["reason"], strict=True)) == {
        "r1": "bad_ts",
        "r2": "missing_series",
        "r3": "missing_series",
        "r4": "bad_value",
        "r5": "bad_value",
        "r6": "non_finite",
        "r7": "non_finite",
    }
    assert bad.filter(pl.col("origin") == "r4")["value_raw"].to_list() == ["abc"]


def test_parse_names_the_missing_column():
    with pytest.raises(ValueError, match="'value'"):
        F.parse(pl.DataFrame({"series": ["a"], "ts": ["2013-01-01"]}))


def test_dedupe_keeps_one_of_equal_and_latest_of_conflicting():
    good, _ = F.parse(
        raw(
            ["a", "a", "a", "a", "a"],
            ["2013-01-01T00:00Z"] * 2 + ["2013-01-01T01:00Z"] * 3,
            ["1", "1", "5", "6", "7"],
        )
    )
    kept, replaced = F.dedupe(good)
    assert kept["value"].to_list() == [1.0, 7.0]
    assert sorted(replaced["value_raw"].to_list()) == ["5", "6"]
    assert set(replaced["reason"]) == {"conflicting_duplicate"}
    assert replaced["detail"].to_list()[0].startswith("replaced by 7.0 from r4")


@pytest.mark.parametrize("how", ["mean", "sum", "last", "min", "max"])
def test_resample_matches_python_reference(how):
    ts = [
        utc(2013, 1, 1, 0, 10),
        utc(2013, 1, 1, 0, 50),
        utc(2013, 1, 1, 1, 5),
        utc(2013, 1, 1, 0, 30),
    ]
    values = [1.0, 4.0, 10.0, 2.0]
    good = pl.DataFrame(
        {"series": ["a"] * 4, "ts": ts, "value": values, "origin": list("wxyz")}
    ).with_columns(pl.col("ts").dt.cast_time_unit("us"), seq=pl.int_range(4))
    out = F.resample(good, H, how)
    ref = {
        "mean": [7 / 3, 10.0],
        "sum": [7.0, 10.0],
        "last": [2.0, 10.0],
        "min": [1.0, 10.0],
        "max": [4.0, 10.0],
    }[how]
    assert out["ts"].to_list() == [utc(2013, 1, 1, 0), utc(2013, 1, 1, 1)]
    assert out["value"].to_list() == pytest.approx(ref)


def _points(series, hours, values):
    return pl.DataFrame(
        {"series": series, "ts": [utc(2013, 1, 1, h) for h in hours], "value": values}
    ).with_columns(pl.col("ts").dt.cast_time_unit("us"))


def _previous(rows):
    return pl.DataFrame(
        rows,
        schema={"series": pl.Utf8, "prev_ts": F.TS_DTYPE, "prev_value": pl.Float64},
        orient="row",
    )


def _reference_fill(prev_h, prev_v, hours, values, policy):
    """Plain-Python gap filling, the oracle for fill_gaps."""
    known = dict(zip(hours, values, strict=True))
    if prev_h is not None:
        known[prev_h] = prev_v
    start = prev_h + 1 if prev_h is not None else min(hours)
    out = []
    for h in range(start, max(hours) + 1):
        if h in known:
            out.append((h, known[h], "observed"))
            continue
        before = [k for k in known if k < h]
        after = [k for k in known if k > h]
        if policy == "ffill" and before:
            out.append((h, known[max(before)], "ffill"))
        elif policy == "interpolate" and before and after:
            b, a = max(before), min(after)
            out.append((h, known[b] + (known[a] - known[b]) * (h - b) / (a - b), "interpolated"))
        else:
            out.append((h, None, "missing"))
    return out


@pytest.mark.parametrize("policy", ["null", "ffill", "interpolate"])
@pytest.mark.parametrize("prev", [None, (1, 10.0)])
def test_fill_gaps_matches_reference(policy, prev):
    hours, values = [3, 4, 7, 10], [1.0, 2.0, 5.0, 3.0]
    previous = _previous([("a", utc(2013, 1, 1, prev[0]), prev[1])] if prev else [])
    out = F.fill_gaps(_points(["a"] * 4, hours, values), previous, H, policy).sort("ts")
    got = [(t.hour, v, q) for t, v, q in out.select("ts", "value", "quality").rows()]
    ref = _reference_fill(*(prev or (None, None)), hours, values, policy)
    if policy == "null":
        ref = [
            (h, v if q == "observed" else None, q if q == "observed" else "missing")
            for h, v, q in ref
        ]
    assert [(h, q) for h, _, q in got] == [(h, q) for h, _, q in ref]
    assert [v for _, v, _ in got] == pytest.approx([v for _, v, _ in ref], nan_ok=True)


def test_fill_gaps_passes_late_points_through_unfilled():
    previous = _previous([("a", utc(2013, 1, 1, 10), 1.0)])
    out = F.fill_gaps(_points(["a", "a"], [2, 12], [5.0, 6.0]), previous, H, "ffill").sort("ts")
    assert [(t.hour, v, q) for t, v, q in out.select("ts", "value", "quality").rows()] == [
        (2, 5.0, "observed"),
        (11, 1.0, "ffill"),
        (12, 6.0, "observed"),
    ]


def test_windows_are_epoch_aligned_and_stable():
    pts = _points(["a"] * 3, [0, 23, 0], [1.0, 2.0, 3.0])
    day_us = 86400 * 10**6
    out = F.assign_windows(pts, day_us)
    expected = int(utc(2013, 1, 1).timestamp()) // 86400
    assert out["window_id"].to_list() == [expected] * 3


def _kept(text: str) -> str:
    digest = hashlib.sha256(text.encode()).hexdigest()
    return f"{text[:1024]}… ({len(text)} characters, sha256 {digest})"


def test_quarantine_keeps_a_bounded_prefix_the_length_and_a_hash_of_long_texts():
    """A 50 MB value used to be stored whole in quarantine.value_raw."""
    long_name, long_value, long_ts = "n" * 2000, "9" * 5000 + "x", "T" * 5000
    padded = " " * 1500 + "2013-01-01T00:00Z"  # readable, yet long: kept bounded if rejected later
    rows = raw(
        [long_name, "a", "a", "a", "b"],
        ["2013-01-01T00:00Z", "2013-01-01T00:00Z", long_ts, padded, "2013-01-01T00:00Z"],
        ["1", long_value, "1", "2", "0" * 1023 + "1"],
    )
    good, bad = F.parse(rows)
    got = {r["origin"]: r for r in bad.to_dicts()}
    assert got["r0"]["reason"] == "bad_series" and got["r0"]["series"] == _kept(long_name)
    assert got["r1"]["reason"] == "bad_value" and got["r1"]["value_raw"] == _kept(long_value)
    assert got["r1"]["detail"] == "the text is 5001 characters, over the limit of 4096"
    assert got["r2"]["reason"] == "bad_ts" and got["r2"]["ts_raw"] == _kept(long_ts)
    assert got["r2"]["detail"] == "the text is 5000 characters, over the limit of 4096"
    assert good["origin"].to_list() == ["r3", "r4"]
    later = F.bad_rows(good, pl.lit(True), "future")
    assert later["ts_raw"].to_list() == [_kept(padded), "2013-01-01T00:00Z"]
    assert later["value_raw"].to_list() == ["2", "0" * 1023 + "1"]  # at the bound: kept whole


def test_ts_and_value_texts_over_the_field_limit_are_not_parsed():
    """A value of 4097 characters is refused even when it would read as a number."""
    ok, over = "0" * 4095 + "1", "0" * 4096 + "1"
    good, bad = F.parse(raw(["a", "a"], ["2013-01-01T00:00Z", "2013-01-01T01:00Z"], [ok, over]))
    assert good["value"].to_list() == [1.0]
    assert bad.select("origin", "reason").rows() == [("r1", "bad_value")]


def test_a_row_the_source_could_not_read_is_a_bad_record_with_its_problem():
    rows = raw(["a", "a"], ["2013-01-01T00:00Z"] * 2, ["1", "2"]).with_columns(
        problem=pl.Series([None, "it has 4 fields where the header has 3"])
    )
    good, bad = F.parse(rows)
    assert good["origin"].to_list() == ["r0"]
    assert bad.select("origin", "reason", "detail").rows() == [
        ("r1", "bad_record", "it has 4 fields where the header has 3")
    ]
