"""The serving layer's typed edges: the HTTP bodies clients send and get back, and what the ingress hands the
generator replica.

Ranges a client can rely on: the library's (`causalt2i.limits`) narrowed for HTTP to steps 1..100 and n 1..8
(one request must not hold a replica for long), guidance 0..30, width and height multiples of 8 within
32..2048 here; the generator then checks them against its base's own range (tiny 32..256, SDXL 256..2048)
because only it knows which base it holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from causalt2i.generation import GenerationRequest
from causalt2i.limits import (
    ABSOLUTE_MAX_SIDE, ABSOLUTE_MIN_SIDE, DEFAULT_GUIDANCE, DEFAULT_STEPS, SIZE_MULTIPLE, GuidanceScale, ImageCount,
    SamplingSteps, Seed, StrictInput,
)

MAX_STEPS = 100
MAX_IMAGES = 8
MAX_PROMPT_CHARS = 2000
HttpSteps = Annotated[SamplingSteps, Field(le=MAX_STEPS)]
HttpImageCount = Annotated[ImageCount, Field(le=MAX_IMAGES)]
BASE_MODEL_REF = "base"
"""The adapter reference that means "no adapter": the bare base every replica holds."""

ADAPTER_REF_HELP = (
    "`tenant/name`, `tenant/name@version`, `name[@version]` (your own tenant), an adapter id (`ad-…`), or `base`"
)


def _side(value: int | None) -> int | None:
    if value is None:
        return value
    if value % SIZE_MULTIPLE:
        raise ValueError(f"must be a multiple of {SIZE_MULTIPLE}, got {value}")
    if not ABSOLUTE_MIN_SIDE <= value <= ABSOLUTE_MAX_SIDE:
        raise ValueError(f"must be within {ABSOLUTE_MIN_SIDE}..{ABSOLUTE_MAX_SIDE}, got {value}")
    return value


class _Knobs(StrictInput):
    """The sampling settings both generate routes share (numbers strict and finite, see `StrictInput`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    negative_prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS, description="what guidance steers away from")] = ""
    steps: HttpSteps = DEFAULT_STEPS
    guidance_scale: Annotated[GuidanceScale, Field(validation_alias=AliasChoices("guidance_scale", "guidance"),
                                                   description="classifier-free guidance; ≤ 1 disables it (alias `guidance`)")] = DEFAULT_GUIDANCE
    seed: Annotated[Seed | None, Field(description="image i uses seed + i; omitted = a random seed, returned")] = None


class GenerateBody(_Knobs):
    """`POST /v1/generate`."""

    adapter: Annotated[str, Field(min_length=1, max_length=300, description=ADAPTER_REF_HELP)]
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="may name the adapter's identifier tokens, e.g. `a <s1> cat`")]
    n: Annotated[HttpImageCount, Field(description="images to generate")] = 1
    width: Annotated[int | None, Field(description="pixels, a multiple of 8; omitted = the base's native size")] = None
    height: Annotated[int | None, Field(description="pixels, a multiple of 8; omitted = the base's native size")] = None
    format: Annotated[Literal["png", "json"], Field(description="`png`: the first image as image/png; `json`: every image as base64")] = "png"

    _check_side = field_validator("width", "height")(_side)


_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")  # ASCII digits: `\d` also matches "٦٤"


class ImagesBody(_Knobs):
    """`POST /v1/images/generations`, OpenAI Images API compatible. `steps`, `guidance_scale`, `negative_prompt` and
    `seed` are extensions (the `openai` client sends them through `extra_body`)."""

    model: Annotated[str, Field(min_length=1, max_length=300, description=ADAPTER_REF_HELP)]
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    n: HttpImageCount = 1
    size: Annotated[str | None, Field(description="`WxH` in pixels, e.g. `1024x1024`; omitted = the base's native size")] = None
    response_format: Annotated[Literal["b64_json"], Field(description="only `b64_json`: this server keeps no image URLs")] = "b64_json"
    output_format: Annotated[Literal["png"], Field(description="only `png`")] = "png"
    user: Annotated[str | None, Field(max_length=300, description="accepted for compatibility; not used")] = None

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return None
        match = _SIZE.fullmatch(value)
        if match is None:
            raise ValueError(f"must be `WIDTHxHEIGHT` such as `1024x1024`, got {value!r}")
        for side in match.groups():
            _side(int(side))
        return value

    def dimensions(self) -> tuple[int | None, int | None]:
        if self.size is None:
            return None, None
        width, height = self.size.split("x")
        return int(width), int(height)


class AdapterRef(BaseModel):
    """Which weights served a request, as the registry names them (absent for the bare base)."""

    model_config = ConfigDict(extra="forbid")
    id: str
    tenant: str
    name: str
    version: int


class GenerateResponse(BaseModel):
    """`POST /v1/generate` with `format: json`."""

    model_config = ConfigDict(extra="forbid")
    images: Annotated[list[str], Field(description="base64 PNGs, one per image")]
    seeds: list[int]
    seed: Annotated[int, Field(description="the first image's seed; image i used seed + i")]
    width: int
    height: int
    adapter: AdapterRef | None
    timings: Annotated[dict[str, float], Field(description="seconds: queue, load, swap, encode, denoise, decode, total")]


class ImageDatum(BaseModel):
    model_config = ConfigDict(extra="forbid")
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")
    created: int
    data: list[ImageDatum]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Annotated[str, Field(description="what `model` / `adapter` accepts: `base` or `tenant/name@version`")]
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    """`GET /v1/models`, OpenAI's shape."""

    model_config = ConfigDict(extra="forbid")
    object: Literal["list"] = "list"
    data: list[ModelEntry]


# -- ingress → generator ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateCall:
    """One request as the generator replica receives it; the adapter travels as the multiplexed model id."""

    request: GenerationRequest
    tenant: str
    deadline: float  # time.time() after which the caller has given up


@dataclass(frozen=True)
class Refusal:
    """A request the generator will not run: `status` is the HTTP status the ingress answers with.

    `work_spent`: the request reached the denoiser (it was abandoned or failed mid-run), so the rate-limit token
    it took stays spent; every other refusal comes before any image is made and the ingress gives the token back.
    """

    status: int
    field: str
    message: str
    work_spent: bool = False


@dataclass(frozen=True)
class GeneratedImages:
    pngs: list[bytes]
    seeds: list[int]
    width: int
    height: int
    batch_size: int  # requests that shared this forward pass's batch
    timings: dict[str, float] = field(default_factory=dict)


GenerateOutcome = GeneratedImages | Refusal
