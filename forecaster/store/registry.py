"""The model registry: versions, stages and the one champion."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from forecaster import schema as s
from forecaster.errors import UnknownModelVersionError
from forecaster.store.base import (
    _PROMOTE_LOCK_KEY,
    StoreBase,
)


class RegistryStore(StoreBase):
    # -- model registry ------------------------------------------------------------------

    def register_model_version(
        self,
        conn: Connection,
        *,
        kind: str,
        config: Mapping[str, Any],
        uri: str,
        sha256: str,
        trained_from: datetime | None,
        trained_to: datetime | None,
        metrics: Mapping[str, Any],
        stage: str = "candidate",
        parent_id: int | None = None,
    ) -> int:
        """Register a checkpoint already written by `forecaster.checkpoints.save_checkpoint`;
        return the new version's id. stage="champion" registers and promotes in one go."""
        if stage not in s.STAGES:
            raise ValueError(f"stage {stage!r} is not one of {', '.join(s.STAGES)}")
        if parent_id is not None:
            self._require_version(conn, parent_id)
        row = {
            "kind": kind,
            "config": dict(config),
            "uri": uri,
            "sha256": sha256,
            "trained_from": trained_from,
            "trained_to": trained_to,
            "metrics": dict(metrics),
            # A champion enters as a candidate and goes through promote(), which retires the
            # old one first: the one-champion index never sees two.
            "stage": "candidate" if stage == "champion" else stage,
            "parent_id": parent_id,
            "created_at": datetime.now(UTC),
        }
        mv = s.model_versions
        version_id = conn.execute(sa.insert(mv).values(row).returning(mv.c.id)).scalar_one()
        if stage == "champion":
            self.promote(conn, version_id)
        return version_id

    def model_version(self, version_id: int) -> dict[str, Any]:
        mv = s.model_versions
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(mv).where(mv.c.id == version_id)).first()
        if row is None:
            raise UnknownModelVersionError(version_id)
        return dict(row._mapping)

    def list_model_versions(self, kind: str | None = None) -> list[dict[str, Any]]:
        """All versions, newest first (ids only grow), optionally of one kind."""
        mv = s.model_versions
        q = sa.select(mv).order_by(mv.c.id.desc())
        if kind is not None:
            q = q.where(mv.c.kind == kind)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def champion(self, kind: str | None = None) -> dict[str, Any] | None:
        """The service's one champion; with `kind`, only if it is of that kind."""
        mv = s.model_versions
        q = sa.select(mv).where(mv.c.stage == "champion")
        if kind is not None:
            q = q.where(mv.c.kind == kind)
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        return None if row is None else dict(row._mapping)

    def promote(self, conn: Connection, version_id: int) -> None:
        """Make `version_id` the champion and retire the current one, in the caller's
        transaction: a rollback leaves the old champion serving.

        Concurrent promotions are serialised: on PostgreSQL by a transaction-scoped advisory
        lock (a row lock alone is not enough: a second promoter's UPDATE would not see the
        champion the first one just committed and would hit the one-champion index); on
        SQLite by the database's single writer. Under READ COMMITTED, the default, the last
        promotion to commit wins and both succeed."""
        mv = s.model_versions
        if self.dialect == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PROMOTE_LOCK_KEY)))
        # Retire first: the one-champion index is checked row by row, not at commit.
        conn.execute(
            sa.update(mv)
            .where(mv.c.stage == "champion", mv.c.id != version_id)
            .values(stage="retired")
        )
        done = conn.execute(sa.update(mv).where(mv.c.id == version_id).values(stage="champion"))
        if done.rowcount != 1:
            raise UnknownModelVersionError(version_id)  # the caller's rollback undoes the retire

    def set_stage(self, conn: Connection, version_id: int, stage: str) -> None:
        """Retire a version or make it a candidate again; champions come only from promote()."""
        if stage == "champion":
            raise ValueError("use promote() to make a version the champion")
        if stage not in s.STAGES:
            raise ValueError(f"stage {stage!r} is not one of {', '.join(s.STAGES)}")
        mv = s.model_versions
        done = conn.execute(sa.update(mv).where(mv.c.id == version_id).values(stage=stage))
        if done.rowcount != 1:
            raise UnknownModelVersionError(version_id)

    def _require_version(self, conn: Connection, version_id: int) -> None:
        mv = s.model_versions
        if conn.execute(sa.select(mv.c.id).where(mv.c.id == version_id)).first() is None:
            raise UnknownModelVersionError(version_id)
