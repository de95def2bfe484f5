"""A rule's configuration and weights on disk: the format of the shipped weights
(:mod:`learnedopt.pretrained`) and of a meta-training run's ``best.pt`` / ``final.pt``.

Two formats, told apart by their bytes (not their names), both read without unpickling code:

* **safetensors** (``.safetensors``, the shipped weights): the rule's ``state_dict()`` as tensors,
  and in the file's metadata ``learnedopt.format`` (``"rule/1"``), ``kind``, ``config`` (JSON) and
  ``extra`` (JSON: what the training run recorded, e.g. its epoch and evaluation loss);
* **torch** (``.pt``, what meta-training writes): ``{"kind", "config", "state_dict", "extra"}``
  through ``torch.save``, read with ``torch.load(weights_only=True)``.

:func:`save_rule` picks the format by the file's suffix; :func:`export_rule` converts a ``.pt`` to
``.safetensors`` (the command ``learnedopt export``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["save_rule", "load_rule", "read_rule_file", "rule_from_blob", "export_rule", "atomic_write",
           "FORMAT", "state_dict_of"]

FORMAT = "rule/1"  # the safetensors metadata's learnedopt.format


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None],
                 before_replace: Callable[[], None] | None = None) -> None:
    """Calls ``write(tmp)`` for a temporary file next to ``path``, flushes it to disk and renames it
    to ``path``: a reader sees the old file or the new one, never a partial one. ``before_replace()``
    runs once the new file is complete, just before the rename (while ``path`` is still the old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would (some writers create 0600 files)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _blob(rule: nn.Module, extra: dict[str, Any] | None) -> dict[str, Any]:
    from . import RULES

    kind = getattr(rule, "kind", None)
    if kind not in RULES:
        raise ValueError(f"save_rule: rule must be one of {sorted(RULES)} (its .kind), got {kind!r}")
    blob = {"kind": kind, "config": rule.config(),
            "state_dict": {k: v.detach().cpu().clone() for k, v in rule.state_dict().items()}}
    if extra:
        blob["extra"] = dict(extra)
    return blob


def _is_safetensors(path: Path) -> bool:
    # safetensors: an 8-byte little-endian header length, then the JSON header ("{"); a torch.save
    # file is a zip archive ("PK").
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _write_safetensors(blob: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    meta = {"learnedopt.format": FORMAT, "kind": blob["kind"], "config": json.dumps(blob["config"]),
            "extra": json.dumps(blob.get("extra", {}))}
    save_file({k: v.contiguous() for k, v in blob["state_dict"].items()}, str(path), metadata=meta)


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("learnedopt.format") != FORMAT:
            raise ValueError(f"load_rule: {path} is a safetensors file but not a learnedopt rule (its metadata "
                             f"has learnedopt.format = {meta.get('learnedopt.format')!r}, expected {FORMAT!r})")
        state = {k: f.get_tensor(k) for k in f.keys()}
    return {"kind": meta["kind"], "config": json.loads(meta["config"]), "state_dict": state,
            "extra": json.loads(meta.get("extra", "{}"))}


def save_rule(rule: nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Writes a rule's kind, configuration and weights (and ``extra``, JSON-serialisable numbers and
    strings), atomically: safetensors if ``path`` ends in ``.safetensors``, else ``torch.save``."""
    blob = _blob(rule, extra)
    path = Path(path)
    if path.suffix == ".safetensors":
        atomic_write(path, lambda tmp: _write_safetensors(blob, tmp))
    else:
        atomic_write(path, lambda tmp: torch.save(blob, tmp))


def read_rule_file(path: str | os.PathLike) -> dict[str, Any]:
    """``{"kind", "config", "state_dict", "extra"}`` of a file written by :func:`save_rule`, in either
    format (no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_rule: no such file: {path}")
    if _is_safetensors(path):
        return _read_safetensors(path)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(blob, dict) and {"kind", "config", "state_dict"} <= set(blob)):
        keys = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise ValueError(f"load_rule: {path} is not a rule file of learnedopt.rules.save_rule (expected the keys "
                         f"kind, config, state_dict; got {keys})")
    return {"extra": {}, **blob}


def rule_from_blob(blob: dict[str, Any]) -> nn.Module:
    """The rule described by ``{"kind", "config", "state_dict"}``."""
    from . import RULES, make_rule

    kind = blob["kind"]
    if kind not in RULES:
        raise ValueError(f"load_rule: unknown rule kind {kind!r}; known: {sorted(RULES)}")
    rule = make_rule(kind, **blob["config"])
    rule.load_state_dict(blob["state_dict"])
    return rule


def load_rule(path: str | os.PathLike) -> nn.Module:
    """The rule written by :func:`save_rule` (either format; no code is unpickled)."""
    return rule_from_blob(read_rule_file(path))


def export_rule(src: str | os.PathLike, dst: str | os.PathLike) -> dict[str, Any]:
    """Converts a rule file (a meta-training run's ``best.pt`` / ``final.pt``, or another
    ``.safetensors``) to ``dst`` (must end in ``.safetensors``). The rule is rebuilt first, so a file
    that would not load is refused. Returns what was written (kind, config, extra)."""
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"export_rule: dst must end in .safetensors, got {str(dst)!r}")
    blob = read_rule_file(src)
    rule = rule_from_blob(blob)
    save_rule(rule, dst, extra=blob.get("extra") or None)
    return {"kind": blob["kind"], "config": rule.config(), "extra": blob.get("extra", {})}


def state_dict_of(path: str | os.PathLike) -> dict[str, Tensor]:
    """The weights of a rule file (either format)."""
    return read_rule_file(path)["state_dict"]
