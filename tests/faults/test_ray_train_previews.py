"""Training previews on the Ray Train path, and the Train switches of a search's Ray Train trials (here, not in
`make test`: one DeepSpeed worker start and a two-step run took 210 s to 333 s (plus 40 to 90 s of Ray start-up) on
the loaded 2-core box, 2026-12-02; `make cluster-faults` runs it).

Rank 0 of the worker group renders the previews at the steps the in-process trainer renders them, and they are
published with the job through the attempt's sink, exactly as the in-process trainer's callback publishes them:
store folder, `preview at step N` event, `GET /v1/tunings/{id}/previews`. The workers' diagnostics reach the job
as the in-process trainer's do, and `evaluation:` publishes report.png and metrics.json with the adapter.

What is not claimed: byte equality with the same spec trained in process. Measured on that box, the PNGs differ
from step 1 on: the Ray Train worker trains through DeepSpeed ZeRO-2 (its optimizer step over flattened fp32
partitions, gradients reduced through gloo) with one torch thread, the in-process trainer with its own AdamW
step and the process's threads, so the weights differ in the last bits and the sampler carries that into the
pixels. What is claimed, and asserted: the previews are produced and published on this path, and the render is
deterministic (`tests/causalt2i/test_preview.py`: the same weights, step and seed give the same bytes), so a
worker restarted from a checkpoint re-renders the bytes already published for a step (kept as they are).
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from cluster.api import job_previews
from cluster.scheduler import Scheduler
from tests.faults.conftest import actors_created
from tests.tune.conftest import plane, run_until_done, settings, two_subject_spec  # noqa: F401 (fixtures)
from tune.runner import ray_train_runner

pytestmark = [pytest.mark.timeout(900), pytest.mark.usefixtures("ray_cluster")]


def test_a_ray_train_run_publishes_its_previews_with_the_job(settings, plane):
    plane.create_tenant("acme")
    spec, images = two_subject_spec("acme", "on-ray", steps=2, checkpoint_every=2, num_workers=1, preview_every=1)
    spec["evaluation"] = {"prompts": 1, "seeds": [0, 1], "steps": 2}  # evaluated in a task with a worker's resources
    job_id = plane.submit("acme", spec, images).id
    watchers_before = actors_created("PreemptionWatcher")
    run_until_done(Scheduler(settings, ray_train_runner()), plane, [job_id], timeout=800)
    # One fixed node (scheduler.preemption_watcher `auto`): a drain would take the controller too, so the run
    # starts no watcher (its fresh process cost 1-3.6 s of the time to step 1 here; tests/faults/test_node_loss.py
    # shows one started where there are two nodes).
    assert actors_created("PreemptionWatcher") == watchers_before

    job = plane.get_job("acme", job_id)
    assert job.state == "succeeded", job.error
    previews = job_previews(plane, "acme", job_id)
    assert [p.step for p in previews] == [1, 2]
    assert all(p.prompts == ["a <s1> cat and a <v1> dog", "a <s1> cat", "a <v1> dog"] for p in previews)
    events = plane.job_events("acme", job_id)
    assert [e.data["step"] for e in events if e.message.startswith("preview at step")] == [1, 2]
    assert any(e.message == "diagnostics at step 2" and e.data["diagnostics"] for e in events)
    pngs = {}
    for preview in previews:
        for path in preview.files:
            name = path.rsplit("/", 1)[1]
            pngs[(preview.step, name)] = data = plane.store.read_file(
                "acme", ("jobs", job_id, "previews", f"step-{preview.step:06d}"), name)
            with Image.open(io.BytesIO(data)) as image:
                assert image.format == "PNG" and image.size == (preview.width, preview.height)
    assert len(pngs) == 6
    # The evaluation ran on this path too and was published with the adapter.
    import json

    published = json.loads(plane.adapter_file("acme", job.adapter_id, "metrics.json"))
    assert isinstance(published["overall"]["clip_t"], float)
    with Image.open(io.BytesIO(plane.adapter_file("acme", job.adapter_id, "report.png"))) as report:
        assert report.format == "PNG"


@pytest.mark.parametrize(("watcher", "watchers_per_trial"), [("auto", 0), ("on", 1)])
def test_a_searchs_train_trials_get_the_platforms_train_switches(settings, plane, watcher, watchers_per_trial):
    """Each `trials: ray_train` trial is a TorchTrainer started from the trial's own process, not the fit task that
    sets a job's `RAY_TRAIN_*` switches: `tune.search.run_trial` sets them there. Shown by the preemption watcher on
    this one node: none under `auto`, one per trial when it is switched `on` (so the count can see a watcher)."""
    from tune.runner import RayTrainFn
    from tune.search import read_search_record

    switched = settings.model_copy(update={"scheduler": settings.scheduler.model_copy(update={"preemption_watcher": watcher})})
    plane.create_tenant("acme")
    spec, images = two_subject_spec("acme", f"search-{watcher}", steps=2, checkpoint_every=2, num_workers=1)
    spec["search"] = {"num_samples": 1, "max_concurrent": 1, "alpha_scale": {"loguniform": [0.5, 2.0]},
                      "lambda_attn": {"uniform": [0.5, 1.5]}, "guidance_scale": {"choice": [5.0]},
                      "eval_prompts": 1, "eval_seeds": [0, 1], "eval_steps": 2, "grace_period": 2}
    job_id = plane.submit("acme", spec, images).id
    watchers_before = actors_created("PreemptionWatcher")
    run_until_done(Scheduler(switched, ray_train_runner(RayTrainFn(trials="ray_train"))), plane, [job_id], timeout=800)

    job = plane.get_job("acme", job_id)
    assert job.state == "succeeded", job.error
    assert actors_created("PreemptionWatcher") - watchers_before == watchers_per_trial
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as scratch:
        plane.store.fetch_dir("acme", ("adapters", job.adapter_id), Path(scratch))
        record = read_search_record(Path(scratch))
    assert [t.status for t in record.trials] == ["finished"]
