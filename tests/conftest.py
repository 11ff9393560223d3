"""Shared test fixtures. Real BraTS cases live in ../shared (outside the repo); tests skip without them."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO.parent / "shared" / "data" / "brats_sample"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The folder of real BraTS 2018 cases (skips the test when it is absent)."""
    if not (SAMPLE_DIR / "manifest.csv").is_file():
        pytest.skip(f"real BraTS sample not found at {SAMPLE_DIR}")
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def real_case_dir(sample_dir: Path) -> Path:
    """One real HGG case folder (BraTS 2017-21 layout)."""
    return sample_dir / "Brats18_CBICA_ABM_1"


def _phantom_model(root: Path, n_cases: int, shape: tuple[int, int, int], *, seed: int, torch_seed: int = 0,
                   calibration: dict | None = None) -> tuple[list, Path]:
    """``n_cases`` phantoms (seeds ``seed...``) under ``root/data`` and a small untrained HGG checkpoint
    ``root/model.pt`` (smoke config without N4, t_vol 5, normaliser fitted on the phantom of ``seed``)."""
    import torch

    from brats_cnn.config import load_config
    from brats_cnn.network.model import build_network
    from brats_cnn.network.checkpoint import save_checkpoint
    from brats_cnn.preprocessing.normalise import fit_normaliser
    from brats_cnn.data.phantom import make_phantom, write_phantom_dataset

    config = load_config("smoke", ["preprocess.n4.sequences=[]", "postprocess.min_component_voxels=5"])
    refs = write_phantom_dataset(root / "data", n_cases, seed=seed, shape=shape)
    state = fit_normaliser([make_phantom(shape, seed=seed)], config)
    torch.manual_seed(torch_seed)
    network = build_network(config.model, 4, patch_size=config.sampling.patch_size)
    model = save_checkpoint(root / "model.pt", network=network, config=config, normaliser=state,
                            label_convention="brats2017", calibration=calibration)
    return refs, model


@pytest.fixture(scope="session")
def phantom_model():
    """The factory :func:`_phantom_model`: phantom cases and a small checkpoint for segment tests."""
    return _phantom_model


@pytest.fixture(scope="module")
def phantom_setup(tmp_path_factory, phantom_model):
    """``(root, refs, model)``: three (36, 36, 6) phantoms (seeds 5-7) and a small checkpoint, per test module."""
    root = tmp_path_factory.mktemp("phantoms")
    refs, model = phantom_model(root, 3, (36, 36, 6), seed=5)
    return root, refs, model
