import itertools

import numpy as np
import pytest
import yaml
from PIL import Image

from causalt2i.data.images import load_reference_image
from causalt2i.data.synthetic import CLASS_WORDS, make_synthetic_subjects, write_synthetic_spec
from causalt2i.spec import SpecError, load_spec


def _format(path) -> str:
    with Image.open(path) as image:
        return image.format


def _rgb_pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def _file_bytes(subjects) -> list[bytes]:
    return [path.read_bytes() for subject in subjects for path in subject.image_paths]


def test_subjects_are_written_under_their_class_word_in_alternating_formats(tmp_path):
    subjects = make_synthetic_subjects(tmp_path, n_subjects=3, images_per_subject=4, size=96)
    assert [s.token for s in subjects] == ["<s1>", "<v1>", "<q1>"]
    assert [s.class_word for s in subjects] == list(CLASS_WORDS[:3])
    for subject in subjects:
        assert len(subject.image_paths) == 4
        assert all(path.parent == tmp_path / subject.class_word for path in subject.image_paths)
        formats = [_format(path) for path in subject.image_paths]
        assert formats == ["PNG", "JPEG", "PNG", "JPEG"]
        # Every reference passes the loader's checks (format, size, decodability).
        assert all(load_reference_image(path).size == (96, 96) for path in subject.image_paths)


def test_same_seed_same_files_different_seed_different_files(tmp_path):
    first = make_synthetic_subjects(tmp_path / "a", seed=5, size=64)
    again = make_synthetic_subjects(tmp_path / "b", seed=5, size=64)
    other = make_synthetic_subjects(tmp_path / "c", seed=6, size=64)
    assert _file_bytes(first) == _file_bytes(again)
    assert all(x != y for x, y in zip(_file_bytes(first), _file_bytes(other)))


def test_subjects_differ_from_each_other_and_references_differ_within_a_subject(tmp_path):
    subjects = make_synthetic_subjects(tmp_path, n_subjects=8, images_per_subject=3, size=64, formats=("png",))
    means = []
    for subject in subjects:
        pixels = [_rgb_pixels(path) for path in subject.image_paths]
        means.append(np.mean([p.mean(axis=(0, 1)) for p in pixels], axis=0))
        # References of one subject vary (position, scale, rotation, background): mean |Δ| ≥ 5 levels.
        for a, b in itertools.combinations(pixels, 2):
            assert np.abs(a - b).mean() >= 5.0
    # Mean colour of any two subjects is ≥ 10 levels apart (measured ≥ 17.9 for seeds 0–2).
    for a, b in itertools.combinations(means, 2):
        assert np.linalg.norm(a - b) >= 10.0


@pytest.mark.parametrize("kwargs, match", [({"n_subjects": 0}, "n_subjects"), ({"n_subjects": 9}, "n_subjects"), ({"images_per_subject": 0}, "images_per_subject"), ({"formats": ("gif",)}, "formats")])
def test_bad_arguments_are_refused(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic_subjects(tmp_path, **kwargs)


def test_spec_file_loads_with_relative_image_paths(tmp_path):
    spec_path = write_synthetic_spec(tmp_path / "demo", n_subjects=3, steps=12, seed=4, gpus_per_worker=0)
    assert spec_path == tmp_path / "demo" / "spec.yaml"
    spec = load_spec(spec_path)
    assert (spec.tenant, spec.name, spec.base_model) == ("demo", "synthetic", "tiny")
    assert (spec.train.resolution, spec.train.steps, spec.train.seed) == (64, 12, 4)
    assert spec.resources.gpus_per_worker == 0
    assert spec.tokens == ["<s1>", "<v1>", "<q1>"]
    assert spec.joint_prompt() == "a <s1> cat, a <v1> dog and a <q1> teapot"

    raw = yaml.safe_load(spec_path.read_text())
    for entry, subject in zip(raw["subjects"], spec.subjects):
        assert entry["images"] == [f"{entry['class_word']}/{j:02d}.{ext}" for j, ext in enumerate(["png", "jpg"] * 2)]
        assert all(load_reference_image(path).size == (128, 128) for path in subject.images)


def test_spec_with_steps_none_uses_the_schema_default(tmp_path):
    spec = load_spec(write_synthetic_spec(tmp_path, steps=None))
    assert spec.train.steps is None and spec.total_steps == 1000


def test_invalid_spec_argument_fails_before_anything_is_written(tmp_path):
    out_dir = tmp_path / "bad"
    with pytest.raises(SpecError) as caught:
        write_synthetic_spec(out_dir, tenant="Not A Tenant")
    assert caught.value.field == "tenant"
    assert not out_dir.exists()
