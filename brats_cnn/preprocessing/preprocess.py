"""The ``brats-cnn preprocess`` command and the preprocessed cache (stages 1-3 on disk).

Cache layout (see ``docs/architecture.md`` and ``docs/preprocessing.md``)::

    <cache>/normaliser.json          NormaliserState used for every case below
    <cache>/config.yaml              resolved config
    <cache>/preprocess.json          fit key and per-run summary (bookkeeping)
    <cache>/<case_id>/image.npy      (Z, 4, X, Y) float16 (or float32), slice-major
    <cache>/<case_id>/mask.npy       (Z, X, Y) bool brain mask
    <cache>/<case_id>/label.npy      (Z, X, Y) uint8 class indices of data.label_convention
    <cache>/<case_id>/meta.json      written last: a case folder is complete only when it exists

    <cache>/.percase/<case_id>/      per-case work kept between runs (see below)

Each case's ``meta.json`` holds a cache key: a hash of the normaliser state, the config values
that change the arrays and the source files' sizes and content digests. A rerun skips a case
whose key is unchanged; anything else recomputes it.

A run goes: (1) check every case cheaply (readable, same grid, finite, valid labels, each
sequence covering enough of the brain) before any N4, and skip the unusable ones with one warning
line each (``strict``: stop and list them all); (2) with ``fit``, per-case statistics (N4 once,
then landmarks and moments) and the normaliser; (3) write the cases. Per-case work is kept in
``<cache>/.percase/<case_id>/``, each file under a key of exactly what it depends on, so a rerun
after a case was fixed, added or removed recomputes only that case's N4 and statistics::

    check.json        {"key", "problem"}: result of the check (key: source files, label
                      convention, channel order, min_coverage)
    n4-<key>.npy      (len(n4.sequences), brain voxels) float32: the N4-corrected sequences at the
                      brain-mask voxels, in mask order (key: image files, N4 settings, channel order)
    statistics.json   {"key", "statistics"}: the case's CaseStatistics (key: the N4 key + Nyul settings)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from brats_cnn.errors import InputError
from brats_cnn.fsutil import atomic_path, write_json_atomic
from brats_cnn.preprocessing.cache import (
    CACHE_FORMAT_VERSION,
    CHECK_FILE,
    CONFIG_FILE,
    META_FILE,
    NORMALISER_FILE,
    OLD_WORK_DIR,
    PERCASE_DIR,
    STATISTICS_FILE,
    SUMMARY_FILE,
    cache_key,
    check_key,
    fit_key,
    is_cache,
    n4_key,
    statistics_key,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# per-case work (run in worker processes)
# --------------------------------------------------------------------------------------------

def _init_worker(threads: int) -> None:
    """Give each worker process its share of the cores for SimpleITK's threads."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))


def _load(ref: Any, config: Any, load_label: bool):
    """The case on the 1 mm grid the network is trained on (resampled if its voxels are not 1 mm)."""
    from brats_cnn.data.io import load_case
    from brats_cnn.data.resample import needs_resampling, to_isotropic

    case = load_case(ref, label_convention=config.data.label_convention, load_label=load_label)
    return to_isotropic(case) if needs_resampling(case.spacing) else case


@dataclass(frozen=True)
class CaseFailure:
    """A case that cannot be used, and why (one line that names the file)."""

    case_id: str
    reason: str


