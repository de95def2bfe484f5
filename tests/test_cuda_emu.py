"""The CUDA kernels of csrc/cuda run on the CPU by the CUDA emulation (csrc/cuda/emulation; built with
LEARNEDOPT_CUDA_EMULATION=1 as learnedopt._cuda_emu, ops torch.ops.learnedopt_emu.*), checked against
the pure-PyTorch references and the CPU kernels; and the emulator's own semantics and checks, each
with the planted bug it must catch.

Every kernel case runs under both thread schedules of the emulator (a block's threads in forward
and in reverse order between synchronisation points): a missing barrier or another shared-memory
race gives a different result under one of them. Marked cuda_emu: ``python -m pytest -m cuda_emu
tests``. What this cannot show (README): speed, the GPU's own results of approximate instructions,
memory-model effects beyond barriers.
"""

import json
import os
from pathlib import Path

import pytest
import torch

import learnedopt
from learnedopt import reference
from conftest import TOL

import emulation

HAVE_EMU = emulation.AVAILABLE
_MUST_RUN = emulation.MUST_RUN
pytestmark = [
    pytest.mark.cuda_emu,
    pytest.mark.skipif(not HAVE_EMU and not _MUST_RUN,
                       reason="the CUDA emulation is not built (LEARNEDOPT_CUDA_EMULATION=1 pip install ...)"),
]

emu = torch.ops.learnedopt_emu if HAVE_EMU else None

# The kernels' registers and static shared memory from ptxas (csrc/cuda/emulation/resources.py; CI
# regenerates them from the current source): every launch is checked against sm_90's limits.
RESOURCES = Path(os.environ.get("LEARNEDOPT_CUDA_RESOURCES") or
                 Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "emulation" / "resources.json")


def _resource_table(kernels: dict) -> str:
    return "".join(f"{k} {v['registers']} {v['static_smem']} {v.get('max_threads', 0)}\n" for k, v in kernels.items())


if HAVE_EMU:
    emu.set_resources(_resource_table(json.loads(RESOURCES.read_text())["kernels"]))

SCHEDULES = [pytest.param(0, id="forward"), pytest.param(1, id="reverse")]


@pytest.fixture(params=SCHEDULES)
def schedule(request):
    emu.set_schedule(request.param)
    emu.launches(True)
    yield request.param
    emu.set_schedule(0)


def launches():
    """[(kernel, grid, block, dynamic shared bytes)] since the last call."""
    return [(n, int(g), int(b), int(s)) for n, g, b, s in (line.split() for line in emu.launches(True).splitlines())]


