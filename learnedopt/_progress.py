"""Progress bars on long work (meta-training, evaluation sweeps, benchmarks): tqdm on stderr, shown
only when stderr is a terminal, so logs and CI output stay clean. ``LEARNEDOPT_PROGRESS=1`` forces
the bars on (e.g. under ``nohup`` with a log you tail), ``LEARNEDOPT_PROGRESS=0`` off."""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None,
             file: Any = None, **kwargs):
    """A ``tqdm`` bar (``disable=None``: off when ``file``, default stderr, is not a terminal)."""
    from tqdm.auto import tqdm

    forced = os.environ.get("LEARNEDOPT_PROGRESS", "")
    disable = {"1": False, "0": True}.get(forced, None)
    if kwargs.pop("disable", None) is True:  # the caller's own "off" (e.g. ranks other than 0)
        disable = True
    return tqdm(iterable, total=total, desc=desc, file=file if file is not None else sys.stderr, disable=disable,
                dynamic_ncols=True, leave=kwargs.pop("leave", True), **kwargs)
