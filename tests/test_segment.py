"""Tests for brats_cnn.inference.segment: exact vs a per-voxel reference, fast vs exact, and the command."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
import torch

from brats_cnn.errors import BratsCnnError, CheckpointError, ConfigError
from brats_cnn.network.model import PereiraCNN
from brats_cnn.network.dense import to_fully_convolutional
from brats_cnn.inference.predict import predict_exact, predict_fast, resolve_mode
from brats_cnn.inference.segment import run_segment

BACKGROUND = 0.5  # a non-zero background value shows that border patches are padded with it


def _network(architecture: str = "hgg", classes: int = 4, seed: int = 0, patch_size: int = 33,
             context: int = 1) -> PereiraCNN:
    torch.manual_seed(seed)
    net = PereiraCNN(architecture, classes, patch_size=patch_size, context=context).eval()
    with torch.no_grad():  # non-zero biases so that every layer matters
        for module in net.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.bias.uniform_(-0.2, 0.2)
    return net


def _centre_tap_network(architecture: str, patch_size: int = 33, context: int = 1) -> PereiraCNN:
    """Convolutions with only the centre tap: the patch's zero padding is never read."""
    net = _network(architecture, patch_size=patch_size, context=context)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                centre = module.weight[:, :, 1, 1].clone() * 3
                module.weight.zero_()
                module.weight[:, :, 1, 1] = centre
    return net


def _volume(shape=(4, 12, 11, 2), seed=0, brain=0.5):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=shape).astype(np.float32)
    mask = rng.random(shape[1:]) < brain
    image[:, ~mask] = BACKGROUND
    return image, mask


