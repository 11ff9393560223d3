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
