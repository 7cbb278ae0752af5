"""Ray Tune search over α, λ_attn and the inference guidance scale, from a spec's `search:` section.

One Tune run per job, named `<tenant>--<job>-search` under the Ray Train storage. Each trial is a Tune
*function* trainable that trains the trial's spec one of two ways (`trials`):

1. **Train.** `ray_train` (the production path): `build_torch_trainer` with the trial's α and λ_attn in
   `spec.train` (Ray Train V2 cannot be passed to `Tuner` itself); its `RunConfig` carries a
   `TuneReportCallback`, so every report of the Train workers (at each checkpoint, and every few steps)
   becomes a Tune result of the trial. `in_process`: the method-core trainer inside the trial, reporting
   each checkpoint's losses to Tune itself (one box, no Train start-up per trial).
2. **Score.** The trial's adapter generates `eval_prompts` paper-style prompts × `eval_seeds` at
   `eval_steps` DPM-Solver++ steps and the trial's guidance scale (`causalt2i.evaluate.evaluate_adapter`),
   and its score is `trial_score` below. The scoring runs as a Ray task holding the resources of one
   Train worker (the GPU on a GPU cluster), after the Train workers have released theirs.
3. **Report.** The final `tune.report` carries the score and a checkpoint holding `adapter/` and the
   evaluation's `eval/metrics.json`.

**Trial score** (higher is better; the weights are `search.score` in the spec):

    score = w_clip_i·CLIP-I + w_clip_t·CLIP-T + w_kid·KID + w_lpips·LPIPS

with the default weights (1, 1, −1, 0). CLIP-I is the per-subject mean of Eq. 14, CLIP-T is Eq. 16 with
the identifier tokens removed, KID is Eq. 15 per subject then averaged, LPIPS is the diversity of Eq. 17.
A metric whose weight is 0 is not needed; a weighted one that could not be computed fails the trial,
and `check_search` refuses up front a spec whose eval set is too small for a weighted KID.

**Early stopping.** The score exists only once a trial has finished, so ASHA cannot watch it. ASHA watches
`cdm`, the denoising loss L_cdm (Eq. 12) that the workers report at each checkpoint, against `step`, and
stops the trials whose L_cdm is in the worst part of a rung. It watches L_cdm, not the total loss: the
total is L_cdm + λ_attn·L_attn + α·L_cst, so it scales with the very weights being searched and would
favour small α and λ_attn for no reason of quality. `stop_last_trials=False`, so a trial that reaches
the last step is never stopped before it is scored. The best trial is picked by its final score.

**Searcher.** Optuna (TPE, seeded by `train.seed`) behind a `ConcurrencyLimiter(max_concurrent)` when
Optuna is installed and `searcher` is `auto` or `optuna`; Tune's random `BasicVariantGenerator` with the
same concurrency cap when `searcher: random` or Optuna is missing. `searcher: optuna` without Optuna is a
spec error. Optuna sees every intermediate result, so intermediate results carry `score = NaN`.

**Resources.** A trial function holds no CPU and no GPU: the Train workers hold what the spec's
`resources` section asks for. Tune's placement groups need a non-empty bundle, so a trial reserves one
byte of `memory`, which blocks nothing.

**Outputs.** The best trial's adapter is copied to `<run_dir>/adapter`, and `search.json` (every trial's
config, metrics, score and status: finished, early-stopped or error) and `search.png` (score against α,
log x-axis, best trial marked) are written beside `manifest.json`, so the control plane publishes them
with the adapter. The manifest itself is not touched; its `training` dict already records the best
trial's α and λ_attn.

**Cancellation.** A Tune `Stopper` polls the attempt's fence; when it says stop, Tune stops every trial
(the Train controllers and workers go with their trial actors) and `run_search` returns
`TrainResult(stopped_early=True)`.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import ray
from pydantic import BaseModel, ConfigDict
from ray.tune import Callback, Stopper

from causalt2i.atomic import atomic_write_bytes, atomic_write_text
from causalt2i.callbacks import StepInfo
from causalt2i.spec import Distribution, ScoreWeights, SearchConfig, SpecError, TuningSpec
from causalt2i.train_result import TrainResult
from cluster.config import MetricSettings
from cluster.evaluation import metric_suite_for
from cluster.progress_sink import ProgressSink
from cluster.runner import AttemptContext
from tune.train_run import ADAPTER_SUBDIR

SCORE = "score"
EARLY_STOP_METRIC = "cdm"
EARLY_STOP_TIME = "step"
# The α axis is `alpha_scale` (a multiplier of the calibrated α) under `alpha: auto`, else `alpha` (TuningSpec.alpha_axis).
SEARCHED = ("alpha", "alpha_scale", "lambda_attn", "guidance_scale")
SEARCH_FILE = "search.json"
PLOT_FILE = "search.png"
EVAL_SUBDIR = "eval"
SCORE_FORMULA = "score = clip_i*CLIP-I + clip_t*CLIP-T + kid*KID + lpips*LPIPS (weights: search.score; higher is better)"
# Tune's placement groups refuse an all-zero bundle; one byte of memory is a bundle that holds nothing back.
TRIAL_RESOURCES = {"cpu": 0, "memory": 1}
ASHA_REDUCTION_FACTOR = 2
TrialStatus = Literal["finished", "early-stopped", "error"]


def search_run_name(tenant: str, job_id: str) -> str:
    return f"{tenant}--{job_id}-search"


# ----------------------------------------------------------------------------------------- the spec


def check_search(spec: TuningSpec) -> SearchConfig:
    """Refuse, naming the field, a search that cannot produce a score; return the search section."""
    search = spec.search
    if search is None:
        raise SpecError("search", "this spec has no search section")
    alpha_name, alpha_distribution = spec.alpha_axis
    for name, distribution in ((alpha_name, alpha_distribution), ("lambda_attn", search.lambda_attn)):
        low, _ = distribution.bounds()
        if low < 0 or (name == "alpha_scale" and low == 0):
            raise SpecError(f"search.{name}", f"must stay above 0 (it weighs a loss), got {low}")
    if search.score.kid != 0:
        generated = search.eval_prompts * len(search.eval_seeds)
        fewest_references = min(len(subject.images) for subject in spec.subjects)
        if generated < 2 or fewest_references < 2:
            raise SpecError("search.score.kid", f"KID needs >= 2 generated and >= 2 reference images per subject; "
                                                f"eval_prompts x eval_seeds gives {generated} and the fewest references are "
                                                f"{fewest_references}; add seeds or set the kid weight to 0")
    if all(getattr(search.score, name) == 0 for name in ScoreWeights.model_fields):
        raise SpecError("search.score", "every weight is 0, so every trial would score 0")
    return search


def trial_spec(spec: TuningSpec, config: Mapping[str, Any]) -> TuningSpec:
    """The spec one trial trains: the trial's α (or multiplier of the calibrated α) and λ_attn, and no search
    section. Validated again, so a bad sampled value is an error naming the `train.` field."""
    data = spec.model_dump()
    alpha_name, _ = spec.alpha_axis
    data["train"].update({alpha_name: float(config[alpha_name]), "lambda_attn": float(config["lambda_attn"])})
    data["search"] = None
    return TuningSpec.model_validate(data)


def tune_domain(distribution: Distribution):
    from ray import tune

    if distribution.loguniform is not None:
        return tune.loguniform(*distribution.loguniform)
    if distribution.uniform is not None:
        return tune.uniform(*distribution.uniform)
    return tune.choice(list(distribution.choice))


def param_space(spec: TuningSpec) -> dict:
    alpha_name, alpha_distribution = spec.alpha_axis
    return {alpha_name: tune_domain(alpha_distribution), "lambda_attn": tune_domain(spec.search.lambda_attn),
            "guidance_scale": tune_domain(spec.search.guidance_scale)}


# -------------------------------------------------------------------------------- searcher, scheduler


def optuna_installed() -> bool:
    return importlib.util.find_spec("optuna") is not None


def searcher_kind(search: SearchConfig, *, optuna_available: bool | None = None) -> Literal["optuna", "random"]:
    """Optuna when asked for (`optuna`) or allowed (`auto`) and installed; random otherwise."""
    available = optuna_installed() if optuna_available is None else optuna_available
    if search.searcher == "random":
        return "random"
    if search.searcher == "optuna" and not available:
        raise SpecError("search.searcher", "optuna is not installed on this cluster; use `auto` or `random`")
    return "optuna" if available else "random"


def build_search_alg(search: SearchConfig, *, seed: int, optuna_available: bool | None = None):
    """The Tune search algorithm, capped at `max_concurrent` running trials."""
    if searcher_kind(search, optuna_available=optuna_available) == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(metric=SCORE, mode="max", seed=seed), max_concurrent=search.max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # BasicVariantGenerator is a SearchAlgorithm, not a Searcher, so it caps concurrency itself.
    return BasicVariantGenerator(max_concurrent=search.max_concurrent, random_state=seed)


def grace_period(spec: TuningSpec) -> int:
    search = spec.search
    steps = spec.total_steps
    chosen = search.grace_period if search and search.grace_period else max(1, steps // 4)
    return min(chosen, steps)


def build_scheduler(spec: TuningSpec):
    """ASHA on the denoising loss against the training step (see the module docstring for why)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if grace_period(spec) >= spec.total_steps:
        # ASHA always has a rung at the grace period; at the last step it would stop trials before they are
        # scored. With nothing left to stop early, run every trial to the end.
        return FIFOScheduler()
    return ASHAScheduler(time_attr=EARLY_STOP_TIME, metric=EARLY_STOP_METRIC, mode="min", max_t=spec.total_steps,
                         grace_period=grace_period(spec), reduction_factor=ASHA_REDUCTION_FACTOR, stop_last_trials=False)


