#!/usr/bin/env bash
# The GPU path in one script, for a machine with one or more CUDA devices (under 10 minutes on
# one H100-class GPU): what no CPU test can show.
#
#   bash tools/gpu_check.sh [OUT_DIR]
#
#  1. the default job (configs/gpt_tiny_cpu.yaml) in bf16: it trains, and the DeepSpeed config
#     it wrote accumulates and reduces gradients in fp32;
#  2. tools/bench_train.py on the 1.3B shape (configs/gpt_1.3b.yaml, one micro-batch of 2048
#     tokens per step, bf16): the trainer's step against plain PyTorch, TFLOP/s and MFU;
#  3. bf16 against fp32 on the default model: per-step loss difference over 100 steps;
#  4. fp16 with dynamic loss scaling for 50 steps: it finishes (loss-scale skips are not
#     non-finite steps) and the loss falls;
#  5. TP2 in bf16 against the single-GPU bf16 run, when two devices are visible;
#  6. document masking's GPU kernel (FlexAttention with a block mask, compiled) against the
#     dense-mask SDPA path, forward and backward, in fp32 and bf16 (the CPU tests can check
#     only FlexAttention's forward: its backward is GPU-only);
#  7. CP2 (the ring attention over NCCL) with packed documents in bf16 against the same run
#     on one GPU, when two devices are visible.
# Each check prints its numbers and PASS or FAIL; the script exits 1 if any failed and 2 when
# no CUDA device is visible (it checks nothing on a CPU). OUT_DIR keeps the run directories
# (default: a new temporary directory); the built-in corpus is cached under it.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python}
DEEPSPEED=${DEEPSPEED:-deepspeed}

GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null)
if [[ -z "$GPUS" || "$GPUS" -eq 0 ]]; then
    echo "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); this" \
         "script checks the GPU path and needs a machine with a GPU" >&2
    exit 2
fi
OUT=${1:-$(mktemp -d -t gpu_check-XXXXXX)}
mkdir -p "$OUT"
CACHE="$OUT/data_cache"
FAILED=()
echo "gpu_check: $GPUS CUDA device(s): $("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))"); output in $OUT"

run() {  # run NAME SECONDS COMMAND...: a bounded step, its log in OUT/NAME.log
    local name=$1 seconds=$2
    shift 2
    echo "== $name"
    local start=$SECONDS
    timeout "$seconds" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - start)) s (log: $OUT/$name.log)"
    if [[ $rc -ne 0 ]]; then
        tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
        FAILED+=("$name")
        return 1
    fi
}

verdict() {  # verdict NAME [ARGS...]: a Python check on stdin, given OUT and ARGS; it prints
    # numbers, exits 0 for PASS
    if "$PYTHON" - "$OUT" "${@:2}"; then echo "   PASS $1"; else echo "   FAIL $1"; FAILED+=("$1"); fi
}

tracks_one_gpu() {  # tracks_one_gpu NAME REFERENCE RUN WHAT: RUN's logged losses within 0.1 of
    # REFERENCE's (a layout against its one-GPU run, both bf16), and RUN's tokens/s
    verdict "$1" "$2" "$3" "$4" <<'EOF'
import sys
from magneto_dist.training.metrics_file import read_metrics
out, reference, run, what = sys.argv[1:5]
one = [r["loss"] for r in read_metrics(f"{out}/{reference}", "train")]
got = [r["loss"] for r in read_metrics(f"{out}/{run}", "train")]
diffs = [abs(a - b) for a, b in zip(one, got)]
print(f"   |{what} - 1 GPU| max {max(diffs):.4f} over {len(diffs)} logged steps; "
      f"{read_metrics(f'{out}/{run}', 'train')[-1]['tokens_per_s']:,.0f} tokens/s")
sys.exit(0 if len(one) == len(got) and max(diffs) < 0.1 else 1)
EOF
}

train() {  # train NAME GPUS SECONDS OVERRIDES...: launch/pretrain_gpt.py under deepspeed
    local name=$1 gpus=$2 seconds=$3
    shift 3
    run "$name" "$seconds" "$DEEPSPEED" --num_gpus "$gpus" launch/pretrain_gpt.py \
        "data.cache_dir=$CACHE" "logging.run_dir=$OUT/$name" "logging.tensorboard=false" "$@"
}

# 1. the default job in bf16
if train default_bf16 1 180 train.precision=bf16 train.train_iters=100 train.eval_interval=0; then
    verdict default_bf16 <<'EOF'
import json, math, sys
from magneto_dist.training.metrics_file import read_metrics
out = sys.argv[1]
rows = read_metrics(f"{out}/default_bf16", "train")
ds = json.load(open(f"{out}/default_bf16/deepspeed_config.json"))
print(f"   loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f} in {rows[-1]['step']} steps, "
      f"{rows[-1]['tokens_per_s']:,.0f} tokens/s, grad_accum_dtype "
      f"{ds['data_types']['grad_accum_dtype']}, communication {ds['communication_data_type']}")
ok = (all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"] - 1.0
      and ds["data_types"]["grad_accum_dtype"] == "fp32" and ds["communication_data_type"] == "fp32")
sys.exit(0 if ok else 1)
EOF
fi

# 2. the 1.3B shape's throughput and MFU (one GPU: one micro-batch of 4 x 2048 per step)
if run bench_1.3b 420 "$PYTHON" tools/bench_train.py --config configs/gpt_1.3b.yaml \
        --rounds 3 --steps 3 --warmup 2 "data.cache_dir=$CACHE" train.global_batch_size=4; then
    grep -E "^(device|loop|plain|trainer|overhead)" "$OUT/bench_1.3b.log" | sed 's/^/   /'
    verdict bench_1.3b <<'EOF'
