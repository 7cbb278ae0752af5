"""Real SDXL shapes without weights: parameter counts, the watched attn2 layers, adapter sizes, and the GPU
memory plan of a tuning job. Everything is built on the meta device (no memory, no download).

The structure comes from the base's own configs: `tiny` → `causalt2i/configs/tiny`; a local diffusers
folder → its configs; a hub id → its configs in the local Hugging Face cache, else the official
`stabilityai/stable-diffusion-xl-base-1.0` configs kept in `causalt2i/configs/sdxl-base-1.0` (an SDXL
fine-tune has the same shapes; give a folder to plan another architecture exactly). E_I is CLIP ViT-L/14
(`causalt2i/configs/clip-vit-large-patch14`) unless the spec names a folder.

How each term of the memory plan is derived (all for one worker process on one GPU):

- **frozen weights**: the parameter count of every frozen module (from the meta models) × the bytes of
  the policy's dtype: bf16 (2 B) for U-Net, both text encoders and E_I under `bf16`, fp32 (4 B) under
  `fp32`. The VAE is fp32 unless its config says `force_upcast: false` (the fp16-fix VAE). In `full`
  mode the attn2 projections are not frozen and are counted below, not here.
- **trainable fp32 masters**: the trainable parameters (attn2 projections in `full`, the LoRA factors
  in `lora`; plus token rows, masks, β, the intervention network) × 4 B.
- **gradients**: the same count × 4 B (fp32 gradients of fp32 masters).
- **optimizer**: AdamW's `exp_avg` and `exp_avg_sq`, 2 × 4 B per trainable parameter.
- **autocast weight copies**: under bf16, autocast casts each fp32 trainable weight to bf16 once per
  forward and keeps the copy for backward: 2 B per trainable attention parameter. Measured, not assumed:
  the autocast emulation below records the casts it caches.
- **activations**: the bytes autograd keeps for backward in one forward of the CausalT2I objective
  (`CausalT2I.loss`, the same code the trainer runs) at resolution² with the spec's subjects, measured by
  running that forward on the meta device under a saved-tensors hook, each storage counted once and
  parameters excluded. CUDA autocast is emulated (matmul/conv/SDPA inputs cast to bf16, norms, softmax
  and losses in fp32), since autocast does not run on the meta device. With gradient checkpointing the
  hook sees only what lives outside the checkpointed blocks; the blocks' inputs are added, and so is the
  largest block's own saved set, which backward recomputes one block at a time.
- **CUDA context and allocator reserve**: not measurable without a GPU, so an allowance: 1 GiB for the
  CUDA context and library workspaces (outside `torch.cuda.max_memory_allocated`) and 10% of the rest for
  the caching allocator's fragmentation.

The sum counts gradients and activations at once, an upper bound on the peak (attn2 gradients are filled
in while activations are freed), so a plan that fits leaves a margin. Data parallelism with DeepSpeed
ZeRO-2 would divide gradients and optimizer states by the number of workers; the plan does not assume it.

Checked against the reference figure of issue 11, a naive CausalT2I step on one H200 with bf16 frozen
weights (`full`, no checkpointing, 1024²), which peaked at 17.4 GB (`REFERENCE_PEAK_GB`). For that
configuration with two subjects the plan gives frozen weights 6.62 GB, fp32 attn2 masters 2.19, gradients
2.19, autocast copies 1.10 and activations 8.12: 20.2 GB allocated before AdamW's states exist (16% above
the reference, as an upper bound should be: it counts every gradient and activation at once), 24.6 GB
once they do (4.39 GB of AdamW states), and 28.2 GB with the allowances. `tests/causalt2i/test_plan.py`
holds the first-step figure between the reference and 25% above it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from causalt2i import tiny
from causalt2i.spec import TuningSpec

REFERENCE_PEAK_GB = 17.4
GPU_MEMORY_ENV = "CT2I_GPU_MEMORY_GB"
DEFAULT_GPU_MEMORY_GB = 80.0
GIB = 1024**3
GB = 1e9
CUDA_CONTEXT_BYTES = 1 * GIB
FRAGMENTATION = 0.10
ADAM_STATES = 2
MODES = ("full", "lora")
POLICIES = ("bf16", "fp32")
CHECKPOINTING = (False, True)


class PlanError(ValueError):
    """A spec whose plan does not fit what it asks for. `field` names the spec field to change."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def gpu_memory_gb(environ: dict[str, str] | None = None) -> float:
    """Memory of one GPU in GB (1e9 bytes): `CT2I_GPU_MEMORY_GB`, default 80."""
    value = (os.environ if environ is None else environ).get(GPU_MEMORY_ENV)
    if not value:
        return DEFAULT_GPU_MEMORY_GB
    try:
        parsed = float(value)
    except ValueError:
        raise PlanError(GPU_MEMORY_ENV, f"must be a number of GB, got {value!r}") from None
    if parsed <= 0:
        raise PlanError(GPU_MEMORY_ENV, f"must be positive, got {value!r}")
    return parsed