def _naive_reference(net: PereiraCNN, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """One forward pass per brain voxel on its own background-padded patch (33x33 for the paper's nets)."""
    size, half = net.patch_size, net.patch_size // 2
    padded = np.pad(image, ((0, 0), (half, half), (half, half), (0, 0)), constant_values=BACKGROUND)
    probs = np.zeros((net.num_classes, *mask.shape), dtype=np.float32)
    probs[0] = 1.0
    voxels = list(zip(*np.nonzero(mask)))
    patches = np.stack([padded[:, x:x + size, y:y + size, z] for x, y, z in voxels])  # one patch per voxel
    with torch.no_grad():
        out = torch.softmax(net(torch.from_numpy(patches)), dim=1).numpy()
    for (x, y, z), p in zip(voxels, out):
        probs[:, x, y, z] = p
    return probs


@pytest.mark.parametrize("patch_size", [33, 25])
def test_exact_equals_naive_per_voxel_reference(patch_size):
    net = _network(patch_size=patch_size)
    image, mask = _volume()
    expected = _naive_reference(net, image, mask)
    got = predict_exact(net, image, mask, batch_size=97, device="cpu", background_value=BACKGROUND)
    assert got.shape == (4, 12, 11, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_array_equal(got.argmax(0), expected.argmax(0))
    assert (got[0][~mask] == 1).all() and (got[1:][:, ~mask] == 0).all()


@pytest.mark.parametrize(("architecture", "patch_size", "context"),
                         [("hgg", 33, 1), ("lgg", 33, 1), ("hgg", 25, 1), ("lgg", 9, 1), ("hgg", 33, 3), ("lgg", 9, 5)])
def test_fast_equals_exact_when_patch_padding_is_never_read(architecture, patch_size, context):
    # With centre-tap convolutions the only difference between the modes (the zero padding at
    # the edge of each patch) disappears, so this checks the weight reuse, dilations and alignment,
    # also for other patch sizes than the paper's 33, and for a context pathway (its k x k average,
    # k-times dilations and its own FC window beside the main one's).
    net = _centre_tap_network(architecture, patch_size, context)
    image, mask = _volume((4, 10, 9, 3), seed=1)
    exact = predict_exact(net, image, mask, batch_size=256, device="cpu", background_value=BACKGROUND)
    fast = predict_fast(net, image, mask, batch_size=100, device="cpu", background_value=BACKGROUND,
                        slices_per_batch=2)
    np.testing.assert_allclose(fast, exact, atol=1e-5)


def test_fast_mode_layout_and_background():
    net = _network("lgg", classes=5)
    image, mask = _volume((4, 18, 21, 4), seed=2, brain=0.7)
    mask[:, :, 2] = False  # a slice without brain is skipped
    probs = predict_fast(net, image, mask, batch_size=64, device="cpu", background_value=BACKGROUND)
    assert probs.shape == (5, 18, 21, 4) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    assert (probs[0][~mask] == 1).all()
    assert np.all(probs[0][mask] < 1)


def test_to_fully_convolutional_alignment_and_arguments_untouched():
    net = _network()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    dense = to_fully_convolutional(net)
    assert (dense.shift, dense.head_size, dense.head_dilation, dense.head_reach) == (-1, 7, 4, 12)
    image, mask = _volume((4, 8, 8, 1), seed=3)
    image_before = image.copy()
    rng = torch.get_rng_state()
    predict_exact(net, image, mask, batch_size=16, device="cpu")
    predict_fast(net, image, mask, batch_size=16, device="cpu")
    # no random number drawn (train's mid-epoch validation must not shift the dropout masks)
    assert torch.equal(torch.get_rng_state(), rng)
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    np.testing.assert_array_equal(image, image_before)


def test_empty_mask_is_all_background():
    net = _network()
    image, _ = _volume((4, 6, 6, 2))
    mask = np.zeros((6, 6, 2), dtype=bool)
    for predictor in (predict_exact, predict_fast):
        probs = predictor(net, image, mask, batch_size=8, device="cpu")
        assert (probs[0] == 1).all() and (probs[1:] == 0).all()


def test_resolve_mode():
    assert resolve_mode("auto", torch.device("cpu")) == "fast"
    assert resolve_mode("exact", torch.device("cpu")) == "exact"
    with pytest.raises(ConfigError, match="--mode"):
        resolve_mode("slow", torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# the command, on phantoms with a small checkpoint

PHANTOM_SHAPE = (36, 36, 6)


# phantom_setup (tests/conftest.py): three (36, 36, 6) phantoms and a small checkpoint


def test_run_segment_one_case_writes_labels_sidecar_and_probabilities(phantom_setup, tmp_path):
    root, refs, model = phantom_setup
    case_folder = refs[0].image_paths[0].parent
    out = tmp_path / "seg.nii.gz"
    result = run_segment([case_folder], model=model, out=out, mode="fast", device="cpu", save_probabilities=True,
                         label_convention="brats2023")
    assert result.outputs == [out] and not result.failures
    written = nib.load(out)
    reference = nib.load(refs[0].image_paths[0])
    assert written.shape == PHANTOM_SHAPE and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, reference.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 3}
    probabilities = nib.load(tmp_path / "seg_probabilities.nii.gz")
    assert probabilities.shape == (*PHANTOM_SHAPE, 4) and probabilities.get_data_dtype() == np.float32
    np.testing.assert_allclose(np.asarray(probabilities.dataobj, dtype=np.float32).sum(-1), 1.0, atol=5e-3)
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert sidecar["mode"] == "fast" and sidecar["device"] == "cpu" and sidecar["grade"] == "hgg"
    assert sidecar["label_convention"] == "brats2023" and sidecar["model"] == str(model)
    assert set(sidecar["timings_s"]) == {"load", "normalise", "predict", "postprocess", "write"}
    assert sidecar["brats_cnn_version"]


def test_run_segment_runs_the_nyul_map_of_normalise(phantom_setup, tmp_path, monkeypatch):
    # one path: segment standardises through normalise.apply_nyul, once per sequence and case
    from brats_cnn.preprocessing import normalise

    root, refs, model = phantom_setup
    calls = []
    real = normalise.apply_nyul
    monkeypatch.setattr(normalise, "apply_nyul", lambda *a, **k: calls.append(k.get("data_only")) or real(*a, **k))
    run_segment([refs[0].image_paths[0].parent], model=model, out=tmp_path / "s.nii.gz", mode="fast", device="cpu")
    assert calls == [True] * 4


def test_run_segment_dataset_skips_existing_and_overwrites(phantom_setup, tmp_path):
    root, refs, model = phantom_setup
    first = run_segment([root / "data"], model=model, out=tmp_path, device="cpu", postprocess=False)
    assert sorted(p.name for p in first.outputs) == sorted(f"{r.case_id}.nii.gz" for r in refs)
    again = run_segment([root / "data"], model=model, out=tmp_path, device="cpu", postprocess=False)
    assert again.outputs == [] and len(again.skipped) == 3
    changed = run_segment([root / "data"], model=model, out=tmp_path, device="cpu")  # post-processing now on
    assert len(changed.outputs) == 3 and changed.skipped == []
    forced = run_segment([refs[1].image_paths[2]], model=model, out=tmp_path, device="cpu", overwrite=True)
    assert [p.name for p in forced.outputs] == [f"{refs[1].case_id}.nii.gz"]


def test_run_segment_continues_past_a_bad_case_and_fails_at_the_end(phantom_setup, tmp_path):
    import shutil

    root, refs, model = phantom_setup
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    bad = data / refs[1].case_id / refs[1].image_paths[0].name
    bad.write_bytes(b"not a nifti")
    with pytest.raises(BratsCnnError, match=f"1 of 3 case\\(s\\) failed: {refs[1].case_id}"):
        run_segment([data], model=model, out=tmp_path / "out", device="cpu")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == sorted(
        f"{r.case_id}.nii.gz" for r in (refs[0], refs[2]))


def test_run_segment_torchrun_rank_takes_every_other_case(phantom_setup, tmp_path, monkeypatch):
    root, refs, model = phantom_setup
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    result = run_segment([root / "data"], model=model, out=tmp_path, device="cpu")
    assert [p.name for p in result.outputs] == [f"{refs[1].case_id}.nii.gz"]


def test_run_segment_option_errors(phantom_setup, tmp_path, monkeypatch):
    root, refs, model = phantom_setup
    import brats_cnn.inference.members as members

    monkeypatch.setattr(members, "WEIGHTS_DIR_NAME", "no_such_weights_dir")
    with pytest.raises(CheckpointError, match="no_such_weights_dir/hgg.pt"):  # LGG cases: the HGG model
        run_segment([root / "data"], grade="lgg", out=tmp_path)
    with pytest.raises(CheckpointError, match="no_such_weights_dir/hgg.pt"):  # no grade: the HGG default
        run_segment([root / "data"], out=tmp_path)
    with pytest.raises(ConfigError, match="one file"):
        run_segment([root / "data"], model=model, out=tmp_path / "x.nii.gz", device="cpu")
    with pytest.raises(ConfigError) as err:  # the trained network fixes the patch size
        run_segment([root / "data"], model=model, out=tmp_path, device="cpu", overrides=["sampling.patch_size=25"])
    assert str(err.value) == (f"{model}: sampling.patch_size=25 cannot be changed at segmentation: the network "
                              "was trained on 33x33 patches")
    with pytest.raises(BratsCnnError, match="brats2013"):
        run_segment([root / "data"], model=model, out=tmp_path, device="cpu", label_convention="brats2013")


def _second_model(root, name: str, overrides: list, seed: int, convention: str = "brats2017",
                  calibration: dict | None = None):
    """Another small checkpoint next to ``phantom_setup``'s, with its own weights and normaliser."""
    from brats_cnn.config import load_config
    from brats_cnn.network.model import build_network
    from brats_cnn.network.checkpoint import save_checkpoint
    from brats_cnn.preprocessing.normalise import fit_normaliser
    from brats_cnn.data.phantom import make_phantom

    config = load_config("smoke", ["preprocess.n4.sequences=[]", "postprocess.min_component_voxels=5", *overrides])
    torch.manual_seed(seed)
    network = build_network(config.model, 4, patch_size=config.sampling.patch_size)
    return save_checkpoint(root / name, network=network, config=config, label_convention=convention,
                           normaliser=fit_normaliser([make_phantom(PHANTOM_SHAPE, seed=seed)], config),
                           calibration=calibration)


def _probabilities(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float32)


def test_an_ensemble_of_one_model_twice_is_that_model(phantom_setup, tmp_path):
    root, refs, model = phantom_setup
    case = refs[0].image_paths[0].parent
    run_segment([case], model=model, out=tmp_path / "one.nii.gz", mode="fast", device="cpu", save_probabilities=True)
    run_segment([case], model=[model, model], out=tmp_path / "two.nii.gz", mode="fast", device="cpu",
                save_probabilities=True)
    np.testing.assert_array_equal(_probabilities(tmp_path / "two_probabilities.nii.gz"),
                                  _probabilities(tmp_path / "one_probabilities.nii.gz"))
    np.testing.assert_array_equal(_probabilities(tmp_path / "two.nii.gz"), _probabilities(tmp_path / "one.nii.gz"))
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["ensemble"] is None and two["model"] == str(model)
    assert [member["model"] for member in two["ensemble"]] == [str(model), str(model)]


def test_an_ensemble_averages_each_members_calibrated_probabilities(phantom_setup, tmp_path):
    # member B has its own normaliser, weights and prior correction (alpha 0.7 against its frequencies)
    root, refs, model = phantom_setup
    other = _second_model(tmp_path, "b.pt", ["segment.prior_alpha=0.7"], seed=9,
                          calibration={"class_frequencies": [0.85, 0.05, 0.07, 0.03]})
    case = refs[1].image_paths[0].parent
    for name, models in (("a", model), ("b", other), ("ab", [model, other])):
        run_segment([case], model=models, out=tmp_path / f"{name}.nii.gz", mode="fast", device="cpu",
                    save_probabilities=True, postprocess=False)
    a, b, ab = (_probabilities(tmp_path / f"{n}_probabilities.nii.gz") for n in ("a", "b", "ab"))
    assert np.abs(a - b).max() > 0.05  # two different models, so the mean is not either of them
    np.testing.assert_allclose(ab, (a + b) / np.float32(2), atol=1e-6)
    members = json.loads((tmp_path / "ab.json").read_text())["ensemble"]
    assert [m["prior_alpha"] for m in members] == [0.0, 0.7] and members[0]["class_prior"] is None
    assert members[1]["class_prior"] == [0.85, 0.05, 0.07, 0.03]


def test_the_command_takes_an_ensemble_as_a_repeated_model_option(phantom_setup, tmp_path):
    import subprocess
    import sys

    root, refs, model = phantom_setup
    out = tmp_path / "seg.nii.gz"
    result = subprocess.run([sys.executable, "-m", "brats_cnn.cli", "segment", str(refs[2].image_paths[0]),
                             "--model", str(model), "-m", str(model), "--out", str(out), "--device", "cpu",
                             "--mode", "fast"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "averaging 2 models" in result.stderr
    sidecar = json.loads(out.with_name("seg.json").read_text())
    assert [member["model"] for member in sidecar["ensemble"]] == [str(model), str(model)]


def test_an_ensemble_refuses_members_that_do_not_fit_before_any_work(phantom_setup, tmp_path):
    root, refs, model = phantom_setup
    msd = _second_model(tmp_path, "msd.pt", [], seed=1, convention="msd")
    with pytest.raises(ConfigError) as err:
        run_segment([root / "data"], model=[model, msd], out=tmp_path / "out", device="cpu")
    assert str(err.value) == (f"{msd}: cannot be averaged with the first --model: it predicts 4 classes in msd, "
                              "the first 4 in brats2017")
    lgg = _second_model(tmp_path, "lgg.pt", ["grade=lgg"], seed=2)
    with pytest.raises(ConfigError, match=f"^{lgg}: checkpoint is for grade 'lgg' but --grade hgg was given$"):
        run_segment([root / "data"], model=[model, lgg], grade="hgg", out=tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_bf16_channels_last_agrees_with_float32_in_both_modes():
    from brats_cnn.device import Compute

    net = _network("lgg", classes=5)
    image, mask = _volume((4, 14, 13, 3), seed=4, brain=0.6)
    fast_bf16 = Compute(torch.device("cpu"), bf16=True, channels_last=True)
    for predictor in (predict_exact, predict_fast):
        reference = predictor(net, image, mask, batch_size=64, device="cpu", background_value=BACKGROUND)
        got = predictor(net, image, mask, batch_size=64, compute=fast_bf16, background_value=BACKGROUND)
        assert got.dtype == np.float32 and got.shape == reference.shape
        np.testing.assert_allclose(got, reference, atol=3e-2)  # bf16 keeps 8 significant bits
        assert (got[0][~mask] == 1).all()


def test_tta_over_four_rotations_is_rotation_invariant_and_single_angle_is_plain_prediction():
    import dataclasses

    from brats_cnn.config import load_config
    from brats_cnn.inference.predict import predict

    net = _network("lgg", classes=5)
    image, mask = _volume((4, 14, 14, 3), seed=5, brain=0.6)
    base = load_config("pereira_lgg", ["compute.precision=float32", "compute.channels_last=false",
                                       f"preprocess.background_value={BACKGROUND}"])
    device = torch.device("cpu")
    plain = predict(net, image, mask, "fast", device, base)
    np.testing.assert_array_equal(plain, predict_fast(net, image, mask, batch_size=base.segment.batch_size,
                                                       background_value=BACKGROUND))
    tta = dataclasses.replace(base, segment=dataclasses.replace(base.segment, tta_rotations=(0, 90, 180, 270)))
    averaged = predict(net, image, mask, "fast", device, tta)
    turned = predict(net, np.rot90(image, 1, axes=(1, 2)), np.rot90(mask, 1, axes=(0, 1)), "fast", device, tta)
    np.testing.assert_allclose(np.rot90(turned, -1, axes=(1, 2)), averaged, atol=1e-5)
    np.testing.assert_allclose(averaged.sum(0), 1.0, atol=1e-5)
    assert not np.allclose(averaged, plain, atol=1e-3)  # the rotations do change the average
    bad = dataclasses.replace(base, segment=dataclasses.replace(base.segment, tta_rotations=(0, 45)))
    with pytest.raises(ConfigError, match="multiples of 90 degrees, got \\[0, 45\\]"):
        predict(net, image, mask, "fast", device, bad)



def test_views_run_the_network_on_coronal_and_sagittal_slices_and_average_with_axial():
    import dataclasses

    from brats_cnn.config import load_config
    from brats_cnn.inference.predict import predict

    net = _network("lgg", classes=5, seed=2)
    image, mask = _volume((4, 10, 9, 7), seed=6, brain=0.7)  # three different axis lengths
    base = load_config("pereira_lgg", ["compute.precision=float32", "compute.channels_last=false",
                                       f"preprocess.background_value={BACKGROUND}"])
    device = torch.device("cpu")

    def with_views(*views):
        return dataclasses.replace(base, segment=dataclasses.replace(base.segment, views=views))

    plain = predict(net, image, mask, "fast", device, base)
    np.testing.assert_array_equal(predict(net, image, mask, "fast", device, with_views("axial")), plain)
    # coronal: the slices are Y planes, so the same network on the (X, Z, Y) volume, put back in (X, Y, Z)
    coronal = predict(net, image, mask, "fast", device, with_views("coronal"))
    by_hand = predict_fast(net, np.ascontiguousarray(image.transpose(0, 1, 3, 2)),
                           np.ascontiguousarray(mask.transpose(0, 2, 1)), batch_size=base.segment.batch_size,
                           background_value=BACKGROUND)
    assert coronal.shape == plain.shape
    np.testing.assert_array_equal(coronal, by_hand.transpose(0, 1, 3, 2))
    # sagittal: X planes, the (Y, Z, X) volume
    sagittal = predict(net, image, mask, "fast", device, with_views("sagittal"))
    by_hand = predict_fast(net, np.ascontiguousarray(image.transpose(0, 2, 3, 1)),
                           np.ascontiguousarray(mask.transpose(1, 2, 0)), batch_size=base.segment.batch_size,
                           background_value=BACKGROUND)
    np.testing.assert_array_equal(sagittal, by_hand.transpose(0, 3, 1, 2))
    assert not np.allclose(coronal, plain, atol=1e-3) and not np.allclose(sagittal, plain, atol=1e-3)
    three = predict(net, image, mask, "fast", device, with_views("axial", "coronal", "sagittal"))
    np.testing.assert_allclose(three, (plain + coronal + sagittal) / 3, atol=1e-6)
    assert (three[0][~mask] == 1).all()
    # views and rotations: every (plane, angle) pair, averaged
    both = dataclasses.replace(base, segment=dataclasses.replace(base.segment, views=("axial", "coronal"),
                                                                tta_rotations=(0, 90)))
    turned = dataclasses.replace(base, segment=dataclasses.replace(base.segment, tta_rotations=(0, 90)))
    turned_coronal = dataclasses.replace(turned, segment=dataclasses.replace(turned.segment, views=("coronal",)))
    np.testing.assert_allclose(predict(net, image, mask, "fast", device, both),
                               (predict(net, image, mask, "fast", device, turned)
                                + predict(net, image, mask, "fast", device, turned_coronal)) / 2, atol=1e-6)
    with pytest.raises(ConfigError, match="segment.views must name planes from axial, coronal, sagittal"):
        predict(net, image, mask, "fast", device, with_views("oblique"))
    with pytest.raises(ConfigError, match="segment.views"):
        load_config("pereira_lgg", ["segment.views=[axial,oblique]"])


@pytest.mark.parametrize("architecture", ["hgg", "lgg"])
def test_dense_network_computes_fast_mode_and_trains_the_patch_network(architecture):
    # dense training optimises exactly the function fast mode runs, through the patch network's own weights
    from brats_cnn.network.dense import DenseNetwork

    net = _network(architecture, classes=5, seed=4)
    dense = DenseNetwork(net).eval()
    image, _ = _volume((4, 11 + 32, 13 + 32, 1), seed=5)
    mask = np.zeros(image.shape[1:], bool)
    mask[16:16 + 11, 16:16 + 11, 0] = True  # the labelled 11x11 square of a 43x43 crop
    fast = predict_fast(net, image, mask, batch_size=64, device="cpu")
    with torch.no_grad():
        logits = dense(torch.from_numpy(image[:, :, :43, 0])[None])
    assert logits.shape == (1, 5, 11, 11)
    np.testing.assert_allclose(torch.softmax(logits, 1)[0].numpy(), fast[:, 16:27, 16:27, 0], atol=2e-6)
    assert {id(p) for p in dense.parameters()} == {id(p) for p in net.parameters()}
    before = _weights_of(net)
    dense.train()
    torch.optim.SGD(net.parameters(), lr=0.1).zero_grad()
    dense(torch.from_numpy(image[:, :, :43, 0])[None]).square().mean().backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= 0.1 * p.grad
    changed = [k for k, v in _weights_of(net).items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)  # every weight and bias of the patch network moved


def _weights_of(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# fast mode without a per-voxel gather; TTA chosen by device; runtime settings


@pytest.mark.parametrize("dilation", [1, 2, 4])
def test_separable_dilated_max_pool_equals_padded_max_pool2d_exactly(dilation):
    from brats_cnn.network.dense import _dilated_max_pool

    x = torch.randn(2, 5, 17, 13)
    reference = torch.nn.functional.max_pool2d(
        torch.nn.functional.pad(x, (dilation,) * 4, value=float("-inf")), 3, stride=1, dilation=dilation)
    got = _dilated_max_pool(3, dilation)(x)
    assert got.shape == x.shape
    assert torch.equal(got, reference)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(_dilated_max_pool(3, dilation)(cl), reference)


def test_convolutional_head_equals_the_fc_layers_on_each_gathered_neighbourhood():
    from brats_cnn.network.dense import to_fully_convolutional

    net = _network("hgg", classes=5, seed=3)
    dense = to_fully_convolutional(net)
    head = dense.convolutional_head()
    fmap = torch.randn(2, 128, 9 + 2 * dense.head_reach, 6 + 2 * dense.head_reach)
    with torch.no_grad():
        logits = head(fmap)  # (2, 5, 9, 6)
        step, width = dense.head_dilation, 2 * dense.head_reach + 1
        windows = fmap.unfold(2, width, 1).unfold(3, width, 1)[..., ::step, ::step]  # (2, 128, 9, 6, 7, 7)
        gathered = windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, 128, 7, 7)
        reference = net.eval().classifier(gathered).reshape(2, 9, 6, 5).permute(0, 3, 1, 2)
    assert logits.shape == (2, 5, 9, 6)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 7, 10_000])
def test_fast_mode_is_the_same_for_any_fc_strip_size(batch_size):
    net = _network("hgg", classes=5, seed=1)
    image, mask = _volume((4, 19, 15, 3), seed=6, brain=0.6)
    reference = predict_fast(net, image, mask, batch_size=10_000, device="cpu", background_value=BACKGROUND)
    got = predict_fast(net, image, mask, batch_size=batch_size, device="cpu", background_value=BACKGROUND,
                       slices_per_batch=1)
    np.testing.assert_allclose(got, reference, atol=1e-5)
    assert (got[0][~mask] == 1).all()


def test_tta_is_chosen_by_device_unless_asked():
    import dataclasses

    from brats_cnn.config import load_config
    from brats_cnn.inference.members import tta_rotations

    config = load_config("smoke", ["segment.tta_rotations=[0,90,180,270]"])
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert config.segment.tta == "auto"
    assert tta_rotations(config, cpu) == (0,)
    assert tta_rotations(config, cuda) == (0, 90, 180, 270)
    for setting, expected in (("always", (0, 90, 180, 270)), ("never", (0,))):
        chosen = dataclasses.replace(config, segment=dataclasses.replace(config.segment, tta=setting))
        assert tta_rotations(chosen, cpu) == expected and tta_rotations(chosen, cuda) == expected
    with pytest.raises(ConfigError, match="must be one of \\['auto', 'always', 'never'\\], got 'maybe'"):
        load_config("smoke", ["segment.tta=maybe"])


def test_segment_takes_speed_settings_from_this_version_not_the_checkpoint(phantom_setup, tmp_path, monkeypatch):
    from brats_cnn.config import SegmentConfig, config_to_dict, load_config
    from brats_cnn.network.checkpoint import load_checkpoint, save_checkpoint

    root, refs, model = phantom_setup
    old = load_checkpoint(model)
    stored = load_config(None, ["segment.slices_per_batch=7", "segment.batch_size=99",
                                "segment.tta_rotations=[0,180]"], base=config_to_dict(old.config))
    older = save_checkpoint(tmp_path / "older.pt", network=old.network, config=stored, normaliser=old.normaliser,
                            label_convention="brats2017")
    seen = []
    from brats_cnn.inference import predict

    real = predict.predict_fast
    monkeypatch.setattr(predict, "predict_fast", lambda *a, **k: seen.append(
        (k["slices_per_batch"], k["batch_size"])) or real(*a, **k))
    run_segment([refs[0].image_paths[0].parent], model=older, out=tmp_path / "a.nii.gz", device="cpu", mode="fast")
    assert seen == [(SegmentConfig().slices_per_batch, SegmentConfig().batch_size)]
    seen.clear()
    run_segment([refs[0].image_paths[0].parent], model=older, out=tmp_path / "b.nii.gz", device="cpu", mode="fast",
                overrides=["segment.slices_per_batch=3", "segment.tta=always"])
    assert seen == [(3, SegmentConfig().batch_size)] * 2  # two rotations, the checkpoint's [0, 180]
    assert json.loads((tmp_path / "b.json").read_text())["tta_rotations"] == [0, 180]


def test_the_command_says_whether_tta_runs_and_the_time_of_each_case(phantom_setup, tmp_path):
    import subprocess
    import sys

    root, refs, model = phantom_setup
    for flag, said, rotations in (
            ([], "test-time augmentation off (segment.tta auto on cpu)", [0]),
            (["--tta"], "asked for, but the model's segment.tta_rotations is [0]: nothing to average", [0]),
            (["--tta", "--set", "segment.tta_rotations=[0,90]"],
             "test-time augmentation on (segment.tta always): averaging over rotations [0, 90], 2x the time", [0, 90]),
            (["--no-tta", "--set", "segment.tta_rotations=[0,90]"], "off (segment.tta never on cpu)", [0])):
        out = tmp_path / f"seg{len(flag)}{flag[:1]}.nii.gz".replace("'", "").replace("[", "").replace("]", "")
        result = subprocess.run([sys.executable, "-m", "brats_cnn.cli", "segment", str(refs[0].image_paths[0]),
                                 "--model", str(model), "--out", str(out), "--device", "cpu", *flag],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert said in result.stderr
        assert re.search(rf"wrote {re.escape(str(out))} in \d+\.\d s", result.stderr)
        sidecar = json.loads(out.with_name(out.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["tta"] == {"--tta": "always", "--no-tta": "never"}.get(flag[0] if flag else "", "auto")
        assert sidecar["tta_rotations"] == rotations


def test_segment_never_writes_an_empty_map_because_post_processing_removed_everything(phantom_setup, tmp_path,
                                                                                      caplog):
    root, refs, model = phantom_setup
    case = refs[0].image_paths[0].parent
    run_segment([case], model=model, out=tmp_path / "raw.nii.gz", device="cpu", postprocess=False)
    called = np.asarray(nib.load(tmp_path / "raw.nii.gz").dataobj)
    assert called.any()  # the network calls tumour on this phantom
    with caplog.at_level("WARNING"):
        run_segment([case], model=model, out=tmp_path / "pp.nii.gz", device="cpu",
                    overrides=[f"postprocess.min_component_voxels={called.size + 1}"])
    kept = np.asarray(nib.load(tmp_path / "pp.nii.gz").dataobj)
    report = json.loads((tmp_path / "pp.json").read_text())["postprocess"]
    assert kept.any() and report["never_empty_applied"] is True and report["kept_voxels"] == np.count_nonzero(kept)
    assert report["removed_voxels"] == np.count_nonzero(called) - np.count_nonzero(kept)
    assert "every tumour component was smaller than t_vol" in caplog.text
    run_segment([case], model=model, out=tmp_path / "strict.nii.gz", device="cpu",
                overrides=[f"postprocess.min_component_voxels={called.size + 1}", "postprocess.never_empty=false"])
    assert not np.asarray(nib.load(tmp_path / "strict.nii.gz").dataobj).any()


def test_segment_require_core_equals_post_processing_the_raw_map_and_the_sidecar_counts_it(phantom_setup, tmp_path):
    from brats_cnn.config import PostprocessConfig
    from brats_cnn.data.labels import region_mask
    from brats_cnn.inference.postprocess import postprocess_with_report

    root, refs, model = phantom_setup
    case = refs[0].image_paths[0].parent
    run_segment([case], model=model, out=tmp_path / "raw.nii.gz", device="cpu", postprocess=False)
    raw = np.asarray(nib.load(tmp_path / "raw.nii.gz").dataobj)
    run_segment([case], model=model, out=tmp_path / "core.nii.gz", device="cpu",
                overrides=["postprocess.min_component_voxels=0", "postprocess.require_core=true"])
    config = PostprocessConfig(min_component_voxels=0, require_core=True)
    expected, expected_report = postprocess_with_report(raw, config, region_mask(raw, "brats2017", "core"))
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "core.nii.gz").dataobj), expected)
    report = json.loads((tmp_path / "core.json").read_text())["postprocess"]
    assert report["require_core"] is True
    assert report["removed_without_core"] == expected_report["removed_without_core"]
    assert report["removed_voxels"] == np.count_nonzero(raw) - np.count_nonzero(expected)


def test_class_weights_apply_after_the_prior_as_the_cv_grid_scores_them(phantom_setup, tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    from brats_cnn.inference.prior import apply_class_prior, weight_classes

    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(4), size=(5, 6, 2)).transpose(3, 0, 1, 2).astype(np.float32)
    frequencies = np.array([0.9, 0.02, 0.05, 0.03])
    spec = importlib.util.spec_from_file_location("cross_validate", Path(__file__).parents[1] / "pipelines" /
                                                  "cross_validate.py")
    cv = importlib.util.module_from_spec(spec)
    sys.modules["cross_validate"] = cv
    spec.loader.exec_module(cv)
    segment_way = weight_classes(apply_class_prior(probabilities, frequencies, 0.6), [1.0, 1.0, 1.5, 1.0])
    np.testing.assert_allclose(segment_way, cv.corrected(probabilities, frequencies, 0.6, 1.5, 2), atol=1e-6)
    np.testing.assert_array_equal(weight_classes(probabilities, []), probabilities)
    with pytest.raises(ConfigError, match="segment.class_weights must hold 4 finite values > 0"):
        weight_classes(probabilities, [1.0, 2.0])
    # through segment: more edema weight, more edema; the sidecar says so; a wrong length is refused before work
    root, refs, model = phantom_setup
    case = refs[0].image_paths[0].parent
    run_segment([case], model=model, out=tmp_path / "a.nii.gz", device="cpu", postprocess=False)
    run_segment([case], model=model, out=tmp_path / "b.nii.gz", device="cpu", postprocess=False,
                overrides=["segment.class_weights=[1,1,50,1]"])
    plain, weighted = (np.asarray(nib.load(tmp_path / f"{n}.nii.gz").dataobj) for n in "ab")
    assert (weighted == 2).sum() > (plain == 2).sum()
    assert json.loads((tmp_path / "b.json").read_text())["class_weights"] == [1.0, 1.0, 50.0, 1.0]
    with pytest.raises(ConfigError, match="segment.class_weights has 2 values but the network predicts 4 classes"):
        run_segment([case], model=model, out=tmp_path / "c.nii.gz", device="cpu",
                    overrides=["segment.class_weights=[1,2]"])
