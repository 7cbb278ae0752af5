"""Exports of a tenant adapter for other tools: diffusers, kohya (ComfyUI / Automatic1111), textual inversion.

An adapter is only useful elsewhere with both halves: the attn2 LoRA *and* the identifier-token embeddings
(without them `<s1>` means nothing to the base). Every export therefore carries the embeddings and a README.

- `diffusers`: `pytorch_lora_weights.safetensors`, the LoRA in diffusers/peft naming (`unet.<module>.lora_A.weight`),
  rank and alpha in the `lora_adapter_metadata` header that `load_lora_weights` reads; plus `embeddings/`.
- `kohya`: `<name>.safetensors` in the layout kohya's sd-scripts writes for SDXL and that ComfyUI, Automatic1111
  and diffusers' kohya converter read: `lora_unet_<SGM module path>.lora_down.weight` / `.lora_up.weight` /
  `.alpha`, with SGM block names (`input_blocks.4.1`, `middle_block.1`, `output_blocks.0.1`); plus `embeddings/`.
- `embeddings`: `embeddings/<token>.safetensors`, one SDXL textual-inversion file per identifier token with
  `clip_l` [1, d_te1] and `clip_g` [1, d_te2] (768 and 1280 on SDXL), named after the token without `<>`.

A `full`-mode adapter has no LoRA form: `diffusers` and `kohya` refuse it and say to compress it first
(`causalt2i.compress`); `embeddings` works for every adapter.

`export_files` returns the export as {relative path: bytes} (what a streamed download zips, see
`zip_chunks`: the archive is produced piece by piece, never whole); `write_export` writes it as a folder, atomically (a temp folder renamed into place).
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import BinaryIO

import torch
from safetensors.torch import save as save_safetensors

from causalt2i.adapter import TE1_ROWS, TE2_ROWS, Adapter, load_adapter
from causalt2i.atomic import atomic_write_bytes, fsync_dir
from causalt2i.lora import LORA_A, LORA_B, LORA_B_BIAS, LoRAFactors, peft_config
from causalt2i.models import TINY, ModelLoadError

FORMATS = ("diffusers", "kohya", "embeddings")
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
EMBEDDINGS_DIR = "embeddings"
README_FILE = "README.md"
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base
_FILE_STEM = re.compile(r"^[A-Za-z0-9_\-]+$")


class ExportError(ValueError):
    """An export that cannot be made. `field` names the input at fault (`format`, `adapter`, `out`)."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass
class Export:
    format: str
    files: dict[str, bytes]  # relative path -> content
    notes: list[str] = field(default_factory=list)  # what a user must know (also in the README)

    @property
    def nbytes(self) -> int:
        return sum(len(data) for data in self.files.values())


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ExportError("format", f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


# --- names --------------------------------------------------------------------------------------------
def embedding_stem(token: str) -> str:
    """The file stem (and Automatic1111 / ComfyUI prompt word) of a token: `<s1>` -> `s1`, `sks` -> `sks`.

    `<` and `>` are dropped: Windows forbids them in file names, and Automatic1111 reads `<...>` in a prompt
    as an extra-network tag.
    """
    stem = token[1:-1] if token.startswith("<") and token.endswith(">") else token
    if not _FILE_STEM.match(stem):
        raise ExportError("adapter", f"token {token!r} does not make a portable file name")
    return stem


def sgm_module_name(module: str, layers_per_block: int) -> str:
    """A diffusers U-Net attention module path in the SGM (original SDXL) naming that kohya's scripts use.

    `down_blocks.i.attentions.j` is `input_blocks.{1 + i(L+1) + j}.1`, `mid_block.attentions.0` is
    `middle_block.1`, `up_blocks.i.attentions.j` is `output_blocks.{i(L+1) + j}.1`, with L = layers per
    block: the inverse of diffusers' `_maybe_map_sgm_blocks_to_diffusers`.
    """
    per_block = layers_per_block + 1
    if match := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
        block, layer, rest = int(match[1]), int(match[2]), match[3]
        return f"input_blocks.{1 + block * per_block + layer}.1.{rest}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
        return f"middle_block.1.{match[1]}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
        block, layer, rest = int(match[1]), int(match[2]), match[3]
        return f"output_blocks.{block * per_block + layer}.1.{rest}"
    raise ExportError("adapter", f"{module} is not a U-Net attention module this export knows how to name")


def kohya_name(module: str, layers_per_block: int) -> str:
    return "lora_unet_" + sgm_module_name(module, layers_per_block).replace(".", "_")


# --- the pieces ---------------------------------------------------------------------------------------
def _safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)


