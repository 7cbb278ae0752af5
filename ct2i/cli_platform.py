"""`ct2i` control-plane commands: tenants, keys, submit, jobs, adapters.

Each talks to a `cluster.client.ControlPlaneAPI`: this machine's control plane (`LocalAPI`: its database and
store, the local user as the operator) or a remote API (`--api URL`, or `CT2I_API`; the key from
`CT2I_API_KEY`). Objects are named by positional ids (`jobs show JOB_ID`, `adapters delete ADAPTER_ID`, `keys
revoke KEY_ID`, `tenants set-quota NAME`); filters are flags (`--state`, `--name`, `--tenant`). Tables by
default, `--json` for scripts; times are ISO-8601 (UTC) in both. An error is one line on stderr and exit
status 1 (2 for usage errors, from argparse).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from causalt2i.errors import field_error
from causalt2i.spec import SpecError
from cluster.client import ClientError, ControlPlaneAPI, HttpAPI, LocalAPI, read_spec_and_images, wait_for_terminal
from cluster.db import JobState
from cluster.schemas import Quotas


class ClientSettings(BaseSettings):
    """Where the CLI's control-plane commands go: `CT2I_API` (empty: this machine) and `CT2I_API_KEY`."""

    model_config = SettingsConfigDict(env_prefix="CT2I_", extra="ignore")
    api: str = ""
    api_key: str = ""


def api_for(args) -> ControlPlaneAPI:
    client = ClientSettings()
    url = getattr(args, "api", None) or client.api
    if url:
        return HttpAPI(url, client.api_key)
    from cluster.service import ControlPlane

    return LocalAPI(ControlPlane.open())


def ensure_scheduler(api: ControlPlaneAPI, *, start: bool) -> None:
    """Local mode: wake the scheduler actor; with `start`, create it (and connect to RAY_ADDRESS or start a local
    Ray) so that a submitted job runs. A remote API's platform runs its own scheduler."""
    if not isinstance(api, LocalAPI):
        return
    from ct2i.cli_serve import loopback_driver_environment

    loopback_driver_environment(os.environ.get("RAY_ADDRESS"))  # before `import ray`: a loopback-only `ct2i serve`
    import ray

    from ct2i.scheduler import find_scheduler, get_or_create_scheduler

    settings = api.plane.settings
    if not ray.is_initialized():
        if not start:
            return
        ray.init(address=os.environ.get("RAY_ADDRESS"), namespace=settings.ray_namespace, include_dashboard=False)
    actor = get_or_create_scheduler(settings) if start else find_scheduler(settings)
    if actor is not None:
        actor.wake.remote()


# -- output ------------------------------------------------------------------------------------------

def iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _plain(value):
    """A view as JSON-ready data, every `*_at` unix time as ISO-8601."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: (iso(v) if k.endswith("_at") and isinstance(v, (int, float)) else _plain(v)) for k, v in value.items()}
    return value


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _table(rows: list[dict], columns: list[str]) -> str:
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def emit(args, data, columns: list[str] | None = None) -> None:
    data = _plain(data)
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    elif isinstance(data, list):
        print(_table(data, columns or []))
    else:
        for key, value in data.items():
            if key == "progress" and isinstance(value, dict):
                value = f"{value['step']}/{value['total_steps']} loss={_cell(value['loss'])} eta={_cell(value['eta_seconds'])}s"
            elif key == "spec" and isinstance(value, dict):
                value = json.dumps(value, sort_keys=True)
            print(f"{key:>16}: {_cell(value)}")


# -- commands ----------------------------------------------------------------------------------------

TENANT_COLUMNS = ["name", "weight", "max_concurrent_jobs", "max_concurrent_gpus", "gpu_hours_per_30d", "max_adapters", "created_at"]
KEY_COLUMNS = ["id", "scope", "tenant", "label", "created_at", "revoked_at"]
JOB_COLUMNS = ["id", "tenant", "name", "state", "attempts", "created_at", "queue_reason", "error"]
ADAPTER_COLUMNS = ["id", "tenant", "name", "version", "bytes", "base_model", "created_at"]


def _quotas(args) -> Quotas:
    return Quotas(weight=args.weight, max_concurrent_jobs=args.max_concurrent_jobs, max_concurrent_gpus=args.max_concurrent_gpus,
                  gpu_hours_per_30d=args.gpu_hours_per_30d, max_adapters=args.max_adapters, max_stored_bytes=args.max_stored_bytes,
                  generate_rpm=args.generate_rpm)


def cmd_tenants_create(args) -> int:
    emit(args, api_for(args).create_tenant(args.name, _quotas(args)))
    return 0


def cmd_tenants_list(args) -> int:
    emit(args, api_for(args).list_tenants(), TENANT_COLUMNS)
    return 0


def cmd_tenants_set_quota(args) -> int:
    emit(args, api_for(args).set_quota(args.name, _quotas(args)))
    return 0


def cmd_keys_create(args) -> int:
    created = api_for(args).create_key("admin" if args.admin else "tenant", args.tenant, args.label)
    if args.json:
        emit(args, created)
    else:
        print(f"key {created.id} ({created.scope}{' ' + created.tenant if created.tenant else ''}); shown once, store it now:")
        print(created.key)
    return 0


def cmd_keys_list(args) -> int:
    emit(args, api_for(args).list_keys(args.tenant), KEY_COLUMNS)
    return 0


def cmd_keys_revoke(args) -> int:
    emit(args, api_for(args).revoke_key(args.key_id))
    return 0


def cmd_submit(args) -> int:
    spec, images = read_spec_and_images(Path(args.spec))
    api = api_for(args)
    job = api.submit(spec, images)
    ensure_scheduler(api, start=args.wait)
    if not args.wait:
        emit(args, job)
        return 0

    def show(view) -> None:
        if not args.json:
            print(f"{view.id} {view.state} step {view.progress.step}/{view.progress.total_steps}", file=sys.stderr)

    job = wait_for_terminal(lambda: api.get_job(job.id), poll_seconds=args.poll_seconds, on_change=show)
    emit(args, job)
    if job.state != JobState.succeeded:
        print(f"error: job {job.id} {job.state}: {job.error or ''}".rstrip(": "), file=sys.stderr)
        return 1
    return 0


def cmd_jobs_list(args) -> int:
    emit(args, api_for(args).list_jobs(args.state), JOB_COLUMNS)
    return 0


def cmd_jobs_show(args) -> int:
    emit(args, api_for(args).get_job(args.job_id))
    return 0


def cmd_jobs_cancel(args) -> int:
    api = api_for(args)
    job = api.cancel_job(args.job_id)
    ensure_scheduler(api, start=False)
    emit(args, job)
    return 0


def cmd_jobs_delete(args) -> int:
    api = api_for(args)
    deleted = api.delete_job(args.job_id)
    ensure_scheduler(api, start=False)
    emit(args, deleted)
    return 0


def cmd_jobs_logs(args) -> int:
    events = list(api_for(args).job_events(args.job_id, after=args.after))
    if args.json:
        emit(args, events)
    else:
        for event in events:
            print(f"{iso(event.at)} {event.kind:<8} {event.state or '':<9} {event.message}")
    return 0


def cmd_usage(args) -> int:
    emit(args, api_for(args).usage(args.tenant))
    return 0


def cmd_jobs_previews(args) -> int:
    """The job's training previews as one grid image: a row per step, a column per prompt."""
    import io

    from PIL import Image

    from causalt2i.preview import preview_grid

    api = api_for(args)
    previews = api.job_previews(args.job_id)
    if not previews:
        raise ClientError(f"tuning {args.job_id} has no previews yet (train.preview_every: 0 turns them off)", "job_id")
    rows = []
    for preview in previews:
        images = [Image.open(io.BytesIO(api.preview_file(args.job_id, preview.step, path.rsplit("/", 1)[-1]))) for path in preview.files]
        rows.append((preview.step, images))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    preview_grid(rows, previews[-1].prompts, cell=args.cell).save(out)
    if args.json:
        emit(args, {"out": str(out), "steps": [p.step for p in previews], "prompts": previews[-1].prompts})
    else:
        print(f"{out}: {len(rows)} step(s) x {len(previews[-1].prompts)} prompt(s)")
    return 0


def cmd_adapters_list(args) -> int:
    emit(args, api_for(args).list_adapters(args.name), ADAPTER_COLUMNS)
    return 0


def cmd_adapters_show(args) -> int:
    emit(args, api_for(args).get_adapter(args.adapter_id))
    return 0


def cmd_adapters_delete(args) -> int:
    emit(args, api_for(args).delete_adapter(args.adapter_id))
    return 0


def add_client_flags(parser: argparse.ArgumentParser, *, top_level: bool = False) -> argparse.ArgumentParser:
    """`--api` and `--json`, accepted before the command (`ct2i --api URL jobs list`) or after it."""
    default = None if top_level else argparse.SUPPRESS
    parser.add_argument("--api", metavar="URL", default=default,
                        help="a remote control-plane API (key from CT2I_API_KEY); default: CT2I_API, else this machine's")
    parser.add_argument("--json", action="store_true", default=False if top_level else argparse.SUPPRESS,
                        help="machine-readable output")
    return parser


