#!/usr/bin/env bash
# One command for a fresh GPU machine that has torch but no network (see README, "GPU tier"):
#   bash tools/gpu_check.sh WHEEL_DIR OUT_DIR [all|bench|tier]
# 1. installs the wheels in WHEEL_DIR whose packages are missing (megatron-core at least) into a private
#    folder put first on PYTHONPATH, where an earlier call's stay: nothing already installed, there or
#    here, is replaced (env.txt names the megatron-core used, and warns if its version is not the wheel's);
# 2. bench: tools/bench_train.py with its HF baseline (length-grouped: the faster one; random order was
#    measured beside it, README), ours with 16 micro-batches a step (about EVE's SFT global batch on one
#    GPU) at 16, 12, 8 and 4 layers, deepest first, then liger-kernel's RMSNorm and the compiled one
#    each between two runs of ours (--try liger-rmsnorm compiled-rmsnorm: put liger-kernel's wheel in
#    WHEEL_DIR; the other levers' gains were measured in earlier calls: README) and, if one gains over
#    1%, 16 layers with 16 micro-batches and the better on (--combine --combine-only-deepest), then
#    ours at 8, 12 and 16 layers with the main run's 4 micro-batches (the 16-layer one profiled too,
#    after the main run's profile); then tools/bench_pel.py
#    (the PEL's flat path vs per-shape, and given the loader's plan);
#    tier: the GPU test tier (pytest -m gpu tests/gpu, the trainer's tests first);
#    all (the default): both, in that order, what matters most first;
# 3. writes into OUT_DIR eight files, as many as a device call brings back: env.txt, gpu_tests.log,
#    bench.log, bench.json, profile.txt, pel.log, pel.json and summary.json (tests passed / failed with
#    the failing tests' names, read from the tier's JUnit XML kept outside OUT_DIR; tokens/s, TFLOP/s,
#    MFU, peak memory, speed-up; the PEL figures under "pel_bench").
# A device call runs 10 minutes at most, and a session's device time is 15 minutes in all (the machine's
# start, its idle time and every call together). On an H100 the bench with its deeper runs and the tier
# (~6.5 min, 26 tests) do not fit in one call: run `bench`, then `tier`, two calls on the warm machine:
#   call 1 (timeout_s 360):  bash tools/gpu_check.sh .whl $OUT bench
#   then the device tool's `status`: budget_left_s B (what call 2 really has);
#   call 2 (timeout_s B-30): GPU_CHECK_BUDGET=$((B-45)) bash tools/gpu_check.sh .whl $OUT tier
# `bench` keeps limits of 285 + 25 s within a 330 s budget; `tier` paces itself to GPU_CHECK_BUDGET
# (390 s without it). `all` keeps one call's limits (235 + 325 + 20 s), so its bench and tier may be
# cut; bench.json is written after every figure, so a step stopped at its limit keeps what it measured,
# and the tier's log names the test it stopped in. Whatever the wheel install and start-up took, each
# step is also cut to end within the call's budget (GPU_CHECK_BUDGET, or all 580, bench 330, tier 390 s
# from the start, 10 s kept for the summary): summary.json is always written before the call's own
# timeout. Without CUDA it refuses (a CPU would bench a tiny fp32 model) unless GPU_CHECK_ALLOW_CPU=1.
# Overrides: TIER_TIMEOUT, BENCH_TIMEOUT, PEL_TIMEOUT (seconds; 0 skips the step), GPU_CHECK_BUDGET
# (seconds: the call's real limit less ~15 s), GPU_CHECK_ALLOW_CPU=1, TIER_ARGS (extra pytest args),
# BENCH_ARGS, PEL_ARGS.
set -uo pipefail
[ $# -eq 2 ] || [ $# -eq 3 ] || { echo "usage: bash tools/gpu_check.sh WHEEL_DIR OUT_DIR [all|bench|tier]" >&2; exit 2; }
case "${3:-all}" in
  all)   limits=(235 325 20); budget=580 ;;
  bench) limits=(285 0 25); budget=330 ;;
  tier)  limits=(0 375 0); budget=390 ;;
  *) echo "unknown part ${3}: all, bench or tier" >&2; exit 2 ;;
esac
WHEELS=$(cd "$1" && pwd) || { echo "no wheel folder $1" >&2; exit 2; }
mkdir -p "$2" && OUT=$(cd "$2" && pwd)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
started=$(date +%s)
deadline=$(( started + ${GPU_CHECK_BUDGET:-$budget} - 10 ))  # the steps end by then; the summary after
JUNIT=$(mktemp -d)/gpu_tests.xml

# $SITE on the path first: what an earlier call on this machine installed there is not installed again.
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ] || "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
  || { echo "no CUDA device (torch.cuda.is_available() is False): GPU_CHECK_ALLOW_CPU=1 runs on the CPU" >&2; exit 2; }

