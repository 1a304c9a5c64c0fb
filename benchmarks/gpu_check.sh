#!/usr/bin/env bash
# The one script to run on a GPU machine (H100/H200), from the repository root:
# the GPU tests (tests/test_gpu.py, `-m gpu`) and then the GPU benchmark (benchmarks/bench_gpu.py).
#
# On a remote GPU machine that gets a copy of the checkout (about 3-5 minutes, plus its start):
#   1. here, once: put a faiss-cpu wheel for CPython 3.12 in .whl/ (ignored by .gitignore), e.g.
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#          --platform manylinux2014_x86_64 -d .whl faiss-cpu==1.15.1
#      (faiss is optional: without it the two index tests are skipped; lancedb is never needed)
#   2. there, with .whl/ copied along: bash benchmarks/gpu_check.sh   (allow 540 s)
#      It writes the log to $OUT/gpu_check.log and the numbers to $OUT/bench_gpu.json ($OUT defaults to /tmp).
#
# Without a GPU it degrades gracefully: every test is skipped and the benchmark runs on the CPU
# with small defaults. Exits non-zero when the tests fail (or, failing that, when the benchmark
# fails). Total runtime stays under 8 minutes (the tests and the benchmark each have a timeout).
#
# Environment: PYTHON (default: python3, or .venv/bin/python where python3 has no torch),
# TEST_TIMEOUT (default 240 s), BENCH_TIMEOUT (default 210 s), BENCH_ARGS (extra benchmark options).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-/tmp}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
export PYTHONUNBUFFERED=1
export VECSIM_CACHE="${VECSIM_CACHE:-/tmp/vecsim-cache}"

main() {
    local started=$SECONDS
    echo "== vecsim gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $PWD"

    PY="${PYTHON:-python3}"
    if ! "$PY" -c "import torch" >/dev/null 2>&1 && [ -x .venv/bin/python ]; then
        PY=.venv/bin/python  # a development checkout whose python3 has no torch
    fi

    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "== installing the carried wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl; then
            export PYTHONPATH="/tmp/site:$PWD"
        else
            echo "!! installing the wheels failed; going on without them"
            export PYTHONPATH="$PWD"
        fi
    else
        echo "== no .whl/ folder: nothing to install (faiss is optional)"
        export PYTHONPATH="$PWD"
    fi

    echo "== nvidia-smi"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version,clocks.max.sm \
            --format=csv || nvidia-smi -L || true
    else
        echo "nvidia-smi: not found (no NVIDIA driver here)"
    fi

    echo "== versions ($PY)"
    "$PY" - <<'EOF'
import platform
import torch, torchvision, numpy
print(f"python {platform.python_version()}  torch {torch.__version__}  torchvision {torchvision.__version__}  numpy {numpy.__version__}")
print(f"torch.version.cuda {torch.version.cuda}  cudnn {torch.backends.cudnn.version()}  cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}  {p.total_memory / 2**30:.1f} GiB  capability {p.major}.{p.minor}  {p.multi_processor_count} SMs")
try:
    import faiss
    print(f"faiss {faiss.__version__}  GPUs seen by faiss {faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0}")
except Exception as exc:
    print(f"faiss not importable ({type(exc).__name__}): the index tests will be skipped")
try:
    import lancedb  # noqa: F401
    print("lancedb importable (not needed here)")
except Exception:
    print("lancedb not importable (not needed here)")
EOF

    echo "== GPU tests: pytest -m gpu tests/test_gpu.py"
    timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider \
        --durations=5
    local test_rc=$?
    echo "== GPU tests exit code: $test_rc$([ "$test_rc" = 124 ] && echo ' (timed out)')"

    echo "== benchmark: benchmarks/bench_gpu.py"
    # shellcheck disable=SC2086
    timeout "${BENCH_TIMEOUT:-210}" "$PY" benchmarks/bench_gpu.py --json "$OUT_DIR/bench_gpu.json" ${BENCH_ARGS:-}
    local bench_rc=$?
    echo "== benchmark exit code: $bench_rc$([ "$bench_rc" = 124 ] && echo ' (timed out)')"

    echo "== done in $((SECONDS - started)) s: tests rc=$test_rc, benchmark rc=$bench_rc; log $LOG"
    if [ "$test_rc" != 0 ]; then
        return "$test_rc"
    fi
    return "$bench_rc"
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
