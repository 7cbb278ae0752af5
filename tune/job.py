"""Batch tuning entrypoint for the Ray job CLI.

    ray job submit --working-dir . -- python -m tune.job SPEC_OR_BATCH.yaml [--create-tenants]

The argument is one spec, a batch file (`jobs: [spec, spec, ...]`, each entry a spec mapping or the
path of a spec file), or a folder of spec files (`*.yaml`, `*.yml`). Every spec is validated before
anything is registered: one bad spec fails the whole submission with its field named, and nothing is
stored. Each job is then registered with the control plane (its images uploaded with it), the
scheduler admits them within each tenant's quota and fair share, and this driver prints a line per job
whenever its state or step changes, a final table, and exits 1 if any job failed.

Image paths in a spec are relative to the spec file (for a batch file: to the batch file). The
control plane is found from the environment (CT2I_HOME, CT2I_DATABASE_URL, CT2I_ARTIFACTS).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from causalt2i.spec import SpecError, parse_spec

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class PreparedJob:
    source: str  # where the spec came from, for messages
    spec: dict  # as uploaded: image names replaced by upload keys
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
            parse_spec(data, base_dir=base)
        except SpecError as err:
            raise SpecError(err.field, f"{label}: {err.message}") from None
        upload = {**data, "subjects": []}
        images: dict[str, bytes] = {}
        for i, subject in enumerate(data["subjects"]):
            names = []
            for j, image in enumerate(subject["images"]):
                source = Path(image) if Path(image).is_absolute() else base / image
                name = f"s{i}-{j}{source.suffix.lower()}"
                images[name] = source.read_bytes()
                names.append(name)
            upload["subjects"].append({**subject, "images": names})
        prepared.append(PreparedJob(source=label, spec=upload, images=images))
    return prepared


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune.job", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", type=Path, help="a spec, a batch file (jobs: [...]) or a folder of specs")
    parser.add_argument("--create-tenants", action="store_true", help="create tenants that do not exist yet (default quotas)")
    parser.add_argument("--no-wait", action="store_true", help="register the jobs and exit without waiting")
    parser.add_argument("--poll-seconds", type=float, default=2.0)
    args = parser.parse_args(argv)

    try:
        jobs = prepare(args.specs)
    except SpecError as err:
        print(f"tune.job: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT

    import ray

    from cluster.config import ControlPlaneSettings
    from cluster.scheduler import get_or_create_scheduler
    from cluster.service import ControlPlane, NotFound, ServiceError
    from tune.runner import ray_train_runner

    settings = ControlPlaneSettings.from_env()
    plane = ControlPlane.open(settings)
    tenants = {job.spec["tenant"] for job in jobs}
    known = {t.name for t in plane.list_tenants()}
    missing = sorted(tenants - known)
    if missing and not args.create_tenants:
        print(f"tune.job: error: tenant: no tenant {', '.join(missing)}; create it with `ct2i tenants create NAME` or pass --create-tenants", file=sys.stderr)
        return EXIT_BAD_INPUT
    for tenant in missing:
        plane.create_tenant(tenant)

    submitted = []
    for job in jobs:
        try:
            submitted.append((job.source, plane.submit(None, job.spec, job.images)))
        except (NotFound, ServiceError) as err:
            # Earlier jobs of this batch are queued already; cancel them so a refused batch leaves nothing running.
            for _, view in submitted:
                plane.cancel_job(None, view.id)
            print(f"tune.job: error: {job.source}: {getattr(err, 'field', '')}: {err}".replace(": : ", ": "), file=sys.stderr)
            return EXIT_BAD_INPUT
    for source, view in submitted:
        print(f"registered {view.id} {view.tenant}/{view.name} from {source}", flush=True)
    if args.no_wait:
        return 0

    if not ray.is_initialized():
        ray.init(address="auto", namespace=settings.ray_namespace)
    scheduler = get_or_create_scheduler(settings, ray_train_runner())
    scheduler.wake.remote()

    last: dict[str, str] = {}
    while True:
        views = [plane.get_job(None, view.id) for _, view in submitted]
        for view in views:
            line = f"{view.id} {view.tenant}/{view.name}: {view.state}"
            if view.state == "queued" and view.queue_reason:
                line += f" ({view.queue_reason})"
            if view.progress.step:
                line += f" step {view.progress.step}/{view.progress.total_steps} loss {view.progress.loss:.4g}"
            if last.get(view.id) != line:
                print(line, flush=True)
                last[view.id] = line
        if all(view.state in TERMINAL for view in views):
            break
        time.sleep(args.poll_seconds)

    rows = [["job", "tenant/name", "state", "steps", "adapter", "error"]]
    for view in views:
        rows.append([view.id, f"{view.tenant}/{view.name}", view.state, f"{view.progress.step or 0}/{view.progress.total_steps or 0}",
                     view.adapter_id or "-", (view.error or "")[:60]])
    print(_table(rows), flush=True)
    return 0 if all(view.state == "succeeded" for view in views) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
