"""`TuningSpec`: the one typed schema of a tuning job, shared by YAML, the CLI and the REST API.

Unknown keys are rejected everywhere, and every error names the field it is about, for example
`subjects.1.token`. Checks that need the model (is the token new to the vocabulary? does the class word
tokenize to anything?) live in `check_spec_against_tokenizers`, since the schema itself loads no model.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from causalt2i.errors import FieldError, field_error
from causalt2i.limits import MAX_SEED, MAX_TRAIN_SEED, MAX_TRAIN_STEPS, StrictInput, load_yaml_strictly

STEPS_PER_SUBJECT = 500
ALPHA_WARMUP_MAX = 300
MAX_SUBJECTS = 8
MAX_IMAGES_PER_SUBJECT = 32
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class SpecError(FieldError):
    """A spec that cannot run. `field` is the dotted path of the offending value ('' for the whole spec)."""


def spec_error_from_validation(err: ValidationError) -> SpecError:
    """Turn pydantic's error list into one SpecError naming the first bad field (others are appended)."""
    found = field_error(err)
    return found if isinstance(found, SpecError) else SpecError(found.field, found.message)


class StrictModel(StrictInput):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


class Subject(StrictModel):
    token: Annotated[str, Field(pattern=r"^(<[A-Za-z0-9_\-]{1,24}>|[a-z][a-z0-9]{1,23})$", description="identifier token, e.g. <s1> or a rare word like sks; must be new to the vocabulary")]
    class_word: Annotated[str, Field(min_length=1, max_length=48, description="the subject's class, e.g. cat")]
    images: Annotated[list[str], Field(min_length=1, max_length=MAX_IMAGES_PER_SUBJECT, description="reference images: JPEG, PNG or WebP")]

    @field_validator("images")
    @classmethod
    def _images_exist(cls, images: list[str], info: ValidationInfo) -> list[str]:
        context = info.context or {}
        base_dir = context.get("base_dir")
        resolved = []
        for index, name in enumerate(images):
            path = Path(name)
            if not path.is_absolute() and base_dir is not None:
                path = Path(base_dir) / path
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"images[{index}] {name!r}: not a JPEG, PNG or WebP file name")
            if context.get("check_files", base_dir is not None) and not path.is_file():
                raise ValueError(f"images[{index}] {name!r}: no such file")
            resolved.append(str(path))
        return resolved


class TrainConfig(StrictModel):
    steps: Annotated[int | None, Field(gt=0, le=MAX_TRAIN_STEPS, description="optimizer steps; null = 500 per subject")] = None
    lr: Annotated[float, Field(gt=0, description="learning rate of attn2 and the new token rows")] = 5.0e-5
    mask_lr: Annotated[float, Field(gt=0, description="learning rate of mask logits and beta (METHOD.md: why not 5e-5)")] = 1.0e-2
    aux_lr: Annotated[float, Field(gt=0, description="learning rate of the intervention network")] = 1.0e-4
    alpha: Annotated[
        float | Literal["auto"],
        Field(description="weight of L_cst (Eq. 9); auto = calibrated over the warm-up so that alpha x ratio has L_cdm's median magnitude (paper IV-G)"),
    ] = "auto"
    alpha_scale: Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False, description="alpha: auto: multiplies the calibrated alpha (1 = the paper's balance of the two objectives); the axis a search over alpha samples")] = 1.0
    alpha_warmup: Annotated[int | None, Field(gt=0, le=MAX_TRAIN_STEPS, description="alpha: auto: steps whose L_cdm and ratio set alpha (L_cst does not train meanwhile); null = min(300, 20% of the steps)")] = None
    lambda_attn: Annotated[float, Field(ge=0, description="weight of L_attn (Eq. 11)")] = 1.0
    lambda_text: Annotated[float, Field(ge=0, description="weight of the optional plain-text denoising term")] = 0.0
    cst_form: Literal["shifted", "raw"] = "shifted"
    cst_grad: Literal["masks", "all"] = "masks"
    gamma: Literal["normalized", "raw"] = "normalized"
    resolution: Annotated[int, Field(ge=64, le=2048, description="canvas size; a multiple of 64")] = 1024
    param_mode: Literal["full", "lora"] = "full"
    lora_rank: Annotated[int, Field(ge=1, le=256, description="LoRA rank r (param_mode: lora)")] = 16
    lora_alpha: Annotated[float | None, Field(gt=0, le=4096, description="LoRA alpha; the update is scaled by alpha / r; null = r (scale 1)")] = None
    lora_dropout: Annotated[float, Field(ge=0, lt=1, description="dropout on the LoRA branch's input during training (peft's lora_dropout)")] = 0.0
    gradient_checkpointing: bool = False
    dtype_policy: Annotated[Literal["auto", "fp32", "bf16"], Field(description="bf16: frozen modules in bf16, trainable tensors in fp32 masters, bf16 autocast; fp32: everything fp32; auto = bf16 on CUDA, fp32 on CPU")] = "auto"
    checkpoint_every: Annotated[int, Field(gt=0, le=MAX_TRAIN_STEPS, description="steps between checkpoints and SaCD/SCaG diagnostics")] = 100
    log_every: Annotated[int, Field(gt=0, le=MAX_TRAIN_STEPS, description="steps between progress reports; the loss reaches the host once per report")] = 10
    preview_every: Annotated[int | None, Field(ge=0, le=MAX_TRAIN_STEPS, description="steps between training previews (the joint prompt and each subject's prompt, fixed seed, rendered with the current weights); null = every checkpoint; 0 = off")] = None
    num_canvases: Annotated[int | None, Field(gt=0, le=64, description="K merged training images; null = fewest references of any subject")] = None
    seed: Annotated[int, Field(ge=0, le=MAX_TRAIN_SEED)] = 0

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha_number_or_auto(cls, value: object) -> object:
        # Checked before the union, so an error names `train.alpha` rather than a union member.
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
            raise ValueError(f"must be a number >= 0 or 'auto', got {value!r}")
        return float(value)

    @field_validator("resolution")
    @classmethod
    def _multiple_of_64(cls, value: int) -> int:
        if value % 64:
            raise ValueError(f"must be a multiple of 64, got {value}")
        return value


