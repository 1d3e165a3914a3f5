"""Running aggregates for the evaluate job: calibration_days, accuracy_days, fleet_times,
anomaly_points, and anomaly_state's typical and recent.

Before, each evaluate run read every scored forecast of the 28-day calibration window (at
10,000 series, 33-35 s a run once the window was full). Now it reads the forecasts whose
actuals are new and adds them to these tables; what it computed from the window's rows
(the per-step corrections, coverage, per-series accuracy, anomaly thresholds, the fleet's
usual share beyond its bands) it computes from them.

The tables start empty: after the upgrade the corrections follow the holdout calibration
and what is scored from then on, and each series' own anomaly threshold waits for two
weeks of its points again (the fleet's serves meanwhile), as for a new champion.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def _series_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["series_id"], ["series.id"], name=op.f(f"fk_{table}_series_id_series"), ondelete="CASCADE"
    )


def upgrade() -> None:
    with op.batch_alter_table("anomaly_state") as batch:
        batch.add_column(sa.Column("typical", sa.Float(), nullable=True))
        batch.add_column(sa.Column("recent", sa.Text(), nullable=True))
    op.create_table(
        "calibration_days",
        sa.Column("model", sa.String(length=64), nullable=False),
        _ts("day"),
        sa.Column("horizon_step", sa.Integer(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("inside", sa.BigInteger(), nullable=False),
        sa.Column("inside_raw", sa.BigInteger(), nullable=False),
        sa.Column("scores", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("model", "day", "horizon_step", name=op.f("pk_calibration_days")),
    )
    op.create_table(
        "accuracy_days",
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        _ts("day"),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("abs_err", sa.Float(), nullable=False),
        sa.Column("naive_abs_err", sa.Float(), nullable=False),
        sa.Column("inside", sa.BigInteger(), nullable=False),
        sa.Column("n_points", sa.BigInteger(), nullable=False),
        _series_fk("accuracy_days"),
        sa.PrimaryKeyConstraint("series_id", "model", "day", name=op.f("pk_accuracy_days")),
    )
    op.create_index("ix_accuracy_days_day", "accuracy_days", ["day"])
    op.create_table(
        "fleet_times",
        sa.Column("model", sa.String(length=64), nullable=False),
        _ts("ts"),
        sa.Column("n_series", sa.BigInteger(), nullable=False),
        sa.Column("n_low", sa.BigInteger(), nullable=False),
        sa.Column("n_high", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("model", "ts", name=op.f("pk_fleet_times")),
    )
    op.create_table(
        "anomaly_points",
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        _ts("ts"),
        sa.Column("deviation", sa.Float(), nullable=False),
        sa.Column("evidence", sa.Float(), nullable=False),
        _series_fk("anomaly_points"),
        sa.PrimaryKeyConstraint("model", "series_id", "ts", name=op.f("pk_anomaly_points")),
    )
    op.create_index("ix_anomaly_points_model_ts", "anomaly_points", ["model", "ts"])


def downgrade() -> None:
    op.drop_index("ix_anomaly_points_model_ts", table_name="anomaly_points")
    op.drop_table("anomaly_points")
    op.drop_table("fleet_times")
    op.drop_index("ix_accuracy_days_day", table_name="accuracy_days")
    op.drop_table("accuracy_days")
    op.drop_table("calibration_days")
    with op.batch_alter_table("anomaly_state") as batch:
        batch.drop_column("recent")
        batch.drop_column("typical")
