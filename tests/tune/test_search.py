"""Ray Tune search (tune/search.py): the score formula, the searcher and scheduler choices, the trial
records, and one real search of three trials through the control plane on a local Ray."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from causalt2i.atomic import sha256_file
from causalt2i.spec import ScoreWeights, SearchConfig, SpecError, parse_spec
from tests.tune.conftest import run_until_done, two_subject_spec
from tune.search import (
    EARLY_STOP_METRIC,
    PLOT_FILE,
    SCORE,
    SEARCH_FILE,
    build_scheduler,
    build_search_alg,
    check_search,
    read_search_record,
    search_run_name,
    searcher_kind,
    trial_records,
    trial_score,
)

METRICS = {"clip_i": 0.8, "clip_t": 0.3, "kid": 0.2, "lpips": 0.6}


def _spec(search: dict | None = None, **train):
    data, _ = two_subject_spec("acme", "cat-dog", steps=train.pop("steps", 8), **train)
    if search is not None:
        data["search"] = search
    return parse_spec(data, check_files=False)


# ------------------------------------------------------------------------------------ the alpha axis


def test_under_alpha_auto_the_search_samples_a_multiplier_of_the_calibrated_alpha():
    from tune.search import param_space, trial_spec

    auto = _spec({})
    assert auto.alpha_axis[0] == "alpha_scale" and auto.alpha_axis[1].loguniform == (0.1, 10.0)
    assert set(param_space(auto)) == {"alpha_scale", "lambda_attn", "guidance_scale"}
    trial = trial_spec(auto, {"alpha_scale": 2.5, "lambda_attn": 0.5, "guidance_scale": 5.0})
    assert trial.train.alpha == "auto" and trial.train.alpha_scale == 2.5 and trial.search is None
    fixed = _spec({}, alpha=1e-3)
    assert fixed.alpha_axis[0] == "alpha" and set(param_space(fixed)) == {"alpha", "lambda_attn", "guidance_scale"}
    trial = trial_spec(fixed, {"alpha": 5e-3, "lambda_attn": 0.5, "guidance_scale": 5.0})
    assert trial.train.alpha == 5e-3 and trial.train.alpha_scale == 1.0


@pytest.mark.parametrize(("search", "train", "field"), [
    ({"alpha": {"loguniform": [1e-4, 1e-2]}}, {}, "search.alpha"),  # absolute α next to auto: the calibration thrown away
    ({"alpha_scale": {"loguniform": [0.1, 10]}}, {"alpha": 1e-3}, "search.alpha_scale"),
    (None, {"alpha": 1e-3, "alpha_scale": 2.0}, "train.alpha_scale"),
])
def test_an_alpha_axis_that_does_not_fit_train_alpha_is_refused_naming_the_field(search, train, field):
    with pytest.raises(SpecError) as err:
        _spec(search, **train)
    assert err.value.field == field


# ------------------------------------------------------------------------------------ score formula


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({}, 0.8 + 0.3 - 0.2),  # the default: CLIP-I + CLIP-T - KID
        ({"clip_i": 2.0, "clip_t": 0.0, "kid": 0.0}, 1.6),
        ({"clip_i": 0.0, "clip_t": 0.0, "kid": -0.5, "lpips": 1.0}, -0.1 + 0.6),
        ({"lpips": 0.25}, 0.8 + 0.3 - 0.2 + 0.15),
    ],
)
def test_trial_score_is_the_weighted_sum_of_the_metrics(weights, expected):
    assert trial_score(METRICS, ScoreWeights(**weights)) == pytest.approx(expected, abs=1e-12)


def test_an_unweighted_missing_metric_is_ignored_and_a_weighted_one_is_an_error_naming_it():
    metrics = {**METRICS, "kid": None}
    assert trial_score(metrics, ScoreWeights(kid=0.0)) == pytest.approx(1.1, abs=1e-12)
    with pytest.raises(ValueError, match=r"search\.score\.kid"):
        trial_score(metrics, ScoreWeights())
    with pytest.raises(ValueError, match=r"search\.score\.clip_t"):
        trial_score({**METRICS, "clip_t": math.nan}, ScoreWeights())


def test_a_search_whose_eval_set_cannot_give_a_weighted_kid_is_refused_up_front():
    small = {"eval_prompts": 1, "eval_seeds": [0]}
    with pytest.raises(SpecError) as err:
        check_search(_spec(small))
    assert err.value.field == "search.score.kid"
    assert check_search(_spec({**small, "score": {"kid": 0.0}})).eval_seeds == [0]
    assert check_search(_spec({"eval_prompts": 1, "eval_seeds": [0, 1]})).eval_prompts == 1


def test_negative_loss_weight_bounds_and_all_zero_weights_are_refused_naming_the_field():
    with pytest.raises(SpecError) as err:
        check_search(_spec({"lambda_attn": {"uniform": [-1.0, 1.0]}}))
    assert err.value.field == "search.lambda_attn"
    with pytest.raises(SpecError) as err:
        check_search(_spec({"score": {"clip_i": 0, "clip_t": 0, "kid": 0, "lpips": 0}}))
    assert err.value.field == "search.score"


# ------------------------------------------------------------------------------- searcher, scheduler


@pytest.mark.parametrize(
    ("asked", "optuna_available", "expected"),
    [("auto", True, "optuna"), ("auto", False, "random"), ("optuna", True, "optuna"), ("random", True, "random"),
     ("random", False, "random")],
)
def test_searcher_is_optuna_when_installed_and_allowed_else_random(asked, optuna_available, expected):
    assert searcher_kind(SearchConfig(searcher=asked), optuna_available=optuna_available) == expected


def test_asking_for_optuna_without_it_is_a_spec_error():
    with pytest.raises(SpecError) as err:
        searcher_kind(SearchConfig(searcher="optuna"), optuna_available=False)
    assert err.value.field == "search.searcher"


def test_search_algorithms_are_capped_at_max_concurrent():
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    optuna = build_search_alg(SearchConfig(max_concurrent=3), seed=0, optuna_available=True)
    assert isinstance(optuna, ConcurrencyLimiter) and isinstance(optuna.searcher, OptunaSearch)
    assert optuna.max_concurrent == 3 and optuna.searcher.metric == SCORE and optuna.searcher.mode == "max"
    random = build_search_alg(SearchConfig(max_concurrent=2, searcher="random"), seed=0)
    assert isinstance(random, BasicVariantGenerator) and random.max_concurrent == 2


def test_asha_stops_a_weak_trial_at_a_rung_but_never_one_that_reached_the_last_step():
    from ray.tune.schedulers import TrialScheduler

    scheduler = build_scheduler(_spec({"grace_period": 2}, steps=8))
    strong, weak = SimpleNamespace(trial_id="strong"), SimpleNamespace(trial_id="weak")
    for trial in (strong, weak):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, strong, {"step": 2, EARLY_STOP_METRIC: 0.1}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, weak, {"step": 2, EARLY_STOP_METRIC: 0.9}) == TrialScheduler.STOP
    # At the last step the trial still has to be scored: reaching max_t must not stop it.
    assert scheduler.on_trial_result(None, strong, {"step": 8, EARLY_STOP_METRIC: 0.5}) == TrialScheduler.CONTINUE


def test_trial_records_tell_finished_early_stopped_and_failed_trials_apart():
    config = {"alpha": 1e-3, "lambda_attn": 1.0, "guidance_scale": 5.0}
    finished = SimpleNamespace(config=config, error=None, path="/x/t1", metrics={
        "trial_id": "t1", SCORE: 0.5, "step": 8, EARLY_STOP_METRIC: 0.2, **{f"eval_{k}": v for k, v in METRICS.items()}})
    stopped = SimpleNamespace(config=config, error=None, path="/x/t2",
                              metrics={"trial_id": "t2", SCORE: math.nan, "step": 2, EARLY_STOP_METRIC: 0.9})
    failed = SimpleNamespace(config=config, error=RuntimeError("boom"), path="/x/t3", metrics={})
    records = trial_records([finished, stopped, failed])
    assert [r.status for r in records] == ["finished", "early-stopped", "error"]
    assert [r.trial_id for r in records] == ["t1", "t2", "t3"]
    assert records[0].score == 0.5 and records[0].metrics["kid"] == 0.2
    assert records[1].score is None and records[1].step == 2
    assert "boom" in records[2].error


# --------------------------------------------------------------------------- a real search, end to end


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_search_of_three_trials_publishes_the_best_trials_adapter_with_its_record(ray_cluster, settings, plane, tmp_path):
    """Through the control plane and the Ray Train runner, with trials that train in process (a TorchTrainer per
    trial is covered by tests/tune/test_ray_train.py's run of the same builder)."""
    from causalt2i.adapter import load_adapter
    from cluster.scheduler import Scheduler
    from tune.runner import RayTrainFn, ray_train_runner
    from tune.train_run import storage_path

    plane.create_tenant("acme")
    spec, images = two_subject_spec("acme", "cat-dog", steps=2, checkpoint_every=1, num_workers=1)
    # grace_period = steps: ASHA may not stop a trial here, so all three are scored (its stopping rule is
    # tested above without Ray).
    spec["search"] = {"num_samples": 3, "max_concurrent": 2, "alpha_scale": {"loguniform": [0.1, 10.0]},
                      "lambda_attn": {"uniform": [0.1, 2.0]}, "guidance_scale": {"choice": [1.0, 5.0]},
                      "eval_prompts": 1, "eval_seeds": [0, 1], "eval_steps": 2, "grace_period": 2}
    job = plane.submit("acme", spec, images)
    run_until_done(Scheduler(settings, ray_train_runner(RayTrainFn(trials="in_process"))), plane, [job.id], timeout=840)

    done = plane.get_job("acme", job.id)
    assert done.state == "succeeded", done.error
    local = tmp_path / "published"
    plane.store.fetch_dir("acme", ("adapters", done.adapter_id), local)
    record = read_search_record(local)
    assert record.run == search_run_name("acme", job.id) and record.searcher == "optuna"
    assert len(record.trials) == 3 and len({t.trial_id for t in record.trials}) == 3
    for trial in record.trials:
        assert trial.status == "finished", trial
        assert 0.1 <= trial.config["alpha_scale"] <= 10.0 and 0.1 <= trial.config["lambda_attn"] <= 2.0
        assert trial.config["guidance_scale"] in (1.0, 5.0)
        assert trial.score == pytest.approx(trial_score(trial.metrics, record.score_weights), abs=1e-9)
    best = max(record.trials, key=lambda t: t.score)
    assert record.best_trial_id == best.trial_id and record.best_score == best.score

    adapter = load_adapter(local)
    assert adapter.manifest.training["alpha_scale"] == best.config["alpha_scale"] and adapter.manifest.alpha > 0
    assert adapter.manifest.training["lambda_attn"] == best.config["lambda_attn"]
    experiment = Path(storage_path(settings.artifacts_uri)) / record.run
    trial_weights = list(experiment.glob(f"*{best.trial_id}*/checkpoint_*/adapter/adapter.safetensors"))
    assert done.progress.step == 3 and done.progress.total_steps == 3  # a search's progress counts trials
    assert len(trial_weights) == 1, f"expected the best trial's own checkpoint under {experiment}"
    assert sha256_file(local / "adapter.safetensors") == sha256_file(trial_weights[0])

    with Image.open(io.BytesIO((local / PLOT_FILE).read_bytes())) as plot:
        assert plot.format == "PNG" and plot.width >= 300 and plot.height >= 200
    assert json.loads((local / SEARCH_FILE).read_text())["best_trial_id"] == best.trial_id


def test_the_fence_stopper_stops_the_run_when_the_fence_does_and_its_pickled_copy_never_does():
    import pickle
    import threading

    from tune.search import FenceStopper

    lost = threading.Event()
    ctx = SimpleNamespace(cancelled=lost.is_set, lock=threading.Lock())  # a lock does not pickle
    stopper = FenceStopper(ctx)
    assert stopper.stop_all() is False and stopper("trial", {}) is False
    lost.set()
    assert stopper.stop_all() is True
    assert pickle.loads(pickle.dumps(stopper)).stop_all() is False