# ================================================================================================
# the emulator itself
# ================================================================================================
def test_block_and_thread_indices():
    out = emu.selftest_indices(3, 37)
    r = torch.arange(3 * 37)
    assert torch.equal(out[:, 0], r // 37) and torch.equal(out[:, 1], r % 37)
    assert (out[:, 2] == 37).all() and (out[:, 3] == 3).all()


@pytest.mark.parametrize("T", [1, 31, 32, 100, 1024])
def test_syncthreads_is_a_barrier(schedule, T):
    x = torch.randn(T)
    assert torch.equal(emu.selftest_stage(x, True), x.roll(-1))


@pytest.fixture
def memcheck_off():
    was = emu.set_memcheck(False)
    yield
    emu.set_memcheck(was)


@pytest.mark.parametrize("sched", [0, 1])
def test_a_missing_barrier_is_caught_by_the_schedules(sched, memcheck_off):
    """The planted bug, with the memory checker off: shared memory read before the other threads wrote
    it. Unwritten shared memory is NaN (poisoned) and the threads run one after the other, so the
    result is wrong."""
    emu.set_schedule(sched)
    try:
        out = emu.selftest_stage(torch.randn(64), False)
    finally:
        emu.set_schedule(0)
    assert out.isnan().any()


@pytest.mark.parametrize("sched", [0, 1])
def test_a_missing_barrier_is_caught_by_memcheck(sched):
    emu.set_schedule(sched)
    try:
        with pytest.raises(RuntimeError, match="memcheck: reads byte .* of dynamic shared memory, which no thread "
                                               "of this block has written"):
            emu.selftest_stage(torch.randn(64), False)
    finally:
        emu.set_schedule(0)


def test_memcheck_is_on_by_default():
    assert emu.memcheck_instrumented()  # built with -fsanitize=thread: the checker sees every access
    assert emu.set_memcheck(True) is True


@pytest.mark.parametrize("sched", [0, 1])
@pytest.mark.parametrize("mode, T, race", [
    (0, 64, "writes byte 0 of dynamic shared memory, which thread .* wrote since the last __syncthreads"),
    # which thread comes first depends on the schedule: read after write or write after read
    (1, 64, "(reads|writes) byte .* of dynamic shared memory, which thread .* (wrote|read) since the last __syncthreads"),
    (5, 32, "(reads|writes) byte .* of dynamic shared memory, which thread .* (wrote|read) since the last __syncthreads"),
    (5, 64, "(reads|writes) byte .* of dynamic shared memory, which thread .* (wrote|read) since the last __syncthreads"),
    (7, 64, r"reads static __shared__ storage .*, which no thread of this block has written"),
])
def test_memcheck_catches_shared_memory_races(sched, mode, T, race):
    """Planted races, each under both schedules. Mode 0 is one that the schedules cannot show (every
    thread writes the same value): with the checker off it gives the right result."""
    emu.set_schedule(sched)
    try:
        with pytest.raises(RuntimeError, match="memcheck: " + race):
            emu.selftest_shared_patterns(T, mode)
        if mode == 0:
            was = emu.set_memcheck(False)
            try:
                assert (emu.selftest_shared_patterns(T, 0) == 1).all()
            finally:
                emu.set_memcheck(was)
    finally:
        emu.set_schedule(0)


@pytest.mark.parametrize("sched", [0, 1])
def test_memcheck_passes_race_free_patterns(sched):
    """No false alarms: a barrier between read and write, a broadcast read, lanes ordered by
    __syncwarp, atomics on one shared word."""
    emu.set_schedule(sched)
    try:
        t = torch.arange(64, dtype=torch.float32)
        assert torch.equal(emu.selftest_shared_patterns(64, 2), t.roll(-1))
        assert (emu.selftest_shared_patterns(64, 3) == 0).all()
        for T in (32, 64):
            assert torch.equal(emu.selftest_shared_patterns(T, 4), 2 * (torch.arange(T) ^ 1).float())
        assert (emu.selftest_shared_patterns(64, 6) == 64).all()
    finally:
        emu.set_schedule(0)


@pytest.mark.parametrize("n", [1, 7, 64, 1000])
def test_memcheck_catches_global_memory_out_of_bounds(n):
    """Every tensor storage has red zones before and after it (the emulation's CPU allocator): an
    access just outside one fails, at any size (an odd one leaves a partial tail)."""
    x = torch.randn(n)
    assert emu.selftest_global_access(x, n - 1, False) == float(x[n - 1])
    assert emu.selftest_global_access(x, 0, False) == float(x[0])
    with pytest.raises(RuntimeError, match="memcheck: reads 4 bytes of global memory at .*, 0 bytes past the end of a "
                                           f"tensor storage of {4 * n} bytes"):
        emu.selftest_global_access(x, n, False)
    with pytest.raises(RuntimeError, match="memcheck: writes 4 bytes of global memory at .*, 0 bytes past the end"):
        emu.selftest_global_access(x, n, True)
    with pytest.raises(RuntimeError, match="memcheck: reads 4 bytes .*, 4 bytes before the start of a tensor storage"):
        emu.selftest_global_access(x, -1, False)
    before = x.clone()
    with pytest.raises(RuntimeError, match="out of bounds"):
        emu.selftest_global_access(x, n + 3, True)
    assert torch.equal(x, before)  # the write past the end never touched the tensor's elements
    # a view's storage is its base's: element n of a view of the first n of 2n is in bounds
    y = torch.randn(2 * n)
    assert emu.selftest_global_access(y[:n], n, False) == float(y[n])


def test_warp_shuffles_and_votes():
    x = torch.randn(32)
    full = emu.selftest_warp_sum(x, 0xFFFFFFFF, 16, -1)
    torch.testing.assert_close(full, torch.full((32,), float(x.sum())), rtol=1e-6, atol=1e-5)
    half = emu.selftest_warp_sum(x, 0x0000FFFF, 8, -1)  # a partial mask: lanes 0..15 exchange among themselves
    torch.testing.assert_close(half[:16], torch.full((16,), float(x[:16].sum())), rtol=1e-6, atol=1e-5)
    assert (half[16:] == 0).all()
    pred = torch.randint(0, 2, (32,))
    for src, width in ((5, 32), (3, 8)):
        out = emu.selftest_warp_ops(pred, src, width)
        ballot = sum(int(p) << i for i, p in enumerate(pred.tolist()))
        assert (out[:, 0].to(torch.int64) & 0xFFFFFFFF == ballot).all()
        assert (out[:, 1] == int(pred.any())).all() and (out[:, 2] == int(pred.all())).all()
        lane = torch.arange(32)
        base = lane // width * width
        assert torch.equal(out[:, 3], (base + src % width) * 10)
        down = torch.where(lane - base + 1 < width, lane + 1, lane)
        up = torch.where(lane - base - 1 >= 0, lane - 1, lane)
        assert torch.equal(out[:, 4], down * 10) and torch.equal(out[:, 5], up * 10)


def test_a_lane_missing_from_a_shuffle_fails_loudly():
    with pytest.raises(RuntimeError, match=r"lane 5 of mask 0xffffffff does not take part \(it is exited\)"):
        emu.selftest_warp_sum(torch.randn(32), 0xFFFFFFFF, 16, 5)
    with pytest.raises(RuntimeError, match="reads lane 16, which is not in mask 0xffff"):
        emu.selftest_warp_sum(torch.randn(32), 0x0000FFFF, 16, -1)


@pytest.mark.parametrize("T", [1, 33, 100])
def test_syncthreads_or_and_count(T):
    for pred in (torch.zeros(T), torch.ones(T), torch.randint(0, 2, (T,))):
        out = emu.selftest_block_reduce(pred)
        assert (out[:, 0] == int(pred.any())).all()
        assert (out[:, 1] == int(pred.all())).all()
        assert (out[:, 2] == int(pred.sum())).all()


def test_divergent_synchronisation_fails_loudly():
    with pytest.raises(RuntimeError, match=r"lane 0 of mask 0xffffffff does not take part \(it is at __syncthreads\)"):
        emu.selftest_divergent(0)
    with pytest.raises(RuntimeError, match="wait at different barriers"):
        emu.selftest_divergent(1)


def test_atomics():
    assert emu.selftest_atomic(5, 33) == 165


def test_launch_limits_of_sm_90():
    emu.selftest_launch(2, 1024, 0, 0, -1)
    with pytest.raises(RuntimeError, match="at most 1024 threads"):
        emu.selftest_launch(1, 1025, 0, 0, -1)
    with pytest.raises(RuntimeError, match="every dimension must be >= 1"):
        emu.selftest_launch(0, 32, 0, 0, -1)
    emu.selftest_launch(1, 32, 48 * 1024, 0, -1)
    with pytest.raises(RuntimeError, match="its limit is 49152"):
        emu.selftest_launch(1, 32, 48 * 1024 + 16, 0, -1)
    emu.selftest_launch(1, 32, 100 * 1024, 100 * 1024, 0)  # raised by cudaFuncSetAttribute
    with pytest.raises(RuntimeError, match="invalid argument"):
        emu.selftest_launch(1, 32, 0, 227 * 1024 + 1, 0)  # past sm_90's opt-in limit


def test_register_and_shared_memory_limits_from_ptxas():
    """A launch whose registers x threads exceed an SM's 65,536 is what a GPU refuses with "too many
    resources requested for launch"; the emulator checks every launch against ptxas's numbers."""
    kernels = json.loads(RESOURCES.read_text())["kernels"]
    assert {"coord_lstm_fwd_kernel", "l2l_step_kernel", "hier_coord_kernel"} <= set(kernels)
    try:
        emu.set_resources("smem_write_kernel 64 0\n")
        emu.selftest_launch(1, 1024, 0, 0, -1)  # 64 x 1024 = 65,536: fits exactly
        emu.set_resources("smem_write_kernel 72 0\n")  # the planted bug: 72 registers at 1024 threads
        with pytest.raises(RuntimeError, match="too many resources requested for launch"):
            emu.selftest_launch(1, 1024, 0, 0, -1)
        emu.selftest_launch(1, 512, 0, 0, -1)
        emu.set_resources("smem_write_kernel 32 0 256\n")  # __launch_bounds__(256)
        emu.selftest_launch(1, 256, 0, 0, -1)
        with pytest.raises(RuntimeError, match="with 257 threads per block exceeds its __launch_bounds__ \\(256"):
            emu.selftest_launch(1, 257, 0, 0, -1)
        emu.set_resources("smem_write_kernel 32 40000\n")
        with pytest.raises(RuntimeError, match="exceed sm_90's 232448 per block"):
            emu.selftest_launch(1, 32, 200 * 1024, 200 * 1024, -1)
    finally:
        emu.set_resources(_resource_table(kernels))


def test_launch_bounds_come_from_the_ptx():
    """Every kernel of csrc/cuda with a __launch_bounds__ has its bound (PTX .maxntid) in the resource
    table the launches are checked against; and the PTX parser reads bounds and their absence."""
    import re
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "emulation"))
    try:
        import resources
    finally:
        sys.path.pop(0)
    ptx = (".visible .entry _Z1av(\n.param .u64 p\n)\n.maxntid 128, 1, 1\n.minnctapersm 2\n{\nret;\n}\n"
           ".visible .entry _Z1bv(\n)\n{\n.maxntid 9, 9, 9\n}\n.entry _Z1cv()\n.maxntid 16, 2, 1\n{\n}\n")
    assert resources.parse_ptx(ptx) == {"_Z1av": 128, "_Z1bv": 0, "_Z1cv": 32}
    kernels = json.loads(RESOURCES.read_text())["kernels"]
    src = "".join(p.read_text() for p in (Path(__file__).resolve().parents[1] / "csrc" / "cuda").glob("*.cu"))
    bounded = set(re.findall(r"__launch_bounds__\([^)]*\)\s*(?:\n\s*)?(\w+_kernel)\(", src))
    assert bounded >= {"coord_lstm_fwd_kernel", "l2l_step_kernel", "hier_coord_kernel"}
    assert bounded <= set(kernels)
    for k in bounded:
        assert kernels[k].get("max_threads", 0) > 0, k