# ------------------------------------------------------------------------------------------- scoring


def trial_score(metrics: Mapping[str, float | None], weights: ScoreWeights) -> float:
    """Σ_k w_k·m_k over clip_i, clip_t, kid, lpips; a metric with weight 0 is skipped (it may be None)."""
    total = 0.0
    for name in ScoreWeights.model_fields:
        weight = getattr(weights, name)
        if weight == 0:
            continue
        value = metrics.get(name)
        if value is None or not math.isfinite(value):
            raise ValueError(f"search.score.{name}: weighted {weight} but the metric is {value}; it could not be computed")
        total += weight * float(value)
    return total


def score_adapter(spec: TuningSpec, adapter_dir: Path, guidance_scale: float, out_dir: Path,
                  metrics: MetricSettings = MetricSettings()) -> dict:
    """Generate the search's small eval set with the adapter, and return its overall metrics and score."""
    import torch

    from causalt2i.adapter import load_adapter
    from causalt2i.data.images import load_reference_image
    from causalt2i.evaluate import EvalConfig, evaluate_adapter
    from causalt2i.generation import Generator
    from causalt2i.models import load_sdxl

    search = spec.search
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda and spec.base_model != "tiny" else None
    parts = load_sdxl(spec.base_model, image_encoder=spec.image_encoder, device=device, dtype=dtype)
    references = {subject.token: [load_reference_image(path) for path in subject.images] for subject in spec.subjects}
    config = EvalConfig(max_prompts=search.eval_prompts, seeds=list(search.eval_seeds), steps=search.eval_steps,
                        guidance=float(guidance_scale))
    report = evaluate_adapter(Generator(parts), load_adapter(adapter_dir), references,
                              metric_suite_for(spec.base_model, metrics, device), config, out_dir)
    metrics = report.overall.model_dump()
    return {"metrics": metrics, SCORE: trial_score(metrics, search.score)}


