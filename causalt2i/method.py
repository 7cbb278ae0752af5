"""CausalT2I as one module: the trainable pieces and the per-step loss (paper Eq. 13).

`CausalT2I` owns the SDXL parts with identifier tokens added, SaCD (masks + intervention network), SCaG's
channel weights β, and the attention recorder. `loss()` runs one forward pass of the U-Net on
f_{n+1}^s + f̄_{n+1} with the cross-attention maps recorded (no second forward), and returns the terms.
The training loop (optimizer, checkpoints) lives in `trainer.py`; distributed wrappers reuse this module.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from causalt2i.adapter_format import FULL_DELTA_DTYPE
from causalt2i.attention import install_recorder
from causalt2i.data.merge import Canvas
from causalt2i.lora import install_lora, layer_scale, lora_tensors
from causalt2i.losses.cdo import SUPPORTED_PREDICTION_TYPES, denoising_loss, denoising_target, intervened_condition
from causalt2i.losses.sacd import SaCD, cst_cosines, cst_ratio, mean_text_embedding
from causalt2i.losses.scag import ChannelWeights, attention_embeddings, attn_loss, identity_token_maps, min_max
from causalt2i.losses.total import LossTerms
from causalt2i.models import ATTN2_PROJECTIONS, SDXLParts, attn2_modules, attn2_state
from causalt2i.spec import SpecError, TrainConfig, TuningSpec
from causalt2i.text import encode_tokenized, identity_positions, tokenize_prompts
from causalt2i.tokens import add_identifier_tokens, identifier_embeddings
from causalt2i.vision import MAP_PAD_VALUE, encode_images

LATENT_FACTOR = 8
RECORD_MAX_TOKENS = 32 * 32


@dataclass
class CachedExample:
    """One merged canvas with its frozen-encoder outputs, computed once before step 1."""

    latents: torch.Tensor  # [1, 4, h, w]: VAE latent z = E(x^m), scaled
    image_embeds: torch.Tensor  # [1, d_I]: f^m = E_I(x^m)
    time_ids: torch.Tensor  # [1, 6]
    tile_boxes: tuple[tuple[int, int, int, int], ...] = ()  # subject i's tile (left, top, right, bottom), pixels
    size: tuple[int, int] = (0, 0)  # the canvas (height, width) in pixels


@dataclass
class Probe:
    """A fixed (example, ε, t) the diagnostics evaluate at, so figures from different steps compare."""

    example: CachedExample
    noise: torch.Tensor
    timesteps: torch.Tensor


class CausalT2I(nn.Module):
    def __init__(self, parts: SDXLParts, spec: TuningSpec, *, base_attn2: dict[str, torch.Tensor] | None = None):
        """`base_attn2`: the base attn2 tensors in fp32 taken before `parts` was cast to a 16-bit policy (full mode)."""
        super().__init__()
        self.parts = parts
        self.spec = spec
        self.config: TrainConfig = spec.train
        self.n = len(spec.subjects)
        prediction_type = parts.noise_scheduler.config.prediction_type
        if prediction_type not in SUPPORTED_PREDICTION_TYPES:
            raise SpecError("base_model", f"{spec.base_model!r} predicts {prediction_type!r}; CausalT2I trains epsilon or v_prediction bases")
        # The frozen modules' dtype is the policy's compute dtype (the trainer applies the policy to the parts).
        self.compute_dtype = parts.unet.dtype
        parts.base_fingerprint()  # taken before anything trains, and cached
        ids = add_identifier_tokens(parts, spec.tokens, [s.class_word for s in spec.subjects])
        self.token_ids = dict(zip(spec.tokens, ids))
        self.prompts = spec.subject_prompts() + [spec.joint_prompt()]
        # The prompts are fixed: tokenized once, not on every step.
        self.tokenized = tokenize_prompts(parts, self.prompts, self.token_ids)
        self.joint_tokenized = tokenize_prompts(parts, self.prompts[-1:], self.token_ids)
        joint = self.prompts[-1]
        self.identity_positions = [
            identity_positions(parts.tokenizer, joint, self.token_ids, s.token, s.class_word) for s in spec.subjects
        ]
        self.sacd = SaCD(self.n, parts.image_dim, parts.text_dim)
        self.channel_weights = ChannelWeights(self.n, parts.image_dim)
        self.recorder = install_recorder(parts.unet, RECORD_MAX_TOKENS)
        self.lora: dict[str, LoraLayer] = {}
        self._base_attn2: dict[str, torch.Tensor] = {}
        if self.config.param_mode == "lora":
            self.lora = install_lora(parts.unet, self.config.lora_rank, self.config.lora_alpha, self.config.lora_dropout)
        else:
            for module in attn2_modules(parts.unet).values():
                for projection in ATTN2_PROJECTIONS:
                    module.get_submodule(projection).float()  # trainable: fp32 masters whatever the policy
            # The artifact stores ΔW against the base (adapter_tensors), so the base is kept, on the host, in
            # fp32 from before any cast: under the bf16 policy the masters start from it, not from its bf16
            # rounding, so that base + ΔW served anywhere is exactly the trained W.
            live = attn2_state(parts.unet)
            if base_attn2 is not None:
                self._base_attn2 = base_attn2
                with torch.no_grad():
                    for name, tensor in live.items():
                        tensor.copy_(base_attn2[name])
            elif parts.device.type != "meta":  # a meta model (plan.py) has no values and exports nothing
                self._base_attn2 = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in live.items()}
            for tensor in live.values():
                tensor.requires_grad_(True)
        for module in identifier_embeddings(parts):
            module.rows.requires_grad_(True)
        if self.config.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
        # The modules that hold trainable tensors are registered as submodules, so DeepSpeed (which
        # requires every optimizer parameter to be a named parameter of its model) and .train() see them.
        # The VAE and E_I stay outside: they are frozen and only ever run forward.
        self.unet = parts.unet
        self.text_encoder = parts.text_encoder
        self.text_encoder_2 = parts.text_encoder_2
        self.sacd.to(parts.device)
        self.channel_weights.to(parts.device)

    # --- parameters ----------------------------------------------------------------------------------
    def attention_parameters(self) -> dict[str, torch.Tensor]:
        if self.lora:
            return lora_tensors(self.lora)
        return attn2_state(self.parts.unet)

    def named_trainable(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor by a stable name: what checkpoints and the optimizer hold."""
        named = {f"unet.{k}": v for k, v in self.attention_parameters().items()}
        te1, te2 = identifier_embeddings(self.parts)
        named["text_encoder.token_rows"] = te1.rows
        named["text_encoder_2.token_rows"] = te2.rows
        named["sacd.mask_logits"] = self.sacd.mask_logits
        named["scag.beta"] = self.channel_weights.beta
        for k, v in self.sacd.net.named_parameters():
            named[f"sacd.net.{k}"] = v
        return named

    def param_groups(self) -> list[dict]:
        """lr for attn2 + token rows, mask_lr for mask logits and β, aux_lr for the network (METHOD.md)."""
        named = self.named_trainable()
        main = [v for k, v in named.items() if k.startswith(("unet.", "text_encoder"))]
        masks = [self.sacd.mask_logits, self.channel_weights.beta]
        aux = list(self.sacd.net.parameters())
        return [
            {"name": "main", "params": main, "lr": self.config.lr},
            {"name": "masks", "params": masks, "lr": self.config.mask_lr, "weight_decay": 0.0},
            {"name": "aux", "params": aux, "lr": self.config.aux_lr},
        ]

    # --- cached data ---------------------------------------------------------------------------------
    @torch.no_grad()
    def cache_example(self, canvas: Canvas, generator: torch.Generator) -> CachedExample:
        device = self.parts.device
        pixels = torch.from_numpy(_to_float_array(canvas.image)).permute(2, 0, 1).unsqueeze(0).to(device)
        vae = self.parts.vae
        posterior = vae.encode(pixels.to(vae.dtype) * 2 - 1).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device, posterior.mean.dtype)
        latents = (posterior.mean + posterior.std * noise) * vae.config.scaling_factor
        embeds = encode_images(self.parts, pixels)
        return CachedExample(
            latents=latents.float(),
            image_embeds=embeds.float(),
            time_ids=canvas.time_ids().unsqueeze(0).to(device),
            tile_boxes=tuple(canvas.tile_boxes),
            size=(canvas.image.height, canvas.image.width),
        )

    # --- the objective -------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast under the bf16 policy (frozen modules bf16, fp32 masters); none under fp32."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.parts.device.type, dtype=self.compute_dtype)

    def forward(self, example: CachedExample, noise: torch.Tensor, timesteps: torch.Tensor, alpha: float) -> LossTerms:
        return self.loss(example, noise, timesteps, alpha)

    def loss(self, example: CachedExample, noise: torch.Tensor, timesteps: torch.Tensor, alpha: float, *, keep: dict | None = None) -> LossTerms:
        """The terms of Eq. 13 for one example, with ε, t and L_cst's weight α given by the caller.

        `keep`, when given, receives what the diagnostics read: each subject's layer-averaged identity-token
        map before min-max (`raw_maps`, [1, n, h, w]) and the text means mean_t f_i^s (`text_means`).
        """
        cfg = self.config
        parts = self.parts
        latents = example.latents
        noisy = parts.noise_scheduler.add_noise(latents, noise, timesteps)
        target = denoising_target(parts.noise_scheduler, latents, noise, timesteps)
        with self.autocast():
            text = encode_tokenized(parts, self.tokenized)
            text_means = mean_text_embedding(text.embeds.float(), text.valid)
            _, f_bar = self.sacd.intervene(example.image_embeds)
            joint_embeds = text.embeds[self.n : self.n + 1]
            condition = intervened_condition(joint_embeds, f_bar[:, self.n])
            added = {"text_embeds": text.pooled[self.n : self.n + 1], "time_ids": example.time_ids}
            with self.recorder.recording(tuple(latents.shape[-2:])):
                prediction = parts.unet(noisy, timesteps, encoder_hidden_states=condition, added_cond_kwargs=added).sample
            cdm = denoising_loss(target, prediction)
            raw_maps = identity_token_maps(self.recorder.aggregate(), self.identity_positions)
            maps = min_max(raw_maps)
            atten = attention_embeddings(maps, lambda x: encode_images(parts, x, pad_value=MAP_PAD_VALUE)).float()
            retained = self.sacd.masks()[: self.n].unsqueeze(0) * example.image_embeds.unsqueeze(1)
            attn = attn_loss(retained, atten, self.channel_weights.weights(cfg.gamma), lambda_attn=cfg.lambda_attn)
            ratio = cst_ratio(self.sacd, example.image_embeds, text_means, form=cfg.cst_form, grad=cfg.cst_grad)
            text_term = None
            if cfg.lambda_text > 0:
                plain = parts.unet(noisy, timesteps, encoder_hidden_states=joint_embeds, added_cond_kwargs=added).sample
                text_term = denoising_loss(target, plain)
        if keep is not None:
            keep.update(raw_maps=raw_maps.detach(), text_means=text_means.detach())
        return LossTerms(cdm=cdm, attn=attn, cst=alpha * ratio, cst_ratio=ratio.detach(), text=text_term, lambda_text=cfg.lambda_text)

    def plain_denoising_loss(self, example: CachedExample, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The baseline step the benchmark compares with: ‖target − ε_θ(z_t, t, f^s_{n+1})‖² alone, no recording."""
        parts = self.parts
        noisy = parts.noise_scheduler.add_noise(example.latents, noise, timesteps)
        target = denoising_target(parts.noise_scheduler, example.latents, noise, timesteps)
        with self.autocast():
            text = encode_tokenized(parts, self.joint_tokenized)
            added = {"text_embeds": text.pooled, "time_ids": example.time_ids}
            prediction = parts.unet(noisy, timesteps, encoder_hidden_states=text.embeds, added_cond_kwargs=added).sample
            return denoising_loss(target, prediction)

    # --- diagnostics ---------------------------------------------------------------------------------
    def diagnostics(self, probes: list[Probe] | None = None, alpha: float = 0.0) -> dict:
        """Figures that show whether SaCD and SCaG do their job (METHOD.md, "Diagnostics").

        Always: mask mean/std per M_i and the entropy of each γ̃_i. With `probes`, also, averaged over
        them: per subject cos(f_i, f_i^s), cos(f̄_i, f_i^s) and their margin; each loss term; each
        term's share of the mask-logit gradient norm, ‖∂L_k/∂m‖ / Σ_j ‖∂L_j/∂m‖ (shares of the α in
        effect, so L_cst's share is 0 during the α warm-up); and the share of A_i's attention mass that
        falls inside subject i's tile. Mask spread alone is not evidence: L_attn alone drives it up.
        """
        with torch.no_grad():
            masks = self.sacd.masks()
            out: dict = {
                "mask_mean": _rounded(masks.mean(-1)),
                "mask_std": _rounded(masks.std(-1)),
                "gamma_entropy": _rounded(self.channel_weights.entropy()),
            }
        if not probes:
            return out
        names = ("cdm", "attn", "cst")
        norms = torch.zeros(len(names), device=self.parts.device)
        terms = torch.zeros(len(names) + 1, device=self.parts.device)
        kept = torch.zeros(self.n + 1, device=self.parts.device)
        removed = torch.zeros(self.n + 1, device=self.parts.device)
        in_tile = torch.zeros(self.n, device=self.parts.device)
        for probe in probes:
            keep: dict = {}
            with torch.enable_grad():
                loss_terms = self.loss(probe.example, probe.noise, probe.timesteps, alpha, keep=keep)
                values = (loss_terms.cdm, loss_terms.attn, loss_terms.cst)
                for index, value in enumerate(values):
                    if value.requires_grad:
                        (grad,) = torch.autograd.grad(value, self.sacd.mask_logits, retain_graph=True, allow_unused=True)
                        if grad is not None:
                            norms[index] += grad.norm()
            with torch.no_grad():
                terms += torch.stack([v.detach().float() for v in values] + [loss_terms.cst_ratio.float()])
                cos_kept, cos_removed = cst_cosines(self.sacd, probe.example.image_embeds, keep["text_means"])
                kept += cos_kept.mean(0)
                removed += cos_removed.mean(0)
                in_tile += _mass_in_tiles(keep["raw_maps"], probe.example)
        count = len(probes)
        norms, terms, kept, removed, in_tile = (t / count for t in (norms, terms, kept, removed, in_tile))
        shares = norms / norms.sum().clamp_min(1e-30)
        out.update(
            cos_kept=_rounded(kept[: self.n]),
            cos_removed=_rounded(removed[: self.n]),
            cos_margin=_rounded(kept[: self.n] - removed[: self.n]),
            cos_kept_joint=round(float(kept[self.n]), 5),
            cos_removed_joint=round(float(removed[self.n]), 5),
            probe_terms=dict(zip((*names, "cst_ratio"), (round(v, 6) for v in terms.tolist()))),
            mask_grad_norm=dict(zip(names, (float(f"{v:.4g}") for v in norms.tolist()))),
            mask_grad_share=dict(zip(names, (round(v, 5) for v in shares.tolist()))),
            attn_in_tile=_rounded(in_tile),
        )
        return out

    # --- export ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def adapter_tensors(self, master: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The artifact's tensors (METHOD.md, "The tenant artifact").

        `lora`: the factors in fp32 (small, and a 16-bit B·A would be rounded twice). `full`: ΔW = W_tuned −
        W_base per attn2 tensor in `FULL_DELTA_DTYPE`; a 16-bit ΔW is rounded relative to the change itself,
        so the served weights keep the tune's effect (a 16-bit W_tuned rounds relative to W, which loses
        several percent of a small change).

        `master` maps `named_trainable()` names to fp32 values to use instead of the module's parameters:
        under DeepSpeed bf16 the module holds bf16 copies and the fp32 masters live in the optimizer.
        """
        master = master or {}
        te1, te2 = identifier_embeddings(self.parts)
        values = {name: master.get(f"unet.{name}", t).detach().to("cpu", torch.float32) for name, t in self.attention_parameters().items()}
        if self.lora:
            tensors = values
        else:
            delta_dtype = getattr(torch, FULL_DELTA_DTYPE)
            tensors = {name: (value - self._base_attn2[name].float()).to(delta_dtype) for name, value in values.items()}
        tensors["text_encoder.token_embeddings"] = master.get("text_encoder.token_rows", te1.rows).detach().to("cpu", torch.float32)
        tensors["text_encoder_2.token_embeddings"] = master.get("text_encoder_2.token_rows", te2.rows).detach().to("cpu", torch.float32)
        return tensors

    def adapter_form(self) -> dict:
        """The manifest fields that say how `adapter_tensors` encode the attn2 change."""
        if self.lora:
            rank, alpha = self.config.lora_rank, self.config.lora_alpha
            return {"lora_rank": rank, "lora_alpha": float(rank if alpha is None else alpha), "lora_scale": layer_scale(next(iter(self.lora.values()))), "dtype": "float32"}
        return {"attn2_storage": "delta", "dtype": FULL_DELTA_DTYPE}


def _rounded(values: torch.Tensor) -> list[float]:
    return [round(v, 5) for v in values.tolist()]


def _mass_in_tiles(maps: torch.Tensor, example: CachedExample) -> torch.Tensor:
    """For each subject i, the share of its map's mass (maps [1, n, h, w] ≥ 0) in cells centred in its tile."""
    height, width = example.size
    _, n, map_h, map_w = maps.shape
    centre_y = (torch.arange(map_h, device=maps.device) + 0.5) * height / map_h
    centre_x = (torch.arange(map_w, device=maps.device) + 0.5) * width / map_w
    shares = []
    for index in range(n):
        left, top, right, bottom = example.tile_boxes[index]
        inside = ((centre_y >= top) & (centre_y < bottom)).unsqueeze(1) & ((centre_x >= left) & (centre_x < right)).unsqueeze(0)
        grid = maps[0, index].float()
        shares.append((grid * inside).sum() / grid.sum().clamp_min(1e-30))
    return torch.stack(shares)


def _to_float_array(image):
    import numpy as np

    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
