"""window_values: a packed copy of each series' complete windows, read by predict for the
head's seasonal lags.

Before, every predict cycle read the head's seasonal lags (a day, a week, two and three weeks
back: about 100 points per series) from `observations`, row by row: at 10,000 series most of
a cycle's reads. Now the cycle that first reads a complete window stores it here as one row
(float32 values, one per step, NaN where none is stored), and later cycles read the lags as
a few such rows per series. A late point drops the series' rows from its window on, in the
transaction that handles it.

The table starts empty: the first cycles after the upgrade read from `observations` as
before and fill it. Nothing else changes.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 16:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "window_values",
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("window_id", sa.BigInteger(), nullable=False),
        sa.Column("step_seconds", sa.Integer(), nullable=False),
        sa.Column("points", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["series_id"],
            ["series.id"],
            name=op.f("fk_window_values_series_id_series"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("series_id", "window_id", name=op.f("pk_window_values")),
    )


def downgrade() -> None:
    op.drop_table("window_values")
