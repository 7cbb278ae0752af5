"""Manifests broken on purpose fail validation, and each finding names the object and the field."""

from __future__ import annotations

import copy

import pytest

from k8s import validation

from .conftest import FIXTURES


def _findings(objects, crds, ray_version):
    return [str(f) for f in validation.validate_objects(objects, crds, ray_version=ray_version, serve_schema=False)]


@pytest.mark.parametrize(("fixture", "expected"), [
    ("wrong-apiversion", "RayService/ct2i-serve: apiVersion: 'ray.io/v2' is not KubeRay's RayService version; use ray.io/v1"),
    ("gpu-on-head", "RayService/ct2i-serve: spec.rayClusterConfig.headGroupSpec.template.spec.containers[0]"
                    ".resources.limits.nvidia.com/gpu: GPUs belong on worker groups, not the head"),
    ("ray-version-mismatch", "RayCluster/ct2i-tuning: spec.rayVersion: '2.59.0' differs from the image's Ray 2.60.0"),
])
def test_broken_fixture_overlay_fails_with_the_field_named(kubectl, crds, ray_version, fixture, expected):
    findings = _findings(validation.render(FIXTURES / fixture), crds, ray_version)
    assert expected in findings, "\n".join(findings)


def test_ray_version_mismatch_in_an_image_tag_is_named(kubectl, crds, ray_version):
    findings = _findings(validation.render(FIXTURES / "ray-version-mismatch"), crds, ray_version)
    assert ("RayCluster/ct2i-tuning: spec.workerGroupSpecs[0].template.spec.containers[0].image: "
            "'registry.example.com/ct2i/ct2i-platform:0.1.0-ray2.59.0-py311-gpu' carries Ray 2.59.0 in its tag; expected 2.60.0") in findings


@pytest.fixture()
def prod(rendered):
    return copy.deepcopy(rendered["overlays/prod"])


def _one(objects, kind):
    return next(o for o in objects if o["kind"] == kind)


