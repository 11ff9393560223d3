"""Report pieces on hand-made rows: statistics, CSV, figures, HTML."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from brats_cnn.evaluation import report


def _rows():
    rows = []
    for case_id, dsc in (("a", 0.2), ("b", 0.4), ("c", 0.6), ("d", 1.0)):
        for region in ("complete", "core", "enhancing"):
            rows.append({"case_id": case_id, "region": region, "dsc": dsc, "ppv": 1.0, "sensitivity": dsc,
                         "specificity": 0.99, "hd95": 10 * dsc, "vol_pred_ml": 1.5, "vol_gt_ml": 2.0,
                         "missing_prediction": case_id == "d"})
    return rows


def test_describe_hand_computed():
    s = report.describe([0.2, 0.4, 0.6, 1.0])
    assert s["mean"] == pytest.approx(0.55)
    assert s["std"] == pytest.approx(np.sqrt(((0.35**2) + (0.15**2) + (0.05**2) + (0.45**2)) / 4))
    assert s["median"] == pytest.approx(0.5)
    assert s["q25"] == pytest.approx(0.35) and s["q75"] == pytest.approx(0.7)
    assert s["n"] == 4
    assert report.describe([]) == {"n": 0}


def test_summarise_per_grade():
    grades = {"a": "HGG", "b": "HGG", "c": "LGG", "d": None}
    stats = report.summarise(_rows(), grades)
    assert list(stats) == ["all", "HGG", "LGG", "unknown grade"]
    assert stats["unknown grade"]["core"]["dsc"]["mean"] == 1.0 and stats["unknown grade"]["core"]["dsc"]["n"] == 1
    assert "lesion_dsc" not in stats["all"]["core"]  # not computed for these rows
    assert list(report.summarise(_rows(), {})) == ["all"]  # no grades at all: no unknown group
    assert stats["all"]["core"]["dsc"]["mean"] == pytest.approx(0.55)
    assert stats["HGG"]["enhancing"]["hd95"]["mean"] == pytest.approx(3.0)
    assert stats["LGG"]["complete"]["dsc"] == {"mean": 0.6, "std": 0.0, "median": 0.6, "q25": 0.6,
                                               "q75": 0.6, "n": 1}


CSV_MISSING = report.CSV_COLUMNS.index("missing_prediction")


def test_metrics_csv(tmp_path):
    path = report.write_metrics_csv(_rows(), tmp_path / "m.csv")
    with open(path, newline="") as handle:
        lines = list(csv.reader(handle))
    assert lines[0] == list(report.CSV_COLUMNS)
    assert lines[1] == ["a", "complete", "0.2", "1", "0.2", "0.99", "2", "1.5", "2", "0"] + [""] * 6  # no lesion-wise
    assert lines[-1][CSV_MISSING] == "1" and len(lines) == 13


def _decode(png: bytes) -> np.ndarray:
    """``(H, W, 3)`` float RGB in [0, 1] of PNG bytes."""
    import io

    from matplotlib import image

    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return image.imread(io.BytesIO(png), format="png")[..., :3]


def _pixels_of(rgb: np.ndarray, colour: str, alpha: float = 1.0, tolerance: float = 0.03) -> int:
    """Pixels of ``colour`` drawn with ``alpha`` over white."""
    from matplotlib.colors import to_rgb

    expected = alpha * np.array(to_rgb(colour)) + (1 - alpha)
    return int(np.count_nonzero(np.abs(rgb - expected).max(axis=-1) < tolerance))


def test_boxplot_shows_one_panel_per_metric_and_a_box_per_region():
    rgb = _decode(report.boxplot_png(_rows(), {"a": "LGG"}))
    height, width = rgb.shape[:2]
    # 5 panels (no lesion-wise values in these rows) of 3.0 x 3.4 inches at 90 dpi, tight bounding box
    assert 0.8 * 5 * 3.0 * 90 < width <= 1.05 * 5 * 3.0 * 90 and 0.8 * 3.4 * 90 < height <= 1.05 * 3.4 * 90
    for region, colour in report.REGION_COLOURS.items():  # box faces: the region colour at alpha 0.45
        assert _pixels_of(rgb, colour, alpha=0.45) > 200, region
    assert np.count_nonzero(rgb.max(axis=-1) < 0.2) > 500  # black points, medians, text


def test_overlay_draws_the_ground_truth_contours_and_none_for_an_empty_prediction():
    flair = np.arange(100, dtype=np.float32).reshape(10, 10) + 1
    mask = np.zeros((10, 10), bool)
    mask[3:7, 3:7] = True
    empty = np.zeros_like(mask)
    rgb = _decode(report.overlay_png(flair, {"complete": mask, "core": empty, "enhancing": empty},
                                     {"complete": empty, "core": empty, "enhancing": empty}, "case"))
    height, width = rgb.shape[:2]
    assert 0.8 * 6.4 * 80 < width <= 1.05 * 6.4 * 80 and 0.8 * 3.6 * 80 < height <= 1.05 * 3.6 * 80  # tight box
    left, right = rgb[:, : width // 2], rgb[:, width // 2:]
    yellow = report.REGION_COLOURS["complete"]
    assert _pixels_of(left, yellow, tolerance=0.1) > 20  # the ground-truth contour in the left panel
    # the legend (bottom strip) shows every colour; above it the right panel has no contour at all
    assert _pixels_of(right[: int(0.85 * height)], yellow, tolerance=0.1) == 0
    grey = left[(np.ptp(left, axis=-1) < 0.01)]  # the FLAIR ramp: many grey levels, not a blank image
    assert len(np.unique(np.round(grey[:, 0], 2))) > 20


def test_largest_cross_section():
    mask = np.zeros((4, 4, 5), bool)
    mask[:2, :2, 1] = True
    mask[:3, :3, 3] = True
    assert report.largest_cross_section(mask) == 3
    assert report.largest_cross_section(np.zeros((4, 4, 5), bool)) == 2


def test_html_is_self_contained_and_escaped():
    rows = _rows()
    rows[0] = {**rows[0], "case_id": "<x>"}
    summary = {"statistics": report.summarise(rows), "hd95_definition": "brats",
               "hd95_definition_text": "pooled", "missing_predictions": ["d"], "extra_predictions": ["e"],
               "failures": [{"case_id": "f", "error": "f.nii.gz: broken <file>"}], "grades": {}}
    page = report.render_html(summary, rows, boxplot=b"\x89PNG fake", overlays={"a": b"\x89PNG"})
    assert page.count("data:image/png;base64,") == 2
    assert "&lt;x&gt;" in page and "<x>" not in page and "broken &lt;file&gt;" in page
    assert "Pereira et al. 2016, BRATS 2013 challenge" in page and "0.88" in page
    assert "Cases that could not be scored (1)" in page and "Missing predictions (1)" in page
