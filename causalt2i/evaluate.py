"""The evaluation protocol of the paper (Section IV-A) for one adapter: prompts, seeds, metrics, a report.

For an adapter with n subjects, each prompt names all n subjects (`a <s1> cat and a <v1> dog in a
garden`), as in the paper's n-subject experiments; custom prompts may name any subset. Every prompt is
generated once per seed. The metrics follow Eqs. 14–17 (`causalt2i.metrics`):

- CLIP-I per subject: the images of every prompt naming the subject against that subject's reference
  images (Eq. 14); the multi-subject figure is the mean over subjects.
- CLIP-T per prompt, with the identifier tokens stripped (Eq. 16); a subject's CLIP-T is the mean over its
  prompts.
- LPIPS diversity among the images of one prompt (Eq. 17); a subject's is the mean over its prompts.
- KID per subject: all its generated images against its references (Eq. 15), subset size clipped to the
  smaller set. It needs at least two of each; otherwise it is null and the report says why.

Outputs in `out_dir`: `images/pNN-seedS.png`, `report.png` (per prompt: the subjects' reference images
beside the generated grid, metrics printed on it) and `metrics.json`, written last. Every file is
written atomically, so a `metrics.json` that exists describes a finished evaluation.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, ConfigDict, Field, field_validator

from causalt2i.adapter import Adapter, AdapterSubject
from causalt2i.atomic import atomic_write_bytes, atomic_write_text
from causalt2i.data.images import ImageInputError, load_reference_image
from causalt2i.generation import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_SEED,
    MAX_STEPS,
    GenerationError,
    Generator,
    parse_request,
)
from causalt2i.metrics import clip_i, clip_t, kid, lpips_diversity, mean_over_subjects, strip_identifier_tokens
from causalt2i.metrics.extractors import MetricSuite
from causalt2i.spec import SpecError, join_subject_phrases, load_spec, parse_spec
from causalt2i.text import tokenize
from causalt2i.tokens import IDENTIFIER_PATTERN

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.png"
IMAGES_DIR = "images"
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
SPEC_FILE_NAMES = ("spec.json", "spec.yaml", "spec.yml")

# Scenes in the style of the paper's benchmark (Cones 2 / Custom Diffusion prompts); `{subjects}` is the
# joined subject phrase, e.g. "a <s1> cat and a <v1> dog".
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of {subjects}",
    "{subjects} in a garden",
    "{subjects} on the beach",
    "{subjects} in the snow",
    "{subjects} in a kitchen",
    "{subjects} in a forest",
    "{subjects} on a street in the city",
    "{subjects} in a park",
    "a painting of {subjects}",
    "a sketch of {subjects}",
    "{subjects} on a wooden table",
    "{subjects} in front of a red wall",
    "{subjects} on top of a mountain",
    "{subjects} floating in water",
    "{subjects} at night under the stars",
    "{subjects} in a living room",
    "{subjects} next to a blue car",
    "a watercolor painting of {subjects}",
    "{subjects} in the desert",
    "{subjects} on a green lawn",
)
# How many prompts the paper uses for 1, 2, 3 and 4 subjects (Section IV-A-1); beyond 4, as for 4.
PAPER_PROMPT_COUNTS = {1: 20, 2: 10, 3: 10, 4: 5}

EvalProgress = Callable[[int, int], None]
"""Called after each prompt's images are generated with (prompts done, total prompts)."""


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts: Annotated[list[Annotated[str, Field(min_length=1)]] | None, Field(min_length=1, description="null = the paper-style templates")] = None
    max_prompts: Annotated[int | None, Field(ge=1, description="use at most this many prompts")] = None
    seeds: Annotated[list[Annotated[int, Field(ge=0, le=MAX_SEED)]], Field(min_length=1, description="one image per prompt per seed")] = list(DEFAULT_SEEDS)
    steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = DEFAULT_STEPS
    guidance: Annotated[float, Field(ge=0.0, le=MAX_GUIDANCE)] = DEFAULT_GUIDANCE
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    kid_subsets: Annotated[int, Field(ge=1, description="random subsets KID averages over")] = 100

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        if repeated:
            raise ValueError(f"repeats {repeated}; a repeated seed repeats an image and deflates LPIPS diversity")
        return seeds


