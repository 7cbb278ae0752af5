"""The evaluation protocol: prompts, the metrics file, the report image, and refused inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from causalt2i.adapter import AdapterSubject
from causalt2i.evaluate import (
    METRICS_FILE,
    PAPER_PROMPT_COUNTS,
    REPORT_FILE,
    EvalConfig,
    default_references,
    evaluate_adapter,
    load_references,
    paper_prompts,
)
from causalt2i.generation import GenerationError
from causalt2i.metrics import clip_i, clip_t
from causalt2i.metrics.extractors import MetricSuite

SUBJECTS = [AdapterSubject(token=f"<t{i}>", class_word=word) for i, word in enumerate(["cat", "dog", "teapot", "toy", "vase"])]
EVAL = dict(steps=2, seeds=[0, 1], max_prompts=2, width=64, height=64, kid_subsets=5)


@pytest.fixture(scope="module")
def suite() -> MetricSuite:
    return MetricSuite.tiny(0)


@pytest.fixture(scope="module")
def references(cat_dog_adapter_dir, cat_dog_adapter):
    return load_references(default_references(cat_dog_adapter_dir), cat_dog_adapter.manifest.subjects)


@pytest.fixture(scope="module")
def evaluation(generator, cat_dog_adapter, references, suite, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    report = evaluate_adapter(generator, cat_dog_adapter, references, suite, EvalConfig(**EVAL), out)
    return report, out


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_paper_prompts_name_every_subject_as_many_times_as_the_paper(count):
    prompts = paper_prompts(SUBJECTS[:count])
    assert len(prompts) == PAPER_PROMPT_COUNTS.get(count, 5)
    assert len(set(prompts)) == len(prompts)
    for prompt in prompts:
        for subject in SUBJECTS[:count]:
            assert f"a {subject.token} {subject.class_word}" in prompt
    if count == 2:
        assert prompts[0] == "a photo of a <t0> cat and a <t1> dog"


def test_eval_writes_every_metric_for_each_subject(evaluation):
    report, out = evaluation
    data = json.loads((out / METRICS_FILE).read_text())
    assert set(data["subjects"]) == {"<s1>", "<v1>"}
    for token, subject in data["subjects"].items():
        for metric in ("clip_i", "clip_t", "lpips", "kid", "kid_std"):
            assert isinstance(subject[metric], float) and np.isfinite(subject[metric]), (token, metric)
        assert -1.0 <= subject["clip_i"] <= 1.0 and -1.0 <= subject["clip_t"] <= 1.0
        assert subject["lpips"] > 0.0, "two seeds give two different images"
        assert subject["num_images"] == 4 and subject["num_references"] == 4
    assert set(data["overall"]) == {"clip_i", "clip_t", "lpips", "kid"}
    assert len(data["prompts"]) == 2
    # The paper's multi-subject figure is the mean over subjects.
    assert data["overall"]["clip_i"] == pytest.approx(np.mean([s["clip_i"] for s in data["subjects"].values()]), abs=1e-12)
    assert data["overall"]["kid"] == pytest.approx(np.mean([s["kid"] for s in data["subjects"].values()]), abs=1e-12)


def test_metrics_match_a_recomputation_from_the_saved_images(evaluation, references, suite):
    report, out = evaluation
    prompt = report.prompts[0]
    images = torch.stack([torch.from_numpy(np.array(Image.open(out / name).convert("RGB"))).permute(2, 0, 1) for name in prompt.images]).float() / 255
    feats = suite.clip.images(images)
    for token in ("<s1>", "<v1>"):
        refs = torch.cat([suite.clip.images(torch.from_numpy(np.array(r, dtype=np.float32) / 255).permute(2, 0, 1)[None]) for r in references[token]])
        assert prompt.clip_i[token] == pytest.approx(clip_i(feats, refs), abs=1e-6)
    # CLIP-T used the prompt with its identifier tokens stripped.
    assert prompt.clip_t_prompt == "a photo of a cat and a dog"
    assert prompt.clip_t == pytest.approx(clip_t(feats, suite.clip.texts([prompt.clip_t_prompt])[0]), abs=1e-6)


def test_report_png_opens_and_holds_a_band_per_prompt(evaluation):
    report, out = evaluation
    with Image.open(out / REPORT_FILE) as image:
        image.load()
        width, height = image.size
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"))
    tile = 96  # 64 px images are shown at the report's minimum tile side
    refs_per_prompt = 2 * 4
    assert width >= (refs_per_prompt + len(EVAL["seeds"])) * tile
    assert height >= len(report.prompts) * tile
    assert pixels.std() > 10, "the report shows images, not a blank page"


def test_single_seed_single_prompt_has_no_kid_and_says_why(generator, cat_dog_adapter, references, suite, tmp_path):
    config = EvalConfig(**{**EVAL, "seeds": [0], "max_prompts": 1})
    report = evaluate_adapter(generator, cat_dog_adapter, references, suite, config, tmp_path)
    assert report.subjects["<s1>"].kid is None and "needs >= 2 generated" in report.subjects["<s1>"].kid_note
    assert report.overall.kid is None and report.overall.lpips == 0.0


def test_custom_prompts_fill_subjects_and_may_name_one_subject(generator, cat_dog_adapter, references, suite, tmp_path):
    config = EvalConfig(**{**EVAL, "prompts": ["{subjects} in the snow", "a <s1> cat on the beach"], "max_prompts": None})
    report = evaluate_adapter(generator, cat_dog_adapter, references, suite, config, tmp_path)
    assert [row.prompt for row in report.prompts] == ["a <s1> cat and a <v1> dog in the snow", "a <s1> cat on the beach"]
    assert [row.subjects for row in report.prompts] == [["<s1>", "<v1>"], ["<s1>"]]
    assert report.subjects["<s1>"].num_images == 4 and report.subjects["<v1>"].num_images == 2


@pytest.mark.parametrize(
    ("prompts", "field"),
    [(["a <q1> toy and a <s1> cat"], "prompts.0"), (["a photo of a cat", "a dog"], "prompts.0"), (["{subjects}", "a <v1> dog " + "and a cat " * 30], "prompts.1")],
    ids=["unknown-token", "no-subject", "too-long"],
)
def test_bad_prompts_are_refused_before_generating(generator, cat_dog_adapter, references, suite, tmp_path, prompts, field):
    with pytest.raises(ValueError) as caught:
        evaluate_adapter(generator, cat_dog_adapter, references, suite, EvalConfig(**{**EVAL, "prompts": prompts}), tmp_path)
    assert caught.value.field == field
    assert not (tmp_path / "images").exists()


def test_references_must_cover_every_subject(cat_dog_adapter_dir, cat_dog_adapter, tmp_path):
    with pytest.raises(GenerationError) as caught:
        load_references(default_references(cat_dog_adapter_dir), [*cat_dog_adapter.manifest.subjects, AdapterSubject(token="<q1>", class_word="toy")])
    assert caught.value.field == "references" and "<q1>" in str(caught.value)
    with pytest.raises(GenerationError, match="references: .* holds no spec"):
        load_references(tmp_path, cat_dog_adapter.manifest.subjects)


def test_references_load_from_the_spec_yaml_folder(cat_dog_adapter_dir, cat_dog_adapter):
    spec_folder = cat_dog_adapter_dir.parent.parent / "spec"
    loaded = load_references(spec_folder, cat_dog_adapter.manifest.subjects)
    assert {token: len(images) for token, images in loaded.items()} == {"<s1>": 4, "<v1>": 4}
    assert default_references(spec_folder / "nowhere") is None
