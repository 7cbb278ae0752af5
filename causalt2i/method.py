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
from causalt2i.losses.cdo import denoising_loss, intervened_condition
from causalt2i.losses.sacd import SaCD, cst_loss, mean_text_embedding
from causalt2i.losses.scag import ChannelWeights, attention_embeddings, attn_loss, identity_maps
from causalt2i.losses.total import LossTerms
from causalt2i.models import SDXLParts, attn2_state
from causalt2i.spec import TrainConfig, TuningSpec
from causalt2i.text import encode_prompts, identity_positions
from causalt2i.tokens import add_identifier_tokens, identifier_embeddings
from causalt2i.vision import encode_images

LATENT_FACTOR = 8
RECORD_MAX_TOKENS = 32 * 32


@dataclass
class CachedExample:
    """One merged canvas with its frozen-encoder outputs, computed once before step 1."""

    latents: torch.Tensor  # [1, 4, h, w]: VAE latent z = E(x^m), scaled
    image_embeds: torch.Tensor  # [1, d_I]: f^m = E_I(x^m)
    time_ids: torch.Tensor  # [1, 6]


class CausalT2I(nn.Module):
    def __init__(self, parts: SDXLParts, spec: TuningSpec):
        super().__init__()
        self.parts = parts
        self.spec = spec
        self.config: TrainConfig = spec.train
        self.n = len(spec.subjects)
        parts.base_fingerprint()  # taken before anything trains, and cached
        ids = add_identifier_tokens(parts, spec.tokens, [s.class_word for s in spec.subjects])
        self.token_ids = dict(zip(spec.tokens, ids))
        self.prompts = spec.subject_prompts() + [spec.joint_prompt()]
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
            # The artifact stores ΔW against the base (adapter_tensors), so the base is kept, on the host.
            self._base_attn2 = {k: v.detach().to("cpu", copy=True) for k, v in attn2_state(parts.unet).items()}
            for tensor in attn2_state(parts.unet).values():
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
        return CachedExample(latents=latents.float(), image_embeds=embeds.float(), time_ids=canvas.time_ids().unsqueeze(0).to(device))

    # --- the objective -------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        device = self.parts.device
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, example: CachedExample, noise: torch.Tensor, timesteps: torch.Tensor) -> LossTerms:
        return self.loss(example, noise, timesteps)

    def loss(self, example: CachedExample, noise: torch.Tensor, timesteps: torch.Tensor) -> LossTerms:
        """The terms of Eq. 13 for one example, with the noise ε and timestep t given by the caller."""
        cfg = self.config
        parts = self.parts
        latents = example.latents
        noisy = parts.noise_scheduler.add_noise(latents, noise, timesteps)
        with self.autocast():
            text = encode_prompts(parts, self.prompts, self.token_ids)
            text_means = mean_text_embedding(text.embeds.float(), text.valid)
            _, f_bar = self.sacd.intervene(example.image_embeds)
            joint_embeds = text.embeds[self.n : self.n + 1]
            condition = intervened_condition(joint_embeds, f_bar[:, self.n])
            added = {"text_embeds": text.pooled[self.n : self.n + 1], "time_ids": example.time_ids}
            with self.recorder.recording(tuple(latents.shape[-2:])):
                prediction = parts.unet(noisy, timesteps, encoder_hidden_states=condition, added_cond_kwargs=added).sample
            cdm = denoising_loss(noise, prediction)
            maps = identity_maps(self.recorder.aggregate(), self.identity_positions)
            atten = attention_embeddings(maps, lambda x: encode_images(parts, x)).float()
            retained = self.sacd.masks()[: self.n].unsqueeze(0) * example.image_embeds.unsqueeze(1)
            attn = attn_loss(retained, atten, self.channel_weights.weights(cfg.gamma), lambda_attn=cfg.lambda_attn)
            cst = cst_loss(self.sacd, example.image_embeds, text_means, alpha=cfg.alpha, form=cfg.cst_form, grad=cfg.cst_grad)
            text_term = None
            if cfg.lambda_text > 0:
                plain = parts.unet(noisy, timesteps, encoder_hidden_states=joint_embeds, added_cond_kwargs=added).sample
                text_term = denoising_loss(noise, plain)
        return LossTerms(cdm=cdm, attn=attn, cst=cst, text=text_term, lambda_text=cfg.lambda_text)

    def plain_denoising_loss(self, example: CachedExample, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The baseline step the benchmark compares with: ‖ε − ε_θ(z_t, t, f^s_{n+1})‖² alone, no recording."""
        parts = self.parts
        noisy = parts.noise_scheduler.add_noise(example.latents, noise, timesteps)
        with self.autocast():
            text = encode_prompts(parts, self.prompts[-1:], self.token_ids)
            added = {"text_embeds": text.pooled, "time_ids": example.time_ids}
            prediction = parts.unet(noisy, timesteps, encoder_hidden_states=text.embeds, added_cond_kwargs=added).sample
            return denoising_loss(noise, prediction)

    @torch.no_grad()
    def diagnostics(self) -> dict[str, list[float]]:
        """Mask mean/std per M_i (spread near 0 = not learned) and the entropy of each γ̃_i."""
        masks = self.sacd.masks()
        return {
            "mask_mean": [round(float(v), 5) for v in masks.mean(-1)],
            "mask_std": [round(float(v), 5) for v in masks.std(-1)],
            "gamma_entropy": [round(float(v), 5) for v in self.channel_weights.entropy()],
        }

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


def _to_float_array(image):
    import numpy as np

    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
