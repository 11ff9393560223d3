"""One place for text that leaves the program: terminal lines, CSV cells and JSON files.

* **Terminal** (:func:`printable`): log lines and error lines escape every non-printable character
  (ESC, other control characters, newlines) as ``\\xNN`` / ``\\n``, so a case id or a path cannot
  clear the screen, retitle the window or forge a log line. Printable Unicode stays as it is.
* **CSV** (:func:`csv_cell`): a text cell that starts with ``=``, ``+``, ``-``, ``@``, TAB or CR is
  written with a leading apostrophe, the usual neutralisation of spreadsheet formulas (OWASP "CSV
  injection"); numbers are never changed (``-0.5`` stays a number). The JSON files keep the raw text.
* **JSON** (:func:`strict_json`): NaN and +-infinity are written as ``null`` and numpy scalars as
  plain numbers, so every file is standard JSON (browsers, ``jq`` and most languages reject ``NaN``).
"""

from __future__ import annotations

import json
import math
from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def printable(text: Any) -> str:
    """``str(text)`` with every non-printable character escaped (``\\x1b``, ``\\n``, ``\\t``...)."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def csv_cell(value: Any) -> Any:
    """A CSV cell value: text starting like a formula gets a leading apostrophe; anything else as is."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def json_safe(data: Any) -> Any:
    """``data`` with non-finite floats as None, numpy scalars and arrays as Python values, tuples as lists."""
    import numpy as np  # not at module level: the CLI's error path imports this module without numpy

    if isinstance(data, dict):
        return {str(k) if not isinstance(k, str) else k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    if isinstance(data, np.ndarray):
        return json_safe(data.tolist())
    if isinstance(data, (bool, np.bool_)):
        return bool(data)
    if isinstance(data, (int, np.integer)):
        return int(data)
    if isinstance(data, (float, np.floating)):
        return float(data) if math.isfinite(float(data)) else None
    return data


def strict_json(data: Any, indent: int | None = 2) -> str:
    """Standard JSON text of ``data`` (:func:`json_safe`; ``allow_nan=False`` guards the rest)."""
    return json.dumps(json_safe(data), indent=indent, allow_nan=False)
