"""The generator replica: one resident base, tenant adapters hot-loaded per request, same-adapter requests batched.

Two layers:
- `GeneratorEngine` is the request path without Ray: byte-bounded adapter cache lookup (a miss reads the
  adapter, verifies its sha256 and its base fingerprint), in-place swap, generate, PNG encode. The GPU
  benchmark drives exactly this class, on machines where Ray's wheel is not installed.
- `GeneratorReplica` is the Serve deployment class (`serve.app` deploys it as `Generator`). It wires
  `@serve.multiplexed` (the adapter version id is the multiplexed model id; the loaded object is a
  `ServedAdapter` whose `__del__` unloads it) and `@serve.batch` at construction time, so their sizes come
  from the deployment's arguments and this module imports without Ray.

Why each rule holds:
- No bleed: every swap and every forward pass runs under one lock, and a batch only ever holds one adapter
  id (Serve splits batches by multiplexed id; `run` groups again by id in case it ever does not).
- Bounded memory: the host cache evicts least-recently-used adapters past `cache_bytes`; the one applied to
  the base may outlive its eviction until the next swap, so the bound is cache_bytes + one adapter.
- Abandoned work stops: each denoising step checks whether every request of its group was cancelled (the
  client went away; Serve cancels the call) or passed its deadline, and if so stops the group.
- Batches fill under load and cost nothing when idle: `AdapterBatchQueue` (below `@serve.batch`) hands the
  engine, the moment it is free, every queued request of the oldest request's adapter. Serve's own batcher
  forms its next batch while the previous one still runs (within `batch_wait_timeout_s` of its first
  request), so on its own it sends batches of one to a busy engine and makes an idle one wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from causalt2i.adapter import Adapter, AdapterError, load_adapter
from causalt2i.adapter_cache import AdapterCache, AdapterCacheError
from causalt2i.adapter_format import TENSORS_FILE
from causalt2i.generation import GenerationError, GenerationRequest, Generator, generate, parse_request
from causalt2i.mixed_generation import RoutedRequest, generate_mixed, pass_key
from causalt2i.models import SDXLParts
from causalt2i.slot_pool import RecencyPolicy, SlotPool
from causalt2i.text import PromptError, tokenize
if TYPE_CHECKING:
    from cluster.config import ControlPlaneSettings
from serve.schemas import BASE_MODEL_REF, GenerateCall, GeneratedImages, GenerateOutcome, Refusal

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 4
DEFAULT_LORA_RANK_MAX = 32  # the slot pool's r_max: LoRA adapters up to this rank are served in mixed batches
DEFAULT_BATCH_WAIT_S = 0.0  # AdapterBatchQueue gathers while the engine runs; waiting in Serve only adds latency

AdapterLocator = Callable[[str], Path]
"""Adapter version id → a local folder holding its `manifest.json` and `adapter.safetensors`."""


class Abandoned(Exception):
    """Every request of a group was cancelled or timed out; `reason` is `cancelled` or `timeout`."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class CallState:
    """Whether the caller of one request still wants its answer."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.cancelled = False

    def gone(self, now: float) -> str | None:
        if self.cancelled:
            return "cancelled"
        if now > self.deadline:
            return "timeout"
        return None


@dataclass
class GroupResult:
    pngs: list[list[bytes]]  # per request
    timings: dict[str, float]


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _group_key(request: GenerationRequest) -> tuple:
    """Requests that may share one forward pass: everything but the seeds is equal."""
    return (request.prompt, request.negative_prompt, request.steps, request.guidance, request.width, request.height)


class GeneratorEngine:
    """One base, adapters swapped into it in place. Thread-safe; one forward pass at a time."""

    def __init__(self, parts: SDXLParts, *, cache_bytes: int, locate: AdapterLocator, on_cache_change: Callable | None = None,
                 lora_slots: int = 0, lora_rank_max: int = DEFAULT_LORA_RANK_MAX, metrics=None):
        self.parts = parts
        self.generator = Generator(parts)
        self.locate = locate
        # `lora_slots` > 0: LoRA adapters are served in mixed batches from a device slot pool of that many adapters,
        # above the host cache, both evicting by one recency policy (the cache's evictions free pool slots).
        policy = RecencyPolicy()
        self.pool = SlotPool(parts, n_slots=lora_slots + 1, r_max=lora_rank_max, policy=policy) if lora_slots > 0 else None
        self.cache = AdapterCache(cache_bytes, loader=self._load, policy=policy,
                                  on_evict=(lambda key, _adapter: self.pool.release(key)) if self.pool is not None else None)
        self.metrics = metrics
        self.lock = threading.Lock()
        self._active_id: str | None = None
        self._unload_lock = threading.Lock()
        self._unloaded: set[str] = set()  # unloaded while a pass held `lock`: settled when it ends
        self._on_cache_change = on_cache_change or (lambda stats: None)
        self.swaps = 0

    @property
    def fingerprint(self) -> str:
        return self.generator.host.fingerprint

    def _load(self, adapter_id: str) -> Adapter:
        adapter = load_adapter(self.locate(adapter_id))  # refuses a file whose sha256 does not match its manifest
        self.generator.host.check(adapter)  # refuses an adapter tuned on another base
        return adapter

    def adapter(self, adapter_id: str | None) -> Adapter | None:
        """The cached adapter (loading and verifying it on a miss); None for the bare base."""
        if adapter_id is None or adapter_id == BASE_MODEL_REF:
            return None
        try:
            return self.cache.get(adapter_id)
        finally:
            self._on_cache_change(self.cache.stats)

    def mixable(self, adapter: Adapter | None) -> bool:
        """Whether requests for `adapter` can share a mixed pass: the base always, a LoRA adapter the pool can hold.
        Full-mode adapters (no LoRA form) keep the swap path, one adapter per pass."""
        if self.pool is None:
            return False
        if adapter is None:
            return True
        try:
            self.pool.check(adapter)
        except AdapterError:
            return False
        return True

    def check(self, request: GenerationRequest | dict, tokens: Sequence[str] = ()) -> GenerationRequest:
        """Validate against this base (sizes) and the adapter's identifier `tokens` (and prompt length) before
        queueing. Raises `GenerationError` / `PromptError` naming the field.
        """
        request = parse_request(request, self.parts)
        known = {token: 0 for token in tokens}
        tokenize(self.parts.tokenizer, request.prompt, known, field="prompt")
        tokenize(self.parts.tokenizer_2, request.prompt, known, field="prompt")
        if request.negative_prompt.strip():
            tokenize(self.parts.tokenizer, request.negative_prompt, known, field="negative_prompt")
            tokenize(self.parts.tokenizer_2, request.negative_prompt, known, field="negative_prompt")
        return request

    def unload(self, adapter_id: str) -> None:
        """Drop an adapter from the cache and, if it is applied, restore the bare base. Never waits for a pass.

        Serve calls this on eviction while it holds its model-cache lock, so every other adapter's load waits
        on it. Waiting here for the engine (a whole pass) would let one new adapter reach the queue per pass,
        and no pass would ever mix tenants. The pool slot is freed at once (or when the pass holding it
        unpins it); restoring the base under a swap-path adapter is left to the pass that holds the lock.
        """
        self.cache.evict(adapter_id)  # frees its pool slot too (the cache's eviction callback)
        self._on_cache_change(self.cache.stats)
        with self._unload_lock:
            self._unloaded.add(adapter_id)
        if self.lock.acquire(blocking=False):
            try:
                self._settle_unloads()
            finally:
                self.lock.release()

    @contextlib.contextmanager
    def _holding_engine(self):
        """`self.lock` for one pass; adapters Serve unloaded meanwhile are settled before and after it."""
        with self.lock:
            self._settle_unloads()
            try:
                yield
            finally:
                self._settle_unloads()

    def _settle_unloads(self) -> None:
        """Restore the bare base if the applied (swap-path) adapter was unloaded. Call with `self.lock` held."""
        with self._unload_lock:
            unloaded, self._unloaded = self._unloaded, set()
        if self._active_id is not None and self._active_id in unloaded:
            self.generator.use(None)
            self._active_id = None

    def run(self, adapter_id: str | None, requests: Sequence[GenerationRequest],
            states: Sequence[CallState] | None = None) -> tuple[list[list[bytes] | Exception], dict[str, float]]:
        """Generate every request with one adapter. Returns, per request, its PNGs or the exception that stopped
        it, and the timings (seconds: lock wait, swap, encode, denoise, decode, summed over groups).

        Requests equal but for their seeds run as one batch (their seeds concatenated).
        """
        waited = time.perf_counter()
        states = list(states) if states is not None else [CallState(float("inf")) for _ in requests]
        outcomes: list[list[bytes] | Exception | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(_group_key(request), []).append(index)
        timings: dict[str, float] = {}
        with self._holding_engine():
            timings["wait"] = time.perf_counter() - waited
            try:
                adapter = self.adapter(adapter_id)
            except Exception as err:
                return [err] * len(requests), timings
            swap = self.generator.use(adapter)
            timings["swap"] = swap
            if swap:
                self.swaps += 1
            self._active_id = adapter_id if adapter is not None else None
            for members in groups.values():
                live = [i for i in members if states[i].gone(time.time()) is None]
                for i in members:
                    if i not in live:
                        outcomes[i] = Abandoned(states[i].gone(time.time()) or "cancelled")
                if not live:
                    continue
                seeds = [seed for i in live for seed in requests[i].image_seeds()]
                merged = requests[live[0]].model_copy(update={"n": len(seeds), "seeds": seeds})

                def stop_if_abandoned(_done: int, _total: int, live=live) -> None:
                    now = time.time()
                    reasons = {states[i].gone(now) for i in live}
                    if None not in reasons:
                        raise Abandoned("cancelled" if "cancelled" in reasons else "timeout")

                try:
                    result = generate(self.parts, merged, token_ids=self.generator.host.token_ids, progress=stop_if_abandoned)
                except Exception as err:
                    for i in live:
                        outcomes[i] = err
                    continue
                pngs = [png_bytes(image) for image in result.images]
                offset = 0
                for i in live:
                    count = len(requests[i].image_seeds())
                    outcomes[i] = pngs[offset:offset + count]
                    offset += count
                for name, seconds in result.timings.items():
                    timings[name] = timings.get(name, 0.0) + seconds
        return outcomes, timings  # type: ignore[return-value]

    def run_mixed(self, adapter_ids: Sequence[str | None], requests: Sequence[GenerationRequest],
                  states: Sequence[CallState] | None = None) -> tuple[list[list[bytes] | Exception], dict[str, float]]:
        """Generate requests of different LoRA adapters (None: the base) in shared passes, each row in its adapter's
        slot. Requests are grouped by `pass_key` (steps, size, CFG); the queue sends one group. Timings as `run`,
        with `mixed-activate` (slot activations) in place of `swap`."""
        if self.pool is None:
            raise RuntimeError("this engine has no LoRA slot pool (lora_slots=0)")
        waited = time.perf_counter()
        states = list(states) if states is not None else [CallState(float("inf")) for _ in requests]
        outcomes: list[list[bytes] | Exception | None] = [None] * len(requests)
        timings: dict[str, float] = {}
        with self._holding_engine():
            timings["wait"] = time.perf_counter() - waited
            started = time.perf_counter()
            if self.generator.active is not None:  # a full adapter from a swap pass: back to the bare base
                timings["swap"] = self.generator.use(None)
                self.swaps += 1
                self._active_id = None
            slots: dict[str | None, int] = {None: 0}
            pinned: list[str] = []
            try:
                for index, adapter_id in enumerate(adapter_ids):
                    key = None if adapter_id in (None, BASE_MODEL_REF) else adapter_id
                    if key in slots:
                        continue
                    try:
                        adapter = self.adapter(key)
                        activation = self.pool.activate(key, adapter)
                    except Exception as err:
                        for i, other in enumerate(adapter_ids):
                            if other == adapter_id:
                                outcomes[i] = err
                        slots[key] = -1
                        continue
                    pinned.append(key)
                    slots[key] = activation.slot
                    if self.metrics is not None:
                        self.metrics.slot(activation.hit, activation.seconds)
                timings["mixed-activate"] = time.perf_counter() - started
                groups: dict[tuple, list[int]] = {}
                for index, request in enumerate(requests):
                    if outcomes[index] is None:
                        groups.setdefault(pass_key(request, self.parts), []).append(index)
                for members in groups.values():
                    now = time.time()
                    live = [i for i in members if states[i].gone(now) is None]
                    for i in members:
                        if i not in live:
                            outcomes[i] = Abandoned(states[i].gone(now) or "cancelled")
                    if not live:
                        continue

                    def stop_if_abandoned(_done: int, _total: int, live=live) -> None:
                        now = time.time()
                        reasons = {states[i].gone(now) for i in live}
                        if None not in reasons:
                            raise Abandoned("cancelled" if "cancelled" in reasons else "timeout")

                    routed = []
                    for i in live:
                        key = None if adapter_ids[i] in (None, BASE_MODEL_REF) else adapter_ids[i]
                        routed.append(RoutedRequest(requests[i], slots[key], self.pool.token_ids(key)))
                    try:
                        results = generate_mixed(self.parts, self.pool, routed, progress=stop_if_abandoned)
                    except Exception as err:
                        for i in live:
                            outcomes[i] = err
                        continue
                    for i, result in zip(live, results):
                        outcomes[i] = [png_bytes(image) for image in result.images]
                    for name, seconds in results[0].timings.items():
                        timings[name] = timings.get(name, 0.0) + seconds
            finally:
                self.pool.unpin(pinned)
        return outcomes, timings  # type: ignore[return-value]

    def stats(self) -> dict:
        stats = self.cache.stats
        return {"hits": stats.hits, "misses": stats.misses, "loads": stats.loads, "evictions": stats.evictions,
                "entries": stats.entries, "nbytes": stats.nbytes, "capacity_bytes": stats.capacity_bytes,
                "cached": self.cache.keys(), "active": self._active_id, "swaps": self.swaps,
                **({"lora_slots": self.pool.stats.slots, "slot_residents": len(self.pool.residents()), "slot_hits": self.pool.stats.hits,
                    "slot_misses": self.pool.stats.misses, "slot_evictions": self.pool.stats.evictions} if self.pool is not None else {}),
                "base_fingerprint": self.fingerprint, "base_model": self.parts.base_model}


Execute = Callable[[str, list[GenerationRequest], list[CallState]], Awaitable[tuple[list, dict[str, float]]]]
"""(adapter id, requests, their call states) → (per request: PNGs or the exception, timings): one engine run."""

ExecuteMixed = Callable[[list[str], list[GenerationRequest], list[CallState]], Awaitable[tuple[list, dict[str, float]]]]
"""(adapter id per request, requests, call states) → as `Execute`: one mixed-adapter pass (`GeneratorEngine.run_mixed`)."""


@dataclass
class _Queued:
    adapter_id: str
    request: GenerationRequest
    state: CallState
    answer: asyncio.Future
    tenant: str = ""
    mixable: bool = False
    enqueued: float = 0.0

    @property
    def cost(self) -> int:
        """The work a request puts on the engine (VTC service units): images × denoising steps."""
        return self.request.n * self.request.steps


class AdapterBatchQueue:
    """Requests waiting for the engine. Whenever the engine is free it forms the next pass from them.

    Without `execute_mixed` (or for requests that are not `mixable`, i.e. full-mode adapters): the pass holds one
    adapter: the chosen request and, oldest first, every other waiting request of that adapter that still fits in
    `max_batch_images` images (a request larger than that runs alone).

    With `execute_mixed`, mixable requests (LoRA adapters the slot pool holds, and the bare base) of every tenant
    share one pass: up to `max_batch_images` images from at most `max_adapters_per_pass` adapters, with equal
    steps, size and CFG (one timestep schedule and latent shape).

    Fairness across tenants is S-LoRA's virtual token counter: each tenant's counter grows by the work (images ×
    steps) of every request of it that the engine takes; the next request taken is the oldest of the waiting
    tenant with the lowest counter, and a tenant that had nothing waiting starts at the lowest counter of those
    waiting (so idling earns no credit). One tenant's burst therefore cannot starve another's single request:
    it is taken into the next pass that forms.

    Requests whose caller left (future cancelled) are dropped; those past their deadline are answered with
    `Abandoned("timeout")` without reaching the engine. Lives on one event loop; `execute` is awaited one call
    at a time. `on_dispatch(tenant, seconds_waited, path)` reports each request as it is taken.
    """

    def __init__(self, execute: Execute, max_batch_images: int, *, execute_mixed: ExecuteMixed | None = None,
                 max_adapters_per_pass: int | None = None, on_dispatch: Callable[[str, float, str], None] | None = None,
                 parts: SDXLParts | None = None):
        if max_batch_images < 1:
            raise ValueError("max_batch_images must be at least 1")
        self.execute = execute
        self.execute_mixed = execute_mixed
        self.max_batch_images = max_batch_images
        self.max_adapters_per_pass = max_adapters_per_pass
        self._on_dispatch = on_dispatch or (lambda tenant, seconds, path: None)
        self._parts = parts
        self._waiting: list[_Queued] = []
        self._worker: asyncio.Task | None = None
        self._counters: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    async def run(self, adapter_id: str, requests: Sequence[GenerationRequest], states: Sequence[CallState], *,
                  tenant: str | None = None, mixable: bool = False) -> list[tuple[list[bytes] | Exception, int, dict[str, float]]]:
        """Queue `requests` for `adapter_id`; per request: (PNGs or exception, size of the batch it ran in, timings).
        `tenant` is the fairness key (the adapter id when not given)."""
        loop = asyncio.get_running_loop()
        tenant = tenant if tenant is not None else adapter_id
        if not any(entry.tenant == tenant for entry in self._waiting):
            waiting = [self._counters.get(entry.tenant, 0.0) for entry in self._waiting]
            self._counters[tenant] = max(self._counters.get(tenant, 0.0), min(waiting, default=0.0))
        now = time.perf_counter()
        entries = [_Queued(adapter_id, request, state, loop.create_future(), tenant, mixable and self.execute_mixed is not None, now)
                   for request, state in zip(requests, states)]
        self._waiting.extend(entries)
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return list(await asyncio.gather(*(entry.answer for entry in entries)))

    def _prune(self) -> None:
        now = time.time()
        kept = []
        for entry in self._waiting:
            if entry.answer.done():
                continue
            if entry.state.gone(now) == "timeout":
                entry.answer.set_result((Abandoned("timeout"), 0, {}))
                continue
            kept.append(entry)
        self._waiting = kept

    def _pick(self, candidates: list[_Queued]) -> _Queued:
        """The oldest request of the candidate tenant with the lowest virtual counter (ties: oldest request)."""
        order = {id(entry): index for index, entry in enumerate(self._waiting)}
        return min(candidates, key=lambda entry: (self._counters.get(entry.tenant, 0.0), order[id(entry)]))

    def _take(self, batch: list[_Queued]) -> None:
        taken = {id(entry) for entry in batch}
        self._waiting = [entry for entry in self._waiting if id(entry) not in taken]

    def _next_batch(self) -> tuple[str, list[_Queued]]:
        self._prune()
        if not self._waiting:
            return "", []
        leader = self._pick(self._waiting) if self.execute_mixed is not None else self._waiting[0]
        if leader.mixable:
            return "mixed", self._mixed_batch(leader)
        batch, images = [], 0
        for entry in [leader] + [e for e in self._waiting if e is not leader]:
            if entry.adapter_id != leader.adapter_id:
                continue
            if batch and images + entry.request.n > self.max_batch_images:
                continue  # a smaller request behind it may still fit; this one leads a later batch
            batch.append(entry)
            images += entry.request.n
        self._charge(batch)
        self._take(batch)
        return "swap", batch

    def _mixed_batch(self, leader: _Queued) -> list[_Queued]:
        key = self._pass_key(leader.request)
        batch, images, adapters = [leader], leader.request.n, {leader.adapter_id}
        self._charge([leader])
        pool = [e for e in self._waiting if e is not leader and e.mixable and self._pass_key(e.request) == key]
        while pool:
            fitting = [e for e in pool if images + e.request.n <= self.max_batch_images
                       and (e.adapter_id in adapters or self.max_adapters_per_pass is None or len(adapters) < self.max_adapters_per_pass)]
            if not fitting:
                break
            entry = self._pick(fitting)
            batch.append(entry)
            images += entry.request.n
            adapters.add(entry.adapter_id)
            self._charge([entry])
            pool.remove(entry)
        self._take(batch)
        return batch

    def _pass_key(self, request: GenerationRequest) -> tuple:
        if self._parts is not None:
            return pass_key(request, self._parts)
        return (request.steps, request.width, request.height, request.guidance > 1.0)

    def _charge(self, batch: list[_Queued]) -> None:
        for entry in batch:
            self._counters[entry.tenant] = self._counters.get(entry.tenant, 0.0) + entry.cost

    async def _drain(self) -> None:
        while True:
            path, batch = self._next_batch()
            if not batch:
                break
            now = time.perf_counter()
            for entry in batch:
                self._on_dispatch(entry.tenant, now - entry.enqueued, path)
            try:
                if path == "mixed":
                    outcomes, timings = await self.execute_mixed([e.adapter_id for e in batch], [e.request for e in batch],
                                                                 [e.state for e in batch])
                else:
                    outcomes, timings = await self.execute(batch[0].adapter_id, [e.request for e in batch], [e.state for e in batch])
            except Exception as err:  # the engine itself failed: every caller of this batch gets the error
                outcomes, timings = [err] * len(batch), {}
            for entry, outcome in zip(batch, outcomes):
                if not entry.answer.done():
                    entry.answer.set_result((outcome, len(batch), timings))


_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/[^\s:]+")


def without_paths(message: str) -> str:
    """`message` with every absolute path cut to its file name: a refusal says which file, never where it lives."""
    return _ABSOLUTE_PATH.sub(lambda found: PurePosixPath(found.group()).name, message)


def refusal_for(err: BaseException) -> Refusal:
    """The HTTP answer for an error raised while loading an adapter or checking or running a request."""
    if isinstance(err, (GenerationError, PromptError)):
        status = 409 if getattr(err, "field", "") == "adapter" else 422
        return Refusal(status, err.field, getattr(err, "message", None) or str(err).split(": ", 1)[-1])
    if isinstance(err, AdapterIntegrityError):
        return Refusal(409, "adapter", str(err))
    if isinstance(err, AdapterError):
        # The registry said it exists, but its files are corrupt or were tuned on another base. The library's
        # message may name a file path: logged here, not sent.
        log.error("adapter refused: %s", err)
        return Refusal(409, "adapter", without_paths(str(err)))
    if isinstance(err, AdapterCacheError):
        return Refusal(507, "adapter", str(err))
    if isinstance(err, Abandoned):
        return Refusal(504 if err.reason == "timeout" else 499, "request", f"abandoned: {err.reason}", work_spent=True)
    if isinstance(err, LookupError):
        return Refusal(404, "adapter", str(err))
    return Refusal(500, "request", f"{type(err).__name__}: {err}", work_spent=True)


class ServedAdapter:
    """What `@serve.multiplexed` holds per adapter id. Evicting it from Serve's LRU unloads it from the engine.

    A plain id string would never be unloaded; this object's `__del__` is what Serve calls on eviction (and
    Python again at garbage collection, hence the once-only guard).
    """

    def __init__(self, engine: GeneratorEngine, adapter_id: str, adapter: Adapter | None):
        self.engine = engine
        self.adapter_id = adapter_id
        self.tokens = adapter.manifest.tokens if adapter is not None else []
        self.mixable = engine.mixable(adapter)  # served in mixed-adapter passes (LoRA, or the base) vs the swap path
        self._unloaded = False

    def __del__(self):
        if self._unloaded or self.adapter_id == BASE_MODEL_REF:
            return
        self._unloaded = True
        try:
            self.engine.unload(self.adapter_id)
        except Exception:  # interpreter shutdown, or an engine already gone
            pass


class AdapterIntegrityError(AdapterError):
    """The stored artifact does not match what the registry recorded. The message names the adapter id only: the
    storage path and the digests are logged, never sent."""


def local_adapter_locator(plane) -> AdapterLocator:
    """Find an adapter's files through the control plane and copy them, verified, to this replica's scratch.

    The same check the download route makes, on every file: each file (`manifest.json`, `adapter.safetensors`)
    against the artifact's sha256 table (`cluster.store`), and the weights' digest in that table against the
    registry's `sha256`. The copy is what gets loaded, so a file changed in the store after the check is never
    read (no window between verifying and loading, also for a local store).
    """
    from cluster.service import NotFound
    from cluster.store import ArtifactCorrupt, ArtifactNotFound

    def locate(adapter_id: str) -> Path:
        try:
            view = plane.get_adapter(None, adapter_id)
        except NotFound:
            raise LookupError(f"no adapter {adapter_id!r}: deleted or never published") from None
        parts = plane.store.parse_uri(view.uri, view.tenant)
        dest = plane.settings.work_dir / "serve-adapters" / adapter_id
        try:
            table = plane.store.fetch_dir(view.tenant, parts, dest)
        except (ArtifactCorrupt, ArtifactNotFound) as err:
            log.error("adapter %s refused: %s", adapter_id, err)
            raise AdapterIntegrityError(f"adapter {adapter_id} failed its integrity check and is not served") from None
        recorded = table.get(TENSORS_FILE, {}).get("sha256")
        if recorded != view.sha256:
            log.error("adapter %s refused: weights sha256 %s in the artifact, %s in the registry", adapter_id, recorded, view.sha256)
            raise AdapterIntegrityError(f"adapter {adapter_id} failed its integrity check and is not served")
        return dest

    return locate


def _max_ongoing_requests(serve, default: int) -> int:
    """The deployment's `max_ongoing_requests` (Serve exposes it only on the replica context's config)."""
    try:
        return int(serve.get_replica_context()._deployment_config.max_ongoing_requests)
    except Exception:  # outside a replica (unit tests), or the private attribute moved
        return default


class _MisleadingBatchWarning(logging.Filter):
    """Drops Serve's warning that max_batch_size × max_concurrent_batches exceeds max_ongoing_requests: here the
    concurrent batches are deliberately one per possible request (see `AdapterBatchQueue`), and batch size is
    bounded by the queue, not by Serve."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_concurrent_batches" not in record.getMessage()


