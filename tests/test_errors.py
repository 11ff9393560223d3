"""The project's exceptions (brats_cnn.errors): one line, ``<path>: <message>``."""

from __future__ import annotations

from pathlib import Path

import pytest

from brats_cnn.errors import BratsCnnError, CheckpointError, ConfigError, InputError


def test_message_with_a_path_is_path_colon_message():
    err = InputError("case X has no flair image", Path("/data/X"))
    assert str(err) == "/data/X: case X has no flair image"
    assert err.path == Path("/data/X") and err.message == "case X has no flair image"


def test_message_without_a_path_is_the_message():
    err = ConfigError("key 'train.epochs' must be int, got str 'x'")
    assert str(err) == "key 'train.epochs' must be int, got str 'x'" and err.path is None


def test_messages_are_always_one_line():
    err = CheckpointError("corrupt checkpoint\n  (truncated)\tat byte 12  ", "m.pt")
    assert str(err) == "m.pt: corrupt checkpoint (truncated) at byte 12"
    assert "\n" not in str(err) and err.args == (str(err),)


@pytest.mark.parametrize("cls", [InputError, ConfigError, CheckpointError])
def test_every_error_is_a_brats_cnn_error(cls):
    with pytest.raises(BratsCnnError, match="^f: bad$"):
        raise cls("bad", "f")
