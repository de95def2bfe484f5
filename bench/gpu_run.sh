#!/usr/bin/env bash
# One-shot GPU validation of learnedopt: build the extension with CUDA in place, run the test suite,
# run the benchmarks, and collect every log.
#
#   bash bench/gpu_run.sh            (from anywhere; it works in the repository that holds it)
#
# Meant for a bare GPU box with the repository copied in and python3 + torch (CUDA) + nvcc + pytest
# preinstalled, no internet (nothing is installed). Steps, each under a time limit so the whole run
# ends within GPU_RUN_BUDGET_S (default 570 s):
#   1. device info (nvidia-smi, python / torch / nvcc versions, git revision if any) -> env.txt
#   2. LEARNEDOPT_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) python3 setup.py build_ext --inplace
#      -> build.log (a stale in-place learnedopt/_C*.so is removed first, so tests never run old code)
#   3. PYTHONPATH=<repo> python3 -m pytest tests -q -m cuda -ra -> pytest.log, pytest.xml (junit): every
#      test that needs a GPU (tests/conftest.py marks them), first, while the time is there
#   4. PYTHONPATH=<repo> python3 bench/bench_coord_lstm.py --device all -> bench.log, coord_lstm-*.json
#   5. PYTHONPATH=<repo> python3 bench/bench_step.py --device all -> bench_step.log, step-*.json (CUDA rows
#      first, then CPU; its JSON is rewritten after every workload, so a run stopped by the time limit
#      keeps the rows it measured)
#   6. PYTHONPATH=<repo> python3 bench/bench_train.py --device cuda -> bench_train.log, train-*.json: whole
#      training steps (forward, backward, optimizer step) of ResNet-18, ResNet-50 and a small ViT, batch 32,
#      image 224, with Adam and the learned optimizers (JSON rewritten after every configuration; skipped,
#      and not a failure, where torchvision is not installed)
#   7. PYTHONPATH=<repo> python3 -m pytest tests -q -m "not cuda" in the time left -> pytest-rest.log,
#      pytest-rest.xml (CI runs these too; here they check this machine's torch/Python; a stop by the
#      time limit is not a failure)
# Logs go to bench/results/gpu-<UTC date-time>/ and, when $OUT is set, to $OUT/gpu-<date-time>/ as
# well (refreshed after every step, so a run cut short still returns what it has). A failed step does
# not stop the later ones (but tests and benchmarks are skipped when there is no built extension).
# stdout gets the tails of the build and test logs, the benchmark table, and a summary at the end.
#
# Exit status: 0 when all passed; 1 when the build failed, the CUDA kernels are not usable after it,
# the tests failed (or could not run), or a benchmark failed (or ran past its time limit).
#
# Environment (all optional):
#   PYTHON               interpreter (default python3)
#   GPU_RUN_CUDA         value of LEARNEDOPT_CUDA for the build (default 1; 0 = CPU-only dry run)
#   TORCH_CUDA_ARCH_LIST (default 9.0: H100 / H200)
#   PYTEST_ARGS          extra pytest arguments of both test steps (default none; e.g. -x)
#   BENCH_ARGS           extra benchmark arguments (default none: N = 1e4 1e5 1e6, repeat 5)
#   STEP_BENCH_ARGS      extra arguments of bench_step.py (default none: sizes 1e4 .. 3e7 and the
#                        ResNet-50 / Inception-V3 shapes, reference up to 1e7 elements)
#   TRAIN_BENCH_ARGS     extra arguments of bench_train.py (default none: resnet18 resnet50 vit, batch 32,
#                        image 224, all optimizers, warmup 2, repeat 10)
#   GPU_RUN_STEP_S       seconds kept for bench_step.py when the first benchmark starts (default 150)
#   GPU_RUN_TRAIN_S      seconds kept for bench_train.py when the tests start (default 90)
#   GPU_RUN_BUDGET_S     total time budget in seconds (default 570)
#   LEARNEDOPT_GIT_REV   revision to record when the copy has no .git (the benchmark reads it)

