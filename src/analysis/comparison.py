"""Honest comparisons of cross-validated configurations: a 95% interval for each CV mean and the paired,
per-fold difference between two configurations with the Nadeau-Bengio corrected resampled t-test.

The k fold scores of one configuration are not independent: any two folds share (k-2)/(k-1) of their training
images. The plain variance of their mean, s^2/k, is then too small, and a plain paired t-test finds differences
that are not there. Nadeau and Bengio (2003, "Inference for the Generalization Error") correct the variance to
(1/k + n_test/n_train) * s^2, with n_test/n_train = 1/(k-1) for k-fold cross-validation; both the interval and
the test here use that corrected variance, with k-1 degrees of freedom.

Two configurations compare fold by fold only when their folds are the same images: the same data version and
split (the parents' `data_version` and `split_digest` tags).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05
TEST_NAME = "Nadeau–Bengio corrected t-test"


def correction(k: int) -> float:
    """The factor of the fold scores' sample variance in the corrected variance of their mean: 1/k + 1/(k-1)."""
    return 1.0 / k + 1.0 / (k - 1)


def cv_interval(scores: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(low, high) of a t-interval for the CV mean over k folds, with the corrected variance; NaN below 2 folds."""
    values = np.asarray(scores, dtype=np.float64)
    k = len(values)
    if k < 2:
        return math.nan, math.nan
    mean = float(values.mean())
    half = float(stats.t.ppf(0.5 + confidence / 2, k - 1)) * math.sqrt(correction(k) * values.var(ddof=1))
    return mean - half, mean + half


@dataclass(frozen=True)
class PairedTest:
    """Paired per-fold comparison of configuration A with B: `difference` = mean over folds of A - B."""

    difference: float
    t: float
    p: float
    folds: int


def corrected_paired_ttest(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """t = mean(d) / sqrt((1/k + 1/(k-1)) var(d)) over the k per-fold differences d = a - b, two-sided p.

    Folds that differ by the same amount every time leave no variance to judge by: p is 1 for no difference,
    else NaN (untestable), never a confident 0 from a handful of tied folds.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    k = len(d)
    if k < 2:
        raise ValueError(f"a paired test needs at least 2 folds, got {k}")
    mean, var = float(d.mean()), float(d.var(ddof=1))
    if var <= 1e-24:
        return PairedTest(mean, 0.0, 1.0, k) if abs(mean) < 1e-12 else PairedTest(mean, math.nan, math.nan, k)
    t = mean / math.sqrt(correction(k) * var)
    return PairedTest(mean, t, float(2 * stats.t.sf(abs(t), k - 1)), k)


@dataclass(frozen=True)
class Comparison:
    """One configuration against the top one: a test over their shared folds, or why there is none."""

    test: PairedTest | None
    reason: str = ""  # why they cannot be compared


def compare(top: Mapping[int, float], other: Mapping[int, float], same_split: bool, min_folds: int = 2) -> Comparison:
    """`other` - `top` over the folds both have; none when their folds are other images (`same_split` false)."""
    if not same_split:
        return Comparison(None, "not comparable: other split/data")
    shared = sorted(set(top) & set(other))
    if len(shared) < min_folds:
        return Comparison(None, f"not comparable: {len(shared)} shared fold(s)")
    return Comparison(corrected_paired_ttest([other[k] for k in shared], [top[k] for k in shared]))


def p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.01 else f"p = {p:.2f}"


def verdict(first: str, second: str, comparison: Comparison) -> str:
    """One sentence on the top two configurations (`comparison` is second - first)."""
    if comparison.test is None:
        fix = (
            "train both on the same data with the same n_folds and split_seed"
            if "split" in comparison.reason
            else "finish at least two of the same folds of both"
        )
        return (
            f"The top two configurations ('{first}', '{second}') cannot be compared fold by fold "
            f"({comparison.reason}): {fix}."
        )
    test = comparison.test
    how = f"{TEST_NAME} over {test.folds} folds"
    if math.isnan(test.p):
        return (
            f"The top two configurations differ by the same {abs(test.difference):.4f} in each of {test.folds} "
            f"folds, which leaves the {TEST_NAME} no spread to judge by: add folds or data before choosing."
        )
    if test.p >= ALPHA:
        return (
            f"The top two configurations are not distinguishable ({p_text(test.p)}, {how}): "
            f"prefer the simpler or cheaper one."
        )
    better, worse = (first, second) if test.difference < 0 else (second, first)
    return (
        f"'{better}' is better than '{worse}' by {abs(test.difference):.4f} mean fold accuracy "
        f"({p_text(test.p)}, {how})."
    )
