"""The control plane's database: SQLAlchemy 2 models, the engine, and sessions.

Every timestamp is unix seconds (a float): portable between SQLite and PostgreSQL, and what the
scheduler's arithmetic wants. The schema itself is owned by the Alembic migrations in
`cluster/migrations/`; `Database.open()` runs `upgrade head` before handing out sessions.
"""

from __future__ import annotations

import contextlib
import threading
from enum import StrEnum
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker



class JobState(StrEnum):
    """A tuning job's state; `cluster.states` holds the legal moves between them."""

    queued = "queued"
    admitted = "admitted"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


JOB_STATES = tuple(state.value for state in JobState)
KEY_SCOPES = ("tenant", "admin")
ADAPTER_STATUSES = ("ready", "deleted")

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
AutoId = BigInteger().with_variant(Integer, "sqlite")


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    weight: Mapped[float] = mapped_column(Float, default=1.0)
    max_concurrent_jobs: Mapped[int] = mapped_column(Integer, default=2)
    max_concurrent_gpus: Mapped[float] = mapped_column(Float, default=8.0)
    gpu_hours_per_30d: Mapped[float] = mapped_column(Float, default=100.0)
    max_adapters: Mapped[int] = mapped_column(Integer, default=50)
    max_stored_bytes: Mapped[int] = mapped_column(BigInteger, default=50 * 1024**3)
    generate_rpm: Mapped[int] = mapped_column(Integer, default=60)
    # Exponentially decayed GPU-seconds of finished attempts, as of `decayed_usage_at` (fair share).
    decayed_usage_gpu_s: Mapped[float] = mapped_column(Float, default=0.0)
    decayed_usage_at: Mapped[float] = mapped_column(Float, default=0.0)
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    webhook_secret: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # Webhooks are an outbox over job_events: the last delivered event id, and the retry state of the next.
    webhook_cursor: Mapped[int] = mapped_column(BigInteger, default=0)
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    webhook_next_at: Mapped[float] = mapped_column(Float, default=0.0)
    webhook_last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        CheckConstraint("weight > 0", name="ck_tenants_weight_positive"),
    )


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(16))
    tenant: Mapped[str | None] = mapped_column(ForeignKey("tenants.name", ondelete="CASCADE"), nullable=True)
    label: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (
        CheckConstraint("scope IN ('tenant', 'admin')", name="ck_api_keys_scope"),
        CheckConstraint("scope = 'admin' OR tenant IS NOT NULL", name="ck_api_keys_tenant_scope_has_tenant"),
    )


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(60))
    spec_json: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    # Launches so far; also the fencing token a runner must present to write to the row.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=5)
    demand_gpus: Mapped[float] = mapped_column(Float)
    input_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    queue_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    admitted_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    progress_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    progress_eta_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    progress_terms_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    checkpoint_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    adapter_id: Mapped[str | None] = mapped_column(String(32), nullable=True)

    __table_args__ = (
        CheckConstraint(
            f"state IN ({', '.join(repr(s) for s in JOB_STATES)})", name="ck_jobs_state"
        ),
        CheckConstraint("attempts >= 0", name="ck_jobs_attempts_nonnegative"),
        Index("ix_jobs_state_created", "state", "created_at"),
        Index("ix_jobs_tenant_created", "tenant", "created_at"),
    )


class Adapter(Base):
    __tablename__ = "adapters"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(60))
    version: Mapped[int] = mapped_column(Integer)
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    base_model: Mapped[str] = mapped_column(Text, default="")
    base_fingerprint: Mapped[str] = mapped_column(String(128), default="")
    param_mode: Mapped[str] = mapped_column(String(16), default="")
    metrics_json: Mapped[str] = mapped_column(Text, default="{}")
    status: Mapped[str] = mapped_column(String(16), default="ready")
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    deleted_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (
        UniqueConstraint("tenant", "name", "version", name="uq_adapters_tenant_name_version"),
        CheckConstraint("status IN ('ready', 'deleted')", name="ck_adapters_status"),
        Index("ix_adapters_tenant_status", "tenant", "status"),
    )