@pytest.mark.parametrize("memcheck", [True, False])
def test_dynamic_shared_memory_is_exactly_the_requested_size(memcheck):
    """The planted overflow, one byte past the end: the memory checker catches the access itself; without
    it, the guard band after the block."""
    was = emu.set_memcheck(memcheck)
    try:
        emu.selftest_launch(1, 32, 4096, 0, 4095)
        message = ("memcheck: writes 1 bytes at byte 4096 of dynamic shared memory, past the 4096 bytes" if memcheck
                   else "wrote shared memory at byte 4096 .* past the 4096 bytes of dynamic shared memory")
        with pytest.raises(RuntimeError, match=message):
            emu.selftest_launch(1, 32, 4096, 0, 4096)
    finally:
        emu.set_memcheck(was)


def test_16_bit_conversions_round_to_nearest_even():
    e = 2.0 ** -8
    x = torch.tensor([1 + e, 1 + 3 * e, -(1 + e), 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 65520.0, 3.0e38,
                      float("nan"), float("inf"), 1e-40, -0.0])
    b, h = emu.selftest_round(x)
    assert b[0] == 1.0 and b[1] == 1 + 4 * e and b[2] == -1.0  # ties go to the even neighbour
    assert h[3] == 1.0 and h[4] == 1 + 4 * 2.0 ** -11
    torch.testing.assert_close(b.float(), x.to(torch.bfloat16).float(), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(h.float(), x.to(torch.float16).float(), rtol=0, atol=0, equal_nan=True)
    assert h[5] == float("inf")  # 65520 rounds up past float16's largest finite value


# ================================================================================================
# the CUDA kernels: coord_lstm and its stack
# ================================================================================================
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _cell(N, I, H, dtype, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    wdt = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype

    def r(*s, scale=1.0, dt=dtype):
        t = (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dt)
        if noncontig and t.dim() == 2 and t.numel():
            wide = torch.zeros(s[0], 2 * s[1], dtype=dt)
            wide[:, ::2] = t
            t = wide[:, ::2]
        return t

    return (r(N, I), r(N, H, scale=0.5), r(N, H, scale=0.5), r(4 * H, I, scale=0.3, dt=wdt),
            r(4 * H, H, scale=0.3, dt=wdt), r(4 * H, scale=0.1, dt=wdt))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("N,I,H", [(1, 1, 1), (37, 2, 20), (130, 7, 33)])
def test_coord_lstm_forward_and_backward(schedule, dtype, N, I, H):
    ins = _cell(N, I, H, dtype, noncontig=N == 37)
    h_new, c_new = emu.coord_lstm(*ins)
    ref = [t.double().requires_grad_() for t in ins]
    hr, cr = reference.coord_lstm(*ref)
    tol = TOL[dtype]
    torch.testing.assert_close(h_new.double(), hr, **tol)
    torch.testing.assert_close(c_new.double(), cr, **tol)
    gh, gc = torch.randn(N, H, dtype=torch.float64).to(dtype), torch.randn(N, H, dtype=torch.float64).to(dtype)
    grads = emu.coord_lstm_backward(gh, gc, *ins)
    expect = torch.autograd.grad((hr, cr), ref, (gh.double(), gc.double()))
    for name, a, e in zip(("dx", "dh", "dc", "dw_ih", "dw_hh", "db"), grads, expect):
        scale = max(1.0, e.abs().max().item()) if name.startswith(("dw", "db")) else 1.0
        torch.testing.assert_close(a.double(), e, rtol=tol["rtol"] * 4, atol=tol["atol"] * 4 * scale, msg=name)
    assert {n for n, *_ in launches()} == {"coord_lstm_fwd_kernel", "coord_lstm_bwd_kernel"}


def test_coord_lstm_with_no_rows():
    ins = _cell(0, 2, 20, torch.float32)
    h_new, c_new = emu.coord_lstm(*ins)
    assert h_new.shape == (0, 20) and c_new.shape == (0, 20)
    dx, dh, dc, dw_ih, dw_hh, db = emu.coord_lstm_backward(torch.zeros(0, 20), torch.zeros(0, 20), *ins)
    assert dx.shape == (0, 2) and (dw_ih == 0).all() and (db == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
def test_coord_lstm_weights_in_global_memory(schedule, dtype):
    """A hidden size whose weights do not fit in shared memory: the kernels' global-memory fallback."""
    N, I, H = 9, 2, 130
    ins = _cell(N, I, H, dtype)
    h_new, c_new = emu.coord_lstm(*ins)
    hr, cr = reference.coord_lstm(*[t.double() for t in ins])
    torch.testing.assert_close(h_new.double(), hr, **TOL[dtype])
    torch.testing.assert_close(c_new.double(), cr, **TOL[dtype])
    ((name, _, _, smem),) = launches()
    weight_bytes = 4 * 132 * 132 * ins[3].element_size()
    assert name == "coord_lstm_fwd_kernel" and smem < weight_bytes  # the weights were not staged


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_coord_lstm_stack(schedule, dtype):
    N, I, hidden = 45, 2, (20, 7)
    g = torch.Generator().manual_seed(3)
    wdt = torch.float32 if dtype == torch.bfloat16 else dtype
    x = torch.randn(N, I, generator=g).to(dtype)
    sizes_in = (I,) + hidden[:-1]
    h = [(0.5 * torch.randn(N, H, generator=g)).to(dtype) for H in hidden]
    c = [(0.5 * torch.randn(N, H, generator=g)).to(dtype) for H in hidden]
    w_ih = [(0.3 * torch.randn(4 * H, k, generator=g)).to(wdt) for H, k in zip(hidden, sizes_in)]
    w_hh = [(0.3 * torch.randn(4 * H, H, generator=g)).to(wdt) for H in hidden]
    b = [(0.1 * torch.randn(4 * H, generator=g)).to(wdt) for H in hidden]
    w_out, b_out = torch.randn(3, hidden[-1], generator=g).to(wdt), torch.randn(3, generator=g).to(wdt)
    y, hn, cn = emu.coord_lstm_stack(x, h, c, w_ih, w_hh, b, w_out, b_out)
    d = lambda ts: [t.double() for t in ts]  # noqa: E731
    yr, hr, cr = reference.coord_lstm_stack(x.double(), d(h), d(c), d(w_ih), d(w_hh), d(b), w_out.double(),
                                            b_out.double())
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), yr, rtol=tol["rtol"] * 4, atol=tol["atol"] * 4)
    for a, e in zip(hn + cn, hr + cr):
        torch.testing.assert_close(a.double(), e, **tol)
    gy = torch.randn(N, 3, generator=g).to(dtype)
    gh = [torch.randn(N, H, generator=g).to(dtype) for H in hidden]
    gc = [torch.randn(N, H, generator=g).to(dtype) for H in hidden]
    out = emu.coord_lstm_stack_backward(gy, gh, gc, x, h, c, w_ih, w_hh, b, w_out, b_out)
    cpu_in = [t.double() for t in (gy,)] + [d(gh), d(gc), x.double(), d(h), d(c), d(w_ih), d(w_hh), d(b),
                                           w_out.double(), b_out.double()]
    expect = torch.ops.learnedopt.coord_lstm_stack_backward(*cpu_in)  # the CPU kernel, float64
    flat = lambda o: [o[0]] + [t for part in o[1:6] for t in part] + [o[6], o[7]]  # noqa: E731
    for a, e in zip(flat(out), flat(expect)):
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(a.double(), e, rtol=tol["rtol"] * 8, atol=tol["atol"] * 8 * scale)


# ================================================================================================
# the CUDA kernels: the optimizer steps
# ================================================================================================
def _l2l_args(net=None):
    net = net or learnedopt.pretrained.load_net("l2l-mnist")
    w = [net.layer_weights(i) for i in range(len(net.layers))]
    return ([t[0].detach() for t in w], [t[1].detach() for t in w], [t[2].detach() for t in w],
            net.w_out.detach(), net.b_out.detach())


def _tensors(sizes, dtype=torch.float32, seed=0, grad_scale=1e-3):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(*s, generator=g).to(dtype) for s in sizes]
    grads = [(torch.randn(*s, generator=g) * grad_scale).to(dtype) for s in sizes]
    return params, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d)[6:])
