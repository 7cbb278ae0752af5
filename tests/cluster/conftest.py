"""Shared fixtures: a fresh database per test on SQLite and (when CT2I_TEST_POSTGRES_URL is set) PostgreSQL.

Each is a copy of a template migrated once per session (a file copy for SQLite, `CREATE DATABASE ... TEMPLATE`
for PostgreSQL), so a test pays for a copy, not for the migrations.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import time

import pytest
from PIL import Image

from cluster.config import ControlPlaneSettings
from cluster.db import Database
from cluster.service import ControlPlane

POSTGRES_URL = os.environ.get("CT2I_TEST_POSTGRES_URL")
NO_POSTGRES = "CT2I_TEST_POSTGRES_URL is not set; start a server with `eval \"$(.ci/postgres.sh)\"` to run the PostgreSQL variants"


def _admin_engine():
    import sqlalchemy

    return sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "ct2i.db"
    Database.open(f"sqlite:///{path}").dispose()
    return path


@pytest.fixture(scope="session")
def postgres_template():
    if not POSTGRES_URL:
        yield None
        return
    name = f"ct2i_template_{os.getpid()}_{secrets.token_hex(3)}"
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = POSTGRES_URL.rsplit("/", 1)[0] + "/" + name
    Database.open(url).dispose()
    yield name
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def fresh_postgres_database(template: str | None = None) -> tuple[str, str]:
    name = "ct2i_" + secrets.token_hex(6)
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    admin.dispose()
    return POSTGRES_URL.rsplit("/", 1)[0] + "/" + name, name


def drop_postgres_database(name: str) -> None:
    from cluster.db import _OPEN

    url = POSTGRES_URL.rsplit("/", 1)[0] + "/" + name
    stale = _OPEN.pop(url, None)
    if stale is not None:
        stale.dispose()
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path, sqlite_template, postgres_template):
    if request.param == "sqlite":
        path = tmp_path / "ct2i.db"
        shutil.copyfile(sqlite_template, path)
        yield f"sqlite:///{path}"
        return
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    url, name = fresh_postgres_database(postgres_template)
    yield url
    drop_postgres_database(name)


def test_settings(tmp_path, db_url: str, **overrides) -> ControlPlaneSettings:
    """Settings for a test: its own home and store; CPU-sized workers fit this machine."""
    return ControlPlaneSettings(home=tmp_path / "home", database_url=db_url, artifacts_uri=str(tmp_path / "artifacts"),
                                **{"capacity_gpus": 4, "limits": {"max_images_per_job": 6, "max_image_bytes": 200_000},
                                   **overrides})


test_settings.__test__ = False  # a helper, not a test


@pytest.fixture
def settings(db_url, tmp_path) -> ControlPlaneSettings:
    return test_settings(tmp_path, db_url)


@pytest.fixture
def db(settings) -> Database:
    database = Database.open(settings.database_url)
    yield database
    database.dispose()


@pytest.fixture
def plane(settings, db) -> ControlPlane:
    from cluster.store import ArtifactStore

    return ControlPlane(settings=settings, db=db, store=ArtifactStore(settings.artifacts_uri))


def png_bytes(size: int = 64, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def spec_dict(tenant: str, name: str = "pets", images: tuple[str, ...] = ("a.png",), **train) -> dict:
    return {
        "tenant": tenant,
        "name": name,
        "base_model": "tiny",
        "subjects": [{"token": "<s1>", "class_word": "cat", "images": list(images)}],
        "train": {"resolution": 64, "steps": 4, **train},
        "resources": {"num_workers": 1, "gpus_per_worker": 1, "cpus_per_worker": 1},
    }


def submit_simple(plane: ControlPlane, tenant: str, name: str = "pets", **spec_overrides):
    spec = spec_dict(tenant, name)
    spec.update(spec_overrides)
    return plane.submit(tenant, spec, {"a.png": png_bytes()})


def wait_for(predicate, timeout=20.0, every=0.05):
    """Poll `predicate` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def with_timing(settings: ControlPlaneSettings, **scheduler) -> ControlPlaneSettings:
    """`settings` with scheduler timings changed (e.g. with_timing(s, heartbeat_seconds=0.2))."""
    return settings.model_copy(update={"scheduler": settings.scheduler.model_copy(update=scheduler)})


@pytest.fixture
def client(plane):
    """The control-plane REST app over `plane`, in a TestClient (the scheduler is not woken: `notify` does nothing)."""
    from fastapi.testclient import TestClient

    from cluster.api import create_app

    with TestClient(create_app(plane=plane, notify=lambda job_id: None)) as test_client:
        yield test_client
