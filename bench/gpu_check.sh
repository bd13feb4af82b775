#!/usr/bin/env bash
# One-command GPU check (bench/README.md, "GPU check"). On a machine with an NVIDIA GPU, a CUDA build
# of torch and nvcc, from a clean checkout and without network:
#   1. precheck  torch sees a GPU, nvcc exists (else exit 2, before anything is built)
#   2. wheels    installs the wheels in .whl/ (or --wheels DIR) into /tmp/site, on PYTHONPATH
#   3. build     python setup.py build_ext --inplace, FORCE_CUDA=1, the GPU's own arch, no build isolation
#   4. import    trpo_ext.cuda_built() is True; one fused FVP on the GPU against the reference
#   5. tests     the whole suite (CUDA-parametrized tests included), junit xml
#   6. bench     python -m trpo_ext.benchmark --device cuda --check (FVP, CG x10; N = 2,048 / 65,536 / 1,048,576)
# Results: bench/results/gpu/<UTC stamp>/ (gpu_check.md, build.log, pytest.log, junit.xml, bench.md,
# bench.log), copied to $OUT/gpu_check_<stamp>/ when $OUT is set. Exit 0 when every stage passed,
# 2 when the machine cannot run the check (no GPU, no nvcc, setuptools < 77), 1 otherwise.
#
#   bash bench/gpu_check.sh [--wheels DIR] [--quick] [--skip-tests] [--skip-bench] [--budget SECONDS]
set -uo pipefail  # not -e: every stage reports its own exit status

usage() {
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --wheels DIR      wheels to install with pip --no-index into /tmp/site (default: .whl/ when present)
  --quick           short benchmark (64x64, N = 2,048 and 65,536, 3 rounds)
  --skip-tests      no test suite
  --skip-bench      no benchmark
  --budget SECONDS  whole-run budget the stage timeouts are cut to (default 450, env GPU_CHECK_BUDGET)
  --cpu-dry-run     test this script on a machine without a GPU: CPU-only build, the suite, a tiny CPU
                    benchmark (no GPU is checked; results under bench/results/gpu/<stamp>-cpu-dry-run/)
Environment: PYTHON (default python3), TRPO_EXT_COMMIT (recorded when there is no .git), OUT.
EOF
}

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PYTHON=${PYTHON:-python3}
WHEELS=""
QUICK=0 SKIP_TESTS=0 SKIP_BENCH=0 DRY=0
BUDGET=${GPU_CHECK_BUDGET:-450}
ARGS="$*"
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=${2:?--wheels needs a directory}; shift 2 ;;
    --wheels=*) WHEELS=${1#--wheels=}; shift ;;
    --quick) QUICK=1; shift ;;
    --skip-tests) SKIP_TESTS=1; shift ;;
    --skip-bench) SKIP_BENCH=1; shift ;;
    --cpu-dry-run) DRY=1; shift ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$WHEELS" ] && [ -d .whl ]; then WHEELS=.whl; fi

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RES=bench/results/gpu/$STAMP
[ "$DRY" -eq 0 ] || RES=$RES-cpu-dry-run
mkdir -p "$RES"
SUMMARY=$RES/gpu_check.md
SECONDS=0
STAGES=()  # "name|status|seconds|note"
VERSIONS=()
FAILED=()
EXIT=0

