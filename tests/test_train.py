"""The training loop: schedule, split, end-to-end runs, resume equality, DDP on gloo."""

from __future__ import annotations

import csv
import json
import logging
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from brats_cnn.training import train
from brats_cnn.training import loss as training_loss
from brats_cnn.training import validation
from brats_cnn.errors import CheckpointError, ConfigError, InputError
from brats_cnn.network.checkpoint import load_checkpoint
from brats_cnn.device import resolve_device
from brats_cnn.config import load_config
from brats_cnn.training.train import learning_rate, run_training, split_cases

# A tiny run: the LGG network (cheapest), 32 patches of batch 8 per epoch, no N4.
TINY = ["preprocess.n4.sequences=[]", "model.architecture=lgg", "sampling.total_patches=32",
        "sampling.validation_patches=16", "train.batch_size=8", "train.validate_dice=false"]
NO_DROPOUT = ["model.dropout=0.0"]  # dropout masks differ per rank; without it DDP equals one process


@pytest.fixture(scope="module")
def raw_dataset(tmp_path_factory) -> Path:
    from brats_cnn.data.phantom import write_phantom_dataset

    root = tmp_path_factory.mktemp("raw")
    write_phantom_dataset(root, 4, grades=["HGG", "HGG", "LGG", "HGG"], shape=(40, 40, 16))
    return root


@pytest.fixture(scope="module")
def cache(raw_dataset, tmp_path_factory) -> Path:
    from brats_cnn.config import load_config
    from brats_cnn.preprocessing.preprocess import preprocess_dataset

    out = tmp_path_factory.mktemp("cache")
    config = load_config("smoke", TINY)
    preprocess_dataset(raw_dataset, out, config=config, fit=True)
    return out


def test_learning_rate_decays_linearly_per_iteration():
    assert learning_rate(0, 101, 0.003, 0.00003) == 0.003
    assert learning_rate(100, 101, 0.003, 0.00003) == pytest.approx(0.00003)
    assert learning_rate(50, 101, 0.003, 0.00003) == pytest.approx((0.003 + 0.00003) / 2)
    rates = [learning_rate(s, 11, 1.0, 0.0) for s in range(11)]
    assert np.allclose(np.diff(rates), -0.1)


def test_split_holds_out_whole_cases_deterministically():
    ids = [f"c{i}" for i in range(10)]
    train_ids, val_ids = split_cases(ids, 2, seed=0)
    assert len(val_ids) == 2 and set(train_ids) | set(val_ids) == set(ids) and not set(train_ids) & set(val_ids)
    assert split_cases(list(reversed(ids)), 2, seed=0) == (train_ids, val_ids)
    assert split_cases(ids, 0, seed=0) == (ids, [])
    with pytest.raises(ConfigError, match="leaves no training case"):
        split_cases(ids[:2], 2, seed=0)


def test_dice_slices_are_evenly_spaced_over_the_brain():
    mask = np.zeros((20, 3, 3), bool)
    mask[4:15, 1, 1] = True
    assert validation.dice_slice_indices(mask, 0).tolist() == list(range(4, 15))
    assert validation.dice_slice_indices(mask, 3).tolist() == [4, 9, 14]
    assert validation.dice_slice_indices(mask, 50).tolist() == list(range(4, 15))


def test_loss_function_is_the_loss_of_the_step_and_of_the_validation(monkeypatch):
    # train.train_step (train and benchmark) and validation.evaluate_patches both use training_loss.loss_function
    from brats_cnn.device import Compute
    from brats_cnn.network.model import PereiraCNN

    compute = Compute(torch.device("cpu"), bf16=False, channels_last=False)
    torch.manual_seed(0)
    net = PereiraCNN("lgg", 4, patch_size=9)
    patches, labels = torch.randn(6, 4, 9, 9), torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.no_grad():
        logits = net.eval()(patches)
    loss, accuracy = validation.evaluate_patches(net, [(patches, labels)], compute)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    assert accuracy == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    calls = []
    assert train.loss_function is validation.loss_function is training_loss.loss_function  # one function, imported by both
    fake = lambda out, target, config=None, weight=None: calls.append(len(target)) or 0 * out.sum()  # noqa: E731
    monkeypatch.setattr(train, "loss_function", fake)
    monkeypatch.setattr(validation, "loss_function", fake)
    before = _weights(net)
    net.train()
    step_loss, _ = train.train_step(net, torch.optim.SGD(net.parameters(), lr=0.1), patches, labels, compute)
    assert step_loss.item() == 0 and calls == [6]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # zero loss, zero gradient
    assert validation.evaluate_patches(net, [(patches, labels)], compute)[0] == 0.0 and calls == [6, 6]


