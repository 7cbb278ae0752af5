"""The platform's settings: one typed object read from the environment by pydantic-settings (prefix `CT2I_`).

Top-level names are the ones operators already set (`CT2I_HOME`, `CT2I_DATABASE_URL`, `CT2I_ARTIFACTS`,
`CT2I_CAPACITY_GPUS`, `CT2I_BASE_MODEL`, `CT2I_KEY_PEPPER`, `CT2I_WEBHOOK_ALLOW_HOSTS`); sections are nested
with `__`, e.g. `CT2I_SCHEDULER__RUNNER=ray_task`, `CT2I_LIMITS__MAX_IMAGES_PER_JOB=32`,
`CT2I_SERVE__CACHE_BYTES=4294967296`. Mappings and lists are JSON: `CT2I_BASE_MODELS='{"sdxl": "/models/sdxl"}'`,
`CT2I_NODE_TYPES='[{"cpus": 8, "gpus": 1}]'`.

| variable | meaning | default |
| --- | --- | --- |
| `CT2I_HOME` | data dir (SQLite file, local artifacts, work dirs) | `~/.ct2i` |
| `CT2I_DATABASE_URL` | SQLAlchemy URL, e.g. `postgresql+psycopg://user@host/db` | `sqlite:///$CT2I_HOME/ct2i.db` |
| `CT2I_ARTIFACTS` | artifact store root: a folder, `s3://bucket/prefix` or `gs://bucket/prefix` | `$CT2I_HOME/artifacts` |
| `CT2I_CAPACITY_GPUS` | GPUs the scheduler may hand out (on KubeRay: the worker groups' maximum) | the cluster's GPUs, else its CPUs |
| `CT2I_BASE_MODEL` | the base the generator replicas hold | `tiny` |
| `CT2I_BASE_MODELS` | the bases tenants may tune on: name → hub id or folder | `{"tiny": "tiny"}` |
| `CT2I_IMAGE_ENCODERS` | image encoders tenants may name: name → hub id or folder | none (the base's default) |
| `CT2I_NODE_TYPES` | node shapes an autoscaling cluster can add (`cpus`, `gpus`); set = placement is checked against these | the live Ray nodes |
| `CT2I_KEY_PEPPER` | secret mixed into API-key hashes (HMAC-SHA256); empty = plain SHA-256 | empty |
| `CT2I_WEBHOOK_ALLOW_HOSTS` | comma-separated hosts a webhook may reach over plain http (still IP-checked) | none |
| `CT2I_WEBHOOK_ALLOW_NETWORKS` | comma-separated CIDRs of non-global addresses webhooks may reach (metadata never) | none |
| `CT2I_SCHEDULER__RUNNER` | how admitted jobs run: `ray_train` (Ray Train, Tune for `search:`), `ray_task` (the in-process trainer in a Ray task), `inline` (a thread) | `ray_train` |
| `CT2I_SCHEDULER__WORKER_START_TIMEOUT_S` | a Train worker group that cannot start within this fails its job | 300 |
| `CT2I_SCHEDULER__PREEMPTION_WATCHER` | Ray Train's preemption watcher for job runs: `auto` (on unless the cluster is one fixed node), `on`, `off` | `auto` |
| `CT2I_SERVE__MAX_STREAMS_PER_TENANT` / `CT2I_SERVE__MAX_GENERATIONS_PER_TENANT` | SSE streams / generate calls one tenant may hold at once, per ingress replica (past it 429 + Retry-After) | 5 / 4 |
| `CT2I_SERVE__MAX_STREAMS` / `CT2I_SERVE__MAX_GENERATIONS` | the same for all tenants together, per ingress replica (past it 503); their sum stays below the Ingress `max_ongoing_requests` | 64 / 32 |
| `CT2I_RAY_BIND_HOST` | address a local Ray (`ct2i serve`, the demos) binds its GCS, raylet, object manager, dashboard and metrics agent to | `127.0.0.1` |
| `CT2I_GPU_MEMORY_GB` | memory of one GPU; a spec whose memory plan exceeds its `gpus_per_worker` share is refused | 80 |
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from causalt2i.limits import BigInt, Int32

RunnerKind = Literal["ray_train", "ray_task", "inline"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SchedulerSettings(Section):
    runner: Annotated[RunnerKind, Field(description="how admitted jobs run; every driver reads the same setting")] = "ray_train"
    tick_seconds: Annotated[float, Field(gt=0)] = 1.0
    lease_seconds: Annotated[float, Field(gt=0, description="a running job whose heartbeat is older than this has vanished")] = 30.0
    heartbeat_seconds: Annotated[float, Field(gt=0)] = 2.0
    progress_write_seconds: Annotated[float, Field(ge=0, description="at most one progress write per job per this many seconds")] = 1.0
    max_attempts: Annotated[int, Field(ge=1, le=100, description="launches before a job that keeps losing its worker fails")] = 5
    fair_share_half_life_s: Annotated[float, Field(gt=0, description="half-life of 'recent' GPU-seconds")] = 24 * 3600.0
    min_charge_s: Annotated[float, Field(ge=0, description="a just-admitted job counts as at least this many seconds of its GPUs")] = 60.0
    starvation_after_s: Annotated[float, Field(ge=0, description="a job queued longer than this gets capacity reserved for it")] = 600.0
    worker_start_timeout_s: Annotated[float, Field(gt=0, description="a Train worker group that cannot start within this fails its job")] = 300.0
    # Ray Train's preemption watcher (an actor per run that polls for draining nodes, so a preempted worker node
    # costs a restart that does not count against the run's max_failures) is only of use where a worker can sit on
    # a node other than the controller's; on a fixed one-node cluster a drain takes the controller too, and the
    # watcher's fresh process cost 1-3.6 s of a 2-core machine's 21-24 s to step 1 (BENCHMARKS, "time to first step").
    preemption_watcher: Annotated[Literal["auto", "on", "off"], Field(description=(
        "Ray Train's preemption watcher for job runs: `auto` = on where the cluster has more than one node or "
        "can add nodes (`node_types` set), off on a fixed one-node cluster"))] = "auto"


class RequestLimits(Section):
    """Submission limits (REST, the CLI, `ray job submit`)."""

    max_request_bytes: Annotated[int, Field(gt=0)] = 64 * 1024 * 1024
    max_images_per_job: Annotated[int, Field(gt=0, le=1024)] = 64
    max_image_bytes: Annotated[int, Field(gt=0)] = 10 * 1024 * 1024
    # A floor, not an estimate: a submit is refused only when even this little GPU time per step cannot fit the
    # tenant's remaining GPU-hour budget. The budget itself is enforced while the job runs.
    min_gpu_seconds_per_step: Annotated[float, Field(ge=0, allow_inf_nan=False, description=(
        "GPU-seconds (per GPU) one training step takes at least; submits whose steps cannot fit the remaining "
        "GPU-hour budget at this rate are refused"))] = 0.1


class WebhookSettings(Section):
    """Webhook delivery (cluster/webhooks.py): a thread pool in the scheduler process, one queue per tenant."""

    max_attempts: Annotated[int, Field(ge=1, le=100, description="attempts before an event is dead-lettered")] = 8
    backoff_s: Annotated[float, Field(gt=0, description="wait after the first failure; doubles after each")] = 2.0
    max_backoff_s: Annotated[float, Field(gt=0, description="longest wait between attempts")] = 3600.0
    timeout_s: Annotated[float, Field(gt=0, le=300, description="overall deadline of one attempt (lookup to status line)")] = 10.0
    workers: Annotated[int, Field(ge=1, le=1024, description="attempts in flight at once, one tenant each")] = 16
    poll_s: Annotated[float, Field(gt=0, description="how often the dispatcher looks for due events unwoken")] = 1.0
    batch: Annotated[int, Field(ge=1, description="events one tenant sends before others get its worker")] = 20
    keep_deliveries_s: Annotated[float, Field(gt=0, description="how long attempts (dead letters too) stay listed")] = 30 * 86400.0


class ServeSettings(Section):
    """The generator replicas' knobs (`serve/config.yaml` sets replicas and resources)."""

    cache_bytes: Annotated[BigInt, Field(gt=0, description="host cache of adapters, per replica")] = 8 * 1024**3
    max_adapters: Annotated[Int32, Field(gt=0, description="adapters Serve keeps multiplexed per replica")] = 8
    max_body_bytes: Annotated[int, Field(gt=0, description="generate request bodies")] = 64 * 1024
    request_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    # Long requests (cluster.slots), per ingress replica: their totals stay below the Ingress deployment's
    # max_ongoing_requests (serve/app.py refuses to start otherwise), so GETs and /healthz always find a slot.
    max_streams_per_tenant: Annotated[int, Field(ge=1, le=10_000, description="open SSE event streams one tenant may hold; past it 429")] = 5
    max_generations_per_tenant: Annotated[int, Field(ge=1, le=10_000, description="generate requests one tenant may have in flight; past it 429")] = 4
    max_streams: Annotated[int, Field(ge=1, le=100_000, description="open SSE streams, all tenants; past it 503")] = 64
    max_generations: Annotated[int, Field(ge=1, le=100_000, description="generate requests in flight, all tenants; past it 503")] = 32
    busy_retry_after_s: Annotated[int, Field(ge=1, le=3600, description="Retry-After of a request refused at a cap")] = 5

    @model_validator(mode="after")
    def _caps_fit(self) -> "ServeSettings":
        for tenant_cap, total in (("max_streams_per_tenant", "max_streams"), ("max_generations_per_tenant", "max_generations")):
            if getattr(self, tenant_cap) > getattr(self, total):
                raise ValueError(f"serve.{tenant_cap} ({getattr(self, tenant_cap)}) exceeds serve.{total} ({getattr(self, total)})")
        return self