def _quota_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weight", type=float, help="fair-share weight (> 0)")
    parser.add_argument("--max-concurrent-jobs", type=int)
    parser.add_argument("--max-concurrent-gpus", type=float)
    parser.add_argument("--gpu-hours-per-30d", type=float)
    parser.add_argument("--max-adapters", type=int)
    parser.add_argument("--max-stored-bytes", type=int)
    parser.add_argument("--generate-rpm", type=int, help="generate requests per minute")


def _wrap(func):
    def run(args) -> int:
        try:
            return func(args)
        except (ClientError, SpecError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        except ValidationError as err:
            print(f"error: {field_error(err)}", file=sys.stderr)
            return 1
    return run


def _command(group, name: str, func, help: str, *positionals: tuple[str, str]) -> argparse.ArgumentParser:
    parser = add_client_flags(group.add_parser(name, help=help, description=help))
    for arg, arg_help in positionals:
        parser.add_argument(arg, help=arg_help)
    parser.set_defaults(func=_wrap(func))
    return parser


def add_control_plane_commands(subparsers) -> None:
    tenants = subparsers.add_parser("tenants", help="tenants and their quotas (admin)").add_subparsers(dest="tenants_command", required=True)
    _quota_flags(_command(tenants, "create", cmd_tenants_create, "create a tenant", ("name", "[a-z0-9-]{1,40}")))
    _command(tenants, "list", cmd_tenants_list, "list tenants")
    _quota_flags(_command(tenants, "set-quota", cmd_tenants_set_quota, "change a tenant's weight or quotas", ("name", "the tenant")))

    keys = subparsers.add_parser("keys", help="API keys (admin)").add_subparsers(dest="keys_command", required=True)
    p = _command(keys, "create", cmd_keys_create, "create a key; it is printed once")
    p.add_argument("--tenant", help="the tenant a tenant key belongs to")
    p.add_argument("--admin", action="store_true", help="an admin key instead of a tenant key")
    p.add_argument("--label", default="")
    _command(keys, "list", cmd_keys_list, "list keys (never their secrets)").add_argument("--tenant", help="only this tenant's")
    _command(keys, "revoke", cmd_keys_revoke, "revoke a key", ("key_id", "the key's id (key-...)"))

    p = _command(subparsers, "submit", cmd_submit, "submit a tuning spec (YAML)", ("spec", "SPEC.yaml"))
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit 1 unless it succeeded")
    p.add_argument("--poll-seconds", type=float, default=1.0, help=argparse.SUPPRESS)

    jobs = subparsers.add_parser("jobs", help="tuning jobs").add_subparsers(dest="jobs_command", required=True)
    _command(jobs, "list", cmd_jobs_list, "list jobs, newest first").add_argument(
        "--state", type=JobState, choices=list(JobState), help="only jobs in this state")
    _command(jobs, "show", cmd_jobs_show, "a job: state, progress, why it waits or failed", ("job_id", "the job's id (job-...)"))
    _command(jobs, "cancel", cmd_jobs_cancel, "cancel a job: it stops (keeping a checkpoint) and its inputs are freed; "
             "the job stays listed", ("job_id", "the job's id"))
    _command(jobs, "delete", cmd_jobs_delete, "delete a job (cancelling it if still active) with its inputs, checkpoints "
             "and the adapters it registered, freeing their stored bytes; GPU time used stays charged", ("job_id", "the job's id"))
    _command(jobs, "logs", cmd_jobs_logs, "the job's events: states, checkpoints, messages", ("job_id", "the job's id")).add_argument(
        "--after", type=int, default=0, help="only events after this id")

    _command(subparsers, "usage", cmd_usage, "what counts against a tenant's quotas: GPU-seconds used and left in the "
             "30-day window, stored bytes of inputs and adapters", ("tenant", "the tenant"))
    p = _command(jobs, "previews", cmd_jobs_previews, "write the job's training previews as a grid image (rows = steps, "
                 "columns = prompts: the joint prompt, then each subject's)", ("job_id", "the job's id"))
    p.add_argument("--out", required=True, metavar="GRID.png", help="where to write the grid")
    p.add_argument("--cell", type=int, default=192, help="pixels per image in the grid (default 192)")

    adapters = subparsers.add_parser("adapters", help="the adapter registry").add_subparsers(dest="adapters_command", required=True)
    _command(adapters, "list", cmd_adapters_list, "list adapters").add_argument("--name", help="only versions of this name")
    _command(adapters, "show", cmd_adapters_show, "an adapter version", ("adapter_id", "the adapter's id (ad-...)"))
    _command(adapters, "delete", cmd_adapters_delete, "delete an adapter version", ("adapter_id", "the adapter's id"))