# "install WHEEL" for each wheel whose package is missing; "warning: ..." for one installed at another version.
wheels=$("$PYTHON" - "$WHEELS" <<'PY'
import importlib.metadata as md, pathlib, re, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name, wanted = wheel.name.split("-")[:2]
    name = re.sub(r"[-_.]+", "-", name).lower()
    try:
        installed = md.version(name)
    except md.PackageNotFoundError:
        print("install", wheel)
        continue
    try:
        from packaging.version import Version
        same = Version(installed) == Version(wanted)
    except Exception:  # no packaging, or a version it cannot read
        same = installed == wanted
    if not same:
        print(f"warning: {name} {installed} is already installed and used, not {wheel.name}'s {wanted}")
PY
)
missing=$(sed -n 's/^install //p' <<<"$wheels")
warnings=$(grep '^warning: ' <<<"$wheels")
if [ -n "$missing" ]; then
  echo "installing: $missing"
  # shellcheck disable=SC2086
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $missing \
    || { echo "wheel install failed" >&2; exit 1; }
fi

{ date -u; echo "installed from $WHEELS: ${missing:-nothing (all present)}"; [ -z "$warnings" ] || echo "$warnings"
  echo "part ${3:-all}: budget: ${GPU_CHECK_BUDGET:-$budget} s; limits: bench ${BENCH_TIMEOUT:-${limits[0]}}," \
    "tier ${TIER_TIMEOUT:-${limits[1]}}, pel ${PEL_TIMEOUT:-${limits[2]}} s"
  nvidia-smi 2>&1 | head -20
  "$PYTHON" -c 'import torch, megatron.core as m; print("torch", torch.__version__, "cuda", torch.version.cuda,
"device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print("megatron-core", m.__version__, "from", m.__file__.rsplit("/megatron/", 1)[0])'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# step LIMIT LOG COMMAND...: COMMAND under LIMIT seconds (less if the budget has less left), its
# output also in LOG; LIMIT 0 skips it.
step() {
  local limit=$1 log=$2 left=$(( deadline - $(date +%s) )); shift 2
  if [ "$limit" -eq 0 ]; then echo "skipped (limit 0)" | tee "$log"; return 0; fi
  if [ "$left" -le 0 ]; then echo "skipped (no time left in the call's budget)" | tee "$log"; return 124; fi
  [ "$limit" -le "$left" ] || { echo "cut to ${left} s (the call's budget)"; limit=$left; }
  timeout "$limit" "$@" 2>&1 | tee "$log"
  return "${PIPESTATUS[0]}"
}

bench_start=$(date +%s)
# shellcheck disable=SC2086
step "${BENCH_TIMEOUT:-${limits[0]}}" "$OUT/bench.log" "$PYTHON" tools/bench_train.py \
  ${BENCH_ARGS:---layers 4 --seq-length 4096 --steps 10 --baseline hf --hf-order length-grouped \
  --also-micro-batches 16 --also-layers 8 12 16 --profile-deepest --try liger-rmsnorm compiled-rmsnorm \
  --combine --combine-only-deepest} \
  --json "$OUT/bench.json" --profile "$OUT"
bench_rc=$?
bench_seconds=$(( $(date +%s) - bench_start ))

tier_start=$(date +%s)
# shellcheck disable=SC2086
step "${TIER_TIMEOUT:-${limits[1]}}" "$OUT/gpu_tests.log" "$PYTHON" -m pytest -m gpu tests/gpu -v -rfEs -p no:cacheprovider \
  --durations=0 --junitxml="$JUNIT" ${TIER_ARGS:-}
tier_rc=$?
tier_seconds=$(( $(date +%s) - tier_start ))

pel_start=$(date +%s)
# EVE-7B's PEL (width 1024, 672 px), 2 micro-batches of 24 crops, 5 timed steps: 13 s on an H100
# (the CPU path is skipped: too slow at this width).
# shellcheck disable=SC2086
step "${PEL_TIMEOUT:-${limits[2]}}" "$OUT/pel.log" "$PYTHON" tools/bench_pel.py \
  ${PEL_ARGS:---devices cuda --images 24 --batches 2 --steps 5} --json "$OUT/pel.json"
pel_rc=$?
pel_seconds=$(( $(date +%s) - pel_start ))

# A write killed before its rename (bench.json's) leaves its temporary: a device call brings back 8 files at most.
rm -f "$OUT"/*.tmp*
"$PYTHON" tools/gpu_check_summary.py "$OUT" --junit "$JUNIT" --tier-rc "$tier_rc" --tier-seconds "$tier_seconds" \
  --bench-rc "$bench_rc" --bench-seconds "$bench_seconds" --pel-rc "$pel_rc" --pel-seconds "$pel_seconds" \
  --total-seconds $(( $(date +%s) - started ))
[ "$tier_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$pel_rc" -eq 0 ]