def _score_local(spec: TuningSpec, adapter_dir: Path, guidance_scale: float, metrics: MetricSettings) -> dict:
    with tempfile.TemporaryDirectory(prefix="ct2i-score-") as scratch:
        outcome = score_adapter(spec, adapter_dir, guidance_scale, Path(scratch) / EVAL_SUBDIR, metrics)
        outcome["report"] = (Path(scratch) / EVAL_SUBDIR / "metrics.json").read_text()
    return outcome


@ray.remote(max_retries=0)
def _score_task(spec: TuningSpec, adapter_checkpoint, guidance_scale: float, metrics: MetricSettings) -> dict:
    import torch

    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    with tempfile.TemporaryDirectory(prefix="ct2i-adapter-") as scratch:
        adapter_dir = Path(adapter_checkpoint.to_directory(str(Path(scratch) / ADAPTER_SUBDIR)))
        return _score_local(spec, adapter_dir, guidance_scale, metrics)


# ------------------------------------------------------------------------------------------- a trial


def _report_callback():
    from ray.tune.integration.ray_train import TuneReportCallback

    class SearchReportCallback(TuneReportCallback):
        """Forwards each Train report to Tune with `score = NaN`: Optuna reads the score from every result,
        and it is only known once the trial has been scored."""

        def after_report(self, run_context, metrics, checkpoint):
            super().after_report(run_context, [{**metrics[0], SCORE: math.nan}, *metrics[1:]], checkpoint)

    return SearchReportCallback()