class Resources(StrictModel):
    num_workers: Annotated[int, Field(ge=1, le=64)] = 1
    gpus_per_worker: Annotated[float, Field(ge=0, le=8)] = 1.0
    cpus_per_worker: Annotated[float, Field(gt=0, le=256)] = 4

    @field_validator("gpus_per_worker")
    @classmethod
    def _fractional_range(cls, value: float) -> float:
        if 0 < value < 0.25 or (value > 1 and value != int(value)):
            raise ValueError("must be 0 (CPU), a fraction from 0.25 to 1, or a whole number of GPUs")
        return value

    @property
    def total_gpus(self) -> float:
        return self.num_workers * self.gpus_per_worker


class Distribution(StrictModel):
    """One search dimension: exactly one of `loguniform: [low, high]`, `uniform: [low, high]`, `choice: [...]`."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    choice: Annotated[list[float] | None, Field(min_length=1)] = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Distribution":
        given = [k for k in ("loguniform", "uniform", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of loguniform, uniform or choice")
        bounds = self.loguniform or self.uniform
        if bounds is not None:
            low, high = bounds
            if not low < high:
                raise ValueError(f"{given[0]}: low must be below high, got [{low}, {high}]")
            if self.loguniform is not None and low <= 0:
                raise ValueError("loguniform: bounds must be positive")
        return self

    def bounds(self) -> tuple[float, float]:
        if self.choice is not None:
            return min(self.choice), max(self.choice)
        return self.loguniform or self.uniform  # type: ignore[return-value]


class ScoreWeights(StrictModel):
    """Trial score = clip_i·CLIP-I + clip_t·CLIP-T + kid·KID (+ lpips·LPIPS); higher is better."""

    clip_i: float = 1.0
    clip_t: float = 1.0
    kid: float = -1.0
    lpips: float = 0.0


class SearchConfig(StrictModel):
    num_samples: Annotated[int, Field(ge=1, le=256)] = 8
    max_concurrent: Annotated[int, Field(ge=1, le=64)] = 2
    alpha: Annotated[Distribution | None, Field(description="train.alpha a number: the absolute alpha to sample; null = loguniform 1e-4..1e-2")] = None
    alpha_scale: Annotated[Distribution | None, Field(description="train.alpha auto: the multiplier of the calibrated alpha to sample (train.alpha_scale); null = loguniform 0.1..10")] = None
    lambda_attn: Distribution = Distribution(uniform=(0.1, 2.0))
    guidance_scale: Distribution = Distribution(choice=[5.0, 7.5, 9.0])
    eval_prompts: Annotated[int, Field(ge=1, le=20)] = 2
    eval_seeds: Annotated[list[Annotated[int, Field(ge=0, le=MAX_SEED)]], Field(min_length=1, max_length=16)] = [0, 1]
    eval_steps: Annotated[int, Field(ge=1, le=200, description="sampling steps when scoring a trial")] = 30
    score: ScoreWeights = ScoreWeights()
    searcher: Literal["auto", "optuna", "random"] = "auto"
    grace_period: Annotated[int | None, Field(gt=0, le=MAX_TRAIN_STEPS, description="ASHA: steps before a trial may be stopped; null = a quarter of the steps")] = None

    @field_validator("guidance_scale")
    @classmethod
    def _guidance_range(cls, value: Distribution) -> Distribution:
        low, high = value.bounds()
        if low < 0 or high > 30:
            raise ValueError("guidance_scale must lie within 0..30")
        return value


class CompressOnPublish(StrictModel):
    """Compress the `full` adapter into a LoRA adapter once the tune succeeds (`causalt2i.compress`, as `ct2i compress`):
    exactly one of a fixed `rank` or a retained-energy target `energy` per ΔW."""

    rank: Annotated[int | None, Field(ge=1, le=4096, description="fixed rank per tensor (capped at the tensor's full rank)")] = None
    energy: Annotated[float | None, Field(gt=0.0, le=1.0, description="smallest rank keeping this fraction of each ΔW's Frobenius energy")] = None
    fidelity_steps: Annotated[int, Field(ge=1, le=200, description="sampling steps of the images whose PSNR and max |Δ| against the full adapter the manifest records")] = 30

    @model_validator(mode="after")
    def _exactly_one(self) -> "CompressOnPublish":
        if (self.rank is None) == (self.energy is None):
            raise ValueError("give exactly one of rank or energy")
        return self


class PublishConfig(StrictModel):
    """What the control plane publishes besides the tuned adapter."""

    compress: Annotated[CompressOnPublish | None, Field(description="param_mode full only: also publish a compressed LoRA version")] = None


class EvaluationConfig(StrictModel):
    """The evaluation a plain (non-search) tuning gets when it ends (`causalt2i.evaluate`): `prompts` paper-style
    prompts × `seeds`, scored by CLIP-I, CLIP-T, KID and LPIPS, written as `report.png` and `metrics.json` beside the
    adapter. A search's trials are scored by `search.eval_*` instead."""

    prompts: Annotated[int, Field(ge=1, le=20)] = 2
    seeds: Annotated[list[Annotated[int, Field(ge=0, le=MAX_SEED)]], Field(min_length=1, max_length=16)] = [0, 1]
    steps: Annotated[int, Field(ge=1, le=200, description="sampling steps per image")] = 20
    guidance: Annotated[float, Field(ge=0, le=30)] = 7.5

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct (each gives one image per prompt)")
        return seeds


