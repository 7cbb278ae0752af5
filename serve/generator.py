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
import io
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from causalt2i.adapter import Adapter, AdapterError, load_adapter
from causalt2i.adapter_cache import AdapterCache, AdapterCacheError
from causalt2i.generation import GenerationError, GenerationRequest, Generator, generate, parse_request
from causalt2i.models import SDXLParts
from causalt2i.text import PromptError, tokenize
from serve.schemas import BASE_MODEL_REF, GenerateCall, GeneratedImages, GenerateOutcome, Refusal

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 8 * 1024**3
DEFAULT_MAX_ADAPTERS = 8
DEFAULT_MAX_BATCH_SIZE = 4
DEFAULT_BATCH_WAIT_S = 0.0  # AdapterBatchQueue gathers while the engine runs; waiting in Serve only adds latency
DEFAULT_REQUEST_TIMEOUT_S = 300.0

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

    def __init__(self, parts: SDXLParts, *, cache_bytes: int, locate: AdapterLocator, on_cache_change: Callable | None = None):
        self.parts = parts
        self.generator = Generator(parts)
        self.locate = locate
        self.cache = AdapterCache(cache_bytes, loader=self._load)
        self.lock = threading.Lock()
        self._active_id: str | None = None
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
        """Drop an adapter from the cache and, if it is applied, restore the bare base."""
        self.cache.evict(adapter_id)
        self._on_cache_change(self.cache.stats)
        with self.lock:
            if self._active_id == adapter_id:
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
        with self.lock:
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

    def stats(self) -> dict:
        stats = self.cache.stats
        return {"hits": stats.hits, "misses": stats.misses, "loads": stats.loads, "evictions": stats.evictions,
                "entries": stats.entries, "nbytes": stats.nbytes, "capacity_bytes": stats.capacity_bytes,
                "cached": self.cache.keys(), "active": self._active_id, "swaps": self.swaps,
                "base_fingerprint": self.fingerprint, "base_model": self.parts.base_model}


Execute = Callable[[str, list[GenerationRequest], list[CallState]], Awaitable[tuple[list, dict[str, float]]]]
"""(adapter id, requests, their call states) → (per request: PNGs or the exception, timings): one engine run."""


@dataclass
class _Queued:
    adapter_id: str
    request: GenerationRequest
    state: CallState
    answer: asyncio.Future


class AdapterBatchQueue:
    """Requests waiting for the engine. Whenever the engine is free it runs the adapter of the oldest waiting
    request, with that request and, oldest first, every other waiting request of the adapter that still fits in
    `max_batch_images` images (a request larger than that runs alone).

    - Oldest first across adapters, so a busy tenant cannot starve a quiet one, and one forward pass only ever
      holds one adapter.
    - While a batch runs, new requests accumulate; an idle engine starts a lone request at once.
    - A request whose caller has gone (its future was cancelled) is dropped before it reaches the engine.

    Lives on one event loop (the replica's); `execute` is awaited one call at a time.
    """

    def __init__(self, execute: Execute, max_batch_images: int):
        if max_batch_images < 1:
            raise ValueError("max_batch_images must be at least 1")
        self.execute = execute
        self.max_batch_images = max_batch_images
        self._waiting: list[_Queued] = []
        self._worker: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    async def run(self, adapter_id: str, requests: Sequence[GenerationRequest],
                  states: Sequence[CallState]) -> list[tuple[list[bytes] | Exception, int, dict[str, float]]]:
        """Queue `requests` for `adapter_id`; per request: (PNGs or exception, size of the batch it ran in, timings)."""
        loop = asyncio.get_running_loop()
        entries = [_Queued(adapter_id, request, state, loop.create_future()) for request, state in zip(requests, states)]
        self._waiting.extend(entries)
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return list(await asyncio.gather(*(entry.answer for entry in entries)))

    def _next_batch(self) -> list[_Queued]:
        self._waiting = [entry for entry in self._waiting if not entry.answer.done()]
        if not self._waiting:
            return []
        adapter_id = self._waiting[0].adapter_id
        batch, images = [], 0
        for entry in self._waiting:
            if entry.adapter_id != adapter_id:
                continue
            if batch and images + entry.request.n > self.max_batch_images:
                continue  # a smaller request behind it may still fit; this one leads a later batch
            batch.append(entry)
            images += entry.request.n
        taken = {id(entry) for entry in batch}
        self._waiting = [entry for entry in self._waiting if id(entry) not in taken]
        return batch

    async def _drain(self) -> None:
        while batch := self._next_batch():
            try:
                outcomes, timings = await self.execute(batch[0].adapter_id, [e.request for e in batch], [e.state for e in batch])
            except Exception as err:  # the engine itself failed: every caller of this batch gets the error
                outcomes, timings = [err] * len(batch), {}
            for entry, outcome in zip(batch, outcomes):
                if not entry.answer.done():
                    entry.answer.set_result((outcome, len(batch), timings))


def refusal_for(err: BaseException) -> Refusal:
    """The HTTP answer for an error raised while loading an adapter or checking or running a request."""
    if isinstance(err, (GenerationError, PromptError)):
        status = 409 if getattr(err, "field", "") == "adapter" else 422
        return Refusal(status, err.field, getattr(err, "message", None) or str(err).split(": ", 1)[-1])
    if isinstance(err, AdapterError):
        # The registry said it exists, but its files are corrupt or were tuned on another base.
        return Refusal(409, "adapter", str(err))
    if isinstance(err, AdapterCacheError):
        return Refusal(507, "adapter", str(err))
    if isinstance(err, Abandoned):
        return Refusal(504 if err.reason == "timeout" else 499, "request", f"abandoned: {err.reason}")
    if isinstance(err, LookupError):
        return Refusal(404, "adapter", str(err))
    return Refusal(500, "request", f"{type(err).__name__}: {err}")


