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
from brats_cnn.labels import REGIONS

CSV_COLUMNS: tuple[str, ...] = ("case_id", "region", "dsc", "ppv", "sensitivity", "specificity", "hd95",
                                "vol_pred_ml", "vol_gt_ml", "missing_prediction")
SUMMARY_METRICS: tuple[str, ...] = ("dsc", "ppv", "sensitivity", "specificity", "hd95")
STATISTICS: tuple[str, ...] = ("mean", "std", "median", "q25", "q75")
METRIC_LABELS: dict[str, str] = {"dsc": "DSC", "ppv": "PPV", "sensitivity": "Sensitivity",
                                 "specificity": "Specificity", "hd95": "HD95 (mm)",
                                 "vol_pred_ml": "Vol. pred (ml)", "vol_gt_ml": "Vol. GT (ml)"}
REGION_COLOURS: dict[str, str] = {"complete": "#f5d300", "core": "#ff3b30", "enhancing": "#00c8ff"}

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
            :data:`SUMMARY_METRICS` (the rows of ``metrics.csv``).
        grades: ``{case_id: "HGG"|"LGG"|None}``; each grade present gets its own group.

    Returns:
        ``{group: {region: {metric: describe(...)}}}`` with group ``"all"`` first, then the grades
        in sorted order.
    """
    rows = list(rows)
    grades = dict(grades or {})
    groups = ["all"] + sorted({g for g in grades.values() if g})
    out: dict[str, dict] = {}
    for group in groups:
        members = [r for r in rows if group == "all" or grades.get(r["case_id"]) == group]
        out[group] = {region: {metric: describe([r[metric] for r in members if r["region"] == region])
                               for metric in SUMMARY_METRICS}
                      for region in REGIONS}
    return out


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    return str(value)


def write_metrics_csv(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write one line per case and region with the columns of :data:`CSV_COLUMNS`, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            for row in rows:
                writer.writerow([_format_value(row.get(col, 0)) for col in CSV_COLUMNS])
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
    fig, axes = plt.subplots(1, len(SUMMARY_METRICS), figsize=(3.0 * len(SUMMARY_METRICS), 3.4))
    rng = np.random.default_rng(0)  # fixed jitter: the same rows give the same picture
    for ax, metric in zip(axes, SUMMARY_METRICS):
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
        ax.set_title(METRIC_LABELS[metric], fontsize=11)
        if metric in ("dsc", "ppv", "sensitivity"):
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
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=REGION_COLOURS[region], linewidths=1.1)
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    handles = [Line2D([], [], color=REGION_COLOURS[r], lw=2, label=r) for r in REGIONS]
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
.meta td{text-align:left;border:none;padding:1px 12px 1px 0} .meta{margin:0}
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
    return f"{value:.2f}" if metric == "hd95" or metric.startswith("vol") else f"{value:.3f}"


def _summary_tables(statistics: Mapping[str, Any]) -> str:
    parts = []
    for group, by_region in statistics.items():
        n = next(iter(next(iter(by_region.values())).values())).get("n", 0)
        parts.append(f"<h3>{html.escape('All cases' if group == 'all' else group)} (n = {n})</h3>")
        head = "".join(f"<th colspan=3>{region}</th>" for region in REGIONS)
        sub = "".join("<th>mean &plusmn; std</th><th>median</th><th>q25 &ndash; q75</th>" for _ in REGIONS)
        body = []
        for metric in SUMMARY_METRICS:
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


def _case_table(rows: Sequence[Mapping[str, Any]], grades: Mapping[str, str | None]) -> str:
    metrics = ("dsc", "ppv", "sensitivity", "hd95")
    head = "".join(f"<th colspan=3>{METRIC_LABELS[m]}</th>" for m in metrics)
    sub = "".join(f"<th>{r[:4] if r == 'enhancing' else r}</th>" for _ in metrics for r in REGIONS)
    by_case: dict[str, dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        by_case.setdefault(row["case_id"], {})[row["region"]] = row
    lines = []
    for case_id, regions in by_case.items():
        missing = any(r.get("missing_prediction") for r in regions.values())
        cells = "".join(f"<td>{_fmt(regions.get(r, {}).get(m), m)}</td>" for m in metrics for r in REGIONS)
        flag = "<td class='l flag'>missing prediction</td>" if missing else "<td class=l></td>"
        lines.append(f"<tr><td class=l>{html.escape(case_id)}</td><td class=l>{html.escape(grades.get(case_id) or '')}"
                     f"</td>{cells}{flag}</tr>")
    return (f"<table><tr><th rowspan=2 class=l>case</th><th rowspan=2 class=l>grade</th>{head}"
            f"<th rowspan=2 class=l>note</th></tr><tr>{sub}</tr>{''.join(lines)}</table>")


def render_html(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], *,
                boxplot: bytes | None = None, overlays: Mapping[str, bytes] | None = None) -> str:
    """The report page as one self-contained HTML string (figures embedded as base64 PNG).

    Args:
        summary: the ``summary.json`` dictionary (keys written by :mod:`brats_cnn.evaluate`).
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
    if missing or extra:
        text = ""
        if missing:
            text += (f"<p><b>Missing predictions ({len(missing)})</b>, scored as empty predictions as the "
                     f"challenge does: {esc(', '.join(missing))}</p>")
        if extra:
            text += (f"<p><b>Predictions without ground truth ({len(extra)})</b>, not scored: "
                     f"{esc(', '.join(extra))}</p>")
        parts.append(f"<h2>Matching</h2><div class=warn>{text}</div>")
    statistics = summary.get("statistics", {})
    if statistics:
        parts.append("<h2>Summary</h2><p class=small>Leaderboard statistics over cases: mean &plusmn; standard "
                     "deviation (population), median, 25th and 75th percentile. Empty-mask conventions as BraTS: "
                     "both empty gives 1 (HD95 0 mm), exactly one empty gives 0 (HD95 373.13 mm).</p>")
        parts.append(_summary_tables(statistics))
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
                     "ground-truth tumour; contours of the complete, core and enhancing regions.</p>"
                     f"<div class=grid>{figures}</div>")
    parts.append(f"<p class=small>brats-cnn {esc(str(summary.get('version', '')))}</p></body></html>")
    return "\n".join(parts)


def write_report_html(path: str | Path, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], *,
                      boxplot: bytes | None = None, overlays: Mapping[str, bytes] | None = None) -> Path:
    """Render :func:`render_html` and write it atomically."""
    return write_text_atomic(path, render_html(summary, rows, boxplot=boxplot, overlays=overlays))