class GeneratorReplica:
    """The `Generator` deployment. Its base (`base_model`), host cache (`serve.cache_bytes`), multiplexed slots
    (`serve.max_adapters`) and request timeout come from the platform's settings (None: this process's
    environment)."""

    def __init__(self, settings: "ControlPlaneSettings | None" = None, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 batch_wait_s: float = DEFAULT_BATCH_WAIT_S, lora_slots: int | None = None,
                 lora_rank_max: int = DEFAULT_LORA_RANK_MAX):
        from ray import serve

        from causalt2i.models import load_sdxl
        from cluster.config import ControlPlaneSettings
        from cluster.service import ControlPlane
        from serve.metrics import GeneratorMetrics

        plane_settings = settings or ControlPlaneSettings()
        serving = plane_settings.serve
        self.plane = ControlPlane.open(plane_settings)
        base = plane_settings.base_model
        cuda = torch.cuda.is_available()
        parts = load_sdxl(base, device="cuda" if cuda else None, dtype=torch.float16 if cuda and base != "tiny" else None)
        self.metrics = GeneratorMetrics()
        slots = serving.max_adapters
        # One device slot per adapter Serve may keep loaded here (None); 0 turns mixed-adapter batching off.
        self.engine = GeneratorEngine(parts, cache_bytes=serving.cache_bytes, locate=local_adapter_locator(self.plane),
                                      on_cache_change=self.metrics.cache, lora_slots=slots if lora_slots is None else lora_slots,
                                      lora_rank_max=lora_rank_max, metrics=self.metrics)
        self.request_timeout_s = serving.request_timeout_s

        async def load_adapter_by_id(adapter_id: str) -> ServedAdapter:
            return await self._served_adapter(adapter_id)

        # A plain function, not the bound method: Serve keeps its LRU state as an attribute of what it wraps.
        self.get_adapter = serve.multiplexed(max_num_models_per_replica=slots)(load_adapter_by_id)
        pool = self.engine.pool
        self.queue = AdapterBatchQueue(self._execute, max_batch_images=max_batch_size,
                                       execute_mixed=self._execute_mixed if pool is not None else None,
                                       max_adapters_per_pass=pool.n_slots - 1 if pool is not None else None,
                                       on_dispatch=self.metrics.queue_wait, parts=parts)
        # Every batch Serve forms goes straight to the queue (as many concurrent batches as requests the replica
        # may hold), so the queue sees all waiting requests when it picks the next forward pass.
        ongoing = _max_ongoing_requests(serve, default=max_batch_size)
        logging.getLogger("ray.serve").addFilter(_MisleadingBatchWarning())
        self._batched = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s,
                                    max_concurrent_batches=max(1, ongoing))(self._run_batch)
        self._serve = serve

    async def _served_adapter(self, adapter_id: str) -> ServedAdapter:
        adapter = await asyncio.to_thread(self.engine.adapter, adapter_id)
        return ServedAdapter(self.engine, adapter_id, adapter)

    async def generate(self, call: GenerateCall) -> GenerateOutcome:
        started = time.perf_counter()
        adapter_id = self._serve.get_multiplexed_model_id() or BASE_MODEL_REF
        try:
            served = await self.get_adapter(adapter_id)
            request = self.engine.check(call.request, served.tokens)
        except Exception as err:
            return refusal_for(err)
        loaded = time.perf_counter()
        state = CallState(min(call.deadline, time.time() + self.request_timeout_s))
        try:
            outcome, batch_size, timings = await self._batched(adapter_id, request, state, call.tenant, served.mixable)
        except asyncio.CancelledError:
            state.cancelled = True  # the client went away: the running group stops at its next step
            raise
        if isinstance(outcome, Exception):
            return refusal_for(outcome)
        width, height = request.size(self.engine.parts)
        total = time.perf_counter() - started
        return GeneratedImages(pngs=outcome, seeds=request.image_seeds(), width=width, height=height, batch_size=batch_size,
                               timings={"load": loaded - started, **timings, "total": total})

    async def _run_batch(self, adapter_ids: list[str], requests: list[GenerationRequest], states: list[CallState],
                         tenants: list[str], mixable: list[bool]):
        """`@serve.batch`'s handler: every request goes to the queue, which forms the engine's passes."""
        by_adapter: dict[tuple, list[int]] = {}
        for index, adapter_id in enumerate(adapter_ids):
            by_adapter.setdefault((adapter_id, tenants[index], mixable[index]), []).append(index)
        queued = time.perf_counter()
        answers = await asyncio.gather(*(self.queue.run(adapter_id, [requests[i] for i in members], [states[i] for i in members],
                                                        tenant=tenant, mixable=can_mix)
                                         for (adapter_id, tenant, can_mix), members in by_adapter.items()))
        results: list = [None] * len(requests)
        for members, outcomes in zip(by_adapter.values(), answers):
            for i, (outcome, batch_size, timings) in zip(members, outcomes):
                results[i] = (outcome, batch_size, {**timings, "batch": time.perf_counter() - queued})
        return results

    async def _execute(self, adapter_id: str, requests: list[GenerationRequest], states: list[CallState]):
        """One forward pass's worth of requests for one adapter, on a worker thread (the engine's lock serialises)."""
        self.metrics.batch(len(requests))
        outcomes, timings = await asyncio.to_thread(self.engine.run, None if adapter_id == BASE_MODEL_REF else adapter_id,
                                                    requests, states)
        for outcome in outcomes:
            if isinstance(outcome, Abandoned):
                self.metrics.abandoned(outcome.reason)
        return outcomes, timings

    async def _execute_mixed(self, adapter_ids: list[str], requests: list[GenerationRequest], states: list[CallState]):
        """One mixed-adapter pass (LoRA adapters of any tenants, and the base), on a worker thread."""
        self.metrics.batch(len(requests), adapters=len(set(adapter_ids)), path="mixed")
        outcomes, timings = await asyncio.to_thread(self.engine.run_mixed, adapter_ids, requests, states)
        for outcome in outcomes:
            if isinstance(outcome, Abandoned):
                self.metrics.abandoned(outcome.reason)
        return outcomes, timings

    def stats(self) -> dict:
        return {**self.engine.stats(), **self.metrics.snapshot()}

    def describe(self) -> dict:
        from causalt2i.generation import size_range

        low, high = size_range(self.engine.parts.default_resolution)
        return {"base_model": self.engine.parts.base_model, "base_fingerprint": self.engine.fingerprint,
                "default_resolution": self.engine.parts.default_resolution, "min_side": low, "max_side": high}