# --- where the configs come from --------------------------------------------------------------------------


def _hub_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json"], local_files_only=True))
    except (OSError, ValueError):  # not in the local cache, or not a repo id
        return None


def config_sources(base_model: str, image_encoder: str | None = None) -> tuple[Path, Path]:
    """(SDXL config folder, E_I config folder) for a base model and an optional E_I source."""
    if base_model == "tiny":
        sdxl = tiny.TINY_CONFIGS
        default_encoder = tiny.TINY_IMAGE_ENCODER_CONFIGS
    else:
        local = Path(base_model)
        if local.is_dir() and (local / "unet" / "config.json").is_file():
            sdxl = local
        else:
            sdxl = _hub_snapshot(base_model) or tiny.OFFICIAL_SDXL_CONFIGS
            if not (sdxl / "unet" / "config.json").is_file():
                sdxl = tiny.OFFICIAL_SDXL_CONFIGS
        default_encoder = tiny.OFFICIAL_IMAGE_ENCODER_CONFIGS
    encoder = default_encoder
    if image_encoder not in (None, "tiny"):
        local = Path(image_encoder)
        found = local if (local / "config.json").is_file() else _hub_snapshot(image_encoder)
        encoder = found if found is not None and (found / "config.json").is_file() else tiny.OFFICIAL_IMAGE_ENCODER_CONFIGS
    elif image_encoder == "tiny":
        encoder = tiny.TINY_IMAGE_ENCODER_CONFIGS
    return sdxl, encoder


def _vae_force_upcast(sdxl: Path, vae: str | None) -> bool:
    """Whether the VAE must stay fp32; an unreadable override counts as the cautious answer, yes."""
    if vae:
        local = Path(vae)
        folder = local if (local / "config.json").is_file() else _hub_snapshot(vae)
        if folder is None or not (folder / "config.json").is_file():
            return True
        return bool(json.loads((folder / "config.json").read_text()).get("force_upcast", True))
    return bool(tiny.read_config(sdxl, "vae").get("force_upcast", True))


# --- the structure ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attn2Projection:
    layer: str  # the attn2 module, e.g. down_blocks.1.attentions.0.transformer_blocks.0.attn2
    projection: str  # to_q, to_k, to_v or to_out.0
    in_features: int
    out_features: int
    has_bias: bool


