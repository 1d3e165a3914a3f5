"""Alembic migrations: one history for SQLite and PostgreSQL (render_as_batch=True)."""
