"""Comparison statistics on hand-made rows: differences, Wilcoxon, bootstrap intervals, BraTS ranking."""

from __future__ import annotations

import numpy as np
import pytest

from brats_cnn.evaluation import compare
from brats_cnn.data.labels import REGIONS


def _rows(dsc: list[float], hd95: list[float]) -> list[dict]:
    """Rows of two cases ``c1``, ``c2`` with the same values in every region."""
    return [{"case_id": f"c{k + 1}", "region": region, "dsc": d, "hd95": h}
            for k, (d, h) in enumerate(zip(dsc, hd95)) for region in REGIONS]


RANKED = {"A": _rows([0.9, 0.8], [2.0, 5.0]),
          "B": _rows([0.7, 0.8], [3.0, 5.0]),
          "C": _rows([0.7, 0.6], [1.0, 9.0])}


def test_brats_ranking_by_hand():
    # per region: DSC case1 A1 B2 C2 (tie: best rank), case2 A1 B1 C3; HD95 case1 C1 A2 B3, case2 A1 B1 C3
    ranking = compare.brats_ranking(RANKED, ["dsc", "hd95"])
    assert [r["prediction"] for r in ranking] == ["A", "B", "C"]
    assert [r["mean_rank"] for r in ranking] == pytest.approx([5 / 4, 7 / 4, 9 / 4])
    assert [r["rank"] for r in ranking] == [1, 2, 3]
    assert ranking[0]["n_rankings"] == 2 * 3 * 2
    tied = compare.brats_ranking({"A": RANKED["A"], "copy": RANKED["A"], "C": RANKED["C"]}, ["dsc", "hd95"])
    assert [(r["prediction"], r["rank"]) for r in tied] == [("A", 1), ("copy", 1), ("C", 3)]


def test_paired_differences_and_common_cases():
    rows = dict(RANKED, D=_rows([0.5], [4.0]))               # D has case c1 only
    assert compare.common_cases(rows) == ["c1"]
    diffs = compare.paired_differences(RANKED, ["dsc", "hd95"])
    assert len(diffs) == 3 * 3 * 2 * 2                          # pairs x regions x metrics x cases
    first = next(d for d in diffs if (d["first"], d["second"], d["case_id"], d["metric"]) == ("A", "B", "c1", "dsc"))
    assert first["difference"] == pytest.approx(0.2) and first["first_value"] == 0.9


def test_wilcoxon_exact_values():
    statistic, p_value = compare.wilcoxon_test(np.arange(1.0, 6.0), np.zeros(5))
    assert statistic == 0.0 and p_value == pytest.approx(2 / 32)  # all five differences positive
    assert compare.wilcoxon_test(np.ones(4), np.ones(4)) == (0.0, 1.0)
    tests = compare.pairwise_tests({"A": _rows([0.9, 0.8], [1, 1]), "B": _rows([0.5, 0.5], [1, 1])}, ["dsc", "hd95"])
    dsc = next(t for t in tests if t["metric"] == "dsc")
    assert dsc["n"] == 2 and dsc["p_value"] == pytest.approx(0.5) and dsc["mean_difference"] == pytest.approx(0.35)
    assert next(t for t in tests if t["metric"] == "hd95")["p_value"] == 1.0


def test_bootstrap_interval_of_the_mean():
    low, high = compare.bootstrap_mean_ci(np.arange(10.0))     # mean 4.5, standard error ~0.91
    assert 2.3 < low < 3.3 and 5.7 < high < 6.7
    assert compare.bootstrap_mean_ci(np.arange(10.0)) == (low, high)  # fixed seed
    assert compare.bootstrap_mean_ci([0.7, 0.7, 0.7]) == (0.7, 0.7)
    assert np.isnan(compare.bootstrap_mean_ci([0.3])[0])
    intervals = compare.mean_intervals(RANKED, ["dsc"])
    assert intervals[0]["prediction"] == "A" and intervals[0]["mean"] == pytest.approx(0.85)


def test_compare_needs_two():
    with pytest.raises(ValueError, match="at least two"):
        compare.compare({"A": RANKED["A"]}, ["dsc"], ["dsc"])