class UsageRecord(Base):
    """GPU-seconds of one attempt of one job; an attempt is charged once (unique job_id, attempt)."""

    __tablename__ = "usage"

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer)
    gpu_seconds: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        UniqueConstraint("job_id", "attempt", name="uq_usage_job_attempt"),
        CheckConstraint("gpu_seconds >= 0", name="ck_usage_nonnegative"),
        Index("ix_usage_tenant_ended", "tenant", "ended_at"),
    )


class JobEvent(Base):
    """Append-only log of a job: state changes, progress, messages. Feeds SSE, `jobs logs` and webhooks."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32))
    tenant: Mapped[str] = mapped_column(String(40))
    at: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(16))  # state | progress | log
    state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    data_json: Mapped[str] = mapped_column(Text, default="{}")

    __table_args__ = (
        Index("ix_job_events_job", "job_id", "id"),
        Index("ix_job_events_tenant_kind", "tenant", "kind", "id"),
    )


class WebhookDelivery(Base):
    """One webhook attempt (migration 0003): delivered, failed (a retry follows) or dead_lettered (the last)."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name", ondelete="CASCADE"))
    event_id: Mapped[int] = mapped_column(BigInteger)
    msg_id: Mapped[str] = mapped_column(String(40))
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[float] = mapped_column(Float)
    duration_s: Mapped[float] = mapped_column(Float)
    outcome: Mapped[str] = mapped_column(String(16))
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    address: Mapped[str | None] = mapped_column(String(64), nullable=True)

    __table_args__ = (
        CheckConstraint("outcome IN ('delivered', 'failed', 'dead_lettered')", name="ck_webhook_deliveries_outcome"),
        Index("ix_webhook_deliveries_tenant", "tenant", "id"),
    )


def _sqlite_file(url: str) -> Path | None:
    prefix = "sqlite:///"
    if url.startswith(prefix) and url != "sqlite:///:memory:" and not url.startswith("sqlite:///file:"):
        return Path(url[len(prefix):])
    return None


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = _sqlite_file(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        # Pooled: opening a connection (file open and the pragmas below) costs more than the query it serves.
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False}, pool_size=5, max_overflow=20)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            # The driver's own transaction handling is turned off so that BEGIN is ours (see _sqlite_begin).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            # A write transaction takes the write lock up front (BEGIN IMMEDIATE). A deferred one that reads
            # first and writes later fails at once with SQLITE_BUSY when another writer got in between.
            mode = conn.get_execution_options().get("ct2i_begin", "DEFERRED")
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine
    # pool_pre_ping: a pooled connection the server dropped (a restart, a failover) is replaced on checkout
    # instead of failing the request that drew it. connect_timeout: while the server is unreachable, a request
    # fails within seconds (503 with Retry-After at the API, see `database_unavailable`) instead of hanging.
    connect_args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=connect_args)


def database_unavailable(err: BaseException) -> bool:
    """Whether `err` means the database could not be reached or used just now (a retry later may succeed): the
    server down or restarting, a dropped connection, SQLite's lock wait timed out. Not a constraint violation,
    not bad SQL."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    if isinstance(err, (OperationalError, InterfaceError)):
        return True
    return isinstance(err, DBAPIError) and bool(err.connection_invalidated)


class Database:
    """An engine plus two session factories: `read()` and `write()` (a transaction, committed on exit)."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self.is_sqlite = url.startswith("sqlite")
        writer = self.engine.execution_options(ct2i_begin="IMMEDIATE") if self.is_sqlite else self.engine
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = sessionmaker(writer, expire_on_commit=False)

    @classmethod
    def open(cls, url: str, *, migrate: bool = True) -> "Database":
        if migrate:
            from cluster.migrations import upgrade_head

            upgrade_head(url)
        return cls(url)

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        with self._reader() as session:
            yield session

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        with self._writer() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


_OPEN: dict[str, Database] = {}
_OPEN_LOCK = threading.Lock()


def database_for(url: str) -> Database:
    """One migrated `Database` per URL per process (the scheduler, runners and the API share it)."""
    with _OPEN_LOCK:
        if url not in _OPEN:
            _OPEN[url] = Database.open(url)
        return _OPEN[url]
