"""The project's own exceptions.

Every error a user can cause (bad file, bad config, bad checkpoint) is a :class:`BratsCnnError`.
Its message names the offending file and the problem in one line; the CLI prints ``str(error)``
without a traceback and exits with code 2.
"""

from __future__ import annotations

from pathlib import Path


class BratsCnnError(Exception):
    """A problem with the user's input, named in one line.

    Args:
        message: what is wrong and what was expected.
        path: the offending file or folder, if any; it is prefixed to the message.
    """

    def __init__(self, message: str, path: str | Path | None = None):
        self.message = " ".join(str(message).split())  # always one line
        self.path = None if path is None else Path(path)
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path is not None else self.message


class InputError(BratsCnnError):
    """An image, label map, layout or dataset that cannot be used."""


class ConfigError(BratsCnnError):
    """An unknown config key, a value of the wrong type, or an invalid value."""


class CheckpointError(BratsCnnError):
    """A checkpoint that is missing, corrupt, of another format version, or unsafe."""