@dataclass(frozen=True)
class Structure:
    """Counts of the real shapes. Parameter counts are exact; nothing here depends on weights."""

    sdxl_configs: str
    image_encoder_configs: str
    unet_params: int
    text_encoder_params: int
    text_encoder_2_params: int
    image_encoder_params: int
    vae_params: int
    projections: tuple[Attn2Projection, ...]
    text_widths: tuple[int, int]  # hidden sizes of te1, te2 (token-row widths)
    image_dim: int  # d_I
    text_dim: int  # te1 + te2

    @property
    def attn2_params(self) -> int:
        return sum(p.in_features * p.out_features + (p.out_features if p.has_bias else 0) for p in self.projections)

    @property
    def attn2_kv_params(self) -> int:
        return sum(p.in_features * p.out_features for p in self.projections if p.projection in ("to_k", "to_v"))

    @property
    def attn2_layers(self) -> list[str]:
        return sorted({p.layer for p in self.projections})

    def lora_params(self, rank: int) -> int:
        """A [r, in] and B [out, r] per attn2 projection (no LoRA bias)."""
        return sum(rank * (p.in_features + p.out_features) for p in self.projections)

    def aux_params(self, n_subjects: int) -> int:
        """Token rows (both encoders), masks, β and the intervention network: trainable in every mode."""
        d_i, d_t = self.image_dim, self.text_dim
        rows = n_subjects * sum(self.text_widths)
        masks = (n_subjects + 1) * d_i
        beta = n_subjects * d_i
        network = 2 * (d_i * d_i + d_i) + d_i * d_t + d_t + 1
        return rows + masks + beta + network

    def trainable_attention_params(self, mode: str, rank: int) -> int:
        return self.attn2_params if mode == "full" else self.lora_params(rank)

    def adapter_bytes(self, mode: str, n_subjects: int, rank: int = 16) -> int:
        """Tensor bytes of an adapter: attn2 in bf16 (`full`) or LoRA factors in fp32, token rows in fp32."""
        attention = self.attn2_params * 2 if mode == "full" else self.lora_params(rank) * 4
        return attention + n_subjects * sum(self.text_widths) * 4


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@lru_cache(maxsize=8)
def _structure(sdxl: Path, encoder: Path) -> Structure:
    from causalt2i.models import ATTN2_PROJECTIONS, attn2_modules

    with torch.device("meta"):
        built = tiny.build_sdxl_components(sdxl, encoder)
    unet = built["unet"]
    projections = []
    for module_name, module in attn2_modules(unet).items():
        for projection in ATTN2_PROJECTIONS:
            linear = module.get_submodule(projection)
            projections.append(Attn2Projection(module_name, projection, linear.in_features, linear.out_features, linear.bias is not None))
    te1, te2 = built["text_encoder"], built["text_encoder_2"]
    return Structure(
        sdxl_configs=str(sdxl),
        image_encoder_configs=str(encoder),
        unet_params=_count(unet),
        text_encoder_params=_count(te1),
        text_encoder_2_params=_count(te2),
        image_encoder_params=_count(built["image_encoder"]),
        vae_params=_count(built["vae"]),
        projections=tuple(projections),
        text_widths=(te1.config.hidden_size, te2.config.hidden_size),
        image_dim=built["image_encoder"].config.projection_dim,
        text_dim=te1.config.hidden_size + te2.config.hidden_size,
    )


def structure(base_model: str = tiny.OFFICIAL_BASE_MODEL, image_encoder: str | None = None) -> Structure:
    return _structure(*config_sources(base_model, image_encoder))


def shape_device(base_model: str) -> str:
    """Where the shape runs build models: the meta device, except for `tiny`, which is built for real on the
    CPU (a few MB): the same bytes are saved on any device, and the meta device's Python kernels are
    slower than running the tiny model."""
    return "cpu" if base_model == "tiny" else "meta"


def shape_parts(base_model: str = tiny.OFFICIAL_BASE_MODEL, image_encoder: str | None = None, *, dtype: torch.dtype = torch.float32, device: str = "meta"):
    """`SDXLParts` of the real shapes on `device` (meta: no memory), frozen modules in `dtype` (VAE by its rule)."""
    from diffusers import DDPMScheduler

    from causalt2i.models import SDXLParts, vae_dtype

    sdxl, encoder = config_sources(base_model, image_encoder)
    with torch.device(device):
        built = tiny.build_sdxl_components(sdxl, encoder)
    modules = {k: built[k] for k in ("text_encoder", "text_encoder_2", "unet", "vae", "image_encoder")}
    for name, module in modules.items():
        module.requires_grad_(False).eval()
        module.to(dtype=vae_dtype(module, dtype) if name == "vae" else dtype)
    parts = SDXLParts(
        base_model=base_model,
        tokenizer=built["tokenizer"],
        tokenizer_2=built["tokenizer_2"],
        noise_scheduler=DDPMScheduler.from_config(built["scheduler_config"]),
        default_resolution=modules["unet"].config.sample_size * 8,
        _fingerprint="shapes only",  # the weights are meaningless here
        **modules,
    )
    return parts


