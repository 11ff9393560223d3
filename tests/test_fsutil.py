"""Atomic writes (brats_cnn.fsutil): the final name appears complete or not at all."""

from __future__ import annotations

import json
import os
import stat

import pytest

from brats_cnn.errors import BratsCnnError
from brats_cnn.fsutil import atomic_path, write_json_atomic, write_text_atomic


def test_success_renames_the_temp_file_and_keeps_the_suffixes(tmp_path):
    target = tmp_path / "sub" / "volume.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".nii.gz") and tmp != target
        assert tmp.name.startswith(".volume.")
        tmp.write_bytes(b"data")
        assert not target.exists()  # nothing under the final name until the block succeeds
    assert target.read_bytes() == b"data"
    assert os.listdir(target.parent) == ["volume.nii.gz"]


def test_an_error_leaves_neither_the_file_nor_a_temp_file(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(target) as tmp:
            tmp.write_text('{"half": ')
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_an_error_keeps_the_previous_file_whole(tmp_path):
    target = write_text_atomic(tmp_path / "metrics.csv", "epoch\n1\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("epoch\n1\n2")
            raise KeyboardInterrupt
    assert target.read_text() == "epoch\n1\n"
    assert os.listdir(tmp_path) == ["metrics.csv"]


def test_json_and_text_writers(tmp_path):
    path = write_json_atomic(tmp_path / "a.json", {"x": [1, 2.5], "y": None})
    assert json.loads(path.read_text()) == {"x": [1, 2.5], "y": None} and path.read_text().endswith("\n")
    with pytest.raises(TypeError):  # not JSON-serialisable: the old file stays, no temp file
        write_json_atomic(path, {"x": object()})
    assert json.loads(path.read_text()) == {"x": [1, 2.5], "y": None}
    assert os.listdir(tmp_path) == ["a.json"]


def test_outputs_get_the_umask_permissions_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "t.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_an_unwritable_folder_is_a_one_line_error_naming_it(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(BratsCnnError) as err:
        write_text_atomic(blocker / "out.txt", "y")
    assert str(err.value).startswith(f"{blocker}: cannot create output folder") and "\n" not in str(err.value)
