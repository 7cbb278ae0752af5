"""A plain (non-search) tuning with `evaluation:` publishes its evaluation report with its adapter: `report.png` and
`metrics.json` (CLIP-I, CLIP-T, KID, LPIPS from `causalt2i.evaluate`), downloadable by its tenant only. Real trainer,
tiny preset, in this process (InlineRunner)."""

from __future__ import annotations

import io
import json
import time

from fastapi.testclient import TestClient
from PIL import Image

from cluster.api import create_app
from cluster.runner import InlineRunner
from cluster.scheduler import Scheduler
from tests.tune.conftest import two_subject_spec


def _run(plane, spec, images):
    job = plane.submit("acme", spec, images)
    scheduler = Scheduler(plane.settings, InlineRunner(), capacity_gpus=4)
    deadline = time.time() + 600
    while time.time() < deadline and plane.get_job(None, job.id).state not in ("succeeded", "failed", "cancelled"):
        scheduler.tick()
        time.sleep(0.1)
    done = plane.get_job("acme", job.id)
    assert done.state == "succeeded", done.error
    return done


def test_a_plain_tuning_with_evaluation_publishes_report_and_metrics_with_its_adapter(plane):
    plane.create_tenant("acme")
    plane.create_tenant("rival")
    spec, images = two_subject_spec("acme", "pets", steps=1, checkpoint_every=1, preview_every=0)
    spec["evaluation"] = {"prompts": 1, "seeds": [0, 1], "steps": 2}
    done = _run(plane, spec, images)
    keys = {t: plane.create_key("tenant", t).key for t in ("acme", "rival")}
    with TestClient(create_app(plane=plane, notify=lambda _job: None)) as client:
        files = {}
        for name in ("report.png", "metrics.json"):
            response = client.get(f"/v1/adapters/{done.adapter_id}/files/{name}",
                                  headers={"Authorization": f"Bearer {keys['acme']}"})
            assert response.status_code == 200, response.text
            files[name] = response.content
            other = client.get(f"/v1/adapters/{done.adapter_id}/files/{name}",
                               headers={"Authorization": f"Bearer {keys['rival']}"})
            assert other.status_code == 404
    metrics = json.loads(files["metrics.json"])
    overall = metrics["overall"]
    for key in ("clip_i", "clip_t", "lpips"):
        assert isinstance(overall[key], float), (key, overall)
    assert [row["seeds"] for row in metrics["prompts"]] == [[0, 1]]
    assert all(token in metrics["prompts"][0]["prompt"] for token in ("<s1>", "<v1>"))
    with Image.open(io.BytesIO(files["report.png"])) as report:
        assert report.format == "PNG" and report.size[0] > 64