set -u -o pipefail

T0=$(date +%s)
BUDGET=${GPU_RUN_BUDGET_S:-570}
DEADLINE=$((T0 + BUDGET))
PY=${PYTHON:-python3}
CUDA_FLAG=${GPU_RUN_CUDA:-1}
STEP_S=${GPU_RUN_STEP_S:-150}
TRAIN_S=${GPU_RUN_TRAIN_S:-90}
ARCH=${TORCH_CUDA_ARCH_LIST:-9.0}
NPROC=$(nproc 2>/dev/null || echo 4)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
STAMP=$(date -u +%Y%m%d-%H%M%S)
NAME=gpu-$STAMP
RES=$ROOT/bench/results/$NAME
mkdir -p "$RES"

sync_out() {
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT/$NAME" && cp -r "$RES"/. "$OUT/$NAME/" 2>/dev/null
    fi
    return 0
}
trap sync_out EXIT

# Seconds left for a step that must leave `reserve` seconds for the ones after it (at least 30).
left() {
    local reserve=$1 now
    now=$(date +%s)
    local s=$((DEADLINE - now - reserve))
    [ "$s" -lt 30 ] && s=30
    echo "$s"
}

banner() { printf '\n===== %s  (t=%ss)\n' "$*" "$(($(date +%s) - T0))"; }

# ---------------------------------------------------------------------------------------------
banner "1. device info"
{
    echo "date (UTC): $(date -u '+%Y-%m-%d %H:%M:%S')"
    echo "host: $(hostname 2>/dev/null)  nproc: $NPROC"
    echo "repo: $ROOT"
    if git -C "$ROOT" rev-parse --short HEAD >/dev/null 2>&1; then
        echo "git: $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo -dirty)"
    else
        echo "git: no repository here (LEARNEDOPT_GIT_REV=${LEARNEDOPT_GIT_REV:-unset})"
    fi
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')"
    echo
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi 2>&1
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit --format=csv 2>&1
    else
        echo "nvidia-smi: not found"
    fi
    echo
    command -v nvcc >/dev/null 2>&1 && nvcc --version 2>&1 | tail -n 2 || echo "nvcc: not on PATH"
    echo "gcc: $(gcc --version 2>/dev/null | head -n 1)"
    echo "ninja: $(command -v ninja || echo 'not on PATH')"
    "$PY" - <<'EOF' 2>&1
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "cuda available", torch.cuda.is_available(),
          "threads", torch.get_num_threads())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("gpu", torch.cuda.get_device_name(0), "cc %d.%d" % (p.major, p.minor),
              "mem %.1f GiB" % (p.total_memory / 2**30), "SMs", p.multi_processor_count)
except Exception as e:  # noqa: BLE001
    print("torch import failed:", e)
for m in ("setuptools", "ninja", "pytest", "numpy", "expecttest", "pytest_benchmark", "torchvision", "tqdm", "safetensors"):
    try:
        mod = importlib.import_module(m)
        print(f"{m}: {getattr(mod, '__version__', 'present')}")
    except Exception as e:  # noqa: BLE001
        print(f"{m}: MISSING ({type(e).__name__})")
EOF
} > "$RES/env.txt" 2>&1
cat "$RES/env.txt"
sync_out

# ---------------------------------------------------------------------------------------------
banner "2. build (LEARNEDOPT_CUDA=$CUDA_FLAG TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$NPROC)"
rm -f "$ROOT"/learnedopt/_C*.so
T=$(left 240)
echo "time limit ${T}s; full log: $RES/build.log"
LEARNEDOPT_CUDA=$CUDA_FLAG TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$NPROC \
    timeout --kill-after=10 "$T" "$PY" setup.py build_ext --inplace > "$RES/build.log" 2>&1
BUILD_RC=$?
tail -n 40 "$RES/build.log"
echo "build exit status: $BUILD_RC"

