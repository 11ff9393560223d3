"""The ``brats-cnn preprocess`` command and the preprocessed cache (stages 1-3 on disk).

Cache layout (see ``docs/architecture.md`` and ``docs/preprocessing.md``)::

    <cache>/normaliser.json          NormaliserState used for every case below
    <cache>/config.yaml              resolved config
    <cache>/preprocess.json          fit key and per-run summary (bookkeeping)
    <cache>/<case_id>/image.npy      (Z, 4, X, Y) float16 (or float32), slice-major
    <cache>/<case_id>/mask.npy       (Z, X, Y) bool brain mask
    <cache>/<case_id>/label.npy      (Z, X, Y) uint8 class indices of data.label_convention
    <cache>/<case_id>/meta.json      written last: a case folder is complete only when it exists

Each case's ``meta.json`` holds a cache key: a hash of the normaliser state, the config values
that change the arrays and the source files' sizes and modification times. A rerun skips a case
whose key is unchanged; anything else recomputes it.

When fitting, each training case is loaded and N4-corrected once: the fitting pass keeps the
corrected sequences in ``<cache>/.work/`` and the writing pass reuses and then deletes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from brats_cnn.errors import InputError
from brats_cnn.fsutil import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
"""Version of the cache layout; part of every cache key."""

META_FILE = "meta.json"
NORMALISER_FILE = "normaliser.json"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "preprocess.json"
WORK_DIR = ".work"


# --------------------------------------------------------------------------------------------
# reading the cache
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------

def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def source_fingerprint(ref: Any) -> list[list]:
    """``[name, size, mtime_ns]`` of a case's source files (images, then the label map)."""
    paths = list(ref.image_paths) + ([ref.label_path] if ref.label_path is not None else [])
    out = []
    for path in paths:
        try:
            st = Path(path).stat()
        except OSError as exc:
            raise InputError(f"cannot read source file ({exc.strerror})", path) from None
        out.append([str(Path(path).name), st.st_size, st.st_mtime_ns])
    return out


def _fit_settings(config: Any) -> dict:
    from brats_cnn.config import config_to_dict

    pre = config_to_dict(config.preprocess)
    # numbers compared as floats: (10, 20) from a default and (10.0, 20.0) from YAML are the same setting
    nyul = {k: [float(x) for x in v] if isinstance(v, list) else float(v) for k, v in pre["nyul"].items()}
    return {"n4": pre["n4"], "nyul": nyul, "channel_order": list(config.data.channel_order)}


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


# --------------------------------------------------------------------------------------------
# per-case work (run in worker processes)
# --------------------------------------------------------------------------------------------

