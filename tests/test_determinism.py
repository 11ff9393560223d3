"""Determinism on the CPU: the same seed gives the same model and the same segmentation, bit for bit.

What is and is not deterministic on a GPU is documented in docs/reliability.md (not testable here).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brats_cnn.data.phantom import write_phantom_dataset

TINY = ["preprocess.n4.sequences=[]", "model.architecture=lgg", "sampling.total_patches=16",
        "train.batch_size=4", "train.validate_dice=false", "data.validation_cases=0", "train.num_workers=0",
        "train.epochs=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """(raw dataset of 2 HGG phantoms, its preprocessed cache)."""
    from brats_cnn.config import load_config
    from brats_cnn.preprocessing.preprocess import preprocess_dataset

    raw = tmp_path_factory.mktemp("raw")
    write_phantom_dataset(raw, 2, grades=["HGG", "HGG"], shape=(40, 40, 12))
    cache = tmp_path_factory.mktemp("cache")
    preprocess_dataset(raw, cache, config=load_config("smoke", TINY), fit=True)
    return raw, cache


@pytest.fixture(scope="module")
def two_runs(data, tmp_path_factory):
    from brats_cnn.training.train import run_training

    _, cache = data
    root = tmp_path_factory.mktemp("runs")
    first = run_training("hgg", cache, root / "a", config="smoke", overrides=TINY, device="cpu")
    second = run_training("hgg", cache, root / "b", config="smoke", overrides=TINY, device="cpu")
    return root, first, second


def test_same_seed_same_model(two_runs):
    _, first, second = two_runs
    a, b = first.network.state_dict(), second.network.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["train_loss"] for r in first.history] == [r["train_loss"] for r in second.history]


def test_another_seed_another_model(data, two_runs, tmp_path):
    from brats_cnn.training.train import run_training

    _, cache = data
    _, first, _ = two_runs
    other = run_training("hgg", cache, tmp_path / "c", config="smoke", overrides=TINY + ["train.seed=1"],
                         device="cpu")
    a, c = first.network.state_dict(), other.network.state_dict()
    assert any(not torch.equal(a[key], c[key]) for key in a)


def test_same_model_same_segmentation(data, two_runs, tmp_path):
    from brats_cnn.inference.segment import run_segment

    raw, _ = data
    root, _, _ = two_runs
    outputs = []
    for name, run in (("a", "a"), ("b", "b"), ("a_again", "a")):
        out = tmp_path / name
        run_segment([raw], model=root / run / "last.pt", out=out, device="cpu", mode="fast",
                    save_probabilities=True, postprocess=False)
        outputs.append(out)
    for case in ("Phantom_000", "Phantom_001"):
        for suffix in (".nii.gz", "_probabilities.nii.gz"):
            arrays = [np.asarray(nib.load(out / f"{case}{suffix}").dataobj) for out in outputs]
            assert np.array_equal(arrays[0], arrays[1]) and np.array_equal(arrays[0], arrays[2]), case + suffix


def test_exact_mode_is_repeatable(data, two_runs):
    """Exact mode on a brain subset: two calls give identical probabilities."""
    from brats_cnn.network.checkpoint import load_checkpoint
    from brats_cnn.preprocessing.cache import list_cached_cases, load_cached_case
    from brats_cnn.inference.predict import predict_exact

    _, cache = data
    root, _, _ = two_runs
    network = load_checkpoint(root / "a" / "last.pt").network
    case = load_cached_case(list_cached_cases(cache)[0])
    image = np.transpose(case.image, (1, 2, 3, 0)).astype(np.float32)
    mask = np.zeros(image.shape[1:], dtype=bool)
    mask[:, :, 6] = np.transpose(case.mask, (1, 2, 0))[:, :, 6]  # one slice keeps it quick
    first = predict_exact(network, image, mask, batch_size=256, device="cpu")
    again = predict_exact(network, image, mask, batch_size=256, device="cpu")
    assert np.array_equal(first, again)
    # another batch size may let oneDNN pick other kernels: equal to rounding, not bit for bit
    other = predict_exact(network, image, mask, batch_size=97, device="cpu")
    assert np.allclose(first, other, rtol=0, atol=1e-5)
