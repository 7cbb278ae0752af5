from __future__ import annotations

import copy
from dataclasses import dataclass
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


# --- tuned adapters shared by the export, compression and precision tests (each trained once) -----------
@dataclass
class FullTune:
    adapter_dir: Path
    base: dict[str, torch.Tensor]  # the base attn2 tensors (fp32)
    trained: dict[str, torch.Tensor]  # the trained attn2 tensors (fp32), what the artifact must reproduce


@pytest.fixture(scope="session")
def lora_adapter_dir(tmp_path_factory) -> Path:
    """A LoRA tune (rank 4, alpha 8: scale 2, not 1) of 3 steps at a raised lr, so its images differ from the base's."""
    from causalt2i.trainer import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lora-tune")
    spec_path = write_synthetic_spec(root / "spec", name="lora-tune", steps=3, n_subjects=2, images_per_subject=2, size=64)
    data = yaml.safe_load(spec_path.read_text())
    data["train"].update(lr=1e-2, param_mode="lora", lora_rank=4, lora_alpha=8.0)
    spec_path.write_text(yaml.safe_dump(data))
    result = train(load_spec(spec_path), root / "run")
    return result.adapter_dir


@pytest.fixture(scope="session")
def full_tune_500(tmp_path_factory) -> FullTune:
    """A full-mode tune of 500 steps at the default lr (the size of tune the issue measured precision on).

    About 30 s on the 2-core CPU box; every test that needs a real full tune shares it.
    """
    from causalt2i.models import attn2_state
    from causalt2i.trainer import Trainer

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("full-tune")
    spec_path = write_synthetic_spec(root / "spec", name="full-tune", steps=500, n_subjects=2, images_per_subject=2, size=64)
    trainer = Trainer(load_spec(spec_path), root / "run")
    base = {k: v.detach().clone() for k, v in attn2_state(trainer.model.parts.unet).items()}
    for _ in range(trainer.total_steps):
        trainer.train_step()
    trained = {k: v.detach().clone() for k, v in attn2_state(trainer.model.parts.unet).items()}
    return FullTune(adapter_dir=trainer.export_adapter(), base=base, trained=trained)


@pytest.fixture(scope="session")
def compressed_dir(full_tune_500, tmp_path_factory) -> Path:
    """`full_tune_500` compressed at energy 0.99 (fidelity measured on 4-step images)."""
    from causalt2i.compress import FidelityConfig, compress_adapter

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("compressed") / "adapter"
    compress_adapter(full_tune_500.adapter_dir, out, energy=0.99, fidelity=FidelityConfig(steps=4))
    return out