def _init_worker(threads: int) -> None:
    """Give each worker process its share of the cores for SimpleITK's threads."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))


def _load(ref: Any, config: Any, load_label: bool):
    from brats_cnn.io import load_case

    return load_case(ref, label_convention=config.data.label_convention, load_label=load_label)


def _fit_one(ref: Any, config: Any, work_dir: Path) -> Any:
    """Fitting pass of one case: N4 once, keep the corrected sequences, return its statistics."""
    from brats_cnn import normalise

    case = _load(ref, config, load_label=False)
    order = tuple(config.data.channel_order)
    normalise.check_case_image(case.image, order, case.source)
    mask = normalise.brain_mask(case.image)
    corrected = normalise.correct_bias(case.image, mask, config.preprocess.n4, spacing=case.spacing,
                                       channel_order=order, source=case.source)
    n4_channels = [c for c, name in enumerate(order) if name in config.preprocess.n4.sequences]
    if n4_channels:
        with atomic_path(work_dir / f"{ref.case_id}.n4.npy") as tmp:
            np.save(tmp, corrected[n4_channels])
    return normalise.corrected_image_statistics(ref.case_id, corrected, mask, config.preprocess, order,
                                                source=case.source)


def _write_one(ref: Any, state: Any, config: Any, case_dir: Path, key: str, n4_file: Path | None) -> str:
    """Writing pass of one case: normalise with ``state`` and write the arrays, meta.json last."""
    from brats_cnn import normalise
    from brats_cnn.labels import to_class_indices

    started = time.perf_counter()
    case = _load(ref, config, load_label=True)
    order = state.channel_order
    normalise.check_case_image(case.image, order, case.source)
    mask = normalise.brain_mask(case.image)
    if n4_file is not None and n4_file.is_file():
        corrected = np.array(case.image, dtype=np.float32, copy=True)
        n4_channels = [c for c, name in enumerate(order) if name in state.n4_sequences]
        corrected[n4_channels] = np.load(n4_file)
    else:
        corrected = normalise.correct_bias(case.image, mask, state.n4_config(), spacing=case.spacing,
                                           channel_order=order, source=case.source)
    image = normalise.standardise_image(corrected, mask, state, float(config.preprocess.background_value),
                                        source=case.source)
    del corrected

    (case_dir / META_FILE).unlink(missing_ok=True)  # the folder is incomplete until meta.json is back
    dtype = np.dtype(config.preprocess.cache_dtype)
    with atomic_path(case_dir / "image.npy") as tmp:
        np.save(tmp, np.ascontiguousarray(image.transpose(3, 0, 1, 2), dtype=dtype))
    with atomic_path(case_dir / "mask.npy") as tmp:
        np.save(tmp, np.ascontiguousarray(mask.transpose(2, 0, 1)))
    if case.label is not None:
        indices = to_class_indices(case.label, config.data.label_convention)
        with atomic_path(case_dir / "label.npy") as tmp:
            np.save(tmp, np.ascontiguousarray(indices.transpose(2, 0, 1)))
    else:
        (case_dir / "label.npy").unlink(missing_ok=True)
    meta = {
        "format_version": CACHE_FORMAT_VERSION,
        "case_id": ref.case_id,
        "grade": ref.grade if ref.grade is not None else case.grade,
        "shape": list(image.shape[1:]),
        "array_layout": "ZCXY",
        "channel_order": list(order),
        "dtype": dtype.name,
        "affine": np.asarray(case.affine, dtype=float).tolist(),
        "spacing": [float(s) for s in case.spacing],
        "label_convention": config.data.label_convention if case.label is not None else None,
        "has_label": case.label is not None,
        "background_value": float(config.preprocess.background_value),
        "brain_voxels": int(mask.sum()),
        "source": str(case.source),
        "cache_key": key,
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json_atomic(case_dir / META_FILE, meta)
    if n4_file is not None:
        n4_file.unlink(missing_ok=True)
    return ref.case_id


def _run_parallel(function, jobs: list[tuple], workers: int, description: str) -> list:
    """Run ``function(*job)`` for every job, in ``workers`` processes, with a progress bar."""
    from tqdm import tqdm

    if not jobs:
        return []
    workers = max(1, min(workers, len(jobs)))
    if workers == 1:
        return [function(*job) for job in tqdm(jobs, desc=description, unit="case", disable=None)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn: the parent may hold thread pools (torch, ITK) that a forked child would inherit broken
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(function, *job): i for i, job in enumerate(jobs)}
        results: list = [None] * len(jobs)
        for future in tqdm(as_completed(futures), total=len(jobs), desc=description, unit="case", disable=None):
            results[futures[future]] = future.result()
    return results


# --------------------------------------------------------------------------------------------
# the dataset-level function and the command
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PreprocessSummary:
    """What :func:`preprocess_dataset` did.

    Attributes:
        cache: the cache folder.
        state: the normaliser used (fitted or loaded).
        case_dirs: every case folder of this dataset, in case order.
        written, skipped: case ids recomputed / found up to date.
        fitted: whether the normaliser was fitted in this call (False when reused or loaded).
        seconds: wall time of the call.
    """

    cache: Path
    state: Any
    case_dirs: tuple[Path, ...]
    written: tuple[str, ...]
    skipped: tuple[str, ...]
    fitted: bool
    seconds: float


def _read_summary(out: Path) -> dict:
    try:
        return json.loads((out / SUMMARY_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def preprocess_dataset(data: str | Path | Iterable[Any], out: str | Path, *, config: Any, fit: bool = False,
                       normaliser: Any = None, manifest: str | Path | None = None, workers: int | None = None,
                       fit_case_ids: Sequence[str] | None = None) -> PreprocessSummary:
    """Preprocess a dataset into a cache folder (library entry point used by training).

    Args:
        data: a dataset folder (any layout :func:`brats_cnn.io.list_cases` reads) or CaseRefs.
        out: the cache folder (created).
        config: a resolved :class:`brats_cnn.config.Config`.
        fit: fit the normaliser on the cases (``fit_case_ids`` only, if given).
        normaliser: a ``NormaliserState`` or the path of a saved one, to apply unchanged.
            Exactly one of ``fit`` / ``normaliser`` must be given.
        manifest: CSV ``case_id,grade`` (default ``<data>/manifest.csv`` when present).
        workers: cases processed in parallel (default ``config.preprocess.workers``).
        fit_case_ids: restrict fitting to these cases (e.g. the training split); all are written.

    Returns:
        :class:`PreprocessSummary`.
    """
    from brats_cnn import normalise
    from brats_cnn.config import config_to_dict, save_config
    from brats_cnn.io import list_cases

    started = time.perf_counter()
    out = Path(out)
    if fit == (normaliser is not None):
        raise InputError("give exactly one of --fit (fit the normaliser on these cases) or "
                         "--normaliser FILE (apply a saved one)", out)
    if isinstance(data, (str, Path)):
        refs = list_cases(data, manifest=manifest)
    else:
        refs = list(data)
    workers = config.preprocess.workers if workers is None else int(workers)
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}", out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the cache folder ({exc.strerror})", out) from exc
    work_dir = out / WORK_DIR
    summary = _read_summary(out)

    fitted = False
    if fit:
        fit_refs = refs if fit_case_ids is None else [r for r in refs if r.case_id in set(fit_case_ids)]
        if fit_case_ids is not None and len(fit_refs) != len(set(fit_case_ids)):
            missing = sorted(set(fit_case_ids) - {r.case_id for r in fit_refs})
            raise InputError(f"fit cases not found in the dataset: {missing[:5]}", out)
        key = fit_key(fit_refs, config)
        state = None
        if summary.get("fit_key") == key and is_cache(out):
            try:
                state = normalise.load_normaliser(out / NORMALISER_FILE)
                log.info("normaliser up to date (fit key %s); not refitting", key[:12])
            except InputError:
                state = None
        if state is None:
            log.info("fitting the normaliser on %d case(s)", len(fit_refs))
            stats = _run_parallel(_fit_one, [(r, config, work_dir) for r in fit_refs], workers, "fit")
            state = normalise.state_from_statistics(stats, config.preprocess, tuple(config.data.channel_order))
            fitted = True
        summary = {"fit_key": key}
    else:
        state = normaliser if isinstance(normaliser, normalise.NormaliserState) \
            else normalise.load_normaliser(normaliser)
        if tuple(state.channel_order) != tuple(config.data.channel_order):
            raise InputError(f"normaliser channel order {list(state.channel_order)} differs from the config's "
                             f"{list(config.data.channel_order)}", normaliser if isinstance(normaliser, (str, Path)) else out)
        if config_to_dict(state.n4_config()) != config_to_dict(config.preprocess.n4):
            log.warning("the normaliser's N4 settings differ from the config's; using the normaliser's")
        summary = {"fit_key": None}
    normalise.save_normaliser(state, out / NORMALISER_FILE)
    save_config(config, out / CONFIG_FILE)

    jobs, skipped, case_dirs = [], [], []
    for ref in refs:
        case_dir = out / ref.case_id
        case_dirs.append(case_dir)
        key = cache_key(state, config, ref)
        n4_file = work_dir / f"{ref.case_id}.n4.npy"
        meta_path = case_dir / META_FILE
        if meta_path.is_file():
            try:
                if json.loads(meta_path.read_text()).get("cache_key") == key:
                    skipped.append(ref.case_id)
                    n4_file.unlink(missing_ok=True)
                    continue
            except (OSError, json.JSONDecodeError):
                pass
        # only a fit in this call guarantees the kept N4 output matches the state
        jobs.append((ref, state, config, case_dir, key, n4_file if fitted else None))
    if skipped:
        log.info("%d case(s) up to date, skipped", len(skipped))
    written = _run_parallel(_write_one, jobs, workers, "preprocess")
    shutil.rmtree(work_dir, ignore_errors=True)

    seconds = time.perf_counter() - started
    summary.update({"cache_format": CACHE_FORMAT_VERSION, "cases": [r.case_id for r in refs],
                    "written": written, "skipped": skipped, "fitted": fitted,
                    "workers": workers, "seconds": round(seconds, 3)})
    write_json_atomic(out / SUMMARY_FILE, summary)
    log.info("preprocessed %d case(s), skipped %d, into %s in %.1f s", len(written), len(skipped), out, seconds)
    return PreprocessSummary(out, state, tuple(case_dirs), tuple(written), tuple(skipped), fitted, seconds)


def run_preprocess(data: Path, out: Path, fit: bool = False, normaliser: Path | None = None,
                   config: str | Path | None = None, overrides: Sequence[str] = (),
                   manifest: Path | None = None, workers: int | None = None) -> PreprocessSummary:
    """``brats-cnn preprocess``: load the config, then :func:`preprocess_dataset`."""
    from brats_cnn.config import load_config

    resolved = load_config(config, overrides)
    result = preprocess_dataset(data, out, config=resolved, fit=fit, normaliser=normaliser,
                                manifest=manifest, workers=workers)
    print(f"{len(result.written)} case(s) preprocessed, {len(result.skipped)} up to date; "
          f"cache: {result.cache} ({result.seconds:.1f} s)")
    return result