def embedding_files(adapter: Adapter) -> dict[str, bytes]:
    """`embeddings/<stem>.safetensors` per token: {'clip_l': [1, d1], 'clip_g': [1, d2]} (SDXL textual inversion)."""
    files: dict[str, str] = {}
    out = {}
    for index, token in enumerate(adapter.manifest.tokens):
        stem = embedding_stem(token)
        if stem in files:
            raise ExportError("adapter", f"tokens {files[stem]!r} and {token!r} would share the file {stem}.safetensors")
        files[stem] = token
        rows = {"clip_l": adapter.tensors[TE1_ROWS][index : index + 1].float(), "clip_g": adapter.tensors[TE2_ROWS][index : index + 1].float()}
        out[f"{EMBEDDINGS_DIR}/{stem}.safetensors"] = _safetensors(rows, {"format": "pt", "token": token})
    return out


def _lora_factors(adapter: Adapter, fmt: str) -> dict[str, LoRAFactors]:
    if adapter.manifest.param_mode != "lora":
        raise ExportError(
            "adapter",
            f"{adapter.manifest.tenant}/{adapter.manifest.name} is a full-mode adapter; it exports as a LoRA only through "
            f"compression: run `ct2i compress ADAPTER --energy 0.99 --out DIR` and export DIR as {fmt} "
            "(the embeddings alone export from any adapter: --format embeddings)",
        )
    return adapter.lora_factors()


def diffusers_lora_metadata(factors: dict[str, LoRAFactors]) -> dict:
    """The peft `LoraConfig` fields diffusers' `load_lora_into_unet` builds the adapter from (prefix `unet.`).

    Only the fields that shape the adapter, so the header also suits peft versions other than this one.
    """
    config = peft_config({m: f.rank for m, f in factors.items()}, {m: f.alpha for m, f in factors.items()}, bias=carries_bias(factors))
    fields = {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": sorted(config.target_modules),
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "lora_bias": config.lora_bias,
        "lora_dropout": 0.0,
        "use_dora": False,
    }
    return {f"unet.{key}": value for key, value in fields.items()}


def carries_bias(factors: dict[str, LoRAFactors]) -> bool:
    return any(f.bias is not None for f in factors.values())


def diffusers_lora_file(factors: dict[str, LoRAFactors]) -> bytes:
    """The diffusers LoRA file. peft's `lora_bias` is one switch for every adapted layer, so when some
    module carries a bias change, the others get a zero `lora_B.bias` (no missing keys, no effect)."""
    with_bias = carries_bias(factors)
    tensors = {}
    for module, f in factors.items():
        tensors[f"unet.{module}{LORA_A}"] = f.down.float()
        tensors[f"unet.{module}{LORA_B}"] = f.up.float()
        if with_bias:
            tensors[f"unet.{module}{LORA_B_BIAS}"] = torch.zeros(f.up.shape[0]) if f.bias is None else f.bias.float()
    metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(diffusers_lora_metadata(factors), indent=2, sort_keys=True)}
    return _safetensors(tensors, metadata)


