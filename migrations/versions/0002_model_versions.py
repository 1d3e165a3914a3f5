"""Model registry: the model_versions table (checkpoint uri + sha256, training span, metrics,
stage candidate / champion / retired, fine-tuned-from parent). A partial unique index keeps
at most one champion on both dialects. Reviewed by hand from autogenerate.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 01:28:52.716594
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ONE_CHAMPION = sa.text("stage = 'champion'")


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("trained_from", sa.DateTime(timezone=True), nullable=True),
        sa.Column("trained_to", sa.DateTime(timezone=True), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "stage IN ('candidate', 'champion', 'retired')",
            name=op.f("ck_model_versions_stage"),
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["model_versions.id"],
            name=op.f("fk_model_versions_parent_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
    )
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_versions_stage"), ["stage"], unique=False)
        batch_op.create_index(
            "uq_model_versions_one_champion",
            ["stage"],
            unique=True,
            sqlite_where=_ONE_CHAMPION,
            postgresql_where=_ONE_CHAMPION,
        )


def downgrade() -> None:
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_index("uq_model_versions_one_champion")
        batch_op.drop_index(batch_op.f("ix_model_versions_stage"))

    op.drop_table("model_versions")
