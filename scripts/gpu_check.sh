#!/usr/bin/env bash
# The accelerator check, on one GPU, in about 8 minutes (a deadline skips what is left):
#   1. the tests that make sense on one device (model, train step, evaluation,
#      checkpoints, several steps a dispatch), on the GPU;
#   2. the benchmark in float32 and bfloat16 at batch 128, 512 and 2048, with 1 and 8
#      steps a dispatch;
#   3. the PyTorch peer on the same GPU (fp32, bf16 autocast, compiled channels-last);
#   4. configs/mnist_best.py trained as shipped, timed, to its final test accuracy.
# Needs gpu_check/ from scripts/prepare_gpu_check.sh. Writes its logs and a summary
# under $OUT (default gpu_check/out). A trial of its flow on a CPU machine:
#   GPU_CHECK_PLATFORM=cpu GPU_CHECK_INSTALL=0 GPU_CHECK_SECONDS=120 scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check/out}
mkdir -p "$out"
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-470}))
export PYTHONPATH=$PWD DEEPDIGITS_MNIST_DIR=$PWD/gpu_check/mnist
mnist=gpu_check/mnist

# Runs "$@" with at most $1 seconds, and never past the deadline; logs to $out/$2.
step() {
  local limit=$1 log=$2; shift 2
  local left=$((deadline - SECONDS))
  if ((left < 20)); then echo "skipped (deadline): $*" >> "$out/$log"; return; fi
  ((limit > left)) && limit=$left
  echo "+ $*" >> "$out/$log"
  timeout "$limit" "$@" >> "$out/$log" 2>&1 || echo "exit $? after $SECONDS s: $*" >> "$out/$log"
}

platform=${GPU_CHECK_PLATFORM:-cuda}
if [[ ${GPU_CHECK_INSTALL:-1} == 1 ]]; then
  python -m pip install --no-index --no-deps --quiet gpu_check/wheels/*.whl > "$out/install.log" 2>&1
fi
nvidia-smi > "$out/machine.txt" 2>&1
python -c 'import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())' >> "$out/machine.txt" 2>&1

# 1. Tests on the GPU (those marked devices(8) skip there; the oneDNN ones are CPU-only).
step 150 tests.log env DEEPDIGITS_TEST_PLATFORM=$platform python -m pytest -q -p no:xdist \
  -o addopts="-m 'not slow'" tests/test_model.py tests/test_checkpointing.py \
  tests/test_evaluate.py tests/test_dispatch.py tests/test_train.py \
  -k 'not onednn'

bench() {  # dtype batch steps-a-dispatch
  step 60 benchmark.log env JAX_PLATFORMS=$platform python -m deepdigits.tools.benchmark --config=configs/mnist_tpu.py \
    --config.data_dir=$mnist --config.dtype=$1 --config.batch_size=$2 \
    --config.steps_per_dispatch=$3 --steps=64 --windows=5 --eval_batches=5
}
peer() {  # batch, then the peer's precision flags
  local batch=$1; shift
  local device=cuda; [[ $platform == cpu ]] && device=cpu
  step 75 torch.log python gpu_check/torch_baseline.py --device $device --batch-size "$batch" \
    --steps 200 --data $mnist "$@"
}

# 2-3. The batch of 512 first in every variant, then the other sizes.
for dtype in float32 bfloat16; do for k in 1 8; do bench $dtype 512 $k; done; done
peer 512 --precision fp32
peer 512 --precision bf16
peer 512 --precision bf16 --compile --channels-last
# 4. The shipped recipe, timed.
step 180 best.log bash -c "time JAX_PLATFORMS=$platform python main.py --config=configs/mnist_best.py \
  --workdir=$out/best --config.data_dir=$mnist --config.progress=False"
for batch in 128 2048; do for dtype in float32 bfloat16; do for k in 1 8; do
  bench $dtype $batch $k
done; done; done
for batch in 128 2048; do
  peer $batch --precision fp32
  peer $batch --precision bf16 --compile --channels-last
done

{
  echo "== machine"; cat "$out/machine.txt"
  echo "== tests"; tail -n 3 "$out/tests.log"
  echo "== ours (benchmark lines)"; grep -E '^(\+ |RESULT|train step)' "$out/benchmark.log"
  echo "== peer"; grep -E '^(\+ |RESULT)' "$out/torch.log"
  echo "== mnist_best"; grep -E '^epoch +12 |^real|exit' "$out/best.log"
  echo "== skipped or failed"; grep -hE '^(skipped|exit)' "$out"/*.log
  echo "== total $SECONDS s"
} > "$out/summary.txt"
cat "$out/summary.txt"
