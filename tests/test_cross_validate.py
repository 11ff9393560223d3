"""pipelines/cross_validate.py: the folds, the whole pipeline on phantoms at a tiny schedule, and the
decision grid's scores against post-processing each rule for real."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("cross_validate", REPO / "pipelines" / "cross_validate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["cross_validate"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_folds_are_stratified_disjoint_and_fixed_by_the_seed():
    cv = _module()
    hgg = [f"H{i:02d}" for i in range(20)]
    lgg = ["L0", "L1", "L2"]
    folds = cv.make_folds(hgg, lgg, 4)
    assert [len(f["hgg"]) for f in folds] == [5, 5, 5, 5]
    assert sorted(len(f["lgg"]) for f in folds) == [0, 1, 1, 1]
    everything = [c for f in folds for g in ("hgg", "lgg") for c in f[g]]
    assert sorted(everything) == sorted(hgg + lgg)  # each case in exactly one fold
    assert cv.make_folds(hgg, lgg, 4) == folds and cv.make_folds(hgg, lgg, 4, seed=1) != folds


def test_fold_is_repeatable_and_takes_several_values():
    """``--fold 2 --fold 3`` once ran only fold 3 (the last flag replaced the first): both spellings
    must select both folds."""
    parser = _module().build_parser()
    common = ["--data", "d", "--split", "s", "--out", "o", "--config", "c"]
    assert parser.parse_args(["run", *common, "--fold", "2", "--fold", "3"]).fold == [2, 3]
    assert parser.parse_args(["run", *common, "--fold", "2", "3"]).fold == [2, 3]
    assert parser.parse_args(["run", *common]).fold is None
    assert parser.parse_args(["tables", "--data", "d", "--split", "s", "--out", "o", "--fold", "0", "--fold", "1"]).fold == [0, 1]


def test_rule_scores_from_component_tables_equal_post_processing_each_rule():
    from scipy import ndimage

    from brats_cnn.config import PostprocessConfig
    from brats_cnn.data.labels import classify
    from brats_cnn.inference.postprocess import core_of, postprocess_labels

    cv = _module()
    rng = np.random.default_rng(0)
    shape = (24, 22, 10)
    truth = np.zeros(shape, dtype=np.int64)
    truth[4:14, 5:15, 2:8] = 2
    truth[7:11, 8:12, 3:7] = 3
    truth[8:10, 9:11, 4:6] = 1
    # a far edema-only satellite, called edema only and set apart by a sure-background shell: what
    # require_core removes
    satellite = np.zeros(shape, dtype=bool)
    satellite[18:23, 15:21, 1:4] = True
    truth[satellite] = 2
    logits = rng.normal(size=(4, *shape)) + 3.0 * np.eye(4)[truth].transpose(3, 0, 1, 2)
    logits[:, satellite] = np.array([-5.0, -5.0, 5.0, -5.0])[:, None]
    logits[:, ndimage.binary_dilation(satellite) & ~satellite] = np.array([5.0, -5.0, -5.0, -5.0])[:, None]
    probabilities = np.exp(logits) / np.exp(logits).sum(0)
    case = {"truth": truth, "frequencies": np.array([0.9, 0.02, 0.05, 0.03]),
            "plain": probabilities.astype(np.float32), "tta": probabilities[:, ::-1].copy().astype(np.float32)}
    rules = [cv.Rule(tta, alpha, boost, t_vol, keep, never, core) for tta in (False, True) for alpha in (0.0, 0.6)
             for boost in (1.0, 2.0) for t_vol in (0, 3, 40, 10_000) for keep in (False, True) for never in (False, True)
             for core in (False, True)]
    scores = cv.score_case(case, "brats2017", rules)
    for rule in rules:
        chosen = case["tta" if rule.tta else "plain"]
        classes = classify(cv.corrected(chosen, case["frequencies"], rule.alpha, rule.edema_boost, 2), "brats2017")
        kept = postprocess_labels(classes, PostprocessConfig(min_component_voxels=rule.t_vol,
                                                             keep_largest=rule.keep_largest,
                                                             never_empty=rule.never_empty,
                                                             require_core=rule.require_core),
                                  core_of(classes, "brats2017"))
        from brats_cnn.data.labels import from_class_indices, region_masks
        from brats_cnn.evaluation.metrics import dice, sensitivity

        predicted = region_masks(from_class_indices(kept, "brats2017"), "brats2017")
        reference = region_masks(from_class_indices(truth, "brats2017"), "brats2017")
        for region in ("complete", "core", "enhancing"):
            assert scores[rule][f"dice_{region}"] == pytest.approx(dice(reference[region], predicted[region]))
            assert scores[rule][f"sens_{region}"] == pytest.approx(sensitivity(reference[region], predicted[region]))
    # the strict paper rule at t_vol 10,000 empties this small case; never_empty keeps its largest component
    strict = scores[cv.Rule(False, 0.0, 1.0, 10_000, False, False)]
    rescued = scores[cv.Rule(False, 0.0, 1.0, 10_000, False, True)]
    assert strict["dice_complete"] == 0.0 and rescued["dice_complete"] > 0.5
    # the edema-only satellite is called and kept at t_vol 40, and removed with require_core: complete
    # sensitivity falls by its share, the core is untouched
    kept = scores[cv.Rule(False, 0.0, 1.0, 40, False, True)]
    coreless = scores[cv.Rule(False, 0.0, 1.0, 40, False, True, True)]
    assert coreless["sens_complete"] < kept["sens_complete"] - 0.1
    assert coreless["dice_core"] == kept["dice_core"] and coreless["dice_enhancing"] == kept["dice_enhancing"]


def test_choose_prefers_fewer_failures_then_the_better_worst_case_within_noise():
    cv = _module()
    rows = [{"population": "hgg", "rule": "a", "mean_dice": 0.85, "worst_dice_complete": 0.30, "cases_complete_below_0.5": 1},
            {"population": "hgg", "rule": "b", "mean_dice": 0.80, "worst_dice_complete": 0.55, "cases_complete_below_0.5": 0},
            {"population": "hgg", "rule": "c", "mean_dice": 0.797, "worst_dice_complete": 0.62, "cases_complete_below_0.5": 0},
            {"population": "hgg", "rule": "d", "mean_dice": 0.70, "worst_dice_complete": 0.90, "cases_complete_below_0.5": 0},
            {"population": "lgg", "rule": "e", "mean_dice": 0.99, "worst_dice_complete": 0.99, "cases_complete_below_0.5": 0}]
    assert cv.choose(rows, "hgg")["rule"] == "c"  # b and c within 0.005: the better worst case; d is too far below


def test_the_whole_pipeline_on_phantoms_resumes_and_chooses_a_rule(tmp_path):
    from brats_cnn.data.phantom import write_phantom_dataset

    cv = _module()
    data = tmp_path / "data"
    write_phantom_dataset(data, 5, seed=11, shape=(40, 40, 8), grades=["HGG", "HGG", "HGG", "HGG", "LGG"])
    split = tmp_path / "split.json"
    assert cv.main(["split", "--data", str(data), "--k", "2", "--out", str(split)]) == 0
    folds = json.loads(split.read_text())["folds"]
    assert [len(f["hgg"]) for f in folds] == [2, 2] and sum(len(f["lgg"]) for f in folds) == 1
    tiny = ["train.epochs=1", "sampling.total_patches=256", "preprocess.n4.sequences=[]", "train.batch_size=64",
            "data.validation_cases=0", "postprocess.min_component_voxels=10"]
    args = ["run", "--data", str(data), "--split", str(split), "--config", str(REPO / "configs" / "smoke.yaml"),
            "--out", str(tmp_path / "cv"), "--device", "cpu", *[a for s in tiny for a in ("--set", s)]]
    assert cv.main(args) == 0
    for fold in (0, 1):
        assert (tmp_path / "cv" / f"fold{fold}" / "run" / "done.json").is_file()
    for name in ("plain", "tta"):
        saved = sorted(p.name for p in (tmp_path / "cv" / "oof" / name).glob("*_probabilities.nii.gz"))
        assert len(saved) == 5
    sidecar = json.loads((tmp_path / "cv" / "oof" / "tta" / "Phantom_011.json").read_text())
    assert sidecar["tta_rotations"] == [0, 90, 180, 270] and sidecar["prior_alpha"] == 0
    assert sidecar["postprocess"]["enabled"] is False
    before = (tmp_path / "cv" / "oof" / "plain" / "Phantom_011.json").stat().st_mtime_ns
    assert cv.main(args) == 0  # a rerun trains and predicts nothing again
    assert (tmp_path / "cv" / "oof" / "plain" / "Phantom_011.json").stat().st_mtime_ns == before
    assert len(list((tmp_path / "cv" / "tables").glob("*.npz"))) == 5
    # a second phase (--init-from): each fold starts from the same fold's model of the first run
    phase = ["run", "--data", str(data), "--split", str(split), "--config", str(REPO / "configs" / "smoke.yaml"),
             "--out", str(tmp_path / "cv2"), "--device", "cpu",
             *[a for s in tiny + ["sampling.centres=natural", "train.trainable=output"] for a in ("--set", s)]]
    assert cv.main([*phase, "--fold", "0", "--init-from", str(tmp_path / "cv")]) == 0
    second = (tmp_path / "cv2" / "fold0" / "run" / "config.yaml").read_text()
    assert f"init_weights: {tmp_path / 'cv' / 'fold0' / 'run' / 'last.pt'}" in second
    assert "trainable: output" in second and "centres: natural" in second
    held = folds[0]["hgg"] + folds[0]["lgg"]
    assert sorted(p.stem for p in (tmp_path / "cv2" / "tables").glob("*.npz")) == sorted(held)
    with pytest.raises(SystemExit, match="fold 1 of --init-from has not finished"):
        cv.main([*phase, "--fold", "1", "--init-from", str(tmp_path / "cv2")])
    # one network for both grades (--train-grades hgg lgg): the other fold's LGG case joins the training data
    lgg_fold = next(i for i, f in enumerate(folds) if f["lgg"])
    other = 1 - lgg_fold
    mixed = ["run", "--data", str(data), "--split", str(split), "--config", str(REPO / "configs" / "smoke.yaml"),
             "--out", str(tmp_path / "cv_mixed"), "--device", "cpu", "--fold", str(other),
             *[a for s in tiny for a in ("--set", s)]]
    assert cv.main([*mixed, "--train-grades", "hgg", "lgg"]) == 0
    trained = json.loads((tmp_path / "cv_mixed" / f"fold{other}" / "run" / "done.json").read_text())["train"]
    assert trained == sorted(folds[lgg_fold]["hgg"] + folds[lgg_fold]["lgg"])
    assert json.loads((tmp_path / "cv" / f"fold{other}" / "run" / "done.json").read_text())["train"] == sorted(
        folds[lgg_fold]["hgg"])  # the default (--train-grades hgg): the LGG case stays out
    (tmp_path / "cv_mixed" / f"fold{other}" / "run" / "done.json").unlink()
    shutil.rmtree(tmp_path / "cv_mixed" / "tables")
    with pytest.raises(SystemExit, match=f"fold {other} was started on other training cases \\({folds[lgg_fold]['lgg'][0]} differ"):
        cv.main(mixed)  # resuming it with the default --train-grades would change its data
    # a test-time lever on the same fold models (--models-from): no training, segment's --set applied
    views = ["run", "--data", str(data), "--split", str(split), "--out", str(tmp_path / "cv3"), "--device", "cpu",
             "--fold", "0", "--models-from", str(tmp_path / "cv"), "--segment-set", "segment.views=[axial,coronal]"]
    assert cv.main(views) == 0
    assert not (tmp_path / "cv3" / "fold0").exists()
    sidecar = json.loads((tmp_path / "cv3" / "oof" / "tta" / f"{held[0]}.json").read_text())
    assert sidecar["views"] == ["axial", "coronal"] and sidecar["tta_rotations"] == [0, 90, 180, 270]
    assert sidecar["model"] == str(tmp_path / "cv" / "fold0" / "run" / "last.pt")
    assert sorted(p.stem for p in (tmp_path / "cv3" / "tables").glob("*.npz")) == sorted(held)
    with pytest.raises(SystemExit, match="fold 1 of --models-from has not finished"):
        cv.main([*views[:-6], "--fold", "1", "--models-from", str(tmp_path / "cv2")])
    with pytest.raises(SystemExit):  # --config and --models-from exclude each other
        cv.main([*views, "--config", str(REPO / "configs" / "smoke.yaml")])
    # the grid from the committed tables equals scoring the saved probabilities directly
    from brats_cnn.data.layouts import list_cases

    ref = next(r for r in list_cases(data) if r.case_id == "Phantom_011")
    direct = cv.score_case(cv._crop(cv._load_oof_case(ref, tmp_path / "cv", "brats2017")), "brats2017",
                           cv.grid_rules(cv.T_VOLS))
    tables = cv.load_tables(tmp_path / "cv" / "tables" / "Phantom_011.npz")
    for rule, scores in direct.items():
        assert cv.rule_scores(*tables[(rule.tta, rule.alpha, rule.edema_boost)], rule) == scores
    # an ensemble of two cross-validations (fold 0 of cv and cv2): the tables of their mean probabilities
    ens_ref = next(r for r in list_cases(data) if r.case_id == held[0])
    one, two = (cv._load_oof_case(ens_ref, tmp_path / name, "brats2017") for name in ("cv", "cv2"))
    mean = cv._load_oof_case(ens_ref, tmp_path / "cv", "brats2017", (tmp_path / "cv2",))
    for name in ("plain", "tta"):
        assert not np.array_equal(one[name], two[name])
        np.testing.assert_array_equal(mean[name], (one[name] + two[name]) / 2)
    np.testing.assert_array_equal(mean["frequencies"], (one["frequencies"] + two["frequencies"]) / 2)
    ensemble = ["tables", "--data", str(data), "--split", str(split), "--out", str(tmp_path / "cv"), "--fold", "0",
                "--ensemble", str(tmp_path / "cv2")]
    with pytest.raises(SystemExit, match="--ensemble needs --tables"):
        cv.main(ensemble)
    assert cv.main([*ensemble, "--tables", str(tmp_path / "ens")]) == 0
    assert sorted(p.stem for p in (tmp_path / "ens").glob("*.npz")) == sorted(held)
    expected = cv.case_tables(cv._crop(mean), "brats2017")
    saved = cv.load_tables(tmp_path / "ens" / f"{held[0]}.npz")
    for key, (sizes, regions) in expected.items():
        np.testing.assert_array_equal(saved[key][0], sizes)
        for region, (tp, positive, reference) in regions.items():
            np.testing.assert_array_equal(saved[key][1][region][0], tp)
            assert saved[key][1][region][2] == reference
    # a fresh checkout holds only the tables: run does nothing, grid works without the probabilities
    shutil.move(tmp_path / "cv" / "tables", tmp_path / "tables")
    shutil.rmtree(tmp_path / "cv")
    assert cv.main([*args, "--tables", str(tmp_path / "tables")]) == 0
    assert not (tmp_path / "cv" / "fold0").exists()
    assert cv.main(["grid", "--split", str(split), "--out", str(tmp_path / "cv"),
                    "--tables", str(tmp_path / "tables")]) == 0
    chosen = json.loads((tmp_path / "cv" / "grid.json").read_text())
    assert set(chosen) == {"hgg", "lgg", "all"} and len(chosen["hgg"]["per_case"]) == 4
    rows = (tmp_path / "cv" / "grid.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * len(cv.grid_rules(cv.T_VOLS))
    assert cv.main(["headroom", "--split", str(split), "--out", str(tmp_path / "cv"),
                    "--tables", str(tmp_path / "tables")]) == 0
    headroom = json.loads((tmp_path / "cv" / "headroom_hgg.json").read_text())
    assert headroom["cases"] == 4 and headroom["chosen"]["rule"] == chosen["hgg"]["rule"]
    assert headroom["chosen"]["mean_dice"] == pytest.approx(chosen["hgg"]["summary"]["mean_dice"])
    assert headroom["oracle_mean_of_regions"]["mean_dice"] >= headroom["chosen"]["mean_dice"] - 1e-12
    assert (headroom["oracle_dice_complete"]["mean_dice_complete"]
            >= headroom["oracle_mean_of_regions"]["mean_dice_complete"] - 1e-12)


def test_pooled_choice_across_levers_follows_the_pre_registered_rule():
    spec = importlib.util.spec_from_file_location("cv_compare", REPO / "pipelines" / "cv_compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)

    def row(rule, mean, worst, failures):
        return {"population": "hgg", "rule": rule, "mean_dice": str(mean), "worst_dice_complete": str(worst),
                "cases_complete_below_0.5": str(failures)}

    base = [row("a", 0.800, 0.60, 0), row("b", 0.790, 0.65, 0)]
    assert compare.pooled_choice({"base": base, "lever": [row("c", 0.803, 0.55, 0)]}, "hgg")["lever"] == "base"
    chosen = compare.pooled_choice({"base": base, "lever": [row("c", 0.810, 0.55, 0)]}, "hgg")
    assert (chosen["lever"], chosen["rule"]) == ("lever", "c")
    assert compare.pooled_choice({"base": base, "lever": [row("c", 0.900, 0.45, 1)]}, "hgg")["rule"] == "a"


def test_the_oracle_picks_each_cases_best_rule_knowing_the_reference():
    cv = _module()
    a, b = cv.Rule(False, 0.0, 1.0, 0, False, False), cv.Rule(True, 0.6, 1.0, 0, True, False)

    def scores(complete, core, enhancing):
        return {"dice_complete": complete, "dice_core": core, "dice_enhancing": enhancing}

    per_rule = {a: {"x": scores(0.9, 0.3, 0.3), "y": scores(0.5, 0.5, 0.5)},
                b: {"x": scores(0.6, 0.6, 0.6), "y": scores(0.7, 0.8, 0.9)}}
    best = cv.oracle(per_rule, ["x", "y"])
    assert {case: rule for case, (rule, _) in best.items()} == {"x": b, "y": b}
    best = cv.oracle(per_rule, ["x", "y"], target=lambda s: s["dice_complete"])
    assert {case: rule for case, (rule, _) in best.items()} == {"x": a, "y": b}
    assert np.mean([s["dice_complete"] for _, s in best.values()]) == pytest.approx(0.8)
    assert cv.mean_of_regions(scores(0.9, 0.6, 0.3)) == pytest.approx(0.6)
