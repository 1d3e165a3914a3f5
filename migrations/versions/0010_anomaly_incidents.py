"""Anomalies worth paging on: a score per anomalous point (its excess outside the served band
over the threshold then in force; above 1 is anomalous), incidents (consecutive anomalous
points of a series), fleet-wide events, the threshold each model serves and each series'
newest score; the anomaly_incidents view.

The rows `anomalies` held before were every actual outside the served 80% band, about one
actual in five: none was scored, and most are not anomalies by the new definition, so they
are deleted. The evaluate job judges the actuals it scores from then on.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 12:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Incidents with their series' name and the size of the fleet event they belong to.
ANOMALY_INCIDENTS = """
CREATE VIEW anomaly_incidents AS
SELECT s.name AS series, i.model, i.start_ts, i.end_ts, i.peak_ts, i.peak_score, i.n_points,
       i.event_start, e.n_series AS event_series
FROM incidents i
JOIN series s ON s.id = i.series_id
LEFT JOIN fleet_events e ON e.model = i.model AND e.start_ts = i.event_start
"""


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _series_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["series_id"], ["series.id"], name=op.f(f"fk_{table}_series_id_series"), ondelete="CASCADE"
    )


def upgrade() -> None:
    op.execute("DELETE FROM anomalies")
    with op.batch_alter_table("anomalies") as batch:
        batch.add_column(sa.Column("score", sa.Float(), nullable=True))
        batch.add_column(sa.Column("threshold", sa.Float(), nullable=True))
    op.create_table(
        "incidents",
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        _ts("start_ts"),
        _ts("end_ts"),
        _ts("peak_ts"),
        sa.Column("peak_score", sa.Float(), nullable=False),
        sa.Column("n_points", sa.Integer(), nullable=False),
        _ts("event_start", nullable=True),
        _ts("updated_at"),
        _series_fk("incidents"),
        sa.PrimaryKeyConstraint("series_id", "model", "start_ts", name=op.f("pk_incidents")),
    )
    op.create_index("ix_incidents_start_ts", "incidents", ["start_ts"])
    op.create_table(
        "fleet_events",
        sa.Column("model", sa.String(length=64), nullable=False),
        _ts("start_ts"),
        _ts("end_ts"),
        sa.Column("n_series", sa.Integer(), nullable=False),
        sa.Column("peak_share", sa.Float(), nullable=False),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("model", "start_ts", name=op.f("pk_fleet_events")),
    )
    op.create_table(
        "anomaly_thresholds",
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("measured", sa.Boolean(), nullable=False),
        sa.Column("rate_target", sa.Float(), nullable=False),
        sa.Column("rate_seen", sa.Float(), nullable=True),
        sa.Column("series_weeks", sa.Float(), nullable=False),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("model", name=op.f("pk_anomaly_thresholds")),
    )
    op.create_table(
        "anomaly_state",
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        _ts("ts"),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("incident_open", sa.Boolean(), nullable=False),
        _ts("updated_at"),
        _series_fk("anomaly_state"),
        sa.PrimaryKeyConstraint("model", "series_id", name=op.f("pk_anomaly_state")),
    )
    op.execute(ANOMALY_INCIDENTS)


def downgrade() -> None:
    op.execute("DROP VIEW anomaly_incidents")
    op.drop_table("anomaly_state")
    op.drop_table("anomaly_thresholds")
    op.drop_table("fleet_events")
    op.drop_index("ix_incidents_start_ts", table_name="incidents")
    op.drop_table("incidents")
    with op.batch_alter_table("anomalies") as batch:
        batch.drop_column("threshold")
        batch.drop_column("score")
