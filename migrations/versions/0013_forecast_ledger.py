"""The forecast ledger: one row per series, model, origin and revision, the horizon in it.

Before, `forecasts` held one row per horizon step: a predict cycle at 10,000 series wrote
720,000 rows (24 steps x the model and two baselines), most of its time. Now
`forecast_origins` holds one row per series, model, origin and revision with the horizon's
values in `points` (a JSON array, one entry per step: [yhat, yhat_lower, yhat_upper,
raw_lower, raw_upper], [yhat] for a baseline, null for a step without a forecast) and each
step's target time is origin_ts + step * step_seconds. `forecasts` becomes a view that
unnests it, with the columns and rows the table had (plus last_target_ts), so
latest_forecasts, forecast_accuracy and analysts' queries read what they read before.

A revision now covers an origin's whole horizon (a late point always re-issued every step
of the origins it made stale, so nothing stored before this migration is lost). Retention
deletes an origin once its last target is past the cutoff.

Upgrade copies every stored forecast into the ledger; downgrade unnests it back into the
table.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 01:00:00.000000
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_first = importlib.import_module("migrations.versions.0003_rolling_prediction")
_latest = importlib.import_module("migrations.versions.0011_latest_forecasts_window")

# The view's columns, in the order the table had them (0003, then 0004's raw band and 0005's
# revision), then the origin's last target.
FORECASTS_SQLITE = """
CREATE VIEW forecasts AS
SELECT fo.series_id, fo.model, fo.origin_ts, p.key + 1 AS horizon_step, fo.model_version_id,
       strftime('%Y-%m-%d %H:%M:%S', fo.origin_ts,
                '+' || ((p.key + 1) * fo.step_seconds) || ' seconds')
           || substr(fo.origin_ts, 20) AS target_ts,
       json_extract(p.value, '$[0]') AS yhat,
       json_extract(p.value, '$[1]') AS yhat_lower,
       json_extract(p.value, '$[2]') AS yhat_upper,
       fo.interval_level, fo.superseded, fo.created_at,
       json_extract(p.value, '$[3]') AS raw_lower,
       json_extract(p.value, '$[4]') AS raw_upper,
       fo.revision, fo.last_target_ts
FROM forecast_origins AS fo, json_each(fo.points) AS p
WHERE p.type = 'array'
"""

FORECASTS_POSTGRESQL = """
CREATE VIEW forecasts AS
SELECT fo.series_id, fo.model, fo.origin_ts, p.step::integer AS horizon_step,
       fo.model_version_id,
       fo.origin_ts + (p.step * fo.step_seconds) * interval '1 second' AS target_ts,
       (p.v ->> 0)::double precision AS yhat,
       (p.v ->> 1)::double precision AS yhat_lower,
       (p.v ->> 2)::double precision AS yhat_upper,
       fo.interval_level, fo.superseded, fo.created_at,
       (p.v ->> 3)::double precision AS raw_lower,
       (p.v ->> 4)::double precision AS raw_upper,
       fo.revision, fo.last_target_ts
FROM forecast_origins AS fo
CROSS JOIN LATERAL json_array_elements(fo.points::json) WITH ORDINALITY AS p (v, step)
WHERE json_typeof(p.v) = 'array'
"""


_UNNEST_INTO_TABLE = """
INSERT INTO forecasts_rows (series_id, model, origin_ts, horizon_step, model_version_id,
    target_ts, yhat, yhat_lower, yhat_upper, interval_level, superseded, created_at,
    raw_lower, raw_upper, revision)
SELECT series_id, model, origin_ts, horizon_step, model_version_id, target_ts, yhat,
    yhat_lower, yhat_upper, interval_level, superseded, created_at, raw_lower, raw_upper,
    revision