def test_focal_loss_by_hand_and_selected_by_config_in_train_and_benchmark(monkeypatch):
    from brats_cnn.config import load_config

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    focal = load_config("smoke", ["train.loss=focal", "train.focal_gamma=2"]).train
    p_t = torch.tensor([np.exp(2) / (np.exp(2) + 1), 1 / (1 + np.e), 0.5])
    expected = (-((1 - p_t) ** 2) * torch.log(p_t)).mean()
    assert training_loss.loss_function(logits, labels, focal).item() == pytest.approx(expected.item(), rel=1e-6)
    gamma0 = load_config("smoke", ["train.loss=focal", "train.focal_gamma=0"]).train
    assert training_loss.loss_function(logits, labels, gamma0).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    with pytest.raises(ConfigError, match="train.loss"):
        load_config("smoke", ["train.loss=dice"])
    # the config's loss reaches the benchmark's train step too (one place to change it)
    from brats_cnn.training import benchmark

    seen = []
    real = training_loss.loss_function
    monkeypatch.setattr(train, "loss_function", lambda out, target, config=None, weight=None:
                        seen.append(config.loss) or real(out, target, config, weight))
    config = load_config("smoke", ["train.loss=focal", "preprocess.n4.sequences=[]", "model.architecture=lgg",
                                   "train.num_workers=0", "sampling.patch_size=9"])
    benchmark.run_benchmark("hgg", "cpu", batch_size=2, iterations=2, config=config)
    assert seen and set(seen) == {"focal"}


def test_cuda_requested_without_cuda_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="must be auto, cpu or cuda"):
        resolve_device("tpu")


