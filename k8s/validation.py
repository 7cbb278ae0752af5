"""Offline validation of the rendered manifests: schemas first, then the platform's own rules.

Every finding names the object and the field, e.g.
`RayService/ct2i-serve: spec.rayClusterConfig.headGroupSpec.rayStartParams.num-cpus: must be "0" ...`.

- Core Kubernetes objects are checked against the OpenAPI schemas that `kubernetes-validate` ships for
  `K8S_VERSION`, in strict mode (an unknown field is an error, as with `kubectl apply --validate=strict`).
- KubeRay objects are checked against the `openAPIV3Schema` of KubeRay's own CRDs, read from the folder
  named by `CT2I_KUBERAY_CRDS`, else `../shared/reference/kuberay-crds/` beside the repository. Unknown
  fields are errors here too (the API server would prune them silently, which hides typos).
- Kueue objects have no schema here; `check_kueue` checks the fields the platform relies on.
- `check_consistency` holds the rules no schema can: one Ray version everywhere, GPUs only on worker
  groups, a head with `num-cpus: "0"`, Serve replicas that fit the worker pods, and so on.

    python -m k8s.validation k8s/overlays/prod k8s/jobs/batch-tuning   # render with kubectl, validate
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
# libyaml when present: the three CRDs are 3 MB of YAML, 8x slower to parse in pure Python.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
CRD_DIR_ENV = "CT2I_KUBERAY_CRDS"
DEFAULT_CRD_DIR = REPO_ROOT.parent / "shared" / "reference" / "kuberay-crds"
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml")
# The Kubernetes version whose schemas core objects are checked against: the oldest minor that
# KubeRay 1.5 and Kueue 0.9+ support and that every major cloud still runs.
K8S_VERSION = "1.32"
GPU_RESOURCE = "nvidia.com/gpu"
PLACEHOLDER = "REPLACE_ME"
KUEUE_GROUP = "kueue.x-k8s.io"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Cluster-scoped kinds among those the platform renders; everything else must carry a namespace.
CLUSTER_SCOPED_KINDS = {"Namespace", "ClusterQueue", "ResourceFlavor", "ClusterRole", "ClusterRoleBinding",
                        "PersistentVolume", "StorageClass", "PriorityClass", "CustomResourceDefinition"}


@dataclass(frozen=True, order=True)
class Finding:
    """One problem: which object, which field (dotted, `[i]` for list items), what is wrong."""

    obj: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.obj}: {self.path}: {self.message}" if self.path else f"{self.obj}: {self.message}"


class ManifestError(Exception):
    def __init__(self, findings: list[Finding]):
        self.findings = findings
        super().__init__("\n".join(str(f) for f in findings))


class RenderError(RuntimeError):
    """`kubectl kustomize` failed or is missing; the message carries its stderr."""


# --------------------------------------------------------------------------------------------------
# Rendering


def kubectl_binary() -> str | None:
    return shutil.which("kubectl")


def render(directory: str | os.PathLike) -> list[dict]:
    """`kubectl kustomize DIRECTORY`, parsed. Raises RenderError with kubectl's message on failure."""
    kubectl = kubectl_binary()
    if kubectl is None:
        raise RenderError("kubectl not found on PATH (install it with .ci/k8s-tools.sh)")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RenderError(f"kubectl kustomize {directory} failed: {result.stderr.strip()}")
    return [doc for doc in yaml.load_all(result.stdout, Loader=_YAML_LOADER) if doc]


def object_name(obj: dict) -> str:
    kind = obj.get("kind", "<no kind>") if isinstance(obj, dict) else "<not a mapping>"
    name = (obj.get("metadata") or {}).get("name", "<no name>") if isinstance(obj, dict) else "?"
    return f"{kind}/{name}"


def _join(path: Iterable[Any]) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text


# --------------------------------------------------------------------------------------------------
# Core objects: kubernetes-validate's schemas, loaded once per run.


@lru_cache(maxsize=4)
def _core_registry(version: str):
    from importlib import resources

    import kubernetes_validate.utils as kv_utils
    import referencing

    versions = [v for v in kv_utils.all_versions() if kv_utils.major_minor(v) == version]
    if not versions:
        raise ValueError(f"kubernetes-validate ships no schemas for Kubernetes {version}")
    folder = resources.files("kubernetes_validate").joinpath("kubernetes-json-schema", f"v{versions[-1]}-local-strict")
    definitions = json.loads(folder.joinpath("_definitions.json").read_text())
    registry = referencing.Resource.from_contents(definitions) @ referencing.Registry()
    return folder, registry