class ServedAdapter:
    """What `@serve.multiplexed` holds per adapter id. Evicting it from Serve's LRU unloads it from the engine.

    A plain id string would never be unloaded; this object's `__del__` is what Serve calls on eviction (and
    Python again at garbage collection, hence the once-only guard).
    """

    def __init__(self, engine: GeneratorEngine, adapter_id: str, adapter: Adapter | None):
        self.engine = engine
        self.adapter_id = adapter_id
        self.tokens = adapter.manifest.tokens if adapter is not None else []
        self._unloaded = False

    def __del__(self):
        if self._unloaded or self.adapter_id == BASE_MODEL_REF:
            return
        self._unloaded = True
        try:
            self.engine.unload(self.adapter_id)
        except Exception:  # interpreter shutdown, or an engine already gone
            pass


def local_adapter_locator(plane) -> AdapterLocator:
    """Find an adapter's files through the control plane: in place in a local store, else fetched (verified) to scratch."""
    from cluster.service import NotFound

    def locate(adapter_id: str) -> Path:
        try:
            view = plane.get_adapter(None, adapter_id)
        except NotFound:
            raise LookupError(f"no adapter {adapter_id!r}: deleted or never published") from None
        parts = plane.store.parse_uri(view.uri, view.tenant)
        if plane.store.is_local:
            return Path(plane.store.path(view.tenant, *parts))
        dest = plane.settings.work_dir / "serve-adapters" / adapter_id
        plane.store.fetch_dir(view.tenant, parts, dest)
        return dest

    return locate


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


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
    """The `Generator` deployment. Arguments left None come from the environment:
    CT2I_BASE_MODEL (default `tiny`), CT2I_SERVE_CACHE_BYTES, CT2I_SERVE_MAX_ADAPTERS."""

    def __init__(self, settings: dict | None = None, *, base_model: str | None = None, cache_bytes: int | None = None,
                 max_adapters: int | None = None, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 batch_wait_s: float = DEFAULT_BATCH_WAIT_S, request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S):
        from ray import serve

        from causalt2i.models import load_sdxl
        from cluster.config import ControlPlaneSettings
        from cluster.service import ControlPlane
        from serve.metrics import GeneratorMetrics

        plane_settings = ControlPlaneSettings(**settings) if settings else ControlPlaneSettings.from_env()
        self.plane = ControlPlane.open(plane_settings)
        base = base_model or os.environ.get("CT2I_BASE_MODEL") or "tiny"
        cuda = torch.cuda.is_available()
        parts = load_sdxl(base, device="cuda" if cuda else None, dtype=torch.float16 if cuda and base != "tiny" else None)
        self.metrics = GeneratorMetrics()
        self.engine = GeneratorEngine(parts, cache_bytes=cache_bytes or _env_int("CT2I_SERVE_CACHE_BYTES", DEFAULT_CACHE_BYTES),
                                      locate=local_adapter_locator(self.plane), on_cache_change=self.metrics.cache)
        self.request_timeout_s = request_timeout_s
        slots = max_adapters or _env_int("CT2I_SERVE_MAX_ADAPTERS", DEFAULT_MAX_ADAPTERS)

        async def load_adapter_by_id(adapter_id: str) -> ServedAdapter:
            return await self._served_adapter(adapter_id)

        # A plain function, not the bound method: Serve keeps its LRU state as an attribute of what it wraps.
        self.get_adapter = serve.multiplexed(max_num_models_per_replica=slots)(load_adapter_by_id)
        self.queue = AdapterBatchQueue(self._execute, max_batch_images=max_batch_size)
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
            outcome, batch_size, timings = await self._batched(adapter_id, request, state)
        except asyncio.CancelledError:
            state.cancelled = True  # the client went away: the running group stops at its next step
            raise
        if isinstance(outcome, Exception):
            return refusal_for(outcome)
        width, height = request.size(self.engine.parts)
        total = time.perf_counter() - started
        return GeneratedImages(pngs=outcome, seeds=request.image_seeds(), width=width, height=height, batch_size=batch_size,
                               timings={"load": loaded - started, **timings, "total": total})

    async def _run_batch(self, adapter_ids: list[str], requests: list[GenerationRequest], states: list[CallState]):
        """`@serve.batch`'s handler: Serve already split its batch by multiplexed id; each id goes to the queue."""
        by_adapter: dict[str, list[int]] = {}
        for index, adapter_id in enumerate(adapter_ids):
            by_adapter.setdefault(adapter_id, []).append(index)
        queued = time.perf_counter()
        answers = await asyncio.gather(*(self.queue.run(adapter_id, [requests[i] for i in members], [states[i] for i in members])
                                         for adapter_id, members in by_adapter.items()))
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

    def stats(self) -> dict:
        return {**self.engine.stats(), **self.metrics.snapshot()}

    def describe(self) -> dict:
        from causalt2i.generation import size_range

        low, high = size_range(self.engine.parts.default_resolution)
        return {"base_model": self.engine.parts.base_model, "base_fingerprint": self.engine.fingerprint,
                "default_resolution": self.engine.parts.default_resolution, "min_side": low, "max_side": high}
