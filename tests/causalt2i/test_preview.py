"""Training previews: rendered at the interval, deterministic, and invisible to the training result."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from causalt2i.checkpoint import latest_checkpoint, load_checkpoint
from causalt2i.preview import PREVIEW_FILE, list_previews, preview_grid
from causalt2i.spec import SpecError
from causalt2i.trainer import train

STEPS = 4


class Recorder:
    def __init__(self):
        self.previews = []

    def on_preview(self, step, folder):
        self.previews.append((step, folder))


def test_preview_every_defaults_to_the_checkpoint_interval_and_is_validated(make_spec):
    assert make_spec(checkpoint_every=3).preview_interval == 3
    assert make_spec(checkpoint_every=3, preview_every=2).preview_interval == 2
    assert make_spec(preview_every=0).preview_interval == 0
    with pytest.raises(SpecError) as raised:
        make_spec(preview_every=-1)
    assert raised.value.field == "train.preview_every"
    with pytest.raises(SpecError) as raised:
        make_spec(preview_each=2)
    assert raised.value.field == "train.preview_each"


def test_preview_prompts_are_the_joint_prompt_then_each_subject(make_spec):
    spec = make_spec()
    assert spec.preview_prompts() == [spec.joint_prompt(), *spec.subject_prompts()]
    assert len(spec.preview_prompts()) == len(spec.subjects) + 1


@pytest.fixture(scope="module")
def runs(synthetic_spec_path, tmp_path_factory):
    """The same LoRA tune (dropout on, so a changed global RNG would change it) three times: previews every 2
    steps twice, previews off once."""
    import copy

    import yaml

    from causalt2i.spec import parse_spec

    torch.set_num_threads(1)
    data = yaml.safe_load(synthetic_spec_path.read_text())

    def spec(preview_every):
        d = copy.deepcopy(data)
        d["train"].update(steps=STEPS, checkpoint_every=2, param_mode="lora", lora_rank=4, lora_dropout=0.1,
                          lr=1e-3, preview_every=preview_every)
        return parse_spec(d, base_dir=synthetic_spec_path.parent)

    out = {}
    for name, every in (("on", 2), ("again", 2), ("off", 0)):
        recorder = Recorder()
        run_dir = tmp_path_factory.mktemp(name) / "run"
        result = train(spec(every), run_dir, callbacks=[recorder])
        assert result.adapter_dir is not None
        out[name] = (run_dir, recorder, spec(every))
    return out


def test_previews_are_rendered_at_the_interval_and_handed_to_callbacks(runs):
    run_dir, recorder, spec = runs["on"]
    assert [step for step, _ in recorder.previews] == [2, 4]
    found = list_previews(run_dir)
    assert [p["step"] for p in found] == [2, 4]
    for preview in found:
        assert preview["prompts"] == spec.preview_prompts()
        assert len(preview["files"]) == len(spec.subjects) + 1
        for name in preview["files"]:
            with Image.open(f"{preview['folder']}/{name}") as image:
                assert image.size == (64, 64)
    assert list_previews(runs["off"][0]) == [] and runs["off"][1].previews == []


def test_previews_are_deterministic_and_show_the_training_progress(runs):
    first, second = list_previews(runs["on"][0]), list_previews(runs["again"][0])
    for a, b in zip(first, second, strict=True):
        for name in a["files"]:
            assert open(f"{a['folder']}/{name}", "rb").read() == open(f"{b['folder']}/{name}", "rb").read()
    # The weights moved between step 2 and 4, and the preview shows it (same seed, different image).
    step2, step4 = first
    assert open(f"{step2['folder']}/00.png", "rb").read() != open(f"{step4['folder']}/00.png", "rb").read()


def test_previews_do_not_change_the_training_result(runs):
    on, _ = load_checkpoint(latest_checkpoint(runs["on"][0]))
    off, _ = load_checkpoint(latest_checkpoint(runs["off"][0]))
    assert on["losses"] == off["losses"]
    for name, tensor in off["trainable"].items():
        assert torch.equal(on["trainable"][name], tensor), name
    assert torch.equal(on["torch_rng"], off["torch_rng"])
    assert torch.equal(on["noise_generator"], off["noise_generator"])
    adapter_on = (runs["on"][0] / "adapter" / "adapter.safetensors").read_bytes()
    adapter_off = (runs["off"][0] / "adapter" / "adapter.safetensors").read_bytes()
    assert adapter_on == adapter_off


def test_preview_grid_has_a_row_per_step_and_a_column_per_prompt(runs):
    found = list_previews(runs["on"][0])
    prompts = found[0]["prompts"]
    rows = [(p["step"], [Image.open(f"{p['folder']}/{n}") for n in p["files"]]) for p in found]
    grid = preview_grid(rows, prompts, cell=64)
    assert grid.width >= 64 * len(prompts) and grid.height >= 64 * len(rows)
    # The top-left cell of the second row is the step-4 joint-prompt image.
    assert json.loads((runs["on"][0] / "previews" / "step-000004" / PREVIEW_FILE).read_text())["step"] == 4
