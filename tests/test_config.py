"""Tests for brats_cnn.config: the paper's numbers, validation errors, --set overrides, YAML round trip."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from brats_cnn import config as C
from brats_cnn.errors import ConfigError


def _error(func, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        func(*args, **kwargs)
    return str(info.value)


def _leaf_keys(values: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in values.items():
        keys += _leaf_keys(value, f"{prefix}{name}.") if isinstance(value, dict) else [prefix + name]
    return keys


@pytest.mark.parametrize("grade", ["hgg", "lgg"])
def test_the_paper_configs_list_every_key_marked_paper_or_choice(grade):
    # README: every number of the method lives in configs/pereira_<grade>.yaml, marked (paper) or (choice)
    path = C.bundled_config_dir() / f"pereira_{grade}.yaml"
    written = _leaf_keys(yaml.safe_load(path.read_text()))
    missing = sorted(set(_leaf_keys(C.config_to_dict(C.default_config(grade)))) - set(written))
    assert not missing, f"add {missing} to {path.name}, each marked (paper) or (choice)"
    values = [line for line in path.read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":")]
    unmarked = [line for line in values[2:] if "(paper" not in line and "(choice" not in line]  # after name, grade
    assert not unmarked and len(values) == len(written)


@pytest.mark.parametrize("grade,epochs,dropout,t_vol,patches,architecture", [
    ("hgg", 20, 0.1, 10_000, 450_000, "hgg"),
    ("lgg", 25, 0.5, 3_000, 335_000, "lgg"),
])
def test_defaults_are_the_paper_numbers(grade, epochs, dropout, t_vol, patches, architecture):
    for config in (C.default_config(grade), C.default_config(grade.upper()), C.load_config(f"pereira_{grade}")):
        assert config.name == f"pereira_{grade}" and config.grade == grade
        assert config.train.epochs == epochs
        assert config.model.dropout == dropout and config.model.architecture == architecture
        assert config.postprocess.min_component_voxels == t_vol
        assert config.sampling.total_patches == patches
        assert config.train.lr_start == 0.003 and config.train.lr_end == 0.00003
        assert config.train.momentum == 0.9 and config.train.batch_size == 128
        assert config.model.leaky_relu_slope == 0.333
        assert config.sampling.patch_size == 33
        assert config.sampling.rotation_angles == (0, 90, 180, 270)
        assert config.preprocess.n4.sequences == ("t1", "t1c") and config.preprocess.n4.shrink_factor == 4
        assert config.preprocess.nyul.pc1 == 1 and config.preprocess.nyul.pc2 == 99
        assert config.preprocess.nyul.landmarks == (10, 20, 30, 40, 50, 60, 70, 80, 90)
        assert (config.preprocess.nyul.s1, config.preprocess.nyul.s2) == (0, 100)
        assert config.data.channel_order == ("t1", "t1c", "t2", "flair")
        assert config.postprocess.connectivity == 1


def test_dataclass_defaults_are_the_hgg_paper_config():
    assert C.Config() == C.default_config("hgg")
    assert C.load_config() == C.Config()


def test_configs_are_frozen():
    config = C.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.epochs = 3  # type: ignore[misc]


def test_smoke_config_is_small():
    smoke = C.load_config("smoke")
    assert smoke.train.epochs == 2 and smoke.sampling.total_patches == 4000
    assert smoke.preprocess.n4.iterations == (20, 20)
    assert smoke.model.architecture == "hgg"


def test_unknown_key():
    known = ", ".join(sorted(f.name for f in dataclasses.fields(C.TrainConfig)))
    assert "epochs" in known and "lr_start" in known
    assert _error(C.config_from_dict, {"train": {"epoch": 3}}, "x.yaml") == (
        f"x.yaml: unknown config key 'train.epoch' (known keys in this section: {known})")
    assert _error(C.config_from_dict, {"trian": {}}).startswith("<config>: unknown config key 'trian'")


@pytest.mark.parametrize("values,message", [
    ({"train": {"epochs": "ten"}}, "key 'train.epochs' must be int, got str 'ten'"),
    ({"train": {"epochs": 2.5}}, "key 'train.epochs' must be int, got float 2.5"),
    ({"train": {"epochs": True}}, "key 'train.epochs' must be int, got bool True"),
    ({"compute": {"channels_last": 1}}, "key 'compute.channels_last' must be bool, got int 1"),
    ({"train": {"lr_start": "fast"}}, "key 'train.lr_start' must be float, got str 'fast'"),
    ({"train": 3}, "key 'train' must be a mapping, got int 3"),
    ({"sampling": {"rotation_angles": 90}}, "key 'sampling.rotation_angles' must be a list, got int 90"),
    ({"sampling": {"rotation_angles": [0, "x"]}}, "key 'sampling.rotation_angles[1]' must be int, got str 'x'"),
    ({"name": 5}, "key 'name' must be str, got int 5"),
])
def test_wrong_type(values, message):
    assert _error(C.config_from_dict, values, "c.yaml") == f"c.yaml: {message}"


@pytest.mark.parametrize("values,message", [
    ({"grade": "gbm"}, "key 'grade' must be one of ['hgg', 'lgg'], got 'gbm'"),
    ({"model": {"architecture": "unet"}}, "key 'model.architecture' must be one of ['hgg', 'lgg'], got 'unet'"),
    ({"segment": {"mode": "slow"}}, "key 'segment.mode' must be one of ['auto', 'exact', 'fast'], got 'slow'"),
    ({"data": {"label_convention": "brats2020"}},
     "key 'data.label_convention' must be one of ['brats2013', 'brats2017', 'brats2023', 'msd'], got 'brats2020'"),
    ({"postprocess": {"connectivity": 4}}, "key 'postprocess.connectivity' must be one of [1, 2, 3], got 4"),
    ({"preprocess": {"cache_dtype": "int8"}},
     "key 'preprocess.cache_dtype' must be one of ['float16', 'float32'], got 'int8'"),
])
def test_bad_choice(values, message):
    assert _error(C.config_from_dict, values, "c.yaml") == f"c.yaml: {message}"


def test_overrides_of_each_type():
    config = C.load_config("pereira_lgg", ["train.epochs=3", "train.lr_start=0.01", "model.dropout=0",
                                           "sampling.rotation_angles=[0, 180]", "compute.channels_last=false",
                                           "preprocess.n4.sequences=[t1]", "name=my run",
                                           "train.lr_end=3e-5"])
    assert config.train.epochs == 3 and isinstance(config.train.epochs, int)
    assert config.train.lr_start == 0.01
    assert config.model.dropout == 0.0 and isinstance(config.model.dropout, float)  # int accepted for float
    assert config.sampling.rotation_angles == (0, 180)
    assert config.compute.channels_last is False
    assert config.preprocess.n4.sequences == ("t1",)
    assert config.name == "my run"
    assert config.train.lr_end == 3e-5  # PyYAML reads "3e-5" as a string; accepted as a float
    # untouched values keep the file's
    assert config.train.batch_size == 128 and config.postprocess.min_component_voxels == 3000


def test_parse_overrides_nests_keys():
    assert C.parse_overrides(["a.b.c=1", "a.b.d=x", "e=[1, 2]", "f="]) == (
        {"a": {"b": {"c": 1, "d": "x"}}, "e": [1, 2], "f": ""})


def test_bad_overrides():
    assert _error(C.load_config, None, ["train.epochs"]) == "--set: --set expects key=value, got 'train.epochs'"
    assert _error(C.load_config, None, ["train.epochs=2.5"]) == "--set: key 'train.epochs' must be int, got float 2.5"
    assert _error(C.load_config, None, ["train.nope=1"]).startswith("--set: unknown config key 'train.nope'")
    assert _error(C.load_config, None, ["segment.mode=slow"]) == (
        "--set: key 'segment.mode' must be one of ['auto', 'exact', 'fast'], got 'slow'")
    assert _error(C.load_config, None, ["train.lr_end=nan"]) == "--set: key 'train.lr_end' must be float, got str 'nan'"
    assert _error(C.parse_overrides, ["train=1", "train.epochs=2"]) == (
        "--set: --set key 'train.epochs' conflicts with another --set")


def test_yaml_round_trip(tmp_path):
    config = C.load_config("pereira_lgg", ["train.epochs=7", "sampling.arbitrary_rotation=true",
                                           "train.lr_end=0.00001"])
    path = C.save_config(config, tmp_path / "run" / "config.yaml")
    assert path == tmp_path / "run" / "config.yaml"
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]  # atomic: no temp file left
    assert C.load_config(path) == config
    assert yaml.safe_load(path.read_text())["train"]["epochs"] == 7
    assert C.config_from_dict(C.config_to_dict(config)) == config


def test_partial_file_takes_defaults_and_base(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 4\n")
    config = C.load_config(path, base={"model": {"dropout": 0.25}, "train": {"epochs": 9, "seed": 5}})
    assert config.train.epochs == 4 and config.train.seed == 5  # file wins over base; base over defaults
    assert config.model.dropout == 0.25 and config.train.batch_size == 128


def test_bad_files(tmp_path):
    missing = tmp_path / "none.yaml"
    assert _error(C.load_config, missing).startswith(f"{missing}: config file not found (give a YAML path or one of: ")
    listed = _error(C.load_config, missing).rsplit("one of: ", 1)[1].rstrip(")").split(", ")
    assert {"pereira_hgg", "pereira_lgg", "smoke"} <= set(listed) and listed == sorted(listed)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    assert _error(C.load_config, bad).startswith(f"{bad}: not valid YAML (")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    assert _error(C.load_config, listing) == f"{listing}: a config file must be a YAML mapping"
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert C.load_config(empty) == C.Config()


def test_retired_precision_keys_are_dropped_from_stored_configs_but_refused_from_users(tmp_path):
    # checkpoints written before the compute section hold train.amp / segment.cpu_bf16: they still load
    stored = C.config_from_dict({"train": {"amp": True, "epochs": 3}, "segment": {"amp": True, "cpu_bf16": False}})
    assert stored.train.epochs == 3 and stored.compute == C.ComputeConfig()
    message = "config key 'train.amp' was replaced by 'compute.precision' (auto, bf16 or float32)"
    assert _error(C.load_config, None, ["train.amp=false"]) == f"--set: {message}"
    path = tmp_path / "old.yaml"
    path.write_text("segment:\n  cpu_bf16: false\n")
    assert _error(C.load_config, path) == (f"{path}: config key 'segment.cpu_bf16' was replaced by "
                                          "'compute.precision' (auto, bf16 or float32)")
    assert _error(C.load_config, None, ["compute.precision=fp16"]) == (
        "--set: key 'compute.precision' must be one of ['auto', 'bf16', 'float32'], got 'fp16'")


# ---- ranges: every field of every config dataclass (issue 14) --------------------------------------

def _fields(cls: type, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += _fields(type(default), f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, default))
    return out


# one value outside each kind of range, and the boundary value that is still valid
_OUTSIDE = {">= 0": (-1, 0), ">= 1": (0, 1), "finite and > 0": (0, 1e-9), "in [0, 1]": (1.5, 1.0),
            "in [0, 1)": (1.0, 0.0), "in (0, 1]": (0.0, 1.0), "finite": (float("nan"), -1e6),
            "multiples of 90 degrees": (45, 270), "sequences from t1, t1c, t2, flair": ("t3", "t2"),
            "planes from axial, coronal, sagittal": ("oblique", "sagittal")}


def _yaml(value: object) -> str:
    return ".nan" if value != value else str(value)


def test_every_config_field_has_a_range_a_choice_or_is_free():
    fields = _fields(C.Config)
    assert len(fields) >= 50
    unchecked = [key for key, _ in fields if key not in C._RANGES and key not in C._CHOICES
                 and key not in C._FREE_KEYS]
    assert not unchecked, f"give these config keys a range in config._RANGES: {unchecked}"
    assert set(C._RANGES) <= {key for key, _ in fields}


@pytest.mark.parametrize("key", sorted(C._RANGES))
def test_a_value_outside_the_range_is_one_config_error_naming_the_key(key):
    test, expected = C._RANGES[key]
    bad, boundary = _OUTSIDE[expected]
    default = dict(_fields(C.Config))[key]
    as_list = isinstance(default, tuple)
    # the defaults are in range (null, "not set", passes: evaluate.lesion_wise.* take the preset's value then)
    assert all(test(v) for v in default) if as_list else (default is None or test(default))
    override = f"{key}=[{_yaml(bad)}]" if as_list else f"{key}={_yaml(bad)}"
    message = _error(C.load_config, "smoke", [override])
    assert f"key '{key}'" in message and expected in message and message.startswith("--set: ")
    if not key.startswith("preprocess.nyul."):  # there the relations pc1 < ... < pc2 decide, see below
        value = [boundary] if as_list else boundary
        if key == "data.channel_order":
            value = ["t2", "t1", "t1c", "flair"]
        loaded = C.load_config("smoke", [f"{key}={value}".replace("'", "")])
        node = loaded
        for part in key.split("."):
            node = getattr(node, part)
        assert node == (tuple(value) if as_list else value)


def test_ranges_from_the_issue_and_from_a_yaml_file(tmp_path):
    for override, phrase in [("segment.batch_size=-1", "key 'segment.batch_size' must be >= 1, got -1"),
                             ("segment.batch_size=0", "key 'segment.batch_size' must be >= 1, got 0"),
                             ("segment.slices_per_batch=-3", "must be >= 1, got -3"),
                             ("train.batch_size=-64", "key 'train.batch_size' must be >= 1, got -64"),
                             ("train.epochs=0", "key 'train.epochs' must be >= 1, got 0"),
                             ("train.lr_start=.nan", "key 'train.lr_start' must be finite and > 0, got nan"),
                             ("train.lr_end=0", "key 'train.lr_end' must be finite and > 0, got 0.0"),
                             ("segment.memory_fraction=0", "must be in (0, 1], got 0.0"),
                             ("data.channel_order=[t1,t1,t2,flair]", "names a sequence twice"),
                             ("data.channel_order=[t1,t1c,t2]", "must name each of t1, t1c, t2, flair once"),
                             ("train.selection_alphas=[]", "must be a non-empty list"),
                             ("preprocess.nyul.pc1=99.5", "pc1 < landmarks < pc2 must increase strictly"),
                             ("preprocess.nyul.s2=-1", "s1 < s2 required")]:
        assert phrase in _error(C.load_config, "smoke", [override]), override
    assert C.load_config("smoke", ["preprocess.n4.sequences=[]"]).preprocess.n4.sequences == ()
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  momentum: 1.0\n")
    assert _error(C.load_config, path) == f"{path}: key 'train.momentum' must be in [0, 1), got 1.0"


# ---- evaluate.lesion_wise (issue 17) ---------------------------------------------------------------

def test_lesion_wise_presets_of_the_config_are_those_of_metrics():
    from brats_cnn.evaluation.metrics import LESION_PRESETS

    assert C._CHOICES["evaluate.lesion_wise.preset"] == (*LESION_PRESETS, "none")
    from brats_cnn.data.labels import DECISIONS
    assert C._CHOICES["segment.decision"] == DECISIONS
    assert C.Config().evaluate.lesion_wise == C.LesionWiseConfig("gli", None, None)


def test_lesion_wise_values_from_yaml_and_set(tmp_path):
    path = tmp_path / "met.yaml"
    path.write_text("evaluate:\n  lesion_wise:\n    preset: met\n    min_volume_mm3: 10\n")
    lesion = C.load_config(path).evaluate.lesion_wise
    assert (lesion.preset, lesion.dilation, lesion.min_volume_mm3) == ("met", None, 10.0)
    lesion = C.load_config(path, ["evaluate.lesion_wise.dilation=2", "evaluate.lesion_wise.min_volume_mm3=null"]
                           ).evaluate.lesion_wise
    assert (lesion.preset, lesion.dilation, lesion.min_volume_mm3) == ("met", 2, None)


@pytest.mark.parametrize("override,message", [
    ("evaluate.lesion_wise.preset=gbm",
     "--set: key 'evaluate.lesion_wise.preset' must be one of ['gli', 'ssa', 'ped', 'men', 'met', 'none'], got 'gbm'"),
    ("evaluate.lesion_wise.dilation=-1", "--set: key 'evaluate.lesion_wise.dilation' must be >= 0, got -1"),
    ("evaluate.lesion_wise.dilation=1.5", "--set: key 'evaluate.lesion_wise.dilation' must be int, got float 1.5"),
    ("evaluate.lesion_wise.min_volume_mm3=-2", "--set: key 'evaluate.lesion_wise.min_volume_mm3' must be >= 0, got -2.0"),
    ("evaluate.lesion_wise.min_volume_mm3=.inf",
     "--set: key 'evaluate.lesion_wise.min_volume_mm3' must be >= 0, got inf"),
    ("evaluate.lesion_wise.volume=3", "--set: unknown config key 'evaluate.lesion_wise.volume' "
                                      "(known keys in this section: dilation, min_volume_mm3, preset)"),
])
def test_bad_lesion_wise_values_are_one_line_errors(override, message):
    assert _error(C.load_config, None, [override]) == message


def test_the_package_ships_only_the_papers_and_the_smoke_configs():
    # experiment configs (v3-v8, the CV folds) live in training/configs/, outside the wheel (issue 36)
    from pathlib import Path

    import brats_cnn

    shipped = sorted(p.name for p in (Path(brats_cnn.__file__).parent / "configs").glob("*.yaml"))
    assert shipped == ["pereira_hgg.yaml", "pereira_lgg.yaml", "smoke.yaml"]
