"""The package's layout: the direction of its imports (no circles; what uses an optimizer never loads
the meta-training code or the tasks), its public names, the 0.1.0 module paths, the command line's
entry points."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import learnedopt

PKG = Path(learnedopt.__file__).resolve().parent
ROOT = "learnedopt"

# The layers: a module under a key may import nothing under the listed packages (anywhere in the
# module, also inside functions).
FORBIDDEN = {
    "learnedopt.ops": ("learnedopt.rules", "learnedopt.optim", "learnedopt.pretrained", "learnedopt.meta",
                       "learnedopt.tasks", "learnedopt.evaluate", "learnedopt.cli"),
    "learnedopt.reference": ("learnedopt.rules", "learnedopt.optim", "learnedopt.pretrained", "learnedopt.meta",
                             "learnedopt.tasks", "learnedopt.evaluate", "learnedopt.cli"),
    "learnedopt.rules": ("learnedopt.optim", "learnedopt.pretrained", "learnedopt.meta", "learnedopt.tasks",
                         "learnedopt.evaluate", "learnedopt.cli"),
    "learnedopt.pretrained": ("learnedopt.optim", "learnedopt.meta", "learnedopt.tasks", "learnedopt.evaluate",
                              "learnedopt.cli"),
    "learnedopt.optim": ("learnedopt.meta", "learnedopt.tasks", "learnedopt.evaluate", "learnedopt.cli"),
    "learnedopt.tasks": ("learnedopt.rules", "learnedopt.optim", "learnedopt.pretrained", "learnedopt.meta",
                         "learnedopt.evaluate", "learnedopt.cli"),
    "learnedopt.meta": ("learnedopt.optim", "learnedopt.evaluate", "learnedopt.cli"),
}
DEPRECATED = {"nets": "rules.l2l", "hierarchical": "rules.hierarchical", "ensemble": "tasks.ensemble",
              "data": "tasks.data"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported learnedopt module, at module level?) for every import statement of the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = _import_time_statements(tree)
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from X import sub` imports the submodule X.sub; `from X import name` the module X
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules]
            targets = subs + ([mod] if len(subs) < len(node.names) else [])
        for t in targets:
            if t.split(".")[0] == ROOT and t in modules:
                out.append((t, id(node) in top_level))
    return out


def _import_time_statements(tree) -> set[int]:
    """ids of the statements that run at import time: the module body and its if/try blocks (not
    function or class bodies)."""
    out, stack = set(), list(tree.body)
    while stack:
        n = stack.pop()
        out.add(id(n))
        if isinstance(n, (ast.If, ast.Try)):
            stack.extend(n.body + n.orelse + n.finalbody if isinstance(n, ast.Try) else n.body + n.orelse)
            stack.extend(s for h in getattr(n, "handlers", []) for s in h.body)
    return out


def _graph():
    modules = _modules()
    return modules, {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_import_graph_finds_imports():
    # the analysis itself: it must see absolute, relative, module-level and function-level imports
    modules, graph = _graph()
    assert ("learnedopt.rules.l2l", True) in graph["learnedopt.optim.l2l"]
    assert ("learnedopt.ops", True) in graph["learnedopt.rules.l2l"]
    assert ("learnedopt.pretrained", False) in graph["learnedopt.meta.checkpoints"]  # inside a function
    assert len(modules) > 30


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_point_down(layer):
    _, graph = _graph()
    bad = [(m, t) for m, edges in graph.items() if m == layer or m.startswith(layer + ".")
           for t, _ in edges if any(t == f or t.startswith(f + ".") for f in FORBIDDEN[layer])]
    assert not bad, f"{layer} must not import {FORBIDDEN[layer]}; found {bad}"


def test_no_import_circles():
    """No circle among the imports that run at import time (the 0.1.0 package had two)."""
    _, graph = _graph()
    edges = {m: sorted({t for t, top in e if top and t != m}) for m, e in graph.items()}
    # A package's __init__ may import its own submodules, which may import their siblings, but a
    # submodule importing its package's __init__ while it is importing them would be a circle.
    state: dict[str, int] = {}
    circles = []

    def visit(m, path):
        state[m] = 1
        for t in edges.get(m, []):
            if t == ROOT:  # the facade imports everything; nothing below imports it
                continue
            if state.get(t) == 1:
                circles.append(path[path.index(t):] + [t] if t in path else path + [t])
            elif state.get(t) is None:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if state.get(m) is None:
            visit(m, [m])
    assert not circles, f"import circles: {circles}"


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning"}
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env).stdout


def test_using_an_optimizer_loads_no_meta_training_code():
    out = _run(
        "import sys, torch, learnedopt\n"
        "m = torch.nn.Linear(3, 2)\n"
        "for opt in (learnedopt.L2LOptimizer(m.parameters()), learnedopt.HierarchicalOptimizer(m.parameters())):\n"
        "    m(torch.randn(4, 3)).sum().backward(); opt.step()\n"
        "learnedopt.pretrained.info('l2l-mnist')\n"
        "print(' '.join(sorted(k for k in sys.modules if k.startswith(('learnedopt', 'sklearn', 'matplotlib', "
        "'mlxtend')))))\n")
    loaded = out.split()
    assert "learnedopt.optim.l2l" in loaded and "learnedopt.pretrained" in loaded
    heavy = [m for m in loaded if m.startswith(("learnedopt.meta", "learnedopt.tasks", "learnedopt.evaluate",
                                                  "learnedopt.cli", "sklearn", "matplotlib", "mlxtend"))]
    assert not heavy, heavy


def test_public_names():
    import learnedopt.meta as meta
    import learnedopt.tasks as tasks

    for name in ("L2LOptimizer", "HierarchicalOptimizer", "coord_lstm", "coord_lstm_stack", "CoordinateLSTMNet",
                 "HierarchicalNet", "extension_available", "cuda_available", "__version__"):
        assert hasattr(learnedopt, name), name
    for name in ("MetaTrainer", "MetaConfig", "unroll", "start", "run_rule", "OBJECTIVES", "L2LRule", "LearnedSGD",
                 "save_rule", "load_rule", "make_rule", "RULES", "read_log", "Carry"):
        assert hasattr(meta, name), name
    for name in ("make_family", "FAMILIES", "Task", "TaskFamily", "MNISTTask", "QuadraticFamily", "DigitsResNetTask"):
        assert hasattr(tasks, name), name
    assert learnedopt.meta.MetaTrainer.__module__ == "learnedopt.meta.trainer"
    assert learnedopt.rules.RULES["hierarchical"] is learnedopt.rules.hierarchical.HierarchicalRule


@pytest.mark.parametrize("old", sorted(DEPRECATED))
def test_0_1_0_module_paths_still_import(old):
    """``import learnedopt.nets`` (0.1.0) gives the module of its new path, with a DeprecationWarning."""
    new = f"learnedopt.{DEPRECATED[old]}"
    out = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-c",
                          f"import learnedopt.{old} as o, {new} as n; print(o is n, o.__name__)"],
                         check=True, capture_output=True, text=True)
    assert out.stdout.split() == ["True", new]
    assert f"DeprecationWarning: learnedopt.{old} moved to {new}" in out.stderr
    with pytest.raises(subprocess.CalledProcessError):  # an error under -W error, as deprecations should be
        subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", f"import learnedopt.{old}"],
                       check=True, capture_output=True)


def test_version_and_the_console_command():
    assert learnedopt.__version__.count(".") == 2
    out = subprocess.run([sys.executable, "-m", "learnedopt", "--version"], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == f"learnedopt {learnedopt.__version__}"
    from importlib.metadata import PackageNotFoundError, entry_points, version

    try:
        installed = version("learnedopt")
    except PackageNotFoundError:
        pytest.skip("learnedopt is not installed (imported from a source tree)")
    assert installed == learnedopt.__version__  # pyproject's version is learnedopt.__version__
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "learnedopt"]
    assert ep.value == "learnedopt.cli:main"
    from learnedopt.cli import COMMANDS

    assert {"demo", "meta-train", "evaluate", "export"} <= set(COMMANDS)
