"""Skip-existing never trusts a stale, foreign or broken output (issue 39, item 1 and 9), and the
sharded segment (--shard, torchrun ranks) uses the same rule."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_cnn.errors import ConfigError
from brats_cnn.inference.segment import parse_shard, run_segment, shard_pairs

SHAPE = (36, 36, 6)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "brats_cnn.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def _case_copy(ref, folder: Path) -> Path:
    source = Path(ref.image_paths[0]).parent
    shutil.copytree(source, folder / source.name)
    return folder / source.name


def test_another_cases_output_is_refused_naming_the_case_it_holds(phantom_setup, tmp_path):
    root, refs, model = phantom_setup
    out = tmp_path / "pred.nii.gz"
    run_segment([refs[0].image_paths[0].parent], model=model, out=out, device="cpu")
    before = out.read_bytes()
    result = _cli("segment", str(refs[1].image_paths[0].parent), "--model", str(model), "--out", str(out),
                  "--device", "cpu")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"holds the segmentation of case '{refs[0].case_id}', not '{refs[1].case_id}'" in lines[0]
    assert str(out) in lines[0] and out.read_bytes() == before
    run_segment([refs[1].image_paths[0].parent], model=model, out=out, device="cpu", overwrite=True)
    assert json.loads(out.with_name("pred.json").read_text())["case_id"] == refs[1].case_id


def test_a_rerun_skips_only_what_its_outputs_prove(phantom_setup, tmp_path, caplog):
    root, refs, model = phantom_setup
    case = _case_copy(refs[0], tmp_path / "in")
    out = tmp_path / "seg.nii.gz"
    first = run_segment([case], model=model, out=out, device="cpu")
    assert first.outputs == [out]
    proof = json.loads(out.with_name("seg.json").read_text())["provenance"]
    assert proof["case_id"] == refs[0].case_id and len(proof["inputs"]) == 4
    assert proof["models"] == {str(model): __import__("hashlib").sha256(Path(model).read_bytes()).hexdigest()}
    assert proof["outputs"]["labels"]["size"] == out.stat().st_size
    assert run_segment([case], model=model, out=out, device="cpu").skipped == [out]  # unchanged: skipped

    def rerun(**kwargs):
        caplog.clear()
        with caplog.at_level("INFO"):
            result = run_segment([case], model=model, out=out, device="cpu", **kwargs)
        return result, caplog.text

    # a truncated output is recomputed
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    result, said = rerun()
    assert result.outputs == [out] and "labels output does not verify (truncated or changed)" in said
    assert out.read_bytes() == data
    # the case's own sequences replaced (same name): recomputed
    flair = next(p for p in case.iterdir() if "flair" in p.name)
    image = nib.load(flair)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[::-1].copy(), image.affine, image.header), flair)
    result, said = rerun()
    assert result.outputs == [out] and f"input {flair.name} changed since it was computed" in said
    # asking for more (probabilities) or for other outputs (label convention) recomputes
    result, said = rerun(save_probabilities=True)
    assert result.outputs == [out] and "its probabilities output was not requested then" in said
    assert out.with_name("seg_probabilities.nii.gz").is_file()
    result, said = rerun(label_convention="brats2023")
    assert result.outputs == [out] and "other settings (label_convention)" in said
    # a rerun that asks for less than was written skips
    assert rerun(label_convention="brats2023")[0].skipped == [out]
    # a sidecar without provenance (an older version) is not trusted
    sidecar = json.loads(out.with_name("seg.json").read_text())
    del sidecar["provenance"]
    out.with_name("seg.json").write_text(json.dumps(sidecar))
    result, said = rerun(label_convention="brats2023")
    assert result.outputs == [out] and "without a provenance record" in said


def test_temporary_files_of_a_killed_run_are_removed_by_the_next(phantom_setup, tmp_path):
    root, refs, model = phantom_setup
    out = tmp_path / "seg.nii.gz"
    run_segment([refs[2].image_paths[0].parent], model=model, out=out, device="cpu")
    left = [tmp_path / ".seg_probabilities.k1ll3d.tmp.nii.gz", tmp_path / ".seg.x7y8z9.tmp.nii.gz",
            tmp_path / ".seg.a1b2c3.tmp.json"]
    other = tmp_path / ".seg_other.q1w2e3.tmp.nii.gz"  # not an output of this case: kept
    for path in (*left, other):
        path.write_bytes(b"partial")
    result = run_segment([refs[2].image_paths[0].parent], model=model, out=out, device="cpu",
                         save_probabilities=True)
    assert result.outputs == [out]
    assert not any(path.exists() for path in left) and other.exists()


def test_shards_split_the_cases_and_compose_with_ranks():
    pairs = list(range(10))
    assert shard_pairs(pairs, (1, 3), 0, 1) == [1, 4, 7]
    assert shard_pairs(pairs, None, 1, 2) == [1, 3, 5, 7, 9]
    assert shard_pairs(pairs, (0, 2), 1, 2) == [2, 6]
    union = sorted(c for k in range(3) for c in shard_pairs(pairs, (k, 3), 0, 1))
    assert union == pairs
    assert parse_shard("2/4") == (2, 4) and parse_shard(None) is None
    for bad in ("4/4", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)


def test_two_shards_and_two_processes_fill_one_folder_and_a_rerun_finishes_what_is_left(phantom_setup, tmp_path):
    root, refs, model = phantom_setup
    out = tmp_path / "out"
    common = ["--model", str(model), "--out", str(out), "--device", "cpu"]
    first = _cli("segment", str(root / "data"), "--shard", "1/2", *common)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{refs[1].case_id}.nii.gz"]
    # two processes at once, as torchrun launches them (RANK / WORLD_SIZE / LOCAL_RANK), one folder
    procs = [subprocess.Popen([sys.executable, "-m", "brats_cnn.cli", "segment", str(root / "data"), *common],
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _ in results), results
    assert "skipped 1 case(s)" in results[1][1]  # rank 1 takes cases 1: done by the shard run
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(f"{r.case_id}.nii.gz" for r in refs)
    for ref in refs:
        assert json.loads((out / f"{ref.case_id}.json").read_text())["case_id"] == ref.case_id
    again = _cli("segment", str(root / "data"), *common)
    assert again.returncode == 0 and "skipped 3 case(s)" in again.stderr
    bad = _cli("segment", str(root / "data"), "--shard", "2/2", *common)
    assert bad.returncode == 2 and "--shard K/N needs 0 <= K < N, got '2/2'" in bad.stderr


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_two_cpu_processes_segment_a_dataset(phantom_setup, tmp_path):
    root, refs, model = phantom_setup
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "brats_cnn.cli", "segment",
                             str(root / "data"), "--model", str(model), "--out", str(tmp_path / "out"),
                             "--device", "cpu"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(rank 0 of 2)" in result.stderr and "(rank 1 of 2)" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == sorted(f"{r.case_id}.nii.gz" for r in refs)


def test_an_upper_case_suffix_names_a_file_not_a_folder(phantom_setup, tmp_path):
    root, refs, model = phantom_setup
    out = tmp_path / "x" / "CASE.NII.GZ"
    result = run_segment([refs[0].image_paths[0].parent], model=model, out=out, device="cpu")
    assert result.outputs == [out] and out.is_file()
    assert (tmp_path / "x" / "CASE.json").is_file()
    assert nib.load(out).shape == SHAPE


def test_a_volume_too_small_for_n4_is_refused_with_its_size_and_the_minimum(tmp_path):
    from brats_cnn.config import load_config
    from brats_cnn.network.model import build_network
    from brats_cnn.network.checkpoint import save_checkpoint
    from brats_cnn.preprocessing.normalise import fit_normaliser
    from brats_cnn.data.phantom import make_phantom, write_phantom_dataset

    config = load_config("smoke")  # N4 on T1 and T1c, shrink factor 4
    state = fit_normaliser([make_phantom((36, 36, 12), seed=1)], config)
    network = build_network(config.model, 4, patch_size=config.sampling.patch_size)
    model = save_checkpoint(tmp_path / "n4.pt", network=network, config=config, normaliser=state,
                            label_convention="brats2017")
    (ref,) = write_phantom_dataset(tmp_path / "thin", 1, seed=2, shape=(36, 36, 2))
    out = tmp_path / "seg.nii.gz"
    result = _cli("segment", str(ref.image_paths[0].parent), "--model", str(model), "--out", str(out),
                  "--device", "cpu")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("brats-cnn: error:")]
    assert len(errors) == 1 and "the volume is 36x36x2 voxels; N4 with shrink factor 4 needs at least 8 voxels " \
                                "along every axis" in errors[0]
    assert "ITK" not in result.stderr and "SimpleITK-build" not in result.stderr and not out.exists()


def test_invalid_class_frequencies_are_refused_when_the_model_is_loaded(phantom_setup, tmp_path, monkeypatch):
    from brats_cnn.inference import members
    from brats_cnn.config import config_to_dict, load_config
    from brats_cnn.network.checkpoint import load_checkpoint, save_checkpoint

    root, refs, model = phantom_setup
    good = load_checkpoint(model)
    config = load_config(None, ["segment.prior_alpha=0.8"], base=config_to_dict(good.config))
    bad = save_checkpoint(tmp_path / "bad.pt", network=good.network, config=config, normaliser=good.normaliser,
                          label_convention="brats2017", calibration={"class_frequencies": [0.9, float("nan"), 0.05, 0.05]})
    predicted = []
    monkeypatch.setattr(members, "predict", lambda *a, **k: predicted.append(1))
    with pytest.raises(ConfigError, match=r"invalid class frequencies .* \(need 4 finite values > 0\)"):
        run_segment([refs[0].image_paths[0].parent], model=bad, out=tmp_path / "s.nii.gz", device="cpu")
    assert predicted == [] and not (tmp_path / "s.nii.gz").exists()


@pytest.mark.parametrize(("error", "said"), [
    (MemoryError(), "brats-cnn: error: out of memory; a whole case needs about 2.5 GB"),
    (ImportError("libSimpleITK.so: failed to map segment from shared object", name="SimpleITK"),
     "brats-cnn: error: cannot load SimpleITK (libSimpleITK.so: failed to map segment from shared object); a native "
     "library failed to load: check the memory limit (ulimit -v)")])
def test_memory_and_native_import_failures_are_one_line(monkeypatch, capsys, error, said, tmp_path):
    from brats_cnn import cli
    from brats_cnn.inference import segment

    def fail(**kwargs):
        raise error

    monkeypatch.setattr(segment, "run_segment", fail)
    assert cli.main(["segment", str(tmp_path), "--device", "cpu"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.strip().splitlines() == [stderr.strip()] and stderr.startswith(said)