class TuningSpec(StrictModel):
    tenant: Annotated[str, Field(pattern=r"^[a-z0-9-]{1,40}$")]
    name: Annotated[str, Field(pattern=r"^[a-z0-9-]{1,60}$")]
    base_model: Annotated[str, Field(min_length=1, description="'tiny', a hub id, or a local diffusers folder of SDXL")] = "tiny"
    image_encoder: Annotated[str | None, Field(description="null = the base preset's default E_I; else hub id / folder")] = None
    vae: Annotated[str | None, Field(min_length=1, description="null = the base's VAE; else hub id / folder, e.g. madebyollin/sdxl-vae-fp16-fix (held in bf16 under the bf16 policy)")] = None
    subjects: Annotated[list[Subject], Field(min_length=1, max_length=MAX_SUBJECTS)]
    train: TrainConfig = TrainConfig()
    resources: Resources = Resources()
    search: SearchConfig | None = None
    publish: PublishConfig = PublishConfig()
    evaluation: Annotated[EvaluationConfig | None, Field(description="evaluate the adapter when the tuning ends and publish "
                                                                      "report.png and metrics.json with it; null = none")] = None

    @model_validator(mode="after")
    def _unique_tokens(self) -> "TuningSpec":
        seen: dict[str, int] = {}
        for index, subject in enumerate(self.subjects):
            if subject.token in seen:
                raise SpecError(f"subjects.{index}.token", f"duplicate token {subject.token!r} (also subjects.{seen[subject.token]}.token)")
            seen[subject.token] = index
        if self.train.alpha != "auto" and self.train.alpha_scale != 1.0:
            raise SpecError("train.alpha_scale", f"multiplies the calibrated alpha of alpha: auto; train.alpha is the number {self.train.alpha:g}: scale that number instead")
        if self.search is not None:
            self._check_alpha_axis(self.search)
        if self.publish.compress is not None and self.train.param_mode != "full":
            raise SpecError("publish.compress", f"compresses a full tune's ΔW into LoRA factors; train.param_mode is {self.train.param_mode!r}, already LoRA: drop publish.compress")
        warmup = self.train.alpha_warmup
        if self.train.alpha == "auto" and warmup is not None and warmup >= self.total_steps:
            raise SpecError("train.alpha_warmup", f"is {warmup} steps, but the run has {self.total_steps}: L_cst would never train; shorten it or give alpha a number")
        return self

    def _check_alpha_axis(self, search: SearchConfig) -> None:
        # A search over an absolute alpha next to alpha: auto would throw the calibration away, and a range of
        # absolute values means nothing until the ratio's magnitude on this base is known (it differs by orders
        # of magnitude between the tiny preset and SDXL); the multiplier does not.
        if self.train.alpha == "auto" and search.alpha is not None:
            raise SpecError("search.alpha", "train.alpha is auto: search alpha_scale (a multiplier of the calibrated alpha), or give train.alpha a number")
        if self.train.alpha != "auto" and search.alpha_scale is not None:
            raise SpecError("search.alpha_scale", "multiplies the calibrated alpha of alpha: auto; train.alpha is a number: search alpha instead")

    @property
    def alpha_axis(self) -> tuple[Literal["alpha", "alpha_scale"], "Distribution"]:
        """The α dimension a search samples: `alpha_scale` under `alpha: auto`, else the absolute `alpha`."""
        search = self.search or SearchConfig()
        if self.train.alpha == "auto":
            return "alpha_scale", search.alpha_scale or Distribution(loguniform=(0.1, 10.0))
        return "alpha", search.alpha or Distribution(loguniform=(1.0e-4, 1.0e-2))

    @property
    def total_steps(self) -> int:
        return self.train.steps or STEPS_PER_SUBJECT * len(self.subjects)

    @property
    def progress_unit(self) -> Literal["trials", "steps"]:
        """What a job's progress counts: a search's trials (each trial's own steps are its business), else steps."""
        return "trials" if self.search is not None else "steps"

    @property
    def progress_total(self) -> int:
        """How many `progress_unit`s the job has to do."""
        return self.search.num_samples if self.search is not None else self.total_steps

    @property
    def preview_interval(self) -> int:
        """Steps between training previews: `preview_every`, else `checkpoint_every`; 0 = none."""
        every = self.train.preview_every
        return self.train.checkpoint_every if every is None else every

    def preview_prompts(self) -> list[str]:
        """What a training preview renders: the joint prompt P_{n+1}, then each subject's P_i (one subject: P_1 once)."""
        joint = self.joint_prompt()
        return [joint] + [p for p in self.subject_prompts() if p != joint]

    @property
    def alpha_warmup_steps(self) -> int:
        """Steps over which `alpha: auto` records L_cdm and the ratio: `alpha_warmup`, else min(300, 20%)."""
        if self.train.alpha_warmup is not None:
            return self.train.alpha_warmup
        return max(1, min(ALPHA_WARMUP_MAX, self.total_steps // 5))

    @property
    def tokens(self) -> list[str]:
        return [s.token for s in self.subjects]

    def joint_prompt(self) -> str:
        """P_{n+1}: `a <s1> cat and a <v1> dog` (', ' between subjects, ' and ' before the last)."""
        return join_subject_phrases([f"a {s.token} {s.class_word}" for s in self.subjects])

    def subject_prompts(self) -> list[str]:
        """P_1..P_n: `a <s_i> <class_i>`."""
        return [f"a {s.token} {s.class_word}" for s in self.subjects]


def join_subject_phrases(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def parse_spec(data: object, *, base_dir: str | Path | None = None, check_files: bool | None = None) -> TuningSpec:
    """Validate a spec mapping. Image paths are resolved against `base_dir` and checked to exist."""
    if not isinstance(data, dict):
        raise SpecError("", "a spec must be a mapping of keys to values")
    context = {"base_dir": base_dir}
    if check_files is not None:
        context["check_files"] = check_files
    try:
        return TuningSpec.model_validate(data, context=context)
    except ValidationError as err:
        raise spec_error_from_validation(err) from None


def load_spec(path: str | Path) -> TuningSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise SpecError("", f"cannot read spec {path}: {err.strerror}") from None
    try:
        data = load_yaml_strictly(text)
    except yaml.YAMLError as err:
        raise SpecError("", f"{path} is not valid YAML: {err}") from None
    except FieldError as err:
        raise SpecError(err.field, err.message) from None
    return parse_spec(data, base_dir=path.parent)


_SPACE = re.compile(r"\s+")


def check_spec_against_tokenizers(spec: TuningSpec, tokenizers: list) -> None:
    """Model-aware checks: each token is new to every tokenizer; each class word tokenizes to something."""
    for index, subject in enumerate(spec.subjects):
        for tokenizer in tokenizers:
            vocab = tokenizer.get_vocab()
            # CLIP's BPE stores whole words with an end-of-word marker.
            if subject.token in vocab or f"{subject.token}</w>" in vocab:
                raise SpecError(f"subjects.{index}.token", f"{subject.token!r} is already in the vocabulary; pick a new token")
            ids = tokenizer(_SPACE.sub(" ", subject.class_word).strip(), add_special_tokens=False)["input_ids"]
            if not ids:
                raise SpecError(f"subjects.{index}.class_word", f"{subject.class_word!r} tokenizes to nothing")
