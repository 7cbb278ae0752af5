"""Clients of the control plane: the typed `ControlPlaneAPI` and its two implementations, `LocalAPI` (this
machine's database and store, as the operator) and `HttpAPI` (a remote API with a key), plus what every
client needs: a spec file packed for upload, and waiting for a job to end.

The `ct2i` CLI, `python -m ct2i.job` and the demo talk to the control plane only through `ControlPlaneAPI`.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import yaml
from pydantic import TypeAdapter

from causalt2i.spec import SpecError, TuningSpec, parse_spec
from cluster.db import JobState
from cluster.schemas import (
    AdapterView, CreatedKey, EventView, JobDeleted, JobView, KeyView, Quotas, TenantView, UsageView,
)
from cluster.service import ControlPlane, ServiceError


class ClientError(Exception):
    """A refused or failed call, as one line: `field: message` (and the HTTP status for a remote API)."""

    def __init__(self, message: str, field: str = "", status: int | None = None):
        self.field, self.message, self.status = field, message, status
        text = f"{field}: {message}" if field else message
        super().__init__(f"HTTP {status}: {text}" if status else text)


class ControlPlaneAPI(Protocol):
    def create_tenant(self, name: str, quotas: Quotas) -> TenantView: ...
    def list_tenants(self) -> list[TenantView]: ...
    def set_quota(self, name: str, quotas: Quotas) -> TenantView: ...
    def create_key(self, scope: str, tenant: str | None, label: str) -> CreatedKey: ...
    def list_keys(self, tenant: str | None) -> list[KeyView]: ...
    def revoke_key(self, key_id: str) -> KeyView: ...
    def submit(self, spec: TuningSpec, images: dict[str, bytes]) -> JobView: ...
    def list_jobs(self, state: JobState | None = None) -> list[JobView]: ...
    def get_job(self, job_id: str) -> JobView: ...
    def cancel_job(self, job_id: str) -> JobView: ...
    def delete_job(self, job_id: str) -> JobDeleted: ...
    def job_events(self, job_id: str, after: int = 0) -> Iterator[EventView]: ...
    def list_adapters(self, name: str | None = None) -> list[AdapterView]: ...
    def get_adapter(self, adapter_id: str) -> AdapterView: ...
    def delete_adapter(self, adapter_id: str) -> AdapterView: ...
    def usage(self, tenant: str) -> UsageView: ...
    def job_previews(self, job_id: str) -> list: ...  # list[cluster.api.PreviewView]
    def preview_file(self, job_id: str, step: int, filename: str) -> bytes: ...


class LocalAPI:
    """`ControlPlaneAPI` on this machine's control plane, with the operator's (admin) scope."""

    def __init__(self, plane: ControlPlane):
        self.plane = plane

    def _call(self, method, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except ServiceError as err:
            raise ClientError(err.message, err.field) from None

    def create_tenant(self, name, quotas):
        return self._call(self.plane.create_tenant, name, quotas)

    def list_tenants(self):
        return self._call(self.plane.list_tenants)

    def set_quota(self, name, quotas):
        return self._call(self.plane.set_quota, name, quotas)

    def create_key(self, scope, tenant, label):
        return self._call(self.plane.create_key, scope, tenant, label)

    def list_keys(self, tenant):
        return self._call(self.plane.list_keys, tenant)

    def revoke_key(self, key_id):
        return self._call(self.plane.revoke_key, key_id)

    def submit(self, spec, images):
        return self._call(self.plane.submit, None, spec, images)

    def list_jobs(self, state=None):
        return self._call(self.plane.list_jobs, None, state=state)

    def get_job(self, job_id):
        return self._call(self.plane.get_job, None, job_id)

    def cancel_job(self, job_id):
        return self._call(self.plane.cancel_job, None, job_id)

    def delete_job(self, job_id):
        return self._call(self.plane.delete_job, None, job_id)

    def job_events(self, job_id, after=0):
        yield from self._call(self.plane.job_events, None, job_id, after=after)

    def list_adapters(self, name=None):
        return self._call(self.plane.list_adapters, None, name=name)

    def get_adapter(self, adapter_id):
        return self._call(self.plane.get_adapter, None, adapter_id)

    def delete_adapter(self, adapter_id):
        return self._call(self.plane.delete_adapter, None, adapter_id)

    def usage(self, tenant):
        return self._call(self.plane.usage, tenant)

    def job_previews(self, job_id):
        from cluster.api import job_previews

        return self._call(job_previews, self.plane, None, job_id)

    def preview_file(self, job_id, step, filename):
        from cluster.api import job_preview_file

        return self._call(job_preview_file, self.plane, None, job_id, step, filename)


class HttpAPI:
    """`ControlPlaneAPI` over HTTP (httpx; events through httpx-sse). `client`: an httpx.Client of the caller's
    (e.g. one bound to an in-process ASGI app); the key is set on it."""

    def __init__(self, url: str, key: str | None, *, client=None, timeout: float = 60.0):
        import httpx

        if not key:
            raise ClientError("CT2I_API_KEY is not set; it is needed with --api")
        self.client = client or httpx.Client(base_url=url.rstrip("/"), timeout=timeout)
        self.client.headers["Authorization"] = f"Bearer {key}"

    def _request(self, method: str, path: str, model, **kwargs):
        import httpx

        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise ClientError(f"cannot reach {self.client.base_url}: {err}") from None
        _raise_for(response)
        return TypeAdapter(model).validate_python(response.json())

    def create_tenant(self, name, quotas):
        return self._request("POST", "/v1/admin/tenants", TenantView, json={"name": name, **quotas.model_dump(exclude_none=True)})

    def list_tenants(self):
        return self._request("GET", "/v1/admin/tenants", list[TenantView])

    def set_quota(self, name, quotas):
        return self._request("PATCH", f"/v1/admin/tenants/{name}", TenantView, json=quotas.model_dump(exclude_none=True))

    def create_key(self, scope, tenant, label):
        return self._request("POST", "/v1/admin/keys", CreatedKey, json={"scope": scope, "tenant": tenant, "label": label})

    def list_keys(self, tenant):
        return self._request("GET", "/v1/admin/keys", list[KeyView], params={"tenant": tenant} if tenant else None)

    def revoke_key(self, key_id):
        return self._request("DELETE", f"/v1/admin/keys/{key_id}", KeyView)

    def submit(self, spec, images):
        body = {"spec": spec.model_dump(mode="json"), "images": {n: base64.b64encode(d).decode() for n, d in images.items()}}
        return self._request("POST", "/v1/tunings", JobView, json=body)

    def list_jobs(self, state=None):
        return self._request("GET", "/v1/tunings", list[JobView], params={"state": state} if state else None)

    def get_job(self, job_id):
        return self._request("GET", f"/v1/tunings/{job_id}", JobView)

    def cancel_job(self, job_id):
        return self._request("POST", f"/v1/tunings/{job_id}/cancel", JobView)

    def delete_job(self, job_id):
        return self._request("DELETE", f"/v1/tunings/{job_id}", JobDeleted)

    def job_events(self, job_id, after=0):
        """The job's events until it ends (the server closes the stream with `event: end`)."""
        from httpx_sse import connect_sse

        headers = {"Last-Event-ID": str(after)} if after else {}
        with connect_sse(self.client, "GET", f"/v1/tunings/{job_id}/events", headers=headers, timeout=None) as source:
            if source.response.status_code >= 400:
                source.response.read()
                _raise_for(source.response)
            for event in source.iter_sse():
                if event.event == "end":
                    return
                yield EventView.model_validate_json(event.data)

    def list_adapters(self, name=None):
        return self._request("GET", "/v1/adapters", list[AdapterView], params={"name": name} if name else None)

    def get_adapter(self, adapter_id):
        return self._request("GET", f"/v1/adapters/{adapter_id}", AdapterView)

    def delete_adapter(self, adapter_id):
        return self._request("DELETE", f"/v1/adapters/{adapter_id}", AdapterView)

    def usage(self, tenant):
        return self._request("GET", "/v1/usage", UsageView, params={"tenant": tenant})

    def job_previews(self, job_id):
        from cluster.api import PreviewView

        return self._request("GET", f"/v1/tunings/{job_id}/previews", list[PreviewView])

    def preview_file(self, job_id, step, filename):
        import httpx

        try:
            response = self.client.get(f"/v1/tunings/{job_id}/previews/{int(step)}/{filename}")
        except httpx.HTTPError as err:
            raise ClientError(f"cannot reach {self.client.base_url}: {err}") from None
        _raise_for(response)
        return response.content


