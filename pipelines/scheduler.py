"""When jobs fire: the only module that imports APScheduler (3.11, UTC).

The same triggers drive two schedulers:
- `LiveScheduler`: APScheduler's BackgroundScheduler on the wall clock. It only dispatches:
  each fire hands a Job to a callback that runs it on the compute backend. coalesce=True
  (a backlog of fires runs once), max_instances=1 (a job never overlaps itself) and a
  deliberate misfire_grace_time (APScheduler's default of 1 s silently skips runs); missed
  fires are reported so they are counted.
- `SimulatedScheduler`: the triggers' own next-fire computation stepped over a simulated
  clock (replays, the demo, backtests), so a backtest runs the schedule the live service
  would, jobs and retraining policy included, as fast as the machine allows.

Interval triggers are anchored at the Unix epoch, so fire times are multiples of the
interval: a restarted daemon fires at the same instants, and each fire time is a stable key
for `job_runs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from forecaster.clock import Clock, FixedClock
from forecaster.config import Settings
from forecaster.errors import ConfigError
from pipelines.jobs import ORDER, Kind

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Schedule:
    kind: Kind
    source: str | None
    trigger: BaseTrigger
    every: timedelta | None  # interval triggers; None for cron

    @property
    def job_id(self) -> str:
        return f"{self.kind}:{self.source}" if self.source else self.kind

    def fire_time(self, now: datetime) -> datetime:
        """The fire time a run at `now` belongs to: the interval's multiple at or before
        now, or the cron's minute."""
        if self.every is None:
            return now.replace(second=0, microsecond=0)
        step = int(self.every.total_seconds())
        return EPOCH + timedelta(seconds=int((now - EPOCH).total_seconds()) // step * step)


def _every(td: timedelta) -> IntervalTrigger:
    return IntervalTrigger(seconds=td.total_seconds(), start_date=EPOCH, timezone=UTC)


def schedules(settings: Settings) -> list[Schedule]:
    """Every scheduled job of the configuration with its trigger."""
    sc = settings.schedule
    out = [
        Schedule("ingest", name, _every(src.interval), src.interval)
        for name, src in sorted(settings.sources.items())
    ]
    out.append(Schedule("predict", None, _every(sc.predict_interval), sc.predict_interval))
    out.append(Schedule("evaluate", None, _every(sc.evaluate_interval), sc.evaluate_interval))
    if settings.retrain.enabled:
        if sc.retrain_interval is not None:
            out.append(Schedule("retrain", None, _every(sc.retrain_interval), sc.retrain_interval))
        elif sc.retrain_cron:
            try:
                cron = CronTrigger.from_crontab(sc.retrain_cron, timezone=UTC)
            except ValueError as exc:
                raise ConfigError(
                    "schedule.retrain_cron",
                    f"{sc.retrain_cron!r} is not a crontab: {exc}",
                    "Use five fields, e.g. '0 3 * * sun' (Sundays 03:00 UTC).",
                ) from None
            out.append(Schedule("retrain", None, cron, None))
    out.append(
        Schedule("housekeeping", None, _every(sc.housekeeping_interval), sc.housekeeping_interval)
    )
    return out


# A fire: which job, at which fire time, and why ("schedule" or a trigger name).
FireCallback = Callable[[Kind, str | None, datetime, str], None]


class LiveScheduler:
    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        *,
        on_fire: FireCallback,
        on_missed: Callable[[str], None],
        threads: int,
    ) -> None:
        self._clock = clock
        self._on_fire = on_fire
        self._schedules = {s.job_id: s for s in schedules(settings)}
        self._sched = BackgroundScheduler(
            timezone=UTC,
            executors={"default": {"type": "threadpool", "max_workers": threads}},
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": int(settings.schedule.misfire_grace_time.total_seconds()),
            },
        )
        start = clock.now()
        for job_id, sched in self._schedules.items():
            # Interval jobs also run once at start-up (their current slot), so a restarted
            # daemon catches up at once instead of waiting for the next multiple.
            first = {"next_run_time": start} if sched.every is not None else {}
            self._sched.add_job(
                self._fire, sched.trigger, args=(job_id,), id=job_id, name=job_id, **first
            )

        def missed(event: JobExecutionEvent) -> None:
            on_missed(str(event.job_id).split("@", 1)[0])

        self._sched.add_listener(missed, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)

    def _fire(self, job_id: str) -> None:
        sched = self._schedules[job_id]
        self._on_fire(sched.kind, sched.source, sched.fire_time(self._clock.now()), "schedule")

    def run_soon(self, kind: Kind, source: str | None, fire: datetime, trigger: str) -> None:
        """One extra run now (predict after an ingest completed a window, a retrain when
        accuracy degraded), keyed by the fire time that caused it."""
        self._sched.add_job(
            self._on_fire,
            DateTrigger(run_date=self._clock.now(), timezone=UTC),
            args=(kind, source, fire, trigger),
            id=f"{kind}:{trigger}@{fire.isoformat()}",
            replace_existing=True,
            misfire_grace_time=None,
        )

    def start(self) -> None:
        self._sched.start()

    @property
    def running(self) -> bool:
        return bool(self._sched.running)

    def shutdown(self, *, wait: bool) -> None:
        if self._sched.running:
            self._sched.shutdown(wait=wait)


class SimulatedScheduler:
    """Steps a simulated clock from fire to fire of the same triggers."""

    def __init__(self, settings: Settings, clock: FixedClock, *, start: datetime) -> None:
        self._clock = clock
        self._schedules = schedules(settings)
        self._next: dict[str, datetime | None] = {
            s.job_id: s.trigger.get_next_fire_time(None, start) for s in self._schedules
        }
        self._by_id = {s.job_id: s for s in self._schedules}

    def peek(self) -> datetime | None:
        times = [t for t in self._next.values() if t is not None]
        return min(times) if times else None

    def pop_due(self) -> tuple[datetime, list[Schedule]] | None:
        """The next fire time and the jobs due then (in ORDER); the clock moves there."""
        when = self.peek()
        if when is None:
            return None
        due = [self._by_id[j] for j, t in self._next.items() if t == when]
        for s in due:
            self._next[s.job_id] = s.trigger.get_next_fire_time(when, when + _TICK)
        self._clock.set(when)
        due.sort(key=lambda s: (ORDER.index(s.kind), s.source or ""))
        return when, due

    @property
    def running(self) -> bool:
        return True


_TICK = timedelta(microseconds=1)  # "now" just after a fire, so the next one is later
