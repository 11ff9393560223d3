"""The Pereira networks (Tables I/II) and the checkpoint format."""

from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from brats_cnn.preprocessing import normalise
from brats_cnn.config import load_config
from brats_cnn.errors import CheckpointError, ConfigError
from brats_cnn.network.checkpoint import CHECKPOINT_FORMAT_VERSION, average_checkpoints, load_checkpoint, run_average, save_checkpoint, unwrap_network
from brats_cnn.network.model import PereiraCNN, build_network, check_patch_size, count_parameters, feature_size


@pytest.mark.parametrize(("architecture", "classes", "expected"), [
    ("hgg", 5, 2_118_213), ("lgg", 5, 1_933_701), ("hgg", 4, 2_117_956), ("lgg", 4, 1_933_444)])
def test_parameter_counts_match_the_paper(architecture, classes, expected):
    assert count_parameters(PereiraCNN(architecture, classes)) == expected


@pytest.mark.parametrize("architecture", ["hgg", "lgg"])
def test_output_shape_for_a_batch(architecture):
    net = PereiraCNN(architecture, 4).eval()
    out = net(torch.zeros(3, 4, 33, 33))
    assert out.shape == (3, 4)
    assert out.dtype == torch.float32


def test_context_pathway_reads_the_averaged_neighbourhood_and_the_main_one_the_centre():
    # HGG with context 3: + a half-width stack (4->32->32->32, 32->64->64->64: 111,904 weights and biases)
    # + 64 x 7 x 7 more inputs to the first FC layer (802,816 weights) = 3,032,804 with 4 outputs
    torch.manual_seed(0)
    net = PereiraCNN("hgg", 4, context=3).eval()
    assert count_parameters(net) == 3_032_804 and net.input_size == 99
    wide = torch.randn(2, 4, 99, 99)
    with torch.no_grad():
        out = net(wide)
        centre = wide[:, :, 33:66, 33:66]
        averaged = nn.functional.avg_pool2d(wide, 3)
        expected = net.classifier(torch.cat([net.features(centre).flatten(1),
                                             net.context_features(averaged).flatten(1)], 1))
        assert torch.equal(out, expected)
        # what lies outside the centre reaches the output through the context pathway only
        changed = wide.clone()
        changed[:, :, :3, :3] += 5.0
        assert not torch.equal(net(changed), out)
        net.context_features[0].weight.zero_()
        net.context_features[0].bias.zero_()
        assert torch.equal(net(changed), net(wide))
    config = load_config("pereira_hgg", ["model.context=3"])
    assert build_network(config.model, 4, patch_size=33).input_size == 99
    with pytest.raises(ConfigError, match="model.context=2 must be odd"):
        build_network(load_config("pereira_hgg", ["model.context=2"]).model, 4, patch_size=33)


def test_xavier_init_weights_within_glorot_bound_and_zero_bias():
    torch.manual_seed(0)
    net = PereiraCNN("hgg", 5)
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 9  # 6 convolutions + 3 FC (Table I)
    for layer in layers:
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert torch.count_nonzero(layer.bias) == 0
        assert layer.weight.abs().max() <= bound
        # a uniform(-b, b) sample of this size comes close to the bound and has std b/sqrt(3)
        assert layer.weight.abs().max() > 0.9 * bound
        assert layer.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)


def test_build_network_follows_the_config():
    lgg = load_config("pereira_lgg")
    net = build_network(lgg.model, 4, patch_size=lgg.sampling.patch_size)
    assert net.architecture == "lgg"
    dropouts = [m.p for m in net.modules() if isinstance(m, nn.Dropout)]
    assert dropouts == [0.5, 0.5, 0.5]


@pytest.mark.parametrize(("architecture", "patch_size", "final"), [
    ("hgg", 33, 7), ("lgg", 33, 7), ("hgg", 25, 5), ("lgg", 25, 5), ("hgg", 9, 1)])
def test_network_is_built_for_the_configured_patch_size(architecture, patch_size, final):
    config = load_config(f"pereira_{architecture}", [f"sampling.patch_size={patch_size}"])
    net = build_network(config.model, 4, patch_size=config.sampling.patch_size).eval()
    assert net.patch_size == patch_size and feature_size(architecture, patch_size) == final
    assert net.classifier[2].in_features == 128 * final * final  # the first FC layer reads the last map
    assert net(torch.zeros(2, 4, patch_size, patch_size)).shape == (2, 4)


