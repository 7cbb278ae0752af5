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


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="demo folder (replaced on each run)")
    parser.add_argument("--steps", type=int, default=40, help="training steps on the tiny preset")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the Serve app")
    parser.add_argument("--keep-serving", action="store_true", help="leave the app running until Ctrl-C")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    os.environ["CT2I_HOME"] = str(out / "home")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only demo cluster; see docs/operators.md for auth
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray
    from openai import OpenAI
    from ray import serve

    from causalt2i.data.synthetic import write_synthetic_spec
    from cluster.cli_admin import read_spec_and_images
    from cluster.config import ControlPlaneSettings
    from cluster.scheduler import get_or_create_scheduler
    from cluster.service import ControlPlane
    from serve.app import build_app
    from tune.runner import ray_train_runner

    settings = ControlPlaneSettings.from_env()
    plane = ControlPlane.open(settings)
    say(f"control plane: {settings.database_url}, artifacts {settings.artifacts_uri}")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"CT2I_HOME": os.environ["CT2I_HOME"], "RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]}})
    try:
        plane.create_tenant("demo")
        key = plane.create_key("tenant", "demo", label="make demo").key
        say(f"tenant 'demo', API key {key}")

        spec_path = write_synthetic_spec(out / "subjects", tenant="demo", name="cat-dog", resolution=64, steps=args.steps,
                                         n_subjects=2, gpus_per_worker=0)
        spec, images = read_spec_and_images(spec_path)
        job = plane.submit("demo", spec, images)
        say(f"submitted {job.id} ({spec_path}); training on Ray Train with DeepSpeed ZeRO-2 on CPU")
        scheduler = get_or_create_scheduler(settings, ray_train_runner())
        scheduler.wake.remote()
        last = None
        while job.state not in ("succeeded", "failed", "cancelled"):
            time.sleep(1.0)
            job = plane.get_job("demo", job.id)
            line = f"{job.state} step {job.progress.step}/{job.progress.total_steps}"
            if job.progress.loss is not None:
                line += f" loss {job.progress.loss:.4f}"
            if line != last:
                say(line)
                last = line
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
