"""The generator's request path without Ray (what the deployment calls): cache bound, unload, verification,
cancellation, that a batch of one adapter equals direct generation, and which requests the queue batches."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from causalt2i.adapter import AdapterError, load_adapter
from causalt2i.generation import GenerationError, Generator, GenerationRequest
from causalt2i.models import load_sdxl
from causalt2i.text import PromptError
from serve.generator import Abandoned, AdapterBatchQueue, CallState, GeneratorEngine, ServedAdapter, refusal_for
from tests.serve.adapters import write_adapter

REQUEST = dict(prompt="a photo of <s1> cat", steps=2, width=64, height=64, guidance=5.0)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: write_adapter(root / name, tenant="acme", name=name, seed=i) for i, name in enumerate(("a", "b", "c"))}


@pytest.fixture
def engine(adapter_dirs):
    size = load_adapter(adapter_dirs["a"]).nbytes
    return GeneratorEngine(load_sdxl("tiny"), cache_bytes=int(size * 2.5), locate=lambda key: adapter_dirs[key])


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_engine_output_equals_direct_generation_and_cache_stays_bounded(engine, adapter_dirs):
    direct = Generator(load_sdxl("tiny"))
    for name in ("a", "b", "c", "a"):
        (pngs,), timings = engine.run(name, [GenerationRequest(**REQUEST, seed=3)])
        direct.use(load_adapter(adapter_dirs[name]))
        expected = direct(GenerationRequest(**REQUEST, seed=3)).pixels[0].permute(1, 2, 0).numpy()
        assert np.array_equal(pixels(pngs[0]), expected), name
        assert engine.cache.nbytes <= engine.cache.capacity_bytes
        assert {"swap", "denoise"} <= set(timings)
    stats = engine.stats()
    assert stats["evictions"] >= 2 and stats["entries"] == 2 and stats["loads"] == 4


def test_requests_differing_only_in_seed_share_one_batch(engine):
    requests = [GenerationRequest(**REQUEST, seed=s) for s in (1, 2)] + [GenerationRequest(**{**REQUEST, "steps": 1}, seed=1)]
    outcomes, _ = engine.run("a", requests)
    alone, _ = engine.run("a", [requests[1]])
    # Batched float32 kernels may round the last bit differently: at most 1 of 255 per pixel.
    assert np.abs(pixels(outcomes[1][0]).astype(int) - pixels(alone[0][0]).astype(int)).max() <= 1


def test_unloading_the_applied_adapter_restores_the_base(engine):
    base_state = {k: v.clone() for k, v in engine.generator.host._live.items()}
    engine.run("a", [GenerationRequest(**REQUEST, seed=0)])
    served = ServedAdapter(engine, "a", engine.adapter("a"))
    served.__del__()
    served.__del__()  # Serve calls it on eviction, Python again at collection: only the first counts
    assert "a" not in engine.cache and engine.stats()["active"] is None
    assert all(torch.equal(base_state[k], v) for k, v in engine.generator.host._live.items())


def test_unloading_during_a_pass_does_not_wait_for_it_and_the_pass_restores_the_base(engine):
    """Serve unloads while it holds its model-cache lock: waiting for the pass there would hold back every other
    adapter's load, so each pass would find one new adapter queued and tenants would never share a pass."""
    base_state = {k: v.clone() for k, v in engine.generator.host._live.items()}
    engine.run("a", [GenerationRequest(**REQUEST, seed=0)])
    served = ServedAdapter(engine, "a", engine.adapter("a"))
    long_pass = threading.Thread(target=engine.run, args=("a", [GenerationRequest(**{**REQUEST, "steps": 40}, seed=1)]))
    long_pass.start()
    try:
        deadline = time.monotonic() + 30
        while not engine.lock.locked():
            assert time.monotonic() < deadline, "the pass never took the engine"
            time.sleep(0.001)
        started = time.monotonic()
        served.__del__()
        returned_after = time.monotonic() - started
        assert engine.lock.locked(), f"unload returned after {returned_after:.2f} s, only once the pass had ended"
        assert "a" not in engine.cache and engine.stats()["active"] == "a"  # the running pass keeps its weights
    finally:
        long_pass.join()
    assert engine.stats()["active"] is None  # restored by the pass as it released the engine
    assert all(torch.equal(base_state[k], v) for k, v in engine.generator.host._live.items())


def test_prompt_checks_name_the_field(engine):
    with pytest.raises(PromptError) as unknown:
        engine.check(GenerationRequest(**{**REQUEST, "prompt": "a <q7> cat"}), ["<s1>"])
    assert unknown.value.field == "prompt"
    with pytest.raises(GenerationError) as size:
        engine.check(GenerationRequest(**{**REQUEST, "width": 512}), ["<s1>"])
    assert refusal_for(size.value).field == "width" and refusal_for(size.value).status == 422