def _final_report(scored: dict, final: dict, spec: TuningSpec, adapter_source) -> None:
    """The trial's last Tune result: its score and metrics, with a checkpoint of `adapter/` and the evaluation."""
    from ray import tune
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="ct2i-trial-") as scratch:
        folder = Path(scratch)
        adapter_source(folder / ADAPTER_SUBDIR)
        atomic_write_text(folder / EVAL_SUBDIR / "metrics.json", scored["report"])
        tune.report({SCORE: scored[SCORE], **{f"eval_{k}": v for k, v in scored["metrics"].items()},
                     EARLY_STOP_TIME: final.get(EARLY_STOP_TIME, spec.total_steps),
                     EARLY_STOP_METRIC: final.get(EARLY_STOP_METRIC, math.nan), "loss": final.get("loss", math.nan)},
                    checkpoint=Checkpoint.from_directory(str(folder)))


def run_trial(config: dict, *, spec: TuningSpec, storage: str, search_name: str, use_gpu: bool,
              metrics: MetricSettings, train_env: dict[str, str]) -> None:
    """The Tune function trainable of `trials: ray_train`: train one TorchTrainer, score its adapter, report.

    `train_env` holds the `RAY_TRAIN_*` switches a job's run gets (`tune.runner`: the worker-group start timeout, the
    preemption watcher). Ray Train hands its controller those of the process that calls `fit()`, here the trial's own
    process (a fresh one per trial, `reuse_actors=False`), so they are set in it."""
    from ray import tune
    from ray.train import Checkpoint

    from tune.train_run import build_torch_trainer

    os.environ.update(train_env)
    trial = trial_spec(spec, config)
    trial_id = tune.get_context().get_trial_id()
    trainer = build_torch_trainer(trial, name=f"{search_name}--{trial_id}", storage=storage, use_gpu=use_gpu,
                                  callbacks=[_report_callback()])
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"trial {trial_id}: the Train run reported no checkpoint")
    adapter = Checkpoint(path=f"{result.checkpoint.path}/{ADAPTER_SUBDIR}", filesystem=result.checkpoint.filesystem)
    gpus = spec.resources.gpus_per_worker if use_gpu else 0
    # "DEFAULT" keeps the task out of the trial's placement group, which Tune makes child tasks inherit and
    # which holds no CPU.
    scored = ray.get(_score_task.options(num_cpus=spec.resources.cpus_per_worker, num_gpus=gpus, scheduling_strategy="DEFAULT")
                     .remote(spec, adapter, float(config["guidance_scale"]), metrics))
    _final_report(scored, dict(result.metrics or {}), trial, lambda dest: adapter.to_directory(str(dest)))


class _TuneReporter:
    """Trainer callback of an in-process trial: each checkpoint's losses become a Tune result (ASHA reads `cdm`)."""

    def __init__(self):
        self.last: dict = {}

    def on_step(self, info: StepInfo) -> None:
        self.last = {EARLY_STOP_TIME: info.step, "loss": info.loss, **info.terms}

    def on_checkpoint(self, step: int, path: Path) -> None:
        from ray import tune

        tune.report({**self.last, SCORE: math.nan})

    def on_diagnostics(self, step: int, diagnostics: dict) -> None:
        pass

    def should_stop(self) -> bool:
        return False


