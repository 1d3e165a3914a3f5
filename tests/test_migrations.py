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
                    rows.append(
                        {
                            "series_id": sid,
                            "model": model,
                            "model_version_id": None,
                            "origin_ts": t0 + timedelta(hours=origin),
                            "horizon_step": step,
                            "target_ts": t0 + timedelta(hours=origin + step),
                            "yhat": rng.random(),
                            "yhat_lower": 0.0,
                            "yhat_upper": 2.0,
                            "interval_level": 0.8,
                            "raw_lower": None,
                            "raw_upper": None,
                        }
                    )
    # A fifth of the (series, origin) pairs re-issued once: revision 0 superseded.
    reissued = sorted({(r["series_id"], r["origin_ts"]) for r in rows if rng.random() < 0.2 / 24})
    with store.begin() as conn:
        store.save_prediction(
            conn, version_id=0, states=[], snapshots=[], forecasts=rows, keep_snapshots=1
        )
        again = [{**r, "yhat": rng.random()} for r in rows]
        store.save_prediction(
            conn,
            version_id=0,
            states=[],
            snapshots=[],
            forecasts=again,
            keep_snapshots=1,
            reissued=reissued,
        )
    assert reissued
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


def test_the_forecast_ledger_migration_keeps_every_stored_forecast_both_ways(db_url):
    """Migration 0013 packs the long forecasts table into one ledger row per series, model,
    origin and revision: the view `forecasts` then gives the same rows, values exact, with
    the steps a baseline left out still absent, revisions and superseded marks kept; the
    downgrade unnests them back into the table."""
    import random
    from datetime import UTC, datetime, timedelta

    import sqlalchemy as sa

    store = Store(db_url)
    store.upgrade("0012")
    rng = random.Random(1)
    t0 = datetime(2024, 3, 31, 0, 0, 0, tzinfo=UTC)
    old = sa.table(
        "forecasts",
        *(
            sa.column(c, t)
            for c, t in (
                ("series_id", sa.Integer()),
                ("model", sa.String()),
                ("origin_ts", schema.UTCDateTime()),
                ("horizon_step", sa.Integer()),
                ("revision", sa.Integer()),
                ("model_version_id", sa.Integer()),
                ("target_ts", schema.UTCDateTime()),
                ("yhat", sa.Float()),
                ("yhat_lower", sa.Float()),
                ("yhat_upper", sa.Float()),
                ("interval_level", sa.Float()),
                ("raw_lower", sa.Float()),
                ("raw_upper", sa.Float()),
                ("superseded", sa.Boolean()),
                ("created_at", schema.UTCDateTime()),
            )
        ),
    )
    with store.begin() as conn:
        ids = store.resolve_series(
            conn, ["a", "b"], create=True, source="t", freq_seconds=1800, window_seconds=86400
        )
        rows = []
        for sid in ids.values():
            for model in ("v1", "seasonal_naive_weekly"):
                for origin in range(0, 96, 24):
                    revisions = 2 if rng.random() < 0.3 else 1
                    for rev in range(revisions):
                        for step in range(1, 7):
                            if model != "v1" and origin == 0 and step > 4:
                                continue  # no value a season back: the baseline skips it
                            band = model == "v1"
                            y = rng.gauss(0, 1e3)
                            rows.append(
                                {
                                    "series_id": sid,
                                    "model": model,
                                    "origin_ts": t0 + timedelta(minutes=30 * origin),
                                    "horizon_step": step,
                                    "revision": rev,
                                    "model_version_id": None,
                                    "target_ts": t0 + timedelta(minutes=30 * (origin + step)),
                                    "yhat": y,
                                    "yhat_lower": y - rng.random() if band else None,
                                    "yhat_upper": y + rng.random() if band else None,
                                    "interval_level": 0.8 if band else None,
                                    "raw_lower": y - rng.random() if band else None,
                                    "raw_upper": y + rng.random() if band else None,
                                    "superseded": rev < revisions - 1,
                                    "created_at": t0,
                                }
                            )
        conn.execute(sa.insert(old), rows)
    columns = [c.name for c in old.c]

    def stored() -> list[tuple]:  # through the view after the upgrade, the table before
        with store.engine.connect() as conn:
            got = conn.execute(sa.select(old).order_by(*(old.c[k] for k in columns[:5])))
            return [tuple(r) for r in got]

    want = sorted(tuple(r[k] for k in columns) for r in rows)
    store.upgrade()
    assert stored() == want
    with store.engine.connect() as conn:
        n = conn.execute(sa.text("SELECT count(*) FROM forecast_origins")).scalar()
    assert n == len({(r["series_id"], r["model"], r["origin_ts"], r["revision"]) for r in rows})
    store.downgrade("0012")
    assert stored() == want
    store.upgrade()
    assert stored() == want
    store.close()


