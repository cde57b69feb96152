#!/usr/bin/env bash
# The replicate engine on a GPU against one CPU core (about 10 minutes).
#   bash benchmarks/gpu.sh [OUT_FILE]        (default benchmarks/results_gpu.jsonl)
# 1. installs jax[cuda12] at the pinned version (scripts/constraints.txt) when jax has no GPU backend;
# 2. runs the training workloads of `run.py --quick` on the GPU (correctness checked first, baselines skipped);
# 3. runs the same workloads on the CPU pinned to one core (taskset, one XLA thread);
# 4. appends one JSON line per workload: GPU and one-core seconds, the per-replicate speedup (goal >= 100x), the
#    GPU's achieved GFLOP/s and the fraction of its measured float32 matmul peak.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
out="${1:-benchmarks/results_gpu.jsonl}"
work="${TMPDIR:-/tmp}/qmis_gpu_bench.$$"
mkdir -p "$work"
if ! "$py" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  "$py" -m pip install --quiet -c scripts/constraints.txt "jax[cuda12]==0.9.2"
fi
"$py" -c 'import optax, flax, chex, sklearn' 2>/dev/null ||
  "$py" -m pip install --quiet -c scripts/constraints.txt optax flax chex scikit-learn
"$py" -c 'import jax; print("backend:", jax.default_backend(), jax.devices())'
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_PREALLOCATE=false
only="logistic_d128,logistic_d128_pool,mlp_d128"
timeout 400 "$py" benchmarks/run.py --quick --no-baselines --only "$only" --out "$work/gpu.jsonl"
JAX_PLATFORMS=cpu XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
  timeout 900 taskset -c 0 "$py" benchmarks/run.py --quick --no-baselines --only "$only" --out "$work/cpu1.jsonl"
"$py" - "$work/gpu.jsonl" "$work/cpu1.jsonl" "$out" <<'PY'
import json, sys
gpu = {r["workload"]: r for r in map(json.loads, open(sys.argv[1]))}
cpu = {r["workload"]: r for r in map(json.loads, open(sys.argv[2]))}
with open(sys.argv[3], "a") as fh:
    for name, g in gpu.items():
        c = cpu[name]
        per_gpu, per_cpu = g["seconds"] / g["replicates"], c["seconds"] / c["replicates"]
        line = {
            "workload": name, "device": g["device"], "replicates": g["replicates"],
            "gpu_seconds": g["seconds"], "one_cpu_core_seconds": c["seconds"],
            "per_replicate_speedup_vs_one_core": round(per_cpu / per_gpu, 1),
            "gpu_gflops": g["gflops"], "gpu_matmul_peak_gflops": g["peak_gflops"],
            "fraction_of_matmul_peak": round(g["gflops"] / g["peak_gflops"], 4),
            "compile_seconds": g["compile_seconds"], "jax": g["jax"],
        }
        print(json.dumps(line))
        fh.write(json.dumps(line) + "\n")
PY
rm -rf "$work"
echo "results appended to $out"
