"""Problems to optimize, for meta-training and evaluation (functional tasks: see
:mod:`learnedopt.tasks.base` for the interface).

* :mod:`~learnedopt.tasks.base`: ``Task``, ``TaskFamily``, ``FixedFamily``;
* :mod:`~learnedopt.tasks.classic`: ``simple`` (x²) and ``quadratic`` (Andrychowicz et al. 2016);
* :mod:`~learnedopt.tasks.vision`: ``mnist`` (MLP), ``mnist_conv``, ``digits_resnet``;
* :mod:`~learnedopt.tasks.ensemble`: the meta-training ensemble of Wichrowska et al. 2017;
* :mod:`~learnedopt.tasks.wang`: the quadratic (½ wᵀHw) and the least squares of Wang et al. 2021;
* :mod:`~learnedopt.tasks.data`: the small real data sets (MNIST, 8×8 digits) that ship with
  installed packages.

:func:`make_family` builds a family by name (the ``task`` key of a meta-training config).
"""

from __future__ import annotations

import torch

from .base import FixedFamily, Task, TaskFamily, classification_metrics
from .classic import QuadraticFamily, QuadraticTask, SimpleTask
from .ensemble import default_ensemble
from .vision import ACTIVATIONS, DigitsResNetTask, MNISTConvTask, MNISTTask
from .wang import HessianQuadraticTask, LeastSquaresFamily, LeastSquaresTask, wang_quadratic
from . import data, ensemble, wang  # noqa: F401  (submodules reachable as attributes)

__all__ = ["Task", "TaskFamily", "SimpleTask", "QuadraticTask", "QuadraticFamily", "MNISTTask", "MNISTConvTask",
           "DigitsResNetTask", "FixedFamily", "classification_metrics", "ACTIVATIONS", "HessianQuadraticTask",
           "wang_quadratic", "LeastSquaresTask", "LeastSquaresFamily",
           "make_family", "FAMILIES"]


def make_family(name: str, **kwargs) -> TaskFamily:
    """A task family by name (a key of :data:`FAMILIES`), e.g. ``"simple"``, ``"quadratic"`` (kwargs of
    :class:`QuadraticFamily`), ``"mnist"`` (kwargs of :class:`MNISTTask`), ``"wang_quadratic"`` (kwargs
    of :func:`wang_quadratic` but the generator: ``seed``) or ``"least_squares"`` (kwargs of
    :class:`LeastSquaresFamily`)."""
    if name not in FAMILIES:
        raise ValueError(f"make_family: unknown task family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name](**kwargs)


FAMILIES = {
    "simple": lambda **kw: FixedFamily(SimpleTask(**kw)),
    "quadratic": QuadraticFamily,
    "mnist": lambda **kw: FixedFamily(MNISTTask(**kw)),
    "ensemble": lambda **kw: default_ensemble(**kw),
    "mnist_conv": lambda **kw: FixedFamily(MNISTConvTask(**kw)),
    "digits_resnet": lambda **kw: FixedFamily(DigitsResNetTask(**kw)),
    "wang_quadratic": lambda seed=0, **kw: FixedFamily(wang_quadratic(generator=torch.Generator().manual_seed(seed), **kw)),
    "least_squares": LeastSquaresFamily,
}
