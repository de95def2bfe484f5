"""Command line of learnedopt: ``learnedopt <command> [args]`` (the console command) or
``python -m learnedopt <command> [args]``; ``--version`` prints the version.

Commands:
  demo [args]         the main job: the shipped learned optimizers vs tuned Adam on an MNIST MLP.
  meta-train --config FILE --out DIR [--resume]
                      meta-train a learned update rule (learnedopt.meta.MetaTrainer).
  export SRC DST.safetensors
                      convert a rule file (a run's best.pt / final.pt) to the shipped format.
  evaluate [args]     learned rules vs SGD / RMSprop / Adam / NAG with tuned learning rates.
  bench [args]        time the fused coord_lstm op against the pure-PyTorch reference
                      (bench/bench_coord_lstm.py of the source checkout; needs an editable install).
  bench-step [args]   time one optimizer step: L2LOptimizer (fused), its reference, torch.optim.Adam
                      (bench/bench_step.py of the source checkout; needs an editable install).
  bench-meta [args]   time one meta-training unroll (forward + backward): fused ops vs reference.
"""

from __future__ import annotations

import importlib.util
import os
import json
import sys
from pathlib import Path

PROG = "learnedopt" if os.path.basename(sys.argv[0]) == "learnedopt" else "python -m learnedopt"

USAGE = f"""\
usage: {PROG} <command> [args]
       {PROG} --version

commands:
  demo [args]    the main job: train an MLP on real MNIST digits (never seen in meta-training) with
                 the shipped learned optimizers (L2LOptimizer, pretrained="l2l-mnist", and
                 HierarchicalOptimizer with its default weights) and with Adam
                 (learning rate tuned on a grid) on the same minibatches; prints a table, writes
                 runs/demo/demo.png. About a minute on CPU. `{PROG} demo --help` for options.
                 `demo --model resnet18` (or resnet50; needs torchvision): a torchvision ResNet,
                 HierarchicalOptimizer(model.parameters()) against torch.optim.Adam at its defaults.
  meta-train --config FILE --out DIR [--resume] [--epochs N]
                 meta-train a learned update rule (configs/*.json; "estimator": truncated BPTT,
                 ES or PES, docs/meta-training.md); writes
                 log.jsonl, checkpoint.pt (exact resume), best.pt, final.pt, curves.png.
                 Distributed: `torchrun --nproc_per_node N -m learnedopt meta-train ...` (each rank
                 its own trajectories, meta-gradients averaged; README "Distributed").
  export SRC DST.safetensors
                 convert a rule file (a meta-training run's best.pt / final.pt) to safetensors,
                 the format of the shipped weights (configuration and training record in its metadata).
  evaluate --task T --rule NAME|PATH [args]
                 learned rules against SGD, RMSprop, Adam and NAG with tuned learning rates on the
                 same trajectories: Markdown table, results.json, curves.png.
  bench [args]   time learnedopt.coord_lstm (fused) against learnedopt.reference.coord_lstm,
                 forward and forward+backward, on CPU and on CUDA when available; prints a table
                 and writes JSON under bench/results/.
                 With no size option it runs the quick configuration (N = 1e4 1e5, 3 repeats; well
                 under a minute on CPU). `--sizes 1e4 1e5 1e6` (or `--full`) gives the full table.
                 `{PROG} bench --help` lists every option.
  bench-step [args]
                 time one optimizer step per parameter element: learnedopt.L2LOptimizer (the fused
                 l2l_step_), learnedopt.reference.l2l_step_, and torch.optim.Adam (foreach, fused),
                 on CPU and on CUDA when available; prints a table and writes JSON under bench/results/.
                 With no size option it runs the quick configuration (1e4 1e5 1e6 elements, no model
                 shapes; about a minute on CPU). `--full` gives the full table (1e4 .. 3e7 elements and
                 the ResNet-50 / Inception-V3 shapes; many minutes on CPU).
                 `{PROG} bench-step --help` lists every option.
  bench-meta [args]
                 time one meta-training unroll (20 steps of the L2L rule on an MNIST MLP, forward and
                 backward) through the fused ops vs the pure-PyTorch reference; `--full` for all sizes.
"""

# command -> (benchmark script in bench/, what the full configuration is)
BENCHMARKS = {
    "bench": ("bench_coord_lstm.py", "--sizes 1e4 1e5 1e6 (or --full) gives the full table."),
    "bench-step": ("bench_step.py", "--full gives the full table (sizes 1e4 .. 3e7 and the two models)."),
    "bench-meta": ("bench_meta.py", "--full gives the full table (MLP hidden sizes 20, 100, 400; 5 repeats)."),
}


