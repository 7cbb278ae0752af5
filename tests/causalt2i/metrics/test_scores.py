"""Metric math on fixed features: KID (Eq. 15) against a literal numpy transcription, CLIP-I/T (Eqs. 14, 16)
against hand-computed cosines, and LPIPS diversity (Eq. 17) against an explicit pair loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

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


def _features(rows: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=generator, dtype=torch.float64) + shift


def _eq15_numpy(real: np.ndarray, generated: np.ndarray) -> float:
    """Eq. 15 written out term by term: pairs j < j' within each set, all pairs across."""
    d = real.shape[1]

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (float(a @ b) / d + 1.0) ** 3

    m, n = len(real), len(generated)
    within_real = sum(k(real[j], real[jj]) for j in range(m) for jj in range(j + 1, m))
    within_generated = sum(k(generated[i], generated[ii]) for i in range(n) for ii in range(i + 1, n))
    across = sum(k(generated[i], real[j]) for i in range(n) for j in range(m))
    return 2.0 / (m * (m - 1)) * within_real + 2.0 / (n * (n - 1)) * within_generated - 2.0 / (m * n) * across


# ------------------------------------------------------------------------------------------------ KID


def test_kid_with_one_full_subset_equals_eq15_exactly():
    real = _features(12, 5, seed=1)
    generated = _features(12, 5, seed=2, shift=0.3)
    expected = _eq15_numpy(real.numpy(), generated.numpy())
    mean, std = kid(generated, real, subset_size=12, num_subsets=1)
    assert abs(mean - expected) < 1e-10  # float64 throughout; only summation order differs
    assert std == 0.0


def test_kid_is_symmetric_in_its_two_sets_for_full_subsets():
    x, y = _features(10, 4, seed=3), _features(10, 4, seed=4, shift=0.5)
    assert kid(x, y, subset_size=10, num_subsets=1)[0] == pytest.approx(kid(y, x, subset_size=10, num_subsets=1)[0], abs=1e-12)


def test_kid_of_a_set_with_itself_is_near_zero_next_to_a_different_set():
    x = _features(40, 8, seed=5)
    same_distribution = _features(40, 8, seed=6)
    shifted = _features(40, 8, seed=7, shift=1.0)
    self_kid, _ = kid(x, x, subset_size=20, num_subsets=50)
    same_kid, _ = kid(x, same_distribution, subset_size=20, num_subsets=50)
    shifted_kid, _ = kid(x, shifted, subset_size=20, num_subsets=50)
    assert shifted_kid > 1.0
    # Both near-zero values are sampling noise of an unbiased estimator; 5% of the shifted score is ample.
    assert abs(self_kid) < 0.05 * shifted_kid
    assert abs(same_kid) < 0.05 * shifted_kid


def test_kid_is_deterministic_by_seed_and_the_seed_matters():
    x, y = _features(30, 6, seed=8), _features(25, 6, seed=9, shift=0.2)
    first = kid(x, y, subset_size=10, num_subsets=5, seed=3)
    assert kid(x, y, subset_size=10, num_subsets=5, seed=3) == first
    assert kid(x, y, subset_size=10, num_subsets=5, seed=4) != first
    assert first[1] > 0.0  # different subsets give different estimates, so the spread is reported


def test_kid_subset_size_defaults_to_and_is_clipped_to_the_smaller_set():
    x, y = _features(9, 3, seed=10), _features(14, 3, seed=11, shift=0.4)
    clipped = kid(x, y, subset_size=500, num_subsets=4, seed=1)
    assert kid(x, y, subset_size=9, num_subsets=4, seed=1) == clipped
    assert kid(x, y, num_subsets=4, seed=1) == clipped


def test_kid_accepts_float32_features_and_computes_in_float64():
    x, y = _features(8, 4, seed=12), _features(8, 4, seed=13, shift=0.2)
    exact = kid(x, y, subset_size=8, num_subsets=1)[0]
    from_float32 = kid(x.float(), y.float(), subset_size=8, num_subsets=1)[0]
    assert from_float32 == pytest.approx(exact, rel=1e-5)  # float32 rounding of the inputs only


@pytest.mark.parametrize(
    ("x_rows", "y_rows", "dims", "kwargs", "field"),
    [
        (1, 5, (3, 3), {}, "feats_x"),
        (5, 5, (3, 4), {}, "feats_y"),
        (5, 5, (3, 3), {"subset_size": 1}, "subset_size"),
        (5, 5, (3, 3), {"num_subsets": 0}, "num_subsets"),
    ],
)
def test_kid_rejects_bad_input_naming_the_argument(x_rows, y_rows, dims, kwargs, field):
    with pytest.raises(ValueError, match=field):
        kid(torch.zeros(x_rows, dims[0]), torch.zeros(y_rows, dims[1]), **kwargs)


def test_kid_per_subject_scores_each_subject_separately():
    generated = _features(10, 4, seed=14)
    references = {"cat": _features(10, 4, seed=15), "dog": _features(10, 4, seed=16, shift=1.0)}
    scores = kid_per_subject(generated, references, subset_size=10, num_subsets=1)
    assert scores["cat"] == kid(generated, references["cat"], subset_size=10, num_subsets=1)
    assert scores["dog"] == kid(generated, references["dog"], subset_size=10, num_subsets=1)
    assert scores["dog"][0] > scores["cat"][0]