EXT_OK=0
CUDA_OK=na
if ls "$ROOT"/learnedopt/_C*.so >/dev/null 2>&1; then
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" - > "$RES/ext_check.txt" 2>&1 <<'EOF'
import learnedopt, torch
print("learnedopt from", learnedopt.__file__)
print("extension_available", learnedopt.extension_available())
print("cuda_built", learnedopt.ops.cuda_built())
print("cuda_available", learnedopt.ops.cuda_available())
if learnedopt.ops.cuda_available():
    x = torch.randn(1000, 2, device="cuda")
    h = torch.randn(1000, 20, device="cuda")
    c = torch.randn(1000, 20, device="cuda")
    w_ih = torch.randn(80, 2, device="cuda") * 0.2
    w_hh = torch.randn(80, 20, device="cuda") * 0.2
    b = torch.randn(80, device="cuda") * 0.2
    hn, cn = learnedopt.coord_lstm(x, h, c, w_ih, w_hh, b)
    rh, rc = learnedopt.reference.coord_lstm(x, h, c, w_ih, w_hh, b)
    torch.cuda.synchronize()
    print("first CUDA call: max|dh| %.3g max|dc| %.3g" % ((hn - rh).abs().max().item(), (cn - rc).abs().max().item()))
EOF
    cat "$RES/ext_check.txt"
    grep -q "extension_available True" "$RES/ext_check.txt" && EXT_OK=1
    if [ "$CUDA_FLAG" = "1" ]; then
        grep -q "cuda_available True" "$RES/ext_check.txt" && CUDA_OK=1 || CUDA_OK=0
    fi
else
    echo "no learnedopt/_C*.so after the build"
fi
sync_out

# ---------------------------------------------------------------------------------------------
banner "3. CUDA tests (pytest -m cuda: every test that skips without a GPU)"
TEST_RC=skipped
if [ "$EXT_OK" = 1 ]; then
    T=$(left $((STEP_S + TRAIN_S + 75)))
    echo "time limit ${T}s; full log: $RES/pytest.log"
    # shellcheck disable=SC2086
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" timeout --kill-after=10 "$T" \
        "$PY" -m pytest tests -q -m cuda ${PYTEST_ARGS-} -ra --durations=10 -p no:cacheprovider \
        --junitxml="$RES/pytest.xml" > "$RES/pytest.log" 2>&1
    TEST_RC=$?
    tail -n 60 "$RES/pytest.log"
    echo "pytest exit status: $TEST_RC"
else
    echo "skipped: the extension did not build"
fi
sync_out

# ---------------------------------------------------------------------------------------------
banner "4. benchmark"
BENCH_RC=skipped
if [ "$EXT_OK" = 1 ]; then
    T=$(left $((STEP_S + TRAIN_S + 15)))
    echo "time limit ${T}s"
    # shellcheck disable=SC2086
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" timeout --kill-after=10 "$T" \
        "$PY" bench/bench_coord_lstm.py --device all --out "$RES/" ${BENCH_ARGS:-} 2>&1 | tee "$RES/bench.log"
    BENCH_RC=${PIPESTATUS[0]}
    echo "benchmark exit status: $BENCH_RC"
else
    echo "skipped: the extension did not build"
fi
sync_out

# ---------------------------------------------------------------------------------------------
banner "5. optimizer-step benchmark"
STEP_RC=skipped
if [ "$EXT_OK" = 1 ]; then
    T=$(left $((TRAIN_S + 60)))
    echo "time limit ${T}s"
    # shellcheck disable=SC2086
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" timeout --kill-after=10 "$T" \
        "$PY" bench/bench_step.py --device all --out "$RES/" ${STEP_BENCH_ARGS:-} 2>&1 | tee "$RES/bench_step.log"
    STEP_RC=${PIPESTATUS[0]}
    echo "optimizer-step benchmark exit status: $STEP_RC"
    case "$STEP_RC" in 124|137) echo "(stopped by the time limit; the JSON holds the workloads finished before)" ;; esac
