"""One image file before it is read: present, non-empty, an intact gzip stream, and nibabel's own
messages turned into one line. Used by case discovery (a header's dimensions) and by reading.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from brats_cnn.errors import InputError

log = logging.getLogger(__name__)


_GZIP_MAGIC = b"\x1f\x8b"


def nifti_ndim(path: Path) -> int:
    """Number of dimensions from a NIfTI header (reads only the header)."""
    import nibabel as nib

    check_file(path)
    try:
        with nibabel_messages(path):
            return len(nib.load(path).shape)
    except Exception as exc:  # nibabel raises many types on bad headers
        raise InputError(f"cannot read NIfTI header ({describe_error(exc)})", path) from exc


def describe_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


@contextmanager
def nibabel_messages(path: Path) -> Iterator[None]:
    """Re-log nibabel's header messages as one line each, naming the file.

    nibabel reports header checks ("sizeof_hdr should be 348", "data code ... not recognized")
    through a logger of its own that prints them raw to stderr, without the file name. Inside this
    block they are collected and then logged as warnings of this module; a header that cannot be
    used still becomes our InputError.
    """
    from nibabel.imageglobals import logger as nibabel_logger

    records: list[logging.LogRecord] = []
    collector = logging.Handler()
    collector.emit = records.append  # type: ignore[method-assign]
    handlers, propagate = nibabel_logger.handlers[:], nibabel_logger.propagate
    nibabel_logger.handlers, nibabel_logger.propagate = [collector], False
    try:
        yield
    finally:
        nibabel_logger.handlers, nibabel_logger.propagate = handlers, propagate
        for record in records:
            log.warning("%s: nibabel: %s", path, " ".join(record.getMessage().split()))


def check_file(path: Path) -> None:
    if not path.is_file():
        raise InputError("file not found", path)
    size = path.stat().st_size
    if size == 0:
        raise InputError("file is empty (0 bytes)", path)
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as handle:
            if handle.read(2) != _GZIP_MAGIC:
                raise InputError("not gzip-compressed although the name ends in .gz "
                                 "(a text file or an uncompressed image?)", path)
