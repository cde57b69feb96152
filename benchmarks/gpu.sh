#!/usr/bin/env bash
# Run the quick benchmark on a GPU machine (about 5 minutes): installs jax[cuda12] when jax has no GPU backend,
# then writes the JSON lines to the file given as first argument (default benchmarks/results_gpu.jsonl).
#   bash benchmarks/gpu.sh [OUT_FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
out="${1:-benchmarks/results_gpu.jsonl}"
if ! "$py" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  "$py" -m pip install --quiet "jax[cuda12]"
fi
"$py" -c 'import optax, flax, chex, sklearn' 2>/dev/null || "$py" -m pip install --quiet optax flax chex scikit-learn
"$py" -c 'import jax; print("backend:", jax.default_backend(), jax.devices())'
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout 290 "$py" benchmarks/run.py --quick --out "$out"
echo "results appended to $out"
