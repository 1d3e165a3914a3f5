"""The accuracy bench's datasets (bench/accuracy_data.py): each one whose package is
installed loads onto its spec's grid, with the columns and lengths the bench relies on."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import pytest

from bench.accuracy_data import DATASETS, Session, Spec, regularize

SCHEMA = {
    "series": pl.String,
    "ts": pl.Datetime("us", "UTC"),
    "value": pl.Float64,
    "filled": pl.Boolean,
}


@pytest.fixture(params=sorted(DATASETS), scope="module")
def loaded(request) -> tuple[Spec, pl.DataFrame]:
    spec = DATASETS[request.param]
    if not spec.available():
        pytest.skip(f"{spec.name} needs {spec.package}: pip install -e '.[bench]'")
    return spec, spec.load()


def test_schema_and_values(loaded):
    spec, frame = loaded
    assert dict(frame.schema) == SCHEMA, spec.name
    assert frame.null_count().sum_horizontal().item() == 0, spec.name
    assert frame.filter(~pl.col("value").is_finite()).height == 0, spec.name
    # Interpolation is for short holes: most of every series is observed.
    assert frame.group_by("series").agg(pl.col("filled").mean())["filled"].max() < 0.15, spec.name


def test_every_series_is_on_the_grid(loaded):
    spec, frame = loaded
    for (name,), part in frame.group_by("series"):
        ts = part["ts"].sort()
        assert ts.is_unique().all(), (spec.name, name)
        assert ts.to_list() == spec.grid(ts.min(), ts.max()).to_list(), (spec.name, name)


def test_long_enough_for_the_protocol(loaded):
    """The test span plus two weekly cycles before it, and the trailing window of the
    first origin, fit into every series."""
    spec, frame = loaded
    m, w = spec.seasons
    need = spec.test_days * m + 2 * w
    lengths = frame.group_by("series").len()
    assert lengths["len"].min() >= need, (spec.name, lengths.sort("len").row(0), need)
    assert spec.horizon <= m and spec.test_days * m % spec.horizon == 0, spec.name


def test_next_steps_follow_the_grid(loaded):
    spec, frame = loaded
    ts = frame.filter(pl.col("series") == frame["series"][0])["ts"].sort()
    start = len(ts) // 2
    assert (
        spec.next_steps(ts[start], 3 * spec.horizon)
        == ts[start + 1 : start + 1 + 3 * spec.horizon].to_list()
    )


def _spec(session: Session | None = None) -> Spec:
    return Spec(
        name="toy", load=pl.DataFrame, freq_s=3600, horizon=2, seasons=(2, 4), modules=(), package="-",
        license="-", source="-", missing="-", session=session,
    )  # fmt: skip


def test_regularize_fills_short_gaps_and_marks_them():
    t = [datetime(2024, 1, 1, h, tzinfo=UTC) for h in (0, 1, 3, 4)]
    raw = pl.DataFrame({"series": "a", "ts": t, "value": [1.0, 2.0, 4.0, 5.0]})
    out = regularize(raw, _spec(), max_gap=1)
    assert out["value"].to_list() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert out["filled"].to_list() == [False, False, True, False, False]
    with pytest.raises(ValueError, match="a gap of 1 steps, more than 0"):
        regularize(raw, _spec(), max_gap=0)


def test_a_session_grid_skips_closed_hours():
    spec = _spec(Session(tz="UTC", slots=frozenset((d, h) for d in range(1, 6) for h in (9, 10))))
    friday = datetime(2024, 1, 5, 10, tzinfo=UTC)
    monday = [datetime(2024, 1, 8, h, tzinfo=UTC) for h in (9, 10)]
    assert spec.next_steps(friday, 2) == monday
    assert spec.grid(friday, monday[1]).to_list() == [friday, *monday]
    off = pl.DataFrame(
        {"series": "a", "ts": [friday, datetime(2024, 1, 6, 9, tzinfo=UTC)], "value": [1.0, 2.0]}
    )
    with pytest.raises(ValueError, match="1 rows off the grid"):
        regularize(off, spec, max_gap=0)


def test_a_short_history_keeps_the_weeks_before_the_first_origin_and_every_scored_row():
    from bench.accuracy import _origins, short_history

    spec = _spec()  # w = 4 steps; 28 days of m = 2 steps: 28 blocks of H = 2
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    frame = pl.concat(
        pl.DataFrame(
            {
                "series": name,
                "ts": pl.datetime_range(
                    t0, t0 + (n - 1) * pl.duration(hours=1), "1h", eager=True, time_unit="us"
                ).dt.replace_time_zone("UTC"),
                "value": [float(i) for i in range(n)],
                "filled": False,
            }
        )
        for name, n in (("long", 100), ("short", 70))
    )
    full, blocks = _origins(frame, spec, None)
    cut = short_history(full, spec, 3)
    for name in ("long", "short"):
        mine, was = cut.filter(pl.col("series") == name), full.filter(pl.col("series") == name)
        assert mine.filter(pl.col("i") < pl.col("o0")).height == 3 * 4
        scored = lambda f: f.filter(pl.col("i") >= pl.col("o0"))["ts"].to_list()  # noqa: E731
        assert scored(mine) == scored(was) and len(scored(mine)) == blocks * spec.horizon
    with pytest.raises(ValueError, match="too short"):
        short_history(full, spec, 1)  # the references need two weeks