def core_schema_validator(api_version: str, kind: str, version: str = K8S_VERSION):
    """A Draft 2020-12 validator for one core kind, or None when that apiVersion/kind has no schema."""
    folder, registry = _core_registry(version)
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    candidate = folder.joinpath(f"{kind.lower()}-{group_version}.json")
    if not candidate.is_file():
        return None
    schema = json.loads(candidate.read_text())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _schema_errors(validator, obj: dict, label: str, limit: int = 20) -> list[Finding]:
    findings = []
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        findings.append(Finding(label, _join(error.absolute_path), _short_message(error)))
        if len(findings) >= limit:
            break
    return findings


def _short_message(error: jsonschema.ValidationError) -> str:
    if error.validator in ("anyOf", "oneOf") and error.context:
        return "; ".join(sorted({e.message for e in error.context}))[:300]
    return error.message[:300]


def validate_core(obj: dict, version: str = K8S_VERSION) -> list[Finding]:
    label = object_name(obj)
    validator = core_schema_validator(obj.get("apiVersion", ""), obj.get("kind", ""), version)
    if validator is None:
        return [Finding(label, "apiVersion", f"Kubernetes {version} has no kind {obj.get('kind')!r} in {obj.get('apiVersion')!r}")]
    return _schema_errors(validator, obj, label)


# --------------------------------------------------------------------------------------------------
# KubeRay objects: the CRDs' OpenAPI v3 schemas, converted to JSON Schema.


def crd_dir() -> Path | None:
    """The KubeRay CRD folder: $CT2I_KUBERAY_CRDS, else ../shared/reference/kuberay-crds; None if absent."""
    named = os.environ.get(CRD_DIR_ENV)
    for candidate in ([Path(named)] if named else []) + [DEFAULT_CRD_DIR]:
        if all((candidate / name).is_file() for name in CRD_FILES):
            return candidate
    return None


