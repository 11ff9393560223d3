"""Evaluation reports: ``metrics.csv``, the BraTS-style summary, figures and a self-contained HTML page.

Functions here take plain data (rows of metric values, arrays for figures) and know nothing about
files on disk other than the output they write. Figures are drawn with matplotlib's Agg backend
and returned as PNG bytes so that the HTML page can embed them (base64); nothing is fetched from
the network when the page is opened.
"""

from __future__ import annotations

import base64
import csv
import html
import io as _io
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from brats_cnn.fsutil import atomic_path, write_json_atomic, write_text_atomic
from brats_cnn.data.labels import REGIONS
from brats_cnn.evaluation.metrics import HD95_ONE_EMPTY, LESION_HD95_PENALTY

LESION_COLUMNS: tuple[str, ...] = ("lesion_dsc", "lesion_hd95", "gt_lesions", "detected_lesions",
                                   "missed_lesions", "fp_lesions")
LESION_COUNTS: tuple[str, ...] = ("gt_lesions", "detected_lesions", "missed_lesions", "fp_lesions")
CSV_COLUMNS: tuple[str, ...] = ("case_id", "region", "dsc", "ppv", "sensitivity", "specificity", "hd95",
                                "vol_pred_ml", "vol_gt_ml", "missing_prediction", *LESION_COLUMNS)
SUMMARY_METRICS: tuple[str, ...] = ("dsc", "ppv", "sensitivity", "specificity", "hd95", "lesion_dsc", "lesion_hd95")
STATISTICS: tuple[str, ...] = ("mean", "std", "median", "q25", "q75")
METRIC_LABELS: dict[str, str] = {"dsc": "DSC", "ppv": "PPV", "sensitivity": "Sensitivity",
                                 "specificity": "Specificity", "hd95": "HD95 (mm)",
                                 "vol_pred_ml": "Vol. pred (ml)", "vol_gt_ml": "Vol. GT (ml)",
                                 "lesion_dsc": "Lesion-wise DSC", "lesion_hd95": "Lesion-wise HD95 (mm)",
                                 "gt_lesions": "GT lesions", "detected_lesions": "detected",
                                 "missed_lesions": "missed", "fp_lesions": "false positive"}
REGION_COLOURS: dict[str, str] = {"complete": "#f5d300", "core": "#ff3b30", "enhancing": "#00c8ff"}
# Nested regions often share borders (core and enhancing): wider lines underneath, thinner dashed
# lines on top, so that every region's contour stays visible where they coincide.
REGION_LINES: dict[str, dict[str, Any]] = {"complete": {"linewidths": 1.3, "linestyles": "solid", "zorder": 2},
                                           "core": {"linewidths": 3.0, "linestyles": "solid", "zorder": 3},
                                           "enhancing": {"linewidths": 1.2, "linestyles": "dashed", "zorder": 4}}
UNKNOWN_GRADE_GROUP = "unknown grade"

# Pereira et al. 2016, Table V (BRATS 2013), as in SPEC.md "Reference results".
PAPER_REFERENCE: dict[str, dict[str, dict[str, float]]] = {
    "challenge": {"dsc": {"complete": 0.88, "core": 0.83, "enhancing": 0.77},
                  "ppv": {"complete": 0.88, "core": 0.87, "enhancing": 0.74},
                  "sensitivity": {"complete": 0.89, "core": 0.83, "enhancing": 0.81}},
    "leaderboard": {"dsc": {"complete": 0.84, "core": 0.72, "enhancing": 0.62},
                    "ppv": {"complete": 0.85, "core": 0.82, "enhancing": 0.60},
                    "sensitivity": {"complete": 0.86, "core": 0.76, "enhancing": 0.68}},
}


# ----------------------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------------------

def describe(values: Sequence[float]) -> dict[str, float | int]:
    """Leaderboard statistics of one metric: mean, std (population, ddof=0), median, q25, q75, n.

    Percentiles use linear interpolation. An empty input gives ``n = 0`` and no other keys.
    """
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return {"n": 0}
    q25, median, q75 = np.percentile(arr, [25, 50, 75])
    return {"mean": float(arr.mean()), "std": float(arr.std()), "median": float(median),
            "q25": float(q25), "q75": float(q75), "n": int(arr.size)}


