"""Files of a meta-training run that are not rule weights: the trainer's checkpoint (written
atomically, read without unpickling code), and the weights a run starts from (``init_from``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..rules.weights import atomic_write, state_dict_of

__all__ = ["save_checkpoint", "load_checkpoint", "init_weights"]


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path``, atomically (a reader sees the old file or the new one)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint` (``weights_only``: no code is unpickled)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def init_weights(source: str) -> dict[str, Tensor]:
    """The state dict of a rule file (``.pt`` or ``.safetensors``), or of shipped weights by name
    (``MetaConfig.init_from``)."""
    from .. import pretrained

    path = pretrained.path(source) if source in pretrained.WEIGHTS else Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"MetaConfig.init_from: {source!r} is neither shipped weights "
                                f"({sorted(pretrained.WEIGHTS)}) nor a file")
    return state_dict_of(path)
