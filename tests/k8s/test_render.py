"""Every kustomization renders with kubectl and validates: schemas (core, KubeRay CRDs, Kueue) and the
platform's consistency rules."""

from __future__ import annotations

import pytest

from k8s import validation

from .conftest import JOBS, OVERLAYS


@pytest.mark.parametrize("target", [f"overlays/{o}" for o in OVERLAYS] + ["base", "base/secrets"])
def test_kustomization_renders_and_validates(rendered, crds, ray_version, target):
    objects = rendered[target]
    assert objects, f"{target} rendered nothing"
    findings = validation.validate_objects(objects, crds, ray_version=ray_version)
    assert findings == [], "\n".join(map(str, findings))


@pytest.mark.parametrize(("job", "cluster"), [("batch-tuning", "overlays/prod"), ("batch-tuning", "overlays/dev"),
                                              ("batch-tuning-kueue", "overlays/kueue")])
def test_job_template_validates_against_the_cluster_it_runs_on(rendered, crds, ray_version, job, cluster):
    # Rendered together, so the cross-object rules see both: clusterSelector → a rendered RayCluster,
    # the Kueue queue label → a LocalQueue in the job's namespace, one CT2I_ARTIFACTS everywhere.
    objects = rendered[f"jobs/{job}"] + rendered[cluster]
    findings = validation.validate_objects(objects, crds, ray_version=ray_version)
    assert findings == [], "\n".join(map(str, findings))


def _referenced_secret_keys(objects):
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("secretKeyRef")
            if isinstance(ref, dict):
                refs.add((ref["name"], ref["key"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for obj in objects:
        walk(obj)
        for _, cluster in validation.ray_cluster_specs(obj):
            auth = cluster.get("authOptions") or {}
            if auth.get("secretName"):
                refs.add((auth["secretName"], "auth_token"))
    return refs


@pytest.mark.parametrize("target", [f"overlays/{o}" for o in OVERLAYS] + [f"jobs/{j}" for j in JOBS])
def test_every_secret_a_pod_reads_has_a_template(rendered, target):
    templates = {(s["metadata"]["name"], key) for s in rendered["base/secrets"] for key in s.get("stringData", {})}
    missing = _referenced_secret_keys(rendered[target]) - templates
    assert not missing, f"{target} reads Secret keys with no template in k8s/base/secrets: {sorted(missing)}"


@pytest.mark.parametrize("target", [f"overlays/{o}" for o in OVERLAYS])
def test_overlays_never_apply_secrets(rendered, target):
    # A later `kubectl apply -k` must not overwrite the operator's real values with the templates.
    assert [validation.object_name(o) for o in rendered[target] if o["kind"] == "Secret"] == []


def test_overlays_differ_where_they_promise_to(rendered):
    def settings(target):
        return next(o for o in rendered[target] if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "ct2i-settings")["data"]

    def gpus(target):
        return sum(g.gpus * g.max_pods for o in rendered[target] for g in validation.ray_groups(o))

    assert settings("overlays/dev")["CT2I_BASE_MODEL"] == "tiny"
    assert gpus("overlays/dev") == 0
    assert settings("overlays/prod")["CT2I_BASE_MODEL"] == "/models/sdxl"
    assert gpus("overlays/prod") > 0
    prod_service = next(o for o in rendered["overlays/prod"] if o["kind"] == "RayService")
    assert "gcsFaultToleranceOptions" in prod_service["spec"]["rayClusterConfig"]
    kinds = {o["kind"] for o in rendered["overlays/kueue"]}
    assert {"ClusterQueue", "LocalQueue", "ResourceFlavor", "RayService"} <= kinds


def test_tuning_gpu_groups_scale_from_zero_and_serving_autoscales(rendered):
    objects = rendered["overlays/prod"]
    tuning = next(o for o in objects if o["kind"] == "RayCluster")
    workers = [g for g in validation.ray_groups(tuning) if not g.is_head]
    assert workers and all(g.gpus >= 1 and g.spec["minReplicas"] == 0 for g in workers)
    service = next(o for o in objects if o["kind"] == "RayService")
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    generator = next(g for g in validation.ray_groups(service) if g.name == "generator")
    assert generator.gpus == 1 and generator.spec["minReplicas"] < generator.spec["maxReplicas"]
