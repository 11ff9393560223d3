"""Atomic file writing: write to a temporary file in the same folder, then rename.

An interrupted run therefore never leaves a half-written output under the final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from brats_cnn.errors import BratsCnnError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temporary_prefix(path: Path) -> str:
    return f".{path.name.split('.')[0]}."


def _temporary_suffix(path: Path) -> str:
    return ".tmp" + ("".join(path.suffixes) or ".tmp")


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary files that :func:`atomic_path` left next to ``path`` when a run writing it
    was killed (SIGKILL, power loss: no ``finally`` ran); returns what was removed. Call it only when
    no other process is writing ``path`` (segment: before the case is computed)."""
    path = Path(path)
    removed = []
    for candidate in path.parent.glob(_temporary_prefix(path) + "*" + _temporary_suffix(path)):
        middle = candidate.name[len(_temporary_prefix(path)):-len(_temporary_suffix(path))]
        if "." in middle:  # mkstemp's random part has no dot: another output's temporary file
            continue
        try:
            candidate.unlink()
            removed.append(candidate)
        except FileNotFoundError:
            pass
    return removed


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` if the block succeeds.

    The temporary name keeps the final suffixes (``.nii.gz``, ``.npy``) so that writers which
    choose a format from the name behave the same. On any exception the temporary file is removed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BratsCnnError(f"cannot create output folder ({exc.strerror})", path.parent) from exc
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=_temporary_suffix(path),
                                        dir=path.parent)
    except OSError as exc:
        raise BratsCnnError(f"cannot write output ({exc.strerror})", path) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():  # mkstemp makes 0600 files; give the output the usual umask permissions
            os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except OSError as exc:  # a full disk, a quota, a file-size limit: name the output, not the hidden temp file
        raise BratsCnnError(f"cannot write output ({exc.strerror or exc})", path) from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented, standard JSON to ``path`` atomically and return the path (NaN and
    infinities become null: :func:`brats_cnn.outward.strict_json`)."""
    from brats_cnn.outward import strict_json

    return write_text_atomic(path, strict_json(data) + "\n")


@contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder next to ``out``; when the block succeeds, move every file written
    there to the same place under ``out`` (each by an atomic rename), then remove the stage.

    A set of outputs (a report's CSV, JSON and HTML) thus lands whole: a failure while writing any of
    them (a full disk, an exception) leaves ``out`` exactly as it was, with the previous set, never
    a mix of old and new files. Files in ``out`` that the block does not write are left alone.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BratsCnnError(f"cannot create output folder ({exc.strerror or exc})", out) from exc
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".stage", dir=out.parent))
    except OSError as exc:
        raise BratsCnnError(f"cannot write output ({exc.strerror or exc})", out) from exc
    try:
        yield stage
        files = sorted(p for p in stage.rglob("*") if p.is_file())
        try:
            for file in files:
                target = out / file.relative_to(stage)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(file, target)
        except OSError as exc:
            raise BratsCnnError(f"cannot write output ({exc.strerror or exc})", out) from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
