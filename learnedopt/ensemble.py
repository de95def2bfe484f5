"""Problems of the meta-training ensemble of Wichrowska et al. 2017 (the original code's
``problem_sets.py``; see reference papers.md §2.4), as functional tasks of :mod:`learnedopt.tasks`.

Problems (each a :class:`~learnedopt.tasks.TaskFamily`: a new instance, θ₀ included, per draw):

* :class:`NoisyQuadratic` ½‖Wx − y‖² (W, y, x₀ ~ N(0, 1)); :class:`Bowl` ½‖A x‖² in 2-D with
  A = √diag(κ, 1) R(angle);
* the 2-D test functions of :data:`FUNCTIONS_2D` (Ackley, Beale, Booth, Branin, LogSumExp, Matyas,
  Michalewicz, Rosenbrock, Styblinski-Tang), θ₀ uniform in the original ranges;
* :class:`LogisticRegression`: 2-class logistic regression on ``sklearn.datasets.make_classification``
  data (1,000 samples, all features informative, seed 123), with an L2 penalty of 1e-3;
* :class:`SumOf`: a sum of independent problems.

Transformations (also task families): :class:`Rescale` (the optimizer sees θ_raw with θ = scale ·
θ_raw), :class:`LogObjective` (log(f + 1e-6) − log 1e-6), :class:`GradientNoise` (+ N(0, σ²) on every
gradient element), :class:`SparseGradients` (each element zeroed with probability 0.99).

:func:`default_ensemble` mixes them uniformly (a subset of the original 101 specs: its MLP,
MatMul-algorithm and Norm problems are not here yet).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .tasks import Task, TaskFamily

__all__ = ["NoisyQuadratic", "Bowl", "Function2D", "FUNCTIONS_2D", "LogisticRegression", "SumOf", "Rescale",
           "LogObjective", "GradientNoise", "SparseGradients", "Mixture", "default_ensemble"]


class _Instance(Task):
    """A task from closures: init(generator) -> params, loss(params) (deterministic, no batches)."""

    def __init__(self, name: str, init: Callable[[torch.Generator], list[Tensor]], loss: Callable[[Sequence[Tensor]], Tensor]):
        self.name, self._init, self._loss = name, init, loss

    def init_params(self, generator):
        return self._init(generator)

    def loss(self, params, batch):
        return self._loss(params)


def _uniform(generator, lo, hi, n=1):
    return lo + (hi - lo) * torch.rand(n, generator=generator)


class NoisyQuadratic(TaskFamily):
    """f = ½‖Wx − y‖², W [d, d], y [d], x₀ ~ N(0, 1) per draw; ``noise``: gradient noise σ."""

    def __init__(self, dim: int, noise: float = 0.0):
        self.dim, self.noise, self.name = dim, noise, f"quadratic{dim}" + (f"-noise{noise}" if noise else "")

    def sample(self, generator):
        W = torch.randn(self.dim, self.dim, generator=generator)
        y = torch.randn(self.dim, generator=generator)
        task = _Instance(self.name, lambda g: [torch.randn(self.dim, generator=g)],
                         lambda p: 0.5 * (W @ p[0] - y).square().sum())
        return _NoisyTask(task, self.noise) if self.noise else task


class Bowl(TaskFamily):
    """f = ½‖A x‖², A = √diag(κ, 1) R(angle), x ∈ R², x₀ ~ N(0, 1)."""

    def __init__(self, kappa: float, angle: float = 0.0, noise: float = 0.0):
        self.kappa, self.angle, self.noise = kappa, angle, noise
        self.name = f"bowl{kappa}" + (f"-angle{angle:.3g}" if angle else "") + (f"-noise{noise}" if noise else "")
        c, s = math.cos(angle), math.sin(angle)
        self.A = torch.diag(torch.tensor([math.sqrt(kappa), 1.0])) @ torch.tensor([[c, -s], [s, c]])

    def sample(self, generator):
        task = _Instance(self.name, lambda g: [torch.randn(2, generator=g)], lambda p: 0.5 * (self.A @ p[0]).square().sum())
        return _NoisyTask(task, self.noise) if self.noise else task


def _ackley(x, y):
    return (-20 * torch.exp(-0.2 * torch.sqrt(0.5 * (x * x + y * y))) - torch.exp(
        0.5 * (torch.cos(2 * math.pi * x) + torch.cos(2 * math.pi * y))) + math.e + 20)


def _beale(x, y):
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y * y) ** 2 + (2.625 - x + x * y ** 3) ** 2


def _booth(x, y):
    return (x + 2 * y - 7) ** 2 + (2 * x + y - 5) ** 2


def _branin(x, y):
    b, c, r, s, t = 5.1 / (4 * math.pi ** 2), 5 / math.pi, 6.0, 10.0, 1 / (8 * math.pi)
    return (y - b * x * x + c * x - r) ** 2 + s * (1 - t) * torch.cos(x) + s


def _logsumexp(x, y):
    return torch.logsumexp(torch.stack([x, y]), 0)


def _matyas(x, y):
    return 0.26 * (x * x + y * y) - 0.48 * x * y


def _michalewicz(x, y, m=5):
    return -(torch.sin(x) * torch.sin(x * x / math.pi) ** (2 * m) + torch.sin(y) * torch.sin(2 * y * y / math.pi) ** (2 * m))


def _rosenbrock(x, y):
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def _styblinski_tang(x, y):
    return 0.5 * ((x ** 4 - 16 * x * x + 5 * x) + (y ** 4 - 16 * y * y + 5 * y))


# name -> (f(x, y), initial range of x, initial range of y; None: N(0, 1))
FUNCTIONS_2D: dict[str, tuple[Callable, Any, Any]] = {
    "ackley": (_ackley, (-32.768, 32.768), (-32.768, 32.768)),
    "beale": (_beale, (-4.5, 4.5), (-4.5, 4.5)),
    "booth": (_booth, (-10.0, 10.0), (-10.0, 10.0)),
    "branin": (_branin, (-5.0, 10.0), (0.0, 15.0)),
    "logsumexp": (_logsumexp, None, None),
    "matyas": (_matyas, (-10.0, 10.0), (-10.0, 10.0)),
    "michalewicz": (_michalewicz, (0.0, math.pi), (0.0, math.pi)),
    "rosenbrock": (_rosenbrock, (-5.0, 10.0), (-5.0, 10.0)),
    "styblinski_tang": (_styblinski_tang, (-5.0, 5.0), (-5.0, 5.0)),
}


class Function2D(TaskFamily):
    """A 2-D test function of :data:`FUNCTIONS_2D`; θ = [x, y], θ₀ uniform in its range."""

    def __init__(self, name: str, noise: float = 0.0):
        if name not in FUNCTIONS_2D:
            raise ValueError(f"Function2D: unknown function {name!r}; known: {sorted(FUNCTIONS_2D)}")
        self.fn, self.rx, self.ry = FUNCTIONS_2D[name]
        self.noise, self.name = noise, name + (f"-noise{noise}" if noise else "")

    def init(self, g):
        if self.rx is None:
            return [torch.randn(2, generator=g)]
        return [torch.cat([_uniform(g, *self.rx), _uniform(g, *self.ry)])]

    def sample(self, generator):
        task = _Instance(self.name, self.init, lambda p: self.fn(p[0][0], p[0][1]))
        return _NoisyTask(task, self.noise) if self.noise else task


class _LogisticTask(Task):
    def __init__(self, name, x, y, batch_size):
        self.name, self.x, self.y, self.batch_size = name, x, y, batch_size

    def init_params(self, generator):
        d = self.x.shape[1]
        return [torch.randn(d, generator=generator) * (1.2 / math.sqrt(d)), torch.zeros(1)]

    def sample_batch(self, generator, split="train"):
        idx = torch.randint(0, self.x.shape[0], (self.batch_size,), generator=generator)
        return self.x[idx], self.y[idx]

    def loss(self, params, batch):
        x, y = batch
        w, b = params
        return F.binary_cross_entropy_with_logits(x @ w + b, y) + 1e-3 * w.square().sum()


class LogisticRegression(TaskFamily):
    """2-class logistic regression on ``make_classification(1000, features, class_sep, seed 123)``;
    minibatches of ``batch_size`` drawn with replacement (needs scikit-learn)."""

    def __init__(self, features: int, class_sep: float, batch_size: int, noise: float = 0.0):
        from sklearn.datasets import make_classification

        x, y = make_classification(n_samples=1000, n_features=features, n_informative=features, n_redundant=0,
                                   n_repeated=0, class_sep=class_sep, random_state=123)
        self.x = torch.tensor(x, dtype=torch.float32)
        self.y = torch.tensor(y, dtype=torch.float32)
        self.batch_size, self.noise = batch_size, noise
        self.name = f"logistic{features}" + (f"-noise{noise}" if noise else "")

    def sample(self, generator):
        task = _LogisticTask(self.name, self.x, self.y, self.batch_size)
        return _NoisyTask(task, self.noise) if self.noise else task


class _SumTask(Task):
    def __init__(self, tasks: list[Task]):
        self.tasks = tasks
        self.name = "+".join(t.name for t in tasks)
        self.sizes: list[int] = []

    def init_params(self, generator):
        params = []
        self.sizes = []
        for t in self.tasks:
            ps = t.init_params(generator)
            self.sizes.append(len(ps))
            params += ps
        return params

    def _split(self, seq):
        out, k = [], 0
        for n in self.sizes:
            out.append(list(seq[k:k + n]))
            k += n
        return out

    def sample_batch(self, generator, split="train"):
        return [t.sample_batch(generator, split) for t in self.tasks]

    def loss(self, params, batch):
        return sum(t.loss(p, b) for t, p, b in zip(self.tasks, self._split(params), batch))

    def transform_grads(self, grads, generator):
        return [g for t, gs in zip(self.tasks, self._split(grads)) for g in t.transform_grads(gs, generator)]


class SumOf(TaskFamily):
    """The sum of independent problems (one draw of each)."""

    def __init__(self, families: Sequence[TaskFamily]):
        self.families = list(families)
        self.name = "sum(" + ",".join(f.name for f in self.families) + ")"

    def sample(self, generator):
        return _SumTask([f.sample(generator) for f in self.families])


class _Wrapped(Task):
    def __init__(self, task: Task, name: str):
        self.task, self.name = task, name

    def init_params(self, generator):
        return self.task.init_params(generator)

    def sample_batch(self, generator, split="train"):
        return self.task.sample_batch(generator, split)

    def loss(self, params, batch):
        return self.task.loss(params, batch)

    def transform_grads(self, grads, generator):
        return self.task.transform_grads(grads, generator)


class _NoisyTask(_Wrapped):
    def __init__(self, task, std):
        super().__init__(task, task.name)
        self.std = float(std)

    def transform_grads(self, grads, generator):
        grads = self.task.transform_grads(grads, generator)
        return [g + self.std * torch.randn(g.shape, generator=generator, dtype=g.dtype) for g in grads]


class _SparseTask(_Wrapped):
    def __init__(self, task, p):
        super().__init__(task, f"sparse({task.name})")
        self.p = float(p)

    def transform_grads(self, grads, generator):
        grads = self.task.transform_grads(grads, generator)
        return [g * (torch.rand(g.shape, generator=generator) >= self.p).to(g.dtype) for g in grads]


class _RescaledTask(_Wrapped):
    def __init__(self, task, scale):
        super().__init__(task, f"rescale{scale}({task.name})")
        self.scale = float(scale)

    def init_params(self, generator):
        return [p / self.scale for p in self.task.init_params(generator)]

    def loss(self, params, batch):
        return self.task.loss([p * self.scale for p in params], batch)


class _LogTask(_Wrapped):
    def __init__(self, task):
        super().__init__(task, f"log({task.name})")

    def loss(self, params, batch):
        return torch.log(self.task.loss(params, batch) + 1e-6) - math.log(1e-6)


def _transform(make: Callable[[Task], Task], prefix: str):
    class _Family(TaskFamily):
        def __init__(self, family: TaskFamily, *args):
            self.family, self.args = family, args
            self.name = f"{prefix}{''.join(str(a) for a in args)}({family.name})"

        def sample(self, generator):
            return make(self.family.sample(generator), *self.args)

    _Family.__name__ = prefix.capitalize()
    return _Family


GradientNoise = _transform(_NoisyTask, "noise")
GradientNoise.__doc__ = "Adds N(0, std²) to every gradient element: ``GradientNoise(family, std)``."
SparseGradients = _transform(_SparseTask, "sparse")
SparseGradients.__doc__ = "Zeroes each gradient element with probability p: ``SparseGradients(family, 0.99)``."
Rescale = _transform(_RescaledTask, "rescale")
Rescale.__doc__ = "The optimizer sees θ_raw, θ = scale θ_raw: ``Rescale(family, scale)``."
LogObjective = _transform(_LogTask, "log")
LogObjective.__doc__ = "log(f + 1e-6) − log(1e-6): ``LogObjective(family)``."


class Mixture(TaskFamily):
    """Draws one of its families uniformly at random (with the generator), then an instance of it."""

    def __init__(self, families: Sequence[TaskFamily]):
        if not families:
            raise ValueError("Mixture: needs at least one family")
        self.families = list(families)
        self.name = f"mixture of {len(self.families)}"

    def sample(self, generator):
        k = int(torch.randint(0, len(self.families), (1,), generator=generator))
        return self.families[k].sample(generator)


def default_ensemble(with_sklearn: bool = True) -> Mixture:
    """The problems of the original default ensemble that are implemented here (see the module
    docstring), each as one entry of a uniform mixture."""
    fams: list[TaskFamily] = []
    fams += [NoisyQuadratic(d, n) for d, n in ((20, 0.5), (25, 0.0), (50, 1.0), (100, 2.0))]
    fams += [NoisyQuadratic(d) for d in (784, 1024, 2048)]
    bowls = [(0.1, 0.0), (1.0, 0.0), (5.0, 0.0), (5.0, math.pi / 4)]
    fams += [Bowl(k, a) for k, a in bowls] + [Bowl(k, a, noise=0.1) for k, a in bowls]
    if with_sklearn:
        specs = ((10, 2.0, 100, 0.5), (100, 1.0, 50, 0.1), (200, 1.5, 20, 0.1), (256, 1.5, 100, 0.5))
        fams += [LogisticRegression(f, s, b) for f, s, b, _ in specs]
        fams += [LogisticRegression(f, s, b, noise=n) for f, s, b, n in specs]
    fams += [Function2D(n) for n in FUNCTIONS_2D] + [Function2D(n, noise=1.0) for n in FUNCTIONS_2D]
    fams += [LogObjective(NoisyQuadratic(d)) for d in (20, 50, 100)] + [LogObjective(Bowl(k)) for k in (0.1, 1.0, 5.0)]
    fams += [Rescale(NoisyQuadratic(d), s) for d, s in ((20, 0.1), (25, 10.0), (50, 350.0), (100, 132.0))]
    fams += [SumOf([NoisyQuadratic(d) for d in (11, 3, 9, 7, 5, 13, 12)]),
             SumOf([Function2D(n) for n in FUNCTIONS_2D]),
             SumOf([Function2D("rosenbrock"), Function2D("logsumexp"), Function2D("ackley")]),
             SumOf([NoisyQuadratic(11), NoisyQuadratic(3)])]
    fams += [SparseGradients(f, 0.99) for f in (NoisyQuadratic(20), NoisyQuadratic(50), NoisyQuadratic(100),
                                                Bowl(0.1), Bowl(1.0), Bowl(5.0))]
    return Mixture(fams)