def test_l2l_step_matches_the_reference(schedule, dtype):
    sizes = [(0,), (1,), (3, 5), (300,), (129, 3)]
    params, grads = _tensors(sizes, dtype)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    states = [torch.randn(p.numel(), 80, dtype=sdt) * 0.1 for p in params]
    w = _l2l_args()
    if dtype == torch.float64:
        w = tuple([t.double() for t in x] if isinstance(x, list) else x.double() for x in w)
    pe, se = [p.clone() for p in params], [s.clone() for s in states]
    emu.l2l_step_(pe, grads, se, *w, 1.0, 0.01, 0.1, 10.0, True)
    pr, sr = [p.clone() for p in params], [s.clone() for s in states]
    reference.l2l_step_(pr, grads, sr, *w, 1.0, 0.01, 0.1, 10.0, True)
    tol = TOL[dtype] if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-6)
    for a, e in zip(pe + se, pr + sr):
        torch.testing.assert_close(a.double(), e.double(), **tol)
    names = [n for n, *_ in launches()]
    assert names == ["l2l_finite_kernel", "l2l_step_kernel"]


def test_l2l_step_more_than_32_tensors_and_nonfinite_skips(schedule):
    """40 tensors: two chunks per kernel; a NaN and an inf gradient skip their tensors only."""
    sizes = [(7 + i,) for i in range(40)]
    params, grads = _tensors(sizes)
    grads[3][2] = float("nan")
    grads[35][0] = float("inf")
    states = [torch.randn(p.numel(), 80) * 0.1 for p in params]
    w = _l2l_args()
    pe, se = [p.clone() for p in params], [s.clone() for s in states]
    emu.l2l_step_(pe, grads, se, *w, 1.0, 0.0, 0.1, 10.0, True)
    pc, sc = [p.clone() for p in params], [s.clone() for s in states]
    torch.ops.learnedopt.l2l_step_(pc, grads, sc, *w, 1.0, 0.0, 0.1, 10.0, True)  # the CPU kernel
    for i in (3, 35):
        assert torch.equal(pe[i], params[i]) and torch.equal(se[i], states[i])
    for a, e in zip(pe + se, pc + sc):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    names = [n for n, *_ in launches()]
    assert names.count("l2l_step_kernel") == 2 and names.count("l2l_finite_kernel") == 2


