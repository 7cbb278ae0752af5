"""`ct2i` control-plane commands: tenants, keys, submit, jobs, adapters.

`add_control_plane_commands(subparsers)` registers them on the lead's `ct2i` parser. Each works against the
local embedded default (this machine's database and store; the local user is the operator) or a remote API
(`--api URL`, key from `CT2I_API_KEY`). Tables by default, `--json` for scripts. An error is one line on
stderr and exit status 1 (2 for usage errors, from argparse).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

from cluster.schemas import Quotas

TERMINAL = ("succeeded", "failed", "cancelled")


class CliError(Exception):
    pass


# -- backends ----------------------------------------------------------------------------------------

class LocalBackend:
    """Calls the service directly; wakes (or starts) the scheduler actor when Ray is reachable."""

    def __init__(self):
        from cluster.service import ControlPlane

        self.plane = ControlPlane.open()

    def call(self, op: str, **kw):
        from cluster.service import ServiceError

        try:
            return getattr(self, f"_{op}")(**kw)
        except ServiceError as err:
            raise CliError(str(err)) from None

    def _tenants_create(self, name, quotas):
        return self.plane.create_tenant(name, quotas).model_dump()

    def _tenants_list(self):
        return [t.model_dump() for t in self.plane.list_tenants()]

    def _tenants_set_quota(self, name, quotas):
        return self.plane.set_quota(name, quotas).model_dump()

    def _keys_create(self, scope, tenant, label):
        return self.plane.create_key(scope, tenant, label).model_dump()

    def _keys_revoke(self, key_id):
        return self.plane.revoke_key(key_id).model_dump()

    def _submit(self, spec, images):
        job = self.plane.submit(None, spec, images).model_dump()
        self.ensure_scheduler()
        return job

    def _jobs_list(self, state):
        return [j.model_dump() for j in self.plane.list_jobs(None, state=state)]

    def _jobs_show(self, job_id):
        return self.plane.get_job(None, job_id).model_dump()

    def _jobs_cancel(self, job_id):
        job = self.plane.cancel_job(None, job_id).model_dump()
        self.ensure_scheduler(start=False)
        return job

    def _jobs_logs(self, job_id, after):
        return [e.model_dump() for e in self.plane.job_events(None, job_id, after=after)]

    def _adapters_list(self, name):
        return [a.model_dump() for a in self.plane.list_adapters(None, name=name)]

    def _adapters_show(self, adapter_id):
        return self.plane.get_adapter(None, adapter_id).model_dump()

    def _adapters_delete(self, adapter_id):
        return self.plane.delete_adapter(None, adapter_id).model_dump()

    def ensure_scheduler(self, start: bool = True) -> None:
        """Wake the scheduler; create it if this process is connected to Ray (or RAY_ADDRESS names a cluster)."""
        import ray

        from cluster.scheduler import find_scheduler, get_or_create_scheduler

        if not ray.is_initialized():
            if not (start and os.environ.get("RAY_ADDRESS")):
                return
            ray.init(address=os.environ["RAY_ADDRESS"], namespace=self.plane.settings.ray_namespace)
        actor = find_scheduler(self.plane.settings) if not start else get_or_create_scheduler(self.plane.settings)
        if actor is not None:
            actor.wake.remote()


class RemoteBackend:
    ROUTES = {
        "tenants_create": ("POST", "/v1/admin/tenants"), "tenants_list": ("GET", "/v1/admin/tenants"),
        "tenants_set_quota": ("PATCH", "/v1/admin/tenants/{name}"), "keys_create": ("POST", "/v1/admin/keys"),
        "keys_revoke": ("DELETE", "/v1/admin/keys/{key_id}"), "submit": ("POST", "/v1/tunings"),
        "jobs_list": ("GET", "/v1/tunings"), "jobs_show": ("GET", "/v1/tunings/{job_id}"),
        "jobs_cancel": ("DELETE", "/v1/tunings/{job_id}"), "adapters_list": ("GET", "/v1/adapters"),
        "adapters_show": ("GET", "/v1/adapters/{adapter_id}"), "adapters_delete": ("DELETE", "/v1/adapters/{adapter_id}"),
    }

    def __init__(self, url: str, key: str | None, transport=None):
        import httpx

        if not key:
            raise CliError("CT2I_API_KEY is not set; it is needed with --api")
        self.client = httpx.Client(base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {key}"},
                                   timeout=60, transport=transport)

    def call(self, op: str, **kw):
        import base64

        import httpx

        if op == "jobs_logs":
            return self._request("GET", f"/v1/tunings/{kw['job_id']}/events", stream=True, after=kw["after"])
        method, path = self.ROUTES[op]
        path = path.format(**{k: v for k, v in kw.items() if isinstance(v, str)})
        body = params = None
        if op == "tenants_create":
            body = {"name": kw["name"], **kw["quotas"].model_dump(exclude_none=True)}
        elif op == "tenants_set_quota":
            body = kw["quotas"].model_dump(exclude_none=True)
        elif op == "keys_create":
            body = {"scope": kw["scope"], "tenant": kw["tenant"], "label": kw["label"]}
        elif op == "submit":
            body = {"spec": kw["spec"], "images": {n: base64.b64encode(d).decode() for n, d in kw["images"].items()}}
        elif op == "jobs_list" and kw.get("state"):
            params = {"state": kw["state"]}
        elif op == "adapters_list" and kw.get("name"):
            params = {"name": kw["name"]}
        try:
            response = self.client.request(method, path, json=body, params=params)
        except httpx.HTTPError as err:
            raise CliError(f"cannot reach {self.client.base_url}: {err}") from None
        return self._decode(response)

    @staticmethod
    def _decode(response):
        if response.status_code >= 400:
            try:
                detail = response.json()["detail"]
                message = f"{detail['field']}: {detail['message']}" if isinstance(detail, dict) and detail.get("field") \
                    else (detail.get("message") if isinstance(detail, dict) else str(detail))
            except Exception:
                message = response.text[:200]
            raise CliError(f"HTTP {response.status_code}: {message}")
        return response.json()

    def _request(self, method, path, stream=False, after=0):
        headers = {"Last-Event-ID": str(after)} if after else {}
        events = []
        with self.client.stream(method, path, headers=headers, timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                self._decode(response)
            for line in response.iter_lines():
                if line.startswith("data: ") and '"kind"' in line:
                    events.append(json.loads(line[6:]))
                if line.startswith("event: end"):
                    break
        return events


def _backend(args):
    if getattr(args, "api", None):
        return RemoteBackend(args.api, os.environ.get("CT2I_API_KEY"))
    return LocalBackend()


# -- output ------------------------------------------------------------------------------------------

def _table(rows: list[dict], columns: list[str]) -> str:
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _emit(args, data, columns: list[str] | None = None) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    elif isinstance(data, list):
        print(_table(data, columns or []))
    else:
        for key, value in data.items():
            if key == "progress" and isinstance(value, dict):
                value = f"{value['step']}/{value['total_steps']} loss={_cell(value['loss'])} eta={_cell(value['eta_seconds'])}s"
            print(f"{key:>16}: {_cell(value)}")


# -- commands ----------------------------------------------------------------------------------------

def _quotas(args) -> Quotas:
    return Quotas(weight=args.weight, max_concurrent_jobs=args.max_concurrent_jobs, max_concurrent_gpus=args.max_concurrent_gpus,
                  gpu_hours_per_30d=args.gpu_hours_per_30d, max_adapters=args.max_adapters, max_stored_bytes=args.max_stored_bytes,
                  generate_rpm=args.generate_rpm)


TENANT_COLUMNS = ["name", "weight", "max_concurrent_jobs", "max_concurrent_gpus", "gpu_hours_per_30d", "max_adapters"]
JOB_COLUMNS = ["id", "tenant", "name", "state", "attempts", "queue_reason", "error"]
ADAPTER_COLUMNS = ["id", "tenant", "name", "version", "bytes", "base_model", "created_at"]


def cmd_tenants_create(args) -> int:
    _emit(args, _backend(args).call("tenants_create", name=args.name, quotas=_quotas(args)))
    return 0


def cmd_tenants_list(args) -> int:
    _emit(args, _backend(args).call("tenants_list"), TENANT_COLUMNS)
    return 0


def cmd_tenants_set_quota(args) -> int:
    _emit(args, _backend(args).call("tenants_set_quota", name=args.name, quotas=_quotas(args)))
    return 0


def cmd_keys_create(args) -> int:
    created = _backend(args).call("keys_create", scope="admin" if args.admin else "tenant", tenant=args.tenant, label=args.label)
    if args.json:
        _emit(args, created)
    else:
        print(f"key {created['id']} ({created['scope']}{' ' + created['tenant'] if created['tenant'] else ''}); "
              "shown once, store it now:")
        print(created["key"])
    return 0


def cmd_keys_revoke(args) -> int:
    _emit(args, _backend(args).call("keys_revoke", key_id=args.key_id))
    return 0


def read_spec_and_images(path: Path) -> tuple[dict, dict[str, bytes]]:
    """The spec as uploaded: each local image becomes `s<subject>-<index><suffix>`, read into memory."""
    from causalt2i.spec import SpecError, load_spec

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        load_spec(path)  # validates, resolving and checking the image files
    except OSError as err:
        raise CliError(f"cannot read {path}: {err.strerror}") from None
    except (yaml.YAMLError, SpecError) as err:
        raise CliError(str(err)) from None
    images: dict[str, bytes] = {}
    for i, subject in enumerate(data["subjects"]):
        names = []
        for j, image in enumerate(subject["images"]):
            source = Path(image) if Path(image).is_absolute() else path.parent / image
            name = f"s{i}-{j}{source.suffix.lower()}"
            images[name] = source.read_bytes()
            names.append(name)
        subject["images"] = names
    return data, images


def cmd_submit(args) -> int:
    spec, images = read_spec_and_images(Path(args.spec))
    backend = _backend(args)
    job = backend.call("submit", spec=spec, images=images)
    if not args.wait:
        _emit(args, job)
        return 0
    if isinstance(backend, LocalBackend):
        import ray

        if not ray.is_initialized():  # --wait needs something to run the job: start a local Ray for it
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
        backend.ensure_scheduler()
    last = None
    while job["state"] not in TERMINAL:
        time.sleep(args.poll_seconds)
        job = backend.call("jobs_show", job_id=job["id"])
        line = f"{job['id']} {job['state']} step {job['progress']['step']}/{job['progress']['total_steps']}"
        if line != last and not args.json:
            print(line, file=sys.stderr)
            last = line
    _emit(args, job)
    if job["state"] != "succeeded":
        print(f"error: job {job['id']} {job['state']}: {job.get('error') or ''}".rstrip(": "), file=sys.stderr)
        return 1
    return 0


def cmd_jobs_list(args) -> int:
    _emit(args, _backend(args).call("jobs_list", state=args.state), JOB_COLUMNS)
    return 0


def cmd_jobs_show(args) -> int:
    _emit(args, _backend(args).call("jobs_show", job_id=args.job_id))
    return 0


def cmd_jobs_cancel(args) -> int:
    _emit(args, _backend(args).call("jobs_cancel", job_id=args.job_id))
    return 0


def cmd_jobs_logs(args) -> int:
    events = _backend(args).call("jobs_logs", job_id=args.job_id, after=args.after)
    if args.json:
        _emit(args, events)
    else:
        for event in events:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["at"]))
            print(f"{stamp} {event['kind']:<8} {event['state'] or '':<9} {event['message']}")
    return 0


def cmd_adapters_list(args) -> int:
    _emit(args, _backend(args).call("adapters_list", name=args.name), ADAPTER_COLUMNS)
    return 0


def cmd_adapters_show(args) -> int:
    _emit(args, _backend(args).call("adapters_show", adapter_id=args.adapter_id))
    return 0


def cmd_adapters_delete(args) -> int:
    _emit(args, _backend(args).call("adapters_delete", adapter_id=args.adapter_id))
    return 0


def _common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--api", metavar="URL", default=os.environ.get("CT2I_API"),
                        help="a remote control-plane API (key from CT2I_API_KEY); default: the local embedded one")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _quota_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weight", type=float)
    parser.add_argument("--max-concurrent-jobs", type=int)
    parser.add_argument("--max-concurrent-gpus", type=float)
    parser.add_argument("--gpu-hours-per-30d", type=float)
    parser.add_argument("--max-adapters", type=int)
    parser.add_argument("--max-stored-bytes", type=int)
    parser.add_argument("--generate-rpm", type=int)


def _wrap(func):
    def run(args) -> int:
        from pydantic import ValidationError

        try:
            return func(args)
        except CliError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        except ValidationError as err:
            problem = err.errors()[0]
            print(f"error: {'.'.join(str(p) for p in problem['loc'])}: {problem['msg']}", file=sys.stderr)
            return 1
    return run


def add_control_plane_commands(subparsers) -> None:
    tenants = subparsers.add_parser("tenants", help="tenants and their quotas (admin)").add_subparsers(dest="tenants_command", required=True)
    p = _common(tenants.add_parser("create", help="create a tenant"))
    p.add_argument("name")
    _quota_flags(p)
    p.set_defaults(func=_wrap(cmd_tenants_create))
    _common(tenants.add_parser("list", help="list tenants")).set_defaults(func=_wrap(cmd_tenants_list))
    p = _common(tenants.add_parser("set-quota", help="change a tenant's weight or quotas"))
    p.add_argument("name")
    _quota_flags(p)
    p.set_defaults(func=_wrap(cmd_tenants_set_quota))

    keys = subparsers.add_parser("keys", help="API keys (admin)").add_subparsers(dest="keys_command", required=True)
    p = _common(keys.add_parser("create", help="create a key; it is printed once"))
    p.add_argument("--tenant")
    p.add_argument("--admin", action="store_true", help="an admin key instead of a tenant key")
    p.add_argument("--label", default="")
    p.set_defaults(func=_wrap(cmd_keys_create))
    p = _common(keys.add_parser("revoke", help="revoke a key"))
    p.add_argument("key_id")
    p.set_defaults(func=_wrap(cmd_keys_revoke))

    p = _common(subparsers.add_parser("submit", help="submit a tuning spec (YAML)"))
    p.add_argument("spec", metavar="SPEC.yaml")
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit 1 unless it succeeded")
    p.add_argument("--poll-seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    p.set_defaults(func=_wrap(cmd_submit))

    jobs = subparsers.add_parser("jobs", help="tuning jobs").add_subparsers(dest="jobs_command", required=True)
    p = _common(jobs.add_parser("list"))
    p.add_argument("--state")
    p.set_defaults(func=_wrap(cmd_jobs_list))
    for name, func in (("show", cmd_jobs_show), ("cancel", cmd_jobs_cancel)):
        p = _common(jobs.add_parser(name))
        p.add_argument("job_id")
        p.set_defaults(func=_wrap(func))
    p = _common(jobs.add_parser("logs", help="the job's events: states, checkpoints, messages"))
    p.add_argument("job_id")
    p.add_argument("--after", type=int, default=0, help="only events after this id")
    p.set_defaults(func=_wrap(cmd_jobs_logs))

    adapters = subparsers.add_parser("adapters", help="the adapter registry").add_subparsers(dest="adapters_command", required=True)
    p = _common(adapters.add_parser("list"))
    p.add_argument("--name")
    p.set_defaults(func=_wrap(cmd_adapters_list))
    for name, func in (("show", cmd_adapters_show), ("delete", cmd_adapters_delete)):
        p = _common(adapters.add_parser(name))
        p.add_argument("adapter_id")
        p.set_defaults(func=_wrap(func))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ct2i")
    add_control_plane_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
