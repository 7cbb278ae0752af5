"""Training previews published with the job: the runner's sink publishes them, `GET /v1/tunings/{id}/previews`
lists them for the job's tenant only, and `ct2i jobs previews` writes the grid."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from cluster.client import HttpAPI
from cluster.runner import ProgressSink
from tests.cluster.conftest import png_bytes, spec_dict
from tests.cluster.test_api import auth, submit_json

PROMPTS = ["a <s1> cat"]


@pytest.fixture
def keys(plane):
    plane.create_tenant("alice")
    plane.create_tenant("bob")
    return {"alice": plane.create_key("tenant", "alice").key, "bob": plane.create_key("tenant", "bob").key}


def write_preview(root, step: int, color) -> "Path":
    """A folder in the trainer's preview layout (`causalt2i.preview.render_preview`)."""
    folder = root / f"step-{step:06d}"
    folder.mkdir(parents=True)
    (folder / "00.png").write_bytes(png_bytes(64, color))
    (folder / "preview.json").write_text(json.dumps({"step": step, "seed": 0, "prompts": PROMPTS, "files": ["00.png"],
                                                     "width": 64, "height": 64, "sampling_steps": 12, "guidance": 5.0}))
    return folder


def test_previews_are_published_listed_and_downloaded_by_their_tenant_only(plane, client, keys, tmp_path):
    job = submit_json(client, keys["alice"], "alice").json()
    assert client.get(f"/v1/tunings/{job['id']}/previews", headers=auth(keys["alice"])).json() == []
    sink = ProgressSink(plane.settings, job["id"], "alice", attempt=1)
    sink.on_preview(2, write_preview(tmp_path / "run", 2, (10, 200, 10)))
    sink.on_preview(4, write_preview(tmp_path / "run", 4, (10, 10, 200)))
    sink.on_preview(4, tmp_path / "run" / "step-000004")  # a retried attempt: already published, kept
    (tmp_path / "run" / "step-000006").mkdir()
    sink.on_preview(6, tmp_path / "run" / "step-000006")  # no preview.json: incomplete, not published

    listed = client.get(f"/v1/tunings/{job['id']}/previews", headers=auth(keys["alice"]))
    assert listed.status_code == 200
    body = listed.json()
    assert [p["step"] for p in body] == [2, 4] and body[0]["prompts"] == PROMPTS
    image = client.get(body[1]["files"][0], headers=auth(keys["alice"]))
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).getpixel((0, 0)) == (10, 10, 200)

    for path in (f"/v1/tunings/{job['id']}/previews", body[0]["files"][0]):
        other = client.get(path, headers=auth(keys["bob"]))
        assert other.status_code == 404 and other.json()["detail"]["field"] == "id"
    missing = client.get(f"/v1/tunings/{job['id']}/previews/8/00.png", headers=auth(keys["alice"]))
    assert missing.status_code == 404 and missing.json()["detail"]["field"] == "filename"
    assert client.get(f"/v1/tunings/{job['id']}/previews/2/..%2Fx.png", headers=auth(keys["alice"])).status_code in (404, 422)


def test_cli_writes_a_grid_of_steps_by_prompts(plane, client, keys, tmp_path, monkeypatch, capsys):
    from ct2i.cli_platform import cmd_jobs_previews

    job = submit_json(client, keys["alice"], "alice").json()
    sink = ProgressSink(plane.settings, job["id"], "alice", attempt=1)
    for step, color in ((2, (250, 0, 0)), (4, (0, 0, 250))):
        sink.on_preview(step, write_preview(tmp_path / "run", step, color))
    api = HttpAPI("http://testserver", keys["alice"], client=client)
    monkeypatch.setattr("ct2i.cli_platform.api_for", lambda args: api)

    class Args:
        job_id, out, cell, json = job["id"], str(tmp_path / "out" / "grid.png"), 32, False

    assert cmd_jobs_previews(Args) == 0
    grid = Image.open(tmp_path / "out" / "grid.png").convert("RGB")
    # Two rows (steps 2 then 4), one column: the cells' centres carry the steps' colours.
    reds = [y for y in range(grid.height) if grid.getpixel((grid.width - 20, y)) == (250, 0, 0)]
    blues = [y for y in range(grid.height) if grid.getpixel((grid.width - 20, y)) == (0, 0, 250)]
    assert reds and blues and max(reds) < min(blues)
    assert "1 prompt(s)" in capsys.readouterr().out