def test_l2l_step_grad_scaler_and_found_inf(schedule):
    params, grads = _tensors([(50,), (3, 4)])
    states = [torch.zeros(p.numel(), 80) for p in params]
    w = _l2l_args()
    scale = torch.tensor(1024.0)
    pe, se = [p.clone() for p in params], [s.clone() for s in states]
    emu.l2l_step_(pe, [g * 1024 for g in grads], se, *w, 1.0, 0.0, 0.1, 10.0, True, scale, torch.tensor(0.0))
    pr, sr = [p.clone() for p in params], [s.clone() for s in states]
    reference.l2l_step_(pr, grads, sr, *w, 1.0, 0.0, 0.1, 10.0, True)
    for a, e in zip(pe + se, pr + sr):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    pe2, se2 = [p.clone() for p in params], [s.clone() for s in states]
    emu.l2l_step_(pe2, grads, se2, *w, 1.0, 0.0, 0.1, 10.0, True, scale, torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(pe2 + se2, params + states))  # found_inf: nothing moves


def _hier_inputs(sizes, dtype=torch.float32, state_dtype=torch.float32, seed=0):
    net = learnedopt.pretrained.load_net("hierarchical-ensemble")
    params, grads = _tensors(sizes, dtype, seed)
    cdt = torch.float64 if dtype == torch.float64 else state_dtype
    g = torch.Generator().manual_seed(seed + 1)
    coord = [net.initial_coord_state(p.numel(), 0.0, dtype=torch.float64).to(cdt) for p in params]
    bias = torch.randn(len(sizes), 40, generator=g) * 0.1  # float32 for every dtype (the op's schema)
    return params, grads, coord, bias, net.packed_coord_weights()  # the weights are float32 for every dtype


