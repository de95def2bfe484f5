"""Files of a meta-training run that are not rule weights: the trainer's checkpoint (written
atomically, one previous checkpoint kept back, read without unpickling code), and the weights a run
starts from (``init_from``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..rules.weights import atomic_write, state_dict_of

__all__ = ["save_checkpoint", "load_checkpoint", "previous_path", "CheckpointError", "init_weights"]

# The entries every trainer checkpoint has (MetaTrainer._checkpoint).
CHECKPOINT_KEYS = ("epoch", "skipped", "best", "rule", "meta_opt", "generator", "log_lines", "config")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (truncated, corrupted, missing); the message says whether the
    previous checkpoint is usable and how to resume from it."""


def previous_path(path: str | os.PathLike) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint it replaced: ``checkpoint.prev.pt`` next to
    ``checkpoint.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike, keep_previous: bool = True) -> None:
    """``torch.save(obj)`` to ``path``, atomically (a reader sees the old file or the new one, even if
    the process is killed during the write). With ``keep_previous`` the file it replaces is kept as
    :func:`previous_path` (also atomically, by a hard link where the file system has them, else a
    copy), once the new one is complete: at every instant ``path`` holds a complete checkpoint and
    ``previous_path`` the one before it, which survives anything that later damages ``path``."""
    path = Path(path)

    def keep_back() -> None:  # runs once the new checkpoint is complete on disk, before it replaces path
        if not (keep_previous and path.is_file()):
            return
        prev = previous_path(path)
        tmp = prev.with_name(prev.name + f".tmp{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            try:
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
            os.replace(tmp, prev)
        finally:
            tmp.unlink(missing_ok=True)

    atomic_write(path, lambda tmp: torch.save(obj, tmp), before_replace=keep_back)


def _read(path: Path) -> dict[str, Any]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or any(k not in obj for k in CHECKPOINT_KEYS):
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"not a trainer checkpoint: expected the entries {list(CHECKPOINT_KEYS)}, got {got}")
    return obj


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint` (``weights_only``: no code is unpickled).

    A missing, truncated or corrupted file raises :class:`CheckpointError`, which names the problem
    and says whether the previous checkpoint (:func:`previous_path`) is intact and from which epoch;
    nothing falls back to it on its own (a resumed run would silently lose epochs): move it over
    ``path`` to resume from it."""
    path = Path(path)
    try:
        if not path.is_file():
            raise FileNotFoundError(f"no such file {path}")
        return _read(path)
    except Exception as e:  # noqa: BLE001 - any failure to read is reported the same way
        problem = f"{type(e).__name__}: {e}"
    prev = previous_path(path)
    if prev.is_file():
        try:
            epoch = _read(prev)["epoch"]
            hint = (f"the previous checkpoint {prev} (epoch {epoch}) is intact: to resume from it, move it over "
                    f"the damaged one (mv {prev} {path}) and resume again")
        except Exception as e2:  # noqa: BLE001
            hint = f"the previous checkpoint {prev} cannot be read either ({type(e2).__name__}: {e2})"
    else:
        hint = f"there is no previous checkpoint ({prev})"
    raise CheckpointError(f"the checkpoint {path} cannot be read (truncated or corrupted?): {problem}; {hint}")


def init_weights(source: str) -> dict[str, Tensor]:
    """The state dict of a rule file (``.pt`` or ``.safetensors``), or of shipped weights by name
    (``MetaConfig.init_from``)."""
    from .. import pretrained

    path = pretrained.path(source) if source in pretrained.WEIGHTS else Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"MetaConfig.init_from: {source!r} is neither shipped weights "
                                f"({sorted(pretrained.WEIGHTS)}) nor a file")
    return state_dict_of(path)
