#!/usr/bin/env bash
# Everything a short loan of one CUDA GPU should check, in one command (under 12 minutes):
#   1. the test suite with its CUDA tests (`-m "not slow"`: cuda-marked tests included), failures
#      named (-rf), in parallel where pytest-xdist is installed;
#   2. files crossing between CPU and GPU, TF32 on and off (benchmarks/exact_cuda_check.py);
#   3. encode / decode speed on the GPU against CompressAI's mbt2018-mean of the same size
#      (benchmarks/speed_benchmark.py --baseline mbt2018-mean);
#   4. the time left: the checkpoint trained further on the GPU (bfloat16 autocast), resumably:
#      a second call on the same machine continues the run in --runs.
# Each stage's log and JSON, the trained run's best checkpoint (slim) and summary.json land in
# --out (default: $OUT where set, else gpu_check_output/). A failing stage is recorded and the
# next one runs; the exit code is 1 if any stage failed.
#
#   bash scripts/gpu_check.sh [--minutes 11] [--out DIR] [--runs DIR] [--checkpoint CKPT]
#                             [--data DIR] [--kodak DIR] [--lambda 1.2e-3] [--dry-run]
#   bash scripts/gpu_check.sh --fetch   # where the package registries are: fills .gpu/ (below)
#
# A GPU machine without the package registries needs .gpu/ (git-ignored), made by --fetch on a
# machine with them and carried along: Python 3.12 wheels of what a CUDA PyTorch image lacks
# (compressai, diffusers, pytorch-msssim; installed into a temporary folder, nothing else
# changes), Kodak, and the training photographs at 768 px. --dry-run runs every stage on the
# CPU in seconds with tiny settings: the test suite checks the script that way.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

minutes=11 out=${OUT:-gpu_check_output} runs=/tmp/lic-gpu-runs dry=0 fetch=0 lambda=1.2e-3
checkpoint=reference_checkpoints/diffusion-hyperprior-lambda0.0012.pth
data=$([ -d .gpu/train ] && echo .gpu/train || echo ../shared/data/train)
kodak=$([ -d .gpu/kodak ] && echo .gpu/kodak || echo ../shared/data/kodak)
while [ $# -gt 0 ]; do
  case $1 in
    --minutes) minutes=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --checkpoint) checkpoint=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --kodak) kodak=$2; shift 2 ;;
    --lambda) lambda=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --fetch) fetch=1; shift ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ $fetch = 1 ]; then  # on a machine with the registries: wheels for CPython 3.12 on x86-64, data
  set -e
  source scripts/setup_env.sh
  mkdir -p .gpu/wheels
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .gpu/wheels \
    "$(grep ^compressai== requirements.txt)" "$(grep ^diffusers== requirements.txt)" \
    "$(grep ^pytorch-msssim== requirements.txt)" importlib_metadata
  .venv/bin/python - "$data" "$kodak" <<'EOF'
import sys
from pathlib import Path
from PIL import Image
import lic_common
train, kodak = sys.argv[1:]
for src, dst, side in ((train, ".gpu/train", 768), (kodak, ".gpu/kodak", None)):
    Path(dst).mkdir(parents=True, exist_ok=True)
    for p in lic_common.list_images(src):
        img = Image.open(p).convert("RGB")
        if side:
            img.thumbnail((side, side), Image.LANCZOS)
            img.save(Path(dst) / (p.stem + ".jpg"), quality=95)
        else:
            img.save(Path(dst) / (p.stem + ".png"))
EOF
  du -sh .gpu
  exit 0
fi

mkdir -p "$out"
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ $dry = 1 ] && py=.venv/bin/python
if [ $dry = 0 ] && compgen -G ".gpu/wheels/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/lic-site .gpu/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/lic-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
device=cuda
[ $dry = 1 ] && device=cpu
summary=()

stage() {  # name, command...: run it with its output in $out/<name>.log, record rc and seconds
  local name=$1 start=$SECONDS rc
  shift
  echo "== $name: $*"
  "$@" > "$out/$name.log" 2>&1
  rc=$?
  tail -n 15 "$out/$name.log"
  summary+=("{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}")
}

if [ $dry = 1 ]; then  # the plumbing only: the CUDA tests (skipped here), one image, tiny steps
  stage tests "$py" -m pytest -p no:cacheprovider -rf -m cuda tests/test_cuda.py
  stage exact_cuda "$py" benchmarks/exact_cuda_check.py --checkpoints "$checkpoint" --kodak "$kodak" \
    --max_images 1 --devices cpu --output "$out/exact_cuda.json"
  stage speed "$py" benchmarks/speed_benchmark.py --checkpoint "$checkpoint" --baseline mbt2018-mean --kodak "$kodak" \
    --device cpu --max_images 1 --repeats 1 --train_steps 1 --batch_size 2 --image_size 64 --output "$out/speed.json"
  train_size=(--image_size 64 --val_image_size 64 --batch_size 2 --epoch_size 32 --num_workers 0 --no-amp)
else
  xdist=()
  "$py" -c "import xdist" 2> /dev/null && xdist=(-n 8)
  stage tests "$py" -m pytest -p no:cacheprovider -rf -m "not slow" "${xdist[@]}"
  stage exact_cuda "$py" benchmarks/exact_cuda_check.py --checkpoints "$checkpoint" --kodak "$kodak" --output "$out/exact_cuda.json"
  stage speed "$py" benchmarks/speed_benchmark.py --checkpoint "$checkpoint" --baseline mbt2018-mean --kodak "$kodak" \
    --device cuda --max_images 24 --output "$out/speed.json"
  train_size=(--image_size 256 --val_image_size 256 --batch_size 16 --epoch_size 3200 --num_workers 8 --amp)
fi

# the time left, less a minute for the last validation and copying back, goes to training
left=$(( minutes * 60 - SECONDS - 60 ))
[ $dry = 1 ] && left=6
if [ $left -ge 6 ]; then
  run=$runs/lambda$lambda
  resume=()
  [ -f "$run/last_checkpoint.pth" ] && resume=(--resume last)
  stage train "$py" train_bk_sdm_compression.py --init_from "$checkpoint" --lambda_rate "$lambda" --data_path "$data" \
    --output_dir "$run" --device $device --epochs 1000000 --time_budget "$(awk "BEGIN {print $left / 60}")" \
    --lr 1e-4 --warmup_steps 100 --save_every 0 --no-progress "${train_size[@]}" "${resume[@]}"
  if [ -f "$run/best_checkpoint.pth" ]; then
    "$py" -c "import sys, bk_sdm_compression as bk, lic_common; lic_common.save_checkpoint(bk.slim_checkpoint(lic_common.load_checkpoint(sys.argv[1])), sys.argv[2])" \
      "$run/best_checkpoint.pth" "$out/trained-lambda$lambda.pth"
    cp "$run/training.log" "$out/training.log" 2> /dev/null
  fi
fi

(IFS=,; echo "{\"device\": \"$device\", \"seconds\": $SECONDS, \"stages\": [${summary[*]}]}") > "$out/summary.json"
cat "$out/summary.json"
grep -q '"rc": [1-9]' "$out/summary.json" && exit 1
exit 0
