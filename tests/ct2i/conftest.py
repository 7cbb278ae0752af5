"""The control-plane fixtures (a fresh database per test, SQLite and PostgreSQL) for the entry points' tests."""

from tests.cluster.conftest import db, db_url, plane, postgres_template, settings, sqlite_template  # noqa: F401
