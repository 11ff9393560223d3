"""The bundled HGG/LGG checkpoints (brats_cnn/weights/) load and segment through `--grade`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_cnn.data.phantom import write_phantom_dataset
from brats_cnn.inference.members import bundled_weights
from brats_cnn.network.checkpoint import load_checkpoint
from brats_cnn.network.model import count_parameters

REPO = Path(__file__).resolve().parents[1]

# 4 outputs: the brats2017 convention (0, 1, 2, 4) the bundled model was trained in; the paper's HGG
# network (2,117,956) plus the context pathway of model.context 3 (v11).
HGG_PARAMETERS = 3_032_804


@pytest.mark.parametrize("grade", ["hgg", "lgg"])
def test_bundled_checkpoint_is_the_papers_hgg_network_with_context_normaliser_and_calibration(grade):
    checkpoint = load_checkpoint(bundled_weights(grade))  # LGG cases get the HGG model too (docs/results.md)
    assert checkpoint.grade == "hgg"
    assert checkpoint.network.architecture == "hgg"
    assert count_parameters(checkpoint.network) == HGG_PARAMETERS
    assert checkpoint.config.model.dropout == 0.1 and checkpoint.config.model.context == 3
    frequencies = checkpoint.calibration["class_frequencies"]  # the prior correction segment applies
    assert len(frequencies) == 4 and abs(sum(frequencies) - 1) < 1e-9 and frequencies[0] > 0.9
    assert checkpoint.config.segment.prior_alpha > 0
    assert checkpoint.label_convention == "brats2017"
    assert checkpoint.channel_order == ("t1", "t1c", "t2", "flair")
    assert checkpoint.training_state is None  # shipped weights carry no optimiser state
    assert checkpoint.normaliser.channel_order == ("t1", "t1c", "t2", "flair")


def _segment_phantom(tmp_path, grade: str, *options: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """``brats-cnn segment`` (fast mode, no post-processing) on a one-case phantom of ``grade``; the run,
    the phantom's first image and the output path."""
    refs = write_phantom_dataset(tmp_path / "data", 1, seed=3, shape=(40, 40, 10), grades=[grade])
    out = tmp_path / "seg.nii.gz"
    result = subprocess.run([sys.executable, "-m", "brats_cnn.cli", *options, str(refs[0].image_paths[0]),
                             "--out", str(out), "--mode", "fast", "--no-postprocess"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result, Path(refs[0].image_paths[0]), out


def test_segment_with_grade_uses_the_bundled_model(tmp_path):
    _, image, out = _segment_phantom(tmp_path, "HGG", "-q", "segment", "--grade", "hgg")
    labels = np.asarray(nib.load(out).dataobj)
    assert labels.shape == (40, 40, 10)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4}
    source = nib.load(image)
    np.testing.assert_allclose(nib.load(out).affine, source.affine)


def test_segment_without_grade_or_model_uses_the_bundled_hgg_model_with_one_notice(tmp_path):
    result, _, out = _segment_phantom(tmp_path, "HGG", "segment")
    notices = [line for line in result.stderr.splitlines() if "no --grade or --model" in line]
    assert notices == ["WARNING brats_cnn.inference.members: no --grade or --model given: using the bundled HGG model "
                       "(the default for cases of unknown grade; see docs/results.md)"]
    sidecar = json.loads(out.with_name("seg.json").read_text())
    assert sidecar["grade"] == "hgg" and sidecar["model"] == str(bundled_weights("hgg"))
    # the unknown-grade rule (chosen on both grades), not the HGG one the checkpoint carries
    assert sidecar["prior_alpha"] == 0.4 != load_checkpoint(bundled_weights("hgg")).config.segment.prior_alpha


def test_segment_with_grade_lgg_uses_the_bundled_hgg_model_with_one_notice(tmp_path):
    result, _, out = _segment_phantom(tmp_path, "LGG", "segment", "--grade", "lgg")
    notices = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert notices == ["WARNING brats_cnn.inference.members: --grade lgg: using the bundled HGG model, which scores better "
                       "on LGG cases than the paper's LGG network trained on the sample (see docs/results.md)"]
    sidecar = json.loads(out.with_name("seg.json").read_text())
    assert sidecar["grade"] == "hgg" and sidecar["model"] == str(bundled_weights("hgg"))
    hgg = load_checkpoint(bundled_weights("hgg")).config
    assert sidecar["prior_alpha"] == 0 != hgg.segment.prior_alpha  # LGG's rule, not HGG's
    assert sidecar["tta"] == "never"  # the LGG rule chose no TTA on any device; --tta still asks for it
    assert hgg.segment.class_weights == () and hgg.postprocess.keep_largest is False
    assert hgg.postprocess.require_core is True


# The cross-validation whose grid chose the bundled rules, and the fold config it ran (v11's recipe, half its schedule).
CHOSEN_CV = REPO / "benchmarks" / "results" / "cv4_context"
CHOSEN_CV_CONFIG = REPO / "pipelines" / "configs" / "cv_hgg_context.yaml"


def _grid_rule(population: str) -> dict[str, str]:
    grid = json.loads((CHOSEN_CV / "grid.json").read_text())
    return dict(item.split("=") for item in grid[population]["rule"].split())


@pytest.mark.parametrize("grade, population", [("hgg", "hgg"), ("lgg", "lgg"), (None, "all")])
def test_the_bundled_rules_are_the_ones_cross_validation_chose(grade, population):
    """Each grade's settings, after BUNDLED_MODELS' overrides, equal the rule chosen on the out-of-fold cases."""
    from brats_cnn.config import config_to_dict, load_config
    from brats_cnn.data.labels import get_convention
    from brats_cnn.inference.members import BUNDLED_MODELS, UNKNOWN_GRADE

    rule = _grid_rule(population)
    name, overrides = BUNDLED_MODELS[grade or UNKNOWN_GRADE]
    checkpoint = load_checkpoint(bundled_weights(grade or UNKNOWN_GRADE))
    config = load_config(None, list(overrides), base=config_to_dict(checkpoint.config))
    assert config.segment.prior_alpha == float(rule["alpha"]) and config.segment.prior_adapt is False
    weights = list(config.segment.class_weights) or [1.0] * 4
    edema = get_convention(checkpoint.label_convention).tissues.index("edema")
    assert weights[edema] == float(rule["edema_boost"]) and sum(weights) - weights[edema] == 3.0
    assert config.postprocess.min_component_voxels == int(rule["t_vol"])
    assert config.postprocess.keep_largest is (rule["keep_largest"] == "True")
    assert config.postprocess.require_core is (rule.get("require_core") == "True")  # absent: a grid before it
    assert (tuple(config.segment.tta_rotations) != (0,) and config.segment.tta != "never") is (rule["tta"] == "on")
    # the grid's probabilities came from the fold models' planes: the bundled model segments over the same
    folds = load_config(CHOSEN_CV_CONFIG)
    assert config.segment.views == folds.segment.views == ("axial", "coronal", "sagittal")
    assert checkpoint.config.sampling.planes == folds.sampling.planes
    assert checkpoint.config.model.context == folds.model.context == 3  # the grid's fold models' network


def test_tta_flag_overrides_the_lgg_rules_no_tta(tmp_path):
    _, _, out = _segment_phantom(tmp_path, "LGG", "-q", "segment", "--grade", "lgg", "--tta")
    sidecar = json.loads(out.with_name("seg.json").read_text())
    assert sidecar["tta"] == "always" and sidecar["tta_rotations"] == [0, 90, 180, 270]
