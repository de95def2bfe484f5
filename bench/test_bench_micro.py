"""Micro-benchmarks of coord_lstm (pytest-benchmark): fused op vs pure-PyTorch reference, forward
and forward+backward, small N, on CPU and (skipped without a GPU) CUDA.

    pytest bench/ --benchmark-only              # the benchmarks only
    pytest bench/                               # the benchmarks (short rounds) and smoke tests of
                                                # bench_coord_lstm.py, bench_step.py and bench_train.py

Not part of the normal test run: pyproject's ``testpaths = ["tests"]`` keeps plain ``pytest`` to
tests/. Without pytest-benchmark installed, the benchmark cases skip.

CUDA cases synchronize inside the timed function (pytest-benchmark times host wall clock), so they
include one synchronize each: fine for comparisons at equal N, not for absolute kernel times (use
bench_coord_lstm.py, which times with CUDA events).
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import learnedopt
from learnedopt import reference

HERE = Path(__file__).resolve().parent

needs_ext = pytest.mark.skipif(not learnedopt.extension_available(), reason="learnedopt._C is not built")
CUDA = learnedopt.ops.cuda_available()

N, H, I = 4096, 20, 2

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda",
                 marks=pytest.mark.skipif(not CUDA, reason="needs a GPU and learnedopt's CUDA kernels")),
]
IMPLS = [pytest.param(learnedopt.coord_lstm, id="fused"), pytest.param(reference.coord_lstm, id="reference")]


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    k = H ** -0.5

    def u(*shape, a=1.0):
        return ((torch.rand(*shape, generator=g) * 2 - 1) * a).to(device)

    ins = [u(N, I, a=2.0), u(N, H), u(N, H, a=2.0), u(4 * H, I, a=k), u(4 * H, H, a=k), u(4 * H, a=k)]
    return ins, u(N, H), u(N, H)


try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # no plugin: the benchmark cases skip (with the plugin installed but disabled by
    # `-p no:benchmark`, they error with "fixture 'benchmark' not found")

    @pytest.fixture
    def benchmark():
        pytest.skip("needs pytest-benchmark (pip install pytest-benchmark)")


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@needs_ext
@pytest.mark.benchmark(group="coord_lstm-fwd", max_time=0.5, min_rounds=5, warmup=True)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", IMPLS)
def test_fwd(benchmark, op, device):
    ins, _, _ = _inputs(device)

    def run():
        with torch.no_grad():
            out = op(*ins)
        _sync(device)
        return out

    h_new, c_new = benchmark(run)
    assert h_new.shape == (N, H) and c_new.shape == (N, H)


@needs_ext
@pytest.mark.benchmark(group="coord_lstm-fwd+bwd", max_time=0.5, min_rounds=5, warmup=True)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", IMPLS)
def test_fwd_bwd(benchmark, op, device):
    ins, gh, gc = _inputs(device)
    leaves = [t.requires_grad_() for t in ins]

    def setup():  # untimed: fresh gradients every round
        for t in leaves:
            t.grad = None

    def run():
        h_new, c_new = op(*leaves)
        torch.autograd.backward([h_new, c_new], [gh, gc])
        _sync(device)

    benchmark.pedantic(run, setup=setup, rounds=20, warmup_rounds=2)
    assert all(t.grad is not None and t.grad.shape == t.shape for t in leaves)


@needs_ext
def test_bench_script_smoke(tmp_path):
    """bench_coord_lstm.main runs end to end on tiny sizes and writes its JSON (skipped by
    --benchmark-only, which runs only benchmark cases)."""
    spec = importlib.util.spec_from_file_location("bench_coord_lstm_smoke", HERE / "bench_coord_lstm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    res = mod.main(["--quick", "--sizes", "1000", "--repeat", "1", "--warmup", "0", "--mm-size", "256",
                    "--device", "cpu", "--out", str(out)])
    data = json.loads(out.read_text())
    assert [r["phase"] for r in data["rows"]] == ["fwd", "fwd+bwd"]
    assert data["rows"][0]["flop_per_coord"] == 2 * 4 * H * (I + H)
    assert data["rows"][1]["flop_per_coord"] == 3 * 2 * 4 * H * (I + H)
    assert data["rows"][0]["bytes_per_coord"] == 4 * (I + 4 * H)
    assert all(r["max_scaled_diff"] < 1e-4 for r in data["rows"])
    assert res["rows"][0]["N"] == 1000 and data["mm_gflops"]["cpu"] > 0


@needs_ext
def test_bench_step_smoke(tmp_path):
    """bench_step.main runs end to end on a tiny list and writes its JSON; the model shape lists
    match torchvision's counts."""
    spec = importlib.util.spec_from_file_location("bench_step_smoke", HERE / "bench_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "s.json"
    res = mod.main(["--sizes", "2000", "--repeat", "1", "--warmup", "1", "--device", "cpu", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["complete"] and [r["impl"] for r in data["rows"]] == mod.IMPLS
    by = {r["impl"]: r for r in data["rows"]}
    assert by["adam-foreach"]["bytes_per_elem"] == 28
    assert by["l2l-fused"]["bytes_per_elem"] == 4 * (2 + 80) + 4 * (1 + 80) == 652
    assert by["l2l-fused"]["max_scaled_diff"] < 1e-4 and by["l2l-fused"]["speedup_vs_ref"] > 0
    assert all(r["numel"] == 2000 and r["median_ms"] > 0 for r in data["rows"])
    assert sum(torch.Size(s).numel() for s in mod.synthetic_shapes(30_000_000)) == 30_000_000
    assert res["rows"][0]["device"] == "cpu"
    for name, (n_tensors, numel) in mod.model_shapes.EXPECTED.items():
        assert len(mod.model_shapes.shapes(name)) == n_tensors and mod.model_shapes.numel(name) == numel


@needs_ext
def test_bench_train_smoke(tmp_path):
    """bench_train.main runs a tiny configuration of every optimizer end to end and writes its
    JSON: every row timed, times finite and positive, phases adding up to the whole step."""
    pytest.importorskip("torchvision")
    spec = importlib.util.spec_from_file_location("bench_train_smoke", HERE / "bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--models", "vit", "resnet18", "--batch", "2", "--image-size", "32", "--warmup", "1",
                    "--repeat", "1", "--device", "cpu", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("train-cpu-*.json")
    assert res["json_path"] == str(path)
    data = json.loads(path.read_text())
    assert data["complete"] and data["torchvision"] and data["git_rev"] != ""
    rows = data["rows"]
    assert [(r["model"], r["optimizer"]) for r in rows] == [(m, o) for m in ("resnet18", "vit")
                                                              for o in mod.OPTIMIZERS]
    for r in rows:
        assert not r["error"], r["na"]
        if r["na"]:  # only fused Adam may be unsupported, on an old torch
            assert r["optimizer"] == "adam-fused"
            continue
        assert r["n_params"] > 0 and r["batch"] == 2 and r["image_size"] == 32
        assert r["warmup"] == 1 and r["repeat"] == 1 and len(r["warmup_times_ms"]) == 1
        for k in ("step", "forward", "backward", "opt"):
            assert math.isfinite(r[f"{k}_ms"]) and r[f"{k}_ms"] > 0, (r["optimizer"], k)
            assert len(r["times_ms"][k]) == 1 and r[f"{k}_min_ms"] <= r[f"{k}_ms"]
        parts = r["forward_ms"] + r["backward_ms"] + r["opt_ms"]
        assert parts <= r["step_ms"] * 1.001 and parts >= 0.9 * r["step_ms"], (r["optimizer"], parts, r["step_ms"])
        assert abs(r["opt_share"] - r["opt_ms"] / r["step_ms"]) < 1e-9
        assert abs(r["opt_over_fwd"] - r["opt_ms"] / r["forward_ms"]) < 1e-9
        assert r["adam_baseline"] in ("adam-fused", "adam-foreach") and r["opt_x_adam"] > 0
        assert len(r["losses"]) == 2 and math.isfinite(r["loss_first"])
    by = {(r["model"], r["optimizer"]): r for r in rows}
    assert by[("resnet18", "adam-foreach")]["n_params"] == 11_689_512
    assert by[("resnet18", "adam-fused")]["opt_x_adam"] in (None, 1.0)