def watched_layers(resolution: int, base_model: str = tiny.OFFICIAL_BASE_MODEL) -> list[str]:
    """The attn2 layers the SCaG recorder watches for a resolution² canvas (the recorder's own rule)."""
    from causalt2i.attention import install_recorder
    from causalt2i.method import RECORD_MAX_TOKENS
    from causalt2i.models import attn2_modules

    device = shape_device(base_model)
    parts = shape_parts(base_model, device=device)
    unet = parts.unet
    recorder = install_recorder(unet, RECORD_MAX_TOKENS)
    watched: list[str] = []
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, kwargs, name=name: watched.append(name) if recorder.watches(args[0].shape[1] if args else kwargs["hidden_states"].shape[1]) else None, with_kwargs=True)
        for name, module in attn2_modules(unet).items()
    ]
    latent = resolution // 8
    cross = unet.config.cross_attention_dim
    pooled = parts.text_encoder_2.config.projection_dim
    with torch.device(device), torch.no_grad():
        unet(
            torch.zeros(1, unet.config.in_channels, latent, latent),
            torch.zeros(1, dtype=torch.long),
            encoder_hidden_states=torch.zeros(1, 77, cross),
            added_cond_kwargs={"text_embeds": torch.zeros(1, pooled), "time_ids": torch.zeros(1, 6)},
        )
    for hook in hooks:
        hook.remove()
    return sorted(dict.fromkeys(watched))


# --- activations on the meta device -----------------------------------------------------------------------

_LOW_PRECISION = {F.linear, F.conv2d, F.conv1d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
                  torch.bmm, torch.baddbmm, torch.addmm, torch.mm, F.scaled_dot_product_attention}
_FULL_PRECISION = {F.group_norm, F.layer_norm, torch.softmax, torch.Tensor.softmax, F.softmax, F.log_softmax, F.mse_loss,
                   F.cosine_similarity, torch.norm, torch.Tensor.norm}


