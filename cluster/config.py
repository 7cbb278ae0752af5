"""Control-plane settings: one typed object, read from the environment by `ControlPlaneSettings.from_env()`.

| variable | meaning | default |
| --- | --- | --- |
| `CT2I_HOME` | data dir (SQLite file, local artifacts, work dirs) | `~/.ct2i` |
| `CT2I_DATABASE_URL` | SQLAlchemy URL, e.g. `postgresql+psycopg://user@host/db` | `sqlite:///$CT2I_HOME/ct2i.db` |
| `CT2I_ARTIFACTS` | artifact store root: a folder, `s3://bucket/prefix` or `gs://bucket/prefix` | `$CT2I_HOME/artifacts` |
| `CT2I_CAPACITY_GPUS` | GPUs the scheduler may hand out (on KubeRay: the worker group's maximum) | the cluster's GPUs, else its CPUs |
| `CT2I_WEBHOOK_ALLOW_HOSTS` | comma-separated hosts a webhook may target even if private/loopback | none |
| `CT2I_KEY_PEPPER` | secret mixed into API-key hashes (HMAC-SHA256); empty = plain SHA-256 | empty |
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class ControlPlaneSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    home: Path
    database_url: str
    artifacts_uri: str
    capacity_gpus: Annotated[float | None, Field(gt=0, description="None = ask Ray: GPUs, else CPUs")] = None

    # Scheduler timing.
    tick_seconds: Annotated[float, Field(gt=0)] = 1.0
    lease_seconds: Annotated[float, Field(gt=0, description="a running job whose heartbeat is older than this has vanished")] = 30.0
    heartbeat_seconds: Annotated[float, Field(gt=0)] = 2.0
    progress_write_seconds: Annotated[float, Field(ge=0, description="at most one progress write per job per this many seconds")] = 1.0
    max_attempts: Annotated[int, Field(ge=1, description="launches before a job that keeps losing its worker fails")] = 5

    # Fair share.
    fair_share_half_life_s: Annotated[float, Field(gt=0, description="half-life of 'recent' GPU-seconds")] = 24 * 3600.0
    min_charge_s: Annotated[float, Field(ge=0, description="a just-admitted job counts as at least this many seconds of its GPUs")] = 60.0
    starvation_after_s: Annotated[float, Field(ge=0, description="a job queued longer than this gets capacity reserved for it")] = 600.0

    # Request limits (API and CLI submit).
    max_request_bytes: Annotated[int, Field(gt=0)] = 64 * 1024 * 1024
    max_images_per_job: Annotated[int, Field(gt=0)] = 64
    max_image_bytes: Annotated[int, Field(gt=0)] = 10 * 1024 * 1024

    # Webhooks.
    webhook_allow_hosts: tuple[str, ...] = ()
    webhook_max_attempts: Annotated[int, Field(ge=1)] = 8
    webhook_backoff_s: Annotated[float, Field(gt=0)] = 2.0
    webhook_timeout_s: Annotated[float, Field(gt=0)] = 5.0

    key_pepper: str = ""
    ray_namespace: str = "ct2i"
    scheduler_name: str = "ct2i-scheduler"

    @property
    def work_dir(self) -> Path:
        """Local scratch for runs whose artifacts live in a remote store."""
        return self.home / "work"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> "ControlPlaneSettings":
        env = os.environ if environ is None else environ
        home = Path(env.get("CT2I_HOME") or Path.home() / ".ct2i").expanduser()
        values: dict = {
            "home": home,
            "database_url": env.get("CT2I_DATABASE_URL") or f"sqlite:///{home / 'ct2i.db'}",
            "artifacts_uri": env.get("CT2I_ARTIFACTS") or str(home / "artifacts"),
        }
        if env.get("CT2I_CAPACITY_GPUS"):
            values["capacity_gpus"] = float(env["CT2I_CAPACITY_GPUS"])
        if env.get("CT2I_WEBHOOK_ALLOW_HOSTS"):
            values["webhook_allow_hosts"] = tuple(h.strip().lower() for h in env["CT2I_WEBHOOK_ALLOW_HOSTS"].split(",") if h.strip())
        if env.get("CT2I_KEY_PEPPER"):
            values["key_pepper"] = env["CT2I_KEY_PEPPER"]
        values.update(overrides)
        return cls(**values)
