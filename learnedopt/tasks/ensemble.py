"""Problems of the meta-training ensemble of Wichrowska et al. 2017 (the original code's
``problem_sets.py``; see reference papers.md §2.4), as functional tasks of :mod:`learnedopt.tasks`.

Problems (each a :class:`~learnedopt.tasks.TaskFamily`: a new instance, θ₀ included, per draw):

* :class:`NoisyQuadratic` ½‖Wx − y‖² (W, y, x₀ ~ N(0, 1)); :class:`Bowl` ½‖A x‖² in 2-D with
  A = √diag(κ, 1) R(angle); :class:`Norm` (Σᵢ (|Wx − y|ᵢ + 1e-6)^p)^(1/p) (W, y, x₀ ~ N(0, 1));
* the 2-D test functions of :data:`FUNCTIONS_2D` (Ackley, Beale, Booth, Branin, LogSumExp, Matyas,
  Michalewicz, Rosenbrock, Styblinski-Tang), θ₀ uniform in the original ranges;
* :class:`LogisticRegression`: 2-class logistic regression on ``sklearn.datasets.make_classification``
  data (1,000 samples, all features informative, seed 123), with an L2 penalty of 1e-3;
* :class:`RandomMLP`: a 2-class sigmoid MLP on 1,000 Gaussian points labelled by a random 6-layer
  ReLU network (data seed 123; torch only);
* :class:`MatMulAlgorithm`: learn U, V ∈ R^{n²×k} such that k bilinear products (Uᵀvec A) ⊙ (Vᵀvec B)
  reconstruct A·B (a Strassen-like algorithm with k multiplications), the read-out solved in
  closed form;
* :class:`SumOf`: a sum of independent problems.

Transformations (also task families): :class:`Rescale` (the optimizer sees scale · θ, θ the problem's
parameters), :class:`LogObjective` (log(f + 1e-6) − log 1e-6), :class:`GradientNoise` (+ N(0, σ²) on every
gradient element), :class:`SparseGradients` (each element zeroed with probability 0.99).

:func:`default_ensemble` mixes the original 101 specs uniformly (93 without scikit-learn, which only
the logistic regressions need).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Task, TaskFamily

__all__ = ["NoisyQuadratic", "Bowl", "Norm", "Function2D", "FUNCTIONS_2D", "LogisticRegression", "RandomMLP",
           "MatMulAlgorithm", "MLP_SPECS", "SumOf", "Rescale", "LogObjective", "GradientNoise", "SparseGradients",
           "Mixture", "default_ensemble"]


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


class Norm(TaskFamily):
    """f = (Σᵢ (|Wx − y|ᵢ + 1e-6)^p)^(1/p), W [d, d], y [d], x₀ ~ N(0, 1) per draw (the original's
    ``Norm(ndim, norm_power=p)``; p < 1 gives NaN gradients early on, the ensemble uses p ≥ 1);
    ``noise``: gradient noise σ. The rescaled "Norm18" problems are ``Rescale(Norm(18, p), scale)``."""

    def __init__(self, dim: int, p: float, noise: float = 0.0):
        if dim < 1 or p <= 0:
            raise ValueError(f"Norm: needs dim >= 1 and p > 0, got {dim} and {p}")
        self.dim, self.p, self.noise = int(dim), float(p), noise
        self.name = f"norm{dim}-p{p:g}" + (f"-noise{noise}" if noise else "")

    def sample(self, generator):
        W = torch.randn(self.dim, self.dim, generator=generator)
        y = torch.randn(self.dim, generator=generator)
        p = self.p
        task = _Instance(self.name, lambda g: [torch.randn(self.dim, generator=g)],
                         lambda x: ((W @ x[0] - y).abs() + 1e-6).pow(p).sum().pow(1.0 / p))
        task.W, task.y = W, y
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
    # the original code's: log(e^(x+3y-0.1) + e^(x-3y-0.1) + e^(-x-0.1) + 1) (positive everywhere)
    zero = torch.zeros_like(x)
    return torch.logsumexp(torch.stack([x + 3 * y - 0.1, x - 3 * y - 0.1, -x - 0.1, zero]), 0)


def _matyas(x, y):
    return 0.26 * (x * x + y * y) - 0.48 * x * y


def _michalewicz(x, y, m=5):
    # + 2 as in the original code: positive everywhere (for the log objectives)
    return 2 - (torch.sin(x) * torch.sin(x * x / math.pi) ** (2 * m) + torch.sin(y) * torch.sin(2 * y * y / math.pi) ** (2 * m))


def _rosenbrock(x, y):
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def _styblinski_tang(x, y):
    # + 80 as in the original code: positive everywhere (for the log objectives)
    return 0.5 * ((x ** 4 - 16 * x * x + 5 * x) + (y ** 4 - 16 * y * y + 5 * y)) + 80


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


def _random_mlp_data(input_dim: int, n_samples: int = 1000, seed: int = 123, layers: int = 6,
                     width: int = 20) -> tuple[Tensor, Tensor]:
    """x ~ N(0, 1) [n, input_dim]; y = 1[s(x) > median s] with s the scalar linear read-out of a random
    ``layers``-layer ReLU network of ``width`` (no biases, weights N(0, 1)/√fan_in), all drawn from a
    private generator seeded with ``seed``. Thresholding at the median (not at 0) keeps the classes
    balanced: a deep bias-free ReLU network maps most inputs to outputs of one sign."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, input_dim, generator=g)
    h, fan_in = x, input_dim
    for _ in range(layers):
        h = torch.relu(h @ (torch.randn(fan_in, width, generator=g) / math.sqrt(fan_in)))
        fan_in = width
    s = h @ (torch.randn(width, generator=g) / math.sqrt(width))
    return x, (s > s.median()).long()