log() { printf '[gpu_check %4ds] %s\n' "$SECONDS" "$*"; }
record() {  # name status start_seconds note
  STAGES+=("$1|$2|$((SECONDS - $3))|$4")
  if [ "$2" = FAIL ]; then FAILED+=("$1"); fi
  log "stage $1: $2${4:+ ($4)}"
}
left() { echo $((BUDGET - SECONDS)); }
cap() {  # cap SECONDS RESERVE: min(SECONDS, time left minus RESERVE), at least 30
  local t=$(($(left) - $2)); [ "$t" -lt "$1" ] || t=$1; [ "$t" -ge 30 ] || t=30; echo "$t"
}
tail_of() {  # tail_of FILE N: the last N lines, indented, to stdout
  [ -f "$1" ] && tail -n "$2" "$1" | sed 's/^/    | /'
}
sync_out() {
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT/gpu_check_$STAMP" && cp -f "$RES"/* "$OUT/gpu_check_$STAMP/" 2>/dev/null
  return 0
}
write_summary() {
  {
    echo "# trpo_ext GPU check, $STAMP"
    echo
    if [ "$DRY" -eq 1 ]; then echo "**CPU dry run of the script: no GPU was checked.**"; echo; fi
    if [ "${#FAILED[@]}" -eq 0 ] && [ "$EXIT" -eq 0 ]; then echo "**Result: PASS**"
    else echo "**Result: FAIL** (exit $EXIT; failed: ${FAILED[*]:-none})"; fi
    echo
    echo "Command: \`bash bench/gpu_check.sh $ARGS\`, ${SECONDS} s in all (budget $BUDGET s)."
    echo
    echo "## Versions"
    echo
    for v in "${VERSIONS[@]}"; do echo "- $v"; done
    echo
    echo "## Stages"
    echo
    echo "| stage | status | seconds | note |"
    echo "|---|---|---|---|"
    for s in "${STAGES[@]}"; do
      IFS='|' read -r n st secs note <<<"$s"
      echo "| $n | $st | $secs | $note |"
    done
    if [ -f "$RES/pytest.log" ]; then
      echo
      echo "## Tests (the end of pytest.log)"
      echo
      echo '```'
      grep -E '^(FAILED|ERROR) ' "$RES/pytest.log" | head -n 40
      tail -n 1 "$RES/pytest.log"
      echo '```'
    fi
    if [ -f "$RES/bench.md" ]; then
      echo
      echo "## Benchmark"
      echo
      cat "$RES/bench.md"
    fi
  } >"$SUMMARY"
  sync_out
}
finish() {  # finish EXIT_CODE
  EXIT=$1
  if [ "$EXIT" -eq 0 ] && [ "${#FAILED[@]}" -gt 0 ]; then EXIT=1; fi
  write_summary
  echo
  echo "================ gpu_check summary ($SECONDS s) ================"
  for s in "${STAGES[@]}"; do
    IFS='|' read -r n st secs note <<<"$s"
    printf '  %-9s %-5s %4ss  %s\n' "$n" "$st" "$secs" "$note"
  done
  if [ "$EXIT" -eq 0 ] && [ "$DRY" -eq 1 ]; then echo "  RESULT: CPU DRY RUN PASSED (no GPU was checked)"
  elif [ "$EXIT" -eq 0 ]; then echo "  RESULT: PASS"
  elif [ "$EXIT" -eq 2 ]; then echo "  RESULT: CANNOT RUN HERE (exit 2): ${FAILED[*]:-precheck}"
  else echo "  RESULT: FAIL (exit $EXIT): ${FAILED[*]}"; fi
  if [ "$EXIT" -eq 2 ] && [ "${#STAGES[@]}" -le 1 ]; then
    # Nothing ran: keep no results directory in the tree (the summary went to $OUT when set).
    rm -rf "$RES"; rmdir bench/results/gpu 2>/dev/null
    [ -z "${OUT:-}" ] || echo "  summary: \$OUT/gpu_check_$STAMP/gpu_check.md"
  else
    echo "  results: $ROOT/$RES${OUT:+ (copied to \$OUT/gpu_check_$STAMP)}"
  fi
  exit "$EXIT"
}

# ----------------------------------------------------------------------------- 1. precheck
t0=$SECONDS
log "precheck: $PYTHON, torch, a visible CUDA GPU, nvcc"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  record precheck FAIL "$t0" "no $PYTHON on PATH (set PYTHON=...)"; finish 2
fi
probe=$(timeout 180 "$PYTHON" - 2>&1 <<'EOF'
import platform
print("python=" + platform.python_version())
try:
    import torch
except Exception as exc:
    print(f"error=torch is not importable: {type(exc).__name__}: {exc}")
    raise SystemExit(0)
from torch.utils import cpp_extension
print("torch=" + torch.__version__)
print("torch_cuda=" + str(torch.version.cuda))
print("cuda_home=" + str(cpp_extension.CUDA_HOME or ""))
if torch.version.cuda is None:
    print("error=this torch is a CPU-only build (torch.version.cuda is None)")
elif not torch.cuda.is_available():
    print("error=torch sees no CUDA GPU (torch.cuda.is_available() is False)")
else:
    p = torch.cuda.get_device_properties(0)
    print(f"gpu={p.name}")
    print(f"arch={p.major}.{p.minor}")
    print(f"gpu_mem={p.total_memory / 2**30:.0f} GiB")
    print(f"gpu_count={torch.cuda.device_count()}")
EOF
)
rc=$?
val() { printf '%s\n' "$probe" | sed -n "s/^$1=//p" | head -n 1; }
VERSIONS+=("Python $(val python) ($(command -v "$PYTHON"))")
if [ $rc -ne 0 ] || [ -z "$(val python)" ]; then
  printf '%s\n' "$probe" | tail -n 20 | sed 's/^/    | /'
  record precheck FAIL "$t0" "$PYTHON failed to start (exit $rc)"; finish 2
