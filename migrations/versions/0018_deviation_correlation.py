"""anomaly_state carries each series' lag-one correlation of its deviations: lag_sum,
square_sum.

A run of several deviations on the same side is evidence of trouble only as far as it is
unlikely for that series. A model whose misses last (a level it has wrong for hours) makes
runs that are ordinary for it, and scoring them as if its deviations were independent made
them the clean data's largest evidence, which lifted the anomaly threshold above what a
single far-out point reaches. The evaluate job now scales each series' runs by the
correlation of its deviations (forecaster.anomaly.run_scale), from sums it carries here.

The columns start NULL: a series' first run after the upgrade leans on the fleet's
correlation, measured from the run's own points, and writes them; its threshold is read
from evidence measured before the change until those points leave the window.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-08 01:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("anomaly_state") as batch:
        batch.add_column(sa.Column("lag_sum", sa.Float(), nullable=True))
        batch.add_column(sa.Column("square_sum", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("anomaly_state") as batch:
        batch.drop_column("square_sum")
        batch.drop_column("lag_sum")