class MetricSettings(Section):
    """The metric networks that score search trials on a real base (the tiny preset uses tiny ones)."""

    clip: str | None = None
    inception: str | None = None
    lpips_trunk: str | None = None
    lpips_linear: str | None = None


class NodeType(Section):
    cpus: Annotated[float, Field(ge=0)]
    gpus: Annotated[float, Field(ge=0)] = 0.0


class ControlPlaneSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CT2I_", env_nested_delimiter="__", extra="ignore", frozen=True,
                                      populate_by_name=True)

    home: Path = Path("~/.ct2i")
    database_url: str = ""
    artifacts_uri: Annotated[str, Field(validation_alias=AliasChoices("artifacts_uri", "CT2I_ARTIFACTS"))] = ""
    capacity_gpus: Annotated[float | None, Field(gt=0, description="None = ask Ray: GPUs, else CPUs")] = None
    base_model: Annotated[str, Field(min_length=1, description="the base every generator replica holds")] = "tiny"
    base_models: Annotated[dict[str, str], Field(description="bases tenants may tune on: name → hub id or folder")] = {"tiny": "tiny"}
    image_encoders: Annotated[dict[str, str], Field(description="image encoders tenants may name: name → hub id or folder")] = {}
    node_types: Annotated[tuple[NodeType, ...], Field(description="node shapes an autoscaling cluster can add")] = ()
    key_pepper: str = ""
    webhook_allow_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    webhook_allow_networks: Annotated[tuple[str, ...], NoDecode] = ()
    gpu_memory_gb: Annotated[float, Field(gt=0, description="one GPU's memory; submit refuses specs whose plan exceeds their share (causalt2i.plan)")] = 80.0
    ray_bind_host: Annotated[str, Field(min_length=1, description="the address a Ray this platform starts binds to; "
                                        "127.0.0.1 keeps the GCS, raylet, object manager and metrics agent off the network")] = "127.0.0.1"
    ray_namespace: str = "ct2i"
    scheduler_name: str = "ct2i-scheduler"

    scheduler: SchedulerSettings = SchedulerSettings()
    limits: RequestLimits = RequestLimits()
    webhooks: WebhookSettings = WebhookSettings()
    serve: ServeSettings = ServeSettings()
    metrics: MetricSettings = MetricSettings()

    @field_validator("webhook_allow_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(h.strip().lower() for h in value.split(",") if h.strip())
        return value

    @field_validator("webhook_allow_networks", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        import ipaddress

        if isinstance(value, str):
            value = [n.strip() for n in value.split(",") if n.strip()]
        return tuple(str(ipaddress.ip_network(n, strict=False)) for n in value)

    @field_validator("ray_bind_host")
    @classmethod
    def _bind_host(cls, value: str) -> str:
        import ipaddress

        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(f"an IP address (127.0.0.1 keeps Ray on this machine), got {value!r}") from None

    @model_validator(mode="after")
    def _derived(self) -> "ControlPlaneSettings":
        home = Path(self.home).expanduser()
        object.__setattr__(self, "home", home)
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{home / 'ct2i.db'}")
        if not self.artifacts_uri:
            object.__setattr__(self, "artifacts_uri", str(home / "artifacts"))
        return self

    @property
    def work_dir(self) -> Path:
        """Local scratch for runs whose artifacts live in a remote store."""
        return self.home / "work"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> "ControlPlaneSettings":
        """The settings from `environ` (default: this process's environment), then `overrides`."""
        if environ is None:
            return cls(**overrides)
        import os

        saved = dict(os.environ)
        try:
            for key in [k for k in os.environ if k.startswith("CT2I_")]:
                del os.environ[key]
            os.environ.update({k: v for k, v in environ.items() if k.startswith("CT2I_")})
            return cls(**overrides)
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def for_workers(self) -> dict:
        """What a Ray worker needs to rebuild these settings exactly (they pickle too; this is for JSON)."""
        return self.model_dump(mode="json")
