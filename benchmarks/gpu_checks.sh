#!/usr/bin/env bash
# One-GPU check of the fast pre-training path, sized for ~10 minutes on one H100/H200:
#   bash benchmarks/gpu_checks.sh            # from the repository root
# Writes under docs/results/gpu/ (override with OUT=...):
#   test_cuda.log        tests/test_cuda.py (CUDA paths, AMP, no host sync in the step)
#   step_eager.json      train_step images/s of aclus and byol at batch 32 / 192 / 256, 224 px, bf16 autocast
#                        (amp auto; byol, not lightly_byol: lightly needs hydra-core, whose antlr4 has no wheel)
#   step_compile.json    the same for aclus with amp.compile (torch.compile of the encoders)
#   loader.json          the DataLoader (in-memory frame cache, workers crop/flip/resize only)
#                        against the training images/s at batch 192
#   summary.md           the tables (bench_pretrain_step.py --render)
# Every part has its own time limit (timeout), so one slow part cannot eat the others' time;
# a part that runs out keeps what it wrote (the benchmark writes its JSON after each batch).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
WORKERS=${WORKERS:-$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))}
status=0
part() {  # part <seconds> <name> <command...>
    local limit=$1 name=$2; shift 2
    echo "=== $name (limit ${limit}s) ==="
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $(( SECONDS - t0 ))s ==="
    [ $rc -eq 0 ] || status=1
}

python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0), 'bf16:', torch.cuda.is_bf16_supported(including_emulation=False))"

# 1. tests/test_cuda.py (~2-3 min: torchrun pre-training with AMP and resume, A-SAM stages,
#    the sync-debug-mode step, bf16 vs fp32, on-device augmentation draws)
part 190 "tests/test_cuda.py" bash -c "python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs 2>&1 | tee '$OUT/test_cuda.log'; exit \${PIPESTATUS[0]}"

# 2. eager step, bf16 autocast, channels-last: aclus and byol at 3 batch sizes
part 100 "step, eager" python3 benchmarks/bench_pretrain_step.py --methods aclus,byol \
    --batches 32,192,256 --size 224 --steps 5 --warmup 2 --amp auto --json "$OUT/step_eager.json"

# 3. the same with torch.compile of the encoders (the first step of each batch size compiles;
#    its time is first_step_s in the JSON, dynamo's graph count beside it)
part 150 "step, compiled" python3 benchmarks/bench_pretrain_step.py --methods aclus \
    --batches 192,256,32 --size 224 --steps 5 --warmup 2 --amp auto --compile --json "$OUT/step_compile.json"

# 4. the loader with the in-memory cache vs the training step at batch 192
part 70 "loader" python3 benchmarks/bench_pretrain_step.py --methods aclus --batches 192 --size 224 \
    --steps 3 --warmup 1 --amp auto --loader --workers "$WORKERS" --loader_batches 20 --loader_images 96 \
    --json "$OUT/loader.json"

for f in step_eager step_compile loader; do
    [ -f "$OUT/$f.json" ] && python3 benchmarks/bench_pretrain_step.py --render "$OUT/$f.json"
done > "$OUT/summary.md"
cat "$OUT/summary.md"
echo "results in $OUT (exit $status)"
exit $status