else
    echo "skipped: the extension did not build"
fi
sync_out

# ---------------------------------------------------------------------------------------------
banner "6. training-step benchmark (bench_train.py --device cuda)"
TRAIN_RC=skipped
if [ "$EXT_OK" = 1 ]; then
    if "$PY" -c "import torchvision" >/dev/null 2>&1; then
        T=$(left 60)
        echo "time limit ${T}s"
        # shellcheck disable=SC2086
        PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" timeout --kill-after=10 "$T" \
            "$PY" bench/bench_train.py --device cuda --out "$RES/" ${TRAIN_BENCH_ARGS:-} 2>&1 | tee "$RES/bench_train.log"
        TRAIN_RC=${PIPESTATUS[0]}
        echo "training-step benchmark exit status: $TRAIN_RC"
        case "$TRAIN_RC" in 124|137) echo "(stopped by the time limit; the JSON holds the configurations finished before)" ;; esac
    else
        TRAIN_RC=no-torchvision
        echo "skipped: torchvision is not installed (not a failure)"
    fi
else
    echo "skipped: the extension did not build"
fi
sync_out

# ---------------------------------------------------------------------------------------------
banner "7. the other tests (pytest -m 'not cuda', in the time left; CI runs them too)"
REST_RC=skipped
if [ "$EXT_OK" = 1 ]; then
    T=$(left 5)
    echo "time limit ${T}s; full log: $RES/pytest-rest.log"
    # shellcheck disable=SC2086
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" timeout --kill-after=10 "$T" \
        "$PY" -m pytest tests -q -m "not cuda" ${PYTEST_ARGS-} -ra -p no:cacheprovider \
        --junitxml="$RES/pytest-rest.xml" > "$RES/pytest-rest.log" 2>&1
    REST_RC=$?
    tail -n 30 "$RES/pytest-rest.log"
    echo "pytest exit status: $REST_RC"
    case "$REST_RC" in 124|137) echo "(stopped by the time limit: not a failure; the log has what ran)" ;; esac
else
    echo "skipped: the extension did not build"
fi
sync_out

# ---------------------------------------------------------------------------------------------
banner "summary"
STATUS=0
[ "$BUILD_RC" = 0 ] || STATUS=1
[ "$CUDA_OK" = 0 ] && STATUS=1
[ "$TEST_RC" = 0 ] || STATUS=1
[ "$BENCH_RC" = 0 ] || STATUS=1
[ "$STEP_RC" = 0 ] || STATUS=1
case "$TRAIN_RC" in 0|no-torchvision) ;; *) STATUS=1 ;; esac
case "$REST_RC" in 0|124|137) ;; *) STATUS=1 ;; esac
{
    echo "build:     exit $BUILD_RC (LEARNEDOPT_CUDA=$CUDA_FLAG)  extension loads: $EXT_OK  CUDA kernels usable: $CUDA_OK"
    echo "tests:     exit $TEST_RC  $(grep -E ' in [0-9.]+s( \([0-9:]+\))?( =+)?$' "$RES/pytest.log" 2>/dev/null | tail -n 1)"
    echo "the rest:  exit $REST_RC  $(grep -E ' in [0-9.]+s( \([0-9:]+\))?( =+)?$' "$RES/pytest-rest.log" 2>/dev/null | tail -n 1)"
    echo "benchmark: exit $BENCH_RC  $(ls "$RES"/coord_lstm-*.json 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ')"
    echo "step:      exit $STEP_RC  $(ls "$RES"/step-*.json 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ')"
    echo "train:     exit $TRAIN_RC  $(ls "$RES"/train-*.json 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ')"
    echo "results:   $RES${OUT:+  (and \$OUT/$NAME)}"
    echo "elapsed:   $(($(date +%s) - T0)) s"
    echo "status:    $STATUS"
} | tee "$RES/summary.txt"
sync_out
exit "$STATUS"