import re, sys
log = open(f"{sys.argv[1]}/bench_1.3b.log").read()
trainer = re.search(r"^trainer\s+([\d.]+)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)%", log, re.M)
overhead = re.search(r"^overhead: ([\d.]+)x", log, re.M)
if not (trainer and overhead):
    print("   no trainer MFU or overhead line in the bench output")
    sys.exit(1)
print(f"   trainer {float(trainer.group(3)):.1f} TFLOP/s, MFU {trainer.group(4)}%, overhead "
      f"{overhead.group(1)}x (a benchmark: reported, not judged)")
EOF
fi

# 3. bf16 tracks fp32 on the default model
if train track_fp32 1 180 train.train_iters=100 train.eval_interval=0 &&
   train track_bf16 1 180 train.precision=bf16 train.train_iters=100 train.eval_interval=0; then
    verdict bf16_tracks_fp32 <<'EOF'
import sys
from magneto_dist.training.metrics_file import read_metrics
out = sys.argv[1]
fp32 = [r["loss"] for r in read_metrics(f"{out}/track_fp32", "train")]
bf16 = [r["loss"] for r in read_metrics(f"{out}/track_bf16", "train")]
diffs = [abs(a - b) for a, b in zip(fp32, bf16)]
print(f"   final loss fp32 {fp32[-1]:.4f}, bf16 {bf16[-1]:.4f}; |bf16 - fp32| max {max(diffs):.4f},"
      f" mean {sum(diffs) / len(diffs):.4f} over {len(diffs)} logged steps")
sys.exit(0 if len(fp32) == len(bf16) and max(diffs) < 0.2 and sum(diffs) / len(diffs) < 0.05
         else 1)
EOF
fi

# 4. fp16 with dynamic loss scaling, 50 steps
if train fp16 1 180 train.precision=fp16 train.train_iters=50 train.eval_interval=0; then
    verdict fp16_loss_scaling <<'EOF'
import math, sys
from magneto_dist.training.metrics_file import read_metrics
rows = read_metrics(f"{sys.argv[1]}/fp16", "train")
skipped = sum(r.get("skipped_steps", 0) for r in rows)
print(f"   loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f} in {rows[-1]['step']} steps, "
      f"{skipped} loss-scale skips")
sys.exit(0 if rows[-1]["step"] == 50 and math.isfinite(rows[-1]["loss"])
         and rows[-1]["loss"] < rows[0]["loss"] - 0.5 else 1)
EOF
fi

# 5. TP2 against the single-GPU bf16 run
if [[ "$GPUS" -ge 2 ]]; then
    if train tp2_bf16 2 180 train.precision=bf16 train.train_iters=100 train.eval_interval=0 \
            parallel.tensor_model_parallel_size=2; then
        tracks_one_gpu tp2_tracks_one_gpu track_bf16 tp2_bf16 "TP2 (bf16)"
    fi
else
    echo "== tp2_bf16: skipped (one CUDA device visible)"
fi

# 6. FlexAttention (the GPU's document mask) against the dense mask, forward and backward
if run flex_documents 300 "$PYTHON" -c '
import torch
from magneto_dist.model.attention import Documents, DotProductAttention
g = torch.Generator(device="cuda").manual_seed(0)
ids = torch.cat([torch.full((n,), i) for i, n in enumerate([300, 700, 1048])]).cuda()[None]
for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
    q, k, v, w = (torch.randn(1, 8, 2048, 64, device="cuda", generator=g).to(dtype)
                  for _ in range(4))
    outs, grads = [], []
    for flex in (False, True):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = DotProductAttention(flex=flex)(*inputs, causal=True, documents=Documents(ids))
        (out.float() * w.float()).sum().backward()
        outs.append(out.float())
        grads.append([t.grad.float() for t in inputs])
    diff = max([(outs[0] - outs[1]).abs().max().item()]
               + [(a - b).abs().max().item() for a, b in zip(*grads)])
    print(f"   {dtype}: |flex - dense| max {diff:.2e} (output and q/k/v gradients)")
    assert diff < tol, (dtype, diff)
'; then
    sed 's/^/   /' "$OUT/flex_documents.log" | grep "flex - dense"
    echo "   PASS flex_documents"
fi

# 7. CP2 with packed documents against one GPU (bf16)
if [[ "$GPUS" -ge 2 ]]; then
    DOCS=(data.reset_attention_mask=true data.reset_position_ids=true data.eod_mask_loss=true)
    if train documents_bf16 1 180 train.precision=bf16 train.train_iters=100 \
            train.eval_interval=0 "${DOCS[@]}" &&
       train cp2_bf16 2 240 train.precision=bf16 train.train_iters=100 train.eval_interval=0 \
            parallel.context_parallel_size=2 "${DOCS[@]}"; then
        tracks_one_gpu cp2_tracks_one_gpu documents_bf16 cp2_bf16 "CP2 (bf16, packed documents)"
    fi
else
    echo "== cp2_bf16: skipped (one CUDA device visible)"
fi

# 8. TP2 with sequence parallelism against the single-GPU bf16 run
if [[ "$GPUS" -ge 2 ]]; then
    if train tp2_sp_bf16 2 180 train.precision=bf16 train.train_iters=100 train.eval_interval=0 \
            parallel.tensor_model_parallel_size=2 parallel.sequence_parallel=true; then
        tracks_one_gpu tp2_sp_tracks_one_gpu track_bf16 tp2_sp_bf16 "TP2+SP (bf16)"
    fi
else
    echo "== tp2_sp_bf16: skipped (one CUDA device visible)"
fi

if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "gpu_check: FAILED: ${FAILED[*]}"
    exit 1
fi
echo "gpu_check: all checks passed"
