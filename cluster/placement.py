"""Can any node hold a job's workers? Checked at submit, so a job Ray could never place is refused with a
422 naming `resources` instead of waiting forever for a worker group that cannot start.

Node shapes come from, in order: the operator's `CT2I_NODE_TYPES` (the node types an autoscaling cluster can
add, e.g. KubeRay's worker groups); the live Ray cluster this process is connected to; else this machine,
which is where the embedded default starts its Ray. Without an autoscaler the workers must also fit the
cluster's total at once (Ray Train gangs them in one placement group).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from causalt2i.spec import Resources
from cluster.config import ControlPlaneSettings

EPSILON = 1e-9


@dataclass(frozen=True)
class ClusterShape:
    nodes: list[tuple[float, float | None]]  # (CPUs, GPUs or None when unknown) per node or node type
    autoscaling: bool
    source: str


def cluster_shape(settings: ControlPlaneSettings) -> ClusterShape:
    if settings.node_types:
        return ClusterShape([(t.cpus, t.gpus) for t in settings.node_types], True, "the configured node types")
    try:
        import ray

        if ray.is_initialized():
            nodes = [(float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
                     for n in ray.nodes() if n.get("Alive")]
            if nodes:
                return ClusterShape(nodes, False, "the Ray cluster's nodes")
    except Exception:  # no Ray here, or the GCS is unreachable: fall back to this machine
        pass
    return ClusterShape([(float(os.cpu_count() or 1), None)], False, "this machine")


def unplaceable_reason(resources: Resources, shape: ClusterShape) -> str | None:
    """Why no node (or, with an autoscaler, no node type) can ever hold these workers; None if one can."""
    cpus, gpus = resources.cpus_per_worker, resources.gpus_per_worker
    fits = [node for node in shape.nodes
            if node[0] + EPSILON >= cpus and (node[1] is None or node[1] + EPSILON >= gpus)]
    if not fits:
        largest_cpu = max(node[0] for node in shape.nodes)
        known_gpus = [node[1] for node in shape.nodes if node[1] is not None]
        gpu_text = f" and {max(known_gpus):g} GPU" if known_gpus else ""
        return (f"a worker needs {cpus:g} CPU and {gpus:g} GPU, but the largest node of {shape.source} has "
                f"{largest_cpu:g} CPU{gpu_text}; lower resources.cpus_per_worker / gpus_per_worker")
    if not shape.autoscaling:
        total_cpu = sum(node[0] for node in shape.nodes)
        if resources.num_workers * cpus > total_cpu + EPSILON:
            return (f"{resources.num_workers} workers × {cpus:g} CPU need {resources.num_workers * cpus:g} CPUs at once, "
                    f"but {shape.source} have {total_cpu:g}; lower resources.num_workers or cpus_per_worker")
        if all(node[1] is not None for node in shape.nodes):
            total_gpu = sum(node[1] for node in shape.nodes)
            if resources.num_workers * gpus > total_gpu + EPSILON:
                return (f"{resources.num_workers} workers × {gpus:g} GPU need {resources.num_workers * gpus:g} GPUs at once, "
                        f"but {shape.source} have {total_gpu:g}")
    return None
