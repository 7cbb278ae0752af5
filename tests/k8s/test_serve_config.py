"""serve/config.yaml is the one Serve config: it parses with Ray's schema, its import path resolves, and
every RayService's serveConfigV2 is generated from it and identical to it (plus declared overrides)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from k8s import serve_config

from .conftest import REPO_ROOT

SOURCE = REPO_ROOT / "serve" / "config.yaml"


def test_generated_patches_are_up_to_date():
    stale = [str(t.output) for t in serve_config.stale_targets()]
    assert stale == [], f"regenerate with `python -m k8s.serve_config`: {stale}"


def _service_config(objects):
    service = next(o for o in objects if o["kind"] == "RayService")
    return yaml.safe_load(service["spec"]["serveConfigV2"])


@pytest.mark.parametrize("overlay", ["prod", "kueue"])
def test_rendered_serve_config_is_serve_config_yaml(rendered, overlay):
    assert _service_config(rendered[f"overlays/{overlay}"]) == yaml.safe_load(SOURCE.read_text())


def test_dev_serve_config_is_serve_config_yaml_plus_its_overrides(rendered):
    dev = _service_config(rendered["overlays/dev"])
    source = yaml.safe_load(SOURCE.read_text())
    assert dev == serve_config.effective_config(next(t for t in serve_config.TARGETS if t.variant == "dev"))
    generator = next(d for d in dev["applications"][0]["deployments"] if d["name"] == "Generator")
    assert generator["ray_actor_options"]["num_gpus"] == 0
    # Everything the overrides do not name is inherited unchanged.
    source_generator = next(d for d in source["applications"][0]["deployments"] if d["name"] == "Generator")
    assert generator["max_ongoing_requests"] == source_generator["max_ongoing_requests"]
    assert dev["http_options"] == source["http_options"]


@pytest.mark.parametrize("variant", [t.variant for t in serve_config.TARGETS])
def test_serve_config_parses_with_ray_serve_deploy_schema(variant):
    from ray.serve.schema import ServeDeploySchema

    target = next(t for t in serve_config.TARGETS if t.variant == variant)
    schema = ServeDeploySchema.model_validate(serve_config.effective_config(target))
    (app,) = schema.applications
    assert app.import_path == "serve.app:app"
    assert {d.name for d in app.deployments} == {"Ingress", "Generator"}


def test_misspelt_serve_field_is_named_though_ray_ignores_it(rendered):
    # ServeDeploySchema itself ignores unknown keys (pydantic's default); the validator does not.
    import copy

    from k8s import validation

    service = copy.deepcopy(next(o for o in rendered["overlays/prod"] if o["kind"] == "RayService"))
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    config["applications"][0]["deployments"][1]["max_ongoing_request"] = 4
    config["applications"][0]["deployments"][1]["autoscaling_config"]["max_replica"] = 8
    service["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    assert sorted(str(f) for f in validation.check_serve_config(service)) == [
        "RayService/ct2i-serve: spec.serveConfigV2.applications[0].deployments[1].autoscaling_config.max_replica: "
        "unknown field: Ray Serve would ignore it silently",
        "RayService/ct2i-serve: spec.serveConfigV2.applications[0].deployments[1].max_ongoing_request: "
        "unknown field: Ray Serve would ignore it silently",
    ]


def test_every_import_path_resolves():
    import importlib

    config = yaml.safe_load(SOURCE.read_text())
    for app in config["applications"]:
        module_name, _, attribute = app["import_path"].partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            pytest.skip(f"{module_name} not implemented yet (the serving issue): {app['import_path']} cannot resolve")
        assert getattr(module, attribute, None) is not None, f"{module_name} has no {attribute!r}"


def _copy_sources(tmp_path: Path) -> Path:
    for target in serve_config.TARGETS:
        for path in (target.output, target.overrides):
            if path is not None:
                (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(REPO_ROOT / path, tmp_path / path)
    (tmp_path / "serve").mkdir(exist_ok=True)
    shutil.copy(SOURCE, tmp_path / serve_config.SERVE_CONFIG)
    return tmp_path


def test_a_change_to_serve_config_makes_every_patch_stale(tmp_path):
    root = _copy_sources(tmp_path)
    assert serve_config.stale_targets(root) == []
    text = (root / serve_config.SERVE_CONFIG).read_text().replace("target_ongoing_requests: 2", "target_ongoing_requests: 3")
    (root / serve_config.SERVE_CONFIG).write_text(text)
    assert [t.variant for t in serve_config.stale_targets(root)] == ["base", "dev"]


def test_override_of_a_deployment_that_does_not_exist_is_an_error(tmp_path):
    root = _copy_sources(tmp_path)
    dev = next(t for t in serve_config.TARGETS if t.variant == "dev")
    (root / dev.overrides).write_text("applications:\n  ct2i:\n    deployments:\n      Generater: {num_replicas: 1}\n")
    with pytest.raises(serve_config.OverrideError, match=r"applications\.ct2i\.deployments\.Generater: no such entry"):
        serve_config.render_patch(dev, root)
