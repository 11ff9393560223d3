"""The preprocessed-case cache: its files, reading a cached case, and the keys that say when a
cached result is still valid (source files, N4 and fit settings, format version).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from brats_cnn.errors import ConfigError, InputError

CACHE_FORMAT_VERSION = 2
"""Version of the cache layout and its arithmetic; part of every cache key.

2: each sequence's landmarks and statistics over its own data voxels; no data -> background value.
"""


META_FILE = "meta.json"


NORMALISER_FILE = "normaliser.json"


CONFIG_FILE = "config.yaml"


SUMMARY_FILE = "preprocess.json"


OLD_WORK_DIR = ".work"  # format 1 kept N4 output here for one run only; removed when found


PERCASE_DIR = ".percase"


CHECK_FILE = "check.json"


STATISTICS_FILE = "statistics.json"


@dataclass(frozen=True)
class CachedCase:
    """One preprocessed case, arrays memory-mapped read-only.

    Attributes:
        case_id: the case's id.
        image: ``(Z, 4, X, Y)`` float16/float32, channels in ``meta["channel_order"]``.
        mask: ``(Z, X, Y)`` bool brain mask.
        label: ``(Z, X, Y)`` uint8 class indices of ``meta["label_convention"]``, or None.
        meta: the case's ``meta.json`` (grade, shape ``(X, Y, Z)``, affine, spacing, cache key, ...).
        folder: the case folder.
    """

    case_id: str
    image: np.ndarray
    mask: np.ndarray
    label: np.ndarray | None
    meta: dict
    folder: Path

    @property
    def grade(self) -> str | None:
        return self.meta.get("grade")


def is_cache(folder: str | Path) -> bool:
    """True if ``folder`` looks like a preprocessed cache (it has ``normaliser.json``)."""
    return (Path(folder) / NORMALISER_FILE).is_file()


def list_cached_cases(cache: str | Path) -> list[Path]:
    """Complete case folders of a cache (those with ``meta.json``), sorted by name."""
    cache = Path(cache)
    if not cache.is_dir():
        raise InputError("preprocessed cache folder not found", cache)
    return sorted(p for p in cache.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / META_FILE).is_file())


def _read_meta(folder: Path) -> dict:
    path = folder / META_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError("incomplete cached case (no meta.json); rerun brats-cnn preprocess", folder) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"unreadable meta.json ({exc})", path) from None


def load_cached_case(folder: str | Path) -> CachedCase:
    """Open a cached case; arrays are ``np.load(..., mmap_mode="r")``."""
    folder = Path(folder)
    meta = _read_meta(folder)

    def array(name: str) -> np.ndarray:
        try:
            return np.load(folder / name, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read cached array ({exc})", folder / name) from None

    image, mask = array("image.npy"), array("mask.npy")
    label = array("label.npy") if meta.get("has_label") else None
    x, y, z = meta["shape"]
    if image.shape != (z, len(meta["channel_order"]), x, y) or mask.shape != (z, x, y) \
            or (label is not None and label.shape != (z, x, y)):
        raise InputError(f"cached arrays do not match meta.json shape {meta['shape']} "
                         f"(image {image.shape}, mask {mask.shape})", folder)
    return CachedCase(str(meta["case_id"]), image, mask, label, meta, folder)


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def source_fingerprint(ref: Any, *, images_only: bool = False) -> list[list]:
    """``[name, size, content digest]`` of a case's source files (images, then the label map).

    By content, not modification time: a copy of the data with new mtimes (a fresh checkout, ``cp``
    or ``rsync`` without ``-t``) keeps its cache; any change of a file's bytes recomputes it.
    """
    paths = list(ref.image_paths)
    if ref.label_path is not None and not images_only:
        paths.append(ref.label_path)
    out = []
    for path in paths:
        try:
            st = Path(path).stat()
            digest = _file_digest(str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        except OSError as exc:
            raise InputError(f"cannot read source file ({exc.strerror})", path) from None
        out.append([str(Path(path).name), st.st_size, digest])
    return out


@lru_cache(maxsize=1024)
def _file_digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    """SHA-256 of a file's bytes (a few ms for a BraTS sequence); memoised per size, mtime and inode,
    which are part of the arguments only so that a rewritten file is read again."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:32]


