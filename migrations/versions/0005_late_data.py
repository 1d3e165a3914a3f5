"""Late data: forecast revisions (a late point re-issues forecasts, the old rows stay marked
superseded) and the late marks on watermarks that tell predict which states to rewind.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 17:20:00.000000
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The views of 0003 are unchanged; they are dropped and created again around the rebuild of
# `forecasts` (SQLite changes a primary key by copying the table, which a view would pin).
_views = importlib.import_module("migrations.versions.0003_rolling_prediction")


def upgrade() -> None:
    with op.batch_alter_table("watermarks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("late_from", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("late_seq", sa.BigInteger(), server_default="0", nullable=False)
        )

    op.execute("DROP VIEW forecast_accuracy")
    op.execute("DROP VIEW latest_forecasts")
    with op.batch_alter_table("forecasts", schema=None, recreate="always") as batch_op:
        batch_op.add_column(
            sa.Column("revision", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.drop_constraint("pk_forecasts", type_="primary")
        batch_op.create_primary_key(
            "pk_forecasts", ["series_id", "model", "origin_ts", "horizon_step", "revision"]
        )
    op.execute(_views.LATEST_FORECASTS)
    op.execute(_views.FORECAST_ACCURACY)


def downgrade() -> None:
    op.execute("DROP VIEW forecast_accuracy")
    op.execute("DROP VIEW latest_forecasts")
    # The old key has room for one row per series, model, origin and step: the current one.
    op.execute("DELETE FROM forecasts WHERE superseded")
    with op.batch_alter_table("forecasts", schema=None, recreate="always") as batch_op:
        batch_op.drop_constraint("pk_forecasts", type_="primary")
        batch_op.create_primary_key(
            "pk_forecasts", ["series_id", "model", "origin_ts", "horizon_step"]
        )
        batch_op.drop_column("revision")
    op.execute(_views.LATEST_FORECASTS)
    op.execute(_views.FORECAST_ACCURACY)

    with op.batch_alter_table("watermarks", schema=None) as batch_op:
        batch_op.drop_column("late_seq")
        batch_op.drop_column("late_from")