def run_trial_in_process(config: dict, *, spec: TuningSpec, metrics: MetricSettings) -> None:
    """The Tune function trainable of `trials: in_process`: the method-core trainer inside the trial."""
    import torch

    from causalt2i.trainer import train

    trial = trial_spec(spec, config)
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    reporter = _TuneReporter()
    with tempfile.TemporaryDirectory(prefix="ct2i-trial-run-") as scratch:
        result = train(trial, Path(scratch) / "run", callbacks=[reporter])
        scored = _score_local(spec, result.adapter_dir, float(config["guidance_scale"]), metrics)
        _final_report(scored, reporter.last, trial, lambda dest: shutil.copytree(result.adapter_dir, dest))


# ------------------------------------------------------------------------------------ driver helpers


class FenceStopper(Stopper):
    """Stops the whole Tune run once the attempt says stop (cancelled, or the job row was lost).

    Tune pickles its run config for restores; a restored run has no attempt to answer to (a copy of the
    attempt's sink would never hear of a cancel), so the pickled copy never stops anything."""

    def __init__(self, ctx: AttemptContext | None = None):
        self.ctx = ctx

    def __reduce__(self):
        return (FenceStopper, ())

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.ctx is not None and self.ctx.cancelled()


class TrialProgress(Callback):
    """Writes `trials ended / num_samples` into the job's progress (for a search, progress counts trials)."""

    def __init__(self, sink: ProgressSink | None = None, num_samples: int = 1):
        self.sink = sink
        self.num_samples = num_samples
        self.ended = 0

    def __reduce__(self):
        return (TrialProgress, (None, self.num_samples))

    def _ended(self, trial) -> None:
        self.ended += 1
        if self.sink is None:
            return
        loss = (trial.last_result or {}).get("loss", math.nan)
        try:
            self.sink.on_trials(self.ended, self.num_samples, loss if math.isfinite(loss) else 0.0)
        except Exception:  # progress is advisory; the attempt's heartbeat keeps it alive regardless
            pass

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial)


class TrialRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    trial_id: str
    status: TrialStatus
    config: dict[str, float]
    step: int | None
    cdm: float | None
    metrics: dict[str, float | None] | None
    score: float | None
    error: str | None = None


class SearchRecord(BaseModel):
    """What `search.json` holds."""

    model_config = ConfigDict(extra="forbid")
    run: str
    searcher: Literal["optuna", "random"]
    scheduler: dict
    num_samples: int
    max_concurrent: int
    score_formula: str
    score_weights: ScoreWeights
    eval: dict
    best_trial_id: str
    best_config: dict[str, float]
    best_score: float
    trials: list[TrialRecord]
    finished_at: float