FROM forecasts
"""


# forecast_accuracy as 0003 defined it, the observations joined with CROSS JOIN: the same
# rows and columns, but SQLite keeps the join order (each forecast point, then its actual by
# the observations' key). Left free, with `forecasts` a view over the ledger, it scanned
# each series' observations per ledger row. PostgreSQL plans both spellings alike.
FORECAST_ACCURACY = """
CREATE VIEW forecast_accuracy AS
SELECT s.name AS series, f.model, f.model_version_id, f.origin_ts, f.target_ts,
       f.horizon_step, f.yhat, f.yhat_lower, f.yhat_upper, f.interval_level,
       o.value AS actual,
       o.value - f.yhat AS error,
       abs(o.value - f.yhat) AS abs_error,
       CASE WHEN o.value >= f.yhat_lower AND o.value <= f.yhat_upper THEN 1 ELSE 0 END
           AS inside_interval,
       (CASE WHEN o.value >= f.yhat_lower
             THEN (1 - f.interval_level) / 2 * (o.value - f.yhat_lower)
             ELSE (1 + f.interval_level) / 2 * (f.yhat_lower - o.value) END
        + 0.5 * abs(o.value - f.yhat)
        + CASE WHEN o.value >= f.yhat_upper
             THEN (1 + f.interval_level) / 2 * (o.value - f.yhat_upper)
             ELSE (1 - f.interval_level) / 2 * (f.yhat_upper - o.value) END) / 3
           AS pinball_loss
FROM forecasts f
JOIN series s ON s.id = f.series_id
CROSS JOIN observations o
WHERE o.series_id = f.series_id AND o.ts = f.target_ts
  AND f.superseded = false AND o.quality = 'observed' AND o.value IS NOT NULL