def test_corrupt_and_foreign_adapters_are_refused(tmp_path, adapter_dirs):
    foreign = write_adapter(tmp_path / "foreign", tenant="acme", name="f", seed=1, base_fingerprint="0" * 64)
    corrupt = write_adapter(tmp_path / "corrupt", tenant="acme", name="c", seed=1)
    with open(corrupt / "adapter.safetensors", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    paths = {"foreign": foreign, "corrupt": corrupt}
    engine = GeneratorEngine(load_sdxl("tiny"), cache_bytes=10**8, locate=lambda key: paths[key])
    for key, words in (("foreign", "different base"), ("corrupt", "sha256")):
        (outcome,), _ = engine.run(key, [GenerationRequest(**REQUEST)])
        assert isinstance(outcome, AdapterError) and words in str(outcome)
        assert refusal_for(outcome).status == 409
    assert len(engine.cache) == 0


def test_a_group_whose_callers_all_left_stops_early(engine):
    gone = CallState(deadline=float("inf"))
    gone.cancelled = True
    expired = CallState(deadline=0.0)
    outcomes, _ = engine.run("a", [GenerationRequest(**REQUEST, seed=1), GenerationRequest(**{**REQUEST, "steps": 3})],
                             [gone, expired])
    assert [type(o) for o in outcomes] == [Abandoned, Abandoned]
    assert [o.reason for o in outcomes] == ["cancelled", "timeout"]
    assert refusal_for(outcomes[1]).status == 504


# -- AdapterBatchQueue: which requests share a forward pass, and when it starts ------------------------------------


class RecordingEngine:
    """Stands in for `GeneratorEngine.run` behind the queue: records each batch, holds it until released."""

    def __init__(self):
        self.batches: list[tuple[str, list[int]]] = []
        self.release = asyncio.Event()
        self.release.set()

    async def execute(self, adapter_id, requests, states):
        self.batches.append((adapter_id, [r.seed for r in requests]))
        await self.release.wait()
        if adapter_id == "broken":
            raise RuntimeError("engine failed")
        return [[f"{adapter_id}:{r.seed}".encode()] for r in requests], {"denoise": 0.0}


def queued(seed: int, n: int = 1) -> GenerationRequest:
    return GenerationRequest(**REQUEST, seed=seed, n=n)


def held_queue() -> tuple[RecordingEngine, AdapterBatchQueue]:
    """A queue (4 images a batch) in front of an engine that holds each batch until `engine.release` is set."""
    engine = RecordingEngine()
    engine.release.clear()
    return engine, AdapterBatchQueue(engine.execute, max_batch_images=4)


def submit(queue: AdapterBatchQueue, adapter_id: str, seed: int, n: int = 1) -> asyncio.Task:
    return asyncio.create_task(queue.run(adapter_id, [queued(seed, n)], [CallState(float("inf"))]))


def test_queue_starts_a_lone_request_at_once_and_batches_what_arrives_meanwhile():
    async def scenario():
        engine, queue = held_queue()
        first = submit(queue, "a", 0)
        await asyncio.sleep(0)  # no batching window: the idle engine takes the lone request straight away
        await asyncio.sleep(0)
        assert engine.batches == [("a", [0])]
        # While it runs: b, a, a, b arrive. Oldest first is b, with every waiting b; then both a's.
        later = [submit(queue, adapter, seed) for adapter, seed in (("b", 1), ("a", 2), ("a", 3), ("b", 4))]
        await asyncio.sleep(0)
        engine.release.set()
        results = await asyncio.gather(first, *later)
        assert engine.batches == [("a", [0]), ("b", [1, 4]), ("a", [2, 3])]
        assert [r[0][0] for r in results] == [[b"a:0"], [b"b:1"], [b"a:2"], [b"a:3"], [b"b:4"]]
        assert [r[0][1] for r in results] == [1, 2, 2, 2, 2]  # the size of the batch each request ran in

    asyncio.run(scenario())


def test_queue_caps_a_batch_in_images_but_always_runs_one_request():
    async def scenario():
        engine, queue = held_queue()
        blocker = submit(queue, "x", 9)
        await asyncio.sleep(0)
        waiting = [submit(queue, "a", seed, n) for seed, n in ((1, 3), (2, 2), (3, 1), (4, 8))]
        await asyncio.sleep(0)
        engine.release.set()
        await asyncio.gather(blocker, *waiting)
        # 3 + 1 images fill a batch (2 would overflow it and waits, in order); 8 images alone exceed the cap.
        assert engine.batches[1:] == [("a", [1, 3]), ("a", [2]), ("a", [4])]

    asyncio.run(scenario())


def test_queue_drops_a_request_whose_caller_left_and_reports_engine_failures():
    async def scenario():
        engine, queue = held_queue()
        blocker = submit(queue, "a", 0)
        await asyncio.sleep(0)
        gone = submit(queue, "a", 1)
        broken = submit(queue, "broken", 2)
        await asyncio.sleep(0)
        gone.cancel()
        engine.release.set()
        await blocker
        (outcome, size, _), = await broken
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert [seeds for _, seeds in engine.batches] == [[0], [2]]  # seed 1 never reached the engine
        assert isinstance(outcome, RuntimeError) and size == 1
        assert len(queue) == 0

    asyncio.run(scenario())
