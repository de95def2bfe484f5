"""Distributed meta-training through torchrun (real processes, gloo, CPU): N ranks give the meta-
parameters of one process running N times the trajectories per meta-step, rank 0 writes the files,
and a rank killed mid-run is restarted by torchrun from the last checkpoint with nothing lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import learnedopt
from learnedopt.meta import MetaConfig, MetaTrainer
from learnedopt.rules.weights import state_dict_of

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")]

TIMEOUT = 240
ROOT = str(Path(learnedopt.__file__).resolve().parent.parent)


def _config(**kw) -> dict:
    base = dict(task="quadratic", task_kwargs=dict(dim=4, num_functions=3),
                rule_kwargs=dict(layers=[5], preprocess=None, output_scale=0.1),
                num_steps=10, unroll=5, unroll_schedule="heavy_tailed", num_unrolls_scale=1.0, unroll_scale=3.0,
                unroll_min=2, max_trajectory_steps=12, epochs=6, meta_lr=3e-3, eval_every=3, eval_tasks=2,
                checkpoint_every=1, threads=1)
    base.update(kw)
    return base


def _torchrun(nproc: int, cfg: dict, out: Path, *extra: str, console: Path | None = None) -> subprocess.Popen:
    """torchrun ... -m learnedopt meta-train; with ``console`` (a folder holding the ``learnedopt``
    command, see _console_command) torchrun --no-python learnedopt meta-train, as README shows."""
    path = out.parent / f"{out.name}.json"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "LEARNEDOPT_PROGRESS": "0"}
    program = ["-m", "learnedopt"]
    if console is not None:
        env["PATH"] = os.pathsep.join([str(console), env.get("PATH", "")])
        program = ["--no-python", "learnedopt"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *extra,
           *program, "meta-train", "--config", str(path), "--out", str(out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _console_command(folder: Path) -> Path:
    """The ``learnedopt`` console command as pip installs it from pyproject.toml's entry point
    ([project.scripts]: a script that imports the entry point's function and exits with its result),
    written into ``folder`` for this checkout (an installed one may belong to another checkout)."""
    text = (Path(ROOT) / "pyproject.toml").read_text()
    try:
        import tomllib
    except ImportError:  # Python 3.10: the [project.scripts] line itself
        import re

        spec = re.search(r'^\[project\.scripts\][^\[]*?^learnedopt\s*=\s*"([^"]+)"', text, re.M | re.S).group(1)
    else:
        spec = tomllib.loads(text)["project"]["scripts"]["learnedopt"]
    module, func = spec.split(":")
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "learnedopt"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\n"
                      f"if __name__ == '__main__':\n    sys.exit({func}())\n")
    script.chmod(0o755)
    return folder


def _finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> str:
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        text, _ = proc.communicate()
        pytest.fail(f"torchrun still running after {timeout} s (killed):\n{text[-12000:]}")
    assert proc.returncode == 0, text[-12000:]
    return text


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("meta") / "two"
    _finish(_torchrun(2, _config(), out))
    return out


def test_two_ranks_equal_one_process_with_twice_the_trajectories(two_ranks, tmp_path):
    torch.set_num_threads(1)
    one = MetaTrainer(MetaConfig(**_config(trajectories=2)), tmp_path / "one").run()
    a, b = state_dict_of(two_ranks / "final.pt"), one.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        # two addends: g0 + g1 in one process, all_reduce(g0, g1) on two ranks: the same bits
        assert torch.equal(a[k], b[k]), k
    # ... and not what one trajectory per meta-step gives
    single = MetaTrainer(MetaConfig(**_config(trajectories=1)), tmp_path / "single").run().state_dict()
    assert any(not torch.equal(a[k], single[k]) for k in a)
    # rank 0 wrote the files once: one record per epoch, the evaluations, the checkpoint
    log = _log(two_ranks)
    assert [r["epoch"] for r in log] == list(range(1, 7)) and "eval_final_loss" in log[2]
    assert (two_ranks / "checkpoint.pt").is_file() and (two_ranks / "best.pt").is_file()
    assert torch.load(two_ranks / "checkpoint.pt", weights_only=True)["world"] == 2


def _records(out: Path) -> list[dict]:
    """The log without its timings."""
    return [{k: v for k, v in r.items() if "time" not in k} for r in _log(out)]


def test_console_command_equals_python_m(two_ranks, tmp_path):
    """README's second recipe: torchrun --no-python learnedopt meta-train (the console command of
    pyproject.toml's entry point) on 2 ranks gives bitwise the run of torchrun -m learnedopt."""
    out = tmp_path / "console"
    t0 = time.monotonic()
    _finish(_torchrun(2, _config(), out, console=_console_command(tmp_path / "bin")), timeout=60)
    assert time.monotonic() - t0 < 60
    a, b = state_dict_of(out / "final.pt"), state_dict_of(two_ranks / "final.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _records(out) == _records(two_ranks)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["world"] == 2


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(d.name))
    return kids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers through /proc")
def test_killed_rank_restarts_from_checkpoint(tmp_path):
    """A worker killed (SIGKILL) mid-run: torchrun (--max-restarts 1) restarts both, they resume from
    the last checkpoint (TORCHELASTIC_RESTART_COUNT > 0), and the run ends where an uninterrupted one ends."""
    epochs = 40
    cfg = _config(epochs=epochs, eval_every=0)
    straight = tmp_path / "straight"
    _finish(_torchrun(2, cfg, straight))
    out = tmp_path / "killed"
    proc = _torchrun(2, cfg, out, "--max-restarts", "1")
    deadline = time.monotonic() + TIMEOUT
    killed = None
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        if (out / "log.jsonl").is_file() and len(_log(out)) >= 2:
            workers = _children(proc.pid)
            if len(workers) == 2:
                killed = max(workers)
                os.kill(killed, signal.SIGKILL)
                lines_at_kill = len(_log(out))
                break
        time.sleep(0.02)
    assert killed is not None, "the run ended (or timed out) before a worker could be killed"
    text = _finish(proc)
    assert lines_at_kill < epochs
    assert [r["epoch"] for r in _log(out)] == list(range(1, epochs + 1)), text[-2000:]
    a, b = state_dict_of(out / "final.pt"), state_dict_of(straight / "final.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