def bench_script(name: str = "bench_coord_lstm.py") -> Path:
    """bench/<name> of the checkout this package was imported from."""
    return Path(__file__).resolve().parent.parent / "bench" / name


def load_bench(cmd: str = "bench"):
    name = BENCHMARKS[cmd][0]
    path = bench_script(name)
    if not path.is_file():
        sys.stderr.write(
            f"{PROG} {cmd}: the benchmark script is not installed with the package (looked for {path}).\n"
            "It ships with the source repository only: run it from a checkout, installed editable\n"
            f"(`pip install --no-build-isolation -e .`), or as `python bench/{name}` there.\n"
        )
        return None
    spec = importlib.util.spec_from_file_location("learnedopt_" + path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench(args: list[str], cmd: str = "bench") -> int:
    if any(a in ("-h", "--help") for a in args):
        print(f"'{PROG} {cmd}' adds --quick unless --sizes or --full is given; {BENCHMARKS[cmd][1]}\n")
    full = "--full" in args
    args = [a for a in args if a != "--full"]
    size_opt = "--hidden" if cmd == "bench-meta" else "--sizes"
    if not full and not any(a == size_opt or a.startswith(size_opt + "=") for a in args) and "--quick" not in args:
        args = ["--quick"] + args
    mod = load_bench(cmd)
    if mod is None:
        return 2
    res = mod.main(args, prog=f"{PROG} {cmd}")
    return 1 if any(r.get("error") for r in res.get("rows", [])) else 0  # bench-step: an implementation failed


def meta_train(args: list[str]) -> int:
    import argparse

    from . import meta

    ap = argparse.ArgumentParser(prog=f"{PROG} meta-train", description="Meta-train a learned update rule.")
    ap.add_argument("--config", required=True, help="JSON file of learnedopt.meta.MetaConfig keys (see configs/)")
    ap.add_argument("--out", required=True, help="output folder: log.jsonl, checkpoint.pt, best.pt, final.pt, curves.png")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (exactly)")
    ap.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    a = ap.parse_args(args)
    cfg = meta.MetaConfig.from_file(a.config)
    if a.epochs is not None:
        cfg.epochs = a.epochs
    # Under torchrun (WORLD_SIZE > 1) every rank runs its own trajectories (learnedopt.meta.distributed);
    # after a restart of failed workers (torchrun --max-restarts) the run continues from its checkpoint.
    from .meta.distributed import init_from_env

    distributed = init_from_env()
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    try:
        trainer = meta.MetaTrainer(cfg, a.out, resume=a.resume or restarted)
    except meta.CheckpointError as e:
        print(f"{PROG} meta-train: error: {e}", file=sys.stderr)
        return 1
    trainer.run()
    if distributed:
        import torch.distributed as dist

        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank:
            return 0
    print(f"{PROG} meta-train: {trainer.epoch} epochs, {trainer.skipped} meta-steps skipped (non-finite); "
          f"best evaluation loss {trainer.best}; rule weights in {a.out}/best.pt and {a.out}/final.pt")
    return 0


def _load_learned(spec: str):
    """``NAME`` of shipped weights, or ``[LABEL=]PATH`` of a file written by learnedopt.rules.save_rule."""
    from . import pretrained, rules

    label, _, where = spec.rpartition("=")
    if where in pretrained.WEIGHTS:
        return label or where, pretrained.load(where)
    path = Path(where)
    if not path.is_file():
        raise SystemExit(f"{PROG}: --rule {spec!r} is neither shipped weights ({', '.join(pretrained.available())}) "
                         "nor a file")
    return label or path.parent.name + "/" + path.stem, rules.load_rule(path)


def evaluate_cmd(args: list[str]) -> int:
    import argparse
    import json

    from . import evaluate, tasks

    ap = argparse.ArgumentParser(prog=f"{PROG} evaluate", description=(
        "Learned optimizers against SGD, RMSprop, Adam and NAG with tuned learning rates, on the same "
        "trajectories; prints a Markdown table and writes results.json, table.md and curves.png."))
    ap.add_argument("--task", default="mnist", help="task family: " + ", ".join(sorted(tasks.FAMILIES)))
    ap.add_argument("--task-kwargs", default="{}", help='JSON keyword arguments of the family, e.g. \'{"hidden": [40]}\'')
    ap.add_argument("--rule", action="append", default=[],
                    help="learned rule: shipped weights NAME or [LABEL=]PATH to a rule file (.pt of meta-train, "
                         ".safetensors) (repeatable)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--runs", type=int, default=10, help="evaluation trajectories (mean and std reported)")
    ap.add_argument("--seed", type=int, default=1000, help="seed of the evaluation trajectories (held out: "
                    "meta-training and its evaluations use other seeds)")
    ap.add_argument("--baselines", nargs="*", default=["sgd", "rmsprop", "adam", "nag"])
    ap.add_argument("--tune-runs", type=int, default=3, help="trajectories per learning rate when tuning")
    ap.add_argument("--out", default=None, help="folder for results.json, table.md, curves.png")
    ap.add_argument("--title", default="")
    a = ap.parse_args(args)
    kwargs = json.loads(a.task_kwargs)
    if a.task == "mnist":
        kwargs.setdefault("split", "test")  # digits never seen in meta-training
    family = tasks.make_family(a.task, **kwargs)
    learned = dict(_load_learned(s) for s in a.rule)
    result = evaluate.evaluate(learned, family, steps=a.steps, runs=a.runs, seed=a.seed, baselines=a.baselines,
                               tune_runs=a.tune_runs)
    result["task"] = {"family": a.task, **kwargs}
    title = a.title or f"{a.task} {json.dumps(kwargs)}, {a.steps} steps"
    table = evaluate.format_table(result, title)
    print(table)
    if a.out:
        (Path(a.out) / "table.md").parent.mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "table.md").write_text(table)
        _write_result(result, a.out, "results.json", "curves.png", title, also="table.md")
    return 0


