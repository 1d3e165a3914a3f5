"""The pooled calibration offset carried between evaluate runs: calibration_offsets (per
model, the integral of the served band's excess misses) and calibration_tracking (per model
and series, the newest target time counted into it). Until the first evaluate run after the
upgrade a model's offset is 0 and its bands are those of the stored per-step corrections.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 06:10:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "calibration_offsets",
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("offset", sa.Float(), nullable=False),
        sa.Column("n_tracked", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model", name=op.f("pk_calibration_offsets")),
    )
    op.create_table(
        "calibration_tracking",
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("tracked_until", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["series_id"],
            ["series.id"],
            name=op.f("fk_calibration_tracking_series_id_series"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("model", "series_id", name=op.f("pk_calibration_tracking")),
    )


def downgrade() -> None:
    op.drop_table("calibration_tracking")
    op.drop_table("calibration_offsets")
