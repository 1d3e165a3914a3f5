"""series_states.weights: the blend's weights served from a state (forecaster.serving).

A version's blend weights, measured on its holdout, are where each series starts; since
the state carries the members' tracked errors, the weights served move with them. Each
predict writes the weights of the forecast it made from the state beside it, so analysts,
/metrics and the overview page read what serves each series now. NULL for states saved
before this revision and for versions whose blend does not follow tracked errors.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 22:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("series_states") as batch:
        batch.add_column(sa.Column("weights", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("series_states") as batch:
        batch.drop_column("weights")
