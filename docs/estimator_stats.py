#!/usr/bin/env python3
"""The measured bias and variance of the meta-gradient estimators (docs/meta-training.md), on the
quadratic of tests/test_estimators.py (3-d, 2 functions, θ₀ = 0; the L2L rule with no LSTM layer, update
0.1 (w g + b), φ = (w, b) = (−0.3, 0.05); meta-objective "sum").

Horizons: one truncation of 6 steps, and 3 truncations of 2 steps. References (the tests' oracle): the
exact full-horizon gradient ∇L(φ) (full BPTT with second derivatives) and the Gaussian-smoothed one
E ∇L(φ + ε) (Monte-Carlo mean of exact gradients). For each estimator: the mean of ``--repeats``
independent whole-trajectory estimates, its bias against the smoothed reference in standard errors, and
the standard deviation of one estimate (its square root of the summed per-coordinate variances),
relative to ‖reference‖. Writes docs/eval/estimators.json and prints a table.

    PYTHONPATH=. python docs/estimator_stats.py [--repeats 300]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("test_estimators", ROOT / "tests" / "test_estimators.py")
T = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T)
from learnedopt.meta import estimators as E  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task, rule = T._task(), T._linear_rule()
    theta0 = task.init_params(T._gen(0))[0]
    phi = torch.tensor([-0.3, 0.05])
    rows = []
    for lengths, sigma in (([6], 0.02), ([6], 0.1), ([2, 2, 2], 0.05)):
        p = phi.clone().requires_grad_(True)
        exact = torch.autograd.grad(T._oracle_loss(task, theta0, p[None].expand(len(lengths), 2), lengths), p)[0]
        ref, ref_se = T._smoothed_grad(task, theta0, phi, lengths, sigma, args.repeats)
        ests = [("bptt (truncated, 1st order)", E.TruncatedBPTT(), 1), ("es", E.ES(pairs=4, sigma=sigma), 8),
                ("pes", E.PES(pairs=4, sigma=sigma), 8)]
        for name, est, particles in ests:
            reps = 1 if isinstance(est, E.TruncatedBPTT) else args.repeats
            x = T._estimates(est, rule, task, lengths, reps)
            mean = x.mean(0)
            se = x.std(0) / math.sqrt(reps) if reps > 1 else torch.zeros(2)
            z = ((mean - ref).abs() / torch.sqrt(se ** 2 + ref_se ** 2)).max()
            std = float(x.var(0).sum().sqrt()) if reps > 1 else 0.0
            label = name if len(lengths) == 1 or name != "es" else "es (truncated)"
            rows.append({"horizon": "+".join(map(str, lengths)), "sigma": sigma, "estimator": label,
                         "pairs": 4 if particles > 1 else None, "mean": mean.tolist(), "smoothed": ref.tolist(),
                         "smoothed_se": ref_se.tolist(), "exact": exact.tolist(),
                         "bias_vs_smoothed_rel": float((mean - ref).norm() / ref.norm()),
                         "bias_in_se": float(z), "bias_vs_exact_rel": float((mean - exact).norm() / exact.norm()), "std_rel": std / float(ref.norm()),
                         "smoothing_rel": float((ref - exact).norm() / exact.norm()),
                         "optimizee_steps": particles * sum(lengths) + (0 if particles == 1 or name == "pes"
                                                                        or len(lengths) == 1 else sum(lengths[:-1]))})
    print(f"{'horizon':8} {'sigma':>5} {'estimator':28} {'mean':>18} {'smoothed':>18} {'exact':>18} "
          f"{'|bias|/|g|':>10} {'vs exact':>8} {'bias/se':>8} {'std/|g|':>8} {'steps':>5}")
    for r in rows:
        fmt = lambda v: "(" + ", ".join(f"{a:7.3f}" for a in v) + ")"  # noqa: E731
        print(f"{r['horizon']:8} {r['sigma']:5.2f} {r['estimator']:28} {fmt(r['mean']):>18} {fmt(r['smoothed']):>18} "
              f"{fmt(r['exact']):>18} {r['bias_vs_smoothed_rel']:10.3f} {r['bias_vs_exact_rel']:8.3f} {r['bias_in_se']:8.1f} {r['std_rel']:8.2f} "
              f"{r['optimizee_steps']:5d}")
    out = ROOT / "docs" / "eval" / "estimators.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=1))
    print(f"# wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