def summarise(rows: Iterable[Mapping[str, Any]], grades: Mapping[str, str | None] | None = None
              ) -> dict[str, dict[str, dict[str, dict[str, float | int]]]]:
    """Statistics per group, region and metric, as the BraTS leaderboard shows them.

    Args:
        rows: one mapping per case and region with ``case_id``, ``region`` and the metrics of
            :data:`SUMMARY_METRICS` (the rows of ``metrics.csv``); lesion-wise metrics only when
            the rows have them.
        grades: ``{case_id: "HGG"|"LGG"|None}``; each grade present gets its own group, and when
            some cases have a grade and others not, those get the group :data:`UNKNOWN_GRADE_GROUP`.

    Returns:
        ``{group: {region: {metric: describe(...)}}}`` with group ``"all"`` first, then the grades
        in sorted order, then the unknown grade.
    """
    rows = list(rows)
    grades = dict(grades or {})
    known = sorted({g for g in grades.values() if g})
    case_ids = {r["case_id"] for r in rows}
    unknown = [UNKNOWN_GRADE_GROUP] if known and any(not grades.get(c) for c in case_ids) else []
    metrics = [m for m in SUMMARY_METRICS if not rows or all(r.get(m) is not None for r in rows)]
    out: dict[str, dict] = {}
    for group in ["all"] + known + unknown:
        members = [r for r in rows if group == "all" or (grades.get(r["case_id"]) or UNKNOWN_GRADE_GROUP) == group]
        out[group] = {region: {metric: describe([r[metric] for r in members if r["region"] == region])
                               for metric in metrics}
                      for region in REGIONS}
    return out


