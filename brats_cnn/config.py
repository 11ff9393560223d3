"""Typed, frozen configuration: dataclasses loaded from YAML, with ``--set a.b=value`` overrides.

Values marked (paper) come from Pereira et al. 2016; values marked (choice) are this project's.
A config file only needs the keys it changes; everything else takes the defaults below, which are
the paper's HGG setting. Unknown keys and values of the wrong type raise :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from brats_cnn.errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    label_convention: str = "brats2017"  # convention of the training labels (choice: BraTS 2017-21 data)
    channel_order: tuple[str, ...] = ("t1", "t1c", "t2", "flair")  # (choice) stored in checkpoints
    validation_cases: int = 1  # held-out whole cases for validation (choice)


@dataclass(frozen=True)
class N4Config:
    sequences: tuple[str, ...] = ("t1", "t1c")  # (paper) N4 on T1 and T1c
    shrink_factor: int = 4  # (choice) fit on a shrunk image, apply the field at full resolution
    iterations: tuple[int, ...] = (50, 50, 50, 50)  # (choice) per fitting level (ITK default shape)
    convergence_threshold: float = 0.001  # (choice)


@dataclass(frozen=True)
class NyulConfig:
    pc1: float = 1.0  # (choice) lower percentile of the brain voxels
    pc2: float = 99.0  # (choice) upper percentile
    landmarks: tuple[float, ...] = (10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0)  # (paper: deciles)
    s1: float = 0.0  # (choice) standard scale minimum
    s2: float = 100.0  # (choice) standard scale maximum


@dataclass(frozen=True)
class PreprocessConfig:
    n4: N4Config = field(default_factory=N4Config)
    nyul: NyulConfig = field(default_factory=NyulConfig)
    background_value: float = 0.0  # (choice) value of non-brain voxels after z-scoring
    cache_dtype: str = "float16"  # (choice) dtype of the memory-mapped preprocessed volumes
    workers: int = 2  # parallel cases in `brats-cnn preprocess`
    min_coverage: float = 0.5  # (choice) a case is unusable if a sequence has data in less of the brain mask
    strict: bool = False  # (choice) stop at an unusable case instead of skipping it (--strict)


@dataclass(frozen=True)
class SamplingConfig:
    patch_size: int = 33  # (paper) 33x33 axial patches
    total_patches: int = 450_000  # (paper) ~450k HGG, ~335k LGG; split evenly over classes
    rotation_angles: tuple[int, ...] = (0, 90, 180, 270)  # (paper) multiples of 90 degrees
    arbitrary_rotation: bool = False  # (choice) also rotate by a uniform random angle
    intensity_scale: float = 0.0  # (choice) per patch and sequence, multiply brain intensities by U[1-s, 1+s]; 0 = off (paper)
    intensity_shift: float = 0.0  # (choice) ... and add U[-t, t] (z-score units); 0 = off (paper)
    gamma: float = 0.0  # (choice) per patch and sequence, gamma curve exp(U[-g, g]) of brain intensities (nnU-Net, TorchIO); 0 = off (paper)
    planes: tuple[str, ...] = ("axial",)  # (paper: axial) each patch from one of these slice planes, uniformly (choice: + coronal, sagittal)
    centres: str = "balanced"  # (paper) equal centres per class; "natural" (choice): uniform over brain voxels (Havaei 2017)
    validation_patches: int = 20_000  # (choice) patch-accuracy validation set size
    resample_each_epoch: bool = False  # (choice) False: one centre set per run (paper), reshuffled per epoch


@dataclass(frozen=True)
class ModelConfig:
    architecture: str = "hgg"  # (paper) "hgg" (Table I) or "lgg" (Table II)
    dropout: float = 0.1  # (paper) 0.1 HGG, 0.5 LGG
    leaky_relu_slope: float = 0.333  # (paper)
    context: int = 1  # (choice) 1: the paper's single 33x33 pathway; k > 1: a second pathway on the k-times larger
                      # neighbourhood averaged down k x k (DeepMedic's context pathway, k = 3), half the main widths


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20  # (paper) 20 HGG, 25 LGG
    batch_size: int = 128  # (paper)
    lr_start: float = 0.003  # (paper) decayed linearly ...
    lr_end: float = 0.00003  # (paper) ... to this over the whole run
    momentum: float = 0.9  # (paper) Nesterov
    loss: str = "cross_entropy"  # (paper) categorical cross-entropy; "focal" (choice) for Lin et al.'s focal loss
    focal_gamma: float = 2.0  # (choice) focusing exponent of the focal loss
    weight_decay: float = 0.0  # (choice)
    seed: int = 0  # (choice)
    num_workers: int | None = None  # (choice) data-loader workers; None: 0 on the CPU, min(4, cores) on CUDA
    compile: bool = False  # torch.compile the network (choice)
    validate_dice: bool = True  # validation Dice on whole validation cases (fast mode) (choice)
    deterministic: bool = False  # (choice) deterministic CUDA kernels (slower); CPU runs are always reproducible
    dice_slices: int = 0  # (choice) validation Dice on this many evenly spaced brain slices per case; 0 = all
    selection_alphas: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5)  # (choice) best.pt by the best validation Dice over these prior-correction exponents
    validate_every_steps: int = 0  # (choice) also validate (and checkpoint) every N steps; 0 = after each epoch only
    checkpoint_minutes: float = 10.0  # (choice) mid-epoch last.pt at most this many minutes apart; 0 = epoch ends only
    checkpoint_every_steps: int = 0  # (choice) also write last.pt every N steps; 0 = off
    mode: str = "patch"  # (paper) "patch": one label per 33x33 patch; "dense" (choice): whole axial crops, as fast mode runs (config section dense)
    trainable: str = "all"  # (paper) all layers train; "output" (choice): only the last layer (Havaei 2017's second phase)
    init_weights: str | None = None  # (choice) start from this checkpoint's network weights (fine-tuning; optimiser fresh); null = Xavier init


@dataclass(frozen=True)
class DenseConfig:
    """Dense training (``train.mode: dense``): the network in its fully convolutional form on axial crops."""

    crop_size: int = 65  # (choice) labelled voxels per crop side (the input crop adds half a patch on each side)
    crops_per_epoch: int = 4000  # (choice) class-balanced crop centres per epoch
    batch_size: int = 4  # (choice) crops per iteration
    class_weight_power: float = 0.5  # (choice) loss weight of class c proportional to pi_c ** -power (pi: brain-voxel class frequencies); 0 = unweighted


@dataclass(frozen=True)
class SegmentConfig:
    mode: str = "auto"  # "exact", "fast" or "auto" (exact on CUDA, fast on CPU) (choice)
    batch_size: int = 4096  # patches (exact) / voxels through the FC layers (fast) per pass (choice)
    slices_per_batch: int = 2  # fast mode: axial slices per pass through the convolutions (choice; 2: fastest over bf16 and AVX2 float32)
    memory_fraction: float = 0.5  # exact mode on CUDA: share of free GPU memory for a batch (choice)
    prior_alpha: float = 0.0  # (choice) prior correction p(c|x) * pi_c^alpha of the class-balanced posterior; 0 = off
    prior_adapt: bool = False  # (choice) pi = this case's own class prior, estimated by EM from the training one
    tta_rotations: tuple[int, ...] = (0,)  # (choice) average the probabilities over these in-plane rotations (degrees)
    class_weights: tuple[float, ...] = ()  # (choice) after the prior correction, class c's probability times w_c, renormalised (e.g. more edema); () = none
    views: tuple[str, ...] = ("axial",)  # (choice) average over these slice planes: axial, coronal, sagittal (the 2-D network run on each)
    tta: str = "auto"  # (choice) use tta_rotations: "always", "never", or "auto" = on CUDA only (a CPU pays 4x for +0.006 Dice)
    decision: str = "argmax"  # (choice) argmax: most probable class; regions: nested regions by probability mass


@dataclass(frozen=True)
class PostprocessConfig:
    min_component_voxels: int = 10_000  # (paper) t_vol: 10,000 HGG, 3,000 LGG
    connectivity: int = 1  # (choice) 1 = face (6-), 2 = edge (18-), 3 = vertex (26-) connectivity
    keep_largest: bool = False  # (choice) keep only the largest tumour component (after the t_vol removal)
    never_empty: bool = True  # (choice) if t_vol would remove every component, keep the largest one instead
    require_core: bool = False  # (choice) remove components without a tumour-core voxel (edema alone), chosen by cross-validation


@dataclass(frozen=True)
class ComputeConfig:
    """Precision and memory format of train, segment and benchmark (applied by ``device.compute_settings``)."""

    precision: str = "auto"  # (choice) "auto": bf16 autocast on CUDA and on CPUs with native bf16; "float32"; "bf16"
    channels_last: bool = True  # (choice) NHWC weights and batches (faster oneDNN/cuDNN convolutions)


@dataclass(frozen=True)
class LesionWiseConfig:
    """BraTS 2023+ lesion-wise scoring of ``brats-cnn evaluate`` (``metrics.LESION_PRESETS``).

    ``--lesion-wise``, ``--lesion-dilation`` and ``--lesion-min-volume`` win over these values.
    """

    preset: str = "gli"  # (choice) challenge preset: gli, ssa, ped (dilation 3, 50 mm^3), men (1, 50 mm^3), met (1, 2 mm^3); none = off
    dilation: int | None = None  # (choice) ground-truth dilation in voxels; null = the preset's
    min_volume_mm3: float | None = None  # (choice) lesions of at most this volume (mm^3) are ignored; null = the preset's


@dataclass(frozen=True)
class EvaluateConfig:
    lesion_wise: LesionWiseConfig = field(default_factory=LesionWiseConfig)


@dataclass(frozen=True)
class Config:
    name: str = "pereira_hgg"
    grade: str = "hgg"
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


GRADES: tuple[str, ...] = ("hgg", "lgg")  # the paper's two models (Tables I and II)

_CHOICES = {
    "grade": GRADES,
    "model.architecture": GRADES,
    "segment.mode": ("auto", "exact", "fast"),
    "segment.decision": ("argmax", "regions"),  # labels.DECISIONS; tests/test_config.py checks they agree
    "segment.tta": ("auto", "always", "never"),
    "data.label_convention": ("brats2013", "brats2017", "brats2023", "msd"),
    "preprocess.cache_dtype": ("float16", "float32"),
    "postprocess.connectivity": (1, 2, 3),
    "compute.precision": ("auto", "bf16", "float32"),
    "train.loss": ("cross_entropy", "focal"),
    "train.mode": ("patch", "dense"),
    "train.trainable": ("all", "output"),
    "sampling.centres": ("balanced", "natural"),
    # metrics.LESION_PRESETS (not imported: config stays free of scipy); tests/test_config.py checks they agree
    "evaluate.lesion_wise.preset": ("gli", "ssa", "ped", "men", "met", "none"),
}

# Keys of earlier versions, dropped when a stored config (e.g. in a bundled checkpoint) is read:
# their job is done by the ``compute`` section now.
_RETIRED_KEYS = {"train": ("amp",), "segment": ("amp", "cpu_bf16")}


# Valid values of every numeric or list key, checked when a config is loaded (YAML, --set or a
# checkpoint's stored config): ``key -> (test of one value, what is expected)``. For a list key the
# test applies to each item and the list must not be empty. tests/test_config.py walks every field
# and fails for a field that has neither a range here nor a choice in _CHOICES (or is in _FREE_KEYS).
def _at_least(low: float) -> tuple[Any, str]:
    return (lambda v: math.isfinite(v) and v >= low), f">= {low:g}"


def _positive() -> tuple[Any, str]:
    return (lambda v: math.isfinite(v) and v > 0), "finite and > 0"


def _fraction(low_open: bool, high_open: bool) -> tuple[Any, str]:
    def test(v: float) -> bool:
        return math.isfinite(v) and (v > 0 if low_open else v >= 0) and (v < 1 if high_open else v <= 1)
    return test, f"in {'(' if low_open else '['}0, 1{')' if high_open else ']'}"


def _finite() -> tuple[Any, str]:
    return math.isfinite, "finite"


def _right_angle() -> tuple[Any, str]:
    return (lambda v: v % 90 == 0), "multiples of 90 degrees"


# The slice planes the 2-D network can be trained on (sampling.planes) and run over (segment.views);
# predict.VIEW_AXES and sampling.PLANE_AXES give each its axes, in this order.
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")


def _plane() -> tuple[Any, str]:
    return (lambda v: v in PLANES), f"planes from {', '.join(PLANES)}"


def _sequence() -> tuple[Any, str]:
    return (lambda v: v in ("t1", "t1c", "t2", "flair")), "sequences from t1, t1c, t2, flair"


_RANGES: dict[str, tuple[Any, str]] = {
    "data.channel_order": _sequence(),
    "data.validation_cases": _at_least(0),
    "preprocess.n4.sequences": _sequence(),
    "preprocess.n4.shrink_factor": _at_least(1),
    "preprocess.n4.iterations": _at_least(1),
    "preprocess.n4.convergence_threshold": _at_least(0),
    "preprocess.nyul.pc1": _finite(),
    "preprocess.nyul.pc2": _finite(),
    "preprocess.nyul.landmarks": _finite(),
    "preprocess.nyul.s1": _finite(),
    "preprocess.nyul.s2": _finite(),
    "preprocess.background_value": _finite(),
    "preprocess.workers": _at_least(1),
    "preprocess.min_coverage": _fraction(False, False),
    "sampling.patch_size": _at_least(1),
    "sampling.total_patches": _at_least(1),
    "sampling.rotation_angles": _right_angle(),
    "sampling.validation_patches": _at_least(1),
    "sampling.intensity_scale": _fraction(False, True),
    "sampling.intensity_shift": _at_least(0),
    "sampling.gamma": _at_least(0),
    "sampling.planes": _plane(),
    "model.dropout": _fraction(False, True),
    "model.leaky_relu_slope": _at_least(0),
    "model.context": _at_least(1),
    "train.epochs": _at_least(1),
    "train.batch_size": _at_least(1),
    "train.lr_start": _positive(),
    "train.lr_end": _positive(),
    "train.momentum": _fraction(False, True),
    "train.focal_gamma": _at_least(0),
    "train.weight_decay": _at_least(0),
    "train.seed": _at_least(0),
    "train.num_workers": _at_least(0),
    "train.dice_slices": _at_least(0),
    "train.selection_alphas": _at_least(0),
    "train.validate_every_steps": _at_least(0),
    "train.checkpoint_minutes": _at_least(0),
    "train.checkpoint_every_steps": _at_least(0),
    "dense.crop_size": _at_least(1),
    "dense.crops_per_epoch": _at_least(1),
    "dense.batch_size": _at_least(1),
    "dense.class_weight_power": _at_least(0),
    "segment.batch_size": _at_least(1),
    "segment.slices_per_batch": _at_least(1),
    "segment.memory_fraction": _fraction(True, False),
    "segment.prior_alpha": _at_least(0),
    "segment.tta_rotations": _right_angle(),
    "segment.views": _plane(),
    "segment.class_weights": _positive(),
    "postprocess.min_component_voxels": _at_least(0),
    "evaluate.lesion_wise.dilation": _at_least(0),
    "evaluate.lesion_wise.min_volume_mm3": _at_least(0),
}
# Keys whose every value of the right type is valid (free text, switches).
_FREE_KEYS = ("name", "preprocess.strict", "sampling.arbitrary_rotation", "sampling.resample_each_epoch",
              "train.compile", "train.validate_dice", "train.deterministic", "train.init_weights", "postprocess.keep_largest",
              "postprocess.never_empty", "postprocess.require_core",
              "segment.prior_adapt", "compute.channels_last")
# List keys that may be empty (no N4 at all).
_MAY_BE_EMPTY = ("preprocess.n4.sequences", "segment.class_weights")


def _check_range(key: str, value: Any, source: str) -> None:
    """ConfigError unless ``value`` (already of the key's type) is in the key's range; None (null) passes."""
    if value is None:
        return
    test, expected = _RANGES[key]
    if isinstance(value, tuple):
        if (not value and key not in _MAY_BE_EMPTY) or not all(test(v) for v in value):
            raise ConfigError(f"key '{key}' must be a {'' if key in _MAY_BE_EMPTY else 'non-empty '}list of "
                              f"{expected}, got {list(value)}", source)
        if key in ("data.channel_order", "preprocess.n4.sequences") and len(set(value)) != len(value):
            raise ConfigError(f"key '{key}' names a sequence twice: {list(value)}", source)
        if key == "data.channel_order" and len(value) != 4:
            raise ConfigError(f"key '{key}' must name each of t1, t1c, t2, flair once, got {list(value)}", source)
    elif not test(value):
        raise ConfigError(f"key '{key}' must be {expected}, got {value!r}", source)


def check_value(key: str, value: Any, source: str) -> None:
    """ConfigError unless ``value`` is in the range ``--set key=value`` accepts (finite, bounds): the one
    check that CLI options carrying a config value share with ``--set`` (``source`` names the option)."""
    _check_range(key, value, source)


_FLOAT_STRING = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in that type."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"key '{key}' must be a mapping, got {type(value).__name__} {value!r}", source)
        return _build(tp, value, key + ".", source)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"key '{key}' must be a list, got {type(value).__name__} {value!r}", source)
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(value, non_none[0], key, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_STRING.match(value.strip()):
            return float(value)  # YAML 1.1 (PyYAML) reads "3e-5" (no dot) as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - only the types above are used
        raise TypeError(f"unsupported config type {tp} for {key}")
    raise ConfigError(f"key '{key}' must be {tp.__name__}, got {type(value).__name__} {value!r}", source)


def _build(cls: type, values: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known keys in this section: {', '.join(sorted(names))})",
            source)
    kwargs = {}
    for name, value in values.items():
        key = prefix + name
        kwargs[name] = _convert(value, hints[name], key, source)
        if key in _CHOICES and kwargs[name] not in _CHOICES[key]:
            raise ConfigError(f"key '{key}' must be one of {list(_CHOICES[key])}, got {value!r}", source)
        if key in _RANGES:
            _check_range(key, kwargs[name], source)
    return cls(**kwargs)


def _refuse_retired(values: dict, source: str) -> None:
    """A retired key written by a user (YAML or ``--set``) is an error that names its replacement."""
    for section, keys in _RETIRED_KEYS.items():
        for key in keys:
            if isinstance(values.get(section), dict) and key in values[section]:
                raise ConfigError(f"config key '{section}.{key}' was replaced by 'compute.precision' "
                                  f"(auto, bf16 or float32)", source)


def config_from_dict(values: dict, source: str = "<config>") -> Config:
    """Build a validated :class:`Config` from a nested dict (missing keys take defaults)."""
    values = dict(values or {})
    for section, keys in _RETIRED_KEYS.items():
        if isinstance(values.get(section), dict):
            values[section] = {k: v for k, v in values[section].items() if k not in keys}
    config = _build(Config, values, "", source)
    nyul = config.preprocess.nyul
    percentiles = (nyul.pc1, *nyul.landmarks, nyul.pc2)
    if not (all(0 <= p <= 100 for p in percentiles) and all(a < b for a, b in zip(percentiles, percentiles[1:]))):
        raise ConfigError(f"preprocess.nyul: pc1 < landmarks < pc2 must increase strictly within [0, 100], "
                          f"got {list(percentiles)}", source)
    if not nyul.s1 < nyul.s2:
        raise ConfigError(f"preprocess.nyul: s1 < s2 required, got s1={nyul.s1}, s2={nyul.s2}", source)
    return config


def config_to_dict(config: Any) -> dict:
    """The config as a nested dict of plain YAML/JSON types (tuples become lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(config))


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict:
    """Turn ``["train.epochs=3", "sampling.rotation_angles=[0,90]"]`` into a nested dict.

    Values are parsed as YAML scalars/lists, so ``3`` is an int, ``0.5`` a float, ``true`` a bool.
    """
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'", "--set")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set key '{key}' conflicts with another --set", "--set")
        node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict | None = None) -> Config:
    """Load a YAML config (or the defaults if ``path`` is None), then apply ``--set`` overrides.

    Args:
        path: a YAML file, or a bundled name such as ``"pereira_lgg"`` or ``"smoke"``.
        overrides: ``key=value`` strings applied after the file.
        base: a nested dict applied before the file (e.g. a checkpoint's stored config).
    """
    values: dict = dict(base or {})
    source = "<defaults>"
    if path is not None:
        file = resolve_config_path(path)
        source = str(file)
        try:
            loaded = yaml.safe_load(file.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"not valid YAML ({str(exc).splitlines()[0]})", file) from exc
        except OSError as exc:
            raise ConfigError(f"cannot read config ({exc.strerror})", file) from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("a config file must be a YAML mapping", file)
        _refuse_retired(loaded or {}, source)
        values = _deep_merge(values, loaded or {})
    config = config_from_dict(values, source)
    if overrides:
        parsed = parse_overrides(overrides)
        _refuse_retired(parsed, "--set")
        merged = _deep_merge(config_to_dict(config), parsed)
        config = config_from_dict(merged, "--set")
    return config


def bundled_config_dir() -> Path:
    """Folder of the YAML configs shipped with the package."""
    return Path(__file__).parent / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """A file path as given, or a bundled config by name (``smoke`` -> ``configs/smoke.yaml``)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    bundled = bundled_config_dir() / f"{Path(str(path)).stem}.yaml"
    if not candidate.suffix and bundled.is_file():
        return bundled
    raise ConfigError("config file not found (give a YAML path or one of: "
                      + ", ".join(sorted(p.stem for p in bundled_config_dir().glob('*.yaml'))) + ")", path)


def check_grade(grade: str) -> str:
    """``grade`` in lower case (``"hgg"`` or ``"lgg"``); ConfigError naming ``--grade`` otherwise."""
    lowered = str(grade).lower()
    if lowered not in GRADES:
        raise ConfigError(f"--grade must be {' or '.join(GRADES)}, got '{grade}'")
    return lowered


def default_config(grade: str) -> Config:
    """The paper's config for a grade: ``pereira_hgg`` or ``pereira_lgg``."""
    return load_config(f"pereira_{check_grade(grade)}")


def save_config(config: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML next to an output (atomically)."""
    from brats_cnn.fsutil import write_text_atomic

    return write_text_atomic(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