@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                               (torch.float64, torch.float64), (torch.bfloat16, torch.float32)],
                         ids=["f32", "f32-bf16state", "f64", "bf16"])
def test_hier_step_matches_the_cpu_kernel(schedule, dtype, state_dtype):
    sizes = [(0,), (1,), (3, 5), (300,), (1000,)]
    params, grads, coord, bias, wts = _hier_inputs(sizes, dtype, state_dtype)
    mean = torch.tensor(-0.5, dtype=bias.dtype)
    lrs = [1e-3, 2e-3, 1e-4, 1e-3, 5e-4]
    if dtype == torch.bfloat16:  # the CPU kernel has no bfloat16 parameters: compare with float32 ones
        cpu_params, cpu_grads = [p.float() for p in params], [g.float() for g in grads]
    else:
        cpu_params, cpu_grads = [p.clone() for p in params], grads
    pe, ce = [p.clone() for p in params], [c.clone() for c in coord]
    se = emu.hier_step_(pe, grads, ce, bias, mean, wts, lrs)
    pc, cc = cpu_params, [c.clone() for c in coord]
    sc = torch.ops.learnedopt.hier_step_(pc, cpu_grads, cc, bias, mean, wts, lrs)
    low = dtype == torch.bfloat16 or state_dtype == torch.bfloat16
    tol = dict(rtol=2e-2, atol=2e-2) if low else TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for a, e in zip(pe, pc):
        torch.testing.assert_close(a.double(), e.double(), **tol)
    for a, e in zip(ce, cc):
        torch.testing.assert_close(a.double(), e.double(), **tol)
    torch.testing.assert_close(se.double(), sc.double(), rtol=tol["rtol"], atol=tol["atol"] * 1e3)
    names = [n for n, *_ in launches()]
    assert names == ["hier_finite_kernel", "hier_coord_kernel", "hier_sums_kernel", "hier_update_kernel"]