def lesion_counts(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Totals over cases of the lesion counts per region: ``{region: {count: total}}``."""
    rows = list(rows)
    return {region: {count: int(sum(r[count] for r in rows if r["region"] == region)) for count in LESION_COUNTS}
            for region in REGIONS}


def _format_value(value: Any) -> str:
    """A CSV cell: booleans as 0/1, floats to 6 significant digits, text neutralised against formulas
    (:func:`brats_cnn.outward.csv_cell`)."""
    from brats_cnn.outward import csv_cell

    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    return csv_cell(str(value)) if isinstance(value, str) else str(value)


def write_metrics_csv(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write one line per case and region with the columns of :data:`CSV_COLUMNS`, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            for row in rows:  # lesion-wise columns stay empty when they were not computed
                writer.writerow([_format_value(row.get(col, "" if col in LESION_COLUMNS else 0))
                                 for col in CSV_COLUMNS])
    return path


def write_summary_json(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Write the summary dictionary as indented JSON, atomically."""
    return write_json_atomic(path, summary)


# ----------------------------------------------------------------------------------------------
# Figures (PNG bytes)
# ----------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _figure_png(fig: Any, dpi: int = 90) -> bytes:
    plt = _pyplot()
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def boxplot_png(rows: Sequence[Mapping[str, Any]], grades: Mapping[str, str | None] | None = None) -> bytes:
    """Box plots of every metric of :data:`SUMMARY_METRICS`, one panel per metric, one box per region.

    Each case is drawn as a point over its box (HGG filled, LGG hollow when grades are known).
    """
    plt = _pyplot()
    grades = dict(grades or {})
    metrics = [m for m in SUMMARY_METRICS if all(r.get(m) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.0 * len(metrics), 3.4))
    rng = np.random.default_rng(0)  # fixed jitter: the same rows give the same picture
    for ax, metric in zip(axes, metrics):
        data = [[r[metric] for r in rows if r["region"] == region] for region in REGIONS]
        box = ax.boxplot(data, widths=0.55, patch_artist=True, showfliers=False,
                         medianprops={"color": "black"})
        for patch, region in zip(box["boxes"], REGIONS):
            patch.set_facecolor(REGION_COLOURS[region])
            patch.set_alpha(0.45)
        for k, region in enumerate(REGIONS, start=1):
            members = [r for r in rows if r["region"] == region]
            x = k + rng.uniform(-0.12, 0.12, len(members))
            hollow = [grades.get(r["case_id"]) == "LGG" for r in members]
            ax.scatter(x, [r[metric] for r in members], s=14, zorder=3, edgecolors="black", linewidths=0.6,
                       c=["white" if h else "black" for h in hollow])
        ax.set_xticks(range(1, len(REGIONS) + 1), [r[:4] if r == "enhancing" else r for r in REGIONS])
        ax.set_title(METRIC_LABELS[metric].replace("Lesion-wise", "Lesion"), fontsize=11)
        if metric in ("dsc", "ppv", "sensitivity", "lesion_dsc"):
            ax.set_ylim(-0.03, 1.03)  # specificity is ~1 everywhere: let its axis zoom in
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _figure_png(fig)


def largest_cross_section(mask: np.ndarray) -> int:
    """Index of the axial slice (last axis) with the most voxels of ``mask`` ``(X, Y, Z)``; middle if empty."""
    counts = np.count_nonzero(mask, axis=(0, 1))
    return int(np.argmax(counts)) if counts.any() else mask.shape[2] // 2


def overlay_png(flair_slice: np.ndarray, gt_masks: Mapping[str, np.ndarray],
                pred_masks: Mapping[str, np.ndarray], title: str) -> bytes:
    """Two panels of one axial FLAIR slice with region contours: ground truth left, prediction right.

    Args:
        flair_slice: ``(X, Y)`` float intensities of the slice (any scale).
        gt_masks, pred_masks: ``{region: (X, Y) bool}`` for the regions of :data:`REGIONS`.
        title: figure title (case id, slice, scores).

    The slice is shown in stored voxel order (first axis across, second axis down), which for
    BraTS files is the radiological view; it is cropped to the non-zero part of the slice.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D

    image = np.asarray(flair_slice, dtype=np.float32)
    nonzero = np.argwhere(image != 0)
    if nonzero.size:
        (x0, y0), (x1, y1) = nonzero.min(axis=0), nonzero.max(axis=0) + 1
    else:
        (x0, y0), (x1, y1) = (0, 0), image.shape
    crop = (slice(max(x0 - 3, 0), x1 + 3), slice(max(y0 - 3, 0), y1 + 3))
    shown = image[crop].T
    low, high = np.percentile(shown, [1, 99.5]) if shown.size else (0, 1)
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.6))
    for ax, masks, name in zip(axes, (gt_masks, pred_masks), ("ground truth", "prediction")):
        ax.imshow(shown, cmap="gray", vmin=low, vmax=max(high, low + 1e-6), interpolation="nearest")
        for region in REGIONS:
            mask = np.asarray(masks[region])[crop].T
            if mask.any() and not mask.all():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=REGION_COLOURS[region], **REGION_LINES[region])
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    handles = [Line2D([], [], color=REGION_COLOURS[r], lw=REGION_LINES[r]["linewidths"],
                      ls=REGION_LINES[r]["linestyles"], label=r) for r in REGIONS]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _figure_png(fig, dpi=80)


# ----------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;
     color:#1d1d1f;padding:0 16px;line-height:1.4}
h1{font-size:24px;margin-bottom:4px} h2{font-size:19px;margin-top:30px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:6px 0 12px}
th,td{border:1px solid #d8d8d8;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f3f3f5} td.l,th.l{text-align:left}
tr.paper td{color:#6b4e00;background:#fffbe8}
.meta td{text-align:left;border:none;padding:1px 12px 1px 0;white-space:normal} .meta{margin:0}
.bad{background:#fff0f0;border:1px solid #e0a0a0;padding:8px 12px;border-radius:4px}
.warn{background:#fff8e6;border:1px solid #e6c77a;padding:8px 12px;border-radius:4px}
.grid{display:flex;flex-wrap:wrap;gap:10px} .grid figure{margin:0}
img{max-width:100%} .small{font-size:12px;color:#555}
td.flag{color:#b00020;font-weight:600}
"""


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding PNG bytes in HTML."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _fmt(value: Any, metric: str) -> str:
    if value is None:
        return "&ndash;"
    return f"{value:.2f}" if "hd95" in metric or metric.startswith("vol") else f"{value:.3f}"


def _summary_tables(statistics: Mapping[str, Any]) -> str:
    parts = []
    for group, by_region in statistics.items():
        n = next(iter(next(iter(by_region.values())).values())).get("n", 0)
        parts.append(f"<h3>{html.escape('All cases' if group == 'all' else group)} (n = {n})</h3>")
        head = "".join(f"<th colspan=3>{region}</th>" for region in REGIONS)
        sub = "".join("<th>mean &plusmn; std</th><th>median</th><th>q25 &ndash; q75</th>" for _ in REGIONS)
        body = []
        first_region = next(iter(by_region.values()))
        for metric in [m for m in SUMMARY_METRICS if m in first_region]:
            cells = []
            for region in REGIONS:
                s = by_region[region][metric]
                if not s.get("n"):
                    cells.append("<td>&ndash;</td>" * 3)
                    continue
                cells.append(f"<td>{_fmt(s['mean'], metric)} &plusmn; {_fmt(s['std'], metric)}</td>"
                             f"<td>{_fmt(s['median'], metric)}</td>"
                             f"<td>{_fmt(s['q25'], metric)} &ndash; {_fmt(s['q75'], metric)}</td>")
            body.append(f"<tr><th class=l>{METRIC_LABELS[metric]}</th>{''.join(cells)}</tr>")
        parts.append(f"<table><tr><th rowspan=2 class=l>metric</th>{head}</tr><tr>{sub}</tr>{''.join(body)}</table>")
    return "\n".join(parts)


def _paper_table(statistics: Mapping[str, Any]) -> str:
    metrics = ("dsc", "ppv", "sensitivity")
    head = "".join(f"<th colspan=3>{METRIC_LABELS[m]}</th>" for m in metrics)
    sub = "".join(f"<th>{r[:4] if r == 'enhancing' else r}</th>" for _ in metrics for r in REGIONS)
    rows = []
    for group, by_region in statistics.items():
        cells = "".join(f"<td>{_fmt(by_region[r][m].get('mean'), m)}</td>" for m in metrics for r in REGIONS)
        rows.append(f"<tr><td class=l>this evaluation, {html.escape(group)} (mean)</td>{cells}</tr>")
    for name, values in PAPER_REFERENCE.items():
        cells = "".join(f"<td>{values[m][r]:.2f}</td>" for m in metrics for r in REGIONS)
        rows.append(f"<tr class=paper><td class=l>Pereira et al. 2016, BRATS 2013 {name}</td>{cells}</tr>")
    return (f"<table><tr><th rowspan=2 class=l>source</th>{head}</tr><tr>{sub}</tr>{''.join(rows)}</table>"
            "<p class=small>The paper's figures are on BRATS 2013 (Table V); numbers on other data sets are "
            "for orientation only.</p>")


def _lesion_count_table(counts: Mapping[str, Mapping[str, int]]) -> str:
    head = "".join(f"<th>{METRIC_LABELS[c]}</th>" for c in LESION_COUNTS)
    body = "".join(f"<tr><th class=l>{region}</th>" + "".join(f"<td>{counts[region][c]}</td>" for c in LESION_COUNTS)
                   + "</tr>" for region in REGIONS)
    return f"<table><tr><th class=l>region</th>{head}</tr>{body}</table>"


def _case_table(rows: Sequence[Mapping[str, Any]], grades: Mapping[str, str | None]) -> str:
    lesion = bool(rows) and all(r.get("lesion_dsc") is not None for r in rows)
    metrics = ("dsc", "ppv", "sensitivity", "hd95") + (("lesion_dsc", "lesion_hd95") if lesion else ())
    head = "".join(f"<th colspan=3>{METRIC_LABELS[m]}</th>" for m in metrics)
    sub = "".join(f"<th>{r[:4] if r == 'enhancing' else r}</th>" for _ in metrics for r in REGIONS)
    by_case: dict[str, dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        by_case.setdefault(row["case_id"], {})[row["region"]] = row
    lines = []
    for case_id, regions in by_case.items():
        missing = any(r.get("missing_prediction") for r in regions.values())
        cells = "".join(f"<td>{_fmt(regions.get(r, {}).get(m), m)}</td>" for m in metrics for r in REGIONS)
        if lesion:  # ground-truth lesions / detected / missed / false positives, per region
            cells += "".join("<td>" + "/".join(str(regions.get(r, {}).get(c, "")) for c in LESION_COUNTS) + "</td>"
                             for r in REGIONS)
        flag = "<td class='l flag'>missing prediction</td>" if missing else "<td class=l></td>"
        lines.append(f"<tr><td class=l>{html.escape(case_id)}</td><td class=l>{html.escape(grades.get(case_id) or '')}"
                     f"</td>{cells}{flag}</tr>")
    if lesion:
        head += "<th colspan=3>lesions GT/det/miss/FP</th>"
        sub += "".join(f"<th>{r[:4] if r == 'enhancing' else r}</th>" for r in REGIONS)
    return (f"<table><tr><th rowspan=2 class=l>case</th><th rowspan=2 class=l>grade</th>{head}"
            f"<th rowspan=2 class=l>note</th></tr><tr>{sub}</tr>{''.join(lines)}</table>")


def _lesion_settings_text(lesion: Mapping[str, Any] | None) -> str:
    if not lesion:
        return "not computed"
    return (f"preset {lesion['preset']}: 26-connected components, ground truth dilated {lesion['dilation']} "
            f"time(s) for merging and matching, lesions of at most {lesion['min_volume_mm3']:g} mm\u00b3 ignored, "
            f"missed and false-positive lesions DSC 0 / HD95 {lesion['hd95_penalty_mm']:g} mm; lesion HD95: "
            f"{lesion.get('hd95_definition', 'brats')}")


def render_html(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], *,
                boxplot: bytes | None = None, overlays: Mapping[str, bytes] | None = None) -> str:
    """The report page as one self-contained HTML string (figures embedded as base64 PNG).

    Args:
        summary: the ``summary.json`` dictionary (keys written by :mod:`brats_cnn.evaluation.evaluate`).
        rows: the ``metrics.csv`` rows.
        boxplot: PNG bytes of :func:`boxplot_png`, or None.
        overlays: ``{case_id: PNG bytes}`` of :func:`overlay_png`.
    """
    esc = html.escape
    grades = summary.get("grades", {})
    meta = [("prediction", summary.get("pred")), ("ground truth", summary.get("gt")),
            ("label conventions", f"ground truth {summary.get('label_convention')}, "
                                  f"prediction {summary.get('pred_convention')}"),
            ("HD95 definition", f"{summary.get('hd95_definition')}: {summary.get('hd95_definition_text')}"),
            ("lesion-wise", _lesion_settings_text(summary.get("lesion_wise"))),
            ("cases scored", f"{summary.get('n_cases_scored')} (of which {len(summary.get('missing_predictions', []))} "
                             "with a missing prediction, scored as empty)"),
            ("created", summary.get("created"))]
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>brats-cnn evaluation</title>"
             f"<style>{_CSS}</style></head><body>",
             "<h1>Segmentation evaluation</h1>",
             "<table class=meta>" + "".join(f"<tr><td><b>{esc(k)}</b></td><td>{esc(str(v))}</td></tr>" for k, v in meta)
             + "</table>"]
    failures = summary.get("failures", [])
    if failures:
        items = "".join(f"<li><b>{esc(f['case_id'])}</b>: {esc(f['error'])}</li>" for f in failures)
        parts.append(f"<h2>Cases that could not be scored ({len(failures)})</h2><div class=bad><ul>{items}</ul>"
                     "These cases are not in the statistics below.</div>")
    missing, extra = summary.get("missing_predictions", []), summary.get("extra_predictions", [])
    left_out = summary.get("not_scored_without_prediction", [])
    if missing or extra or left_out:
        text = ""
        if missing:
            text += (f"<p><b>Missing predictions ({len(missing)})</b>, scored as empty predictions as the "
                     f"challenge does: {esc(', '.join(missing))}</p>")
        if left_out:
            text += (f"<p><b>Cases without prediction left out ({len(left_out)})</b> (only predicted cases "
                     f"scored): {esc(', '.join(left_out))}</p>")
        if extra:
            text += (f"<p><b>Predictions without ground truth ({len(extra)})</b>, not scored: "
                     f"{esc(', '.join(extra))}</p>")
        parts.append(f"<h2>Matching</h2><div class=warn>{text}</div>")
    statistics = summary.get("statistics", {})
    if statistics:
        parts.append("<h2>Summary</h2><p class=small>Leaderboard statistics over cases: mean &plusmn; standard "
                     "deviation (population), median, 25th and 75th percentile. Empty-mask conventions as BraTS: "
                     f"both empty gives 1 (HD95 0 mm), exactly one empty gives 0 (HD95 {HD95_ONE_EMPTY:g} mm, the "
                     f"BraTS 2017-2021 value; a missed or false-positive lesion's HD95 is "
                     f"{LESION_HD95_PENALTY:g} mm, the BraTS 2023+ one).</p>")
        parts.append(_summary_tables(statistics))
    if summary.get("lesion_counts"):
        parts.append("<h2>Lesions</h2><p class=small>Totals over cases (lesion-wise scoring, BraTS 2023+): ground-truth "
                     "lesions above the volume threshold, those detected and missed, and predicted components that "
                     f"match no lesion (false positives, each scored DSC 0 and HD95 {LESION_HD95_PENALTY:g} mm).</p>"
                     + _lesion_count_table(summary["lesion_counts"]))
    if statistics:
        parts.append("<h2>Compared with the paper</h2>" + _paper_table(statistics))
    if boxplot:
        parts.append(f"<h2>Distributions</h2><img alt='box plots per metric and region' src='{png_data_uri(boxplot)}'>"
                     "<p class=small>One box per region (median, quartiles, whiskers to 1.5 IQR); points are cases "
                     "(LGG hollow).</p>")
    if rows:
        parts.append("<h2>Per case</h2>" + _case_table(rows, grades))
    if overlays:
        figures = "".join(f"<figure><img alt='{esc(cid)}' src='{png_data_uri(png)}'></figure>"
                          for cid, png in overlays.items())
        parts.append("<h2>Overlays</h2><p class=small>Axial FLAIR slice through the largest cross-section of the "
                     "ground-truth tumour; contours of the complete (thin yellow), core (wide red) and enhancing "
                     "(dashed cyan, drawn on top) regions: where core and enhancing share a border the red band "
                     "shows on both sides of the dashes.</p>"
                     f"<div class=grid>{figures}</div>")
    parts.append(f"<p class=small>brats-cnn {esc(str(summary.get('version', '')))}</p></body></html>")
    return "\n".join(parts)