# ------------------------------------------------------------------------------------------- CLIP-I


def test_clip_i_is_the_mean_cosine_over_all_pairs_of_eq14():
    generated = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    reference = torch.tensor([[1.0, 1.0], [3.0, 0.0], [0.0, -1.0]])
    # cosines: row 1 -> 1/√2, 1, 0; row 2 -> 1/√2, 0, -1; sum √2 over 6 pairs
    assert clip_i(generated, reference) == pytest.approx(math.sqrt(2) / 6, abs=1e-12)


def test_clip_i_ignores_feature_scale():
    generated, reference = _features(4, 6, seed=17), _features(3, 6, seed=18)
    assert clip_i(generated * 7.5, reference * 0.1) == pytest.approx(clip_i(generated, reference), abs=1e-12)


def test_clip_i_per_subject_then_mean():
    generated = {"cat": torch.tensor([[1.0, 0.0]]), "dog": torch.tensor([[0.0, 1.0], [1.0, 1.0]])}
    reference = {"cat": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "dog": torch.tensor([[0.0, 3.0]])}
    scores = clip_i_per_subject(generated, reference)
    assert scores == pytest.approx({"cat": 0.5, "dog": (1.0 + 1 / math.sqrt(2)) / 2}, abs=1e-12)
    assert mean_over_subjects(scores) == pytest.approx((0.5 + (1.0 + 1 / math.sqrt(2)) / 2) / 2, abs=1e-12)
    assert clip_i_multi_subject(generated, reference) == pytest.approx(mean_over_subjects(scores), abs=1e-15)


def test_clip_i_per_subject_rejects_mismatched_subjects():
    with pytest.raises(ValueError, match="dog"):
        clip_i_per_subject({"cat": torch.ones(1, 2)}, {"cat": torch.ones(1, 2), "dog": torch.ones(1, 2)})


def test_clip_i_rejects_mismatched_feature_dims():
    with pytest.raises(ValueError, match="reference_feats"):
        clip_i(torch.ones(2, 3), torch.ones(2, 4))


# ------------------------------------------------------------------------------------------- CLIP-T


def test_clip_t_with_one_prompt_for_all_images():
    images = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    text = torch.tensor([2.0, 0.0])
    assert clip_t(images, text) == pytest.approx((1.0 + 1 / math.sqrt(2) + 0.0) / 3, abs=1e-12)


def test_clip_t_pairs_row_i_with_prompt_i():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    assert clip_t(images, texts) == pytest.approx(0.0, abs=1e-12)  # (1 + -1) / 2, not the 0.0 of all pairs by luck
    assert clip_t(images, texts[[0, 0]]) == pytest.approx(0.5, abs=1e-12)


def test_clip_t_rejects_a_prompt_count_that_does_not_match():
    with pytest.raises(ValueError, match="text_feats"):
        clip_t(torch.ones(3, 2), torch.ones(2, 2))


@pytest.mark.parametrize(
    ("prompt", "tokens", "expected"),
    [
        ("a <s1> cat and a <v1> dog", ["<s1>", "<v1>"], "a cat and a dog"),
        ("<s1> cat  on\tthe beach <s1>", ["<s1>"], "cat on the beach"),
        ("a <s10> cat and a <s1> dog", ["<s1>", "<s10>"], "a cat and a dog"),
        ("a sks dog asks for sks", ["sks"], "a dog asks for"),
        ("a photo of a cat", [], "a photo of a cat"),
    ],
)
def test_strip_identifier_tokens(prompt, tokens, expected):
    assert strip_identifier_tokens(prompt, tokens) == expected


def test_strip_identifier_tokens_rejects_an_empty_token():
    with pytest.raises(ValueError, match=r"tokens\[1\]"):
        strip_identifier_tokens("a <s1> cat", ["<s1>", " "])


# -------------------------------------------------------------------------------------------- LPIPS


def _mean_abs_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean(dim=(1, 2, 3))


def test_lpips_diversity_is_the_mean_over_unordered_pairs_of_eq17():
    generator = torch.Generator().manual_seed(19)
    images = torch.rand(5, 3, 4, 4, generator=generator) * 2 - 1
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    expected = sum(float(_mean_abs_distance(images[i : i + 1], images[j : j + 1])) for i, j in pairs) / len(pairs)
    assert lpips_diversity(images, _mean_abs_distance) == pytest.approx(expected, rel=1e-6)
    assert lpips_diversity(images, _mean_abs_distance, pairs_per_batch=3) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("count", [0, 1])
def test_lpips_diversity_without_a_pair_is_zero(count):
    def never_called(a, b):
        raise AssertionError("no pair exists, so the distance must not be evaluated")

    assert lpips_diversity(torch.zeros(count, 3, 4, 4), never_called) == 0.0


def test_lpips_diversity_rejects_non_rgb_batches():
    with pytest.raises(ValueError, match="images"):
        lpips_diversity(torch.zeros(2, 1, 4, 4), _mean_abs_distance)
