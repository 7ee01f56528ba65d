#!/usr/bin/env bash
# One prepared device check for a single NVIDIA H200 with no network (< 8 minutes): teacher
# cache throughput (tokens/s, MFU) of a SmolLM2-135M-shaped RANDOM teacher writing a real
# N = 50 teacher store, and student train throughput (tokens/s, MFU) of a ~113M-parameter
# student, CE step vs RS-KD step, bfloat16 compute; then Qwen3-1.7B- and Gemma-3-1B-shaped
# random teachers in bfloat16 with attention "auto" (cuDNN flash attention on GPU), exported in
# their HF layout, loaded sharded, cached and trained (tokens/s, MFU). Prints one JSON object;
# with $OUT set it is also saved as $OUT/gpu_bench.json. Details: tools/gpu_bench.py.
#
#   bash tools/gpu_bench.sh --families none              # SmolLM2 cache + student train (< 8 min)
#   bash tools/gpu_bench.sh --skip-cache --skip-train    # the Qwen3 / Gemma 3 teachers only
#   bash tools/gpu_bench.sh --smoke    # tiny sizes on CPU, same code paths (tests/test_gpu_bench.py)
#
# The device image has jax (CUDA), flax, optax, orbax (hence PyYAML), tensorstore, but not
# grain, tokenizers, gguf or tqdm. This check imports none of grain / tokenizers / gguf; the
# rest travels as wheels in the ignored .whl/ folder, made here (Python 3.12, manylinux x86_64):
#
#   python3 -m pip download --only-binary=:all: --no-deps --python-version 3.12 \
#       --implementation cp --abi cp312 --platform manylinux2014_x86_64 \
#       --platform manylinux_2_17_x86_64 -d .whl tqdm pyyaml
#
# and installed at the start (skipped with --smoke, where the local environment is used).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
smoke=0
for arg in "$@"; do [[ "$arg" == "--smoke" ]] && smoke=1; done
if [[ $smoke == 0 ]] && compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# XLA: no preallocation of 75% of HBM (the store writer and the forward check share it).
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
exec "$PYTHON" tools/gpu_bench.py "$@"
