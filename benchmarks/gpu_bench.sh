#!/usr/bin/env bash
# FCNet benchmark on a lent GPU machine: one prepared run (see BENCHMARKS.md).
#
#   benchmarks/gpu_bench.sh [MODE]
#
# MODE (each step writes $OUT/<step>.json and $OUT/<step>.log; the JSON is rewritten after every variant, so a
# step stopped by its time limit keeps what it measured):
#   targets   (default) R101 in bf16: training at batch 8 and 32 (+ HLO report and a 3-step profile summary of
#             batch 32), inference at batch 1 (+ profile) and 32, the bf16 matmul peak — the R101 targets. Four
#             compiles of R101: 292 s in all on an H200 (2026-11-26); STEP_LIMIT_S (540 s) keeps it inside one call.
#   fp32      R101 in fp32: training 8 and 32, inference 1 and 32, the fp32 matmul peak.
#   diagnose  R101 bf16 at batch 32: per-stage forward and forward+backward times, a 3-step profile summary.
#   swinb     Swin-B (configs/refcoco_swinb.py) in bf16: training at batch 8 and 32, inference at batch 1 and 32
#             (peak memory with each); SWINB_CONFIG overrides the config.
#   all       tiny with its full matrix, then R101 with everything above in one process, then Swin-B (~20 min or more).
#   smoke     tiny only, its full matrix (bf16 and fp32, batches 8/32 and 1/32).
#
# The machine has JAX, Flax, Optax and Orbax but neither TensorFlow (not needed) nor clu / ml_collections: carry
# their pure-Python wheels in .whl/ (ignored by git), made once here with
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps -d .whl ml-collections==1.1.0 clu==0.0.12
#   git rev-parse HEAD > .whl/COMMIT        # the device copy has no .git; the JSON records this commit
# and run, through the device tool: command "bash benchmarks/gpu_bench.sh targets", carry [".whl"].
#
# Environment: OUT (results folder; default /tmp/fcnet_bench), PYTHON (default python3), STEP_LIMIT_S (time
# limit of each R101 / Swin-B step; default 540), BENCH_CONFIG (the config of the "R101" steps; default
# configs/refcoco_r101.py — configs/tiny.py dry-runs every mode on a CPU), SWINB_CONFIG (of the Swin-B steps; default
# configs/refcoco_swinb.py — configs/tiny_swin.py dry-runs them).
set -uo pipefail

mode="${1:-targets}"
out="${OUT:-/tmp/fcnet_bench}"
py="${PYTHON:-python3}"
step_limit="${STEP_LIMIT_S:-540}"
out="$(mkdir -p "$out" && cd "$out" && pwd)" || exit 1
cd "$(dirname "$0")/.." || exit 1

case "$mode" in
  targets|fp32|diagnose|swinb|all|smoke) ;;
  *) echo "gpu_bench.sh: unknown MODE '$mode' (targets, fp32, diagnose, swinb, all, smoke)" >&2; exit 2 ;;
esac

if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fcnet_site \
    .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/fcnet_site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ -z "${FCNET_COMMIT:-}" ]]; then
  # .whl/COMMIT first: the device tool's copy of the tree can carry a .git of an older commit.
  FCNET_COMMIT="$(cat .whl/COMMIT 2>/dev/null || git rev-parse HEAD 2>/dev/null || true)"
  export FCNET_COMMIT
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3

"$py" - <<'EOF' || exit 1
import sys
import jax, flax, optax, clu, ml_collections  # Fails here, clearly, when a wheel is missing.
print(f"python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
      f"devices {jax.devices()}")
EOF
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
  --format=csv,noheader

failures=0
bench() {  # bench STEP LIMIT_S ARGS... : one benchmark process, its log and JSON under $out.
  local step=$1 limit=$2
  shift 2
  echo "=== $step: $* (limit ${limit} s)"
  timeout --signal=INT --kill-after=30 "$limit" "$py" -m fcnet_jax.tools.benchmark --out="$out/$step.json" "$@" \
    > "$out/$step.log" 2>&1
  local rc=$?
  grep '^\[benchmark\]' "$out/$step.log" || true
  if [[ $rc -ne 0 ]]; then
    failures=$((failures + 1))
    echo "--- $step exited with $rc (124/130: time limit); last lines of $out/$step.log:"
    tail -n 15 "$out/$step.log"
  fi
}

r101=(--config="${BENCH_CONFIG:-configs/refcoco_r101.py}")
swinb=(--config="${SWINB_CONFIG:-configs/refcoco_swinb.py}")
case "$mode" in
  targets)
    bench r101_bf16 "$step_limit" "${r101[@]}" --dtypes=bfloat16 --sections=train,infer,matmul --hlo_report \
      --profile_dir=/tmp/fcnet_profile --profile_steps=3
    ;;
  fp32)
    bench r101_fp32 "$step_limit" "${r101[@]}" --dtypes=float32 --sections=train,infer,matmul
    ;;
  diagnose)
    bench r101_diagnose "$step_limit" "${r101[@]}" --dtypes=bfloat16 --train_batch_sizes=32 \
      --infer_batch_sizes=32 --sections=train,stages,matmul --stage_modes=infer,train --hlo_report \
      --profile_dir=/tmp/fcnet_profile --profile_steps=3
    ;;
  swinb)
    bench swinb_bf16 "$step_limit" "${swinb[@]}" --dtypes=bfloat16 --sections=train,infer
    ;;
  all)
    bench tiny 300 --config=configs/tiny.py
    bench r101_all 3600 "${r101[@]}" --sections=train,infer,matmul,stages --stage_modes=infer,train \
      --hlo_report --profile_dir=/tmp/fcnet_profile
    bench swinb_all 3600 "${swinb[@]}" --sections=train,infer,stages --stage_modes=infer,train
    ;;
  smoke)
    bench tiny 300 --config=configs/tiny.py
    ;;
esac

# The short table last: every result of this run.
"$py" - "$out" <<'EOF'
import glob, json, os, sys
from fcnet_jax.tools.benchmark import report
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
  with open(path) as f:
    print(f"\n# {os.path.basename(path)}\n{report.format_table(json.load(f))}")
EOF
exit $((failures > 0))