def _read_keyed_json(path: Path, key: str) -> dict | None:
    """The JSON object at ``path`` if its ``"key"`` equals ``key``, else None (missing, stale, broken)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def _sequence_path(ref: Any, index: int) -> Path:
    """The file holding sequence ``index`` (the single 4-D file of an MSD case)."""
    return Path(ref.image_paths[index] if len(ref.image_paths) > index else ref.image_paths[0])


def check_case(ref: Any, config: Any) -> str | None:
    """Read a case and say why it cannot be used, or None when it can (no N4, ~1 s per case).

    Checked: every file readable, images and label map on one grid (shape and affine), finite
    intensities, label values of ``config.data.label_convention``, a non-empty brain, and every
    sequence having data (non-zero) in at least ``preprocess.min_coverage`` of the brain mask and
    not being constant there.

    Returns:
        None, or one line naming the offending file (all of the case's coverage problems at once).
    """
    from brats_cnn.preprocessing import normalise, nyul

    try:
        case = _load(ref, config, load_label=True)
        order = tuple(config.data.channel_order)
        normalise.check_case_image(case.image, order, case.source)
    except InputError as exc:
        return str(exc)
    mask = normalise.brain_mask(case.image)
    if not mask.any():
        return f"{case.source}: every voxel of every sequence is 0 (no brain)"
    minimum = float(config.preprocess.min_coverage)
    problems = []
    for c, (name, coverage) in enumerate(zip(order, normalise.sequence_coverage(case.image, mask))):
        if coverage < minimum:
            problems.append(f"{_sequence_path(ref, c)}: {name} has data (non-zero) in only "
                            f"{100 * coverage:.1f} % of the brain mask (preprocess.min_coverage is "
                            f"{100 * minimum:g} %)")
            continue
        values = case.image[c][nyul.sequence_data_mask(case.image[c], mask)]
        if values.min() == values.max():
            problems.append(f"{_sequence_path(ref, c)}: {name} is constant ({values[0]:g}) wherever it has data")
    return "; ".join(problems) or None


def _check_one(ref: Any, config: Any, check_file: Path, key: str) -> str | None:
    problem = check_case(ref, config)
    write_json_atomic(check_file, {"key": key, "case_id": ref.case_id, "problem": problem})
    return problem


def check_cases(refs: Sequence[Any], config: Any, out: Path, workers: int) -> dict[str, str]:
    """:func:`check_case` for every case, reusing earlier results whose key still matches.

    Returns:
        ``{case_id: reason}`` of the unusable cases, in case order.
    """
    problems: dict[str, str] = {}
    jobs = []
    for ref in refs:
        try:
            key = check_key(ref, config)
        except InputError as exc:  # a source file vanished since the cases were listed
            problems[ref.case_id] = str(exc)
            continue
        check_file = out / PERCASE_DIR / ref.case_id / CHECK_FILE
        earlier = _read_keyed_json(check_file, key)
        if earlier is None:
            jobs.append((ref, config, check_file, key))
        elif earlier.get("problem"):
            problems[ref.case_id] = str(earlier["problem"])
    for job, problem in zip(jobs, _run_parallel(_check_one, jobs, workers, "check")):
        if problem:
            problems[job[0].case_id] = problem
    order = [r.case_id for r in refs]
    return dict(sorted(problems.items(), key=lambda item: order.index(item[0])))


def _kept_bias_correction(image: np.ndarray, mask: np.ndarray, n4: Any, *, spacing: Sequence[float],
                          channel_order: Sequence[str], source: Any, percase: Path, key: str) -> np.ndarray:
    """:func:`bias.correct_bias`, reusing its result when kept in ``percase`` under ``key``.

    Passed (bound to ``percase`` and ``key``) as ``correct=`` to :func:`normalise.case_statistics`
    and :func:`normalise.normalise_case`, so that a rerun does not run N4 again. Only the brain
    voxels of the corrected sequences are kept: outside the brain mask every sequence is 0 and N4
    keeps zeros, so the rest of the image is the raw one.

    Returns:
        ``(C, X, Y, Z)`` float32 N4-corrected image.
    """
    from brats_cnn.preprocessing import bias

    n4_channels = [c for c, name in enumerate(channel_order) if name in n4.sequences]
    if not n4_channels:
        return bias.correct_bias(image, mask, n4, spacing=spacing, channel_order=channel_order, source=source)
    kept = percase / f"n4-{key[:24]}.npy"
    if kept.is_file():
        try:
            values = np.load(kept)
        except (OSError, ValueError):
            values = None
        if values is not None and values.shape == (len(n4_channels), int(mask.sum())):
            corrected = np.array(image, dtype=np.float32, copy=True)
            for row, c in enumerate(n4_channels):
                corrected[c][mask] = values[row]
            return corrected
    corrected = bias.correct_bias(image, mask, n4, spacing=spacing, channel_order=channel_order, source=source)
    percase.mkdir(parents=True, exist_ok=True)
    for stale in percase.glob("n4-*.npy"):
        stale.unlink(missing_ok=True)
    with atomic_path(kept) as tmp:
        np.save(tmp, np.stack([corrected[c][mask] for c in n4_channels]).astype(np.float32))
    return corrected


def _fit_one(ref: Any, config: Any, percase: Path, n4: str, statistics: str) -> Any:
    """Fitting pass of one case: N4 (or its kept result), then its statistics, kept in ``percase``."""
    from brats_cnn.preprocessing import normalise

    try:
        case = _load(ref, config, load_label=False)
        stats = normalise.case_statistics(case, config.preprocess, tuple(config.data.channel_order),
                                          correct=partial(_kept_bias_correction, percase=percase, key=n4))
    except InputError as exc:
        return CaseFailure(ref.case_id, str(exc))
    write_json_atomic(percase / STATISTICS_FILE, {"key": statistics, "statistics": stats.to_dict()})
    return stats


def _write_one(ref: Any, state: Any, config: Any, case_dir: Path, key: str, percase: Path, n4: str) -> Any:
    """Writing pass of one case: normalise with ``state`` and write the arrays, meta.json last.

    Returns the case id, or a :class:`CaseFailure` for an input problem found only now.
    """
    from brats_cnn.data.labels import to_class_indices
    from brats_cnn.preprocessing import normalise

    started = time.perf_counter()
    try:
        case = _load(ref, config, load_label=True)
        image, mask = normalise.normalise_case(case, state, config.preprocess,
                                               correct=partial(_kept_bias_correction, percase=percase, key=n4))
    except InputError as exc:
        return CaseFailure(ref.case_id, str(exc))
    order = state.channel_order
    coverage = normalise.sequence_coverage(case.image, mask)  # N4 keeps zeros: the raw image's coverage

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
        "coverage": {name: round(float(f), 6) for name, f in zip(order, coverage)},
        "source": str(case.source),
        "cache_key": key,
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json_atomic(case_dir / META_FILE, meta)
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
        case_dirs: the folders of this dataset's usable cases, in case order.
        written, skipped: case ids recomputed / found up to date.
        fitted: whether the normaliser was fitted in this call (False when reused or loaded).
        seconds: wall time of the call.
        unusable: ``{case_id: reason}`` of the cases left out (not in ``case_dirs``).
        statistics_reused: fit cases whose N4 and statistics came from an earlier run.
    """

    cache: Path
    state: Any
    case_dirs: tuple[Path, ...]
    written: tuple[str, ...]
    skipped: tuple[str, ...]
    fitted: bool
    seconds: float
    unusable: dict[str, str] = field(default_factory=dict)
    statistics_reused: tuple[str, ...] = ()


def _read_summary(out: Path) -> dict:
    try:
        return json.loads((out / SUMMARY_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


class _Unusable:
    """The cases left out so far: warns once per case, or raises at once under ``strict``."""

    def __init__(self, strict: bool, where: Path):
        self.strict, self.where, self.reasons = strict, where, {}

    def add(self, found: dict[str, str]) -> None:
        if not found:
            return
        if self.strict:
            raise InputError(f"{len(found)} case(s) cannot be used (stopped by --strict; without it they "
                             f"are skipped): " + "; ".join(f"{c}: {r}" for c, r in found.items()), self.where)
        for case_id, reason in found.items():
            log.warning("skipping case %s: %s", case_id, reason)
        self.reasons.update(found)


def _fit_state(refs: list, config: Any, out: Path, workers: int, unusable: _Unusable,
               summary: dict) -> tuple[Any, bool, list[str], str]:
    """The normaliser fitted on ``refs``: reused when the fit key matches, else from per-case
    statistics, computing (N4 + landmarks) only those not kept from an earlier run.

    Returns:
        ``(state, fitted, ids whose statistics were reused, fit key)``.
    """
    from brats_cnn.preprocessing import normalise

    key = fit_key(refs, config)
    if summary.get("fit_key") == key and is_cache(out):
        try:
            state = normalise.load_normaliser(out / NORMALISER_FILE)
            log.info("normaliser up to date (fit key %s); not refitting", key[:12])
            return state, False, [], key
        except InputError:
            pass
    stats, jobs = {}, []
    for ref in refs:
        percase = out / PERCASE_DIR / ref.case_id
        stats_key = statistics_key(ref, config)
        kept = _read_keyed_json(percase / STATISTICS_FILE, stats_key)
        if kept is not None:
            try:
                stats[ref.case_id] = normalise.CaseStatistics.from_dict(kept["statistics"], percase)
                continue
            except (InputError, KeyError):
                pass
        jobs.append((ref, config, percase, n4_key(ref, config.preprocess.n4, config.data.channel_order), stats_key))
    reused = list(stats)
    log.info("fitting the normaliser on %d case(s) (%d with statistics from an earlier run)", len(refs), len(reused))
    results = _run_parallel(_fit_one, jobs, workers, "fit")
    unusable.add({r.case_id: r.reason for r in results if isinstance(r, CaseFailure)})
    stats.update({r.case_id: r for r in results if not isinstance(r, CaseFailure)})
    ordered = [stats[r.case_id] for r in refs if r.case_id in stats]
    if not ordered:
        raise InputError("no usable case left to fit the normaliser on", out)
    state = normalise.state_from_statistics(ordered, config.preprocess, tuple(config.data.channel_order))
    return state, True, reused, key


def _write_cases(refs: list, state: Any, config: Any, out: Path, workers: int,
                 unusable: _Unusable) -> tuple[list[str], list[str]]:
    """Write every case whose cache key changed; returns ``(written, up to date)`` case ids."""
    jobs, skipped = [], []
    for ref in refs:
        case_dir = out / ref.case_id
        key = cache_key(state, config, ref)
        meta_path = case_dir / META_FILE
        if meta_path.is_file():
            try:
                if json.loads(meta_path.read_text()).get("cache_key") == key:
                    skipped.append(ref.case_id)
                    continue
            except (OSError, json.JSONDecodeError):
                pass
        jobs.append((ref, state, config, case_dir, key, out / PERCASE_DIR / ref.case_id,
                     n4_key(ref, state.n4_config(), state.channel_order)))
    if skipped:
        log.info("%d case(s) up to date, skipped", len(skipped))
    results = _run_parallel(_write_one, jobs, workers, "preprocess")
    unusable.add({r.case_id: r.reason for r in results if isinstance(r, CaseFailure)})
    return [r for r in results if not isinstance(r, CaseFailure)], skipped


def preprocess_dataset(data: str | Path | Iterable[Any], out: str | Path, *, config: Any, fit: bool = False,
                       normaliser: Any = None, manifest: str | Path | None = None, workers: int | None = None,
                       fit_case_ids: Sequence[str] | None = None, strict: bool | None = None) -> PreprocessSummary:
    """Preprocess a dataset into a cache folder (library entry point used by training).

    Steps: check every case (:func:`check_cases`), fit or load the normaliser, write the cases.
    An unusable case is skipped with one warning line (its reason) and listed in
    ``PreprocessSummary.unusable`` and ``preprocess.json``; a stale cached copy of it is marked
    incomplete so that training does not pick it up.

    Args:
        data: a dataset folder (any layout :func:`brats_cnn.data.layouts.list_cases` reads) or CaseRefs.
        out: the cache folder (created).
        config: a resolved :class:`brats_cnn.config.Config`.
        fit: fit the normaliser on the cases (``fit_case_ids`` only, if given).
        normaliser: a ``NormaliserState`` or the path of a saved one, to apply unchanged.
            Exactly one of ``fit`` / ``normaliser`` must be given.
        manifest: CSV ``case_id,grade`` (default ``<data>/manifest.csv`` when present).
        workers: cases processed in parallel (default ``config.preprocess.workers``).
        fit_case_ids: restrict fitting to these cases (e.g. the training split); all are written.
        strict: stop with one InputError listing every unusable case instead of skipping them
            (default ``config.preprocess.strict``).

    Returns:
        :class:`PreprocessSummary`.
    """
    from brats_cnn.config import save_config
    from brats_cnn.data.layouts import list_cases
    from brats_cnn.errors import ConfigError
    from brats_cnn.preprocessing import normalise

    started = time.perf_counter()
    out = Path(out)
    if fit == (normaliser is not None):
        raise InputError("give exactly one of --fit (fit the normaliser on these cases) or "
                         "--normaliser FILE (apply a saved one)", out)
    if not 0.0 <= float(config.preprocess.min_coverage) <= 1.0:
        raise ConfigError(f"preprocess.min_coverage must be a fraction in [0, 1], got "
                          f"{config.preprocess.min_coverage}", "preprocess.min_coverage")
    refs = list_cases(data, manifest=manifest) if isinstance(data, (str, Path)) else list(data)
    workers = config.preprocess.workers if workers is None else int(workers)
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}", out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the cache folder ({exc.strerror})", out) from exc
    shutil.rmtree(out / OLD_WORK_DIR, ignore_errors=True)
    unusable = _Unusable(config.preprocess.strict if strict is None else bool(strict),
                         Path(data) if isinstance(data, (str, Path)) else out)

    # 1. check every case before any N4
    unusable.add(check_cases(refs, config, out, workers))
    usable = [r for r in refs if r.case_id not in unusable.reasons]

    # 2. the normaliser
    fitted, reused = False, []
    if fit:
        wanted = None if fit_case_ids is None else set(fit_case_ids)
        if wanted is not None and not wanted <= {r.case_id for r in refs}:
            missing = sorted(wanted - {r.case_id for r in refs})
            raise InputError(f"fit cases not found in the dataset: {missing[:5]}", out)
        fit_refs = [r for r in usable if wanted is None or r.case_id in wanted]
        state, fitted, reused, key = _fit_state(fit_refs, config, out, workers, unusable, _read_summary(out))
        summary = {"fit_key": key}
    else:
        state = _loaded_state(normaliser, config, out)
        summary = {"fit_key": None}
    saved_state = out / NORMALISER_FILE
    if not (isinstance(normaliser, (str, Path)) and saved_state.exists() and saved_state.samefile(normaliser)):
        normalise.save_normaliser(state, saved_state)  # (--normaliser <out>/normaliser.json is kept as it is)
    save_config(config, out / CONFIG_FILE)

    # 3. the cases
    usable = [r for r in usable if r.case_id not in unusable.reasons]
    written, skipped = _write_cases(usable, state, config, out, workers, unusable)
    for case_id in unusable.reasons:  # a copy from an earlier run must not look usable
        (out / case_id / META_FILE).unlink(missing_ok=True)

    seconds = time.perf_counter() - started
    case_dirs = tuple(out / r.case_id for r in refs if r.case_id not in unusable.reasons)
    summary.update({"cache_format": CACHE_FORMAT_VERSION, "cases": [r.case_id for r in refs],
                    "written": written, "skipped": skipped, "unusable": unusable.reasons,
                    "statistics_reused": reused, "fitted": fitted,
                    "workers": workers, "seconds": round(seconds, 3)})
    write_json_atomic(out / SUMMARY_FILE, summary)
    log.info("preprocessed %d case(s), %d up to date, %d unusable, into %s in %.1f s",
             len(written), len(skipped), len(unusable.reasons), out, seconds)
    return PreprocessSummary(out, state, case_dirs, tuple(written), tuple(skipped), fitted, seconds,
                             dict(unusable.reasons), tuple(reused))


def _loaded_state(normaliser: Any, config: Any, out: Path) -> Any:
    """A given or saved NormaliserState, checked against the config."""
    from brats_cnn.config import config_to_dict
    from brats_cnn.preprocessing import normalise

    state = normaliser if isinstance(normaliser, normalise.NormaliserState) \
        else normalise.load_normaliser(normaliser)
    if tuple(state.channel_order) != tuple(config.data.channel_order):
        raise InputError(f"normaliser channel order {list(state.channel_order)} differs from the config's "
                         f"{list(config.data.channel_order)}", normaliser if isinstance(normaliser, (str, Path)) else out)
    if config_to_dict(state.n4_config()) != config_to_dict(config.preprocess.n4):
        log.warning("the normaliser's N4 settings differ from the config's; using the normaliser's")
    return state


def run_preprocess(data: Path, out: Path, fit: bool = False, normaliser: Path | None = None,
                   config: str | Path | None = None, overrides: Sequence[str] = (),
                   manifest: Path | None = None, workers: int | None = None,
                   strict: bool = False) -> PreprocessSummary:
    """``brats-cnn preprocess``: load the config, then :func:`preprocess_dataset`.

    ``strict=True`` (``--strict``) stops at unusable cases; False leaves it to ``preprocess.strict``.
    """
    from brats_cnn.config import load_config

    resolved = load_config(config, overrides)
    result = preprocess_dataset(data, out, config=resolved, fit=fit, normaliser=normaliser,
                                manifest=manifest, workers=workers, strict=True if strict else None)
    unusable = (f", {len(result.unusable)} skipped as unusable ({', '.join(result.unusable)})"
                if result.unusable else "")
    print(f"{len(result.written)} case(s) preprocessed, {len(result.skipped)} up to date{unusable}; "
          f"cache: {result.cache} ({result.seconds:.1f} s)")
    return result
