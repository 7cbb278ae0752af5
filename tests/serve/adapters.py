"""Published tenant adapters for the serving tests, made in milliseconds.

Each adapter is the tiny base's own attn2 tensors plus seeded noise, with random identifier-token rows, written
by the real writer (`causalt2i.adapter.save_adapter`: bf16 tensors, sha256 in the manifest, base fingerprint).
Serving needs distinct, valid adapters, not trained ones: a 2-step tune moves the weights too little for a bleed
test to be able to fail, and training is tested in tests/causalt2i (and run end to end by `make demo`).
Publishing mirrors `cluster.runner._train_and_publish`: store.publish_dir, then register_adapter_version.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from causalt2i.adapter import TE1_ROWS, TE2_ROWS, save_adapter, verify_adapter
from causalt2i.models import attn2_state, load_sdxl
from cluster.registry import new_adapter_id, register_adapter_version
from cluster.service import ControlPlane

SUBJECTS = [{"token": "<s1>", "class_word": "cat"}, {"token": "<v1>", "class_word": "dog"}]
NOISE_SCALE = 2.0  # of each tensor's own std: two adapters' images then differ by tens of levels per pixel


def write_adapter(out: Path, *, tenant: str, name: str, seed: int, subjects: list[dict] | None = None,
                  base_fingerprint: str | None = None) -> Path:
    parts = load_sdxl("tiny")
    subjects = subjects or SUBJECTS
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, value in attn2_state(parts.unet).items():
        noise = torch.randn(value.shape, generator=generator) * value.float().std() * NOISE_SCALE
        tensors[key] = (value.float() + noise).to(torch.bfloat16)
    for key, encoder in ((TE1_ROWS, parts.text_encoder), (TE2_ROWS, parts.text_encoder_2)):
        width = encoder.get_input_embeddings().weight.shape[1]
        tensors[key] = torch.randn((len(subjects), width), generator=generator).to(torch.bfloat16)
    save_adapter(out, tensors, {
        "base_model": "tiny", "base_fingerprint": base_fingerprint or parts.base_fingerprint(), "subjects": subjects,
        "param_mode": "full", "dtype": "bfloat16", "training": {"synthetic_seed": seed}, "tenant": tenant, "name": name,
        "step": 0})
    return out


def publish(plane: ControlPlane, tenant: str, name: str, adapter_dir: Path) -> str:
    """Publish `adapter_dir` as the next version of `tenant/name`; returns its adapter id."""
    manifest = verify_adapter(adapter_dir)
    adapter_id = new_adapter_id()
    published = plane.store.publish_dir(tenant, ("adapters", adapter_id), adapter_dir)
    with plane.db.write() as session:
        register_adapter_version(session, adapter_id=adapter_id, tenant=tenant, name=name, uri=published.uri,
                                 sha256=published.files["adapter.safetensors"]["sha256"], size_bytes=published.total_bytes,
                                 manifest=manifest, job_id=None, now=time.time())
    return adapter_id
