"""Reproduces the experiments of Wang, Yuan, Wu & Ge 2021, "Guarantees for Tuning the Step Size using a
Learning-to-Learn Approach" (docs/wang.md), through learnedopt's public meta-training API: the tasks of
learnedopt.tasks.wang, the LearnedSGD rule, meta.unroll with the "final" / "log_rate" objectives and
train-by-validation, and MetaTrainer for meta-gradient descent.

    PYTHONPATH=. python docs/wang.py                 # everything: 471 s on one core of the loaded 2-core machine
    PYTHONPATH=. python docs/wang.py --ls-tasks 300  # §4 with the paper's 300 tasks per meta-objective (~6x longer)

Writes docs/figures/wang-*.png and docs/eval/wang.json (every number quoted in docs/wang.md); the
meta-training runs go to --runs (default runs/wang, not in git). One thread (torch.set_num_threads(1)).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from learnedopt import meta, tasks
from learnedopt.meta import LearnedSGD, MetaConfig, MetaTrainer

ROOT = Path(__file__).resolve().parents[1]


def _sgd(eta: float, dtype=torch.float64, **kw) -> LearnedSGD:
    rule = LearnedSGD(eta, **kw).to(dtype)
    with torch.no_grad():
        rule.lr.fill_(eta)  # exactly eta in the rule's dtype
    return rule


# -- §3: the quadratic ---------------------------------------------------------------------------
def meta_gradient(task, eta: float, t: int, objective: str, dtype=torch.float64, second_derivatives=True):
    """(meta-loss, dF/dη) by back-propagation through t steps of GD with step η (meta.unroll)."""
    q = tasks.HessianQuadraticTask(task.H.to(dtype), task.w0.to(dtype))
    rule = _sgd(eta, dtype)
    g = torch.Generator().manual_seed(0)  # unused: the task is deterministic
    loss, _, _ = meta.unroll(rule, meta.start(rule, q, g), t, g, objective=objective,
                             second_derivatives=second_derivatives)
    (grad,) = torch.autograd.grad(loss, [rule.lr])
    return loss.item(), grad.item()


def closed_form(task, etas: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """f(w_t) = ½ Σ c_i² λ_i (1 − ηλ_i)^{2t} and its η-derivative, in float64 from H's eigendecomposition:
    the independent check of the back-propagated meta-gradients and the grid search of η*."""
    lam, c = task.eigen()
    base = 1 - etas[:, None] * lam
    f = 0.5 * (c ** 2 * lam * base ** (2 * t)).sum(1)
    df = -t * (c ** 2 * lam ** 2 * base ** (2 * t - 1)).sum(1)
    return f, df


def eta_star(task, t: int) -> float:
    """argmin_η f(w_{t,η}) by a grid of 400,001 points on [0, 2.2/L] (spacing ~1e-7 here), refined by a
    second grid around the best point."""
    L = float(torch.linalg.eigvalsh(task.H).max())
    grid = torch.linspace(0.0, 2.2 / L, 400_001, dtype=torch.float64)
    best = float(grid[closed_form(task, grid, t)[0].argmin()])
    h = float(grid[1] - grid[0])
    fine = torch.linspace(best - h, best + h, 20_001, dtype=torch.float64)
    return float(fine[closed_form(task, fine, t)[0].argmin()])


def quadratic_part(args, out: dict) -> None:
    d, t = 20, 80
    task = tasks.wang_quadratic(d, torch.Generator().manual_seed(args.seed))
    lam, c = task.eigen()
    alpha, L = float(lam[0]), float(lam[-1])
    c_min = min(abs(float(c[0])), abs(float(c[-1])))
    es = eta_star(task, t)
    res = {"d": d, "t": t, "seed": args.seed, "alpha": alpha, "L": L, "two_over_L": 2 / L, "c_min": c_min,
           "theorem4_scale": L ** 3 / (c_min ** 2 * alpha * (L - alpha)), "eta_star": es}
    print(f"§3 quadratic d={d} t={t}: alpha {alpha:.4g}, L {L:.4g}, 2/L {2 / L:.5f}, eta* {es:.6f}")

    # |meta-gradient| vs eta: back-propagated (float64 and float32) and closed form
    etas = sorted(set([round(x, 6) for x in torch.logspace(-3, -1, 41).tolist()] + [0.9 * 2 / L, 0.99 * 2 / L, es,
                                                                                      1.01 * 2 / L, 1.1 * 2 / L]))
    f_cf, df_cf = closed_form(task, torch.tensor(etas, dtype=torch.float64), t)
    rows = []
    for i, eta in enumerate(etas):
        row = {"eta": eta, "naive_closed": float(df_cf[i]), "log_closed": float(df_cf[i] / f_cf[i] / t)}
        for obj, key in (("final", "naive"), ("log_rate", "log")):
            row[key] = meta_gradient(task, eta, t, obj)[1]
            row[key + "_f32"] = meta_gradient(task, eta, t, obj, dtype=torch.float32)[1]
        row["log_no2nd"] = meta_gradient(task, eta, t, "log_rate", second_derivatives=False)[1]
        rows.append(row)
    res["meta_gradients"] = rows
    # (η* itself excluded: there the log objective's meta-gradient is ~0 and a relative error meaningless)
    rel = max(abs(r[k] - r[k + "_closed"]) / abs(r[k + "_closed"]) for r in rows for k in ("naive", "log")
              if r["eta"] != es)
    res["max_rel_err_backprop_vs_closed"] = rel
    nonfinite32 = [r["eta"] for r in rows if not (math.isfinite(r["naive_f32"]) and math.isfinite(r["log_f32"]))]
    res["float32_nonfinite_from_eta"] = min(nonfinite32) if nonfinite32 else None
    print(f"  backprop vs closed form: max rel. error {rel:.2e}; float32 non-finite from eta = "
          f"{res['float32_nonfinite_from_eta']}")

    # meta-gradient descent (the paper's Fig. 1) through MetaTrainer
    runs = {}
    for name, sd, seed in [("log", True, args.seed)] + [("log, 2nd derivatives dropped", False, args.seed)] + \
            [(f"log, seed {s}", True, s) for s in args.extra_seeds]:
        q = task if seed == args.seed else tasks.wang_quadratic(d, torch.Generator().manual_seed(seed))
        es_q = es if seed == args.seed else eta_star(q, t)
        cfg = MetaConfig(task="wang_quadratic", task_kwargs={"seed": seed, "dim": d}, rule="sgd",
                         rule_kwargs={"lr": 0.1, "min_lr": 0.0}, objective="log_rate", second_derivatives=sd,
                         num_steps=t, unroll=t, epochs=args.meta_steps, meta_optimizer="SGD", meta_lr=0.01,
                         meta_lr_schedule="inv_sqrt", seed=0, checkpoint_every=10 ** 6)
        t0 = time.time()
        run_dir = Path(args.runs) / ("quadratic-" + name.replace(", ", "-").replace(" ", "-"))
        MetaTrainer(cfg, run_dir, rule=_sgd(0.1, min_lr=0.0), family=tasks.FixedFamily(q)).run()
        lrs = [r["rule_lr"] for r in meta.read_log(run_dir / "log.jsonl")]
        L_q = float(torch.linalg.eigvalsh(q.H).max())
        within = next((k + 1 for k in range(len(lrs)) if all(abs(x - es_q) <= 1e-3 for x in lrs[k:])), None)
        f_end, f_star = closed_form(q, torch.tensor([lrs[-1], es_q], dtype=torch.float64), t)[0].tolist()
        runs[name] = {"seed": seed, "second_derivatives": sd, "eta_star": es_q, "two_over_L": 2 / L_q, "eta": lrs,
                      "f_final_over_f_star": f_end / f_star,
                      "eta_300": lrs[min(299, len(lrs) - 1)], "eta_final": lrs[-1],
                      "stays_within_1e-3_from_step": within, "time_s": round(time.time() - t0, 1)}
        print(f"  meta-GD [{name}]: eta_300 {runs[name]['eta_300']:.5f} eta_{len(lrs)} {lrs[-1]:.5f} "
              f"(eta* {es_q:.5f}, 2/L {2 / L_q:.5f}; within 1e-3 for good from step {within}; f_t(eta_final)/f_t(eta*) "
              f"{f_end / f_star:.4g}) {runs[name]['time_s']} s")
    res["meta_gd"] = runs
    out["quadratic"] = res


def plot_quadratic(res: dict, fig_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["meta_gradients"]
    eta = [r["eta"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.semilogy(eta, [abs(r["naive"]) for r in rows], "o-", ms=3, label="naive  f(w_t)  (back-prop, float64)")
    ax.semilogy(eta, [abs(r["log"]) for r in rows], "s-", ms=3, label="log  (1/t) log f(w_t)  (back-prop, float64)")
    ax.semilogy(eta, [abs(r["naive_closed"]) for r in rows], "k.", ms=2, label="closed form (eigendecomposition)")
    ax.semilogy(eta, [abs(r["log_closed"]) for r in rows], "k.", ms=2)
    bad = [r["eta"] for r in rows if not math.isfinite(r["naive_f32"])]
    if bad:
        ax.axvspan(min(bad), max(eta), color="red", alpha=0.08, label="float32 back-prop: inf/NaN")
    ax.axvline(res["two_over_L"], color="gray", ls="--", lw=1, label="2/L")
    ax.axvline(res["eta_star"], color="green", ls=":", lw=1, label="η* (grid search)")
    ax.set_xscale("log")
    ax.set_xlabel("step size η")
    ax.set_ylabel("|meta-gradient dF/dη|")
    ax.set_title(f"Wang et al. §3: d={res['d']}, H=XᵀX, t={res['t']}")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(fig_dir / "wang-meta-gradient.png", dpi=120)
    plt.close(fig)

    runs = res["meta_gd"]
    nan0 = lambda xs: [x if x > 0 else float("nan") for x in xs]  # noqa: E731  (resets to 0: gaps on a log axis)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, names in ((axes[0], [n for n in runs if not n.startswith("log, seed")]),
                      (axes[1], [n for n in runs if n.startswith("log, seed")])):
        for j, name in enumerate(names):
            r = runs[name]
            color = f"C{list(runs).index(name)}"
            ax.semilogy(range(1, len(r["eta"]) + 1), nan0(r["eta"]), color=color, lw=0.9, label=name)
            ax.axhline(r["eta_star"], color=color, ls=":", lw=1.2)
            if j == 0 or name.startswith("log, seed"):
                ax.axhline(r["two_over_L"], color=color, ls="--", lw=0.8, alpha=0.7)
        ax.set_xlabel("meta-iteration k")
        ax.set_ylabel("η_k (gaps: reset to 0)")
        ax.legend(fontsize=7)
    axes[0].set_title(f"seed {res['seed']}: meta-GD, log objective, μ_k = 0.01/√k, η₀ = 0.1\n"
                      "dotted: η* (grid search), dashed: 2/L", fontsize=9)
    axes[1].set_title("other instances (same d, t; dotted: their η*, dashed: their 2/L)", fontsize=9)
    ax = axes[2]
    for name, r in runs.items():
        ax.semilogy(range(1, len(r["eta"]) + 1), [abs(x - r["eta_star"]) for x in r["eta"]], lw=0.8, label=name,
                    color=f"C{list(runs).index(name)}")
    ax.axhline(1e-3, color="k", ls=":", lw=0.8)
    ax.set_xlabel("meta-iteration k")
    ax.set_ylabel("|η_k − η*|")
    ax.set_title("distance to η* (dotted: 1e-3)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(fig_dir / "wang-meta-gd.png", dpi=120)
    plt.close(fig)


# -- §4: least squares -----------------------------------------------------------------------------
def least_squares_part(args, out: dict) -> None:
    d, t, n = 1000, 40, 500
    etas = torch.logspace(-6, 0, 25).tolist()  # the paper's grid
    res = {"d": d, "t": t, "n": n, "tasks": args.ls_tasks, "test_tasks": 10, "etas": etas, "sigmas": {}}
    for sigma in args.sigmas:
        t0 = time.time()
        fam = {"TbT": tasks.LeastSquaresFamily(d, n, 0, 0, sigma), "TbV": tasks.LeastSquaresFamily(d, n // 2, n // 2, 0, sigma)}
        rules = [_sgd(eta, torch.float32, max_norm=40 * sigma) for eta in etas]  # truncation at ‖w‖ = 40σ (the paper)
        sums = {k: [0.0] * len(etas) for k in fam}
        for i in range(args.ls_tasks):  # the same m tasks for every η; TbT and TbV split the same 500 samples
            for k, f in fam.items():
                task = f.sample(torch.Generator().manual_seed(10_000 * args.seed + i))
                for j, rule in enumerate(rules):
                    g = torch.Generator().manual_seed(0)  # unused: full-batch GD draws nothing
                    loss, _, _ = meta.unroll(rule, meta.start(rule, task, g), t, g, objective="final",
                                             validation=(k == "TbV"))
                    sums[k][j] += loss.item()
        objs = {k: [v / args.ls_tasks for v in sums[k]] for k in fam}
        best = {k: etas[min(range(len(etas)), key=lambda j: objs[k][j])] for k in fam}
        # test: 10 new tasks, GD on 500 fresh training samples, RMSE on them and on 500 test samples
        test_fam = tasks.LeastSquaresFamily(d, n, 0, n, sigma)
        tests = {k: {"train_rmse": [], "test_rmse": [], "param_error": [], "truncated": 0} for k in fam}
        zero = []
        curves = {k: [] for k in fam}
        for i in range(10):
            for k in fam:
                g = torch.Generator().manual_seed(10_000 * args.seed + 5_000 + i)
                task = test_fam.sample(g)
                rule = _sgd(best[k], torch.float32, max_norm=40 * sigma)
                losses, params = meta.run_rule(rule, task, t, g)
                m = task.heldout_metrics(params)
                tests[k]["train_rmse"].append(task.rmse(params, "train"))
                tests[k]["test_rmse"].append(m["rmse"])
                tests[k]["param_error"].append(m["param_error"])
                tests[k]["truncated"] += int(float(torch.linalg.vector_norm(params[0])) >= 40 * sigma * (1 - 1e-6))
                curves[k].append([math.sqrt(2 * v) for v in losses])
            zero.append(m["zero_rmse"])
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        summary = {k: {"eta_star": best[k], **{s: mean(v) for s, v in tests[k].items() if s != "truncated"},
                       "test_rmse_min": min(tests[k]["test_rmse"]), "test_rmse_max": max(tests[k]["test_rmse"]),
                       "train_rmse_max": max(tests[k]["train_rmse"]), "truncated_runs": tests[k]["truncated"],
                       "train_rmse_curve": [mean(c) for c in zip(*curves[k])]} for k in fam}
        res["sigmas"][str(sigma)] = {"meta_objective": objs, **summary, "zero_test_rmse": mean(zero),
                                     "zero_test_rmse_expected": math.sqrt(1 + sigma ** 2),
                                     "time_s": round(time.time() - t0, 1)}
        s = res["sigmas"][str(sigma)]
        print(f"§4 least squares sigma={sigma}: eta*_TbT {best['TbT']:.3g} eta*_TbV {best['TbV']:.3g}; "
              f"TbT train/test RMSE {s['TbT']['train_rmse']:.3f}/{s['TbT']['test_rmse']:.3f}, "
              f"TbV {s['TbV']['train_rmse']:.3f}/{s['TbV']['test_rmse']:.3f}, w=0 test {s['zero_test_rmse']:.3f} "
              f"({s['time_s']} s)")
    out["least_squares"] = res


def plot_least_squares(res: dict, fig_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sig = res["sigmas"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    ax = axes[0]
    for s, r in sig.items():
        for k, ls in (("TbT", "-"), ("TbV", "--")):
            ax.loglog(res["etas"], r["meta_objective"][k], ls, marker="o", ms=2.5, label=f"{k}, σ={s}")
    ax.set_xlabel("step size η")
    ax.set_ylabel("meta-objective F̂(η) (mean over tasks)")
    ax.set_title(f"meta-objectives: d={res['d']}, t={res['t']}, {res['tasks']} tasks")
    ax.legend(fontsize=7)
    ax = axes[1]  # TbV's minimum is shallow on the log axis: relative to its value at the smallest η
    for j, (s, r) in enumerate(sig.items()):
        keep = [i for i, e in enumerate(res["etas"]) if e <= 0.1]
        base = r["meta_objective"]["TbV"][0]
        ax.semilogx([res["etas"][i] for i in keep], [r["meta_objective"]["TbV"][i] / base for i in keep], "--o", ms=2.5,
                    color=f"C{2 * j + 1}", label=f"TbV, σ={s} (η* = {r['TbV']['eta_star']:.2g})")
    ax.set_xlabel("step size η (≤ 0.1)")
    ax.set_ylabel("F̂_TbV(η) / F̂_TbV(1e-6)")
    ax.set_title("train-by-validation: a minimum at a small η", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[2]
    labels = list(sig)
    x = range(len(labels))
    w = 0.2
    for j, (k, key) in enumerate((("TbT", "train_rmse"), ("TbT", "test_rmse"), ("TbV", "train_rmse"), ("TbV", "test_rmse"))):
        ax.bar([i + (j - 1.5) * w for i in x], [sig[s][k][key] for s in labels], w,
               label=f"{k} {key.split('_')[0]}", color=["C0", "C0", "C1", "C1"][j], alpha=1.0 if "test" in key else 0.45)
    for i, s in enumerate(labels):
        ax.plot([i - 2 * w, i + 2 * w], [sig[s]["zero_test_rmse"]] * 2, "k--", lw=1,
                label="w = 0, test" if i == 0 else None)
    ax.set_xticks(list(x), [f"σ = {s}" for s in labels])
    ax.set_ylabel("RMSE (10 test tasks, 500 + 500 samples)")
    ax.set_title("train-by-train overfits, train-by-validation does not")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(fig_dir / "wang-least-squares.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="seed of the §3 instance and of the §4 tasks")
    ap.add_argument("--extra-seeds", type=int, nargs="*", default=[1, 2], help="more §3 instances for meta-GD")
    ap.add_argument("--meta-steps", type=int, default=1000, help="meta-GD iterations (the paper: 1000)")
    ap.add_argument("--ls-tasks", type=int, default=50, help="tasks per meta-objective value in §4 (the paper: 300)")
    ap.add_argument("--sigmas", type=float, nargs="*", default=[1.0, 2.0, 4.0], help="noise levels in §4")
    ap.add_argument("--parts", nargs="*", default=["quadratic", "least_squares"])
    ap.add_argument("--runs", default=str(ROOT / "runs" / "wang"))
    ap.add_argument("--out", default=str(ROOT / "docs"), help="writes OUT/figures/wang-*.png and OUT/eval/wang.json")
    ap.add_argument("--plot-only", action="store_true", help="redraw the figures from OUT/eval/wang.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    fig_dir, eval_dir = Path(args.out) / "figures", Path(args.out) / "eval"
    fig_dir.mkdir(parents=True, exist_ok=True)
    eval_dir.mkdir(parents=True, exist_ok=True)
    path = eval_dir / "wang.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    if args.plot_only:
        plot_quadratic(out["quadratic"], fig_dir)
        plot_least_squares(out["least_squares"], fig_dir)
        return
    t0 = time.time()
    if "quadratic" in args.parts:
        quadratic_part(args, out)
        plot_quadratic(out["quadratic"], fig_dir)
    if "least_squares" in args.parts:
        least_squares_part(args, out)
        plot_least_squares(out["least_squares"], fig_dir)
    out["command"] = "PYTHONPATH=. python docs/wang.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    out["total_time_s"] = round(time.time() - t0, 1)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} and {fig_dir}/wang-*.png in {out['total_time_s']} s")


if __name__ == "__main__":
    main()
