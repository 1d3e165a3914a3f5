"""Alembic environment. Used by `forecaster db upgrade` (which hands over a connection) and by
the plain `alembic` CLI with the alembic.ini at the repository root."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from forecaster.schema import UTCDateTime, metadata

config = context.config


def _render_item(type_: str, obj, autogen_context):
    # Revisions store the database type, not our Python wrapper around it.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies the table
        compare_type=True,
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from forecaster.store import normalise_url

    section = config.get_section(config.config_ini_section, {})
    section["sqlalchemy.url"] = normalise_url(section["sqlalchemy.url"])
    engine = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.begin() as conn:
        _run(conn)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
