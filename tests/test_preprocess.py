"""Tests for brats_cnn.preprocessing.preprocess: the cache format, skipping, refitting and the CLI command."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from brats_cnn.cli import main
from brats_cnn.config import load_config
from brats_cnn.errors import InputError
from brats_cnn.data.layouts import find_case, list_cases
from brats_cnn.data.io import load_case, load_label_map, save_case
from brats_cnn.data.labels import to_class_indices
from brats_cnn.preprocessing.normalise import load_normaliser, normalise_case
from brats_cnn.data.phantom import make_phantom, write_phantom_dataset
from brats_cnn.preprocessing.cache import is_cache, list_cached_cases, load_cached_case
from brats_cnn.preprocessing.preprocess import preprocess_dataset, run_preprocess

SHAPE = (32, 32, 20)
OVERRIDES = ["preprocess.n4.shrink_factor=2", "preprocess.workers=1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_phantom_dataset(root, 3, shape=SHAPE, intensity_scale=None)
    return root


@pytest.fixture()
def config():
    return load_config("smoke", OVERRIDES)


@pytest.fixture(scope="module")
def fitted_cache(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache")
    run_preprocess(dataset, out, fit=True, config="smoke", overrides=OVERRIDES)
    return out


def _mtimes(cache: Path) -> dict[str, int]:
    return {p.name: (p / "meta.json").stat().st_mtime_ns for p in list_cached_cases(cache)}


def test_fit_writes_the_cache_format(dataset, fitted_cache, config):
    assert is_cache(fitted_cache)
    assert (fitted_cache / "config.yaml").is_file() and (fitted_cache / "normaliser.json").is_file()
    assert not (fitted_cache / ".work").exists()
    folders = list_cached_cases(fitted_cache)
    assert [f.name for f in folders] == ["Phantom_000", "Phantom_001", "Phantom_002"]
    state = load_normaliser(fitted_cache / "normaliser.json")
    assert state.n_cases == 3 and state.n4_shrink_factor == 2

    cached = load_cached_case(folders[0])
    x, y, z = SHAPE
    assert isinstance(cached.image, np.memmap) and cached.image.shape == (z, 4, x, y)
    assert cached.image.dtype == np.float16
    assert cached.mask.dtype == bool and cached.mask.shape == (z, x, y)
    assert cached.label.dtype == np.uint8 and cached.label.shape == (z, x, y)
    assert cached.meta["shape"] == list(SHAPE) and cached.meta["grade"] == "HGG"
    assert cached.meta["label_convention"] == "brats2017" and cached.meta["channel_order"] == list(state.channel_order)

    case = load_case(list_cases(dataset)[0])
    np.testing.assert_array_equal(cached.label, to_class_indices(case.label, "brats2017").transpose(2, 0, 1))
    expected, mask = normalise_case(case, state, config)
    np.testing.assert_array_equal(cached.mask, mask.transpose(2, 0, 1))
    np.testing.assert_allclose(cached.image.astype(np.float32), expected.transpose(3, 0, 1, 2), atol=1e-2)
    # the training brain voxels are standardised over the three cases together
    pooled = np.concatenate([np.asarray(load_cached_case(f).image, np.float64).transpose(1, 0, 2, 3)[
        :, np.asarray(load_cached_case(f).mask)] for f in folders], axis=1)
    np.testing.assert_allclose(pooled.mean(axis=1), 0, atol=2e-3)
    np.testing.assert_allclose(pooled.std(axis=1), 1, atol=2e-3)


def test_preprocess_runs_the_nyul_map_of_normalise(dataset, fitted_cache, tmp_path, monkeypatch):
    # one path: a change to normalise.apply_nyul changes what preprocess (and so train) writes
    from brats_cnn.preprocessing import normalise

    state = load_normaliser(fitted_cache / "normaliser.json")
    real = normalise.apply_nyul
    monkeypatch.setattr(normalise, "apply_nyul", lambda *args, **kwargs: real(*args, **kwargs) + 7.0)
    run_preprocess(dataset, tmp_path, normaliser=fitted_cache / "normaliser.json", config="smoke",
                   overrides=OVERRIDES)
    for folder in list_cached_cases(fitted_cache):
        before, after = load_cached_case(folder), load_cached_case(tmp_path / folder.name)
        for c, name in enumerate(state.channel_order):
            data = np.asarray(before.mask) & (np.asarray(before.image[:, c]) != 0)  # z-scored data voxels
            shift = np.asarray(after.image[:, c], np.float32)[data] - np.asarray(before.image[:, c], np.float32)[data]
            np.testing.assert_allclose(shift, 7.0 / state.std[name], atol=2e-2)
            np.testing.assert_array_equal(np.asarray(after.image[:, c])[~np.asarray(before.mask)], 0)


def test_rerun_skips_and_changed_config_recomputes(dataset, fitted_cache, tmp_path):
    before = _mtimes(fitted_cache)
    again = run_preprocess(dataset, fitted_cache, fit=True, config="smoke", overrides=OVERRIDES)
    assert again.written == () and len(again.skipped) == 3 and not again.fitted
    assert _mtimes(fitted_cache) == before

    # a new background value keeps the normaliser but rewrites every case
    changed = run_preprocess(dataset, fitted_cache, fit=True, config="smoke",
                             overrides=OVERRIDES + ["preprocess.background_value=-5"])
    assert not changed.fitted and len(changed.written) == 3
    cached = load_cached_case(fitted_cache / "Phantom_001")
    assert np.all(np.asarray(cached.image).transpose(1, 0, 2, 3)[:, ~np.asarray(cached.mask)] == -5)

    # new Nyul percentiles refit the normaliser
    refit = run_preprocess(dataset, fitted_cache, fit=True, config="smoke",
                           overrides=OVERRIDES + ["preprocess.nyul.pc2=98"])
    assert refit.fitted and len(refit.written) == 3 and refit.state.percentiles[-1] == 98.0


def test_changed_source_or_incomplete_case_recomputes_only_that_case(dataset, tmp_path, config):
    dataset = Path(shutil.copytree(dataset, tmp_path / "data"))
    out = tmp_path / "cache"
    preprocess_dataset(dataset, out, config=config, fit=True)
    (out / "Phantom_002" / "meta.json").unlink()  # as if interrupted before meta.json
    assert [p.name for p in list_cached_cases(out)] == ["Phantom_000", "Phantom_001"]
    with pytest.raises(InputError, match="incomplete"):
        load_cached_case(out / "Phantom_002")
    t1 = next((dataset / "Phantom_000").glob("*_t1.nii.gz"))
    t1.write_bytes(gzip.compress(gzip.decompress(t1.read_bytes()), mtime=0))  # same image, other bytes
    result = preprocess_dataset(dataset, out, config=config, fit=True)
    # the changed file changes the fit key, so the normaliser is refitted; it comes out identical,
    # so the untouched complete case keeps its cache key
    assert result.fitted
    assert result.written == ("Phantom_000", "Phantom_002") and result.skipped == ("Phantom_001",)


def test_a_copy_of_the_data_with_new_mtimes_keeps_the_cache(dataset, tmp_path, config):
    first = Path(shutil.copytree(dataset, tmp_path / "data"))
    out = tmp_path / "cache"
    preprocess_dataset(first, out, config=config, fit=True)
    copy = Path(shutil.copytree(first, tmp_path / "copy", copy_function=shutil.copyfile))  # new mtimes
    t1 = next((first / "Phantom_000").glob("*_t1.nii.gz"))
    assert next((copy / "Phantom_000").glob("*_t1.nii.gz")).stat().st_mtime_ns != t1.stat().st_mtime_ns
    again = preprocess_dataset(copy, out, config=config, fit=True)
    assert not again.fitted and again.written == () and len(again.skipped) == 3


def test_saved_normaliser_is_applied_unchanged(fitted_cache, tmp_path):
    other = tmp_path / "other_data"
    write_phantom_dataset(other, 2, seed=10, shape=SHAPE, intensity_scale=(2.0, 1.0, 0.5, 3.0))
    fitted = load_normaliser(fitted_cache / "normaliser.json")
    out = tmp_path / "applied"
    result = run_preprocess(other, out, normaliser=fitted_cache / "normaliser.json", config="smoke",
                            overrides=OVERRIDES)
    assert not result.fitted and result.state == fitted
    assert load_normaliser(out / "normaliser.json") == fitted
    assert (out / "normaliser.json").read_text() == (fitted_cache / "normaliser.json").read_text()
    assert [p.name for p in list_cached_cases(out)] == ["Phantom_010", "Phantom_011"]


def test_fit_on_a_subset_of_cases(dataset, tmp_path, config):
    result = preprocess_dataset(dataset, tmp_path / "c", config=config, fit=True,
                                fit_case_ids=["Phantom_000", "Phantom_001"])
    assert result.state.case_ids == ("Phantom_000", "Phantom_001")
    assert len(result.written) == 3
    with pytest.raises(InputError, match="not found"):
        preprocess_dataset(dataset, tmp_path / "d", config=config, fit=True, fit_case_ids=["nope"])


def test_fit_xor_normaliser_is_required(dataset, tmp_path, config):
    with pytest.raises(InputError, match="exactly one"):
        preprocess_dataset(dataset, tmp_path, config=config)
    with pytest.raises(InputError, match="exactly one"):
        preprocess_dataset(dataset, tmp_path, config=config, fit=True, normaliser=tmp_path / "n.json")


def test_cli_parallel_workers_and_error_exit(dataset, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["preprocess", "--data", str(dataset), "--out", str(out), "--fit", "--config", "smoke",
                 "--set", "preprocess.n4.shrink_factor=2", "--workers", "2"])
    assert code == 0
    assert len(list_cached_cases(out)) == 3
    summary = json.loads((out / "preprocess.json").read_text())
    assert summary["workers"] == 2 and len(summary["written"]) == 3

    code = main(["preprocess", "--data", str(dataset), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "exactly one of --fit" in err and len(err.strip().splitlines()) == 1
    code = main(["preprocess", "--data", str(dataset), "--out", str(tmp_path / "x"),
                 "--normaliser", str(tmp_path / "missing.json")])
    err = capsys.readouterr().err
    assert code == 2 and "missing.json: normaliser file not found" in err


# --- unusable cases, partial coverage, per-case work kept between runs -------------------------

def _bad_dataset(root: Path) -> Path:
    """Four phantoms: Phantom_001's T2 is truncated, Phantom_002's FLAIR covers 70 % of its brain."""
    write_phantom_dataset(root, 4, shape=SHAPE)
    save_case(make_phantom(SHAPE, seed=2, case_id="Phantom_002", no_data={"flair": 0.3}), root, "brats2017")
    t2 = root / "Phantom_001" / "Phantom_001_t2.nii.gz"
    t2.write_bytes(t2.read_bytes()[: t2.stat().st_size // 2])
    return root


@pytest.fixture()
def n4_calls(monkeypatch) -> list[str]:
    """Counts N4 runs (one per corrected sequence) in this process (workers=1)."""
    from brats_cnn.preprocessing import bias

    calls, real = [], bias.n4_correct

    def counting(volume, mask, n4, **kwargs):
        calls.append(str(kwargs.get("source")))
        return real(volume, mask, n4, **kwargs)
    monkeypatch.setattr(bias, "n4_correct", counting)
    return calls


def test_unusable_case_is_skipped_with_one_warning_and_partial_coverage_is_used(tmp_path, config, n4_calls,
                                                                                 caplog):
    data = _bad_dataset(tmp_path / "data")
    out = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="brats_cnn.preprocessing.preprocess"):
        result = preprocess_dataset(data, out, config=config, fit=True)
    t2 = data / "Phantom_001" / "Phantom_001_t2.nii.gz"
    reason = f"{t2}: file is truncated (the gzip stream ends early)"
    assert result.unusable == {"Phantom_001": reason}
    assert [r.getMessage() for r in caplog.records] == [f"skipping case Phantom_001: {reason}"]
    assert result.state.case_ids == ("Phantom_000", "Phantom_002", "Phantom_003")
    assert result.written == ("Phantom_000", "Phantom_002", "Phantom_003")
    assert [p.name for p in list_cached_cases(out)] == list(result.written)
    assert json.loads((out / "preprocess.json").read_text())["unusable"] == {"Phantom_001": reason}
    assert len(n4_calls) == 3 * 2  # T1 and T1c of the three usable cases, once each

    # the partly covered FLAIR: background where it has no data, the brain mask stays whole
    cached = load_cached_case(out / "Phantom_002")
    case = load_case(data / "Phantom_002")
    mask = cached.mask.transpose(1, 2, 0)
    gap = mask & (case.image[3] == 0)
    assert np.array_equal(mask, case.image.any(axis=0)) and gap.sum() == round(0.3 * mask.sum())
    flair = np.asarray(cached.image[:, 3], np.float32).transpose(1, 2, 0)
    assert np.all(flair[gap] == 0.0) and np.std(flair[mask & ~gap]) > 0.5
    assert cached.meta["coverage"]["flair"] == pytest.approx(0.7, abs=1e-3)
    assert cached.meta["coverage"]["t1"] == 1.0

    # a rerun changes nothing and runs no N4
    checked = (out / ".percase" / "Phantom_000" / "check.json").stat().st_mtime_ns
    again = preprocess_dataset(data, out, config=config, fit=True)
    assert again.written == () and again.skipped == ("Phantom_000", "Phantom_002", "Phantom_003")
    assert again.unusable == {"Phantom_001": reason} and n4_calls == n4_calls[:6]
    assert (out / ".percase" / "Phantom_000" / "check.json").stat().st_mtime_ns == checked

    # fixing the broken case refits: N4 and statistics run for it alone, every case is rewritten
    save_case(make_phantom(SHAPE, seed=1, case_id="Phantom_001", grade="LGG"), data, "brats2017")
    fixed = preprocess_dataset(data, out, config=config, fit=True)
    assert fixed.unusable == {} and fixed.fitted
    assert fixed.statistics_reused == ("Phantom_000", "Phantom_002", "Phantom_003")
    assert len(n4_calls) == 6 + 2 and all("Phantom_001" in call for call in n4_calls[6:])
    assert fixed.written == ("Phantom_000", "Phantom_001", "Phantom_002", "Phantom_003")
    # ... and gives what a fresh cache gives
    fresh = preprocess_dataset(data, tmp_path / "fresh", config=config, fit=True)
    assert fresh.state.case_ids == fixed.state.case_ids
    for name in fresh.state.channel_order:
        np.testing.assert_allclose(fixed.state.landmarks[name], fresh.state.landmarks[name], rtol=1e-5)
        assert fixed.state.mean[name] == pytest.approx(fresh.state.mean[name], rel=1e-5)


def test_strict_stops_before_any_n4_and_lists_every_unusable_case(tmp_path, config, n4_calls):
    data = _bad_dataset(tmp_path / "data")
    save_case(make_phantom(SHAPE, seed=3, case_id="Phantom_003", no_data={"t1c": 0.8}), data, "brats2017")
    with pytest.raises(InputError) as info:
        preprocess_dataset(data, tmp_path / "cache", config=config, fit=True, strict=True)
    t1c = data / "Phantom_003" / "Phantom_003_t1ce.nii.gz"
    assert str(info.value) == (
        f"{data}: 2 case(s) cannot be used (stopped by --strict; without it they are skipped): "
        f"Phantom_001: {data / 'Phantom_001' / 'Phantom_001_t2.nii.gz'}: file is truncated (the gzip stream "
        f"ends early); Phantom_003: {t1c}: t1c has data (non-zero) in only 20.0 % of the brain mask "
        "(preprocess.min_coverage is 50 %)")
    assert n4_calls == []


def test_cli_strict_flag_and_summary_of_skipped_cases(tmp_path, capsys, caplog):
    data = _bad_dataset(tmp_path / "data")
    common = ["preprocess", "--data", str(data), "--fit", "--config", "smoke", "--set", "preprocess.workers=1",
              "--set", "preprocess.n4.sequences=[]"]
    code = main(common + ["--out", str(tmp_path / "strict"), "--strict"])
    captured = capsys.readouterr()
    assert code == 2 and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith(f"brats-cnn: error: {data}: 1 case(s) cannot be used (stopped by --strict")
    assert not list_cached_cases(tmp_path / "strict")

    caplog.clear()
    code = main(common + ["--out", str(tmp_path / "lenient")])
    captured = capsys.readouterr()
    assert code == 0
    assert "3 case(s) preprocessed, 0 up to date, 1 skipped as unusable (Phantom_001)" in captured.out
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"skipping case Phantom_001: {data / 'Phantom_001' / 'Phantom_001_t2.nii.gz'}: "
                        "file is truncated (the gzip stream ends early)"]


@pytest.mark.slow
def test_real_case_with_a_partly_missing_flair_preprocesses_and_segments(sample_dir, tmp_path):
    """Brats18_2013_20_1: FLAIR is 0 in 34 % of the brain (it stopped preprocess before issue 13)."""
    from brats_cnn.data.labels import region_masks
    from brats_cnn.evaluation.metrics import dice

    case_dir = sample_dir / "Brats18_2013_20_1"
    out = tmp_path / "cache"
    result = preprocess_dataset([find_case(case_dir)], out, config=load_config("pereira_hgg"), fit=True)
    assert result.unusable == {} and result.written == ("Brats18_2013_20_1",)
    flair = result.state.landmarks["flair"]
    assert np.all(np.diff(flair) > 0) and flair[0] == 0.0 and flair[-1] == pytest.approx(100.0)
    cached = load_cached_case(out / "Brats18_2013_20_1")
    assert 0.6 < cached.meta["coverage"]["flair"] < 0.7 and cached.meta["coverage"]["t1"] > 0.99
    raw = load_case(case_dir, load_label=False)
    mask = np.asarray(cached.mask).transpose(1, 2, 0)
    gap = mask & (raw.image[3] == 0)
    assert np.array_equal(mask, raw.image.any(axis=0)) and gap.sum() / mask.sum() > 0.3
    image = np.asarray(cached.image, np.float32)
    assert np.all(image[:, 3].transpose(1, 2, 0)[gap] == 0.0)  # the background value where FLAIR has no data
    flair_data = image[:, 3].transpose(1, 2, 0)[mask & ~gap]
    assert abs(flair_data.mean()) < 0.01 and abs(flair_data.std() - 1) < 0.01

    segmentation = tmp_path / "seg.nii.gz"
    assert main(["segment", str(case_dir), "--grade", "hgg", "--out", str(segmentation), "--device", "cpu"]) == 0
    predicted = load_label_map(segmentation).labels
    truth = load_case(case_dir).label
    scores = {region: dice(region_masks(truth, "brats2017")[region], region_masks(predicted, "brats2017")[region])
              for region in ("complete", "core", "enhancing")}
    # measured with the bundled HGG model (not trained on this case): complete 0.80, core 0.68, enhancing 0.75
    assert scores["complete"] > 0.7 and scores["enhancing"] > 0.5, scores
