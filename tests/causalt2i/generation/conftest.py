"""Shared fixtures: trained tiny adapters (a few optimizer steps each) and a resident tiny base.

Training takes a few seconds on a CPU, so each adapter is built once per session. The learning rate is
raised from the default so that two steps move the attn2 tensors far enough for adapters to differ visibly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from causalt2i.adapter import Adapter, load_adapter
from causalt2i.data.synthetic import write_synthetic_spec
from causalt2i.generation import Generator
from causalt2i.models import load_sdxl
from causalt2i.spec import load_spec
from causalt2i.trainer import train

TINY_STEPS = 3
TINY_SIDE = 64


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """Tiny tensors gain nothing from threads, and on a shared CPU the thread pool's spinning costs ~6x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def train_tiny_adapter(root: Path, *, name: str, seed: int, lr: float = 1e-3) -> Path:
    spec_path = write_synthetic_spec(root / "spec", name=name, seed=seed, steps=2)
    data = yaml.safe_load(spec_path.read_text())
    data["train"]["lr"] = lr
    spec_path.write_text(yaml.safe_dump(data, sort_keys=False))
    result = train(load_spec(spec_path), root / "run")
    assert result.adapter_dir is not None
    return result.adapter_dir


@pytest.fixture(scope="session")
def cat_dog_adapter_dir(tmp_path_factory) -> Path:
    """An adapter tuned on {<s1> cat, <v1> dog}; its run's spec.json sits one folder above it."""
    return train_tiny_adapter(tmp_path_factory.mktemp("adapter-a"), name="cat-dog", seed=0)


@pytest.fixture(scope="session")
def other_adapter_dir(tmp_path_factory) -> Path:
    """A second adapter on the same base, trained from other images and another seed."""
    return train_tiny_adapter(tmp_path_factory.mktemp("adapter-b"), name="other", seed=1)


@pytest.fixture(scope="session")
def cat_dog_adapter(cat_dog_adapter_dir) -> Adapter:
    return load_adapter(cat_dog_adapter_dir)


@pytest.fixture(scope="session")
def other_adapter(other_adapter_dir) -> Adapter:
    return load_adapter(other_adapter_dir)


@pytest.fixture(scope="module")
def generator() -> Generator:
    """A tiny base (seed 0, the base the adapters were tuned on) with no adapter applied."""
    return Generator(load_sdxl("tiny"))


@pytest.fixture
def bare(generator) -> Generator:
    """The module's generator, reset to the bare base for this test."""
    generator.use(None)
    return generator


def small_request(**fields) -> dict:
    return {"steps": TINY_STEPS, "width": TINY_SIDE, "height": TINY_SIDE, **fields}
