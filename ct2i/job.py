"""Batch tuning entrypoint for the Ray job CLI.

    ray job submit --working-dir . -- python -m ct2i.job SPEC_OR_BATCH.yaml [--create-tenants]

The argument is one spec, a batch file (`jobs: [spec, spec, ...]`, each entry a spec mapping or the
path of a spec file), or a folder of spec files (`*.yaml`, `*.yml`). Every spec is validated before
anything is registered: one bad spec fails the whole submission with its field named, and nothing is
stored. Each job is then registered with the control plane (its images uploaded with it), the
scheduler (with the runner the settings name: Ray Train by default) admits them within each tenant's quota
and fair share, and this driver prints a line per job
whenever its state or step changes, a final table, and exits 1 if any job failed.

Image paths in a spec are relative to the spec file (for a batch file: to the batch file). The
control plane is found from the environment (CT2I_HOME, CT2I_DATABASE_URL, CT2I_ARTIFACTS). A spec the
platform refuses (a base it does not offer, workers no node can hold) fails the submission the same way,
with nothing registered.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from causalt2i.spec import SpecError, TuningSpec
from cluster.client import pack_spec

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


@dataclass
class PreparedJob:
    source: str  # where the spec came from, for messages
    spec: TuningSpec  # as uploaded: image names replaced by upload keys
    images: dict[str, bytes]


def _entries(path: Path) -> list[tuple[str, dict, Path]]:
    """(label, spec mapping, folder its relative image paths are based on) for every spec in `path`."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        if not files:
            raise SpecError("", f"{path} holds no .yaml spec files")
        return [entry for file in files for entry in _entries(file)]
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SpecError("", f"cannot read {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise SpecError("", f"{path} is not valid YAML: {err}") from None
    if isinstance(data, dict) and set(data) == {"jobs"}:
        if not isinstance(data["jobs"], list) or not data["jobs"]:
            raise SpecError("jobs", f"{path}: must be a non-empty list of specs or spec file paths")
        entries = []
        for index, item in enumerate(data["jobs"]):
            if isinstance(item, str):
                nested = path.parent / item
                entries += [(f"{path.name}:jobs.{index} ({item})", spec, base) for _, spec, base in _entries(nested)]
            else:
                entries.append((f"{path.name}:jobs.{index}", item, path.parent))
        return entries
    return [(path.name, data, path.parent)]


def prepare(path: Path) -> list[PreparedJob]:
    """Validate every spec (fields named) and read its images; raise SpecError before anything is stored."""
    prepared = []
    for label, data, base in _entries(path):
        try:
            spec, images = pack_spec(data, base)
        except SpecError as err:
            raise SpecError(err.field, f"{label}: {err.message}") from None
        prepared.append(PreparedJob(source=label, spec=spec, images=images))
    return prepared


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ct2i.job", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", type=Path, help="a spec, a batch file (jobs: [...]) or a folder of specs")
    parser.add_argument("--create-tenants", action="store_true", help="create tenants that do not exist yet (default quotas)")
    parser.add_argument("--no-wait", action="store_true", help="register the jobs and exit without waiting")
    parser.add_argument("--poll-seconds", type=float, default=2.0)
    args = parser.parse_args(argv)

    try:
        jobs = prepare(args.specs)
    except SpecError as err:
        print(f"ct2i.job: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from ct2i.cli_serve import loopback_driver_environment

    loopback_driver_environment("auto")  # before `import ray`: the cluster may be a loopback-only `ct2i serve`
    import ray

    from cluster.client import wait_for_terminal
    from cluster.config import ControlPlaneSettings
    from cluster.service import ControlPlane, ServiceError
    from ct2i.scheduler import get_or_create_scheduler

    settings = ControlPlaneSettings()
    plane = ControlPlane.open(settings)
    if not ray.is_initialized():
        try:  # the cluster this driver runs on: placement is checked against its nodes
            ray.init(address="auto", namespace=settings.ray_namespace)
        except ConnectionError:
            if not args.no_wait:
                raise
    # Everything the platform would refuse, refused before anything is registered.
    for job in jobs:
        try:
            plane.check_runnable(job.spec)
        except ServiceError as err:
            print(f"ct2i.job: error: {job.source}: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
    tenants = {job.spec.tenant for job in jobs}
    known = {t.name for t in plane.list_tenants()}
    missing = sorted(tenants - known)
    if missing and not args.create_tenants:
        print(f"ct2i.job: error: tenant: no tenant {', '.join(missing)}; create it with `ct2i tenants create NAME` or pass --create-tenants", file=sys.stderr)
        return EXIT_BAD_INPUT
    for tenant in missing:
        plane.create_tenant(tenant)

    submitted = []
    for job in jobs:
        try:
            submitted.append((job.source, plane.submit(None, job.spec, job.images)))
        except ServiceError as err:
            # Earlier jobs of this batch are queued already; cancel them so a refused batch leaves nothing running.
            for _, view in submitted:
                plane.cancel_job(None, view.id)
            print(f"ct2i.job: error: {job.source}: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
    for source, view in submitted:
        print(f"registered {view.id} {view.tenant}/{view.name} from {source}", flush=True)
    if args.no_wait:
        return 0

    get_or_create_scheduler(settings).wake.remote()

    def show(view) -> None:
        line = f"{view.id} {view.tenant}/{view.name}: {view.state}"
        if view.state == "queued" and view.queue_reason:
            line += f" ({view.queue_reason})"
        if view.progress.step:
            line += f" step {view.progress.step}/{view.progress.total_steps} loss {view.progress.loss:.4g}"
        print(line, flush=True)

    views = wait_for_terminal(lambda: [plane.get_job(None, view.id) for _, view in submitted],
                              poll_seconds=args.poll_seconds, on_change=show)
    rows = [["job", "tenant/name", "state", "steps", "adapter", "error"]]
    for view in views:
        rows.append([view.id, f"{view.tenant}/{view.name}", view.state, f"{view.progress.step or 0}/{view.progress.total_steps or 0}",
                     view.adapter_id or "-", (view.error or "")[:60]])
    print(_table(rows), flush=True)
    return 0 if all(view.state == "succeeded" for view in views) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
