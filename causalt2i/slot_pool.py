"""The device slot pool for mixed-adapter LoRA batches (issue 15), above the host cache (`adapter_cache`).

Two tiers, as vLLM keeps them: the byte-bounded host cache holds loaded, verified adapters (pinned on CUDA);
the pool holds `n_slots - 1` of them on the device as stacked LoRA factors and identifier-token rows
(slot 0 is the base: no adapter). Activating an adapter writes its factors into a free slot in place
(`copy_`), so the tensors a compiled U-Net reads never change identity or shape.

Eviction is one explicit policy for both tiers (`RecencyPolicy`): every use of an adapter touches it once;
each tier evicts its least recently used resident that is not pinned. The pool is kept a subset of the host
cache: the cache's eviction callback releases the adapter's slot (deferred while a running batch pins it).
Nothing is unloaded by a finaliser.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from causalt2i.adapter import TE1_ROWS, TE2_ROWS, Adapter, AdapterError
from causalt2i.mixed_lora import SlotRouter, install_mixed_lora, install_slot_embeddings
from causalt2i.models import SDXLParts
from causalt2i.spec import MAX_SUBJECTS


class RecencyPolicy:
    """Least-recently-used order over adapter keys, shared by the host cache and the slot pool."""

    def __init__(self):
        self._clock = 0
        self._last_used: dict[str, int] = {}
        self._lock = threading.Lock()

    def touch(self, key: str) -> None:
        with self._lock:
            self._clock += 1
            self._last_used[key] = self._clock

    def forget(self, key: str) -> None:
        with self._lock:
            self._last_used.pop(key, None)

    def victim(self, residents: Iterable[str], pinned: Iterable[str] = ()) -> str | None:
        """The least recently used of `residents` that is not pinned (never touched counts as oldest)."""
        pinned = set(pinned)
        with self._lock:
            candidates = [key for key in residents if key not in pinned]
            if not candidates:
                return None
            return min(candidates, key=lambda key: self._last_used.get(key, -1))


class SlotPoolFull(RuntimeError):
    """Every slot is pinned by the batch being formed: the batch holds more adapters than the pool has slots."""


@dataclass(frozen=True)
class Activation:
    slot: int
    hit: bool  # already resident: nothing was copied
    seconds: float


@dataclass(frozen=True)
class PoolStats:
    slots: int
    resident: int
    hits: int
    misses: int
    evictions: int
    activation_seconds: float


class SlotPool:
    """`n_slots` device slots (slot 0 = the base) of stacked LoRA factors over all attn2 projections, r ≤ `r_max`.

    Installs `MixedLoRALinear` on every attn2 projection and `SlotTokenEmbedding` in both text encoders.
    Build it after the `AdapterHost` of the same parts (which grows the tables by the reserved token rows).
    `route(slots)` sets the slot of each row for the next text-encoder and U-Net calls.
    """

    def __init__(self, parts: SDXLParts, *, n_slots: int, r_max: int, policy: RecencyPolicy | None = None):
        if n_slots < 2:
            raise ValueError(f"n_slots: must be at least 2 (slot 0 is the base), got {n_slots}")
        if r_max < 1:
            raise ValueError(f"r_max: must be at least 1, got {r_max}")
        self.parts = parts
        self.n_slots = n_slots
        self.r_max = r_max
        self.policy = policy or RecencyPolicy()
        self.router = SlotRouter().to(parts.device)
        self.layers = install_mixed_lora(parts.unet, self.router, n_slots, r_max)
        self.embeddings = []
        for encoder in (parts.text_encoder, parts.text_encoder_2):
            vocab = encoder.get_input_embeddings().weight.shape[0] - MAX_SUBJECTS
            self.embeddings.append(install_slot_embeddings(encoder, self.router, vocab, n_slots, MAX_SUBJECTS))
        self.vocab = self.embeddings[0].vocab
        self._slot_of: dict[str, int] = {}
        self._token_ids: dict[str, dict[str, int]] = {}
        self._pins: dict[str, int] = {}
        self._released: set[str] = set()  # evicted from the host tier while pinned: freed at unpin
        self._lock = threading.RLock()
        self.hits = self.misses = self.evictions = 0
        self.activation_seconds = 0.0

    # --- residency -------------------------------------------------------------------------------------
    def slot_of(self, key: str) -> int | None:
        with self._lock:
            return self._slot_of.get(key)

    def residents(self) -> dict[str, int]:
        with self._lock:
            return dict(self._slot_of)

    def token_ids(self, key: str | None) -> dict[str, int]:
        """The identifier-token map for prompts of adapter `key` (the same ids for every tenant's `<s1>`)."""
        if key is None:
            return {}
        with self._lock:
            return dict(self._token_ids[key])

    def check(self, adapter: Adapter) -> None:
        """Refuse an adapter the pool cannot hold: not LoRA, rank above r_max, unknown modules, too many tokens."""
        manifest = adapter.manifest
        factors = adapter.lora_factors()  # AdapterError for a full-mode adapter: it keeps the swap path
        for module, f in factors.items():
            if module not in self.layers:
                raise AdapterError(f"adapter {manifest.tenant}/{manifest.name} adapts {module}, which is not an attn2 projection of this base")
            if f.rank > self.r_max:
                raise AdapterError(f"adapter {manifest.tenant}/{manifest.name} has rank {f.rank} at {module}; this pool's slots hold rank ≤ {self.r_max}")
        if len(manifest.subjects) > MAX_SUBJECTS:
            raise AdapterError(f"adapter has {len(manifest.subjects)} subjects; at most {MAX_SUBJECTS} are supported")

    def activate(self, key: str, adapter: Adapter, *, pin: bool = True) -> Activation:
        """Make `key` resident (copying it into a slot on a miss) and, with `pin`, keep it there until `unpin`.

        A miss takes a free slot, else evicts the least recently used unpinned resident; `SlotPoolFull` when all
        are pinned. Touches the shared policy once either way.
        """
        started = time.perf_counter()
        with self._lock:
            self.policy.touch(key)
            slot = self._slot_of.get(key)
            hit = slot is not None
            if not hit:
                self.check(adapter)
                slot = self._free_slot()
                self._write(slot, adapter)
                self._slot_of[key] = slot
                self._token_ids[key] = {token: self.vocab + i for i, token in enumerate(adapter.manifest.tokens)}
                self.misses += 1
            else:
                self.hits += 1
            if pin:
                self._pins[key] = self._pins.get(key, 0) + 1
            seconds = time.perf_counter() - started
            self.activation_seconds += seconds
            return Activation(slot=slot, hit=hit, seconds=seconds)

    def unpin(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                count = self._pins.get(key, 0) - 1
                if count > 0:
                    self._pins[key] = count
                    continue
                self._pins.pop(key, None)
                if key in self._released:
                    self._released.discard(key)
                    self._drop(key)

    def release(self, key: str) -> bool:
        """Free `key`'s slot (the host tier evicted it, or the operator unloads it); deferred while pinned."""
        with self._lock:
            if key not in self._slot_of:
                return False
            if self._pins.get(key):
                self._released.add(key)
                return True
            self._drop(key)
            return True

    def _drop(self, key: str) -> None:
        slot = self._slot_of.pop(key)
        self._token_ids.pop(key, None)
        self._clear(slot)
        self.evictions += 1

    def _free_slot(self) -> int:
        used = set(self._slot_of.values())
        for slot in range(1, self.n_slots):
            if slot not in used:
                return slot
        victim = self.policy.victim(self._slot_of, pinned=self._pins)
        if victim is None:
            raise SlotPoolFull(f"all {self.n_slots - 1} adapter slots are in use by the batch being formed")
        slot = self._slot_of[victim]
        self._drop(victim)
        return slot

    # --- device writes ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.lora_down[slot].zero_()
            layer.lora_up[slot].zero_()
            layer.lora_scale[slot] = 0
            layer.lora_bias[slot].zero_()
        for embedding in self.embeddings:
            embedding.slot_rows[slot].zero_()

    @torch.no_grad()
    def _write(self, slot: int, adapter: Adapter) -> None:
        """Copy the adapter into `slot` in place: ranks past its own stay zero, modules it lacks get scale 0."""
        self._clear(slot)
        for module, factors in adapter.lora_factors().items():
            layer = self.layers[module]
            rank = factors.rank
            layer.lora_down[slot, :rank].copy_(factors.down, non_blocking=True)
            layer.lora_up[slot, :, :rank].copy_(factors.up, non_blocking=True)
            layer.lora_scale[slot] = factors.scale
            if factors.bias is not None:
                layer.lora_bias[slot].copy_(factors.bias, non_blocking=True)
        n = len(adapter.manifest.subjects)
        for embedding, key in zip(self.embeddings, (TE1_ROWS, TE2_ROWS)):
            embedding.slot_rows[slot, :n].copy_(adapter.tensors[key], non_blocking=True)
        if self.parts.device.type == "cuda":
            torch.cuda.synchronize(self.parts.device)

    def route(self, slots: list[int] | torch.Tensor) -> None:
        self.router.route(slots)

    @property
    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(slots=self.n_slots - 1, resident=len(self._slot_of), hits=self.hits, misses=self.misses,
                             evictions=self.evictions, activation_seconds=self.activation_seconds)