@pytest.mark.parametrize(("patch_size", "nearest"), [(32, "31, 33"), (29, "25, 31"), (5, "7"), (27, "25, 31")])
def test_a_patch_size_the_network_cannot_take_is_one_config_error(patch_size, nearest):
    config = load_config("pereira_hgg", [f"sampling.patch_size={patch_size}"])
    with pytest.raises(ConfigError) as err:
        build_network(config.model, 4, patch_size=config.sampling.patch_size)
    assert str(err.value) == (f"sampling.patch_size={patch_size} does not fit the HGG network (odd side with an "
                              f"odd final feature map needed); nearest valid sizes: {nearest}")
    with pytest.raises(ConfigError):
        check_patch_size("lgg", patch_size)


def test_a_checkpoint_keeps_its_patch_size(tmp_path):
    config = load_config("smoke", ["sampling.patch_size=25"])
    state = _any_normaliser_state(normalise)
    net = build_network(config.model, 4, patch_size=25)
    path = save_checkpoint(tmp_path / "m.pt", network=net, config=config, normaliser=state,
                           label_convention="brats2017")
    loaded = load_checkpoint(path).network
    assert loaded.patch_size == 25 and loaded.classifier[2].in_features == 128 * 5 * 5


# ---- checkpoints -------------------------------------------------------------------------------

class _FakeNormaliser:
    def to_dict(self):
        return {"version": 1, "channel_order": ["t1", "t1c", "t2", "flair"]}


def _write(path: Path, **changes) -> Path:
    """A valid checkpoint payload, with ``changes`` applied, saved with plain torch.save."""
    config = load_config("smoke")
    net = build_network(config.model, 4, patch_size=config.sampling.patch_size)
    save_checkpoint(path, network=net, config=config, normaliser=_FakeNormaliser(),
                    label_convention="brats2017", epoch=3)
    if changes:
        payload = torch.load(path, weights_only=True)
        for key, value in changes.items():
            if value is _DELETE:
                del payload[key]
            else:
                payload[key] = value
        torch.save(payload, path)
    return path


_DELETE = object()