class _MLPTask(Task):
    def __init__(self, name, x, y, sizes, batch_size):
        self.name, self.x, self.y, self.sizes, self.batch_size = name, x, y, sizes, batch_size

    def init_params(self, generator):
        params = []
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
            params += [torch.randn(fan_in, fan_out, generator=generator) / math.sqrt(fan_in), torch.zeros(fan_out)]
        return params

    def sample_batch(self, generator, split="train"):
        idx = torch.randint(0, self.x.shape[0], (self.batch_size,), generator=generator)
        return self.x[idx], self.y[idx]

    def logits(self, params, x):
        n = len(params) // 2
        for l in range(n):
            x = torch.addmm(params[2 * l + 1], x, params[2 * l])
            if l < n - 1:
                x = torch.sigmoid(x)
        return x

    def loss(self, params, batch):
        x, y = batch
        return F.cross_entropy(self.logits(params, x), y) + 1e-3 * sum(w.square().sum() for w in params[0::2])


class RandomMLP(TaskFamily):
    """The original's "FullyConnected" 2-class problems: an MLP ``input_dim`` → ``hidden_sizes``
    (sigmoid) → 2 logits, softmax cross-entropy plus 1e-3 Σ‖W‖² over the weight matrices (as
    :class:`LogisticRegression`), on 1,000 points x ~ N(0, 1) labelled by a random 6-layer ReLU
    network of width 20 (:func:`_random_mlp_data`: the same data for every draw, seed 123).
    θ = [W₁, b₁, W₂, b₂, …] (W [fan_in, fan_out]), W ~ N(0, 1)/√fan_in and b = 0 at θ₀; minibatches
    of ``batch_size`` drawn with replacement; ``noise``: gradient noise σ. Needs only torch."""

    def __init__(self, input_dim: int, hidden_sizes: Sequence[int], batch_size: int, noise: float = 0.0):
        self.sizes = (int(input_dim),) + tuple(int(h) for h in hidden_sizes) + (2,)
        if any(s < 1 for s in self.sizes) or batch_size < 1:
            raise ValueError(f"RandomMLP: sizes and batch_size must be >= 1, got {self.sizes} and {batch_size}")
        self.x, self.y = _random_mlp_data(int(input_dim))
        self.batch_size, self.noise = int(batch_size), noise
        self.name = (f"mlp{input_dim}-{'x'.join(str(h) for h in hidden_sizes)}-b{batch_size}"
                     + (f"-noise{noise}" if noise else ""))

    def sample(self, generator):
        task = _MLPTask(self.name, self.x, self.y, self.sizes, self.batch_size)
        return _NoisyTask(task, self.noise) if self.noise else task


def _matmul_basis(n: int) -> tuple[Tensor, Tensor, Tensor]:
    """All n⁴ pairs of one-hot n×n matrices (A = e_p, B = e_q) and their products, as rows of
    vec(A), vec(B), vec(AB) [n⁴, n²] (float64). Since (A, B) ↦ AB is bilinear, an algorithm exact on
    these pairs is exact on all matrices."""
    eye = torch.eye(n * n, dtype=torch.float64)
    a, b = eye.repeat_interleave(n * n, 0), eye.repeat(n * n, 1)
    c = torch.bmm(a.view(-1, n, n), b.view(-1, n, n)).reshape(-1, n * n)
    return a, b, c


class _MatMulTask(Task):
    def __init__(self, name, n, k):
        self.name, self.n, self.k = name, n, k
        self.a, self.b, self.c = _matmul_basis(n)

    def init_params(self, generator):
        return [torch.randn(self.n ** 2, self.k, generator=generator) / self.n for _ in range(2)]

    def readout(self, params):
        """The k products P = (A U) ⊙ (B V) [n⁴, k] on the basis pairs and the least-squares read-out
        W [k, n²] (P ≈ vec(AB) as P W), both float64."""
        U, V = (p.double() for p in params)
        P = (self.a @ U) * (self.b @ V)
        W = torch.linalg.solve(P.T @ P + 1e-6 * torch.eye(self.k, dtype=P.dtype), P.T @ self.c)
        return P, W

    def loss(self, params, batch):
        P, W = self.readout(params)
        return (P @ W - self.c).square().sum().to(params[0].dtype)


