"""Band calibration in band widths: calibration.correction was an absolute amount added to
both sides of the raw band, pooled over series of every size; it is now a multiple of each
forecast's raw band width (scale-free), so the rows written before cannot be read as such.
They are deleted: until the next evaluate run the bands use the correction each model
measured on its training holdout (or none, for a checkpoint from before it), and evaluate
rebuilds the rows from the stored raw bands. No column changes.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 23:55:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("DELETE FROM calibration")


def downgrade() -> None:
    # The old rows were in the series' units: none can be rebuilt from band widths.
    op.execute("DELETE FROM calibration")
