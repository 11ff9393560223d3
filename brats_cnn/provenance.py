"""An output proves what produced it: fingerprints of inputs, models and outputs, and the skip rule.

``segment`` records in each case's sidecar what produced its outputs (``provenance``): the case id, a
fingerprint of every input file (size, mtime and SHA-256), of every model checkpoint (SHA-256), every
setting that changes the output, and the size and SHA-256 of every output it wrote. A rerun skips a
case only when all of that matches and the outputs on disk still verify (:func:`check_existing`);
otherwise it recomputes, saying why in one line, or refuses to replace another case's output. The
same rule serves every process of a sharded or torchrun run writing into one folder, since each
decision reads only the case's own files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

PROVENANCE_VERSION = 1
_CHUNK = 1 << 20


def sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def input_fingerprint(path: str | Path) -> dict:
    """``{"path", "size", "mtime_ns", "sha256"}`` of an input file (resolved path)."""
    path = Path(path)
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256(path)}


def output_fingerprint(path: str | Path) -> dict:
    """``{"size", "sha256"}`` of an output file (its path is the sidecar's business)."""
    path = Path(path)
    return {"size": path.stat().st_size, "sha256": sha256(path)}


def record(case_id: str, inputs: Iterable[str | Path], models: dict[str, str], settings: dict,
           outputs: dict[str, str | Path]) -> dict:
    """The sidecar's ``provenance`` block.

    Args:
        inputs: the case's input files.
        models: checkpoint path -> its SHA-256 (:func:`sha256`, computed once per run).
        settings: every setting that changes the outputs (JSON-serialisable).
        outputs: output role (``labels``, ``probabilities``) -> path, already written.
    """
    return {"version": PROVENANCE_VERSION, "case_id": case_id,
            "inputs": [input_fingerprint(p) for p in inputs], "models": dict(models),
            "settings": json.loads(json.dumps(settings)),
            "outputs": {role: output_fingerprint(path) for role, path in outputs.items()}}


@dataclass(frozen=True)
class Existing:
    """What :func:`check_existing` found at a case's outputs.

    Attributes:
        action: ``"compute"`` (nothing there), ``"skip"`` (finished and proven), ``"recompute"``
            (stale, incomplete or unverifiable: ``reason`` says which) or ``"foreign"`` (another
            case's output: ``reason`` names it).
        reason: one line for the terminal, or "".
    """

    action: str
    reason: str = ""


def _same_inputs(recorded: list, inputs: list[Path]) -> str:
    """"" if the recorded input fingerprints match the files now, else what changed."""
    now = {str(Path(p).resolve()): Path(p) for p in inputs}
    before = {entry.get("path"): entry for entry in recorded if isinstance(entry, dict)}
    if set(now) != set(before):
        return "its input files are not the ones it was computed from"
    for name, path in now.items():
        entry, stat = before[name], path.stat()
        if (entry.get("size"), entry.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
            continue  # unchanged size and mtime: the hash is not read again
        if entry.get("size") != stat.st_size or entry.get("sha256") != sha256(path):
            return f"input {path.name} changed since it was computed"
    return ""


def held_case(sidecar: Path) -> str | None:
    """The case id a sidecar says its outputs hold; None when it is absent or unreadable."""
    try:
        written = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    return written.get("case_id") if isinstance(written, dict) else None


def check_existing(case_id: str, sidecar: Path, outputs: dict[str, Path], inputs: list[Path],
                   models: dict[str, str], settings: dict) -> Existing:
    """Whether a case's existing outputs can be kept (the skip-existing rule).

    Args:
        sidecar: the case's sidecar path; ``outputs``: role -> path of every output this run wants.
        inputs, models, settings: as :func:`record` would write them now.
    """
    present = [p for p in (sidecar, *outputs.values()) if p.exists()]
    if not present:
        return Existing("compute")
    if not sidecar.is_file():
        return Existing("recompute", "its sidecar is missing (an interrupted run)")
    try:
        written = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        return Existing("recompute", f"its sidecar cannot be read ({exc.__class__.__name__})")
    if not isinstance(written, dict):
        return Existing("recompute", "its sidecar is not a segment sidecar")
    holder = written.get("case_id")
    if holder is not None and holder != case_id:
        return Existing("foreign", f"holds the segmentation of case '{holder}', not '{case_id}'")
    proof = written.get("provenance")
    if not isinstance(proof, dict) or proof.get("version") != PROVENANCE_VERSION:
        return Existing("recompute", "it was written without a provenance record (an older version)")
    reason = _same_inputs(proof.get("inputs") or [], inputs)
    if reason:
        return Existing("recompute", reason)
    if proof.get("models") != models:
        return Existing("recompute", "it was computed with another model")
    wanted, recorded = json.loads(json.dumps(settings)), proof.get("settings") or {}  # as the sidecar holds them
    if recorded != wanted:
        changed = sorted(k for k in set(wanted) | set(recorded) if recorded.get(k) != wanted.get(k))
        return Existing("recompute", f"it was computed with other settings ({', '.join(changed)})")
    for role, path in outputs.items():
        entry = (proof.get("outputs") or {}).get(role)
        if entry is None:
            return Existing("recompute", f"its {role} output was not requested then")
        if not path.is_file():
            return Existing("recompute", f"its {role} output is missing")
        if path.stat().st_size != entry.get("size") or sha256(path) != entry.get("sha256"):
            return Existing("recompute", f"its {role} output does not verify (truncated or changed)")
    return Existing("skip")