def test_train_from_raw_data_via_the_cli(raw_dataset, tmp_path):
    from brats_cnn.cli import main

    out = tmp_path / "run"
    sets = [a for s in TINY + ["train.validate_dice=true", "train.dice_slices=6", "train.num_workers=1"] for a in ("--set", s)]
    code = main(["-q", "train", "--grade", "hgg", "--data", str(raw_dataset), "--out", str(out),
                 "--config", "smoke", "--device", "cpu", *sets])
    assert code == 0
    for name in ("config.yaml", "metrics.csv", "metrics.json", "last.pt", "best.pt", "cache/normaliser.json"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert int(rows[-1]["step"]) == 2 * 4
    assert float(rows[-1]["lr"]) == pytest.approx(0.00003)
    for row in rows:
        assert 0.0 <= float(row["val_accuracy"]) <= 1.0 and float(row["train_loss"]) > 0
        assert 0.0 <= float(row["dice_complete"]) <= 1.0
    steps = list(csv.DictReader((out / "steps.csv").open()))
    assert [int(r["step"]) for r in steps] == list(range(1, 9))
    assert float(steps[0]["lr"]) == pytest.approx(0.003) and float(steps[-1]["lr"]) == pytest.approx(0.00003)
    train_loss = np.mean([float(r["loss"]) for r in steps[4:]])  # equal batches: epoch mean
    assert train_loss == pytest.approx(float(rows[-1]["train_loss"]), rel=1e-5)
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.epoch == 2 and ckpt.grade == "hgg" and ckpt.network.architecture == "lgg"
    state = ckpt.training_state
    # the LGG phantom is filtered out by grade; one HGG case is held out; the normaliser never saw it
    assert sorted(state["train_cases"] + state["validation_cases"]) == ["Phantom_000", "Phantom_001", "Phantom_003"]
    assert len(state["validation_cases"]) == 1
    assert set(ckpt.normaliser.case_ids) == set(state["train_cases"])
    best = load_checkpoint(out / "best.pt")
    assert best.training_state is None
    history = json.loads((out / "metrics.json").read_text())
    assert best.epoch == max(history, key=lambda r: r["score"])["epoch"]
    for row in history:  # per validation case: the network's own Dice (mean = the dice columns) and score terms
        assert list(row["case_dice"]) == list(row["case_score"]) == state["validation_cases"]
        for region in ("complete", "core", "enhancing"):
            assert row[f"dice_{region}"] == pytest.approx(np.mean([d[region] for d in row["case_dice"].values()]))
        assert row["score"] == pytest.approx(np.mean(list(row["case_score"].values())))


def test_mean_dice_averages_each_region_over_the_cases():
    per_case = {"a": {"complete": 1.0, "core": 0.5, "enhancing": 0.0},
                "b": {"complete": 0.5, "core": 0.25, "enhancing": 1.0}}
    assert validation.mean_dice(per_case) == {"complete": 0.75, "core": 0.375, "enhancing": 0.5}


def test_training_uses_the_configured_patch_size(cache, tmp_path):
    # the network, the training patches and the validation Dice (fast sliding window) all follow
    # sampling.patch_size; the checkpoint keeps it and segments with it
    from brats_cnn.inference.predict import predict_exact, predict_fast

    result = run_training("hgg", cache, tmp_path / "p25", config="smoke", device="cpu",
                          overrides=TINY + ["sampling.patch_size=25", "train.epochs=1", "train.validate_dice=true",
                                            "train.dice_slices=2"])
    rows = result.history
    assert len(rows) == 1 and 0.0 <= rows[0]["dice_complete"] <= 1.0 and rows[0]["train_loss"] > 0
    ckpt = load_checkpoint(tmp_path / "p25" / "last.pt")
    assert ckpt.config.sampling.patch_size == 25 and ckpt.network.patch_size == 25
    assert ckpt.network.classifier[2].in_features == 128 * 5 * 5  # LGG net: 25 -> 12 -> 5
    image, mask = np.zeros((4, 9, 8, 1), np.float32), np.ones((9, 8, 1), bool)
    image[:, 2:6, 3:5] = 1.0
    exact = predict_exact(ckpt.network, image, mask, device="cpu")
    fast = predict_fast(ckpt.network, image, mask, device="cpu")
    assert exact.shape == fast.shape == (4, 9, 8, 1)
    np.testing.assert_allclose(exact.sum(0), 1.0, atol=1e-5)


def test_a_patch_size_the_network_cannot_take_stops_before_any_work(raw_dataset, tmp_path):
    with pytest.raises(ConfigError) as err:
        run_training("hgg", raw_dataset, tmp_path / "run", config="smoke", device="cpu",
                     overrides=TINY + ["sampling.patch_size=29"])
    assert str(err.value) == ("sampling.patch_size=29 does not fit the LGG network (odd side with an odd final "
                              "feature map needed); nearest valid sizes: 25, 31")
    assert not (tmp_path / "run" / "cache").exists()


def _weights(network):
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(cache, tmp_path, monkeypatch):
    straight = run_training("hgg", cache, tmp_path / "a", config="smoke", overrides=TINY, device="cpu")

    real_seed = train.torch_seed

    def interrupt_at_epoch_two(seed, epoch, rank):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_seed(seed, epoch, rank)

    monkeypatch.setattr(train, "torch_seed", interrupt_at_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        run_training("hgg", cache, tmp_path / "b", config="smoke", overrides=TINY, device="cpu")
    monkeypatch.setattr(train, "torch_seed", real_seed)
    assert load_checkpoint(tmp_path / "b" / "last.pt").epoch == 1
    with pytest.raises(ConfigError, match="already holds last.pt"):
        run_training("hgg", cache, tmp_path / "b", config="smoke", overrides=TINY, device="cpu")
    with pytest.raises(ConfigError, match="checkpoint is for grade 'hgg' but --grade lgg") as err:
        run_training("lgg", cache, tmp_path / "b", device="cpu", resume=True)
    assert "last.pt" in str(err.value)
    # resume with data-loader workers: same batches, same weights
    resumed = run_training("hgg", cache, tmp_path / "b", overrides=["train.num_workers=2"], device="cpu",
                           resume=True)
    a, b = _weights(straight.network), _weights(resumed.network)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert resumed.history[0]["train_loss"] == straight.history[0]["train_loss"]
    assert (tmp_path / "a" / "steps.csv").read_text() == (tmp_path / "b" / "steps.csv").read_text()


def _train_until_interrupted(monkeypatch, cache, out, overrides, step):
    """Train the smoke config into ``out`` until a KeyboardInterrupt in ``step``; its last.pt training state."""
    real_step, calls = train.train_step, []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_training("hgg", cache, out, config="smoke", overrides=overrides, device="cpu")
    monkeypatch.setattr(train, "train_step", real_step)
    return load_checkpoint(out / "last.pt").training_state


def test_resume_from_a_mid_epoch_checkpoint_is_bit_identical(cache, tmp_path, monkeypatch):
    # 4 batches per epoch; validation (patch loss) every 3 steps, last.pt every 2: mid-epoch rows and
    # checkpoints, with dropout on and the configured precision (bf16 on a CPU with native bf16)
    mid = TINY + ["train.validate_every_steps=3", "train.checkpoint_every_steps=2", "train.epochs=2"]
    straight = run_training("hgg", cache, tmp_path / "a", config="smoke", overrides=mid, device="cpu")
    assert [(r["epoch"], r["step"]) for r in straight.history] == [(1, 3), (1, 4), (2, 6), (2, 8)]

    resumed = _killed_in_step_7_and_resumed(monkeypatch, cache, tmp_path, mid, straight)
    assert [(r["step"], r["train_loss"], r["val_loss"]) for r in resumed.history] == \
        [(r["step"], r["train_loss"], r["val_loss"]) for r in straight.history]


def _killed_in_step_7_and_resumed(monkeypatch, cache, tmp_path, overrides, straight):
    """Train into ``tmp_path/b`` until a kill in the 7th step (after the checkpoint at step 6, inside epoch 2
    of 4-batch epochs), resume, and check weights and step losses against the uninterrupted ``straight``
    run in ``tmp_path/a``; returns the resumed run's result."""
    state = _train_until_interrupted(monkeypatch, cache, tmp_path / "b", overrides, step=7)
    assert (state["step"], state["epoch_in_progress"], state["next_batch"]) == (6, 1, 2)
    resumed = run_training("hgg", cache, tmp_path / "b", device="cpu", resume=True)
    a, b = _weights(straight.network), _weights(resumed.network)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (tmp_path / "a" / "steps.csv").read_text() == (tmp_path / "b" / "steps.csv").read_text()
    return resumed


def test_validation_frequency_changes_no_weight_and_may_change_on_resume(cache, tmp_path, monkeypatch):
    # validation every 3 steps or only at epoch ends: the same weights and step losses, so
    # train.validate_every_steps is one of the settings --resume --set may change
    base = TINY + ["train.checkpoint_every_steps=2", "train.epochs=2", "train.validate_dice=true"]  # + whole volumes
    often = run_training("hgg", cache, tmp_path / "a", config="smoke", device="cpu",
                         overrides=base + ["train.validate_every_steps=3"])
    state = _train_until_interrupted(monkeypatch, cache, tmp_path / "b", base + ["train.validate_every_steps=3"], 3)
    assert state["step"] == 2  # the checkpoint at step 2, before the first validation
    resumed = run_training("hgg", cache, tmp_path / "b", device="cpu", resume=True,
                           overrides=["train.validate_every_steps=0"])
    assert [r["step"] for r in often.history] == [3, 4, 6, 8] and often.history[0]["dice_complete"] is not None
    assert [r["step"] for r in resumed.history] == [4, 8]  # epoch ends only from the resume on
    a, b = _weights(often.network), _weights(resumed.network)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (tmp_path / "a" / "steps.csv").read_text() == (tmp_path / "b" / "steps.csv").read_text()
    rare = run_training("hgg", cache, tmp_path / "c", config="smoke", device="cpu",
                        overrides=base + ["train.validate_every_steps=0"])
    assert [r["step"] for r in rare.history] == [4, 8]
    for key, value in _weights(rare.network).items():
        assert torch.equal(a[key], value), key


def test_patches_per_second_of_a_row_spanning_a_resume_counts_the_time_before_it(cache, tmp_path, monkeypatch):
    # a mid-epoch checkpoint at step 2 (validation at 3): the step-3 row covers steps 1-3, two of them
    # trained before the interruption; its time must include theirs, not only step 3's
    mid = TINY + ["train.validate_every_steps=3", "train.checkpoint_every_steps=2"]
    state = _train_until_interrupted(monkeypatch, cache, tmp_path / "b", mid, step=3)
    assert (state["step"], state["next_batch"], state["interval"][2]) == (2, 2, 2 * 8)
    assert state["interval_seconds"] > 0
    resumed = run_training("hgg", cache, tmp_path / "b", device="cpu", resume=True)
    row = resumed.history[0]
    assert row["step"] == 3
    assert row["epoch_seconds"] >= round(state["interval_seconds"], 3)
    # both columns are rounded (seconds to 1 ms, rate to 0.1/s): the rate must lie within what the rounded
    # seconds allow, however short the steps were on this machine
    seconds, rate = row["epoch_seconds"], row["patches_per_second"]
    assert 3 * 8 / (seconds + 5e-4) - 0.05 <= rate <= 3 * 8 / max(seconds - 5e-4, 1e-9) + 0.05


def test_resume_without_checkpoint_and_grade_mismatch(cache, tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        run_training("hgg", cache, tmp_path, device="cpu", resume=True)
    with pytest.raises(ConfigError, match="is for grade 'hgg'"):
        run_training("lgg", cache, tmp_path, config="smoke", device="cpu")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot create the run folder"):
        run_training("hgg", cache, blocker / "run", config="smoke", overrides=TINY, device="cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, cache: str, out: str, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    result = run_training("hgg", Path(cache), Path(out), config="smoke", overrides=TINY + NO_DROPOUT, device="cpu")
    torch.save(result.network.state_dict(), Path(result_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_ddp_on_gloo_keeps_ranks_identical_and_matches_one_process(cache, tmp_path):
    port = _free_port()
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(cache), str(tmp_path / "ddp"), str(tmp_path)),
                                nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert (tmp_path / "ddp" / "last.pt").is_file()
    # two ranks see the halves of the single-process batches: same training up to rounding
    single = run_training("hgg", cache, tmp_path / "single", config="smoke", overrides=TINY + NO_DROPOUT,
                          device="cpu")
    for key, value in _weights(single.network).items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-3, atol=1e-5)


def test_training_skips_an_unusable_case_and_strict_stops(tmp_path, caplog):
    from brats_cnn.cli import main
    from brats_cnn.config import load_config
    from brats_cnn.data.phantom import write_phantom_dataset

    write_phantom_dataset(tmp_path / "raw", 4, grades=["HGG"] * 4, shape=(40, 40, 16))
    broken = tmp_path / "raw" / "Phantom_002" / "Phantom_002_seg.nii.gz"
    broken.write_bytes(b"not a NIfTI file at all, just some bytes")
    config = load_config("smoke", TINY + ["data.validation_cases=1"])
    with caplog.at_level(logging.WARNING):
        data = train.prepare_data(tmp_path / "raw", tmp_path / "run", config, "hgg", None, train.Distributed())
    used = sorted(p.name for p in data.train_dirs + data.validation_dirs)
    assert used == ["Phantom_000", "Phantom_001", "Phantom_003"] and data.normaliser.n_cases == len(data.train_dirs)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings[0].startswith(f"skipping case Phantom_002: {broken}: ")
    assert warnings[1] == "training without 1 unusable case(s): Phantom_002"

    code = main(["train", "--grade", "hgg", "--data", str(tmp_path / "raw"), "--out", str(tmp_path / "strict"),
                 "--config", "smoke", "--device", "cpu", "--strict"] + sum((["--set", s] for s in TINY), []))
    assert code == 2 and not (tmp_path / "strict" / "last.pt").exists()


# ---- dense training ------------------------------------------------------------------------------

DENSE = TINY + ["train.mode=dense", "dense.crop_size=9", "dense.crops_per_epoch=12", "dense.batch_size=3"]


def test_dense_loss_is_the_weighted_cross_entropy_of_the_labelled_voxels():
    from brats_cnn.training.sampling import IGNORE_LABEL

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 3)
    labels = torch.randint(0, 4, (2, 3, 3))
    labels[0, 0, :] = IGNORE_LABEL
    weight = training_loss.dense_class_weights([0.7, 0.1, 0.15, 0.05], 1.0)
    # pi ** -1 with mean 1 over the 4 classes
    expected_w = torch.tensor([1 / 0.7, 10, 1 / 0.15, 20]) / torch.tensor([1 / 0.7, 10, 1 / 0.15, 20]).mean()
    torch.testing.assert_close(weight, expected_w.float())
    assert torch.equal(training_loss.dense_class_weights([0.7, 0.3, 0.0], 0.5)[2], torch.tensor(0.0))
    by_hand_num, by_hand_den = 0.0, 0.0
    for b in range(2):
        for i in range(3):
            for j in range(3):
                c = int(labels[b, i, j])
                if c == IGNORE_LABEL:
                    continue
                by_hand_num += -float(weight[c] * torch.log_softmax(logits[b, :, i, j], 0)[c])
                by_hand_den += float(weight[c])
    assert float(training_loss.loss_function(logits, labels, None, weight)) == pytest.approx(by_hand_num / by_hand_den,
                                                                                       rel=1e-6)
    unweighted = training_loss.loss_function(logits, labels)
    flat = logits.movedim(1, -1)[labels != IGNORE_LABEL]
    assert float(unweighted) == pytest.approx(float(torch.nn.functional.cross_entropy(flat, labels[labels >= 0])))


def test_dense_training_resumes_bit_identically_and_starts_from_init_weights(cache, tmp_path, monkeypatch):
    # 4 crop batches per epoch, last.pt every 2 steps: a kill inside epoch 2 resumes to the same weights
    mid = DENSE + ["train.checkpoint_every_steps=2", "train.epochs=2"]
    straight = run_training("hgg", cache, tmp_path / "a", config="smoke", overrides=mid, device="cpu")
    assert [(r["epoch"], r["step"]) for r in straight.history] == [(1, 4), (2, 8)]
    assert all(np.isfinite(r["train_loss"]) and 0 < r["train_accuracy"] <= 1 for r in straight.history)
    _killed_in_step_7_and_resumed(monkeypatch, cache, tmp_path, mid, straight)
    a = _weights(straight.network)
    # the checkpoint is an ordinary patch network: it loads and segments like any other
    assert load_checkpoint(tmp_path / "a" / "last.pt").network.architecture == "lgg"

    # init_weights: with a zero learning-rate range the run ends where it started
    frozen = DENSE + [f"train.init_weights={tmp_path / 'a' / 'last.pt'}", "train.lr_start=1e-12",
                      "train.lr_end=1e-12", "model.dropout=0.0"]
    tuned = run_training("hgg", cache, tmp_path / "c", config="smoke", overrides=frozen, device="cpu")
    for key, value in _weights(tuned.network).items():
        torch.testing.assert_close(value, a[key], rtol=0, atol=1e-9)
    with pytest.raises(ConfigError, match="holds a LGG network with 4 classes .* this run trains a HGG") as err:
        run_training("hgg", cache, tmp_path / "d", config="smoke", device="cpu",
                     overrides=[o for o in frozen if not o.startswith("model.architecture")])
    assert str(tmp_path / "a" / "last.pt") in str(err.value)
    assert not (tmp_path / "d" / "last.pt").exists()
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pt"):
        run_training("hgg", cache, tmp_path / "e", config="smoke", device="cpu",
                     overrides=DENSE + [f"train.init_weights={tmp_path / 'broken.pt'}"])


def test_second_phase_trains_only_the_output_layer_on_natural_centres(cache, tmp_path, caplog):
    # Havaei et al.'s second phase: init_weights from a first run, natural-frequency centres, only the
    # last fully connected layer changes
    first = run_training("hgg", cache, tmp_path / "a", config="smoke", device="cpu",
                         overrides=TINY + ["train.epochs=1"])
    before = _weights(first.network)
    phase = TINY + ["train.epochs=1", "sampling.centres=natural", "train.trainable=output",
                    f"train.init_weights={tmp_path / 'a' / 'last.pt'}"]
    with caplog.at_level(logging.INFO):
        second = run_training("hgg", cache, tmp_path / "b", config="smoke", device="cpu", overrides=phase)
    assert "trainable: output layer only (1028 parameters)" in caplog.text   # 256 x 4 classes + 4 biases
    after = _weights(second.network)
    changed = sorted(key for key in after if not torch.equal(after[key], before[key]))
    assert changed == ["classifier.8.bias", "classifier.8.weight"]
    counts = [int(n) for n in caplog.text.split("training centres per class: [")[-1].split("]")[0].split(",")]
    assert sum(counts) == 32 and counts[0] > counts[3]             # natural: background dominates
    assert load_checkpoint(tmp_path / "b" / "last.pt").config.train.trainable == "output"


def test_loader_workers_auto_is_zero_on_the_cpu_and_bounded_on_cuda(monkeypatch):
    from brats_cnn.training.train import CUDA_LOADER_WORKERS, loader_workers

    assert load_config("pereira_hgg").train.num_workers is None
    assert load_config("pereira_hgg", ["train.num_workers=null"]).train.num_workers is None
    assert load_config("pereira_hgg", ["train.num_workers=3"]).train.num_workers == 3
    with pytest.raises(ConfigError, match="train.num_workers"):
        load_config("pereira_hgg", ["train.num_workers=-1"])
    assert loader_workers(None, torch.device("cpu")) == 0
    assert loader_workers(3, torch.device("cpu")) == 3
    assert loader_workers(0, torch.device("cuda")) == 0
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert loader_workers(None, torch.device("cuda")) == CUDA_LOADER_WORKERS == 4
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert loader_workers(None, torch.device("cuda")) == 2


def test_make_loader_takes_its_workers_from_loader_workers(cache):
    from brats_cnn.training.benchmark import _pipeline_batches
    from brats_cnn.training.train import make_loader

    data = _pipeline_batches(cache, load_config("smoke", ["sampling.patch_size=9"]), batch_size=4, batches=2)
    auto = make_loader(data, load_config("smoke", ["train.num_workers=null"]), torch.device("cpu"), seed=0)
    two = make_loader(data, load_config("smoke", ["train.num_workers=2"]), torch.device("cpu"), seed=0)
    assert (auto.num_workers, two.num_workers) == (0, 2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(auto, two))


def test_a_context_pathway_trains_on_the_wider_patches_and_its_checkpoint_segments(cache, tmp_path):
    # model.context=3: the training patches are 3 x 9 = 27 wide, the checkpoint rebuilds the two
    # pathways, and fast mode (the dense form of both) gives the same probabilities as exact mode
    # would on its own wide patches (checked to equality in test_segment with centre-tap weights)
    from brats_cnn.inference.predict import predict_exact, predict_fast

    result = run_training("hgg", cache, tmp_path / "ctx", config="smoke", device="cpu",
                          overrides=TINY + ["sampling.patch_size=9", "model.context=3", "train.epochs=1"])
    assert result.history[0]["train_loss"] > 0
    ckpt = load_checkpoint(tmp_path / "ctx" / "last.pt")
    net = ckpt.network
    assert (ckpt.config.model.context, net.context, net.input_size) == (3, 3, 27)
    assert net.classifier[2].in_features == (128 + 64) * 1 * 1  # LGG: 9 -> 4 -> 1, main and context
    image, mask = np.random.default_rng(0).normal(size=(4, 9, 8, 2)).astype(np.float32), np.ones((9, 8, 2), bool)
    exact = predict_exact(net, image, mask, device="cpu")
    fast = predict_fast(net, image, mask, device="cpu")
    assert exact.shape == fast.shape == (4, 9, 8, 2)
    np.testing.assert_allclose(fast.sum(0), 1.0, atol=1e-5)
    # dense training has no context pathway: refused before any work
    with pytest.raises(ConfigError, match="model.context=3 .* train.mode: patch only"):
        run_training("hgg", cache, tmp_path / "dense", config="smoke", device="cpu",
                     overrides=TINY + ["model.context=3", "train.mode=dense"])
    assert not (tmp_path / "dense").exists()
