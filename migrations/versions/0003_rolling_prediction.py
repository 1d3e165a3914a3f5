"""Rolling prediction: series_states, state_snapshots, forecasts, and the views analysts
query, latest_forecasts and forecast_accuracy (same columns on SQLite and PostgreSQL).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 02:05:38.833948
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# The newest origin per series, model and target time, superseded forecasts left out.
LATEST_FORECASTS = """
CREATE VIEW latest_forecasts AS
SELECT s.name AS series, f.model, f.model_version_id, f.origin_ts, f.target_ts,
       f.horizon_step, f.yhat, f.yhat_lower, f.yhat_upper, f.interval_level, f.created_at
FROM forecasts f
JOIN series s ON s.id = f.series_id
WHERE f.superseded = false
  AND f.origin_ts = (
      SELECT max(f2.origin_ts) FROM forecasts f2
      WHERE f2.series_id = f.series_id AND f2.model = f.model
        AND f2.target_ts = f.target_ts AND f2.superseded = false)
"""

# Forecasts whose actuals have arrived. The pinball loss averages the three quantiles the
# row holds: the band's edges at (1 - level) / 2 and (1 + level) / 2, and the median.
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
JOIN observations o ON o.series_id = f.series_id AND o.ts = f.target_ts
WHERE f.superseded = false AND o.quality = 'observed' AND o.value IS NOT NULL
"""


def upgrade() -> None:
    op.create_table(
        "forecasts",
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
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_forecasts_model_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["series_id"],
            ["series.id"],
            name=op.f("fk_forecasts_series_id_series"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "series_id", "model", "origin_ts", "horizon_step", name=op.f("pk_forecasts")
        ),
    )
    with op.batch_alter_table("forecasts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_forecasts_target_ts"), ["target_ts"], unique=False)

    op.create_table(
        "series_states",
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("shape", sa.JSON(), nullable=False),
        sa.Column("state_ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_series_states_model_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["series_id"],
            ["series.id"],
            name=op.f("fk_series_states_series_id_series"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("model_version_id", "series_id", name=op.f("pk_series_states")),
    )
    op.create_table(
        "state_snapshots",
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("window_id", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("shape", sa.JSON(), nullable=False),
        sa.Column("state_ts", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_state_snapshots_model_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["series_id"],
            ["series.id"],
            name=op.f("fk_state_snapshots_series_id_series"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "model_version_id", "series_id", "window_id", name=op.f("pk_state_snapshots")
        ),
    )
    op.execute(LATEST_FORECASTS)
    op.execute(FORECAST_ACCURACY)


def downgrade() -> None:
    op.execute("DROP VIEW forecast_accuracy")
    op.execute("DROP VIEW latest_forecasts")
    op.drop_table("state_snapshots")
    op.drop_table("series_states")
    with op.batch_alter_table("forecasts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_forecasts_target_ts"))

    op.drop_table("forecasts")
