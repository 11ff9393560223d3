"""Tests for brats_cnn.preprocess: the cache format, skipping, refitting and the CLI command."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from brats_cnn.cli import main
from brats_cnn.config import load_config
from brats_cnn.errors import InputError
from brats_cnn.io import list_cases, load_case
from brats_cnn.labels import to_class_indices
from brats_cnn.normalise import load_normaliser, normalise_case
from brats_cnn.phantom import write_phantom_dataset
from brats_cnn.preprocess import (
    is_cache, list_cached_cases, load_cached_case, preprocess_dataset, run_preprocess)

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
    os.utime(t1, ns=(t1.stat().st_atime_ns, t1.stat().st_mtime_ns + 10**9))
    result = preprocess_dataset(dataset, out, config=config, fit=True)
    # the touched file changes the fit key, so the normaliser is refitted; it comes out identical,
    # so the untouched complete case keeps its cache key
    assert result.fitted
    assert result.written == ("Phantom_000", "Phantom_002") and result.skipped == ("Phantom_001",)


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
