#!/usr/bin/env bash
# Stage 2 of the reference recipe (README, "Reference checkpoints"), on one CUDA GPU: every rate
# point of the codec, and the mbt2018-mean baseline at the base rate point, trained at once (one
# process each, sharing the GPU) for the same number of steps from stage 1's checkpoints.
#
#   bash benchmarks/reference_gpu_stage.sh CODEC_BASE BASELINE_BASE TRAIN_DIR OUT_DIR STEPS [LAMBDA ...]
#
# CODEC_BASE, BASELINE_BASE: training checkpoints of stage 1 (reference_benchmark.py's base run
# and baseline, both at --base_lambda; their optimizer state is not needed), or the OUT_DIR of an
# earlier round of this script (each run then starts from that round's best checkpoint of its own
# rate point). Each run lands in OUT_DIR/<curve>/lambda<L>/ (the layout reference_benchmark.py
# --stage2_dir reads) with its log beside it; a finished run (done.json) is skipped, an
# interrupted one resumes. Environment: PYTHON (default python), DOWNSCALE_MIN (default 0.67: the
# crops' random downscale, with 0.75x-downscaled photographs the range of stage 1's 0.5..1),
# BATCH_SIZE (16), CROP (256 px), EPOCH_SIZE (3200 crops; validation after each), LR (1e-4),
# SEED (0), WORKERS (2 data-loading processes per run), DEVICE (cuda), BASE_LAMBDA (1.2e-3: the
# baseline's rate point, reference_benchmark.py's --base_lambda).
set -euo pipefail
if [ $# -lt 5 ]; then
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
codec=$1 baseline=$2 data=$3 out=$4 steps=$5
shift 5
lambdas=("$@")
[ ${#lambdas[@]} -gt 0 ] || lambdas=(4.4e-3 2.3e-3 1.2e-3 6.2e-4 3.2e-4)
base_lambda=${BASE_LAMBDA:-1.2e-3}
py=${PYTHON:-python}
crop=${CROP:-256} batch=${BATCH_SIZE:-16} lr=${LR:-1e-4} seed=${SEED:-0}
cd "$(dirname "$0")/.."
common=(--data_path "$data" --image_size "$crop" --downscale_min "${DOWNSCALE_MIN:-0.67}" --downscale_max 1.0
        --val_image_size "$crop" --batch_size "$batch" --epochs 1000000 --epoch_size "${EPOCH_SIZE:-3200}"
        --num_workers "${WORKERS:-2}" --seed "$seed" --save_every 0 --no-progress --amp --device "${DEVICE:-cuda}"
        --lr "$lr" --warmup_steps 100 --max_steps "$steps")

train() {  # curve lambda init
  local name="lambda$(printf %g "$2")"
  local dir="$out/$1/$name" init=$3
  [ -d "$init" ] && init="$init/$1/$name/best_checkpoint.pth"
  [ -f "$dir/done.json" ] && return 0
  local resume=()
  [ -f "$dir/last_checkpoint.pth" ] && resume=(--resume last)
  mkdir -p "$dir"
  "$py" train_bk_sdm_compression.py "${common[@]}" --init_from "$init" --lambda_rate "$2" --output_dir "$dir" "${resume[@]}" \
    >> "$out/$1-$name.log" 2>&1 &&
    printf '{"stage": 2, "init_from": "%s", "steps": %s, "lr": %s, "seed": %s, "batch_size": %s}\n' \
      "$init" "$steps" "$lr" "$seed" "$batch" > "$dir/done.json"
}

mkdir -p "$out"
pids=()
for lam in "${lambdas[@]}"; do
  train diffusion-hyperprior "$lam" "$codec" &
  pids+=($!)
done
train mbt2018-mean "$base_lambda" "$baseline" &
pids+=($!)
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
