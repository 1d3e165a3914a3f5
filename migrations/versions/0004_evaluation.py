"""Evaluation: calibration (conformal corrections per model and horizon step), anomalies,
and the raw (uncalibrated) band edges on forecasts.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 02:14:23.805503
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "calibration",
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("horizon_step", sa.Integer(), nullable=False),
        sa.Column("correction", sa.Float(), nullable=False),
        sa.Column("n_scored", sa.Integer(), nullable=False),
        sa.Column("coverage_raw", sa.Float(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model", "horizon_step", name=op.f("pk_calibration")),
    )
    op.create_table(
        "anomalies",
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("actual", sa.Float(), nullable=False),
        sa.Column("yhat", sa.Float(), nullable=False),
        sa.Column("yhat_lower", sa.Float(), nullable=False),
        sa.Column("yhat_upper", sa.Float(), nullable=False),
        sa.Column("origin_ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["series_id"],
            ["series.id"],
            name=op.f("fk_anomalies_series_id_series"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("series_id", "ts", "model", name=op.f("pk_anomalies")),
    )
    with op.batch_alter_table("forecasts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("raw_lower", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("raw_upper", sa.Float(), nullable=True))


def downgrade() -> None:
    # Not batch mode: on SQLite it would copy and rename `forecasts`, which the views of
    # 0003 refer to. Both dialects drop a column in place (SQLite since 3.35).
    op.drop_column("forecasts", "raw_upper")
    op.drop_column("forecasts", "raw_lower")

    op.drop_table("anomalies")
    op.drop_table("calibration")
