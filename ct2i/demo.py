"""`make demo`: the whole platform on the embedded default, end to end, on this machine.

1. a local Ray (2 CPUs) and the control plane (SQLite and artifacts under demo-out/home);
2. a tenant and its API key;
3. two synthetic subjects submitted as a tuning job, run on Ray Train (DeepSpeed on CPU, tiny preset);
4. the Ray Serve app on http://127.0.0.1:PORT, serving the published adapter;
5. an `openai` client call to /v1/images/generations, and the PNG written to demo-out/.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path("demo-out")
PROMPT = "a <s1> cat and a <v1> dog in a garden"
MARKER = ".ct2i-demo"
"""A file the demo writes into the folder it creates: only a folder holding it is ever removed by a later run."""


class ForeignFolder(Exception):
    """`--out` names a folder the demo did not make: it is left as it is."""


def prepare_out(out: Path) -> None:
    """Make `out` an empty demo folder: create it (with the marker), or clear one an earlier run made.

    A folder without the marker (a user's own folder, `~`, `/`) is never removed, nor is anything that is not a
    plain folder (a file, a symbolic link): `ForeignFolder`. An existing empty folder is adopted, as nothing in it
    can be lost."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ForeignFolder(f"{out} exists and is not a folder the demo made; choose another --out")
    if out.exists() and any(out.iterdir()):
        marker = out / MARKER
        if marker.is_symlink() or not marker.is_file():
            raise ForeignFolder(f"refusing to remove {out}: the demo did not create it (no {MARKER} marker inside); "
                                "choose another --out, or remove the folder yourself")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `python -m ct2i.demo`; a later run removes this folder and all it holds\n")


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ct2i.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="demo folder: created with a marker file; a later run replaces only a folder carrying that marker")
    parser.add_argument("--steps", type=int, default=40, help="training steps on the tiny preset")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the Serve app")
    parser.add_argument("--keep-serving", action="store_true", help="leave the app running until Ctrl-C")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    out = args.out.resolve()
    try:
        prepare_out(out)
    except ForeignFolder as err:
        say(str(err))
        return 2
    os.environ["CT2I_HOME"] = str(out / "home")
    from ct2i.cli_serve import local_ray_auth, local_ray_binding, restrict_token_file

    from cluster.config import ControlPlaneSettings

    settings = ControlPlaneSettings()
    # Both before `import ray`, which reads them once.
    ray_auth = local_ray_auth()  # token auth on (Ray's token file), unless the operator turned it off
    ray_binding = local_ray_binding(settings)  # loopback only, unless the operator set CT2I_RAY_BIND_HOST
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray
    from openai import OpenAI
    from ray import serve

    from causalt2i.data.synthetic import write_synthetic_spec
    from cluster.client import read_spec_and_images, wait_for_terminal
    from cluster.service import ControlPlane
    from ct2i.scheduler import get_or_create_scheduler
    from serve.app import build_app

    plane = ControlPlane.open(settings)
    say(f"control plane: {settings.database_url}, artifacts {settings.artifacts_uri}")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"CT2I_HOME": os.environ["CT2I_HOME"]}}, **ray_binding)
    restrict_token_file()
    say(f"Ray on {settings.ray_bind_host} (GCS {ray.get_runtime_context().gcs_address}), {ray_auth}")
    try:
        plane.create_tenant("demo")
        key = plane.create_key("tenant", "demo", label="make demo").key
        say(f"tenant 'demo', API key {key}")

        spec_path = write_synthetic_spec(out / "subjects", tenant="demo", name="cat-dog", resolution=64, steps=args.steps,
                                         n_subjects=2, gpus_per_worker=0)
        spec, images = read_spec_and_images(spec_path)
        job = plane.submit("demo", spec, images)
        say(f"submitted {job.id} ({spec_path}); training on Ray Train with DeepSpeed ZeRO-2 on CPU")
        get_or_create_scheduler(settings).wake.remote()

        def show(view) -> None:
            line = f"{view.state} step {view.progress.step}/{view.progress.total_steps}"
            if view.progress.loss is not None:
                line += f" loss {view.progress.loss:.4f}"
            say(line)

        job = wait_for_terminal(lambda: plane.get_job("demo", job.id), on_change=show)
        if job.state != "succeeded":
            say(f"the tuning job {job.state}: {job.error}")
            return 1
        adapter = plane.get_adapter("demo", job.adapter_id)
        say(f"published adapter {adapter.tenant}/{adapter.name} v{adapter.version} ({adapter.id})")

        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_app(settings, generator_options={"ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0}},
                            ingress_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}),
                  name="ct2i", route_prefix="/")
        base_url = f"http://127.0.0.1:{args.port}"
        say(f"serving on {base_url} (web page {base_url}/, API docs {base_url}/docs)")

        client = OpenAI(base_url=f"{base_url}/v1", api_key=key)
        response = client.images.generate(model="demo/cat-dog", prompt=PROMPT, n=1, size="64x64", response_format="b64_json",
                                          extra_body={"steps": 20, "guidance_scale": 7.5, "seed": 0})
        image_path = out / "cat-dog.png"
        image_path.write_bytes(base64.b64decode(response.data[0].b64_json))
        say(f"openai client: '{PROMPT}' -> {image_path}")
        say(f"done in {time.perf_counter() - started:.0f} s")
        say(f"data: {out / 'home'}; subjects and spec: {spec_path.parent}")
        if args.keep_serving:
            say("serving until Ctrl-C")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
