"""series_scalers: the scaler a version fitted, on the series' own points, for a series it
was not trained on and serves all the same (a series that appeared after training). No
existing row changes; such series were skipped by predict until the next retrain before.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 09:20:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "series_scalers",
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("center", sa.Float(), nullable=False),
        sa.Column("scale", sa.Float(), nullable=False),
        sa.Column("n_points", sa.Integer(), nullable=False),
        sa.Column("fitted_to", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_series_scalers_model_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["series_id"],
            ["series.id"],
            name=op.f("fk_series_scalers_series_id_series"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("model_version_id", "series_id", name=op.f("pk_series_scalers")),
    )


def downgrade() -> None:
    op.drop_table("series_scalers")
