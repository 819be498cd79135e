"""Honest comparisons: the corrected interval and t-test on known numbers, and how the leaderboard words them."""

from __future__ import annotations

import math
import statistics
from typing import Any

import pytest
from scipy import stats

from src.analysis.comparison import compare, corrected_paired_ttest, cv_interval, verdict
from src.leaderboard import rank, render, with_comparisons

A = [0.90, 0.92, 0.91, 0.93, 0.89]
B = [0.88, 0.90, 0.90, 0.90, 0.88]


def test_interval_uses_the_corrected_variance() -> None:
    # mean 0.91, s^2 = 2.5e-4, corrected variance (1/5 + 1/4) * s^2, t(0.975, 4 dof) = 2.7764
    low, high = cv_interval(A)
    assert (low, high) == pytest.approx((0.880551, 0.939449), abs=1e-6)
    plain = stats.t.ppf(0.975, 4) * statistics.stdev(A) / math.sqrt(5)
    assert (high - low) / 2 == pytest.approx(plain * math.sqrt(0.45 / 0.2))  # 1.5x the naive half-width
    assert all(math.isnan(x) for x in cv_interval([0.9]))


def test_corrected_paired_t_test_on_known_values() -> None:
    # d = A - B = [.02, .02, .01, .03, .01]: mean .018, var 7e-5, t = .018 / sqrt(0.45 * 7e-5)
    result = corrected_paired_ttest(A, B)
    assert result.difference == pytest.approx(0.018)
    assert result.t == pytest.approx(3.207135, abs=1e-6)
    assert result.p == pytest.approx(0.032678, abs=1e-6)
    # the plain paired t-test (scipy) overstates t by sqrt((1/k + 1/(k-1)) / (1/k)) = 1.5 and p with it
    plain = stats.ttest_rel(A, B)
    assert plain.statistic == pytest.approx(result.t * 1.5) and plain.pvalue < result.p


def test_identical_configurations_are_p_1_and_clear_differences_small_p() -> None:
    assert corrected_paired_ttest(A, A).p == 1.0
    far = [x - 0.1 + 0.003 * (i % 2) for i, x in enumerate(A)]
    assert corrected_paired_ttest(A, far).p < 0.001
    same_gap = corrected_paired_ttest(A, [x - 0.05 for x in A])  # no spread: the test cannot judge it
    assert same_gap.difference == pytest.approx(0.05) and math.isnan(same_gap.p)
    gap = compare(dict(enumerate(A)), {k: x - 0.05 for k, x in enumerate(A)}, same_split=True)
    assert "differ by the same 0.0500 in each of 5 folds" in verdict("a", "b", gap)


def test_only_shared_folds_of_one_split_are_compared() -> None:
    top, other = dict(enumerate(A)), dict(enumerate(B))
    assert compare(top, other, same_split=False).reason == "not comparable: other split/data"
    one = compare(top, {0: 0.9}, same_split=True)  # one shared fold is no test
    assert one.test is None and "finish at least two of the same folds" in verdict("a", "b", one)
    partial = compare(top, {k: other[k] for k in (0, 2, 4)}, same_split=True).test
    assert partial.folds == 3 and partial.difference == pytest.approx(-(0.02 + 0.01 + 0.01) / 3)


def config(name: str, scores: list[float], split: str = "s1", oof: float | str = "") -> dict[str, Any]:
    """A configuration row as src.leaderboard.collect reads it from a parent run."""
    return {
        "parent_run_id": f"run-{name}",
        "config": name,
        "folds_done": len(scores),
        "folds_missing": 0,
        "cv_mean_val_accuracy": statistics.fmean(scores),
        "cv_std_val_accuracy": statistics.pstdev(scores),
        "best_fold": max(range(len(scores)), key=scores.__getitem__),
        "oof_accuracy": oof if oof != "" else statistics.fmean(scores),
        "registered_model": "",
        "ensemble_model_uri": "",
        "data_version": "sha256:abc",
        "split_digest": split,
        "fold_scores": dict(enumerate(scores)),
    }


def test_leaderboard_says_when_the_top_two_are_not_distinguishable() -> None:
    noisy = [0.91, 0.90, 0.92, 0.90, 0.91]  # mean 0.908 vs 0.91: a coin toss
    configs = with_comparisons([config("resnet18 lr=0.001", A), config("resnet18 lr=0.0001", noisy)])
    markdown = render([], configs, "markdown", 20)
    p = configs[1]["p_vs_top"]
    assert p > 0.05 and f"not distinguishable (p = {p:.2f}, Nadeau–Bengio corrected t-test over 5 folds)" in markdown
    assert "prefer the simpler or cheaper one" in markdown
    assert "| ci95 |" in markdown and configs[0]["ci95"] == "0.8806 – 0.9394" and configs[0]["ci95"] in markdown
    assert configs[0]["diff_vs_top"] == configs[0]["p_vs_top"] == ""  # the top row compares with nobody
    assert configs[1]["diff_vs_top"] == pytest.approx(-0.002)
    table = render([], configs, "table", 20)
    assert "not distinguishable" in table and "-0.0020" in table and "Nadeau–Bengio corrected variance" in table
    assert render([], configs, "csv", 20).startswith("run_id,config,fold,best_val_accuracy")


def test_leaderboard_names_the_better_configuration() -> None:
    worse = [x - 0.1 + 0.003 * (i % 2) for i, x in enumerate(A)]
    configs = with_comparisons([config("adam", A), config("sgd", worse)])
    assert "'adam' is better than 'sgd' by 0.0988 mean fold accuracy (p < 0.001" in render([], configs, "markdown", 5)


def test_leaderboard_refuses_to_compare_other_splits() -> None:
    configs = with_comparisons([config("top", A), config("other data", B, split="s2"), config("same", B)])
    assert configs[1]["diff_vs_top"] == "not comparable: other split/data" and configs[1]["p_vs_top"] == ""
    assert configs[2]["p_vs_top"] == pytest.approx(0.032678, abs=1e-6)
    text = render([], configs, "table", 20)
    assert "not comparable: other split/data" in text and "cannot be compared fold by fold" in text
    assert "not distinguishable" not in render([], with_comparisons([config("alone", A)]), "markdown", 20)


def test_the_leaderboard_ranks_and_recommends_on_the_latest_data() -> None:
    """After the data changed, a configuration scored on the old data is listed after those on the new data and
    is not recommended, however high its score (the champion's rule too)."""
    old = {**config("old data", A, oof=0.95), "data_version": "sha256:aaaa1111ffff", "end_time": 1}
    new = {**config("new data", B, oof=0.80), "data_version": "bbbb2222cccc", "end_time": 2}
    configs = with_comparisons(rank([old, new]))
    assert [(c["config"], c["latest_data"]) for c in configs] == [("new data", True), ("old data", False)]
    markdown = render([], configs, "markdown", 5)
    assert "Recommended model: runs:/run-new data" in markdown and "'new data', oof_accuracy 0.8000" in markdown
    assert "| bbbb2222* |" in markdown and "| aaaa1111 |" in markdown
    partial = {**config("new data, 3 folds", B[:3]), "oof_accuracy": "", "data_version": "cccc", "end_time": 3}
    assert "No complete configuration on the latest data yet" in render(
        [], with_comparisons(rank([old, partial])), "markdown", 5
    )