def write_report_html(path: str | Path, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], *,
                      boxplot: bytes | None = None, overlays: Mapping[str, bytes] | None = None) -> Path:
    """Render :func:`render_html` and write it atomically."""
    return write_text_atomic(path, render_html(summary, rows, boxplot=boxplot, overlays=overlays))


# ----------------------------------------------------------------------------------------------
# Terminal
# ----------------------------------------------------------------------------------------------

_TERMINAL_METRICS: tuple[str, ...] = ("dsc", "hd95", "lesion_dsc", "lesion_hd95")


def terminal_table(summary: Mapping[str, Any]) -> str:
    """The compact result for the terminal: mean DSC / HD95 (and lesion-wise) per region, then one line of counts."""
    stats = summary.get("statistics", {}).get("all", {})
    lines = [f"{'mean over cases':<24}" + "".join(f"{r:>11}" for r in REGIONS)]
    for metric in _TERMINAL_METRICS:
        if not stats or metric not in stats[REGIONS[0]] or not stats[REGIONS[0]][metric].get("n"):
            continue
        cells = "".join(f"{_terminal_number(stats[r][metric]['mean'], metric):>11}" for r in REGIONS)
        lines.append(f"{METRIC_LABELS[metric]:<24}{cells}")
    counts = summary.get("lesion_counts")
    if counts:
        cells = "".join(f"{'/'.join(str(counts[r][c]) for c in LESION_COUNTS):>11}" for r in REGIONS)
        lines.append(f"{'lesions GT/det/miss/FP':<24}{cells}")
    missing = len(summary.get("missing_predictions", []))
    note = f" ({missing} without prediction, scored as empty)" if missing else ""
    lines.append(f"{summary.get('n_cases_scored', 0)} case(s) scored{note}")
    return "\n".join(lines)