"""


def _drop_views() -> None:
    op.execute("DROP VIEW forecast_accuracy")
    op.execute("DROP VIEW latest_forecasts")


def _create_views(accuracy: str) -> None:
    op.execute(_latest.LATEST_FORECASTS)
    op.execute(accuracy)


def upgrade() -> None:
    op.create_table(
        "forecast_origins",
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("origin_ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revision", sa.Integer(), server_default="0", nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=True),
        sa.Column("step_seconds", sa.Integer(), nullable=False),
        sa.Column("n_steps", sa.Integer(), nullable=False),
        sa.Column("last_target_ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("interval_level", sa.Float(), nullable=True),
        sa.Column("points", sa.Text(), nullable=False),
        sa.Column("superseded", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_forecast_origins_model_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["series_id"],
            ["series.id"],
            name=op.f("fk_forecast_origins_series_id_series"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "series_id", "model", "origin_ts", "revision", name=op.f("pk_forecast_origins")
        ),
    )
    with op.batch_alter_table("forecast_origins", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_forecast_origins_last_target_ts"), ["last_target_ts"], unique=False
        )
    _copy_into_ledger()
    _drop_views()
    op.drop_table("forecasts")
    op.execute(
        FORECASTS_SQLITE if op.get_context().dialect.name == "sqlite" else FORECASTS_POSTGRESQL
    )
    _create_views(FORECAST_ACCURACY)


def downgrade() -> None:
    _drop_views()
    op.create_table(
        "forecasts_rows",
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("origin_ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("horizon_step", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=True),
        sa.Column("target_ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("yhat", sa.Float(), nullable=False),
        sa.Column("yhat_lower", sa.Float(), nullable=True),
        sa.Column("yhat_upper", sa.Float(), nullable=True),
        sa.Column("interval_level", sa.Float(), nullable=True),
        sa.Column("superseded", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("raw_lower", sa.Float(), nullable=True),
        sa.Column("raw_upper", sa.Float(), nullable=True),
        sa.Column("revision", sa.Integer(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name="fk_forecasts_model_version_id_model_versions",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["series_id"], ["series.id"], name="fk_forecasts_series_id_series", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint(
            "series_id", "model", "origin_ts", "horizon_step", "revision", name="pk_forecasts"
        ),
    )
    op.execute(_UNNEST_INTO_TABLE)
    op.execute("DROP VIEW forecasts")
    op.rename_table("forecasts_rows", "forecasts")
    with op.batch_alter_table("forecasts", schema=None) as batch_op:
        batch_op.create_index("ix_forecasts_target_ts", ["target_ts"], unique=False)
    with op.batch_alter_table("forecast_origins", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_forecast_origins_last_target_ts"))
    op.drop_table("forecast_origins")
    _create_views(_first.FORECAST_ACCURACY)


# -- the copy into the ledger -------------------------------------------------------------

_OLD = sa.table(
    "forecasts",
    *(
        sa.column(c, t)
        for c, t in (
            ("series_id", sa.Integer()),
            ("model", sa.String()),
            ("origin_ts", sa.DateTime(timezone=True)),
            ("revision", sa.Integer()),
            ("horizon_step", sa.Integer()),
            ("model_version_id", sa.Integer()),
            ("target_ts", sa.DateTime(timezone=True)),
            ("yhat", sa.Float()),
            ("yhat_lower", sa.Float()),
            ("yhat_upper", sa.Float()),
            ("raw_lower", sa.Float()),
            ("raw_upper", sa.Float()),
            ("interval_level", sa.Float()),
            ("superseded", sa.Boolean()),
            ("created_at", sa.DateTime(timezone=True)),
        )
    ),
)
_NEW = sa.table(
    "forecast_origins",
    *(
        sa.column(c, t)
        for c, t in (
            ("series_id", sa.Integer()),
            ("model", sa.String()),
            ("origin_ts", sa.DateTime(timezone=True)),
            ("revision", sa.Integer()),
            ("model_version_id", sa.Integer()),
            ("step_seconds", sa.Integer()),
            ("n_steps", sa.Integer()),
            ("last_target_ts", sa.DateTime(timezone=True)),
            ("interval_level", sa.Float()),
            ("points", sa.Text()),
            ("superseded", sa.Boolean()),
            ("created_at", sa.DateTime(timezone=True)),
        )
    ),
)


def _copy_into_ledger() -> None:
    """Every stored forecast row, grouped by (series, model, origin, revision), written as
    one ledger row; batches of 5,000 origins."""
    conn = op.get_bind()
    key = ("series_id", "model", "origin_ts", "revision")
    q = sa.select(_OLD).order_by(*(_OLD.c[k] for k in key), _OLD.c.horizon_step)
    batch: list[dict[str, Any]] = []
    for group in _groups(conn.execute(q).mappings(), key):
        batch.append(_ledger_row(group))
        if len(batch) >= 5000:
            conn.execute(sa.insert(_NEW), batch)
            batch = []
    if batch:
        conn.execute(sa.insert(_NEW), batch)


def _groups(rows: Iterator[Any], key: tuple[str, ...]) -> Iterator[list[Any]]:
    group: list[Any] = []
    for r in rows:
        if group and tuple(r[k] for k in key) != tuple(group[0][k] for k in key):
            yield group
            group = []
        group.append(r)
    if group:
        yield group


def _num(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else x


def _ledger_row(group: list[Any]) -> dict[str, Any]:
    first = group[0]
    origin: datetime = first["origin_ts"]
    step_s = round((first["target_ts"] - origin).total_seconds() / first["horizon_step"])
    n_steps = max(r["horizon_step"] for r in group)
    points: list[Any] = [None] * n_steps
    for r in group:
        band = [_num(r[c]) for c in ("yhat_lower", "yhat_upper", "raw_lower", "raw_upper")]
        value = [_num(r["yhat"])]
        points[r["horizon_step"] - 1] = value + band if any(b is not None for b in band) else value
    level = next((r["interval_level"] for r in group if r["interval_level"] is not None), None)
    return {
        "series_id": first["series_id"],
        "model": first["model"],
        "origin_ts": origin,
        "revision": first["revision"],
        "model_version_id": first["model_version_id"],
        "step_seconds": step_s,
        "n_steps": n_steps,
        "last_target_ts": origin + (first["target_ts"] - origin) / first["horizon_step"] * n_steps,
        "interval_level": level,
        "points": json.dumps(points, separators=(",", ":")),
        "superseded": all(r["superseded"] for r in group),
        "created_at": min(r["created_at"] for r in group),
    }
