"""Training previews: a few fixed-seed images rendered with the weights as they are at a step.

Every `preview_interval` steps (spec `train.preview_every`; by default at each checkpoint) the trainer renders
`TuningSpec.preview_prompts()` — the joint prompt, then each subject's prompt — with the library's own sampler
(`causalt2i.generation.generate`), one image per prompt from the run's seed. A preview is a folder
`previews/step-NNNNNN/` in the run folder: `00.png`, `01.png`, … in prompt order and `preview.json` (step,
prompts, seed, sampler settings, files), written last, so a folder with a `preview.json` is complete.

A preview must not change the run: it draws its noise from per-image CPU generators (as `generate` does),
runs under `torch.no_grad` with the trainable modules in eval mode (no LoRA dropout) and restores their
mode and torch's global RNG states after, so a run with previews equals one without, bitwise. The same
weights, step and seed give the same PNG bytes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PREVIEWS_DIR = "previews"
PREVIEW_FILE = "preview.json"
PREVIEW_SAMPLING_STEPS = 12
PREVIEW_GUIDANCE = 5.0
STEP_FOLDER_PREFIX = "step-"


def step_folder_name(step: int) -> str:
    return f"{STEP_FOLDER_PREFIX}{step:06d}"


def image_name(index: int) -> str:
    return f"{index:02d}.png"


def png_bytes(image: Image.Image) -> bytes:
    """PNG without metadata or timestamps: the same pixels always give the same bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def render_preview(parts, token_ids: dict[str, int], prompts: list[str], *, seed: int, step: int, run_dir: str | Path,
                   modules=(), autocast: contextlib.AbstractContextManager | None = None,
                   sampling_steps: int = PREVIEW_SAMPLING_STEPS, guidance: float = PREVIEW_GUIDANCE) -> Path:
    """Render one preview of `prompts` at `step` into `run_dir/previews/step-NNNNNN/`; return that folder.

    `modules`: the trainable modules, put in eval mode for the render and restored after. `autocast`: the
    training policy's autocast (bf16 masters in fp32 with bf16 frozen modules need it).
    """
    import torch

    from causalt2i.generation import GenerationRequest, generate

    modes = [(module, module.training) for module in modules]
    devices = [parts.device] if parts.device.type == "cuda" else []
    started = time.perf_counter()
    images = []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), (autocast or contextlib.nullcontext()):
            for module, _ in modes:
                module.eval()
            for prompt in prompts:
                request = GenerationRequest(prompt=prompt, steps=sampling_steps, guidance=guidance, seed=seed, n=1)
                images.append(generate(parts, request, token_ids=token_ids).images[0])
    finally:
        for module, training in modes:
            module.train(training)
    seconds = time.perf_counter() - started

    root = Path(run_dir) / PREVIEWS_DIR
    final = root / step_folder_name(step)
    staging = root / f".{final.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    files = []
    for index, image in enumerate(images):
        name = image_name(index)
        (staging / name).write_bytes(png_bytes(image))
        files.append(name)
    record = {"step": step, "seed": seed, "prompts": list(prompts), "files": files, "sampling_steps": sampling_steps,
              "guidance": guidance, "width": images[0].width, "height": images[0].height, "seconds": round(seconds, 4)}
    (staging / PREVIEW_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
    if final.exists():  # a resumed run renders a step again: the same weights give the same bytes
        shutil.rmtree(final)
    os.rename(staging, final)
    return final


def list_previews(run_dir: str | Path) -> list[dict]:
    """The complete previews in a run folder, by step: each `preview.json` plus its `folder`."""
    root = Path(run_dir) / PREVIEWS_DIR
    found = []
    for folder in sorted(root.glob(f"{STEP_FOLDER_PREFIX}*")):
        record_file = folder / PREVIEW_FILE
        if record_file.is_file():
            found.append({**json.loads(record_file.read_text()), "folder": str(folder)})
    return found


def preview_grid(rows: list[tuple[int, list[Image.Image]]], prompts: list[str], *, cell: int = 192) -> Image.Image:
    """A grid of previews: one row per step (labelled at its left), one column per prompt (labelled on top)."""
    font = ImageFont.load_default()
    label_w, header_h, pad = 96, 36, 4
    columns = max((len(images) for _, images in rows), default=len(prompts)) or 1
    width = label_w + columns * (cell + pad) + pad
    height = header_h + len(rows) * (cell + pad) + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for column, prompt in enumerate(prompts[:columns]):
        x = label_w + pad + column * (cell + pad)
        text = prompt if len(prompt) <= 30 else prompt[:28] + "..."
        draw.text((x, 4), text, fill="black", font=font)
    for row, (step, images) in enumerate(rows):
        y = header_h + pad + row * (cell + pad)
        draw.text((6, y + cell // 2 - 6), f"step {step}", fill="black", font=font)
        for column, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (label_w + pad + column * (cell + pad), y))
    return grid
