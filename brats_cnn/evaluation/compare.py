"""Comparing two or more sets of predictions scored on the same cases (plain functions of rows).

Input everywhere: ``{name: rows}``, where ``rows`` are the ``metrics.csv`` rows of one prediction
folder (one mapping per case and region with ``case_id``, ``region`` and metric values). Only
cases scored for every prediction are compared. Statistics come from :mod:`scipy.stats`:

* per-case differences ``first - second`` for each pair, region and metric;
* the Wilcoxon signed-rank test of each pair, region and metric (two-sided, zero differences
  dropped as in Wilcoxon's original method; all differences zero gives p = 1);
* bootstrap 95 % confidence intervals of each prediction's mean (BCa, 2000 resamples, fixed seed);
* the BraTS ranking: each prediction is ranked on every case, region and ranking metric (1 = best;
  DSC-like metrics higher is better, HD95 lower), tied values share the best rank of their group
  (``rankdata(method="min")``); the ranks are averaged over cases, regions and metrics and the
  averages ranked again for the final position.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from brats_cnn.data.labels import REGIONS

HIGHER_IS_BETTER: dict[str, bool] = {"dsc": True, "ppv": True, "sensitivity": True, "specificity": True,
                                     "hd95": False, "lesion_dsc": True, "lesion_hd95": False}
CONFIDENCE_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0

Rows = Sequence[Mapping[str, Any]]


def common_cases(rows_by_name: Mapping[str, Rows]) -> list[str]:
    """Case ids scored for every prediction, sorted."""
    sets = [{r["case_id"] for r in rows} for rows in rows_by_name.values()]
    return sorted(set.intersection(*sets)) if sets else []


def values_by_case(rows: Rows, cases: Sequence[str], region: str, metric: str) -> np.ndarray:
    """``(len(cases),)`` float64 values of one region and metric, in the order of ``cases``."""
    lookup = {r["case_id"]: float(r[metric]) for r in rows if r["region"] == region}
    return np.array([lookup[c] for c in cases], dtype=np.float64)


def available_metrics(rows_by_name: Mapping[str, Rows], candidates: Sequence[str]) -> list[str]:
    """The metrics of ``candidates`` present in every row of every prediction."""
    return [m for m in candidates
            if all(m in r and r[m] not in (None, "") for rows in rows_by_name.values() for r in rows)]


def paired_values(rows_by_name: Mapping[str, Rows], metrics: Sequence[str]) -> Iterator[tuple]:
    """``(first, second, region, metric, cases, first values, second values)`` of every pair of predictions."""
    cases = common_cases(rows_by_name)
    for (a, rows_a), (b, rows_b) in itertools.combinations(rows_by_name.items(), 2):
        for region in REGIONS:
            for metric in metrics:
                yield (a, b, region, metric, cases, values_by_case(rows_a, cases, region, metric),
                       values_by_case(rows_b, cases, region, metric))


def paired_differences(rows_by_name: Mapping[str, Rows], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per pair, case, region and metric: both values and ``difference = first - second``."""
    return [{"first": a, "second": b, "case_id": c, "region": region, "metric": metric,
             "first_value": float(x), "second_value": float(y), "difference": float(x - y)}
            for a, b, region, metric, cases, va, vb in paired_values(rows_by_name, metrics)
            for c, x, y in zip(cases, va, vb)]


def wilcoxon_test(first: np.ndarray, second: np.ndarray) -> tuple[float, float]:
    """Two-sided Wilcoxon signed-rank test of paired values -> ``(statistic, p_value)``.

    All differences zero (nothing to test) gives ``(0.0, 1.0)``.
    """
    from scipy import stats

    differences = np.asarray(first, np.float64) - np.asarray(second, np.float64)
    if not np.any(differences != 0):
        return 0.0, 1.0
    result = stats.wilcoxon(first, second, zero_method="wilcox", alternative="two-sided")
    return float(result.statistic), float(result.pvalue)


