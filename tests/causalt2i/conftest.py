from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from causalt2i.data.synthetic import write_synthetic_spec
from causalt2i.spec import load_spec, parse_spec


@pytest.fixture(autouse=True)
def _single_thread():
    # Two cores shared with the rest of the suite; one thread keeps timings stable and results exact.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synthetic_spec_path(tmp_path_factory) -> Path:
    return write_synthetic_spec(tmp_path_factory.mktemp("subjects"), resolution=64, steps=4, n_subjects=2, images_per_subject=2, size=64)


@pytest.fixture
def make_spec(synthetic_spec_path):
    """A spec from the synthetic subjects with `train` overrides, e.g. make_spec(steps=3, param_mode='lora')."""

    def build(**train):
        data = yaml.safe_load(synthetic_spec_path.read_text())
        data = copy.deepcopy(data)
        data.setdefault("train", {}).update(train)
        return parse_spec(data, base_dir=synthetic_spec_path.parent)

    return build


@pytest.fixture
def spec(synthetic_spec_path):
    return load_spec(synthetic_spec_path)