fi
if [ -n "$(val torch)" ]; then VERSIONS+=("torch $(val torch), built for CUDA $(val torch_cuda)"); fi
if [ -n "$(val error)" ] && [ "$DRY" -eq 1 ] && [ -n "$(val torch)" ]; then
  log "--cpu-dry-run: $(val error); going on without a GPU"
elif [ -n "$(val error)" ]; then
  echo "gpu_check: NO GPU CHECK POSSIBLE ON THIS MACHINE: $(val error)." >&2
  echo "gpu_check: it needs an NVIDIA GPU visible to a CUDA build of torch, and nvcc; nothing was built." >&2
  record precheck FAIL "$t0" "$(val error)"; finish 2
fi
CUDA_HOME=${CUDA_HOME:-$(val cuda_home)}
NVCC=$(command -v nvcc || true)
if [ -z "$NVCC" ] && [ -n "$CUDA_HOME" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then NVCC=$CUDA_HOME/bin/nvcc; fi
if [ -z "$NVCC" ] && [ "$DRY" -eq 1 ]; then
  NVCC=/bin/false
elif [ -z "$NVCC" ]; then
  echo "gpu_check: no nvcc (not on PATH, none under CUDA_HOME=${CUDA_HOME:-unset}): the CUDA extension cannot be built." >&2
  record precheck FAIL "$t0" "no nvcc (PATH, CUDA_HOME=${CUDA_HOME:-unset})"; finish 2
fi
if [ -z "$CUDA_HOME" ]; then CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$NVCC")")"); fi
export CUDA_HOME
NVCC_VERSION=$("$NVCC" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p' | head -n 1)
ARCH=${TORCH_CUDA_ARCH_LIST:-$(val arch)}
[ "$DRY" -eq 1 ] || VERSIONS+=("GPU: $(val gpu) (compute capability $(val arch), $(val gpu_mem), $(val gpu_count) visible)")
if command -v nvidia-smi >/dev/null 2>&1; then
  VERSIONS+=("nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)")
  VERSIONS+=("driver CUDA version: $(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -n 1)")
else
  VERSIONS+=("nvidia-smi: not found (driver version unknown)")
fi
VERSIONS+=("nvcc $NVCC_VERSION ($NVCC), CUDA_HOME=$CUDA_HOME; TORCH_CUDA_ARCH_LIST=$ARCH")
COMMIT=${TRPO_EXT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
DIRTY=""
if [ -z "${TRPO_EXT_COMMIT:-}" ] && git rev-parse HEAD >/dev/null 2>&1 && [ -n "$(git status --porcelain -- csrc trpo_ext tests setup.py 2>/dev/null)" ]; then
  DIRTY=" (with uncommitted changes)"
fi
DIGEST=$(find csrc trpo_ext tests setup.py pyproject.toml -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name '*.toml' \) 2>/dev/null \
  | LC_ALL=C sort | xargs sha256sum 2>/dev/null | sha256sum | cut -c1-16)
VERSIONS+=("trpo_ext commit $COMMIT$DIRTY; source digest $DIGEST (sha256 over csrc, trpo_ext, tests, setup.py, pyproject.toml)")
VERSIONS+=("host: $(uname -srm), $(nproc) cpus")
torch_major=$(val torch_cuda | cut -d. -f1)
nvcc_major=${NVCC_VERSION%%.*}
note="$(val gpu), sm_${ARCH/./}, nvcc $NVCC_VERSION"
[ "$DRY" -eq 0 ] || note="CPU DRY RUN: no GPU is checked"
if [ "$DRY" -eq 0 ] && [ -n "$nvcc_major" ] && [ "$torch_major" != "$nvcc_major" ]; then
  note="$note; WARNING: nvcc $NVCC_VERSION vs torch's CUDA $(val torch_cuda) (torch refuses a major mismatch)"
fi
record precheck PASS "$t0" "$note"
write_summary

# ----------------------------------------------------------------------------- 2. wheels
t0=$SECONDS
if [ -n "$WHEELS" ]; then
  SITE=${GPU_CHECK_SITE:-/tmp/site}
  log "wheels: $WHEELS/*.whl -> $SITE (pip --no-index --no-deps --target)"
  ok=1
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
      >"$RES/wheels.log" 2>&1 || ok=0
  fi
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  # $WHEELS/extra/: gymnasium's pure-Python dependencies, installed only where this Python lacks them.
  for whl in "$WHEELS"/extra/*.whl; do
    [ -e "$whl" ] || continue
    mod=$(basename "$whl" | cut -d- -f1)
    if ! "$PYTHON" -c "import $mod" >/dev/null 2>&1; then
      log "wheels: $mod missing here, installing $(basename "$whl")"
      "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$whl" \
        >>"$RES/wheels.log" 2>&1 || ok=0
    fi
  done
  # $WHEELS/build/: setuptools>=77 for the build, installed only where setuptools is missing or older.
  if ! "$PYTHON" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' >/dev/null 2>&1 \
    && compgen -G "$WHEELS/build/setuptools-*.whl" >/dev/null; then
    log "wheels: setuptools missing or < 77 here, installing $(basename "$WHEELS"/build/setuptools-*.whl)"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/build/setuptools-*.whl >>"$RES/wheels.log" 2>&1 || ok=0
  fi
  if [ $ok -eq 0 ]; then tail_of "$RES/wheels.log" 20; fi
fi
gym=$("$PYTHON" -c 'import gymnasium; print(gymnasium.__version__)' 2>&1 | tail -n 1)
if "$PYTHON" -c 'import gymnasium' >/dev/null 2>&1 && [ "${ok:-1}" -eq 1 ]; then
  record wheels PASS "$t0" "gymnasium $gym${WHEELS:+ (from $WHEELS)}"
else
  if [ -n "$WHEELS" ]; then where="wheels: $WHEELS, see wheels.log"; else where="no .whl/ and no --wheels"; fi
  record wheels FAIL "$t0" "gymnasium not importable ($where): $gym"
fi
VERSIONS+=("$("$PYTHON" - 2>&1 <<'EOF'
import importlib
out = []
for name in ["setuptools", "ninja", "pybind11", "pytest", "numpy", "gymnasium"]:
    try:
        out.append(f"{name} {importlib.import_module(name).__version__}")
    except Exception:
        out.append(f"{name} missing")
print(", ".join(out))
EOF
)")

# ----------------------------------------------------------------------------- 3. build
t0=$SECONDS
st_major=$("$PYTHON" -c 'import setuptools; print(setuptools.__version__.split(".")[0])' 2>/dev/null || echo 0)
if ! [ "$st_major" -ge 77 ] 2>/dev/null; then
  echo "gpu_check: setuptools $("$PYTHON" -c 'import setuptools; print(setuptools.__version__)' 2>&1 | tail -n 1) < 77:" \
    "pyproject.toml's PEP 639 license string (license = \"MIT\") fails to build." \
    "Put a setuptools>=77 wheel in .whl/ (installed into /tmp/site, ahead on PYTHONPATH)." >&2
  record build FAIL "$t0" "setuptools $st_major < 77 (PEP 639 license string); nothing built"
  finish 2
fi
# torch finds ninja by running `ninja --version`: put the interpreter's bin/ (a venv's pip-installed
# ninja) and the ninja package's own BIN_DIR on PATH, or it falls back to a slow serial build.
PATH=$(dirname "$(command -v "$PYTHON")"):$PATH
nbin=$("$PYTHON" -c 'import ninja; print(ninja.BIN_DIR)' 2>/dev/null || true)
[ -z "$nbin" ] || PATH=$PATH:$nbin
export PATH
if ! ninja --version >/dev/null 2>&1; then log "WARNING: no ninja on PATH: torch falls back to a serial, slow build"; fi
JOBS=$(nproc)
SUFFIX=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
rm -f "trpo_ext/_C$SUFFIX"  # never let a stale extension pass for this build
# Headers torch's CUDA headers include (cuBLAS, cuSPARSE, cuSOLVER) where the toolkit lacks them: the
# nvidia-* wheels torch depends on carry them (as in .ci/run).
if [ "$DRY" -eq 0 ] && [ ! -f "$CUDA_HOME/include/cublas_v2.h" ]; then
  for inc in $("$PYTHON" -c 'import site, glob; print(" ".join(sorted(glob.glob(site.getsitepackages()[0] + "/nvidia/*/include"))))' 2>/dev/null); do
    CPATH=${CPATH:+$CPATH:}$inc
  done
  export CPATH
  log "build: no cublas_v2.h under $CUDA_HOME/include; CPATH=${CPATH:-}"
fi
T=$(cap 360 200)
if [ "$DRY" -eq 1 ]; then buildenv=(TRPO_EXT_FORCE_CPU=1); else buildenv=(FORCE_CUDA=1 "TORCH_CUDA_ARCH_LIST=$ARCH"); fi
log "build: ${buildenv[*]} MAX_JOBS=$JOBS $PYTHON setup.py build_ext --inplace (timeout ${T}s, log build.log)"
env "${buildenv[@]}" MAX_JOBS="$JOBS" timeout -k 10 "$T" \
  "$PYTHON" setup.py build_ext --inplace >"$RES/build.log" 2>&1
rc=$?
if [ $rc -eq 0 ] && [ -f "trpo_ext/_C$SUFFIX" ]; then
  record build PASS "$t0" "trpo_ext/_C$SUFFIX"
  BUILT=1
else
  [ $rc -eq 124 ] && why="timed out after ${T}s" || why="exit $rc"
  [ $rc -eq 0 ] && why="exit 0 but no trpo_ext/_C$SUFFIX"
  echo "gpu_check: BUILD FAILED ($why); the end of $RES/build.log:" >&2
  grep -nE 'error|Error' "$RES/build.log" | head -n 20 | sed 's/^/    ! /'
  tail_of "$RES/build.log" 30
  record build FAIL "$t0" "$why, see build.log"
  BUILT=0
fi
write_summary

# ----------------------------------------------------------------------------- 4. import
t0=$SECONDS
if [ "$BUILT" -eq 1 ]; then
  out=$(GPU_CHECK_DEVICE=$([ "$DRY" -eq 1 ] && echo cpu || echo cuda) timeout 120 "$PYTHON" - 2>&1 <<'EOF'
import os

import gymnasium as gym
import torch
import trpo_ext
from trpo_ext import reference

device = os.environ["GPU_CHECK_DEVICE"]
print("trpo_ext from", trpo_ext.__file__, "cuda_built()", trpo_ext.cuda_built())
if device == "cuda":
    assert trpo_ext.cuda_built(), "the extension was built without its CUDA kernels (trpo_ext.cuda_built() is False)"
torch.manual_seed(0)
policy = trpo_ext.MLPPolicy(17, gym.spaces.Box(-1, 1, (6,)), (64, 64)).to(device)
obs = torch.randn(4096, 17, device=device)
v = torch.randn(sum(p.numel() for p in policy.parameters()), device=device)
y = trpo_ext.fvp(policy, obs, v, 0.1)
ref = reference.fvp(policy, obs, v, 0.1)
err = ((y - ref).norm() / ref.norm()).item()
print(f"{device} fvp vs reference, N=4096, float32: rel. error {err:.2e}")
assert err < 1e-4, f"the CUDA FVP disagrees with the reference: rel. error {err:.2e}"
EOF
)
  rc=$?
  printf '%s\n' "$out" | tail -n 15 | sed 's/^/    | /'
  if [ $rc -eq 0 ]; then
    record import PASS "$t0" "$(printf '%s\n' "$out" | grep -o 'cuda_built() [A-Za-z]*'); $(printf '%s\n' "$out" | grep 'rel. error' | sed 's/.*rel. error/FVP rel. error/')"
  else
    record import FAIL "$t0" "exit $rc: $(printf '%s\n' "$out" | grep -E 'Error|assert' | tail -n 1 | cut -c1-200)"
  fi
else
  record import SKIP "$t0" "build failed"
fi

# ----------------------------------------------------------------------------- 5. tests
t0=$SECONDS
if [ "$SKIP_TESTS" -eq 1 ]; then
  record tests SKIP "$t0" "--skip-tests"
elif [ "$BUILT" -ne 1 ]; then
  record tests SKIP "$t0" "build failed"
else
  T=$(cap 300 120)
  log "tests: $PYTHON -m pytest -q -p no:cacheprovider tests/ (timeout ${T}s, log pytest.log)"
  # SIGINT first: pytest then prints where it was and still writes junit.xml.
  timeout -s INT -k 20 "$T" "$PYTHON" -m pytest -q -p no:cacheprovider --junitxml="$RES/junit.xml" --durations=15 tests/ \
    >"$RES/pytest.log" 2>&1
  rc=$?
  counts=$("$PYTHON" - "$RES/junit.xml" 2>/dev/null <<'EOF'
import sys
import xml.etree.ElementTree as ET
cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
def has(c, tag):
    return c.find(tag) is not None
import re
# tests/test_cuda.py, and every test whose parameter id has a "cuda" part (the `device` fixture).
cuda = [c for c in cases if c.get("classname", "").endswith("test_cuda")
        or re.search(r"[\[-]cuda[\]-]", c.get("name", ""))]
ran = [c for c in cuda if not has(c, "skipped")]
bad = sum(has(c, "failure") or has(c, "error") for c in cases)
skipped = sum(has(c, "skipped") for c in cases)
print(f"{len(cases)} tests, {bad} failed/errors, {skipped} skipped; CUDA tests: {len(ran)} ran, {len(cuda) - len(ran)} skipped")
print(len(ran))
EOF
)
  cuda_ran=$(printf '%s\n' "$counts" | tail -n 1)
  counts=$(printf '%s\n' "$counts" | head -n 1)
  grep -E '^(FAILED|ERROR) ' "$RES/pytest.log" | head -n 30 | sed 's/^/    ! /'
  tail_of "$RES/pytest.log" 3
  if [ $rc -eq 0 ] && [ "${cuda_ran:-0}" -gt 0 ] 2>/dev/null; then
    record tests PASS "$t0" "$counts"
  elif [ $rc -eq 0 ] && [ "$DRY" -eq 1 ]; then
    record tests PASS "$t0" "$counts (CPU dry run)"
  elif [ $rc -eq 0 ]; then
    record tests FAIL "$t0" "pytest passed but no CUDA test ran (${counts:-no junit.xml})"
  elif [ $rc -eq 5 ]; then
    record tests FAIL "$t0" "pytest collected no tests (exit 5)"
  elif [ $rc -eq 124 ]; then
    record tests FAIL "$t0" "timed out after ${T}s (${counts:-no junit.xml})"
  else
    record tests FAIL "$t0" "pytest exit $rc: ${counts:-no junit.xml}, see pytest.log"
  fi
fi
write_summary

# ----------------------------------------------------------------------------- 6. bench
t0=$SECONDS
if [ "$SKIP_BENCH" -eq 1 ]; then
  record bench SKIP "$t0" "--skip-bench"
elif [ "$BUILT" -ne 1 ]; then
  record bench SKIP "$t0" "build failed"
elif [ "$(left)" -lt 60 ]; then
  record bench FAIL "$t0" "not run: $(left) s of the $BUDGET s budget left"
else
  if [ "$DRY" -eq 1 ]; then bargs=(--device cpu --threads 1 --sizes 256,1024 --hidden 16x16 --rounds 3)
  elif [ "$QUICK" -eq 1 ]; then bargs=(--device cuda --sizes 2048,65536 --hidden 64x64 --rounds 3)
  else bargs=(--device cuda --rounds 15); fi
  BB=$(($(left) - 45))  # the benchmark's own budget: it stops starting rounds and configurations
  T=$(($(left) - 10))
  log "bench: $PYTHON -m trpo_ext.benchmark --check ${bargs[*]} --time-budget $BB (timeout ${T}s, log bench.log)"
  timeout -s INT -k 10 "$T" "$PYTHON" -m trpo_ext.benchmark --check "${bargs[@]}" --time-budget "$BB" \
    --out "$RES/bench.md" >"$RES/bench.log" 2>&1
  rc=$?
  grep -E 'FAILED|problem|Error' "$RES/bench.log" | head -n 20 | sed 's/^/    ! /'
  if [ $rc -eq 0 ]; then
    record bench PASS "$t0" "bench.md"
  elif [ $rc -eq 124 ]; then
    record bench FAIL "$t0" "timed out after ${T}s; bench.md holds the configurations finished"
  else
    tail_of "$RES/bench.log" 15
    record bench FAIL "$t0" "exit $rc (failed methods or --check bounds), see bench.md / bench.log"
  fi
  if [ -f "$RES/bench.md" ]; then echo; cat "$RES/bench.md"; fi
fi

finish 0
