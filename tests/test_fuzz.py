"""Short, bounded property-based fuzzing (hypothesis) of the metrics and of the NIfTI validators.

* Metrics on random small masks: DSC in [0, 1] and symmetric, 1 on identical masks; PPV and
  sensitivity swap when the arguments swap; HD95 >= 0, 0 on identical masks and symmetric under
  both definitions.
* I/O: random NIfTI files (shapes, dtypes, contents with NaN/inf, header fields such as pixdim,
  scaling, qform/sform codes and dim, gzip or not, truncated or bit-flipped bytes) read by
  ``load_label_map`` and ``load_case`` either load or raise the project's ``InputError``, never
  another exception.

Each test runs at most 50 examples without a deadline; the whole file takes a few seconds.
"""

from __future__ import annotations

import gzip
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from brats_cnn.errors import InputError
from brats_cnn.data.io import load_case, load_label_map
from brats_cnn.evaluation.metrics import dice, hd95, ppv, sensitivity

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)

shapes = st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 5))


@st.composite
def mask_pairs(draw):
    shape = draw(shapes)
    a = draw(arrays(np.bool_, shape))
    b = draw(arrays(np.bool_, shape))
    return a, b


spacings = st.tuples(*[st.floats(0.25, 4.0, allow_nan=False) for _ in range(3)])


@FUZZ
@given(mask_pairs(), spacings)
def test_metric_properties(pair, spacing):
    a, b = pair
    d = dice(a, b)
    assert 0.0 <= d <= 1.0
    assert d == dice(b, a)
    assert dice(a, a) == 1.0  # identical masks (empty ones too, by the BraTS convention)
    assert ppv(a, b) == sensitivity(b, a) and sensitivity(a, b) == ppv(b, a)
    for metric in (ppv, sensitivity):
        assert 0.0 <= metric(a, b) <= 1.0
    for definition in ("brats", "monai"):
        h = hd95(a, b, spacing, definition)
        assert h >= 0.0 and np.isfinite(h)
        assert h == pytest.approx(hd95(b, a, spacing, definition), abs=1e-9)
        assert hd95(a, a, spacing, definition) == 0.0


# ---------------------------------------------------------------------------------------------
# I/O validators

DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64, np.float32, np.float64]


@st.composite
def nifti_files(draw):
    """(array, header edits, byte-level damage, compressed?) for one NIfTI file."""
    ndim = draw(st.integers(1, 5))
    shape = tuple(draw(st.integers(1, 5)) for _ in range(ndim))
    dtype = draw(st.sampled_from(DTYPES))
    if np.issubdtype(dtype, np.floating):
        elements = st.floats(allow_nan=True, allow_infinity=True, width=32 if dtype == np.float32 else 64)
        if draw(st.booleans()):
            elements = st.sampled_from([0.0, 1.0, 2.0, 4.0, 1.5, 3.0])
    else:
        info = np.iinfo(dtype)
        elements = st.one_of(st.sampled_from([0, 1, 2, 3, 4]), st.integers(int(info.min), int(info.max)))
    data = draw(arrays(dtype, shape, elements=elements))
    edits = draw(st.fixed_dictionaries({}, optional={
        "pixdim": st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=3, max_size=3),
        "slope": st.sampled_from([0.0, 1.0, 2.5, -1.0, float("nan"), float("inf")]),
        "inter": st.sampled_from([0.0, 1.0, -3.0, float("nan")]),
        "qform_code": st.integers(-1, 5),
        "sform_code": st.integers(-1, 5),
        "dim0": st.integers(-1, 9),
        "srow_x": st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=4, max_size=4),
    }))
    damage = draw(st.one_of(st.none(), st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
                            st.tuples(st.just("flip"), st.floats(0.0, 1.0))))
    return data, edits, damage, draw(st.booleans())


def _write(path: Path, data: np.ndarray, edits: dict, damage, compressed: bool) -> Path:
    img = nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0]), dtype=data.dtype)
    header = img.header
    if "pixdim" in edits:
        header["pixdim"][1:4] = edits["pixdim"]
    if "slope" in edits:
        header["scl_slope"] = edits["slope"]
    if "inter" in edits:
        header["scl_inter"] = edits["inter"]
    for key in ("qform_code", "sform_code"):
        if key in edits:
            header[key] = edits[key]
    if "srow_x" in edits:
        header["srow_x"] = edits["srow_x"]
    if "dim0" in edits:
        header["dim"][0] = edits["dim0"]
    raw = img.header.binaryblock + b"\0" * 4 + np.asarray(data).tobytes(order="F")
    if damage is not None:
        kind, where = damage
        cut = int(where * len(raw))
        if kind == "truncate":
            raw = raw[:cut]
        elif raw:
            position = min(cut, len(raw) - 1)
            raw = raw[:position] + bytes([raw[position] ^ 0x5A]) + raw[position + 1:]
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    return path


def _sibling(path: Path) -> None:
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3), np.float32), np.diag([-1.0, -1.0, 1.0, 1.0])), path)


@FUZZ
@given(nifti_files())
def test_loaders_raise_only_input_error(spec):
    data, edits, damage, compressed = spec
    suffix = ".nii.gz" if compressed else ".nii"
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy/nibabel warnings on odd values are fine; exceptions are not
        case = Path(tmp) / "Fuzz_001"
        case.mkdir()
        fuzzed = _write(case / f"Fuzz_001_t1{suffix}", data, edits, damage, compressed)
        for tag in ("t1ce", "t2", "flair"):
            _sibling(case / f"Fuzz_001_{tag}.nii.gz")
        for load in (lambda: load_label_map(fuzzed), lambda: load_case(case, load_label=False)):
            try:
                load()
            except InputError as exc:
                text = str(exc)
                assert "\n" not in text and text.strip()
