"""Bad specs: each is refused with an error naming its field, through the schema and through `ct2i train`."""

import copy

import pytest
import yaml

from causalt2i.spec import SpecError, load_spec, parse_spec
from ct2i.cli import main


def _mutations():
    def subjects(data):
        return data["subjects"]

    return [
        ("duplicate token", lambda d: subjects(d)[1].update(token=subjects(d)[0]["token"]), "subjects.1.token"),
        ("token already in the vocabulary", lambda d: subjects(d)[0].update(token="cat"), "subjects.0.token"),
        ("class word tokenizes to nothing", lambda d: subjects(d)[0].update(class_word="   "), "subjects.0.class_word"),
        ("no images", lambda d: subjects(d)[0].update(images=[]), "subjects.0.images"),
        ("missing image", lambda d: subjects(d)[0]["images"].append("nope/missing.png"), "subjects.0.images"),
        ("steps zero", lambda d: d["train"].update(steps=0), "train.steps"),
        ("steps negative", lambda d: d["train"].update(steps=-3), "train.steps"),
        ("lr zero", lambda d: d["train"].update(lr=0.0), "train.lr"),
        ("lr negative", lambda d: d["train"].update(lr=-1e-4), "train.lr"),
        ("resolution not a multiple of 64", lambda d: d["train"].update(resolution=100), "train.resolution"),
        ("unknown top-level key", lambda d: d.update(learning_rate=1), "learning_rate"),
        ("unknown train key", lambda d: d["train"].update(stepz=3), "train.stepz"),
        ("unknown subject key", lambda d: subjects(d)[0].update(photos=[]), "subjects.0.photos"),
        ("bad tenant", lambda d: d.update(tenant="Acme Corp"), "tenant"),
        ("no subjects", lambda d: d.update(subjects=[]), "subjects"),
        ("bad param mode", lambda d: d["train"].update(param_mode="half"), "train.param_mode"),
        ("LoRA dropout of 1", lambda d: d["train"].update(lora_dropout=1.0), "train.lora_dropout"),
        ("LoRA alpha of 0", lambda d: d["train"].update(lora_alpha=0), "train.lora_alpha"),
        # issue 13: lax values a YAML spec used to get through
        ("steps true", lambda d: d["train"].update(steps=True), "train.steps"),
        ("steps as a string", lambda d: d["train"].update(steps="4"), "train.steps"),
        ("steps 2**62", lambda d: d["train"].update(steps=2**62), "train.steps"),
        ("seed 10**30", lambda d: d["train"].update(seed=10**30), "train.seed"),
        ("checkpoint_every 10**30", lambda d: d["train"].update(checkpoint_every=10**30), "train.checkpoint_every"),
        ("alpha infinite", lambda d: d["train"].update(alpha=float("inf")), "train.alpha"),
        ("lr NaN", lambda d: d["train"].update(lr=float("nan")), "train.lr"),
        ("workers true", lambda d: d.setdefault("resources", {}).update(num_workers=True), "resources.num_workers"),
    ]


@pytest.mark.parametrize("case,mutate,field", _mutations(), ids=[m[0] for m in _mutations()])
def test_bad_spec_is_refused_naming_the_field_and_nothing_is_written(case, mutate, field, synthetic_spec_path, tmp_path, capsys):
    data = copy.deepcopy(yaml.safe_load(synthetic_spec_path.read_text()))
    data.setdefault("train", {})
    mutate(data)
    for subject in data["subjects"]:  # absolute paths, so the spec can live in tmp_path
        subject["images"] = [str(synthetic_spec_path.parent / p) for p in subject.get("images", [])]
    spec_path = tmp_path / "bad.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    code = main(["train", str(spec_path), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert field in err, err
    assert not out.exists(), "a refused spec must leave nothing behind"


def test_schema_errors_carry_the_field(synthetic_spec_path):
    data = yaml.safe_load(synthetic_spec_path.read_text())
    data["train"]["alpha"] = -1
    with pytest.raises(SpecError) as info:
        parse_spec(data, base_dir=synthetic_spec_path.parent)
    assert info.value.field == "train.alpha"


def test_defaults_and_prompts(synthetic_spec_path):
    spec = load_spec(synthetic_spec_path)
    data = yaml.safe_load(synthetic_spec_path.read_text())
    data["train"].pop("steps")
    defaulted = parse_spec(data, base_dir=synthetic_spec_path.parent)
    assert defaulted.total_steps == 500 * len(spec.subjects)
    tokens = spec.tokens
    classes = [s.class_word for s in spec.subjects]
    assert spec.joint_prompt() == f"a {tokens[0]} {classes[0]} and a {tokens[1]} {classes[1]}"
    three = parse_spec({**data, "subjects": data["subjects"] + [{**data["subjects"][0], "token": "<q1>"}]}, base_dir=synthetic_spec_path.parent)
    assert three.joint_prompt().count(", ") == 1 and three.joint_prompt().count(" and ") == 1


def test_relative_image_paths_resolve_against_the_spec_file(synthetic_spec_path):
    spec = load_spec(synthetic_spec_path)
    for subject in spec.subjects:
        for image in subject.images:
            assert image.startswith(str(synthetic_spec_path.parent))


def test_a_key_given_twice_is_refused_naming_it(synthetic_spec_path):
    text = synthetic_spec_path.read_text()
    assert text.startswith("name:") or "\nname:" in text
    spec_path = synthetic_spec_path.parent / "twice.yaml"
    spec_path.write_text(text.rstrip("\n") + "\nname: other\n")  # PyYAML alone would keep `other` silently
    try:
        with pytest.raises(SpecError) as info:
            load_spec(spec_path)
    finally:
        spec_path.unlink()
    assert info.value.field == "name" and "more than once" in info.value.message