def pairwise_tests(rows_by_name: Mapping[str, Rows], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per pair, region and metric: n, both means, mean/median difference, Wilcoxon statistic and p."""
    out = []
    for a, b, region, metric, cases, va, vb in paired_values(rows_by_name, metrics):
        statistic, p_value = wilcoxon_test(va, vb) if cases else (float("nan"), float("nan"))
        out.append({"first": a, "second": b, "region": region, "metric": metric, "n": len(cases),
                    "first_mean": float(va.mean()) if cases else None,
                    "second_mean": float(vb.mean()) if cases else None,
                    "mean_difference": float((va - vb).mean()) if cases else None,
                    "median_difference": float(np.median(va - vb)) if cases else None,
                    "wilcoxon_statistic": statistic, "p_value": p_value})
    return out


def bootstrap_mean_ci(values: Sequence[float], *, confidence_level: float = CONFIDENCE_LEVEL,
                      n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Bootstrap confidence interval of the mean (BCa, :func:`scipy.stats.bootstrap`).

    Identical values give the degenerate interval ``(v, v)``; fewer than two values give NaNs.
    """
    from scipy import stats

    arr = np.asarray(values, dtype=np.float64)
    if arr.size < 2:
        return float("nan"), float("nan")
    if np.all(arr == arr[0]):
        return float(arr[0]), float(arr[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BCa warns on nearly degenerate samples and falls back to NaN
        result = stats.bootstrap((arr,), np.mean, confidence_level=confidence_level, n_resamples=n_resamples,
                                 method="BCa", random_state=np.random.default_rng(seed))
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if np.isnan(low) or np.isnan(high):
        result = stats.bootstrap((arr,), np.mean, confidence_level=confidence_level, n_resamples=n_resamples,
                                 method="percentile", random_state=np.random.default_rng(seed))
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return low, high


def mean_intervals(rows_by_name: Mapping[str, Rows], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per prediction, region and metric: n, mean and its bootstrap 95 % interval."""
    cases = common_cases(rows_by_name)
    out = []
    for name, rows in rows_by_name.items():
        for region in REGIONS:
            for metric in metrics:
                values = values_by_case(rows, cases, region, metric)
                low, high = bootstrap_mean_ci(values)
                out.append({"prediction": name, "region": region, "metric": metric, "n": len(cases),
                            "mean": float(values.mean()) if cases else None, "ci_low": low, "ci_high": high})
    return out


def brats_ranking(rows_by_name: Mapping[str, Rows], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """BraTS ranking of the predictions (see the module docstring), best first.

    Returns:
        One row per prediction: ``prediction``, ``mean_rank`` (over cases x regions x metrics),
        ``rank`` (final position, ties share the best) and ``n_rankings``.
    """
    from scipy import stats

    names = list(rows_by_name)
    cases = common_cases(rows_by_name)
    if not cases or not metrics:
        return [{"prediction": n, "mean_rank": None, "rank": None, "n_rankings": 0} for n in names]
    # scores[k, j]: prediction k on the j-th (case, region, metric), signed so that lower is better
    columns = []
    for region in REGIONS:
        for metric in metrics:
            sign = -1.0 if HIGHER_IS_BETTER[metric] else 1.0
            columns.append(np.stack([sign * values_by_case(rows_by_name[n], cases, region, metric) for n in names]))
    scores = np.concatenate(columns, axis=1)
    ranks = stats.rankdata(scores, method="min", axis=0)
    mean_rank = ranks.mean(axis=1)
    final = stats.rankdata(mean_rank, method="min")
    order = np.argsort(mean_rank, kind="stable")
    return [{"prediction": names[k], "mean_rank": float(mean_rank[k]), "rank": int(final[k]),
             "n_rankings": int(scores.shape[1])} for k in order]


def compare(rows_by_name: Mapping[str, Rows], metrics: Sequence[str], ranking_metrics: Sequence[str]
            ) -> dict[str, Any]:
    """Everything at once: cases, pairwise tests, intervals, ranking and per-case differences."""
    if len(rows_by_name) < 2:
        raise ValueError("a comparison needs at least two predictions")
    return {
        "predictions": list(rows_by_name),
        "cases": common_cases(rows_by_name),
        "metrics": list(metrics),
        "ranking_metrics": list(ranking_metrics),
        "tests": pairwise_tests(rows_by_name, metrics),
        "intervals": mean_intervals(rows_by_name, metrics),
        "ranking": brats_ranking(rows_by_name, ranking_metrics),
        "differences": paired_differences(rows_by_name, metrics),
    }