def test_checkpoint_round_trip(tmp_path):
    config = load_config("smoke", ["model.dropout=0.2"])
    state = _any_normaliser_state(normalise)
    torch.manual_seed(1)
    net = build_network(config.model, 4, patch_size=config.sampling.patch_size)
    optimiser = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    net(torch.randn(2, 4, 33, 33)).sum().backward()
    optimiser.step()
    training_state = {"optimiser": optimiser.state_dict(), "step": 7, "torch_rng": torch.get_rng_state()}
    path = save_checkpoint(tmp_path / "m.pt", network=net, config=config, normaliser=state,
                           label_convention="brats2017", epoch=2, training_state=training_state)
    ckpt = load_checkpoint(path)
    assert ckpt.format_version == CHECKPOINT_FORMAT_VERSION
    assert ckpt.config == config and ckpt.grade == "hgg" and ckpt.epoch == 2
    assert ckpt.label_convention == "brats2017"
    assert ckpt.channel_order == ("t1", "t1c", "t2", "flair")
    assert ckpt.normaliser == state
    assert not ckpt.network.training
    for (name, a), (_, b) in zip(net.state_dict().items(), ckpt.network.state_dict().items()):
        assert torch.equal(a, b), name
    assert ckpt.training_state["step"] == 7
    assert torch.equal(ckpt.training_state["torch_rng"], training_state["torch_rng"])
    restored = torch.optim.SGD(ckpt.network.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    restored.load_state_dict(ckpt.training_state["optimiser"])  # resumable
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temp file


def _any_normaliser_state(normalise):
    """A NormaliserState built from a tiny synthetic fit (the module's own public API)."""
    import numpy as np

    from brats_cnn.config import PreprocessConfig
    rng = np.random.default_rng(0)
    image = rng.uniform(1, 100, size=(4, 12, 12, 6)).astype(np.float32)
    case = _fake_case(image)
    config = PreprocessConfig(n4=load_config("smoke").preprocess.n4.__class__(sequences=()))
    return normalise.fit_normaliser([case], config)


def _fake_case(image):
    import numpy as np

    from brats_cnn.data.io import Case
    return Case(case_id="c0", image=image, label=None, affine=np.eye(4), header=None,
                spacing=(1.0, 1.0, 1.0), label_convention=None, grade=None, source=Path("c0"))


def test_unwrap_network_handles_compiled_wrappers():
    net = PereiraCNN("lgg", 4)
    assert unwrap_network(net) is net

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner
    assert unwrap_network(Wrapper(net)) is net


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found") as err:
        load_checkpoint(tmp_path / "none.pt")
    assert str(tmp_path / "none.pt") in str(err.value)


def test_truncated_checkpoint_is_rejected(tmp_path):
    path = _write(tmp_path / "m.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_garbage_file_is_rejected(tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_other_format_version_is_rejected(tmp_path):
    path = _write(tmp_path / "m.pt", format_version=CHECKPOINT_FORMAT_VERSION + 1)
    with pytest.raises(CheckpointError, match="format version 3 is not supported"):
        load_checkpoint(path)


def test_missing_key_is_rejected(tmp_path):
    path = _write(tmp_path / "m.pt", normaliser=_DELETE)
    with pytest.raises(CheckpointError, match="missing key 'normaliser'"):
        load_checkpoint(path)


def test_unexpected_key_is_rejected(tmp_path):
    path = _write(tmp_path / "m.pt", extra=1)
    with pytest.raises(CheckpointError, match="unexpected key 'extra'"):
        load_checkpoint(path)


def test_wrong_weights_are_rejected(tmp_path):
    path = _write(tmp_path / "m.pt", num_classes=5)
    with pytest.raises(CheckpointError, match="inconsistent checkpoint"):
        load_checkpoint(path)


def test_not_a_brats_checkpoint(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not a brats-cnn checkpoint"):
        load_checkpoint(path)


class _CreatesFile:
    """Unpickling this calls open(target, 'w'), i.e. runs code with a visible side effect."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("writer", ["torch_zip", "legacy_pickle"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, writer):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    payload = {"format": "brats-cnn-checkpoint", "evil": _CreatesFile(target)}
    if writer == "torch_zip":
        torch.save(payload, path)
        assert zipfile.is_zipfile(path)
    else:
        path.write_bytes(pickle.dumps(payload))
    assert not target.exists()
    with pytest.raises(CheckpointError, match="refused to load") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    assert not target.exists()


# ---- checkpoint averaging ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def fitted_state():
    return _any_normaliser_state(normalise)


def _trained_copy(path: Path, seed: int, epoch: int, normaliser, architecture: str = "hgg") -> Path:
    config = load_config("smoke", [f"model.architecture={architecture}"])
    torch.manual_seed(seed)
    net = build_network(config.model, 4, patch_size=config.sampling.patch_size)
    return save_checkpoint(path, network=net, config=config, normaliser=normaliser,
                           label_convention="brats2017", epoch=epoch, training_state={"step": epoch},
                           calibration={"class_frequencies": [0.9, 0.04, 0.03, 0.02, 0.01], "alpha": seed})


def test_average_of_checkpoints_is_the_mean_of_their_weights(tmp_path, fitted_state):
    paths = [_trained_copy(tmp_path / f"s{i}.pt", i, e, fitted_state) for i, e in enumerate((4, 6, 5))]
    written = run_average(paths, tmp_path / "avg.pt")
    averaged = load_checkpoint(written)
    nets = [load_checkpoint(p).network.state_dict() for p in paths]
    for name, tensor in averaged.network.state_dict().items():
        expected = (nets[0][name] + nets[1][name] + nets[2][name]) / 3
        assert not torch.equal(nets[0][name], nets[1][name]) or name.endswith("bias")
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)
    assert averaged.epoch == 6 and averaged.training_state is None
    assert averaged.calibration == {"class_frequencies": [0.9, 0.04, 0.03, 0.02, 0.01]}  # the rest is dropped
    assert averaged.config == load_checkpoint(paths[0]).config


def test_average_refuses_checkpoints_of_another_run(tmp_path, fitted_state):
    import dataclasses

    first = _trained_copy(tmp_path / "a.pt", 0, 1, fitted_state)
    lgg = _trained_copy(tmp_path / "lgg.pt", 1, 1, fitted_state, architecture="lgg")
    with pytest.raises(CheckpointError, match=r"lgg\.pt: cannot average with .*a\.pt: architecture 'lgg', not 'hgg'"):
        average_checkpoints([first, lgg])
    other_data = _trained_copy(tmp_path / "b.pt", 1, 1, dataclasses.replace(fitted_state, n_cases=2))
    with pytest.raises(CheckpointError, match=r"b\.pt: .*another normaliser"):
        average_checkpoints([first, other_data])
    with pytest.raises(ConfigError, match="at least two checkpoints, got 1"):
        average_checkpoints([first])


def test_average_command_errors_leave_nothing_written(tmp_path, capsys, fitted_state):
    from brats_cnn.cli import main

    a, b = _trained_copy(tmp_path / "a.pt", 0, 1, fitted_state), _trained_copy(tmp_path / "b.pt", 1, 2, fitted_state)
    before = a.read_bytes()
    assert main(["average", str(a), str(b), "--out", str(a)]) == 2
    assert "would write over one of the checkpoints" in capsys.readouterr().err and a.read_bytes() == before
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    assert main(["average", str(a), str(tmp_path / "broken.pt"), "--out", str(tmp_path / "avg.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("brats-cnn: error: ") and "broken.pt" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "avg.pt").exists()
    assert main(["average", str(a), str(b), "--out", str(tmp_path / "avg.pt")]) == 0
    assert load_checkpoint(tmp_path / "avg.pt").epoch == 2
