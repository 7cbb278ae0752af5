"""Shared fixtures: a fresh database per test on SQLite and (when CT2I_TEST_POSTGRES_URL is set) PostgreSQL."""

from __future__ import annotations

import io
import os
import secrets
import time

import pytest
from PIL import Image

from cluster.config import ControlPlaneSettings
from cluster.db import Database
from cluster.service import ControlPlane

POSTGRES_URL = os.environ.get("CT2I_TEST_POSTGRES_URL")
NO_POSTGRES = "CT2I_TEST_POSTGRES_URL is not set; start a server with `eval \"$(.ci/postgres.sh)\"` to run the PostgreSQL variants"


def _fresh_postgres_database() -> tuple[str, str]:
    import sqlalchemy

    name = "ct2i_" + secrets.token_hex(6)
    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return POSTGRES_URL.rsplit("/", 1)[0] + "/" + name, name


def _drop_postgres_database(name: str) -> None:
    import sqlalchemy

    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ct2i.db'}"
        return
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    url, name = _fresh_postgres_database()
    yield url
    from cluster.db import _OPEN

    stale = _OPEN.pop(url, None)
    if stale is not None:
        stale.dispose()
    _drop_postgres_database(name)


@pytest.fixture
def settings(db_url, tmp_path) -> ControlPlaneSettings:
    return ControlPlaneSettings(home=tmp_path / "home", database_url=db_url, artifacts_uri=str(tmp_path / "artifacts"),
                                capacity_gpus=4, max_images_per_job=6, max_image_bytes=200_000)


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
        "resources": {"num_workers": 1, "gpus_per_worker": 1},
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
