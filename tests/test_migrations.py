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


def test_latest_forecasts_gives_the_rows_of_its_first_definition_and_reads_one_series_alone(
    db_url,
):
    """Migration 0011 rewrote latest_forecasts with a window function: the same rows as the
    correlated subquery of 0003 on a store with several origins per target, re-issued
    (superseded) rows and two models; no subquery run again per row; and a filter on one
    series reaches the forecasts through that series' key (SQLite's plans), not a scan of
    every series' rows."""
    import importlib
    import random
    from datetime import UTC, datetime, timedelta

    import sqlalchemy as sa

    first = importlib.import_module("migrations.versions.0003_rolling_prediction")
    old_query = first.LATEST_FORECASTS.split(" AS", 1)[1]
    store = Store(db_url)
    store.upgrade()
    rng = random.Random(0)
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    with store.begin() as conn:
        ids = store.resolve_series(
            conn, ["a", "b", "c"], create=True, source="t", freq_seconds=3600, window_seconds=86400
        )
        rows = []
        for sid in ids.values():
            for model in ("v1", "seasonal_naive_daily"):
                for origin in range(0, 48, 6):
                    for step in range(1, 13):
                        revisions = 2 if rng.random() < 0.2 else 1
                        for rev in range(revisions):
                            rows.append(
                                {
                                    "series_id": sid,
                                    "model": model,
                                    "origin_ts": t0 + timedelta(hours=origin),
                                    "horizon_step": step,
                                    "revision": rev,
                                    "target_ts": t0 + timedelta(hours=origin + step),
                                    "yhat": rng.random(),
                                    "yhat_lower": 0.0,
                                    "yhat_upper": 2.0,
                                    "interval_level": 0.8,
                                    "superseded": rev < revisions - 1,
                                    "created_at": t0,
                                }
                            )
        conn.execute(sa.insert(schema.forecasts), rows)
    with store.engine.connect() as conn:
        order = " ORDER BY series, model, target_ts, origin_ts"
        new = conn.execute(sa.text("SELECT * FROM latest_forecasts" + order)).all()
        old = conn.execute(sa.text(f"SELECT * FROM ({old_query}) q" + order)).all()
        # One current row per series, model and target (targets 1 to 42 + 12 hours out).
        assert len({(r.series, r.model, r.target_ts) for r in new}) == len(new) == 3 * 2 * 54
        assert new == old
        one = "SELECT * FROM latest_forecasts WHERE series = 'b'"
        if store.engine.dialect.name == "sqlite":

            def plan(query: str) -> str:
                found = conn.execute(sa.text("EXPLAIN QUERY PLAN " + query))
                return " | ".join(str(r[-1]) for r in found)

            # No subquery re-run per row (the first definition's cost), and one series is
            # read through its name's key.
            assert "CORRELATED" not in plan("SELECT * FROM latest_forecasts")
            assert "CORRELATED" in plan(old_query)  # what the check above tells apart
            assert "(name=?)" in plan(one) and "SCAN f " not in plan(one) + " ", plan(one)
        assert len(conn.execute(sa.text(one)).all()) == len(new) // 3
    store.close()
