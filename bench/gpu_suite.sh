#!/usr/bin/env bash
# The training-step benchmarks for a lent GPU, in one call (BENCHMARKS.md, "GPU").
#
#   OUT=/tmp/gpu bash bench/gpu_suite.sh            # writes $OUT/gpu_suite.json and $OUT/log.txt
#
# Runs on the GPU machine's own JAX (no venv there): gin-config, which it lacks, comes from
# wheels in .whl/ when present (`pip download --no-deps --only-binary=:all: -d .whl
# gin-config==0.5.0`; flax/optax wheels in .whl/alt/ are the fallback when the machine's do
# not fit this code). With the device tool: run with carry [".whl"]. Each run is a separate
# process under a time limit, so an out-of-memory batch costs one row, not the suite. Rows: the bfloat16 matmul ceiling, then
# bench/train_step.py for RUNS (config dtype batch remat), largest expected MFU first.
set -u
OUT=${OUT:-/tmp/gpu_suite}
rm -rf /tmp/gpu_rows; mkdir -p "$OUT" /tmp/gpu_rows
cd "$(dirname "$0")/.."
install_wheels() {  # the wheels in folder $1 onto PYTHONPATH
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$1"/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}
if ls .whl/*.whl >/dev/null 2>&1; then install_wheels .whl; fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
LOG="$OUT/log.txt"
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} 2>&1 | tee -a "$LOG"

# A smoke run; where the machine's flax/optax do not fit this code, retry with the pinned ones
# from .whl/alt/.
smoke() {
  timeout 120 python3 bench/train_step.py --config gin_configs/models/pali_tiny.gin \
    --image_size 32 --steps 1 --warmup 1 >/tmp/smoke.txt 2>&1
}
if ! smoke; then
  tail -n 15 /tmp/smoke.txt | tee -a "$LOG"
  echo "smoke failed: retrying with .whl/alt" | tee -a "$LOG"
  install_wheels .whl/alt
  smoke || { tail -n 30 /tmp/smoke.txt | tee -a "$LOG"; exit 1; }
fi
echo "smoke ok" | tee -a "$LOG"

# The ceiling: a bf16 n^3 matmul (f32 accumulation, bf16 out), median of 20 after warm-up.
python3 - <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, time, jax, jax.numpy as jnp
n = 8192
keys = jax.random.split(jax.random.key(0), 4)
xs = [jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys]
mm = jax.jit(lambda a, b: a @ b)
for a, b in zip(xs, xs[1:]): mm(a, b).block_until_ready()
times = []
for i in range(20):
  a, b = xs[i % 3], xs[i % 3 + 1]
  t0 = time.perf_counter(); mm(a, b).block_until_ready(); times.append(time.perf_counter() - t0)
times.sort()
tf = 2 * n ** 3 / times[len(times) // 2] / 1e12
print(f"bf16 matmul {n}^3: {tf:.0f} TFLOP/s (median of 20)")
json.dump({"n": n, "tflop_per_s": tf}, open("/tmp/gpu_rows/matmul.json", "w"))
EOF

# Rows: config dtype batch remat [extra...]; an extra `xla=FLAGS` sets XLA_FLAGS for the run,
# any other extra is a gin binding (no spaces). Ordered so that a short lease gets the
# measured best first, then what BENCHMARKS.md "GPU" lists as not yet measured.
# pali_small float32 (unrolled layers) printed nothing within 150 s on an H200: not listed.
RUNS=${RUNS:-"pali_xl bfloat16 32 dots
pali_xl bfloat16 64 dots
pali_xl bfloat16 32 dots xla=--xla_gpu_enable_triton_gemm=false
pali_large bfloat16 32 none
pali_xl bfloat16 32 dots ViTConfig.scan=False T5Config.scan=False"}
i=0
while read -r config dtype batch remat extras; do
  [ -z "$config" ] && continue
  i=$((i + 1))
  xla="" bindings=()
  for e in $extras; do
    case "$e" in
      xla=*) xla="${e#xla=}" ;;
      *) bindings+=(--gin_bindings "$e") ;;
    esac
  done
  echo "=== $config $dtype batch $batch remat $remat $extras" | tee -a "$LOG"
  XLA_FLAGS="${xla:-${XLA_FLAGS:-}}" timeout "${RUN_TIMEOUT:-150}" python3 bench/train_step.py \
    --config "gin_configs/models/$config.gin" --dtype "$dtype" --batch "$batch" \
    --input_len 64 --target_len 64 --steps "${STEPS:-8}" --warmup 2 \
    --gin_bindings "ViTConfig.remat_policy = '$remat'" \
    --gin_bindings "T5Config.remat_policy = '$remat'" "${bindings[@]}" \
    --json "/tmp/gpu_rows/run$i.json" \
    2>&1 | grep -v -E "^\s*$|TfrtCpu|cuda_dnn|computation_placer" | tail -n 25 | tee -a "$LOG"
done <<< "$RUNS"

python3 - "$OUT/gpu_suite.json" <<'EOF'
import glob, json, sys
rows = {p: json.load(open(p)) for p in sorted(glob.glob("/tmp/gpu_rows/*.json"))}
json.dump(rows, open(sys.argv[1], "w"), indent=1, default=str)
print("| config | dtype | batch | bindings | xla_flags | median_step_s | tflop/s | mfu | compile_s | temp_gib | peak_gib |")
for p, r in rows.items():
  for x in r.get("results", []):
    extra = " ".join(b for b in x["gin_bindings"] if "remat_policy" not in b)
    print(f"| {x['config']} | {x['dtype']} | {x['batch']} | {extra} | "
          f"{r['machine']['xla_flags']} | {x['median_step_s']:.4f} | "
          f"{x['achieved_gflop_per_s'] / 1e3:.0f} | {x['mfu']:.3f} | {x['compile_s']:.0f} | "
          f"{x['xla_temp_gib']:.1f} | {x['device_peak_gib']:.1f} |")
EOF