def _terminal_number(value: float, metric: str) -> str:
    return f"{value:.2f}" if "hd95" in metric else f"{value:.3f}"


def terminal_comparison(comparison: Mapping[str, Any]) -> str:
    """The ranking and the mean of each ranking metric per prediction, for the terminal."""
    metrics = comparison["ranking_metrics"]
    means = {(i["prediction"], i["region"], i["metric"]): i["mean"] for i in comparison["intervals"]}
    head = f"{'rank':<5}{'prediction':<24}{'mean rank':>10}" + "".join(
        f"{(METRIC_LABELS[m].replace('Lesion-wise', 'LW').replace(' (mm)', '') + ' ' + r[:4]):>14}"
        for m in metrics for r in REGIONS)
    lines = [head]
    for row in comparison["ranking"]:
        name = row["prediction"]
        cells = "".join(f"{_terminal_number(means[(name, r, m)], m):>14}" if means.get((name, r, m)) is not None
                        else f"{'-':>14}" for m in metrics for r in REGIONS)
        mean_rank = f"{row['mean_rank']:.3f}" if row["mean_rank"] is not None else "-"
        lines.append(f"{row['rank'] or '-'!s:<5}{name[:23]:<24}{mean_rank:>10}{cells}")
    lines.append(f"{len(comparison['cases'])} case(s) compared; p-values and intervals in comparison.csv / intervals.csv")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Comparison of several predictions
