"""The paper's evaluation metrics (Section IV-A-3, Eqs. 14-17), computed on extracted features.

Every function here takes tensors that a feature extractor (`causalt2i.metrics.extractors`) produced, so
the math is tested on fixed numbers and the networks are swapped freely. Reductions run in float64: the
scores are small differences of large kernel sums (KID) or means over many pairs, and the inputs are
often bf16/fp16 features.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

KID_MAX_SUBSET_SIZE = 1000


def _check_matrix(name: str, feats: torch.Tensor, min_rows: int = 1) -> None:
    if feats.ndim != 2:
        raise ValueError(f"{name}: expected a [rows, dim] feature matrix, got shape {tuple(feats.shape)}")
    if feats.shape[0] < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} row(s), got {feats.shape[0]}")


def _check_same_dim(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{name_b}: feature dim {b.shape[-1]} does not match {name_a}'s {a.shape[-1]}")


def _unit_rows(feats: torch.Tensor) -> torch.Tensor:
    return F.normalize(feats.detach().to(torch.float64), dim=-1)


def clip_i(generated_feats: torch.Tensor, reference_feats: torch.Tensor) -> float:
    """CLIP-I, Eq. 14: (1 / MN) Σ_i Σ_j cos(E_I(x̂_i), E_I(x_j)).

    `generated_feats` [N, d] are E_I of the N generated images, `reference_feats` [M, d] E_I of the M
    reference images; every generated x reference pair counts once.
    """
    _check_matrix("generated_feats", generated_feats)
    _check_matrix("reference_feats", reference_feats)
    _check_same_dim("generated_feats", generated_feats, "reference_feats", reference_feats)
    cosines = _unit_rows(generated_feats) @ _unit_rows(reference_feats).T
    return float(cosines.mean())


def clip_i_per_subject(
    generated_feats_per_subject: Mapping[str, torch.Tensor],
    reference_feats_per_subject: Mapping[str, torch.Tensor],
) -> dict[str, float]:
    """CLIP-I (Eq. 14) for each subject of a multi-subject prompt, keyed by subject.

    The paper computes multi-subject CLIP-I "between each generated image and each subject separately, and
    then take[s] the average" (Section IV-A-3); `mean_over_subjects` takes that average. The generated
    features of a subject may be the whole images or that subject's crops; both mappings need the same keys.
    """
    generated_keys, reference_keys = set(generated_feats_per_subject), set(reference_feats_per_subject)
    if not generated_keys:
        raise ValueError("generated_feats_per_subject: no subjects")
    if generated_keys != reference_keys:
        missing = sorted(generated_keys ^ reference_keys)
        raise ValueError(f"reference_feats_per_subject: subjects differ from generated_feats_per_subject: {missing}")
    scores = {}
    for subject in generated_feats_per_subject:
        try:
            scores[subject] = clip_i(generated_feats_per_subject[subject], reference_feats_per_subject[subject])
        except ValueError as err:
            raise ValueError(f"subject {subject!r}: {err}") from None
    return scores


def mean_over_subjects(scores_per_subject: Mapping[str, float]) -> float:
    """The unweighted mean over subjects that turns a per-subject score into the paper's multi-subject score."""
    if not scores_per_subject:
        raise ValueError("scores_per_subject: no subjects")
    return sum(scores_per_subject.values()) / len(scores_per_subject)


def clip_i_multi_subject(
    generated_feats_per_subject: Mapping[str, torch.Tensor],
    reference_feats_per_subject: Mapping[str, torch.Tensor],
) -> float:
    """Multi-subject CLIP-I: Eq. 14 per subject, then the mean over subjects."""
    return mean_over_subjects(clip_i_per_subject(generated_feats_per_subject, reference_feats_per_subject))


def clip_t(image_feats: torch.Tensor, text_feats: torch.Tensor) -> float:
    """CLIP-T, Eq. 16: (1 / N) Σ_i cos(E_I(x̂_i), E_T(P_t)).

    `image_feats` [N, d] are E_I of the generated images. `text_feats` is either one prompt's E_T [d]
    (shared by every image) or [N, d], row i being the prompt of image i. The prompt must have had its
    identifier tokens removed first (`strip_identifier_tokens`): the CLIP text encoder was never tuned on them.
    """
    _check_matrix("image_feats", image_feats)
    if text_feats.ndim == 1:
        text_feats = text_feats.unsqueeze(0).expand(image_feats.shape[0], -1)
    elif text_feats.ndim != 2 or text_feats.shape[0] != image_feats.shape[0]:
        raise ValueError(
            f"text_feats: expected [d] or [{image_feats.shape[0]}, d] (one row per image), got {tuple(text_feats.shape)}"
        )
    _check_same_dim("image_feats", image_feats, "text_feats", text_feats)
    cosines = (_unit_rows(image_feats) * _unit_rows(text_feats)).sum(dim=-1)
    return float(cosines.mean())


def strip_identifier_tokens(prompt: str, tokens: list[str]) -> str:
    """The prompt P_t of Eq. 16: `prompt` without its identifier tokens, whitespace collapsed to single spaces.

    "a <s1> cat and a <v1> dog" -> "a cat and a dog". A token that starts or ends with a word character
    (e.g. "sks") only matches as a whole word, so "asks" keeps its letters.
    """
    for index, token in enumerate(tokens):
        if not token or not token.strip():
            raise ValueError(f"tokens[{index}]: empty identifier token")
    stripped = prompt
    # Longest first, so a token that contains another (<s1> vs <s10>) is removed whole.
    for token in sorted(tokens, key=len, reverse=True):
        pattern = re.escape(token)
        if re.match(r"\w", token[0]):
            pattern = r"\b" + pattern
        if re.match(r"\w", token[-1]):
            pattern = pattern + r"\b"
        stripped = re.sub(pattern, " ", stripped)
    return " ".join(stripped.split())


LpipsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def lpips_diversity(images: torch.Tensor, lpips_fn: LpipsFn, *, pairs_per_batch: int = 64) -> float:
    """LPIPS diversity, Eq. 17: 2 / (N(N-1)) Σ_{i<j} LPIPS(x̂_i, x̂_j), over the N images of one prompt.

    `images` is [N, 3, H, W] in [-1, 1]. `lpips_fn(a, b)` maps two [B, 3, H, W] batches to B distances
    (`LpipsNetwork` is one). With fewer than two images there is no pair, and the diversity is 0.0 by
    definition. Pairs go through `lpips_fn` in batches of `pairs_per_batch` to bound memory.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected [N, 3, H, W], got shape {tuple(images.shape)}")
    if pairs_per_batch < 1:
        raise ValueError(f"pairs_per_batch: must be >= 1, got {pairs_per_batch}")
    count = images.shape[0]
    if count < 2:
        return 0.0
    first, second = torch.triu_indices(count, count, offset=1)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, first.numel(), pairs_per_batch):
        i = first[start : start + pairs_per_batch].to(images.device)
        j = second[start : start + pairs_per_batch].to(images.device)
        distances = lpips_fn(images[i], images[j]).reshape(-1)
        if distances.numel() != i.numel():
            raise ValueError(f"lpips_fn: returned {distances.numel()} distances for {i.numel()} pairs")
        total += distances.detach().to(torch.float64).sum().cpu()
    return float(total / first.numel())


def _cubic_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _unbiased_mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = _cubic_kernel(x, x), _cubic_kernel(y, y), _cubic_kernel(x, y)
    # Σ_{j<j'} k = (Σ_all - Σ_diag) / 2, so the 2/(M(M-1)) of Eq. 15 becomes 1/(M(M-1)) on the off-diagonal sum.
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2.0 * k_xy.mean()


def kid(
    feats_x: torch.Tensor,
    feats_y: torch.Tensor,
    *,
    subset_size: int | None = None,
    num_subsets: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """KID, Eq. 15: the unbiased MMD² between two sets of Inception features with k(x, y) = (xᵀy / d + 1)³.

    As in Bińkowski et al. (2018), the estimate is averaged over `num_subsets` random subsets of
    `subset_size` rows drawn without replacement from each set; the result is (mean, std) over subsets,
    std with ddof=0 (0.0 for a single subset). `subset_size` defaults to min(m, n, 1000) and is clipped to
    the smaller set, which keeps personalisation-sized sets (a few dozen images) usable. A subset as large
    as both sets gives the exact Eq. 15 estimate. Draws come from a generator seeded by `seed`, so equal
    inputs give equal results. The value is 0 in expectation for two samples of one distribution and may
    be slightly negative.
    """
    _check_matrix("feats_x", feats_x, min_rows=2)
    _check_matrix("feats_y", feats_y, min_rows=2)
    _check_same_dim("feats_x", feats_x, "feats_y", feats_y)
    if num_subsets < 1:
        raise ValueError(f"num_subsets: must be >= 1, got {num_subsets}")
    smaller = min(feats_x.shape[0], feats_y.shape[0])
    size = min(smaller, KID_MAX_SUBSET_SIZE) if subset_size is None else min(subset_size, smaller)
    if size < 2:
        raise ValueError(f"subset_size: the unbiased estimator needs at least 2 rows per subset, got {subset_size}")
    x = feats_x.detach().to(torch.float64)
    y = feats_y.detach().to(torch.float64)
    generator = torch.Generator().manual_seed(seed)
    estimates = torch.empty(num_subsets, dtype=torch.float64)
    for index in range(num_subsets):
        pick_x = torch.randperm(x.shape[0], generator=generator)[:size].to(x.device)
        pick_y = torch.randperm(y.shape[0], generator=generator)[:size].to(y.device)
        estimates[index] = _unbiased_mmd2(x[pick_x], y[pick_y]).cpu()
    return float(estimates.mean()), float(estimates.std(correction=0))


def kid_per_subject(
    generated_feats: torch.Tensor,
    reference_feats_per_subject: Mapping[str, torch.Tensor],
    *,
    subset_size: int | None = None,
    num_subsets: int = 100,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """KID (Eq. 15) of the generated images against each subject's references, keyed by subject.

    The paper averages multi-subject KID over subjects (Section IV-A-3): apply `mean_over_subjects` to the
    means. Each subject uses the same `seed`, so the scores do not depend on the order of the mapping.
    """
    if not reference_feats_per_subject:
        raise ValueError("reference_feats_per_subject: no subjects")
    scores = {}
    for subject, reference_feats in reference_feats_per_subject.items():
        try:
            scores[subject] = kid(
                generated_feats, reference_feats, subset_size=subset_size, num_subsets=num_subsets, seed=seed
            )
        except ValueError as err:
            raise ValueError(f"subject {subject!r}: {err}") from None
    return scores
