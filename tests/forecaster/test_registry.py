"""The model registry on a real SQLite file and a real PostgreSQL database: same tests."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from forecaster import schema
from forecaster.errors import UnknownModelVersionError
from forecaster.store import Store

T0 = datetime(2013, 1, 1, tzinfo=UTC)


@pytest.fixture
def store(db_url):
    st = Store(db_url)
    st.upgrade()
    yield st
    st.close()


def _register(store: Store, kind: str = "lstm", **kw) -> int:
    args = {
        "kind": kind,
        "config": {"hidden": 64, "quantiles": [0.1, 0.5, 0.9]},
        "uri": "file:///ckpt/ab/ab.safetensors",
        "sha256": "ab" * 32,
        "trained_from": T0,
        "trained_to": T0 + timedelta(days=90),
        "metrics": {"mase": 0.71},
    } | kw
    with store.begin() as conn:
        return store.register_model_version(conn, **args)


def _stages(store: Store) -> dict[int, str]:
    return {v["id"]: v["stage"] for v in store.list_model_versions()}


def test_register_and_read_back(store):
    local = timezone(timedelta(hours=-5))
    vid = _register(store, trained_to=datetime(2013, 3, 31, 19, tzinfo=local))
    v = store.model_version(vid)
    assert v["kind"] == "lstm" and v["stage"] == "candidate" and v["parent_id"] is None
    assert v["config"] == {"hidden": 64, "quantiles": [0.1, 0.5, 0.9]}
    assert v["metrics"] == {"mase": 0.71}
    assert (v["uri"], v["sha256"]) == ("file:///ckpt/ab/ab.safetensors", "ab" * 32)
    assert v["trained_from"] == T0 and v["trained_from"].tzinfo == UTC
    assert v["trained_to"] == datetime(2013, 4, 1, 0, tzinfo=UTC)
    assert v["created_at"].tzinfo == UTC
    child = _register(store, parent_id=vid, trained_from=None, trained_to=None)
    assert store.model_version(child)["parent_id"] == vid
    assert store.model_version(child)["trained_from"] is None


def test_the_same_weights_may_be_registered_twice(store):
    assert _register(store) != _register(store)


def test_list_is_newest_first_and_filters_by_kind(store):
    a, b, c = _register(store, "lstm"), _register(store, "gru"), _register(store, "lstm")
    assert [v["id"] for v in store.list_model_versions()] == [c, b, a]
    assert [v["id"] for v in store.list_model_versions("lstm")] == [c, a]
    assert store.list_model_versions("seq2seq") == []


def test_unknown_version_says_where_to_look(store):
    with pytest.raises(UnknownModelVersionError, match="forecaster models list") as err:
        store.model_version(999)
    assert isinstance(err.value, LookupError) and "999" in str(err.value)
    with pytest.raises(UnknownModelVersionError, match="999"):
        _register(store, parent_id=999)
    with pytest.raises(UnknownModelVersionError), store.begin() as conn:
        store.set_stage(conn, 999, "retired")
    assert store.list_model_versions() == []


def test_promote_switches_the_single_champion(store):
    a, b = _register(store, "lstm"), _register(store, "gru")
    assert store.champion() is None
    with store.begin() as conn:
        store.promote(conn, a)
    assert store.champion()["id"] == a
    with store.begin() as conn:
        store.promote(conn, b)
    assert store.champion()["id"] == b
    assert store.champion("gru")["id"] == b and store.champion("lstm") is None
    assert _stages(store) == {a: "retired", b: "champion"}
    with store.begin() as conn:
        store.promote(conn, b)  # promoting the champion changes nothing
        store.promote(conn, a)  # a retired version can be brought back
    assert _stages(store) == {a: "champion", b: "retired"}


def test_register_as_champion_promotes(store):
    a = _register(store)
    with store.begin() as conn:
        store.promote(conn, a)
    b = _register(store, stage="champion", parent_id=a)
    assert _stages(store) == {a: "retired", b: "champion"}


def test_a_failed_transaction_keeps_the_old_champion(store):
    a, b = _register(store), _register(store)
    with store.begin() as conn:
        store.promote(conn, a)
    with pytest.raises(RuntimeError, match="states failed to rebuild"), store.begin() as conn:
        store.promote(conn, b)
        raise RuntimeError("states failed to rebuild")
    assert store.champion()["id"] == a
    with pytest.raises(UnknownModelVersionError), store.begin() as conn:
        store.promote(conn, 999)  # retires a first, then finds no 999: all rolled back
    assert _stages(store) == {a: "champion", b: "candidate"}


def test_set_stage(store):
    a = _register(store)
    with store.begin() as conn:
        store.promote(conn, a)
        store.set_stage(conn, a, "retired")
    assert store.champion() is None
    with store.begin() as conn:
        store.set_stage(conn, a, "candidate")
    assert _stages(store) == {a: "candidate"}
    with pytest.raises(ValueError, match="promote"), store.begin() as conn:
        store.set_stage(conn, a, "champion")
    with pytest.raises(ValueError, match="not one of"), store.begin() as conn:
        store.set_stage(conn, a, "archived")
    with pytest.raises(ValueError, match="not one of"):
        _register(store, stage="archived")


def test_the_database_itself_allows_one_champion_and_known_stages(store):
    a, b = _register(store), _register(store)
    mv = schema.model_versions
    with store.begin() as conn:
        store.promote(conn, a)
    with pytest.raises(sa.exc.IntegrityError), store.engine.begin() as conn:
        conn.execute(sa.update(mv).where(mv.c.id == b).values(stage="champion"))
    with pytest.raises(sa.exc.IntegrityError), store.engine.begin() as conn:
        conn.execute(sa.update(mv).where(mv.c.id == b).values(stage="archived"))
    assert _stages(store) == {a: "champion", b: "candidate"}


def test_concurrent_promotions_serialise_and_both_succeed(store):
    """The second promoter waits for the first to commit, then retires its champion."""
    a, b, c = _register(store), _register(store), _register(store)
    with store.begin() as conn:
        store.promote(conn, a)
    errors: list[BaseException] = []

    def promote_c() -> None:
        try:
            with store.begin() as conn:
                store.promote(conn, c)
        except BaseException as exc:  # reported to the main thread below
            errors.append(exc)

    second = threading.Thread(target=promote_c)
    with store.begin() as conn:
        store.promote(conn, b)
        second.start()
        time.sleep(0.5)
        assert second.is_alive(), "the second promotion did not wait for the first"
    second.join(timeout=30)
    assert not second.is_alive() and errors == []
    assert _stages(store) == {a: "retired", b: "retired", c: "champion"}