def test_forecast_accuracy_joins_each_forecast_point_to_its_actual_by_key(sqlite_url):
    """With `forecasts` a view over the ledger (migration 0013), SQLite left free scanned
    each series' observations for every ledger row (a year's demo store: minutes for
    `forecaster accuracy`); the view keeps the order points -> actual by its key."""
    import sqlalchemy as sa

    store = Store(sqlite_url)
    store.upgrade()
    with store.engine.connect() as conn:
        plan = " | ".join(
            str(r[-1])
            for r in conn.execute(
                sa.text(
                    "EXPLAIN QUERY PLAN SELECT model, count(*) FROM forecast_accuracy "
                    "WHERE target_ts >= '2013-12-01' GROUP BY model"
                )
            )
        )
    assert "o USING INDEX sqlite_autoindex_observations_1 (series_id=? AND ts=?)" in plan, plan
    store.close()


def test_accuracy_days_is_rebuilt_in_key_order_on_sqlite_and_keeps_its_rows(db_url):
    """Migration 0017 stores accuracy_days WITHOUT ROWID on SQLite (the evaluate job's window
    sums walk its key): the rows, floats to the bit, survive the rebuild both ways, and its
    index on day is there after each; PostgreSQL's table is left as it was."""
    from datetime import UTC, datetime, timedelta

    import sqlalchemy as sa

    store = Store(db_url)
    store.upgrade("0016")
    t0 = datetime(2024, 3, 1, tzinfo=UTC)
    with store.begin() as conn:
        ids = store.resolve_series(
            conn, ["a", "b"], create=True, source="t", freq_seconds=3600, window_seconds=86400
        )
        rows = [
            {
                "series_id": sid,
                "model": model,
                "day": t0 + timedelta(days=d),
                "n": 24 + d,
                "abs_err": 0.1 + d / 3,
                "naive_abs_err": 1e-300 * (d + 1),
                "inside": d,
                "n_points": 24,
            }
            for sid in ids.values()
            for model in ("v1", "seasonal_naive_daily")
            for d in range(3)
        ]
        conn.execute(sa.insert(schema.accuracy_days), rows)
    table = schema.accuracy_days

    def stored() -> list[tuple]:
        with store.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.select(table).order_by(*table.primary_key))]

    def layout() -> tuple[bool, set[str]]:  # (WITHOUT ROWID, its indexes)
        with store.engine.connect() as conn:
            indexes = {i["name"] for i in sa.inspect(conn).get_indexes("accuracy_days")}
            if store.dialect != "sqlite":
                return False, indexes
            sql = conn.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'accuracy_days'"
            ).scalar()
            return "WITHOUT ROWID" in sql.upper(), indexes

    want = stored()
    assert len(want) == 12 and layout() == (False, {"ix_accuracy_days_day"})
    store.upgrade()
    assert stored() == want
    assert layout() == (store.dialect == "sqlite", {"ix_accuracy_days_day"})
    assert _diff(store) == []
    store.downgrade("0016")
    assert stored() == want and layout() == (False, {"ix_accuracy_days_day"})
    store.upgrade()
    assert stored() == want and layout() == (store.dialect == "sqlite", {"ix_accuracy_days_day"})
    store.close()