def test_hier_step_more_than_32_tensors_nonfinite_and_found_inf(schedule):
    sizes = [(5 + 3 * i,) for i in range(37)]
    params, grads, coord, bias, wts = _hier_inputs(sizes)
    grads[1][0] = float("nan")
    grads[33][4] = float("-inf")
    mean = torch.tensor(0.1)
    lrs = [1e-3] * len(sizes)
    pe, ce = [p.clone() for p in params], [c.clone() for c in coord]
    se = emu.hier_step_(pe, grads, ce, bias, mean, wts, lrs)
    pc, cc = [p.clone() for p in params], [c.clone() for c in coord]
    sc = torch.ops.learnedopt.hier_step_(pc, grads, cc, bias, mean, wts, lrs)
    for i in (1, 33):
        assert torch.equal(pe[i], params[i]) and torch.equal(ce[i], coord[i]) and se[i, 24] == 0
    for a, e in zip(pe + ce, pc + cc):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(se, sc, rtol=1e-4, atol=1e-2)
    names = [n for n, *_ in launches()]
    assert names.count("hier_coord_kernel") == 2
    pe2, ce2 = [p.clone() for p in params], [c.clone() for c in coord]
    s2 = emu.hier_step_(pe2, grads, ce2, bias, mean, wts, lrs, torch.tensor(2.0), torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(pe2 + ce2, params + coord)) and (s2[:, 24] == 0).all()


