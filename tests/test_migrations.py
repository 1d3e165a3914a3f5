"""One Alembic history for both dialects: empty -> head, head == models, down and up again."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from forecaster import schema
from forecaster.store import Store


def _diff(store: Store) -> list:
    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, schema.metadata)


def test_upgrade_empty_database_to_head_matches_models(db_url):
    store = Store(db_url)
    assert store.current_revision() is None
    store.upgrade()
    assert store.current_revision() == store.head_revision()
    assert _diff(store) == []
    store.close()


def test_downgrade_to_base_and_up_again(db_url):
    store = Store(db_url)
    store.upgrade()
    store.downgrade("base")
    assert store.current_revision() is None
    with store.engine.connect() as conn:
        tables = set(conn.dialect.get_table_names(conn))
    assert tables <= {"alembic_version"}
    store.upgrade()
    assert _diff(store) == []
    store.close()


@pytest.mark.parametrize("table", sorted(schema.metadata.tables))
def test_every_table_has_a_named_primary_key(table):
    assert schema.metadata.tables[table].primary_key.name == f"pk_{table}"


def test_db_commands_step_down_and_up_and_refuse_an_unknown_revision(db_url):
    from typer.testing import CliRunner

    from pipelines.cli import app

    runner = CliRunner()

    def db(*args: str):
        return runner.invoke(app, ["--database-url", db_url, "db", *args])

    assert db("upgrade").exit_code == 0
    store = Store(db_url)
    revisions = store.revisions()
    assert revisions[-1] == store.head_revision() and len(revisions) == len(set(revisions))
    down = db("downgrade", revisions[-2])
    assert down.exit_code == 0, down.output
    assert store.current_revision() == revisions[-2]
    for args in (("downgrade", "nonsense"), ("upgrade", "9999")):
        refused = db(*args)
        assert refused.exit_code == 1
        assert "Can't locate revision" in refused.output and "Traceback" not in refused.output
        assert store.current_revision() == revisions[-2]  # nothing half done
    assert db("upgrade").exit_code == 0
    assert store.current_revision() == store.head_revision()
    assert _diff(store) == []
    store.close()