def _write_result(result: dict, out_dir: str, json_name: str, png_name: str, title: str, also: str = "") -> None:
    """The result of an evaluation as JSON and its loss curves as a PNG in ``out_dir``."""
    from . import evaluate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    evaluate.save_result(result, out / json_name)
    evaluate.plot_curves(result, out / png_name, title)
    print(f"wrote {out}/{json_name}, {png_name}" + (f", {also}" if also else ""))


def demo(args: list[str]) -> int:
    import argparse

    from . import evaluate, pretrained, tasks
    from .optim import DEFAULT_HIERARCHICAL, HierarchicalOptimizer, L2LOptimizer

    ap = argparse.ArgumentParser(prog=f"{PROG} demo", description=(
        "Train an MLP (784-20-10, sigmoid) on real MNIST digits never seen in meta-training with the shipped "
        "learned optimizers (L2LOptimizer, pretrained='l2l-mnist'; HierarchicalOptimizer with its default weights, "
        "meta-trained on an ensemble of small problems without MNIST) and with Adam (learning rate tuned on a "
        "grid), on the same minibatches; print a table and write a PNG."))
    ap.add_argument("--model", default="mlp", choices=("mlp", "resnet18", "resnet50"),
                    help="mlp (default): the MNIST MLP against tuned Adam; resnet18 / resnet50: a torchvision ResNet "
                         "(needs torchvision) on the MNIST digits upscaled to 32x32, HierarchicalOptimizer at its "
                         "defaults against torch.optim.Adam at its defaults (docs/resnet.md)")
    ap.add_argument("--steps", type=int, default=None, help="steps (default: 100 for mlp, 200 for a ResNet)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tune-runs", type=int, default=2)
    ap.add_argument("--weights", default="l2l-mnist", help="shipped weights: " + ", ".join(pretrained.available()))
    ap.add_argument("--out", default="runs/demo")
    a = ap.parse_args(args)
    if a.model != "mlp":
        return _demo_resnet(a.model, a.steps or 200, a.out)
    a.steps = a.steps or 100
    if a.weights not in pretrained.available():
        raise SystemExit(f"{PROG} demo: weights {a.weights!r} not installed; available: {pretrained.available()}")
    family = tasks.make_family("mnist", split="test")
    name = f"L2LOptimizer ({a.weights})"
    learned = {name: lambda ps: L2LOptimizer(ps, pretrained=a.weights)}
    if DEFAULT_HIERARCHICAL in pretrained.available():
        learned[f"HierarchicalOptimizer ({DEFAULT_HIERARCHICAL}, lr 1e-4)"] = lambda ps: HierarchicalOptimizer(ps)
    print(f"{PROG} demo: MNIST MLP 784-20-10 (sigmoid), batch 128, {a.steps} steps, {a.runs} runs; tuning Adam's "
          f"learning rate on {len(evaluate.LR_GRID)} values x {a.tune_runs} runs ...", flush=True)
    result = evaluate.evaluate(learned, family, steps=a.steps, runs=a.runs, seed=1000, baselines=("adam",),
                               tune_runs=a.tune_runs)
    title = f"MNIST MLP, {a.steps} steps: learned vs tuned Adam"
    print()
    print(evaluate.format_table(result, title))
    curves = {k: m["curve"] for k, m in result["methods"].items()}
    marks = [s for s in (0, 10, 25, 50, a.steps // 2, a.steps) if s <= a.steps]
    marks = sorted(set(marks))
    print("| step | " + " | ".join(curves) + " |")
    print("|---|" + "---|" * len(curves))
    for s in marks:
        print(f"| {s} | " + " | ".join(f"{c[s]:.4f}" for c in curves.values()) + " |")
    print()
    _write_result(result, a.out, "demo.json", "demo.png", title)
    return 0


def _demo_resnet(model: str, steps: int, out_dir: str) -> int:
    """``demo --model resnet18``: the card's use case, HierarchicalOptimizer(model.parameters()) against
    torch.optim.Adam(model.parameters()) on the same minibatches and initialisation."""
    import torch

    from .optim import HierarchicalOptimizer
    from .tasks import torchvision_models as tvm

    if steps < 10:
        raise SystemExit(f"{PROG} demo: --steps must be >= 10 for a ResNet, got {steps}")
    try:
        tvm._torchvision()
    except RuntimeError as e:
        raise SystemExit(f"{PROG} demo --model {model}: {e}") from None
    methods = {"torch.optim.Adam (defaults)": lambda ps: torch.optim.Adam(ps),
               "HierarchicalOptimizer (defaults)": lambda ps: HierarchicalOptimizer(ps)}
    print(f"{PROG} demo: torchvision {model} (num_classes=10) on real MNIST digits upscaled to 32x32, batch 32, "
          f"{steps} steps, the same initialisation and minibatches for both optimizers", flush=True)
    results = {}
    for name, make in methods.items():
        print(f"{name} ...", flush=True)
        results[name] = tvm.train(model, make, steps, seed=0, eval_every=max(1, steps // 5), log=print)
    tail = max(1, steps // 10)
    print()
    print(f"| optimizer | first loss | max loss | mean loss | mean of the last {tail} | held-out accuracy | s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        L = r["loss"]
        print(f"| {name} | {L[0]:.3f} | {r['max_loss']:.3f} | {sum(L) / len(L):.4f} | {sum(L[-tail:]) / tail:.4f} | "
              f"{r['heldout_accuracy']:.3f} | {r['seconds']:.0f} |")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"demo-{model}.json").write_text(json.dumps(results))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        ax.plot(r["loss"], label=name, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("minibatch loss")
    ax.set_title(f"{model} on MNIST digits (32x32), batch 32")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"demo-{model}.png", dpi=110)
    plt.close(fig)
    print(f"\nwrote {out}/demo-{model}.json, demo-{model}.png")
    return 0


def export(args: list[str]) -> int:
    import argparse

    from .rules.weights import export_rule

    ap = argparse.ArgumentParser(prog=f"{PROG} export", description=(
        "Convert a rule file (a meta-training run's best.pt or final.pt, written by learnedopt.rules.save_rule) to "
        "safetensors, the format of the shipped weights: the weights as tensors, the rule's kind, configuration and "
        "training record (e.g. its epoch) in the file's metadata. The rule is rebuilt from the file first, so a "
        "file that would not load is refused."))
    ap.add_argument("src", help="rule file to convert (.pt or .safetensors)")
    ap.add_argument("dst", help="file to write (must end in .safetensors)")
    a = ap.parse_args(args)
    try:
        info = export_rule(a.src, a.dst)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{PROG} export: {e}")
    print(f"{PROG} export: wrote {a.dst} ({info['kind']} rule, config {info['config']}, record {info['extra']})")
    return 0


COMMANDS = {"meta-train": meta_train, "evaluate": evaluate_cmd, "demo": demo, "export": export}


def version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if argv[0] in ("--version", "-V", "version"):
        print(f"learnedopt {version()}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in BENCHMARKS:
        return bench(rest, cmd)
    if cmd in COMMANDS:
        return COMMANDS[cmd](rest)
    sys.stderr.write(f"{PROG}: unknown command {cmd!r}\n\n{USAGE}")
    return 2