def test_misspelt_kuberay_field_is_a_schema_error(prod, crds, ray_version):
    service = _one(prod, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    cluster["workerGroupSpec"] = cluster.pop("workerGroupSpecs")
    findings = _findings(prod, crds, ray_version)
    assert any(f.startswith("RayService/ct2i-serve: spec.rayClusterConfig: Additional properties are not allowed ('workerGroupSpec'")
               for f in findings), "\n".join(findings)


def test_wrong_type_deep_in_a_pod_template_is_named(prod, crds, ray_version):
    cluster = _one(prod, "RayCluster")
    cluster["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eighty"
    findings = _findings(prod, crds, ray_version)
    assert "RayCluster/ct2i-tuning: spec.workerGroupSpecs[1].template.spec.containers[0].ports[0].containerPort: 'eighty' is not of type 'integer'" in findings


def test_int_or_string_quantities_accept_both(prod, crds, ray_version):
    cluster = _one(prod, "RayCluster")
    resources = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    resources["limits"]["cpu"] = 4           # an integer where the rendering has the string "4"
    resources["requests"]["cpu"] = 4
    assert _findings(prod, crds, ray_version) == []


def test_core_object_unknown_field_and_wrong_apiversion(prod, crds, ray_version):
    pvc = next(o for o in prod if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == "ct2i-artifacts")
    pvc["spec"]["accessMode"] = pvc["spec"].pop("accessModes")
    deployment = _one(prod, "Deployment")
    deployment["apiVersion"] = "apps/v1beta1"
    findings = _findings(prod, crds, ray_version)
    assert any(f.startswith("PersistentVolumeClaim/ct2i-artifacts: spec: Additional properties are not allowed ('accessMode'")
               for f in findings), "\n".join(findings)
    assert "Deployment/ct2i-redis: apiVersion: Kubernetes 1.32 has no kind 'Deployment' in 'apps/v1beta1'" in findings


def test_head_must_have_zero_cpus(prod, crds, ray_version):
    _one(prod, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = "2"
    assert ("RayService/ct2i-serve: spec.rayClusterConfig.headGroupSpec.rayStartParams.num-cpus: "
            "must be \"0\" (is '2'): nothing may schedule on the head") in _findings(prod, crds, ray_version)


def test_serve_replica_that_fits_no_worker_pod(prod, crds, ray_version):
    import yaml

    service = _one(prod, "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    config["applications"][0]["deployments"][1]["ray_actor_options"] = {"num_cpus": 4, "num_gpus": 2}
    service["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    findings = _findings(prod, crds, ray_version)
    assert ("RayService/ct2i-serve: spec.serveConfigV2.applications[0].deployments[1].ray_actor_options: Generator needs 4 CPU "
            "and 2 GPU per replica; no worker pod offers that (generator: 8 CPU, 1 GPU, ingress: 2 CPU, 0 GPU)") in findings


def test_serve_replicas_at_maximum_exceed_the_gpu_pool(prod, crds, ray_version):
    service = _one(prod, "RayService")
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = 2
    findings = _findings(prod, crds, ray_version)
    assert ("RayService/ct2i-serve: spec.serveConfigV2: the Serve replicas at their maximum need 4 GPUs; "
            "the worker groups at maxReplicas offer 2") in findings


def test_gpu_group_needs_a_toleration_and_equal_requests_and_limits(prod, crds, ray_version):
    group = _one(prod, "RayCluster")["spec"]["workerGroupSpecs"][0]
    del group["template"]["spec"]["tolerations"]
    group["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] = "2"
    findings = _findings(prod, crds, ray_version)
    assert ("RayCluster/ct2i-tuning: spec.workerGroupSpecs[0].template.spec.tolerations: "
            "a GPU group must tolerate the nvidia.com/gpu taint that GPU nodes carry") in findings
    assert ("RayCluster/ct2i-tuning: spec.workerGroupSpecs[0].template.spec.containers[0].resources: "
            "nvidia.com/gpu requests (2) and limits (1) must both be set and equal") in findings


def test_token_auth_cannot_be_switched_off(prod, crds, ray_version):
    _one(prod, "RayCluster")["spec"]["authOptions"]["mode"] = "disabled"
    assert ("RayCluster/ct2i-tuning: spec.authOptions.mode: must be \"token\": Ray token authentication stays on outside tests"
            in _findings(prod, crds, ray_version))


def test_artifact_uri_must_be_one_and_mounted(prod, crds, ray_version):
    settings = next(o for o in prod if o["kind"] == "ConfigMap")
    settings["data"]["CT2I_ARTIFACTS"] = "/data/artifacts"
    findings = _findings(prod, crds, ray_version)
    assert ("RayCluster/ct2i-tuning: spec.workerGroupSpecs[0].template.spec.containers[0].volumeMounts: "
            "CT2I_ARTIFACTS is '/data/artifacts' but nothing is mounted there") in findings


def test_capacity_above_what_the_tuning_cluster_reaches(prod, crds, ray_version):
    next(o for o in prod if o["kind"] == "ConfigMap")["data"]["CT2I_CAPACITY_GPUS"] = "17"
    assert ("ConfigMap/ct2i-settings: data.CT2I_CAPACITY_GPUS: 17 exceeds the 16 GPUs the tuning cluster reaches at its maximum"
            in _findings(prod, crds, ray_version))


def test_secret_template_with_a_real_looking_value(rendered, crds, ray_version):
    secrets = copy.deepcopy(rendered["base/secrets"])
    next(s for s in secrets if s["metadata"]["name"] == "ct2i-ray-auth")["stringData"]["auth_token"] = "3f9c0e2ab1"
    assert ("Secret/ct2i-ray-auth: stringData.auth_token: a Secret template must hold a REPLACE_ME placeholder, never a value"
            in _findings(secrets, crds, ray_version))


def test_kueue_job_must_bring_its_own_fixed_cluster(rendered, crds, ray_version):
    objects = copy.deepcopy(rendered["jobs/batch-tuning-kueue"] + rendered["overlays/kueue"])
    job = _one(objects, "RayJob")
    job["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] = True
    job["spec"]["shutdownAfterJobFinishes"] = False
    job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = "no-such-queue"
    findings = _findings(objects, crds, ray_version)
    for expected in (
        "RayJob/ct2i-batch-tuning: spec.rayClusterSpec.enableInTreeAutoscaling: Kueue admits a fixed-size cluster: autoscaling must be off",
        "RayJob/ct2i-batch-tuning: spec.shutdownAfterJobFinishes: must be true for a Kueue-managed RayJob",
        "RayJob/ct2i-batch-tuning: metadata.labels.kueue.x-k8s.io/queue-name: no LocalQueue 'no-such-queue' in namespace 'tenant-acme'",
    ):
        assert expected in findings, "\n".join(findings)


def test_kueue_queue_objects_are_checked(rendered, crds, ray_version):
    objects = copy.deepcopy(rendered["overlays/kueue"])
    queue = _one(objects, "ClusterQueue")
    queue["spec"]["resourceGroups"][0]["flavors"][0]["resources"][2]["nominalQuota"] = 0
    next(o for o in objects if o["kind"] == "LocalQueue")["spec"]["clusterQueue"] = "elsewhere"
    findings = _findings(objects, crds, ray_version)
    assert "ClusterQueue/ct2i-tuning: spec.resourceGroups: no positive nominalQuota on nvidia.com/gpu" in findings
    assert "LocalQueue/ct2i-tuning: spec.clusterQueue: no ClusterQueue 'elsewhere' is rendered" in findings


def test_rayjob_selector_must_name_a_rendered_cluster(rendered, crds, ray_version):
    objects = copy.deepcopy(rendered["jobs/batch-tuning"] + rendered["overlays/prod"])
    _one(objects, "RayJob")["spec"]["clusterSelector"]["ray.io/cluster"] = "ct2i-tunning"
    assert ("RayJob/ct2i-batch-tuning: spec.clusterSelector.ray.io/cluster: no RayCluster 'ct2i-tunning' is rendered"
            in _findings(objects, crds, ray_version))


def test_object_without_namespace_is_named(prod, crds, ray_version):
    del _one(prod, "Deployment")["metadata"]["namespace"]
    assert any(f.startswith("Deployment/ct2i-redis: metadata.namespace: unset") for f in _findings(prod, crds, ray_version))


@pytest.mark.parametrize(("quantity", "value"), [("500m", 0.5), ("4Gi", 4 * 2**30), (2, 2), ("1.5", 1.5), ("2k", 2000)])
def test_quantity_parsing(quantity, value):
    assert float(validation._quantity(quantity)) == pytest.approx(value, rel=0, abs=0)


@pytest.mark.parametrize(("image", "version"), [
    ("registry.example.com:5000/ct2i/ct2i-platform:0.1.0-ray2.60.0-py311-gpu", "2.60.0"),
    ("rayproject/ray:2.60.0-py311-gpu", "2.60.0"),
    ("ct2i-platform:0.1.0", None),
    ("ct2i-platform", None),
])
def test_ray_version_read_from_image_tags(image, version):
    assert validation._ray_version_in(image) == version


def test_openapi_conversion_handles_kubernetes_extensions():
    converted = validation.openapi_to_jsonschema({
        "type": "object",
        "properties": {
            "port": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "maybe": {"type": "string", "nullable": True},
        },
    })
    import jsonschema

    validator = jsonschema.Draft7Validator(converted)
    assert validator.is_valid({"port": 8080, "free": {"anything": [1]}, "maybe": None})
    assert validator.is_valid({"port": "http"})
    assert not validator.is_valid({"port": 1.5})
    assert not validator.is_valid({"unknown": 1})


def test_command_line_validates_and_reports(kubectl, crds, capsys):
    assert validation.main([str(FIXTURES.parent.parent.parent / "k8s/overlays/dev")]) == 0
    assert validation.main([str(FIXTURES / "gpu-on-head")]) == 1
    out = capsys.readouterr().out
    assert "RayService/ct2i-serve: spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].resources.limits.nvidia.com/gpu" in out
