#!/usr/bin/env python
"""K-fold cross-validation over the sample cases: one model per fold, out-of-fold probabilities saved once,
and every segment decision chosen on all out-of-fold cases (issue 34; nnU-Net chooses its
post-processing the same way). Each step resumes where it stopped, across sessions too.

    # 1. the folds, fixed and committed before any training (the v3 split's 5 HGG test cases stay out)
    .venv/bin/python pipelines/cross_validate.py split --data ../shared/data/brats_sample \
        --exclude-split pipelines/splits/brats_sample_v3.json --out pipelines/splits/brats_sample_cv4.json
    # 2. per fold: train (resuming its last.pt), save its held-out cases' probabilities at alpha 0
    #    without post-processing, without and with TTA (segment's skip rule resumes), then reduce them
    #    to per-component count tables (kB per case, committed): a fold whose tables exist is done
    nohup .venv/bin/python pipelines/cross_validate.py run --data ../shared/data/brats_sample \
        --split pipelines/splits/brats_sample_cv4.json --config pipelines/configs/cv_hgg.yaml \
        --out runs/cv --tables benchmarks/results/cv4/tables > runs/cv.log 2>&1 &
    # 3. the decision grid over the tables: every rule's mean/median/worst per population (HGG, LGG,
    #    both) in grid.csv, the chosen rules with per-case scores in grid.json
    .venv/bin/python pipelines/cross_validate.py grid --split pipelines/splits/brats_sample_cv4.json \
        --tables benchmarks/results/cv4/tables --out benchmarks/results/cv4
    # 4. the ceiling of any decision: the chosen rule against a per-case oracle that picks each case's
    #    best rule knowing its reference (headroom_<population>.json beside grid.json)
    .venv/bin/python pipelines/cross_validate.py headroom --split pipelines/splits/brats_sample_cv4.json \
        --tables benchmarks/results/cv4/tables --out benchmarks/results/cv4
    # a test-time lever on the same fold models: --models-from skips training, --segment-set changes
    # how the held-out cases are segmented (here the network run on axial, coronal and sagittal slices)
    .venv/bin/python pipelines/cross_validate.py run --data ../shared/data/brats_sample \
        --split pipelines/splits/brats_sample_cv4.json --models-from runs/cv_intensity_full \
        --segment-set "segment.views=[axial,coronal,sagittal]" --out runs/cv_views \
        --tables benchmarks/results/cv4_views/tables
    # a lever: one network for both grades (the other folds' LGG cases join each fold's training data)
    .venv/bin/python pipelines/cross_validate.py run --data ../shared/data/brats_sample \
        --split pipelines/splits/brats_sample_cv4.json --config pipelines/configs/cv_hgg_context.yaml \
        --train-grades hgg lgg --out runs/cv_mixed --tables benchmarks/results/cv4_mixed/tables
    # a lever: two cross-validations' fold models as an ensemble (the mean of their saved probabilities,
    # as nnU-Net scores an ensemble of configurations), then grid over its tables
    .venv/bin/python pipelines/cross_validate.py tables --data ../shared/data/brats_sample \
        --split pipelines/splits/brats_sample_cv4.json --out runs/cv --ensemble runs/cv_intensity \
        --tables benchmarks/results/cv4_ensemble/tables

Layout under ``--out``: ``fold<k>/data`` (links to its training cases), ``fold<k>/run`` (the train run;
``done.json`` when it ended), ``oof/plain`` and ``oof/tta`` (``<case>_probabilities.nii.gz`` and
sidecars). ``tables`` (the count tables, one ``<case>.npz`` each) rebuilds from ``oof/`` where the
probabilities exist. A run that outlives a session: commit the fold in progress' ``last.pt`` (and its
steps/config) under ``training/cv4/`` and copy it back into ``fold<k>/run`` before ``run`` again
(training/cv4/README.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_brats import link_cases  # noqa: E402

SEED = 2026
TTA_ROTATIONS = "[0,90,180,270]"
ALPHAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
T_VOLS = (0, 1000, 3000, 10000)  # chosen per population (HGG, LGG, both) on its own cases
EDEMA_BOOSTS = (1.0, 1.5, 2.0)  # extra weight of the edema class after the prior correction (1 = none)


# ----------------------------------------------------------------------------------------------
# 1. folds


def make_folds(hgg: list[str], lgg: list[str], k: int, seed: int = SEED) -> list[dict[str, list[str]]]:
    """``k`` folds: the HGG cases shuffled by ``seed`` and dealt round-robin, the LGG cases dealt
    after them (so each fold has about ``len(hgg) / k`` HGG cases and at most one more LGG case
    than any other)."""
    rng = np.random.default_rng(seed)
    folds: list[dict[str, list[str]]] = [{"hgg": [], "lgg": []} for _ in range(k)]
    hgg_order = [hgg[i] for i in rng.permutation(len(hgg))]
    for i, case in enumerate(hgg_order):
        folds[i % k]["hgg"].append(case)
    lgg_order = [lgg[i] for i in rng.permutation(len(lgg))]
    for i, case in enumerate(lgg_order):
        folds[(len(hgg_order) + i) % k]["lgg"].append(case)
    return [{grade: sorted(cases) for grade, cases in fold.items()} for fold in folds]


def split(args: argparse.Namespace) -> int:
    from brats_cnn.data.layouts import list_cases

    excluded: set[str] = set()
    for path in args.exclude_split or []:
        held = json.loads(Path(path).read_text())
        excluded |= set(held["hgg"]["test"])  # the LGG cases are too few to hold one out: all are in folds
    refs = [r for r in list_cases(args.data) if r.case_id not in excluded]
    by_grade = {g: sorted(r.case_id for r in refs if (r.grade or "").lower() == g) for g in ("hgg", "lgg")}
    folds = make_folds(by_grade["hgg"], by_grade["lgg"], args.k)
    document = {"description": f"{args.k}-fold cross-validation split of the sample cases, fixed before training "
                               f"(pipelines/cross_validate.py split, seed {SEED}): HGG cases shuffled and dealt "
                               "round-robin, LGG cases dealt after them; the HGG test cases of "
                               f"{', '.join(str(p) for p in args.exclude_split or [])} are in no fold.",
                "excluded": sorted(excluded), "folds": folds}
    if args.out.exists() and json.loads(args.out.read_text()).get("folds") != folds:
        raise SystemExit(f"{args.out}: exists with other folds; a split is fixed once (delete it to start over)")
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    for i, fold in enumerate(folds):
        print(f"fold {i}: {len(fold['hgg'])} HGG, {len(fold['lgg'])} LGG: {', '.join(fold['hgg'] + fold['lgg'])}")
    return 0


# ----------------------------------------------------------------------------------------------
# 2. training and out-of-fold probabilities


def _brats_cnn() -> list[str]:
    return [sys.executable, "-m", "brats_cnn.cli"]


def _call(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def train_fold(data: Path, folds: list[dict], fold: int, config: Path, out: Path, device: str,
               overrides: list[str], init_from: Path | None = None, grades: tuple[str, ...] = ("hgg",)) -> Path:
    """Train fold ``fold`` on the cases of ``grades`` in the other folds (resuming its last.pt); its last.pt.

    ``init_from``: the ``--out`` of an earlier cross-validation whose fold ``fold`` model this one
    starts from (a second training phase: the same fold's model, so its held-out cases stay unseen).
    ``grades``: ``("hgg",)`` trains the HGG network on HGG cases, as the bundled models are; with
    ``"lgg"`` the other folds' LGG cases join its training data (one network for both grades, as
    nnU-Net and MONAI train on BraTS 2019+); the held-out cases stay unseen either way.
    """
    from brats_cnn.data.layouts import list_cases

    folder = out / f"fold{fold}"
    run = folder / "run"
    if (run / "done.json").is_file():
        return run / "last.pt"
    train_ids = {case for i, f in enumerate(folds) if i != fold for grade in grades for case in f[grade]}
    refs = [replace(r, grade="HGG") for r in list_cases(data) if r.case_id in train_ids]
    if len(refs) != len(train_ids):
        raise SystemExit(f"{data}: fold {fold}: training cases not found: "
                         f"{sorted(train_ids - {r.case_id for r in refs})}")
    linked = {p.name for p in (folder / "data").glob("*") if p.is_symlink()}
    if linked and linked != train_ids:
        raise SystemExit(f"{folder / 'data'}: fold {fold} was started on other training cases "
                         f"({', '.join(sorted(linked ^ train_ids))} differ): the same --train-grades, or another --out")
    link_cases(refs, folder / "data")
    earlier = sorted(out.glob("fold*/run/cache/.percase"))  # N4 results of the same cases: reused
    if earlier and not (run / "cache" / ".percase").exists():
        (run / "cache").mkdir(parents=True, exist_ok=True)
        shutil.copytree(earlier[0], run / "cache" / ".percase")
    command = [*_brats_cnn(), "train", "--grade", "hgg", "--data", str(folder / "data"), "--out", str(run),
               "--device", device]
    sets = [a for o in overrides for a in ("--set", o)]
    if (run / "last.pt").is_file():
        _call([*command, "--resume", *sets])
    else:
        if init_from is not None:
            start = init_from / f"fold{fold}" / "run" / "last.pt"
            if not (start.parent / "done.json").is_file():
                raise SystemExit(f"{start.parent}: fold {fold} of --init-from has not finished (no done.json)")
            sets += ["--set", f"train.init_weights={start}"]
        _call([*command, "--config", str(config), *sets])
    (run / "done.json").write_text(json.dumps({"fold": fold, "train": sorted(train_ids)}, indent=2) + "\n")
    return run / "last.pt"


def predict_fold(data: Path, folds: list[dict], fold: int, model: Path, out: Path, device: str,
                 segment_sets: list[str] = ()) -> None:
    """The held-out cases' probabilities at alpha 0, no post-processing, without and with TTA.

    ``segment_sets``: further ``segment --set`` values for both (a test-time lever, e.g. ``segment.views``).
    """
    from brats_cnn.data.layouts import list_cases

    held = set(folds[fold]["hgg"]) | set(folds[fold]["lgg"])
    cases = [str(Path(r.image_paths[0]).parent) for r in list_cases(data) if r.case_id in held]
    common = ["--model", str(model), "--device", device, "--save-probabilities", "--no-postprocess",
              "--set", "segment.prior_alpha=0", *(a for item in segment_sets for a in ("--set", item))]
    _call([*_brats_cnn(), "segment", *cases, "--out", str(out / "oof" / "plain"), "--no-tta", *common])
    _call([*_brats_cnn(), "segment", *cases, "--out", str(out / "oof" / "tta"), "--tta",
           "--set", f"segment.tta_rotations={TTA_ROTATIONS}", *common])


def run(args: argparse.Namespace) -> int:
    folds = json.loads(args.split.read_text())["folds"]
    tables = args.tables or args.out / "tables"
    for fold in args.fold if args.fold is not None else range(len(folds)):
        held = folds[fold]["hgg"] + folds[fold]["lgg"]
        if all((tables / f"{case}.npz").is_file() for case in held):
            print(f"fold {fold}: the tables of its {len(held)} held-out cases exist; nothing to do", flush=True)
            continue
        if args.models_from is not None:  # a test-time lever: another cross-validation's finished fold models
            model = args.models_from / f"fold{fold}" / "run" / "last.pt"
            if not (model.parent / "done.json").is_file():
                raise SystemExit(f"{model.parent}: fold {fold} of --models-from has not finished (no done.json)")
        else:
            model = train_fold(args.data, folds, fold, args.config, args.out, args.device, args.set or [],
                               args.init_from, tuple(args.train_grades))
        predict_fold(args.data, folds, fold, model, args.out, args.device, args.segment_set or [])
        write_tables(args.data, folds, fold, args.out, tables)
    return 0


# ----------------------------------------------------------------------------------------------
# 3. the decision grid over the saved probabilities


@dataclass(frozen=True)
class Rule:
    """One decision rule: the prior correction, TTA and post-processing applied to saved probabilities."""

    tta: bool
    alpha: float
    edema_boost: float
    t_vol: int
    keep_largest: bool
    never_empty: bool
    require_core: bool = False  # drop components without a tumour-core voxel (postprocess.require_core)

    def name(self) -> str:
        return (f"tta={'on' if self.tta else 'off'} alpha={self.alpha:g} edema_boost={self.edema_boost:g} "
                f"t_vol={self.t_vol} keep_largest={self.keep_largest} never_empty={self.never_empty}"
                + (" require_core=True" if self.require_core else ""))  # older grids' names stay as they were


def corrected(probabilities: np.ndarray, frequencies: np.ndarray, alpha: float, edema_boost: float,
              edema_class: int) -> np.ndarray:
    """``p(c|x) * pi_c ** alpha * boost_c`` renormalised (boost = ``edema_boost`` for edema, else 1)."""
    weights = np.asarray(frequencies, dtype=np.float64) ** alpha
    weights[edema_class] *= edema_boost
    weighted = probabilities * weights.astype(np.float32).reshape(-1, 1, 1, 1)
    return weighted / np.maximum(weighted.sum(axis=0, keepdims=True), np.finfo(np.float32).tiny)


def _counts(classes: np.ndarray, truth: np.ndarray, convention: str) -> tuple[np.ndarray, dict[str, tuple]]:
    """Component sizes of the tumour in ``classes`` and, per region, the true positives and predicted
    voxels in each component plus the reference volume: every post-processing rule keeps whole
    components, so its scores are sums over the components it keeps (no volume is relabelled)."""
    from brats_cnn.data.labels import REGIONS, from_class_indices, region_masks
    from brats_cnn.inference.postprocess import component_sizes

    components, sizes = component_sizes(classes != 0, 1)
    predicted = region_masks(from_class_indices(classes, convention), convention)
    reference = region_masks(from_class_indices(truth, convention), convention)
    tables = {}
    for region in REGIONS:
        tp = np.bincount(components[predicted[region] & reference[region]], minlength=sizes.size)
        positive = np.bincount(components[predicted[region]], minlength=sizes.size)
        tables[region] = (tp, positive, int(np.count_nonzero(reference[region])))
    return sizes, tables


def rule_scores(sizes: np.ndarray, tables: dict[str, tuple], rule: "Rule") -> dict[str, float]:
    """Dice and sensitivity of complete/core/enhancing after the rule's post-processing (from :func:`_counts`)."""
    from brats_cnn.config import PostprocessConfig
    from brats_cnn.evaluation.metrics import dice_from_counts, sensitivity_from_counts
    from brats_cnn.inference.postprocess import kept_components

    config = PostprocessConfig(min_component_voxels=rule.t_vol, keep_largest=rule.keep_largest,
                               never_empty=rule.never_empty, require_core=rule.require_core)
    keep, _ = kept_components(sizes, config, tables["core"][1])  # predicted core voxels per component
    keep[0] = False  # id 0 is outside the tumour: no predicted voxel there
    scores = {}
    for region, (tp, positive, reference) in tables.items():
        kept_tp, kept_positive = int(tp[keep].sum()), int(positive[keep].sum())
        scores[f"dice_{region}"] = dice_from_counts(kept_tp, kept_positive - kept_tp, reference - kept_tp)
        scores[f"sens_{region}"] = sensitivity_from_counts(kept_tp, kept_positive - kept_tp, reference - kept_tp)
    return scores