def kohya_lora_tensors(factors: dict[str, LoRAFactors], layers_per_block: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """kohya's `lora_down` / `lora_up` / `alpha` per module, and notes on what the format could not hold.

    kohya's scale is alpha / rank per module. diffusers' converter keeps one alpha for the whole file (a
    second distinct value is mapped to no module and silently ignored), so every module gets the adapter's
    most common alpha, and a module whose own scale differs has the ratio folded into `lora_up`. kohya has
    no bias term: a compressed full tune's bias changes are dropped, and the notes say so.
    """
    alpha = collections.Counter(f.alpha for f in factors.values()).most_common(1)[0][0]
    tensors: dict[str, torch.Tensor] = {}
    dropped_bias = []
    for module, f in factors.items():
        name = kohya_name(module, layers_per_block)
        up = f.up.float()
        if f.alpha != alpha:
            up = up * (f.scale * f.rank / alpha)
        tensors[f"{name}.lora_down.weight"] = f.down.float()
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
        if f.bias is not None and bool(f.bias.any()):
            dropped_bias.append(module)
    notes = []
    if dropped_bias:
        notes.append(
            f"The kohya format has no bias term: the bias changes of {len(dropped_bias)} to_out.0 layers (carried by this "
            "compressed adapter as lora_B.bias) are not in this file. The diffusers export keeps them."
        )
    return tensors, notes


def unet_layers_per_block(base_model: str) -> int:
    """`layers_per_block` of the base's U-Net config, which fixes the SGM block numbers."""
    if base_model == TINY:
        from causalt2i.tiny import TINY_CONFIGS, read_config

        value = read_config(TINY_CONFIGS, "unet")["layers_per_block"]
    else:
        from diffusers import UNet2DConditionModel

        try:
            config = UNet2DConditionModel.load_config(base_model, subfolder="unet", local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1")
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot read the U-Net config of {base_model!r}: {err}") from err
        value = config["layers_per_block"]
    if not isinstance(value, int):
        raise ExportError("adapter", f"the base's U-Net has per-block layer counts {value}; kohya's SDXL naming needs one count")
    return value


# --- README ------------------------------------------------------------------------------------------
def _prompts(adapter: Adapter) -> list[str]:
    from causalt2i.spec import join_subject_phrases

    phrases = [f"a {s.token} {s.class_word}" for s in adapter.manifest.subjects]
    return phrases + ([join_subject_phrases(phrases)] if len(phrases) > 1 else [])


def _pipeline_lines(base_model: str) -> list[str]:
    if base_model == TINY:
        return [
            "# 'tiny' is this project's offline test preset, built in code rather than downloaded:",
            "from causalt2i.models import load_sdxl",
            "parts = load_sdxl('tiny')",
            "pipe = StableDiffusionXLPipeline(vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,",
            "                                 tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=parts.unet,",
            "                                 scheduler=parts.noise_scheduler, add_watermarker=False)",
        ]
    return [f"pipe = StableDiffusionXLPipeline.from_pretrained({base_model!r}, torch_dtype=dtype, add_watermarker=False)"]


def fusable(adapter: Adapter, fmt: str) -> bool:
    """Whether diffusers' `fuse_lora` can merge this export: peft refuses a `lora_bias` on layers without a bias."""
    return fmt == "kohya" or not carries_bias(adapter.lora_factors())


def diffusers_snippet(adapter: Adapter, fmt: str, lora_file: str | None, export_dir: str = "EXPORT_DIR") -> str:
    """Python that reproduces `ct2i generate` with this export: bitwise on the CPU in fp32 when the LoRA can be
    fused (merged as ct2i serves it), else within one level of 255 (the unfused sum rounds differently)."""
    prompt = _prompts(adapter)[-1]
    lines = [
        "import torch",
        "from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline",
        "from safetensors.torch import load_file",
        "",
        f"export_dir = {export_dir!r}",
        "device = 'cuda' if torch.cuda.is_available() else 'cpu'",
        "dtype = torch.float16 if device == 'cuda' else torch.float32",
        *_pipeline_lines(adapter.manifest.base_model),
        "pipe.to(device, dtype)",
        "# ct2i samples with DPM-Solver++ (multistep) on the base's own schedule.",
        "pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type='dpmsolver++')",
    ]
    if lora_file is not None:
        lines.append(f"pipe.load_lora_weights(export_dir, weight_name={lora_file!r})")
        if fusable(adapter, fmt):
            lines.append("pipe.fuse_lora()  # merge W + scale * B @ A, as ct2i serves it (unfused differs by float rounding only)")
        else:
            lines.append("# No fuse_lora(): this adapter changes the to_out.0 biases (peft's lora_bias), which peft cannot fuse.")
    lines += ["for token, stem in {" + ", ".join(f"{t!r}: {embedding_stem(t)!r}" for t in adapter.manifest.tokens) + "}.items():",
              f"    rows = load_file(f'{{export_dir}}/{EMBEDDINGS_DIR}/{{stem}}.safetensors')",
              "    pipe.load_textual_inversion(rows['clip_l'], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)",
              "    pipe.load_textual_inversion(rows['clip_g'], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)",
              "# SDXL's text-encoder configs carry the legacy eos_token_id 2, with which transformers pools at the",
              "# largest token id -- an added identifier token. Pool at the real end-of-text token, as ct2i does.",
              "for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):",
              "    encoder.config.eos_token_id = tokenizer.eos_token_id",
              "    getattr(encoder, 'text_model', encoder).eos_token_id = tokenizer.eos_token_id  # what CLIP pools by",
              "# ct2i's seed s gives image i the CPU generator seeded s + i; an empty negative prompt is a zero embedding.",
              f"image = pipe({prompt!r}, num_inference_steps=30, guidance_scale=7.5,",
              "             generator=[torch.Generator('cpu').manual_seed(0)], output_type='pil').images[0]",
              "image.save('image.png')"]
    return "\n".join(lines)


def readme(adapter: Adapter, fmt: str, files: dict[str, bytes], notes: list[str], lora_file: str | None) -> str:
    m = adapter.manifest
    out = [f"# {m.tenant}/{m.name}: CausalT2I adapter, {fmt} export", ""]
    out += ["## Subjects", "", "| token (diffusers) | class | embedding file | word in Automatic1111 / ComfyUI |", "|---|---|---|---|"]
    for s in m.subjects:
        stem = embedding_stem(s.token)
        out.append(f"| `{s.token}` | {s.class_word} | `{EMBEDDINGS_DIR}/{stem}.safetensors` | `{stem}` / `embedding:{stem}` |")
    out += ["", "Prompts that use them (the prompts it was tuned on):", ""] + [f"- `{p}`" for p in _prompts(adapter)]
    out += ["", "## Provenance", "", f"- base model: `{m.base_model}`", f"- base fingerprint (sha256 of its attn2 tensors): `{m.base_fingerprint}`",
            f"- adapter: {m.param_mode} mode, step {m.step}, tensors sha256 `{m.tensors_sha256}`"]
    if m.param_mode == "lora":
        ranks = sorted({f.rank for f in adapter.lora_factors().values()})
        out.append(f"- LoRA on the attn2 projections: rank {ranks[0] if len(ranks) == 1 else f'{ranks[0]}..{ranks[-1]} per module'}, scale alpha / rank = {m.lora_scale}")
    if m.compressed_from is not None:
        c = m.compressed_from
        fid = c.fidelity
        psnr = "identical images" if fid.psnr_db is None else f"PSNR {fid.psnr_db:.2f} dB"
        out.append(f"- compressed from the full adapter {c.source_tenant}/{c.source_name} (sha256 `{c.source_sha256}`) by truncated SVD "
                   f"({'energy ' + str(c.energy) if c.energy is not None else 'rank ' + str(c.rank)}); against it: {psnr}, max |Δ| {fid.max_abs_diff}/255")
    out += ["", "## Files", ""] + [f"- `{name}` ({len(data):,} bytes)" for name, data in sorted(files.items())]
    if notes:
        out += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    exactness = "bitwise on the CPU in fp32" if lora_file is None or fusable(adapter, fmt) else "within one level of 255 on the CPU in fp32"
    out += ["", "## diffusers", "", f"This reproduces `ct2i generate --prompt ... --seed 0 --steps 30 --guidance 7.5` ({exactness}):", "",
            "```python", diffusers_snippet(adapter, fmt, lora_file), "```"]
    if fmt == "kohya" and lora_file is not None:
        out += ["", "## ComfyUI and Automatic1111", "",
                f"- ComfyUI: `{lora_file}` into `models/loras/` (LoraLoader), the embedding files into `models/embeddings/`; "
                f"write `embedding:{embedding_stem(m.tokens[0])}` where the prompt has `{m.tokens[0]}`.",
                f"- Automatic1111: `{lora_file}` into `models/Lora/` and add `<lora:{Path(lora_file).stem}:1>` to the prompt; the embedding "
                f"files into `embeddings/`; write `{embedding_stem(m.tokens[0])}` where the prompt has `{m.tokens[0]}`."]
    return "\n".join(out) + "\n"


# --- entry points -------------------------------------------------------------------------------------
def export_files(adapter: Adapter, fmt: str, *, layers_per_block: int | None = None) -> Export:
    """The export of `adapter` in format `fmt` as {relative path: bytes}, README included.

    `layers_per_block` (kohya only) is read from the base's U-Net config when not given.
    """
    check_format(fmt)
    files = embedding_files(adapter)
    notes: list[str] = []
    lora_file = None
    if fmt == "diffusers":
        lora_file = DIFFUSERS_LORA_FILE
        files[lora_file] = diffusers_lora_file(_lora_factors(adapter, fmt))
    elif fmt == "kohya":
        factors = _lora_factors(adapter, fmt)
        if layers_per_block is None:
            layers_per_block = unet_layers_per_block(adapter.manifest.base_model)
        tensors, notes = kohya_lora_tensors(factors, layers_per_block)
        ranks = collections.Counter(f.rank for f in factors.values())
        metadata = {
            "format": "pt",
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(ranks.most_common(1)[0][0]),
            "ss_network_alpha": str(next(iter(tensors[k] for k in tensors if k.endswith(".alpha"))).item()),
            "ss_base_model_version": "sdxl_base_v1-0",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.title": f"{adapter.manifest.tenant}/{adapter.manifest.name}",
            "ct2i_base_model": adapter.manifest.base_model,
            "ct2i_base_fingerprint": adapter.manifest.base_fingerprint,
            "ct2i_tokens": json.dumps(adapter.manifest.tokens),
        }
        lora_file = f"{adapter.manifest.name}.safetensors"
        files[lora_file] = _safetensors(tensors, metadata)
    files[README_FILE] = readme(adapter, fmt, files, notes, lora_file).encode("utf-8")
    return Export(format=fmt, files=files, notes=notes)


def write_export(adapter: Adapter | str | Path, fmt: str, out_dir: str | Path, *, layers_per_block: int | None = None) -> Export:
    """Write the export as the folder `out_dir` (new or empty): built in a temp folder beside it, then renamed.

    Nothing is written when the input is refused; a reader never sees a half-written export folder.
    """
    check_format(fmt)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError("out", f"{out_dir} exists and is not an empty folder; nothing was written")
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter)
    export = export_files(adapter, fmt, layers_per_block=layers_per_block)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        for name, data in export.files.items():
            atomic_write_bytes(staging / name, data)
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(staging, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return export


ZIP_CHUNK_BYTES = 64 * 1024
"""The most file bytes `zip_chunks` puts in one piece (plus at most one entry's header or the central directory)."""


class _Pieces:
    """A write-only, unseekable sink: zipfile then writes each entry's sizes in a data descriptor after its data,
    so nothing already handed out has to be patched, and `take` can pass the bytes on as they come."""

    def __init__(self):
        self._parts: list[bytes] = []

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


def zip_chunks(export: Export, chunk_bytes: int = ZIP_CHUNK_BYTES) -> Iterator[bytes]:
    """The export as a zip archive (stored, files in name order), yielded in pieces of at most about `chunk_bytes`:
    what a streamed HTTP download sends, so the archive is never held whole beside the files it is made of."""
    sink = _Pieces()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as archive:  # type: ignore[arg-type]
        for name, data in sorted(export.files.items()):
            with archive.open(name, "w", force_zip64=len(data) >= zipfile.ZIP64_LIMIT) as entry:
                for start in range(0, len(data), chunk_bytes):
                    entry.write(data[start:start + chunk_bytes])
                    if piece := sink.take():
                        yield piece
            if piece := sink.take():
                yield piece
    if piece := sink.take():
        yield piece  # the central directory


def write_zip(export: Export, handle: BinaryIO) -> None:
    """The export as a zip archive into a binary stream: the same bytes `zip_chunks` yields."""
    for piece in zip_chunks(export):
        handle.write(piece)
