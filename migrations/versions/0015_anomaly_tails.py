"""anomaly_state carries what the next evaluate run's thresholds read: tail, day_counts,
window_day.

Before, each evaluate run read every judged point of its 28-day window with evidence of at
least the lowest threshold allowed (anomaly_points) and summed each series' judged points
over the window's days (accuracy_days) to choose the anomaly thresholds again: the cost of
a run grew with the window. Now each series' row in anomaly_state holds those points (its
"tail") and its judged points per day of the window, updated from the run's new points and
the days that left the window.

The columns start NULL: the first run after the upgrade reads them from anomaly_points and
accuracy_days, as before, and writes them; nothing else changes.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07 14:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("anomaly_state") as batch:
        batch.add_column(sa.Column("tail", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("day_counts", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("window_day", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("anomaly_state") as batch:
        batch.drop_column("window_day")
        batch.drop_column("day_counts")
        batch.drop_column("tail")