def _finite(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def trial_records(results) -> list[TrialRecord]:
    """One record per trial of a Tune `ResultGrid`: a trial that ended without a score and without an error
    was stopped by ASHA."""
    records = []
    for result in results:
        last = result.metrics or {}
        config = {name: float(result.config[name]) for name in SEARCHED if name in (result.config or {})}
        score = _finite(last.get(SCORE))
        metrics = {name: _finite(last.get(f"eval_{name}")) for name in ScoreWeights.model_fields} if score is not None else None
        status: TrialStatus = "error" if result.error is not None else ("finished" if score is not None else "early-stopped")
        step = last.get(EARLY_STOP_TIME)
        records.append(TrialRecord(trial_id=str(last.get("trial_id") or Path(result.path).name), status=status, config=config,
                                   step=int(step) if step is not None else None, cdm=_finite(last.get(EARLY_STOP_METRIC)),
                                   metrics=metrics, score=score,
                                   error=f"{type(result.error).__name__}: {result.error}"[:2000] if result.error else None))
    return records


def plot_search(record: SearchRecord) -> bytes:
    """Score against the α axis (α, or its multiplier under `alpha: auto`) on a log scale, best trial starred;
    trials without a score as ticks on that axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = "alpha_scale" if "alpha_scale" in record.best_config else "alpha"
    scored = [t for t in record.trials if t.score is not None]
    unscored = [t for t in record.trials if t.score is None and axis in t.config]
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    axes.scatter([t.config[axis] for t in scored], [t.score for t in scored], color="tab:blue", label="finished trial")
    best = next(t for t in scored if t.trial_id == record.best_trial_id)
    axes.scatter([best.config[axis]], [best.score], marker="*", s=260, color="tab:red", zorder=3,
                 label=f"best: {axis}={best.config[axis]:.3g}, score={best.score:.4g}")
    for trial in unscored:
        axes.axvline(trial.config[axis], color="gray", linestyle=":", linewidth=1)
    if unscored:
        axes.plot([], [], color="gray", linestyle=":", label="stopped early / failed")
    axes.set_xscale("log")
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide on a narrow range
    axes.set_xlabel("alpha_scale (x the calibrated weight of L_cst)" if axis == "alpha_scale" else "alpha (weight of L_cst)")
    axes.set_ylabel("trial score")
    axes.set_title(f"{record.run}: {len(scored)} of {len(record.trials)} trials scored", fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------ run_search


def run_search(spec: TuningSpec, run_dir: str | Path, *, storage: str, use_gpu: bool, ctx: AttemptContext,
               trials: Literal["ray_train", "in_process"] = "ray_train", train_env: dict[str, str] | None = None) -> TrainResult:
    """Run the spec's search as one Tune run; return the best trial's adapter (with search.json/png beside it).

    `train_env`: the `RAY_TRAIN_*` variables for each `ray_train` trial's Train run (see `run_trial`)."""
    from ray import tune

    search = check_search(spec)
    kind = searcher_kind(search)
    name = search_run_name(spec.tenant, ctx.job_id)
    metrics = ctx.settings.metrics
    if trials == "in_process":
        trainable = tune.with_resources(tune.with_parameters(run_trial_in_process, spec=spec, metrics=metrics),
                                        {"cpu": spec.resources.cpus_per_worker})
    else:
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, spec=spec, storage=storage, search_name=name, use_gpu=use_gpu, metrics=metrics,
                                 train_env=dict(train_env or {})),
            TRIAL_RESOURCES)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(num_samples=search.num_samples, search_alg=build_search_alg(search, seed=spec.train.seed),
                                    scheduler=build_scheduler(spec), reuse_actors=False),
        run_config=tune.RunConfig(name=name, storage_path=storage, stop=FenceStopper(ctx), verbose=0,
                                  callbacks=[TrialProgress(ctx.progress, search.num_samples)],
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    results = tuner.fit()
    total = spec.total_steps
    if ctx.cancelled():
        return TrainResult(adapter_dir=None, step=0, total_steps=total, stopped_early=True, stop_reason="cancelled")

    records = trial_records(results)
    scored = [(record, result) for record, result in zip(records, results) if record.score is not None]
    if not scored:
        problems = "; ".join(f"{r.trial_id}: {r.error or r.status}" for r in records)
        raise RuntimeError(f"no search trial finished with a score ({problems})")
    best, best_result = max(scored, key=lambda pair: pair[0].score)
    if best_result.checkpoint is None:
        raise RuntimeError(f"the best trial {best.trial_id} reported no checkpoint")

    local = Path(run_dir)
    if local.exists():
        shutil.rmtree(local)
    local.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="ct2i-best-", dir=local) as scratch:
        fetched = Path(best_result.checkpoint.to_directory(scratch))
        adapter_dir = local / ADAPTER_SUBDIR
        shutil.move(str(fetched / ADAPTER_SUBDIR), adapter_dir)
    record = SearchRecord(
        run=name, searcher=kind,
        scheduler={"kind": "asha", "metric": EARLY_STOP_METRIC, "mode": "min", "time_attr": EARLY_STOP_TIME, "max_t": total,
                   "grace_period": grace_period(spec), "reduction_factor": ASHA_REDUCTION_FACTOR},
        num_samples=search.num_samples, max_concurrent=search.max_concurrent, score_formula=SCORE_FORMULA,
        score_weights=search.score,
        eval={"prompts": search.eval_prompts, "seeds": list(search.eval_seeds), "steps": search.eval_steps},
        best_trial_id=best.trial_id, best_config=best.config, best_score=best.score, trials=records, finished_at=time.time())
    atomic_write_text(adapter_dir / SEARCH_FILE, record.model_dump_json(indent=2))
    atomic_write_bytes(adapter_dir / PLOT_FILE, plot_search(record))
    return TrainResult(adapter_dir=adapter_dir, step=int(best.step or total), total_steps=total, stopped_early=False)


def read_search_record(adapter_dir: str | Path) -> SearchRecord:
    return SearchRecord.model_validate(json.loads((Path(adapter_dir) / SEARCH_FILE).read_text()))