def _n4_settings(n4: Any) -> dict:
    """N4 settings as plain JSON values, typed the same whether they came from YAML or a state."""
    return {"sequences": [str(s) for s in n4.sequences], "shrink_factor": int(n4.shrink_factor),
            "iterations": [int(i) for i in n4.iterations],
            "convergence_threshold": float(n4.convergence_threshold)}


def _fit_settings(config: Any) -> dict:
    from brats_cnn.config import config_to_dict

    pre = config_to_dict(config.preprocess)
    # numbers compared as floats: (10, 20) from a default and (10.0, 20.0) from YAML are the same setting
    nyul = {k: [float(x) for x in v] if isinstance(v, list) else float(v) for k, v in pre["nyul"].items()}
    return {"n4": pre["n4"], "nyul": nyul, "channel_order": list(config.data.channel_order)}


def check_key(ref: Any, config: Any) -> str:
    """Hash of what a case's check (:func:`check_case`) depends on."""
    return _digest({"format": CACHE_FORMAT_VERSION, "case_id": ref.case_id, "layout": ref.layout,
                    "sources": source_fingerprint(ref), "label_convention": config.data.label_convention,
                    "channel_order": list(config.data.channel_order),
                    "min_coverage": float(config.preprocess.min_coverage)})


def n4_key(ref: Any, n4: Any, channel_order: Sequence[str]) -> str:
    """Hash of what a case's N4-corrected sequences depend on (not the label map)."""
    return _digest({"format": CACHE_FORMAT_VERSION, "case_id": ref.case_id, "layout": ref.layout,
                    "images": source_fingerprint(ref, images_only=True), "n4": _n4_settings(n4),
                    "channel_order": list(channel_order)})


def statistics_key(ref: Any, config: Any) -> str:
    """Hash of what a case's :class:`~brats_cnn.preprocessing.normalise.CaseStatistics` depend on."""
    return _digest({"n4": n4_key(ref, config.preprocess.n4, config.data.channel_order),
                    "settings": _fit_settings(config)})


def fit_key(refs: Sequence[Any], config: Any) -> str:
    """Hash of what a normaliser fit depends on: the fit cases' sources and the N4/Nyul settings."""
    return _digest({"format": CACHE_FORMAT_VERSION, "settings": _fit_settings(config),
                    "cases": [[r.case_id, source_fingerprint(r)] for r in refs]})


def cache_key(state: Any, config: Any, ref: Any) -> str:
    """Hash of everything a cached case's arrays depend on."""
    return _digest({
        "format": CACHE_FORMAT_VERSION,
        "normaliser": state.to_dict(),
        "background_value": float(config.preprocess.background_value),
        "cache_dtype": config.preprocess.cache_dtype,
        "label_convention": config.data.label_convention,
        "channel_order": list(config.data.channel_order),
        "case_id": ref.case_id, "grade": ref.grade,
        "sources": source_fingerprint(ref),
    })


def case_arrays(case: Any) -> Any:
    """A cache folder (opened memory-mapped via preprocess) or an object with image/mask/label."""
    if isinstance(case, (str, Path)):
        return load_cached_case(Path(case))
    return case


def cases_label_mask(cases: Sequence[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(label, mask)`` pairs of cache folders or CachedCase-like objects (memory-mapped)."""
    pairs = []
    for case in cases:
        arrays = case_arrays(case)
        if arrays.label is None:
            raise ConfigError(f"case '{arrays.case_id}' has no label map; training needs labels")
        pairs.append((arrays.label, arrays.mask))
    return pairs