class _FusedAttention(torch.autograd.Function):
    """SDPA as CUDA's flash / memory-efficient kernels run it: saves q, k, v, the output and the fp32
    log-sum-exp, never the L × L matrix that the math fallback (the only one on meta or CPU) keeps."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = torch.empty(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=query.device)
        logsumexp = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the plan only measures the forward
        query, key, value, _, _ = ctx.saved_tensors
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)


class AutocastEmulation(TorchFunctionMode):
    """CUDA autocast's casting rules on any device (the meta device has no autocast).

    Inputs of matmul, linear, conv and SDPA are cast to `dtype`, with leaf tensors that require grad cast
    once and cached as autocast does; norms, softmax and losses run in fp32 (`dtype` None: no casts, as
    under the fp32 policy). SDPA runs as the fused CUDA kernels save it (`_FusedAttention`). The bytes of
    the cached weight copies are kept in `cached_bytes`.
    """

    def __init__(self, dtype: torch.dtype | None = torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        self.cache: dict[int, torch.Tensor] = {}
        self.cached_keys: set[int] = set()  # storages of the cached copies
        self.cached_bytes = 0

    def _cast(self, value, dtype: torch.dtype):
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, dtype) for v in value)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype == dtype:
            return value
        if value.is_leaf and value.requires_grad and dtype == self.dtype:
            cached = self.cache.get(id(value))
            if cached is None:
                cached = self.cache[id(value)] = value.to(dtype)
                self.cached_keys.add(cached.untyped_storage()._cdata)
                self.cached_bytes += cached.numel() * cached.element_size()
            return cached
        return value.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = None if self.dtype is None else self.dtype if func in _LOW_PRECISION else torch.float32 if func in _FULL_PRECISION else None
        if target is not None:
            args = self._cast(args, target)
            kwargs = {k: self._cast(v, target) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention:
            return _FusedAttention.apply(*args[:3])
        return func(*args, **kwargs)


class SavedBytes:
    """Counts the distinct storages autograd saves for backward, leaving out the ones in `exclude`."""

    def __init__(self, exclude: set[int], also_exclude: set[int] = frozenset()):
        self.seen = set(exclude)
        self.also_exclude = also_exclude  # consulted live: e.g. autocast's weight copies, counted apart
        self.total = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.seen and key not in self.also_exclude:
            self.seen.add(key)
            self.total += storage.nbytes()
        return tensor

    @contextlib.contextmanager
    def counting(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
            yield self


def _storage_keys(*modules: torch.nn.Module) -> set[int]:
    return {t.untyped_storage()._cdata for module in modules for t in (*module.parameters(), *module.buffers())}


@dataclass
class ActivationMeasurement:
    activations: int  # bytes saved for backward (incl. checkpoint inputs and the largest recompute)
    autocast_copies: int  # bytes of bf16 copies of fp32 trainable weights


def _measure_activations(spec: TuningSpec, param_mode: str, dtype: torch.dtype, checkpointing: bool, resolution: int) -> ActivationMeasurement:
    from causalt2i.method import CachedExample, CausalT2I

    train = spec.train.model_copy(update={"param_mode": param_mode, "gradient_checkpointing": checkpointing})
    spec = spec.model_copy(update={"train": train})
    device = shape_device(spec.base_model)
    parts = shape_parts(spec.base_model, spec.image_encoder, dtype=dtype, device=device)
    with torch.device(device):
        model = CausalT2I(parts, spec)
    latent = resolution // 8
    with torch.device(device):
        example = CachedExample(
            latents=torch.zeros(1, parts.unet.config.in_channels, latent, latent),
            image_embeds=torch.zeros(1, parts.image_dim),
            time_ids=torch.zeros(1, 6),
        )
        noise = torch.zeros_like(example.latents)
        timesteps = torch.zeros(1, dtype=torch.long)
    # Under fp32 nothing is cast, but SDPA still runs as the fused CUDA kernels would.
    emulation = AutocastEmulation(torch.bfloat16 if dtype == torch.bfloat16 else None)
    model.autocast = lambda: emulation
    counter = SavedBytes(_storage_keys(model, parts.vae, parts.image_encoder), emulation.cached_keys)
    region_peak = 0
    if checkpointing:

        def measured_checkpoint(module, *args):
            # The checkpoint keeps its inputs for the recompute; backward recomputes one block's saved set.
            nonlocal region_peak
            for value in args:
                if isinstance(value, torch.Tensor):
                    counter.pack(value)
            region = SavedBytes(set(counter.seen), emulation.cached_keys)
            active, model.recorder._active = model.recorder._active, False
            try:
                with region.counting():
                    module(*args)
            finally:
                model.recorder._active = active
            region_peak = max(region_peak, region.total)
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

        parts.unet.enable_gradient_checkpointing(measured_checkpoint)
    with counter.counting():
        terms = model.loss(example, noise, timesteps, alpha=1.0)
        terms.total()
    return ActivationMeasurement(activations=counter.total + region_peak, autocast_copies=emulation.cached_bytes)


_ACTIVATION_CACHE: dict[tuple, ActivationMeasurement] = {}


def measure_activations(spec: TuningSpec, param_mode: str, dtype_policy: str, checkpointing: bool) -> ActivationMeasurement:
    resolution = spec.train.resolution
    cfg = spec.train
    key = (spec.base_model, spec.image_encoder, len(spec.subjects), cfg.lora_rank, cfg.lambda_text > 0, cfg.cst_grad, param_mode, dtype_policy, checkpointing, resolution)
    if key not in _ACTIVATION_CACHE:
        dtype = torch.bfloat16 if dtype_policy == "bf16" else torch.float32
        _ACTIVATION_CACHE[key] = _measure_activations(spec, param_mode, dtype, checkpointing, resolution)
    return _ACTIVATION_CACHE[key]


# --- the plan ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryTerm:
    name: str
    bytes: int
    how: str


@dataclass(frozen=True)
class MemoryPlan:
    param_mode: str
    dtype_policy: str
    gradient_checkpointing: bool
    resolution: int
    terms: tuple[MemoryTerm, ...]
    chosen: bool = False  # the spec's own combination

    @property
    def allocated_bytes(self) -> int:
        """What `torch.cuda.max_memory_allocated` would report: every term but the context and reserve."""
        return sum(t.bytes for t in self.terms if t.name not in ("cuda context", "allocator reserve"))

    @property
    def first_step_bytes(self) -> int:
        """`allocated_bytes` before AdamW has allocated its states (they appear at the first step's end)."""
        return self.allocated_bytes - self.term("optimizer (AdamW)").bytes

    @property
    def total_bytes(self) -> int:
        return sum(t.bytes for t in self.terms)

    def term(self, name: str) -> MemoryTerm:
        return next(t for t in self.terms if t.name == name)

    @property
    def label(self) -> str:
        return f"{self.param_mode}, {self.dtype_policy}, {'checkpointing' if self.gradient_checkpointing else 'no checkpointing'}"


def _policy(dtype_policy: str) -> str:
    """The plan is for a CUDA worker, where `auto` means bf16."""
    return "bf16" if dtype_policy == "auto" else dtype_policy


def memory_plan(spec: TuningSpec, *, param_mode: str | None = None, dtype_policy: str | None = None, gradient_checkpointing: bool | None = None) -> MemoryPlan:
    """The memory plan of `spec` on one GPU, or of another (mode, policy, checkpointing) for the same job."""
    cfg = spec.train
    mode = param_mode or cfg.param_mode
    policy = _policy(dtype_policy or cfg.dtype_policy)
    checkpointing = cfg.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    chosen = (mode, policy, checkpointing) == (cfg.param_mode, _policy(cfg.dtype_policy), cfg.gradient_checkpointing)
    shapes = structure(spec.base_model, spec.image_encoder)
    n = len(spec.subjects)
    frozen_bytes = 2 if policy == "bf16" else 4
    vae_bytes = 4 if policy == "fp32" or _vae_force_upcast(Path(shapes.sdxl_configs), spec.vae) else 2
    attention = shapes.trainable_attention_params(mode, cfg.lora_rank)
    frozen_unet = shapes.unet_params - (shapes.attn2_params if mode == "full" else 0)
    frozen = (frozen_unet + shapes.text_encoder_params + shapes.text_encoder_2_params + shapes.image_encoder_params) * frozen_bytes
    trainable = attention + shapes.aux_params(n)
    measured = measure_activations(spec, mode, policy, checkpointing)
    terms = [
        MemoryTerm("frozen weights", frozen + shapes.vae_params * vae_bytes,
                   f"{frozen_unet + shapes.text_encoder_params + shapes.text_encoder_2_params + shapes.image_encoder_params:,} params × {frozen_bytes} B + VAE {shapes.vae_params:,} × {vae_bytes} B"),
        MemoryTerm("trainable fp32 masters", trainable * 4, f"{trainable:,} params × 4 B"),
        MemoryTerm("gradients", trainable * 4, f"{trainable:,} × 4 B"),
        MemoryTerm("optimizer (AdamW)", trainable * 4 * ADAM_STATES, f"{trainable:,} × 2 states × 4 B"),
        MemoryTerm("autocast weight copies", measured.autocast_copies, "bf16 casts of fp32 trainable weights, measured"),
        MemoryTerm("activations", measured.activations, f"saved for backward at {cfg.resolution}², measured on the meta device"),
    ]
    allocated = sum(t.bytes for t in terms)
    terms.append(MemoryTerm("allocator reserve", int(allocated * FRAGMENTATION), f"{FRAGMENTATION:.0%} of the above (fragmentation), an allowance"))
    terms.append(MemoryTerm("cuda context", CUDA_CONTEXT_BYTES, "CUDA context and library workspaces, an allowance"))
    return MemoryPlan(mode, policy, checkpointing, cfg.resolution, tuple(terms), chosen)


def all_plans(spec: TuningSpec, progress: Callable[[int, int, str], None] | None = None) -> list[MemoryPlan]:
    """The plan of every (mode, dtype policy, gradient checkpointing) for this job; the spec's is `chosen`.

    Each measures one forward on the meta device (a few seconds for real SDXL); `progress(done, total,
    label)` is called before each."""
    combinations = [(m, p, c) for m in MODES for p in POLICIES for c in CHECKPOINTING]
    plans = []
    for index, (mode, policy, checkpointing) in enumerate(combinations):
        if progress is not None:
            progress(index, len(combinations), f"{mode}, {policy}, {'checkpointing' if checkpointing else 'no checkpointing'}")
        plans.append(memory_plan(spec, param_mode=mode, dtype_policy=policy, gradient_checkpointing=checkpointing))
    return plans


def worker_budget_bytes(spec: TuningSpec, gpu_memory: float) -> float | None:
    """GPU memory one worker may use: its share of a GPU (at most one GPU: a worker trains on one device)."""
    share = spec.resources.gpus_per_worker
    if share <= 0:
        return None
    return min(share, 1.0) * gpu_memory * GB


def check_plan_fits(spec: TuningSpec, gpu_memory: float | None = None) -> MemoryPlan | None:
    """Refuse a spec whose plan exceeds what `resources.gpus_per_worker` gives; None for a CPU job."""
    gpu_memory = gpu_memory_gb() if gpu_memory is None else gpu_memory
    budget = worker_budget_bytes(spec, gpu_memory)
    if budget is None:
        return None
    plan = memory_plan(spec)
    if plan.total_bytes > budget:
        share = spec.resources.gpus_per_worker
        needed = math.ceil(plan.total_bytes / (gpu_memory * GB) * 4) / 4
        hint = f"set gpus_per_worker to {needed:g} or more" if needed <= 1 else "it does not fit one GPU; enable gradient_checkpointing or use param_mode lora"
        raise PlanError(
            "resources.gpus_per_worker",
            f"{share:g} of a {gpu_memory:g} GB GPU is {budget / GB:.1f} GB, but the plan ({plan.label}) needs {plan.total_bytes / GB:.1f} GB; {hint}",
        )
    return plan


def format_plan(spec: TuningSpec, gpu_memory: float | None = None, progress: Callable[[int, int, str], None] | None = None) -> str:
    """The table `ct2i plan` prints: structure, then every combination's terms in GB."""
    gpu_memory = gpu_memory_gb() if gpu_memory is None else gpu_memory
    shapes = structure(spec.base_model, spec.image_encoder)
    n = len(spec.subjects)
    lines = [
        f"base model {spec.base_model} (configs: {shapes.sdxl_configs}); E_I configs: {shapes.image_encoder_configs}",
        f"U-Net {shapes.unet_params:,} params; attn2 {shapes.attn2_params:,} (to_k + to_v {shapes.attn2_kv_params:,}) in {len(shapes.attn2_layers)} layers; "
        f"LoRA rank {spec.train.lora_rank}: {shapes.lora_params(spec.train.lora_rank):,}",
        f"text encoders {shapes.text_encoder_params:,} + {shapes.text_encoder_2_params:,}; E_I {shapes.image_encoder_params:,}; VAE {shapes.vae_params:,}",
        f"recorder at {spec.train.resolution}²: watches {len(watched_layers(spec.train.resolution, spec.base_model))} of {len(shapes.attn2_layers)} attn2 layers",
        f"adapter ({n} subjects): full {shapes.adapter_bytes('full', n) / GB:.3f} GB, lora rank {spec.train.lora_rank} {shapes.adapter_bytes('lora', n, spec.train.lora_rank) / GB:.4f} GB",
        "",
    ]
    plans = all_plans(spec, progress)
    names = [t.name for t in plans[0].terms]
    header = ["mode, policy, checkpointing"] + names + ["allocated", "total"]
    rows = []
    for plan in plans:
        rows.append([("* " if plan.chosen else "  ") + plan.label] + [f"{t.bytes / GB:.2f}" for t in plan.terms] + [f"{plan.allocated_bytes / GB:.2f}", f"{plan.total_bytes / GB:.2f}"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.append("(GB = 1e9 bytes; * = this spec. 'allocated' is what torch.cuda.max_memory_allocated would show.)")
    budget = worker_budget_bytes(spec, gpu_memory)
    chosen = next(p for p in plans if p.chosen)
    if budget is None:
        lines.append("resources.gpus_per_worker is 0: a CPU job, no GPU memory check.")
    else:
        verdict = "fits" if chosen.total_bytes <= budget else "does NOT fit"
        lines.append(f"gpus_per_worker {spec.resources.gpus_per_worker:g} × {gpu_memory:g} GB ({GPU_MEMORY_ENV}) = {budget / GB:.1f} GB: this spec {verdict} ({chosen.total_bytes / GB:.1f} GB).")
    return "\n".join(lines)


__all__ = [
    "AutocastEmulation",
    "MemoryPlan",
    "MemoryTerm",
    "PlanError",
    "Structure",
    "all_plans",
    "check_plan_fits",
    "format_plan",
    "gpu_memory_gb",
    "memory_plan",
    "structure",
    "watched_layers",
]