def score_case(case: dict, convention: str, rules: list["Rule"]) -> dict["Rule", dict[str, float]]:
    """Scores of one case under every rule. ``case`` holds ``truth`` (class indices), ``frequencies``
    (its fold model's training class frequencies) and ``plain`` / ``tta`` probabilities ``(C, X, Y, Z)``."""
    tables = case_tables(case, convention)
    return {rule: rule_scores(*tables[(rule.tta, rule.alpha, rule.edema_boost)], rule) for rule in rules}


def summarise(per_case: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean, median and worst of each score over cases, and the cases with complete Dice < 0.5."""
    keys = next(iter(per_case.values())).keys()
    out: dict[str, float] = {}
    for key in keys:
        values = np.array([scores[key] for scores in per_case.values()])
        out[f"mean_{key}"], out[f"median_{key}"], out[f"worst_{key}"] = (
            float(values.mean()), float(np.median(values)), float(values.min()))
    out["mean_dice"] = float(np.mean([out[f"mean_dice_{r}"] for r in ("complete", "core", "enhancing")]))
    out["cases_complete_below_0.5"] = int(sum(s["dice_complete"] < 0.5 for s in per_case.values()))
    return out


def grid_rules(t_vols: tuple[int, ...]) -> list[Rule]:
    """Every rule of the grid (1,152 with :data:`T_VOLS`; ``require_core`` joined it on 2026-12-07, so
    grids written before hold the 576 rules without it)."""
    return [Rule(tta, alpha, boost, t_vol, keep_largest, never_empty, require_core)
            for tta in (False, True) for alpha in ALPHAS for boost in EDEMA_BOOSTS for t_vol in t_vols
            for keep_largest in (False, True) for never_empty in (False, True) for require_core in (False, True)]


def _crop(case: dict) -> dict:
    """The arrays cut to the box of the brain and the reference tumour (outside, every rule says background)."""
    inside = (case["plain"][0] < 1) | (case["tta"][0] < 1) | (case["truth"] > 0)
    box = tuple(slice(int(np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != d)))[0]),
                      int(np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != d)))[-1]) + 1)
                for d in range(3))
    return {**case, "truth": case["truth"][box], "plain": case["plain"][(slice(None), *box)],
            "tta": case["tta"][(slice(None), *box)]}


def _load_oof_case(ref, out: Path, convention: str, ensemble: tuple[Path, ...] = ()) -> dict:
    """A held-out case's reference, probabilities (plain and TTA) and its fold model's class frequencies.

    ``ensemble``: further cross-validations (their ``--out``, the same split) whose fold models are
    averaged with ``out``'s: the mean of their probabilities and of their class frequencies, as
    nnU-Net scores an ensemble of configurations on their out-of-fold predictions.
    """
    import nibabel as nib

    from brats_cnn.data.io import load_case
    from brats_cnn.data.labels import to_class_indices
    from brats_cnn.network.checkpoint import load_checkpoint
    from brats_cnn.inference.members import prior_frequencies

    case: dict = {"truth": to_class_indices(load_case(ref, load_label=True).label, convention)}
    members = (out, *ensemble)
    for name in ("plain", "tta"):
        total = None
        for member in members:
            path = member / "oof" / name / f"{ref.case_id}_probabilities.nii.gz"
            if not path.is_file():
                raise SystemExit(f"{path}: no out-of-fold probabilities for {ref.case_id} (run the 'run' step first)")
            probabilities = np.moveaxis(np.asarray(nib.load(path).dataobj, dtype=np.float32), -1, 0)
            total = probabilities if total is None else total + probabilities
        case[name] = total / len(members)
    frequencies = []
    for member in members:
        model = Path(json.loads((member / "oof" / "plain" / f"{ref.case_id}.json").read_text())["model"])
        frequencies.append(np.asarray(prior_frequencies(load_checkpoint(model), model), dtype=np.float64))
    case["frequencies"] = np.mean(frequencies, axis=0)
    return case


def held_hgg_refs(data: Path, split: Path, folds: list[int]) -> list:
    """The HGG cases the given folds hold out, as ``CaseRef`` s of ``data`` sorted by case id (the probes' cases)."""
    from brats_cnn.data.layouts import list_cases

    fold_cases = json.loads(Path(split).read_text())["folds"]
    held = {case for fold in folds for case in fold_cases[fold]["hgg"]}
    return sorted((r for r in list_cases(data) if r.case_id in held), key=lambda r: r.case_id)


def _key_name(key: tuple) -> str:
    tta, alpha, boost = key
    return f"tta={int(tta)}_alpha={alpha:g}_boost={boost:g}"


def case_tables(case: dict, convention: str) -> dict[tuple, tuple]:
    """:func:`_counts` of one case for every (TTA, alpha, edema boost) of the grid."""
    from brats_cnn.data.labels import classify, get_convention

    edema = get_convention(convention).tissues.index("edema")
    tables = {}
    for key in ((tta, alpha, boost) for tta in (False, True) for alpha in ALPHAS for boost in EDEMA_BOOSTS):
        probabilities = case["tta" if key[0] else "plain"]
        classes = classify(corrected(probabilities, case["frequencies"], key[1], key[2], edema), convention)
        tables[key] = _counts(classes, case["truth"], convention)
    return tables


def save_tables(path: Path, tables: dict[tuple, tuple], frequencies: np.ndarray) -> None:
    """The per-component count tables of a case, compressed (kB, not the GB of its probabilities): what
    the grid needs, small enough to commit so that a later session chooses rules without the folds."""
    arrays = {"frequencies": np.asarray(frequencies, dtype=np.float64)}
    for key, (sizes, regions) in tables.items():
        name = _key_name(key)
        arrays[f"{name}/sizes"] = sizes.astype(np.int64)
        for region, (tp, positive, reference) in regions.items():
            arrays[f"{name}/{region}/tp"] = tp.astype(np.int64)
            arrays[f"{name}/{region}/positive"] = positive.astype(np.int64)
            arrays[f"{name}/{region}/reference"] = np.int64(reference)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def load_tables(path: Path) -> dict[tuple, tuple]:
    from brats_cnn.data.labels import REGIONS

    with np.load(path) as arrays:
        tables = {}
        for key in ((tta, alpha, boost) for tta in (False, True) for alpha in ALPHAS for boost in EDEMA_BOOSTS):
            name = _key_name(key)
            regions = {r: (arrays[f"{name}/{r}/tp"], arrays[f"{name}/{r}/positive"],
                           int(arrays[f"{name}/{r}/reference"])) for r in REGIONS}
            tables[key] = (arrays[f"{name}/sizes"], regions)
    return tables


def write_tables(data: Path, folds: list[dict], fold: int, out: Path, tables: Path,
                 ensemble: tuple[Path, ...] = ()) -> None:
    """The count tables of a fold's held-out cases from their saved probabilities (skips existing ones);
    with ``ensemble``, of the mean of ``out``'s and those cross-validations' probabilities."""
    from brats_cnn.data.layouts import list_cases

    held = set(folds[fold]["hgg"]) | set(folds[fold]["lgg"])
    for ref in (r for r in list_cases(data) if r.case_id in held):
        path = tables / f"{ref.case_id}.npz"
        if path.is_file():
            continue
        case = _crop(_load_oof_case(ref, out, "brats2017", ensemble))
        save_tables(path, case_tables(case, "brats2017"), case["frequencies"])
        print(f"fold {fold}: tables of {ref.case_id} written ({path.stat().st_size / 1e3:.0f} kB)", flush=True)


def tables_step(args: argparse.Namespace) -> int:
    folds = json.loads(args.split.read_text())["folds"]
    if args.ensemble and args.tables is None:
        raise SystemExit("--ensemble needs --tables: the ensemble's tables are not --out's")
    for fold in args.fold if args.fold is not None else range(len(folds)):
        write_tables(args.data, folds, fold, args.out, args.tables or args.out / "tables", tuple(args.ensemble or ()))
    return 0


def _grades_with_tables(split: Path, tables: Path) -> dict[str, str]:
    """Every out-of-fold case's grade (``hgg`` / ``lgg``); exits naming the cases without count tables."""
    folds = json.loads(split.read_text())["folds"]
    grades = {case: grade for fold in folds for grade in ("hgg", "lgg") for case in fold[grade]}
    missing = sorted(c for c in grades if not (tables / f"{c}.npz").is_file())
    if missing:
        raise SystemExit(f"{tables}: no count tables for {len(missing)} case(s) ({', '.join(missing[:3])}...); "
                         "run the 'run' step (or 'tables' where the probabilities exist) first")
    return grades


def score_grid(tables: Path, cases: list[str], rules: list[Rule]) -> dict[Rule, dict[str, dict[str, float]]]:
    """Every rule's scores on every case, from the cases' count tables."""
    per_rule: dict[Rule, dict[str, dict[str, float]]] = {rule: {} for rule in rules}
    for case_id in cases:
        counts = load_tables(tables / f"{case_id}.npz")
        for rule in rules:
            per_rule[rule][case_id] = rule_scores(*counts[(rule.tta, rule.alpha, rule.edema_boost)], rule)
    return per_rule


def mean_of_regions(scores: dict[str, float]) -> float:
    return float(np.mean([scores[f"dice_{r}"] for r in ("complete", "core", "enhancing")]))


def oracle(per_rule: dict[Rule, dict[str, dict[str, float]]], cases: list[str],
           target=mean_of_regions) -> dict[str, tuple[Rule, dict[str, float]]]:
    """Per case, the rule that scores best on ``target`` *knowing the reference*, and its scores: the
    ceiling of every decision rule over these probabilities (no fixed rule can beat it on any case)."""
    return {case: max(((rule, scores[case]) for rule, scores in per_rule.items()), key=lambda rs: target(rs[1]))
            for case in cases}


def headroom(args: argparse.Namespace) -> int:
    """How far the chosen fixed rule is from the per-case oracle: whether a decision can still reach a target."""
    tables = args.tables or args.out / "tables"
    grades = _grades_with_tables(args.split, tables)
    cases = [c for c in grades if args.population in ("all", grades[c])]
    chosen = json.loads((args.out / "grid.json").read_text())[args.population]
    per_rule = score_grid(tables, cases, grid_rules(T_VOLS))
    targets = {"mean_of_regions": mean_of_regions, "dice_complete": lambda s: s["dice_complete"]}
    report = {"population": args.population, "cases": len(cases),
              "chosen": {"rule": chosen["rule"], **summarise(chosen["per_case"])}}
    for name, target in targets.items():
        best = oracle(per_rule, cases, target)
        report[f"oracle_{name}"] = {**summarise({c: s for c, (_, s) in best.items()}),
                                    "rules": {c: r.name() for c, (r, _) in best.items()},
                                    "per_case": {c: scores for c, (_, scores) in best.items()}}
    (args.out / f"headroom_{args.population}.json").write_text(json.dumps(report, indent=2) + "\n")
    for name in ("chosen", *(f"oracle_{t}" for t in targets)):
        s = report[name]
        print(f"{name}: mean {s['mean_dice_complete']:.3f} / {s['mean_dice_core']:.3f} / {s['mean_dice_enhancing']:.3f}, "
              f"complete sensitivity {s['mean_sens_complete']:.3f}, worst complete {s['worst_dice_complete']:.3f}, "
              f"{s['cases_complete_below_0.5']} case(s) < 0.5")
    return 0


def grid(args: argparse.Namespace) -> int:
    tables = args.tables or args.out / "tables"
    grades = _grades_with_tables(args.split, tables)
    rules = grid_rules(T_VOLS)
    per_rule = score_grid(tables, list(grades), rules)
    rows, summary = [], {}
    for population in ("hgg", "lgg", "all"):
        members = [c for c in grades if population in ("all", grades[c])]
        if not members:
            continue
        for rule in rules:
            rows.append({"population": population, "rule": rule.name(),
                         **summarise({c: per_rule[rule][c] for c in members})})
        best = choose(rows, population)
        rule = next(r for r in rules if r.name() == best["rule"])
        summary[population] = {"rule": best["rule"], "summary": best,
                               "per_case": {c: per_rule[rule][c] for c in members}}
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "grid.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "grid.json").write_text(json.dumps(summary, indent=2) + "\n")
    for population, chosen in summary.items():
        s = chosen["summary"]
        print(f"{population}: {chosen['rule']}: mean {s['mean_dice_complete']:.3f} / {s['mean_dice_core']:.3f} / "
              f"{s['mean_dice_enhancing']:.3f}, worst complete {s['worst_dice_complete']:.3f}, "
              f"{s['cases_complete_below_0.5']} case(s) < 0.5")
    return 0


NOISE = 0.005  # mean Dice differences below this are within noise: the better worst case decides


def choose(rows: list[dict], population: str) -> dict:
    """The rule with the fewest cases under complete Dice 0.5, then the best mean Dice over the regions;
    among rules within :data:`NOISE` of that mean, the one with the best worst-case complete Dice."""
    candidates = [r for r in rows if r["population"] == population]
    fewest = min(r["cases_complete_below_0.5"] for r in candidates)
    candidates = [r for r in candidates if r["cases_complete_below_0.5"] == fewest]
    top = max(r["mean_dice"] for r in candidates)
    near = [r for r in candidates if r["mean_dice"] >= top - NOISE]
    return max(near, key=lambda r: (r["worst_dice_complete"], r["mean_dice"]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("split")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--exclude-split", type=Path, action="append", help="a split whose HGG test cases stay out")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("run")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", type=Path, required=True)
    p.add_argument("--config", type=Path, help="the fold models' training config (not with --models-from)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--fold", type=int, nargs="+", action="extend",
                   help="only these folds (default: all, in order); repeatable: --fold 0 1 or --fold 0 --fold 1")
    p.add_argument("--device", default="auto")
    p.add_argument("--set", action="append", help="a train --set (a tiny schedule for a trial run)")
    p.add_argument("--tables", type=Path, help="where the count tables go (default: <out>/tables)")
    p.add_argument("--init-from", type=Path, help="an earlier cross-validation's --out: each fold starts from "
                                                  "that fold's last.pt (a second training phase)")
    p.add_argument("--train-grades", nargs="+", choices=("hgg", "lgg"), default=["hgg"],
                   help="whose cases of the other folds each fold model trains on (default: hgg; 'hgg lgg': "
                        "the LGG cases join the HGG network's training data, one network for both grades)")
    p.add_argument("--models-from", type=Path, help="an earlier cross-validation's --out: segment with its finished "
                                                    "fold models, no training (a test-time lever)")
    p.add_argument("--segment-set", action="append", help="a segment --set for the out-of-fold predictions "
                                                          "(e.g. segment.views=[axial,coronal,sagittal])")
    p = sub.add_parser("tables")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--fold", type=int, nargs="+", action="extend", help="only these folds (repeatable)")
    p.add_argument("--tables", type=Path)
    p.add_argument("--ensemble", type=Path, nargs="+", help="further cross-validations' --out (same split): the "
                                                            "tables of the mean of their probabilities and --out's")
    p = sub.add_parser("grid")
    p.add_argument("--split", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tables", type=Path)
    p = sub.add_parser("headroom", help="the chosen rule against the per-case oracle (grid first)")
    p.add_argument("--split", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="the grid's --out (holds grid.json)")
    p.add_argument("--tables", type=Path)
    p.add_argument("--population", default="hgg", choices=("hgg", "lgg", "all"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.action == "run" and (args.config is None) == (args.models_from is None):
        parser.error("run needs --config (train the fold models) or --models-from (use finished ones), not both")
    return {"split": split, "run": run, "tables": tables_step, "grid": grid, "headroom": headroom}[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