def openapi_to_jsonschema(node: Any) -> Any:
    """A Kubernetes structural schema as JSON Schema.

    - `x-kubernetes-int-or-string` → integer or string;
    - `x-kubernetes-preserve-unknown-fields` → the object takes any field;
    - `x-kubernetes-embedded-resource` → apiVersion, kind and metadata are allowed besides `properties`;
    - `nullable` → null is allowed;
    - an object with `properties` and nothing saying otherwise takes no other field (strict);
    - CEL rules (`x-kubernetes-validations`) are not evaluated, and formats are not checked.
    """
    if isinstance(node, list):
        return [openapi_to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("description", "nullable", "default", "format", "example"):
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: openapi_to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[key] = openapi_to_jsonschema(value)
        else:
            out[key] = copy.deepcopy(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.pop("anyOf", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    return out


@dataclass(frozen=True)
class CrdSchema:
    group: str
    kind: str
    served_versions: tuple[str, ...]
    validators: dict[str, Any]


class CrdSchemas:
    """The KubeRay kinds: kind → its CRD's versions and a validator per version."""

    def __init__(self, schemas: dict[str, CrdSchema]):
        self.by_kind = schemas

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "CrdSchemas":
        return _load_crds(str(Path(directory).resolve()))

    def handles(self, obj: dict) -> bool:
        return obj.get("kind") in self.by_kind

    def validate(self, obj: dict) -> list[Finding]:
        label = object_name(obj)
        crd = self.by_kind[obj["kind"]]
        group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
        if group != crd.group or version not in crd.served_versions:
            allowed = ", ".join(f"{crd.group}/{v}" for v in crd.served_versions)
            return [Finding(label, "apiVersion", f"{obj.get('apiVersion')!r} is not KubeRay's {crd.kind} version; use {allowed}")]
        return _schema_errors(crd.validators[version], obj, label)


@lru_cache(maxsize=2)
def _load_crds(directory: str) -> CrdSchemas:
    schemas = {}
    for name in CRD_FILES:
        with open(Path(directory) / name, encoding="utf-8") as handle:
            crd = yaml.load(handle, Loader=_YAML_LOADER)
        spec = crd["spec"]
        validators = {}
        for version in spec["versions"]:
            # Only the storage version: v1alpha1 is still served but deprecated, and the platform
            # promises ray.io/v1.
            if not (version.get("served") and version.get("storage")):
                continue
            schema = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
            # Top-level metadata is the API server's ObjectMeta, checked separately (names).
            schema.setdefault("properties", {})["metadata"] = {"type": "object"}
            validators[version["name"]] = jsonschema.Draft7Validator(schema)
        kind = spec["names"]["kind"]
        schemas[kind] = CrdSchema(spec["group"], kind, tuple(validators), validators)
    return CrdSchemas(schemas)


# --------------------------------------------------------------------------------------------------
# Kueue: no schema at hand; check the fields the platform relies on.


def check_kueue(objects: list[dict]) -> list[Finding]:
    findings = []
    kueue = [o for o in objects if str(o.get("apiVersion", "")).startswith(KUEUE_GROUP + "/")]
    flavors = {o["metadata"]["name"] for o in kueue if o.get("kind") == "ResourceFlavor"}
    cluster_queues = {o["metadata"]["name"]: o for o in kueue if o.get("kind") == "ClusterQueue"}
    for obj in kueue:
        label, kind, spec = object_name(obj), obj.get("kind"), obj.get("spec") or {}
        if obj.get("apiVersion") not in (f"{KUEUE_GROUP}/v1beta1", f"{KUEUE_GROUP}/v1beta2"):
            findings.append(Finding(label, "apiVersion", f"{obj.get('apiVersion')!r}: Kueue serves v1beta1 and v1beta2"))
        if kind == "ClusterQueue":
            groups = spec.get("resourceGroups") or []
            if not groups:
                findings.append(Finding(label, "spec.resourceGroups", "empty: the queue would admit nothing"))
            gpu_quota = False
            for g, group in enumerate(groups):
                covered = set(group.get("coveredResources") or [])
                for f, flavor in enumerate(group.get("flavors") or []):
                    where = f"spec.resourceGroups[{g}].flavors[{f}]"
                    if flavor.get("name") not in flavors:
                        findings.append(Finding(label, f"{where}.name", f"no ResourceFlavor {flavor.get('name')!r} is rendered"))
                    names = [r.get("name") for r in flavor.get("resources") or []]
                    if set(names) != covered:
                        findings.append(Finding(label, f"{where}.resources", f"must list exactly the coveredResources {sorted(covered)}, lists {names}"))
                    for r, resource in enumerate(flavor.get("resources") or []):
                        if "nominalQuota" not in resource:
                            findings.append(Finding(label, f"{where}.resources[{r}].nominalQuota", "missing"))
                        elif resource.get("name") == GPU_RESOURCE:
                            gpu_quota = _quantity(resource["nominalQuota"]) > 0
            if not gpu_quota:
                findings.append(Finding(label, "spec.resourceGroups", f"no positive nominalQuota on {GPU_RESOURCE}"))
        elif kind == "LocalQueue":
            if not obj["metadata"].get("namespace"):
                findings.append(Finding(label, "metadata.namespace", "a LocalQueue belongs to a tenant namespace"))
            if spec.get("clusterQueue") not in cluster_queues:
                findings.append(Finding(label, "spec.clusterQueue", f"no ClusterQueue {spec.get('clusterQueue')!r} is rendered"))
    return findings


# --------------------------------------------------------------------------------------------------
# Quantities


_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
             "n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "": 1,
             "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def _quantity(value: Any) -> Fraction:
    """A Kubernetes quantity ("500m", "4Gi", 2) as an exact number; ValueError if it is not one."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, (int, float)):
        return Fraction(value)
    match = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?", str(value).strip())
    if not match:
        raise ValueError(f"not a quantity: {value!r}")
    return Fraction(match.group(1)) * _SUFFIXES[match.group(2) or ""]


# --------------------------------------------------------------------------------------------------
# Consistency


@dataclass(frozen=True)
class RayGroup:
    """One head or worker group of a Ray cluster, with the Ray resources one of its pods offers."""

    owner: str        # "RayService/ct2i-serve"
    path: str         # "spec.rayClusterConfig.workerGroupSpecs[0]"
    name: str         # groupName, or "head"
    is_head: bool
    spec: dict
    cpus: Fraction
    gpus: Fraction
    memory: Fraction
    max_pods: int


def ray_cluster_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    """(path, RayClusterSpec) of every Ray cluster an object defines."""
    spec = obj.get("spec") or {}
    kind = obj.get("kind")
    if kind == "RayCluster":
        yield "spec", spec
    elif kind == "RayService" and isinstance(spec.get("rayClusterConfig"), dict):
        yield "spec.rayClusterConfig", spec["rayClusterConfig"]
    elif kind == "RayJob" and isinstance(spec.get("rayClusterSpec"), dict):
        yield "spec.rayClusterSpec", spec["rayClusterSpec"]


def _containers(pod_spec: dict) -> list[dict]:
    return [c for c in pod_spec.get("containers") or [] if isinstance(c, dict)]


def _ray_container(group_spec: dict) -> dict:
    containers = _containers(((group_spec.get("template") or {}).get("spec")) or {})
    return containers[0] if containers else {}


def _resource(container: dict, name: str) -> Fraction | None:
    resources = container.get("resources") or {}
    for section in ("limits", "requests"):
        value = (resources.get(section) or {}).get(name)
        if value is not None:
            return _quantity(value)
    return None


def ray_groups(obj: dict) -> list[RayGroup]:
    """The groups of every Ray cluster in `obj`, with what Ray will see on each pod: rayStartParams
    num-cpus/num-gpus/memory when set, else what KubeRay derives from the Ray container's limits (or
    requests)."""
    groups = []
    for prefix, cluster in ray_cluster_specs(obj):
        entries = [(f"{prefix}.headGroupSpec", "head", True, cluster.get("headGroupSpec") or {})]
        for i, worker in enumerate(cluster.get("workerGroupSpecs") or []):
            entries.append((f"{prefix}.workerGroupSpecs[{i}]", worker.get("groupName", f"#{i}"), False, worker))
        for path, name, is_head, spec in entries:
            params = spec.get("rayStartParams") or {}
            container = _ray_container(spec)

            def pick(param: str, resource: str) -> Fraction:
                if param in params:
                    return _quantity(params[param])
                value = _resource(container, resource)
                return value if value is not None else Fraction(0)

            try:
                cpus, gpus, memory = pick("num-cpus", "cpu"), pick("num-gpus", GPU_RESOURCE), pick("memory", "memory")
            except ValueError:
                cpus = gpus = memory = Fraction(0)
            max_pods = 1 if is_head else int(spec.get("maxReplicas") or 0) * int(spec.get("numOfHosts") or 1)
            groups.append(RayGroup(object_name(obj), path, name, is_head, spec, cpus, gpus, memory, max_pods))
    return groups


def _ray_version_in(image: str) -> str | None:
    """The Ray version an image tag names: `...:0.1.0-ray2.60.0-py311-gpu` (ours) or `rayproject/ray:2.60.0-...`."""
    name, _, tag = image.rsplit("/", 1)[-1].partition(":")
    tag = tag.partition("@")[0]
    match = re.search(r"ray-?(\d+\.\d+\.\d+)(?![0-9])", tag)
    if match is None and name in ("ray", "ray-ml", "ray-llm"):
        match = re.match(r"(\d+\.\d+\.\d+)(?![0-9])", tag)
    return match.group(1) if match else None


def _all_pod_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    """(path, PodSpec) of every pod template an object carries, Ray groups included."""
    spec = obj.get("spec") or {}
    kind = obj.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        yield "spec.template.spec", ((spec.get("template") or {}).get("spec")) or {}
    if kind == "Pod":
        yield "spec", spec
    if kind == "RayJob" and isinstance(spec.get("submitterPodTemplate"), dict):
        yield "spec.submitterPodTemplate.spec", spec["submitterPodTemplate"].get("spec") or {}
    for group in ray_groups(obj):
        yield f"{group.path}.template.spec", ((group.spec.get("template") or {}).get("spec")) or {}


def _serve_configs(obj: dict) -> Iterator[tuple[str, Any]]:
    if obj.get("kind") == "RayService" and "serveConfigV2" in (obj.get("spec") or {}):
        raw = obj["spec"]["serveConfigV2"]
        try:
            yield "spec.serveConfigV2", yaml.safe_load(raw) if isinstance(raw, str) else raw
        except yaml.YAMLError as error:
            yield "spec.serveConfigV2", error


def _model_classes(annotation: Any) -> list[type]:
    from typing import get_args

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [cls for arg in get_args(annotation) for cls in _model_classes(arg)]


def _unknown_fields(model: type, data: Any, path: str) -> Iterator[str]:
    """Paths of keys `model` does not define. Ray's Serve schemas ignore unknown keys, so a misspelt
    `max_ongoing_request` would deploy silently with the default; the platform treats it as an error."""
    if not isinstance(data, dict):
        return
    fields = {**model.model_fields, **{f.alias: f for f in model.model_fields.values() if f.alias}}
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            yield f"{path}.{key}"
            continue
        for sub_model in _model_classes(field.annotation)[:1]:
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                yield from _unknown_fields(sub_model, item, f"{path}.{key}[{i}]" if isinstance(value, list) else f"{path}.{key}")


def check_serve_config(obj: dict) -> list[Finding]:
    """serveConfigV2 parses with Ray Serve's own ServeDeploySchema, and names no field it lacks."""
    findings = []
    for path, config in _serve_configs(obj):
        if isinstance(config, Exception):
            findings.append(Finding(object_name(obj), path, f"not YAML: {config}"))
            continue
        from pydantic import ValidationError
        from ray.serve.schema import ServeDeploySchema

        try:
            ServeDeploySchema.model_validate(config)
        except ValidationError as error:
            for detail in error.errors()[:10]:
                findings.append(Finding(object_name(obj), f"{path}.{_join(detail['loc'])}", detail["msg"]))
            continue
        for unknown in _unknown_fields(ServeDeploySchema, config, path):
            findings.append(Finding(object_name(obj), unknown, "unknown field: Ray Serve would ignore it silently"))
    return findings


def check_consistency(objects: list[dict], ray_version: str) -> list[Finding]:
    findings: list[Finding] = []
    add = findings.append
    by_kind_name = {(o.get("kind"), (o.get("metadata") or {}).get("name")): o for o in objects}
    settings = [o for o in objects if o.get("kind") == "ConfigMap" and o["metadata"].get("name") == "ct2i-settings"]

    for obj in objects:
        label = object_name(obj)
        meta = obj.get("metadata") or {}
        if obj.get("kind") not in CLUSTER_SCOPED_KINDS and not meta.get("namespace"):
            add(Finding(label, "metadata.namespace", "unset: it would land in whatever namespace kubectl's context names"))

        if obj.get("kind") == "Secret":
            for section in ("stringData", "data"):
                for key, value in (obj.get(section) or {}).items():
                    if PLACEHOLDER not in str(value):
                        add(Finding(label, f"{section}.{key}", f"a Secret template must hold a {PLACEHOLDER} placeholder, never a value"))

        # One Ray version: rayVersion and the tag of every image that runs Ray.
        for prefix, cluster in ray_cluster_specs(obj):
            if str(cluster.get("rayVersion")) != ray_version:
                add(Finding(label, f"{prefix}.rayVersion", f"{cluster.get('rayVersion')!r} differs from the image's Ray {ray_version}"))
        for path, pod in _all_pod_specs(obj):
            if not obj.get("kind", "").startswith("Ray"):
                continue
            for c_key in ("initContainers", "containers"):
                for i, container in enumerate(pod.get(c_key) or []):
                    image = str(container.get("image", ""))
                    found = _ray_version_in(image)
                    if found != ray_version:
                        add(Finding(label, f"{path}.{c_key}[{i}].image",
                                    f"{image!r} carries Ray {found or 'no version'} in its tag; expected {ray_version}"))

        groups = ray_groups(obj)
        for group in groups:
            params = group.spec.get("rayStartParams") or {}
            pod = ((group.spec.get("template") or {}).get("spec")) or {}
            if group.is_head:
                if str(params.get("num-cpus")) != "0":
                    add(Finding(label, f"{group.path}.rayStartParams.num-cpus",
                                f"must be \"0\" (is {params.get('num-cpus')!r}): nothing may schedule on the head"))
                if "num-gpus" in params and _quantity(params["num-gpus"]) != 0:
                    add(Finding(label, f"{group.path}.rayStartParams.num-gpus", "GPUs belong on worker groups, not the head"))
                for c_key in ("initContainers", "containers"):
                    for i, container in enumerate(pod.get(c_key) or []):
                        for section in ("requests", "limits"):
                            if GPU_RESOURCE in ((container.get("resources") or {}).get(section) or {}):
                                add(Finding(label, f"{group.path}.template.spec.{c_key}[{i}].resources.{section}.{GPU_RESOURCE}",
                                            "GPUs belong on worker groups, not the head"))
            else:
                low, high = group.spec.get("minReplicas", 0), group.spec.get("maxReplicas", 0)
                if isinstance(low, int) and isinstance(high, int) and low > high:
                    add(Finding(label, f"{group.path}.minReplicas", f"{low} exceeds maxReplicas {high}"))
                container = _ray_container(group.spec)
                resources = container.get("resources") or {}
                req, lim = (resources.get("requests") or {}).get(GPU_RESOURCE), (resources.get("limits") or {}).get(GPU_RESOURCE)
                if req is not None or lim is not None:
                    if req is None or lim is None or _quantity(req) != _quantity(lim):
                        add(Finding(label, f"{group.path}.template.spec.containers[0].resources",
                                    f"{GPU_RESOURCE} requests ({req}) and limits ({lim}) must both be set and equal"))
                    tolerated = any(t.get("key") == GPU_RESOURCE or (t.get("operator") == "Exists" and not t.get("key"))
                                    for t in pod.get("tolerations") or [])
                    if not tolerated:
                        add(Finding(label, f"{group.path}.template.spec.tolerations",
                                    f"a GPU group must tolerate the {GPU_RESOURCE} taint that GPU nodes carry"))

        for prefix, cluster in ray_cluster_specs(obj):
            managed_by_kueue = KUEUE_QUEUE_LABEL in (meta.get("labels") or {})
            if obj.get("kind") in ("RayService", "RayCluster") and cluster.get("enableInTreeAutoscaling") is not True:
                add(Finding(label, f"{prefix}.enableInTreeAutoscaling", "must be true: worker groups scale between min and max"))
            auth = cluster.get("authOptions") or {}
            if auth.get("mode") != "token":
                add(Finding(label, f"{prefix}.authOptions.mode", "must be \"token\": Ray token authentication stays on outside tests"))
            if obj.get("kind") == "RayCluster" and (meta.get("labels") or {}).get("app.kubernetes.io/component") == "tuning":
                for group in groups:
                    if not group.is_head and group.gpus > 0 and group.spec.get("minReplicas", 0) != 0:
                        add(Finding(label, f"{group.path}.minReplicas", "a tuning GPU group scales from 0: idle GPUs cost money"))
            if managed_by_kueue and cluster.get("enableInTreeAutoscaling"):
                add(Finding(label, f"{prefix}.enableInTreeAutoscaling", "Kueue admits a fixed-size cluster: autoscaling must be off"))

        findings.extend(_check_serve_fit(obj, groups))

        if obj.get("kind") == "RayJob":
            spec = obj.get("spec") or {}
            labels = meta.get("labels") or {}
            if KUEUE_QUEUE_LABEL in labels:
                if spec.get("clusterSelector"):
                    add(Finding(label, "spec.clusterSelector", "Kueue admits only RayJobs with their own rayClusterSpec"))
                if spec.get("shutdownAfterJobFinishes") is not True:
                    add(Finding(label, "spec.shutdownAfterJobFinishes", "must be true for a Kueue-managed RayJob"))
                queue = labels[KUEUE_QUEUE_LABEL]
                local_queues = {(o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects if o.get("kind") == "LocalQueue"}
                if any(o.get("kind") == "LocalQueue" for o in objects) and (meta.get("namespace"), queue) not in local_queues:
                    add(Finding(label, f"metadata.labels.{KUEUE_QUEUE_LABEL}", f"no LocalQueue {queue!r} in namespace {meta.get('namespace')!r}"))
            selector = (spec.get("clusterSelector") or {}).get("ray.io/cluster")
            if selector is not None and any(o.get("kind") == "RayCluster" for o in objects):
                target = by_kind_name.get(("RayCluster", selector))
                if target is None:
                    add(Finding(label, "spec.clusterSelector.ray.io/cluster", f"no RayCluster {selector!r} is rendered"))
            if spec.get("clusterSelector") and spec.get("rayClusterSpec"):
                add(Finding(label, "spec.clusterSelector", "set either clusterSelector or rayClusterSpec, not both"))
            if not spec.get("clusterSelector") and not spec.get("rayClusterSpec"):
                add(Finding(label, "spec.rayClusterSpec", "a RayJob needs a rayClusterSpec or a clusterSelector"))

    # One artifact store: the control plane's CT2I_ARTIFACTS is Ray Train's storage_path too.
    artifacts = {}
    for cm in settings:
        if "CT2I_ARTIFACTS" in (cm.get("data") or {}):
            artifacts[f"{object_name(cm)} data.CT2I_ARTIFACTS"] = cm["data"]["CT2I_ARTIFACTS"]
    for obj in objects:
        for path, pod in _all_pod_specs(obj):
            for i, container in enumerate(pod.get("containers") or []):
                for j, env in enumerate(container.get("env") or []):
                    if env.get("name") == "CT2I_ARTIFACTS" and "value" in env:
                        artifacts[f"{object_name(obj)} {path}.containers[{i}].env[{j}]"] = env["value"]
    if len(set(artifacts.values())) > 1:
        first = next(iter(artifacts))
        for where, value in artifacts.items():
            if value != artifacts[first]:
                obj_label, _, path = where.partition(" ")
                add(Finding(obj_label, path, f"CT2I_ARTIFACTS {value!r} differs from {artifacts[first]!r} ({first}): "
                                             "one URI for the control plane and Ray Train"))
    for cm in settings:
        uri = (cm.get("data") or {}).get("CT2I_ARTIFACTS", "")
        if uri.startswith("/"):
            findings.extend(_check_artifacts_mounted(objects, uri))
        capacity = (cm.get("data") or {}).get("CT2I_CAPACITY_GPUS")
        tuning = [o for o in objects if o.get("kind") == "RayCluster"
                  and ((o.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component") == "tuning"]
        if capacity is not None and tuning:
            reachable = sum((g.gpus * g.max_pods for o in tuning for g in ray_groups(o) if not g.is_head), Fraction(0))
            if _quantity(capacity) > reachable:
                add(Finding(object_name(cm), "data.CT2I_CAPACITY_GPUS",
                            f"{capacity} exceeds the {reachable} GPUs the tuning cluster reaches at its maximum"))
    findings.extend(check_kueue(objects))
    return findings


def _check_artifacts_mounted(objects: list[dict], uri: str) -> list[Finding]:
    findings = []
    for obj in objects:
        if obj.get("kind") not in ("RayService", "RayCluster"):
            continue
        for group in ray_groups(obj):
            container = _ray_container(group.spec)
            uses_settings = any((e.get("configMapRef") or {}).get("name") == "ct2i-settings" for e in container.get("envFrom") or [])
            mounted = any(uri == m.get("mountPath") or uri.startswith(str(m.get("mountPath", "")).rstrip("/") + "/")
                          for m in container.get("volumeMounts") or [])
            if uses_settings and not mounted:
                findings.append(Finding(object_name(obj), f"{group.path}.template.spec.containers[0].volumeMounts",
                                        f"CT2I_ARTIFACTS is {uri!r} but nothing is mounted there"))
    return findings


def _check_serve_fit(obj: dict, groups: list[RayGroup]) -> list[Finding]:
    """Each Serve replica fits one worker pod; the replicas at their maximum fit the groups at theirs."""
    findings = []
    workers = [g for g in groups if not g.is_head and g.max_pods > 0]
    for path, config in _serve_configs(obj):
        if not isinstance(config, dict):
            continue
        need = {"cpus": Fraction(0), "gpus": Fraction(0)}
        for a, app in enumerate(config.get("applications") or []):
            for d, deployment in enumerate(app.get("deployments") or []):
                where = f"{path}.applications[{a}].deployments[{d}]"
                options = deployment.get("ray_actor_options") or {}
                try:
                    cpus = Fraction(str(options.get("num_cpus", 1)))
                    gpus = Fraction(str(options.get("num_gpus", 0)))
                    memory = Fraction(str(options.get("memory", 0)))
                except ValueError:
                    continue
                fits = [g for g in workers if g.cpus >= cpus and g.gpus >= gpus and (memory == 0 or g.memory == 0 or g.memory >= memory)]
                if not fits:
                    offered = ", ".join(f"{g.name}: {float(g.cpus):g} CPU, {float(g.gpus):g} GPU" for g in workers) or "no worker group"
                    findings.append(Finding(object_name(obj), f"{where}.ray_actor_options",
                                            f"{deployment.get('name')} needs {float(cpus):g} CPU and {float(gpus):g} GPU per replica; "
                                            f"no worker pod offers that ({offered})"))
                autoscaling = deployment.get("autoscaling_config") or {}
                replicas = autoscaling.get("max_replicas", deployment.get("num_replicas", 1))
                if isinstance(replicas, int):
                    need["cpus"] += cpus * replicas
                    need["gpus"] += gpus * replicas
                target = autoscaling.get("target_ongoing_requests")
                ceiling = deployment.get("max_ongoing_requests")
                if target is not None and ceiling is not None and target > ceiling:
                    findings.append(Finding(object_name(obj), f"{where}.autoscaling_config.target_ongoing_requests",
                                            f"{target} exceeds max_ongoing_requests {ceiling}: replicas could never reach it"))
        have_gpus = sum((g.gpus * g.max_pods for g in workers), Fraction(0))
        have_cpus = sum((g.cpus * g.max_pods for g in workers), Fraction(0))
        if need["gpus"] > have_gpus:
            findings.append(Finding(object_name(obj), path, f"the Serve replicas at their maximum need {float(need['gpus']):g} GPUs; "
                                                            f"the worker groups at maxReplicas offer {float(have_gpus):g}"))
        if need["cpus"] > have_cpus:
            findings.append(Finding(object_name(obj), path, f"the Serve replicas at their maximum need {float(need['cpus']):g} CPUs; "
                                                            f"the worker groups at maxReplicas offer {float(have_cpus):g}"))
    return findings


# --------------------------------------------------------------------------------------------------
# Everything


def validate_objects(objects: list[dict], crds: CrdSchemas | None, *, ray_version: str,
                     k8s_version: str = K8S_VERSION, serve_schema: bool = True) -> list[Finding]:
    """All findings for one rendered set of objects (empty means valid). `crds` None skips the KubeRay
    schema check (callers say so: the CRD folder is missing)."""
    findings: list[Finding] = []
    for obj in objects:
        if not isinstance(obj, dict) or "kind" not in obj or "apiVersion" not in obj:
            findings.append(Finding(object_name(obj), "", "not a Kubernetes object (apiVersion and kind are required)"))
            continue
        if str(obj["apiVersion"]).startswith(KUEUE_GROUP + "/"):
            continue
        if crds is not None and crds.handles(obj):
            findings.extend(crds.validate(obj))
        elif str(obj["apiVersion"]).startswith("ray.io/"):
            if crds is None:
                continue
            findings.append(Finding(object_name(obj), "kind", f"KubeRay has no kind {obj['kind']!r}"))
        else:
            findings.extend(validate_core(obj, k8s_version))
        name = (obj.get("metadata") or {}).get("name", "")
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", str(name)) or len(str(name)) > 253:
            findings.append(Finding(object_name(obj), "metadata.name", "must be a lowercase DNS-1123 name"))
        if serve_schema:
            findings.extend(check_serve_config(obj))
    findings.extend(check_consistency([o for o in objects if isinstance(o, dict)], ray_version))
    return sorted(set(findings))


def dockerfile_ray_version(path: Path = REPO_ROOT / "Dockerfile") -> str:
    """The Ray version the image is built on: the Dockerfile's `ARG RAY_VERSION=`."""
    match = re.search(r"^ARG RAY_VERSION=(\S+)", path.read_text(encoding="utf-8"), re.MULTILINE)
    if not match:
        raise ValueError(f"{path}: no `ARG RAY_VERSION=...` line")
    return match.group(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m k8s.validation", description="Render kustomizations with kubectl and validate them.")
    parser.add_argument("directories", nargs="+", help="kustomization folders rendered together, e.g. k8s/overlays/prod k8s/jobs/batch-tuning")
    args = parser.parse_args(argv)
    try:
        objects = [obj for directory in args.directories for obj in render(directory)]
    except RenderError as error:
        print(f"k8s.validation: {error}", file=sys.stderr)
        return 2
    folder = crd_dir()
    if folder is None:
        print(f"k8s.validation: KubeRay CRDs not found (set {CRD_DIR_ENV}); KubeRay schemas not checked", file=sys.stderr)
    findings = validate_objects(objects, CrdSchemas.load(folder) if folder else None, ray_version=dockerfile_ray_version())
    for finding in findings:
        print(finding)
    print(f"{len(objects)} objects, {len(findings)} findings", file=sys.stderr)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
