"""The generator's request path without Ray (what the deployment calls): cache bound, unload, verification,
cancellation, and that a batch of one adapter equals direct generation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from causalt2i.adapter import AdapterError, load_adapter
from causalt2i.generation import GenerationError, Generator, GenerationRequest
from causalt2i.models import load_sdxl
from causalt2i.text import PromptError
from serve.generator import Abandoned, CallState, GeneratorEngine, ServedAdapter, refusal_for
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