class SubjectMetrics(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str
    class_word: str
    num_images: int
    num_references: int
    clip_i: float
    clip_t: float
    lpips: float
    kid: float | None
    kid_std: float | None
    kid_note: str | None = None


class PromptMetrics(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    clip_t_prompt: str
    subjects: list[str]
    seeds: list[int]
    images: list[str]
    clip_i: dict[str, float]
    clip_t: float
    lpips: float


class OverallMetrics(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clip_i: float
    clip_t: float
    lpips: float
    kid: float | None


class EvalReport(BaseModel):
    """What `metrics.json` holds."""

    model_config = ConfigDict(extra="forbid")
    adapter: dict
    config: EvalConfig
    width: int
    height: int
    overall: OverallMetrics
    subjects: dict[str, SubjectMetrics]
    prompts: list[PromptMetrics]


def subject_phrase(subjects: list[AdapterSubject]) -> str:
    return join_subject_phrases([f"a {subject.token} {subject.class_word}" for subject in subjects])


def paper_prompts(subjects: list[AdapterSubject], count: int | None = None) -> list[str]:
    """The templates filled with all subjects, as many as the paper uses for that many subjects."""
    if not subjects:
        raise ValueError("subjects: at least one is needed")
    if count is None:
        count = PAPER_PROMPT_COUNTS.get(len(subjects), PAPER_PROMPT_COUNTS[4])
    phrase = subject_phrase(subjects)
    return [template.format(subjects=phrase) for template in PROMPT_TEMPLATES[:count]]


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and `#` comments are skipped. `{subjects}` is filled in later."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise GenerationError("prompts", f"cannot read {path}: {err.strerror or err}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise GenerationError("prompts", f"{path} holds no prompts")
    return prompts


def find_reference_spec(source: str | Path) -> Path:
    """A spec file itself, or the spec file (spec.json / spec.yaml / spec.yml) inside a folder."""
    source = Path(source)
    if source.is_file():
        return source
    if source.is_dir():
        for name in SPEC_FILE_NAMES:
            if (source / name).is_file():
                return source / name
        raise GenerationError("references", f"{source} holds no {' / '.join(SPEC_FILE_NAMES)}")
    raise GenerationError("references", f"no such file or folder: {source}")


def default_references(adapter_dir: str | Path) -> Path | None:
    """The run's spec.json, which `train()` writes one folder above the adapter; None when absent."""
    candidate = Path(adapter_dir).resolve().parent / "spec.json"
    return candidate if candidate.is_file() else None


def load_references(source: str | Path, subjects: list[AdapterSubject]) -> dict[str, list[Image.Image]]:
    """Each subject's reference images, by token, from the spec at (or in) `source`."""
    path = find_reference_spec(source)
    try:
        if path.suffix == ".json":
            spec = parse_spec(json.loads(path.read_text(encoding="utf-8")), base_dir=path.parent)
        else:
            spec = load_spec(path)
    except (SpecError, json.JSONDecodeError, OSError) as err:
        raise GenerationError("references", f"{path}: {err}") from None
    by_token = {subject.token: subject for subject in spec.subjects}
    references = {}
    for subject in subjects:
        if subject.token not in by_token:
            raise GenerationError("references", f"{path} has no subject {subject.token}; it has {', '.join(by_token) or 'none'}")
        try:
            references[subject.token] = [load_reference_image(image) for image in by_token[subject.token].images]
        except ImageInputError as err:
            raise GenerationError("references", str(err)) from None
    return references


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def _features_one_by_one(extract: Callable[[torch.Tensor], torch.Tensor], images: list[Image.Image]) -> torch.Tensor:
    """Features of images of any sizes (extractors resize internally; a batch needs one size)."""
    return torch.cat([extract(_to_tensor(image).unsqueeze(0)).cpu() for image in images])


def _prompt_subjects(prompt: str, tokens: list[str], index: int) -> list[str]:
    named = list(dict.fromkeys(IDENTIFIER_PATTERN.findall(prompt)))
    unknown = [token for token in named if token not in tokens]
    if unknown:
        raise GenerationError(f"prompts.{index}", f"names identifier token {unknown[0]!r}, which this adapter does not have (it has: {', '.join(tokens)})")
    if not named:
        raise GenerationError(f"prompts.{index}", f"names none of the adapter's subjects ({', '.join(tokens)}); CLIP-I needs at least one")
    return [token for token in tokens if token in named]


def resolve_prompts(config: EvalConfig, subjects: list[AdapterSubject]) -> list[str]:
    prompts = paper_prompts(subjects) if config.prompts is None else [p.replace("{subjects}", subject_phrase(subjects)) for p in config.prompts]
    return prompts[: config.max_prompts] if config.max_prompts else prompts


def evaluate_adapter(
    generator: Generator,
    adapter: Adapter,
    references: dict[str, list[Image.Image]],
    suite: MetricSuite,
    config: EvalConfig,
    out_dir: str | Path,
    *,
    progress: EvalProgress | None = None,
) -> EvalReport:
    """Generate every prompt × seed with `adapter`, score them, and write images, report.png and metrics.json.

    Raises `GenerationError` naming the field (`prompts.N`, `references`, `width`, ...) before any image
    is generated when an input is bad.
    """
    out_dir = Path(out_dir)
    subjects = adapter.manifest.subjects
    tokens = [subject.token for subject in subjects]
    missing = [token for token in tokens if not references.get(token)]
    if missing:
        raise GenerationError("references", f"no reference images for {', '.join(missing)}")
    generator.use(adapter)
    parts = generator.parts
    prompts = resolve_prompts(config, subjects)
    prompt_subjects = [_prompt_subjects(prompt, tokens, index) for index, prompt in enumerate(prompts)]
    for index, prompt in enumerate(prompts):
        tokenize(parts.tokenizer, prompt, generator.host.token_ids, field=f"prompts.{index}")
    unnamed = [token for token in tokens if not any(token in named for named in prompt_subjects)]
    if unnamed:
        raise GenerationError("prompts", f"no prompt names {', '.join(unnamed)}; every subject needs at least one, or it has no metrics")
    request_fields = {
        "negative_prompt": config.negative_prompt,
        "steps": config.steps,
        "guidance": config.guidance,
        "width": config.width,
        "height": config.height,
    }
    base_request = parse_request({"prompt": prompts[0], **request_fields}, parts)
    width, height = base_request.size(parts)

    reference_clip = {token: _features_one_by_one(suite.clip.images, references[token]) for token in tokens}
    reference_inception = {token: _features_one_by_one(suite.inception.images, references[token]) for token in tokens}

    prompt_rows: list[PromptMetrics] = []
    prompt_images: list[list[Image.Image]] = []
    inception_per_subject: dict[str, list[torch.Tensor]] = {token: [] for token in tokens}
    for index, prompt in enumerate(prompts):
        images: list[Image.Image] = []
        pixels = []
        for start in range(0, len(config.seeds), MAX_IMAGES):
            seeds = config.seeds[start : start + MAX_IMAGES]
            result = generator({**request_fields, "prompt": prompt, "n": len(seeds), "seeds": list(seeds)})
            images += result.images
            pixels.append(result.as_float())
        batch = torch.cat(pixels)
        names = []
        for seed, image in zip(config.seeds, images):
            name = f"{IMAGES_DIR}/p{index:02d}-seed{seed}.png"
            atomic_write_bytes(out_dir / name, _png_bytes(image))
            names.append(name)
        clip_feats = suite.clip.images(batch).cpu()
        stripped = strip_identifier_tokens(prompt, tokens)
        text_feats = suite.clip.texts([stripped]).cpu()[0]
        inception_feats = suite.inception.images(batch).cpu()
        for token in prompt_subjects[index]:
            inception_per_subject[token].append(inception_feats)
        prompt_rows.append(
            PromptMetrics(
                prompt=prompt,
                clip_t_prompt=stripped,
                subjects=prompt_subjects[index],
                seeds=list(config.seeds),
                images=names,
                clip_i={token: clip_i(clip_feats, reference_clip[token]) for token in prompt_subjects[index]},
                clip_t=clip_t(clip_feats, text_feats),
                lpips=lpips_diversity(batch * 2 - 1, suite.lpips),
            )
        )
        prompt_images.append(images)
        if progress is not None:
            progress(index + 1, len(prompts))

    subject_rows = {}
    for subject in subjects:
        token = subject.token
        rows = [row for row in prompt_rows if token in row.subjects]
        generated = torch.cat(inception_per_subject[token])
        kid_mean = kid_std = note = None
        if generated.shape[0] >= 2 and reference_inception[token].shape[0] >= 2:
            kid_mean, kid_std = kid(generated, reference_inception[token], num_subsets=config.kid_subsets)
        else:
            note = f"KID needs >= 2 generated and >= 2 reference images; has {generated.shape[0]} and {reference_inception[token].shape[0]}"
        subject_rows[token] = SubjectMetrics(
            token=token,
            class_word=subject.class_word,
            num_images=int(generated.shape[0]),
            num_references=len(references[token]),
            clip_i=float(np.mean([row.clip_i[token] for row in rows])),
            clip_t=float(np.mean([row.clip_t for row in rows])),
            lpips=float(np.mean([row.lpips for row in rows])),
            kid=kid_mean,
            kid_std=kid_std,
            kid_note=note,
        )
    kids = {token: row.kid for token, row in subject_rows.items() if row.kid is not None}
    overall = OverallMetrics(
        clip_i=mean_over_subjects({token: row.clip_i for token, row in subject_rows.items()}),
        clip_t=float(np.mean([row.clip_t for row in prompt_rows])),
        lpips=float(np.mean([row.lpips for row in prompt_rows])),
        kid=mean_over_subjects(kids) if kids else None,
    )
    manifest = adapter.manifest
    report = EvalReport(
        adapter={
            "tenant": manifest.tenant,
            "name": manifest.name,
            "base_model": manifest.base_model,
            "step": manifest.step,
            "tensors_sha256": manifest.tensors_sha256,
            "path": str(adapter.path) if adapter.path else None,
        },
        config=config,
        width=width,
        height=height,
        overall=overall,
        subjects=subject_rows,
        prompts=prompt_rows,
    )
    atomic_write_bytes(out_dir / REPORT_FILE, _png_bytes(render_report(report, prompt_images, references)))
    atomic_write_text(out_dir / METRICS_FILE, report.model_dump_json(indent=2))
    return report


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


REPORT_MARGIN = 12
REPORT_GAP = 16
REPORT_LINE = 14
MAX_REFERENCES_SHOWN = 4


def _thumbnail(image: Image.Image, side: int) -> Image.Image:
    """Fit into side × side on a white square, keeping the aspect ratio."""
    copy = image.convert("RGB")
    scale = side / max(copy.size)
    copy = copy.resize((max(1, round(copy.width * scale)), max(1, round(copy.height * scale))), Image.Resampling.LANCZOS)
    tile = Image.new("RGB", (side, side), "white")
    tile.paste(copy, ((side - copy.width) // 2, (side - copy.height) // 2))
    return tile


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def render_report(report: EvalReport, prompt_images: list[list[Image.Image]], references: dict[str, list[Image.Image]]) -> Image.Image:
    """One band per prompt: its metrics as text, then its subjects' references | the generated grid."""
    font = ImageFont.load_default()
    tile = max(96, min(192, max(report.width, report.height)))
    header = [
        f"{report.adapter['tenant']}/{report.adapter['name']} step {report.adapter['step']}  ·  {report.config.steps} steps, "
        f"guidance {report.config.guidance}, {report.width}x{report.height}, seeds {','.join(map(str, report.config.seeds))}",
        f"overall: CLIP-I {_format(report.overall.clip_i)}  CLIP-T {_format(report.overall.clip_t)}  "
        f"LPIPS {_format(report.overall.lpips)}  KID {_format(report.overall.kid)}",
    ]
    header += [
        f"{token} ({row.class_word}): CLIP-I {_format(row.clip_i)}  CLIP-T {_format(row.clip_t)}  LPIPS {_format(row.lpips)}  KID {_format(row.kid)}"
        for token, row in report.subjects.items()
    ]
    bands = []
    for row, images in zip(report.prompts, prompt_images):
        shown_refs = [image for token in row.subjects for image in references[token][:MAX_REFERENCES_SHOWN]]
        lines = [
            row.prompt,
            "CLIP-I " + "  ".join(f"{token} {_format(value)}" for token, value in row.clip_i.items())
            + f"  |  CLIP-T {_format(row.clip_t)}  |  LPIPS {_format(row.lpips)}",
        ]
        bands.append((lines, shown_refs, images))
    widest = max(len(refs) * tile + REPORT_GAP + len(images) * tile for _, refs, images in bands)
    text_width = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(line, font=font)) for line in header + [l for b in bands for l in b[0]])
    width = 2 * REPORT_MARGIN + max(widest, text_width)
    band_height = 2 * REPORT_LINE + REPORT_LINE + tile + REPORT_GAP
    height = 2 * REPORT_MARGIN + len(header) * REPORT_LINE + REPORT_GAP + len(bands) * band_height
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = REPORT_MARGIN
    for line in header:
        draw.text((REPORT_MARGIN, y), line, fill="black", font=font)
        y += REPORT_LINE
    y += REPORT_GAP
    for lines, refs, images in bands:
        for line in lines:
            draw.text((REPORT_MARGIN, y), line, fill="black", font=font)
            y += REPORT_LINE
        x = REPORT_MARGIN
        draw.text((x, y), "references", fill="gray", font=font)
        draw.text((x + len(refs) * tile + REPORT_GAP, y), "generated (one per seed)", fill="gray", font=font)
        y += REPORT_LINE
        for image in refs:
            canvas.paste(_thumbnail(image, tile), (x, y))
            x += tile
        x += REPORT_GAP
        for image in images:
            canvas.paste(_thumbnail(image, tile), (x, y))
            x += tile
        y += tile + REPORT_GAP
    return canvas