# ----------------------------------------------------------------------------------------------

TEST_COLUMNS: tuple[str, ...] = ("first", "second", "region", "metric", "n", "first_mean", "second_mean",
                                 "mean_difference", "median_difference", "wilcoxon_statistic", "p_value")
INTERVAL_COLUMNS: tuple[str, ...] = ("prediction", "region", "metric", "n", "mean", "ci_low", "ci_high")
RANKING_COLUMNS: tuple[str, ...] = ("rank", "prediction", "mean_rank", "n_rankings")
DIFFERENCE_COLUMNS: tuple[str, ...] = ("first", "second", "case_id", "region", "metric", "first_value",
                                       "second_value", "difference")


def write_rows_csv(rows: Iterable[Mapping[str, Any]], columns: Sequence[str], path: str | Path) -> Path:
    """Write mappings as CSV with the given columns (6 significant digits), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for row in rows:
                writer.writerow(["" if row.get(c) is None else _format_value(row.get(c)) for c in columns])
    return path


def paired_plot_png(rows_by_name: Mapping[str, Sequence[Mapping[str, Any]]], cases: Sequence[str],
                    metric: str) -> bytes:
    """Paired plot of one metric: a panel per region, predictions along x, one line per case."""
    plt = _pyplot()
    names = list(rows_by_name)
    fig, axes = plt.subplots(1, len(REGIONS), figsize=(3.3 * len(REGIONS), 3.3), sharey=True)
    for ax, region in zip(axes, REGIONS):
        values = np.array([[next(float(r[metric]) for r in rows_by_name[n] if r["case_id"] == c and r["region"] == region)
                            for n in names] for c in cases]) if cases else np.zeros((0, len(names)))
        for line in values:
            ax.plot(range(len(names)), line, color="#777777", alpha=0.6, lw=0.9, marker="o", ms=3)
        if len(values):
            ax.plot(range(len(names)), values.mean(axis=0), color=REGION_COLOURS[region], lw=2.5, marker="D",
                    ms=6, markeredgecolor="black", label="mean")
        ax.set_xticks(range(len(names)), [n[:14] for n in names], rotation=20, fontsize=8)
        ax.set_title(region, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(METRIC_LABELS[metric])
    fig.tight_layout()
    return _figure_png(fig)


def render_comparison_html(comparison: Mapping[str, Any], plots: Mapping[str, bytes]) -> str:
    """The comparison page: settings, ranking, means with intervals, pairwise tests, paired plots."""
    esc = html.escape
    names = comparison["predictions"]
    links = "".join(f"<li><a href='{esc(n)}/report.html'>{esc(n)}</a>: {esc(comparison['pred'][n])}</li>" for n in names)
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>brats-cnn comparison</title>"
             f"<style>{_CSS}</style></head><body>", "<h1>Comparison of predictions</h1>",
             f"<p>Ground truth {esc(comparison['gt'])}; {len(comparison['cases'])} case(s) scored for every "
             f"prediction. HD95: {esc(comparison['hd95_definition'])}. Lesion-wise: "
             f"{esc(_lesion_settings_text(comparison.get('lesion_wise')))}.</p><ul>{links}</ul>"]
    if comparison.get("failures"):
        items = "".join(f"<li>{esc(f['error'])}</li>" for f in comparison["failures"])
        parts.append(f"<div class=bad><b>Cases that could not be scored</b><ul>{items}</ul></div>")
    missing = {n: m for n, m in comparison.get("missing_predictions", {}).items() if m}
    if missing:
        text = "".join(f"<li>{esc(n)}: {len(m)} ({esc(', '.join(m[:10]))}{', ...' if len(m) > 10 else ''})</li>"
                       for n, m in missing.items())
        parts.append(f"<div class=warn><b>Missing predictions, scored as empty</b><ul>{text}</ul></div>")
    metrics_text = ", ".join(METRIC_LABELS[m] for m in comparison["ranking_metrics"])
    rows = "".join(f"<tr><td>{r['rank']}</td><td class=l>{esc(r['prediction'])}</td>"
                   f"<td>{'' if r['mean_rank'] is None else format(r['mean_rank'], '.3f')}</td><td>{r['n_rankings']}</td></tr>"
                   for r in comparison["ranking"])
    parts.append(f"<h2>Ranking</h2><p class=small>{esc(comparison['ranking_scheme'])}; metrics: {esc(metrics_text)}, "
                 f"regions: {', '.join(REGIONS)}.</p><table><tr><th>rank</th><th class=l>prediction</th>"
                 f"<th>mean rank</th><th>rankings</th></tr>{rows}</table>")
    head = "".join(f"<th>{r}</th>" for r in REGIONS)
    body = []
    by_key = {(i["prediction"], i["metric"], i["region"]): i for i in comparison["intervals"]}
    for metric in comparison["metrics"]:
        for name in names:
            cells = ""
            for region in REGIONS:
                i = by_key[(name, metric, region)]
                ci = "" if i["ci_low"] is None or np.isnan(i["ci_low"]) else \
                    f" [{_fmt(i['ci_low'], metric)}, {_fmt(i['ci_high'], metric)}]"
                cells += f"<td>{_fmt(i['mean'], metric)}{ci}</td>"
            body.append(f"<tr><th class=l>{METRIC_LABELS[metric]}</th><td class=l>{esc(name)}</td>{cells}</tr>")
    parts.append(f"<h2>Means and 95 % intervals</h2><p class=small>{esc(comparison['interval'])}.</p>"
                 f"<table><tr><th class=l>metric</th><th class=l>prediction</th>{head}</tr>{''.join(body)}</table>")
    body = []
    for t in comparison["tests"]:
        p_value = t["p_value"]
        flag = " class=flag" if p_value is not None and p_value < 0.05 else ""
        body.append(f"<tr><td class=l>{esc(t['first'])} &minus; {esc(t['second'])}</td><td class=l>{t['region']}</td>"
                    f"<td class=l>{METRIC_LABELS[t['metric']]}</td><td>{t['n']}</td>"
                    f"<td>{_fmt(t['mean_difference'], t['metric'])}</td><td>{_fmt(t['median_difference'], t['metric'])}</td>"
                    f"<td{flag}>{'' if p_value is None else format(p_value, '.3g')}</td></tr>")
    parts.append(f"<h2>Paired tests</h2><p class=small>{esc(comparison['test'])}; differences are first minus "
                 "second; p &lt; 0.05 in red (not corrected for multiple comparisons). Per-case differences: "
                 "differences.csv.</p><table><tr><th class=l>pair</th><th class=l>region</th><th class=l>metric</th>"
                 f"<th>n</th><th>mean diff.</th><th>median diff.</th><th>p</th></tr>{''.join(body)}</table>")
    if plots:
        figures = "".join(f"<figure><img alt='paired plot {esc(m)}' src='{png_data_uri(png)}'></figure>"
                          for m, png in plots.items())
        parts.append("<h2>Paired plots</h2><p class=small>One grey line per case across the predictions; the "
                     f"coloured line joins the means.</p><div class=grid>{figures}</div>")
    parts.append(f"<p class=small>brats-cnn {esc(str(comparison.get('version', '')))}</p></body></html>")
    return "\n".join(parts)


def write_comparison(out: str | Path, comparison: Mapping[str, Any],
                     rows_by_name: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> None:
    """Write ``comparison.json``, ``comparison.csv``, ``intervals.csv``, ``ranking.csv``, ``differences.csv``
    and ``report.html`` (with paired plots when ``rows_by_name`` is given) into ``out``."""
    out = Path(out)
    write_json_atomic(out / "comparison.json", comparison)
    write_rows_csv(comparison["tests"], TEST_COLUMNS, out / "comparison.csv")
    write_rows_csv(comparison["intervals"], INTERVAL_COLUMNS, out / "intervals.csv")
    write_rows_csv(comparison["ranking"], RANKING_COLUMNS, out / "ranking.csv")
    write_rows_csv(comparison["differences"], DIFFERENCE_COLUMNS, out / "differences.csv")
    plots = {}
    if rows_by_name and comparison["cases"]:
        plots = {m: paired_plot_png(rows_by_name, comparison["cases"], m) for m in comparison["metrics"]}
    write_text_atomic(out / "report.html", render_comparison_html(comparison, plots))
