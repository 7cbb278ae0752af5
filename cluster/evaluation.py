"""The evaluation of a finished plain tuning (`spec.evaluation`): the adapter generates a small eval set and is scored
by the paper's metrics (`causalt2i.evaluate`: CLIP-I Eq. 14, KID Eq. 15, CLIP-T Eq. 16, LPIPS diversity Eq. 17);
`report.png` and `metrics.json` are written into the adapter folder before it is published, so they are stored,
sha256-listed and downloaded (`GET /v1/adapters/{id}/files/report.png`) with it, and deleted with it.

It runs where the run's resources are: the in-process trainer's attempt (`cluster.runner.local_train_fn`) on its
own device, a Ray Train run in a task holding one worker's resources (`tune.runner`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from causalt2i.spec import TuningSpec
from cluster.config import MetricSettings

REPORT_FILES = ("report.png", "metrics.json")


def metric_suite_for(base_model: str, metrics: MetricSettings, device: str = "cpu"):
    """Tiny random extractors for the tiny preset; otherwise the real ones the settings name (`CT2I_METRICS__*`)."""
    from causalt2i.metrics.extractors import MetricSuite

    if base_model == "tiny":
        return MetricSuite.tiny(0).to(device)
    sources = metrics.model_dump()
    missing = [f"CT2I_METRICS__{name.upper()}" for name, value in sources.items() if not value]
    if missing:
        raise RuntimeError(f"scoring adapters on {base_model!r} needs the metric networks; set {', '.join(missing)} "
                           f"(CLIP: a folder or hub id; Inception: the FID TorchScript file; LPIPS: the AlexNet and "
                           f"lpips linear weight files)")
    return MetricSuite.from_config(**sources, device=device)


def evaluate_tuning(spec: TuningSpec, adapter_dir: Path, metrics: MetricSettings, device: str | None = None) -> dict[str, bytes]:
    """Evaluate the adapter in `adapter_dir` as `spec.evaluation` asks, against the subjects' own photos (the spec's
    image paths, local here); return `report.png` and `metrics.json` by name ({} when the spec asks for none)."""
    if spec.evaluation is None:
        return {}
    import torch

    from causalt2i.adapter import load_adapter
    from causalt2i.data.images import load_reference_image
    from causalt2i.evaluate import EvalConfig, evaluate_adapter
    from causalt2i.generation import Generator
    from causalt2i.models import load_sdxl

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" and spec.base_model != "tiny" else None
    parts = load_sdxl(spec.base_model, image_encoder=spec.image_encoder, device=device, dtype=dtype)
    references = {subject.token: [load_reference_image(path) for path in subject.images] for subject in spec.subjects}
    wanted = spec.evaluation
    config = EvalConfig(max_prompts=wanted.prompts, seeds=list(wanted.seeds), steps=wanted.steps, guidance=wanted.guidance)
    with tempfile.TemporaryDirectory(prefix="ct2i-eval-") as scratch:
        evaluate_adapter(Generator(parts), load_adapter(adapter_dir), references,
                         metric_suite_for(spec.base_model, metrics, device), config, Path(scratch))
        return {name: (Path(scratch) / name).read_bytes() for name in REPORT_FILES}


def write_report(adapter_dir: Path, files: dict[str, bytes]) -> None:
    from causalt2i.atomic import atomic_write_bytes

    for name, data in files.items():
        atomic_write_bytes(Path(adapter_dir) / name, data)


def evaluate_into(spec: TuningSpec, adapter_dir: Path, metrics: MetricSettings) -> None:
    """`evaluate_tuning` on this process's device, its files written beside the adapter."""
    write_report(adapter_dir, evaluate_tuning(spec, adapter_dir, metrics))