class MatMulAlgorithm(TaskFamily):
    """Learning an n×n matrix-multiplication algorithm with k multiplications (Strassen: n = 2,
    k = 7), the original's ``MatMulAlgorithm(n, k)``: θ = (U, V) ∈ R^{n²×k} × R^{n²×k} define k products
    m = (Uᵀ vec A) ⊙ (Vᵀ vec B); the read-out W [k, n²] with vec(AB) ≈ Wᵀ m is solved in closed form
    (normal equations with a ridge of 1e-6, differentiable in U and V, computed in float64), and the
    loss is the summed squared residual over all n⁴ pairs of one-hot matrices (A, B) — deterministic,
    no batches, and zero iff (U, V, W) multiplies all matrices exactly (it always can for k = n³: the
    naive algorithm). θ₀ ~ N(0, 1)/√(n²) (the original normalizes each column of θ₀ to norm 1)."""

    def __init__(self, n: int, k: int):
        if n < 2 or not n * n <= k <= n ** 3:
            raise ValueError(f"MatMulAlgorithm: needs n >= 2 and n² <= k <= n³, got n={n}, k={k}")
        self.n, self.k, self.name = int(n), int(k), f"matmul{n}-k{k}"

    def sample(self, generator):
        return _MatMulTask(self.name, self.n, self.k)


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
        return [p * self.scale for p in self.task.init_params(generator)]

    def loss(self, params, batch):
        return self.task.loss([p / self.scale for p in params], batch)


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
Rescale.__doc__ = ("The optimizer sees scale · θ (θ the problem's parameters), as the original code's "
                   "Rescale: ``Rescale(family, scale)``.")
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


MLP_SPECS: tuple[tuple[int, tuple[int, ...], int], ...] = (
    (8, (8, 5), 10), (12, (8, 5, 3), 200), (5, (4, 4, 4, 4), 100), (11, (4, 5, 6), 64), (9, (8,), 128),
    (7, (8, 5), 16), (8, (32, 64), 10), (12, (16, 8, 3), 200), (5, (8, 8, 8, 8), 100), (11, (10, 12, 12), 64),
    (9, (32,), 128), (7, (32, 64), 16))
"""(input_dim, hidden_sizes, batch_size) of the original's 12 "FullyConnected" 2-class problems."""


def default_ensemble(with_sklearn: bool = True) -> Mixture:
    """The original default ensemble's 101 specs, each as one entry of a uniform mixture (93 with
    ``with_sklearn=False``, which leaves out the 8 logistic regressions)."""
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
    fams += [RandomMLP(i, h, b) for i, h, b in MLP_SPECS]
    fams += [MatMulAlgorithm(2, k) for k in range(5, 9)] + [MatMulAlgorithm(3, k) for k in range(19, 25)]
    fams += [LogObjective(NoisyQuadratic(d)) for d in (20, 50, 100)] + [LogObjective(Bowl(k)) for k in (0.1, 1.0, 5.0)]
    fams += [Rescale(Norm(18, p), s) for p, s in ((2.5, 0.123), (1.5, 8.0), (2.0, 50.0), (3.0, 200.0), (1.0, 1000.0))]
    fams += [Rescale(NoisyQuadratic(d), s) for d, s in ((20, 0.1), (25, 10.0), (50, 350.0), (100, 132.0))]
    fams += [Norm(d, p) for d, p in ((27, 1.0), (25, 2.0), (22, 3.0))]
    fams += [Norm(d, p, noise=0.1) for d, p in ((19, 1.0), (26, 2.0), (23, 3.0))]
    fams += [SumOf([NoisyQuadratic(d) for d in (11, 3, 9, 7, 5, 13, 12)]),
             SumOf([Norm(18, 3.0), NoisyQuadratic(25), Function2D("rosenbrock")]),
             SumOf([Function2D(n) for n in FUNCTIONS_2D]),
             SumOf([Function2D(n) for n in FUNCTIONS_2D] + [NoisyQuadratic(5), NoisyQuadratic(13)]),
             SumOf([NoisyQuadratic(11), NoisyQuadratic(3)]),
             SumOf([Function2D("rosenbrock"), Function2D("logsumexp"), Function2D("ackley")])]
    # noisy sums: in the original only the last problem of the second one (quadratic 13) is noisy
    fams += [SumOf([NoisyQuadratic(d, 0.1) for d in (11, 3, 9, 7, 5, 13, 12)]),
             SumOf([Function2D(n) for n in FUNCTIONS_2D] + [NoisyQuadratic(5), NoisyQuadratic(13, 0.5)])]
    fams += [SparseGradients(f, 0.99) for f in (NoisyQuadratic(20), NoisyQuadratic(50), NoisyQuadratic(100),
                                                Bowl(0.1), Bowl(1.0), Bowl(5.0))]
    fams += [SparseGradients(RandomMLP(i, h, b), 0.99) for i, h, b in MLP_SPECS[:3]]
    return Mixture(fams)
