"""`TuningSpec`: the one typed schema of a tuning job, shared by YAML, the CLI and the REST API.

Unknown keys are rejected everywhere, and every error names the field it is about, for example
`subjects.1.token`. Checks that need the model (is the token new to the vocabulary? does the class word
tokenize to anything?) live in `check_spec_against_tokenizers`, since the schema itself loads no model.
"""

from __future__ import annotations

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

STEPS_PER_SUBJECT = 500
MAX_SUBJECTS = 8
MAX_IMAGES_PER_SUBJECT = 32
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class SpecError(ValueError):
    """A spec that cannot run. `field` is the dotted path of the offending value ('' for the whole spec)."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


def _field_path(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def spec_error_from_validation(err: ValidationError) -> SpecError:
    """Turn pydantic's error list into one SpecError naming the first bad field (others are appended)."""
    problems = err.errors(include_url=False)
    first = problems[0]
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key (not part of the spec)"
    if len(problems) > 1:
        others = ", ".join(_field_path(p["loc"]) for p in problems[1:4])
        message += f" (also invalid: {others}{', ...' if len(problems) > 4 else ''})"
    return SpecError(_field_path(first["loc"]), message)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


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
    steps: Annotated[int | None, Field(gt=0, description="optimizer steps; null = 500 per subject")] = None
    lr: Annotated[float, Field(gt=0, description="learning rate of attn2 and the new token rows")] = 5.0e-5
    mask_lr: Annotated[float, Field(gt=0, description="learning rate of mask logits and beta (METHOD.md: why not 5e-5)")] = 1.0e-2
    aux_lr: Annotated[float, Field(gt=0, description="learning rate of the intervention network")] = 1.0e-4
    alpha: Annotated[float, Field(ge=0, description="weight of L_cst (Eq. 9)")] = 0.001
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
    checkpoint_every: Annotated[int, Field(gt=0)] = 100
    num_canvases: Annotated[int | None, Field(gt=0, le=64, description="K merged training images; null = fewest references of any subject")] = None
    seed: Annotated[int, Field(ge=0)] = 0

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
    alpha: Distribution = Distribution(loguniform=(1.0e-4, 1.0e-2))
    lambda_attn: Distribution = Distribution(uniform=(0.1, 2.0))
    guidance_scale: Distribution = Distribution(choice=[5.0, 7.5, 9.0])
    eval_prompts: Annotated[int, Field(ge=1, le=20)] = 2
    eval_seeds: Annotated[list[int], Field(min_length=1, max_length=16)] = [0, 1]
    eval_steps: Annotated[int, Field(ge=1, le=200, description="sampling steps when scoring a trial")] = 30
    score: ScoreWeights = ScoreWeights()
    searcher: Literal["auto", "optuna", "random"] = "auto"
    grace_period: Annotated[int | None, Field(gt=0, description="ASHA: steps before a trial may be stopped; null = a quarter of the steps")] = None

    @field_validator("guidance_scale")
    @classmethod
    def _guidance_range(cls, value: Distribution) -> Distribution:
        low, high = value.bounds()
        if low < 0 or high > 30:
            raise ValueError("guidance_scale must lie within 0..30")
        return value


class TuningSpec(StrictModel):
    tenant: Annotated[str, Field(pattern=r"^[a-z0-9-]{1,40}$")]
    name: Annotated[str, Field(pattern=r"^[a-z0-9-]{1,60}$")]
    base_model: Annotated[str, Field(min_length=1, description="'tiny', a hub id, or a local diffusers folder of SDXL")] = "tiny"
    image_encoder: Annotated[str | None, Field(description="null = the base preset's default E_I; else hub id / folder")] = None
    subjects: Annotated[list[Subject], Field(min_length=1, max_length=MAX_SUBJECTS)]
    train: TrainConfig = TrainConfig()
    resources: Resources = Resources()
    search: SearchConfig | None = None

    @model_validator(mode="after")
    def _unique_tokens(self) -> "TuningSpec":
        seen: dict[str, int] = {}
        for index, subject in enumerate(self.subjects):
            if subject.token in seen:
                raise SpecError(f"subjects.{index}.token", f"duplicate token {subject.token!r} (also subjects.{seen[subject.token]}.token)")
            seen[subject.token] = index
        return self

    @property
    def total_steps(self) -> int:
        return self.train.steps or STEPS_PER_SUBJECT * len(self.subjects)

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
        # A SpecError raised inside a model validator arrives wrapped; keep its field.
        for problem in err.errors(include_url=False):
            inner = problem.get("ctx", {}).get("error")
            if isinstance(inner, SpecError):
                raise inner from None
        raise spec_error_from_validation(err) from None


def load_spec(path: str | Path) -> TuningSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise SpecError("", f"cannot read spec {path}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError("", f"{path} is not valid YAML: {err}") from None
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
