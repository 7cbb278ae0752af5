"""Evaluation metrics of the paper (Section IV-A-3): CLIP-I, CLIP-T, LPIPS diversity and KID.

`scores` holds the math on feature tensors; `extractors` holds the injectable networks that make those
features (real weights from paths or a hub id, or `tiny` random ones for tests). The extractors are
imported on first use, so code that only scores features does not pay for importing transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from causalt2i.metrics.scores import (
    clip_i,
    clip_i_multi_subject,
    clip_i_per_subject,
    clip_t,
    kid,
    kid_per_subject,
    lpips_diversity,
    mean_over_subjects,
    strip_identifier_tokens,
)

if TYPE_CHECKING:
    from causalt2i.metrics.extractors import (
        ClipExtractor,
        InceptionExtractor,
        LpipsNetwork,
        MetricsConfig,
        MetricSuite,
    )

_EXTRACTOR_NAMES = {"ClipExtractor", "InceptionExtractor", "LpipsNetwork", "MetricsConfig", "MetricSuite"}


def __getattr__(name: str):
    if name in _EXTRACTOR_NAMES:
        return getattr(importlib.import_module("causalt2i.metrics.extractors"), name)
    raise AttributeError(f"module 'causalt2i.metrics' has no attribute {name!r}")


__all__ = [
    "ClipExtractor",
    "InceptionExtractor",
    "LpipsNetwork",
    "MetricSuite",
    "MetricsConfig",
    "clip_i",
    "clip_i_multi_subject",
    "clip_i_per_subject",
    "clip_t",
    "kid",
    "kid_per_subject",
    "lpips_diversity",
    "mean_over_subjects",
    "strip_identifier_tokens",
]