def _raise_for(response) -> None:
    if response.status_code < 400:
        return
    try:
        detail = response.json()["detail"]
        raise ClientError(detail.get("message", ""), detail.get("field", ""), response.status_code)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ClientError(response.text[:200], "", response.status_code) from None


# -- what every client needs -------------------------------------------------------------------------

def read_spec_and_images(path: Path) -> tuple[TuningSpec, dict[str, bytes]]:
    """A spec file as uploaded: validated (its images must exist), each image renamed `s<subject>-<index><suffix>`
    and read into memory. Raises SpecError naming the field."""
    return pack_spec(_load_yaml(path), Path(path).parent)


def pack_spec(data: object, base_dir: Path) -> tuple[TuningSpec, dict[str, bytes]]:
    spec = parse_spec(data, base_dir=base_dir)  # image paths resolved against base_dir and checked to exist
    images: dict[str, bytes] = {}
    subjects = []
    for i, subject in enumerate(spec.subjects):
        names = []
        for j, image in enumerate(subject.images):
            source = Path(image)
            name = f"s{i}-{j}{source.suffix.lower()}"
            images[name] = source.read_bytes()
            names.append(name)
        subjects.append(subject.model_copy(update={"images": names}))
    return spec.model_copy(update={"subjects": subjects}), images


def _load_yaml(path: Path):
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise SpecError("", f"cannot read {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise SpecError("", f"{path} is not valid YAML: {err}") from None


def wait_for_terminal(get_jobs: Callable[[], JobView | list[JobView]], *, poll_seconds: float = 1.0,
                      timeout: float | None = None, on_change: Callable[[JobView], None] | None = None,
                      sleep: Callable[[float], None] = time.sleep):
    """Poll `get_jobs` (one job or a list) until every job has ended; returns what it returned last.

    `on_change` sees each job once per new (state, step, queue reason). TimeoutError past `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    seen: dict[str, tuple] = {}
    while True:
        answer = get_jobs()
        jobs = answer if isinstance(answer, list) else [answer]
        for job in jobs:
            key = (job.state, job.progress.step, job.queue_reason)
            if seen.get(job.id) != key:
                seen[job.id] = key
                if on_change is not None:
                    on_change(job)
        if all(job.state.terminal for job in jobs):
            return answer
        if deadline is not None and time.monotonic() > deadline:
            waiting = ", ".join(f"{job.id} {job.state}" for job in jobs if not job.state.terminal)
            raise TimeoutError(f"still not ended after {timeout:g} s: {waiting}")
        sleep(poll_seconds)
