"""Refuse illegal job state transitions in the database itself (also against raw SQL).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Must match cluster.states.LEGAL.
LEGAL_SQL = """(
    (OLD.state = 'queued' AND NEW.state IN ('admitted', 'cancelled', 'failed')) OR
    (OLD.state = 'admitted' AND NEW.state IN ('running', 'queued', 'cancelled', 'failed')) OR
    (OLD.state = 'running' AND NEW.state IN ('succeeded', 'failed', 'cancelled', 'queued'))
)"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute(f"""
            CREATE TRIGGER jobs_legal_transition BEFORE UPDATE OF state ON jobs
            WHEN NEW.state <> OLD.state AND NOT {LEGAL_SQL}
            BEGIN SELECT RAISE(ABORT, 'illegal job state transition'); END
        """)
    else:
        op.execute(f"""
            CREATE FUNCTION jobs_legal_transition() RETURNS trigger AS $$
            BEGIN
                IF NEW.state <> OLD.state AND NOT {LEGAL_SQL} THEN
                    RAISE EXCEPTION 'illegal job state transition % -> %', OLD.state, NEW.state
                        USING ERRCODE = 'check_violation';
                END IF;
                RETURN NEW;
            END $$ LANGUAGE plpgsql
        """)
        op.execute("""
            CREATE TRIGGER jobs_legal_transition BEFORE UPDATE OF state ON jobs
            FOR EACH ROW EXECUTE FUNCTION jobs_legal_transition()
        """)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS jobs_legal_transition" + ("" if op.get_bind().dialect.name == "sqlite" else " ON jobs"))
    if op.get_bind().dialect.name != "sqlite":
        op.execute("DROP FUNCTION IF EXISTS jobs_legal_transition()")