def test_steps_are_deterministic():
    params, grads, coord, bias, wts = _hier_inputs([(77,), (300,)])
    outs = []
    for sched in (0, 1, 0):
        emu.set_schedule(sched)
        p, c = [x.clone() for x in params], [x.clone() for x in coord]
        s = emu.hier_step_(p, grads, c, bias, torch.tensor(0.0), wts, [1e-3, 1e-3])
        outs.append((p, c, s))
    emu.set_schedule(0)
    for p, c, s in outs[1:]:  # bitwise, whatever the schedule
        assert all(torch.equal(a, b) for a, b in zip(p + c + [s], outs[0][0] + outs[0][1] + [outs[0][2]]))


@pytest.mark.parametrize("opt", ["l2l", "hier"])
def test_100_optimizer_steps_follow_the_cpu_kernel(opt):
    """The emulated CUDA step for 100 steps on the same random gradients (over five orders of
    magnitude, as tests/test_hierarchical.py's fused-vs-reference run) as the CPU kernel. Open loop:
    on a closed loop (gradients of the stepped parameters) the two would drift apart chaotically
    from their last-bit differences (the CPU kernels' rational tanh vs the CUDA kernels' libm)."""
    sizes = [(6, 5), (1,), (40,)]
    runs = []
    for op in (emu, torch.ops.learnedopt):
        params = [torch.randn(*s, generator=torch.Generator().manual_seed(1)) for s in sizes]
        if opt == "l2l":
            states = [torch.zeros(p.numel(), 80) for p in params]
            w = _l2l_args()
        else:
            _, _, states, bias, wts = _hier_inputs(sizes)
        for k in range(100):
            g = torch.Generator().manual_seed(100 + k)
            grads = [torch.randn(*s, generator=g) * 10.0 ** ((k % 5) - 2) for s in sizes]
            if opt == "l2l":
                op.l2l_step_(params, grads, states, *w, 1.0, 0.0, 0.1, 10.0, True)
            else:
                op.hier_step_(params, grads, states, bias, torch.tensor(0.0), wts, [1e-2] * len(sizes))
        runs.append(params + states)
    for a, e in zip(*runs):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    assert not torch.equal(runs[0][0], torch.randn(*sizes[0], generator=torch.Generator().manual_seed(1)))
