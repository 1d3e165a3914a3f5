"""Job runs (the scheduler's idempotency keys) and housekeeping.

A job run is claimed by inserting its (job_id, scheduled_at) row with ON CONFLICT DO
NOTHING: a double fire, a second replica or a restart inside the same slot finds the row
taken and does nothing. The jobs themselves are driven by stored watermarks, so a run that
was skipped or killed loses nothing: the next one does its work.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from forecaster import schema as s
from forecaster.store.base import WORK_MARK, StoreBase

RUN_STATES = ("running", "succeeded", "failed", "skipped", "abandoned")


class JobsStore(StoreBase):
    def claim_job_run(self, job_id: str, scheduled_at: datetime, started_at: datetime) -> bool:
        """Insert the run's row; False when this (job, fire time) was claimed before, unless
        that run was abandoned (its process was killed), which is claimed again so the run
        is redone. An abandoned run's transactions either committed whole or rolled back;
        `left_work` says whether any of them committed."""
        jr = s.job_runs
        stmt = self._insert(jr).values(
            job_id=job_id, scheduled_at=scheduled_at, status="running", started_at=started_at
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["job_id", "scheduled_at"],
            set_={"status": "running", "started_at": stmt.excluded.started_at, "finished_at": None},
            where=jr.c.status == "abandoned",
        ).returning(jr.c.job_id)
        with self.begin() as conn:
            return conn.execute(stmt).first() is not None

    def left_work(self, job_id: str, scheduled_at: datetime) -> bool:
        """Whether transactions of this run (an earlier, killed attempt of it included)
        committed work: their commit marked the row (StoreBase.working_for)."""
        jr = s.job_runs
        q = sa.select(jr.c.detail).where(jr.c.job_id == job_id, jr.c.scheduled_at == scheduled_at)
        with self.engine.connect() as conn:
            return conn.execute(q).scalar() == WORK_MARK

    def finish_job_run(
        self,
        job_id: str,
        scheduled_at: datetime,
        *,
        status: str,
        finished_at: datetime,
        detail: str | None = None,
    ) -> None:
        if status not in RUN_STATES:
            raise ValueError(f"job run status {status!r} is not one of {', '.join(RUN_STATES)}")
        jr = s.job_runs
        with self.begin() as conn:
            conn.execute(
                sa.update(jr)
                .where(jr.c.job_id == job_id, jr.c.scheduled_at == scheduled_at)
                .values(status=status, finished_at=finished_at, detail=detail)
            )

    def abandon_running(self, finished_at: datetime) -> int:
        """Mark runs a killed process left 'running' as abandoned (their transactions rolled
        back; the next run redoes their work). Called once at start-up."""
        jr = s.job_runs
        with self.begin() as conn:
            done = conn.execute(
                sa.update(jr)
                .where(jr.c.status == "running")
                .values(status="abandoned", finished_at=finished_at)
            )
            return done.rowcount

    def last_job_run(self, job_id_prefix: str, status: str | None = None) -> dict[str, Any] | None:
        """The newest run (by scheduled time) of the jobs whose id starts with the prefix."""
        jr = s.job_runs
        q = sa.select(jr).where(jr.c.job_id.startswith(job_id_prefix, autoescape=True))
        if status is not None:
            q = q.where(jr.c.status == status)
        with self.engine.connect() as conn:
            row = conn.execute(q.order_by(jr.c.scheduled_at.desc()).limit(1)).first()
        return None if row is None else dict(row._mapping)

    def job_runs(self) -> list[dict[str, Any]]:
        jr = s.job_runs
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jr).order_by(jr.c.scheduled_at, jr.c.job_id))
            return [dict(r._mapping) for r in rows]

    def housekeep(self, cutoffs: Mapping[str, datetime | None]) -> dict[str, int]:
        """Delete what retention lets go, in one transaction: observations older than
        cutoffs["observations"], the forecasts of every origin whose last target is older
        than cutoffs["forecasts"] (their anomalies stay), job runs scheduled before
        cutoffs["job_runs"]. With the observations go the copies of the windows that start
        before their cutoff (window_values: predict reads lags from them). A None cutoff
        keeps everything of that kind. Returns rows deleted per table (for forecasts, ledger
        rows: one per series, model and origin)."""
        out: dict[str, int] = {}
        targets = {
            "observations": (s.observations, s.observations.c.ts),
            # An origin's forecasts go once its last target is past the cutoff.
            "forecasts": (s.forecast_origins, s.forecast_origins.c.last_target_ts),
            "job_runs": (s.job_runs, s.job_runs.c.scheduled_at),
        }
        with self.begin() as conn:
            for name, (table, column) in targets.items():
                cutoff = cutoffs.get(name)
                if cutoff is None:
                    continue
                out[name] = conn.execute(sa.delete(table).where(column < cutoff)).rowcount
                if name == "observations":  # and the copies of windows that start before it
                    wv, se = s.window_values, s.series
                    starts = wv.c.window_id * se.c.window_seconds
                    cut = int(cutoff.timestamp())
                    conn.execute(
                        sa.delete(wv).where(
                            sa.exists().where(se.c.id == wv.c.series_id, starts < cut)
                        )
                    )
        return out
