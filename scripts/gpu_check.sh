#!/usr/bin/env bash
# The one prepared accelerator check: installs the missing wheels, benchmarks the FFSD step, runs the test suite on
# the GPU and, with the time left, trains CIFAR-10 ResNet-32 with `ffsd` and `independent` on the same short schedule.
#
# Prepare here (a machine with PyPI), then carry `.whl` and `.gpu_data` to the GPU machine:
#   bash scripts/fetch_gpu_wheels.sh                                # -> .whl/ (git-ignored)
#   mkdir -p .gpu_data && cp ../shared/data/cifar10-jpeg.tar.gz .gpu_data/   # .gpu_data/ is git-ignored
#   git clone https://github.com/SJLeo/FFSD .gpu_data/ffsd_official   # unmodified official code, for compare_official.py
# On the GPU machine (Python 3.12, jax 0.11 with CUDA, no network), from the repository root:
#   OUT=/some/dir bash scripts/gpu_check.sh
# What it measures goes under $OUT (at most 8 files come back from the device tool): summary.txt, versions.txt,
# bench_resnet32.json, bench_resnet18.json, bench_mesh.json (several GPUs only), compare_official.json, tests.log, and
# details.tar.gz (every log, metrics.jsonl, summary.json).
#
# Budget: GPU_CHECK_BUDGET_S (default 450 s) for the whole script. TINY=1 shrinks every size so the script can be
# checked end to end on a CPU in a few minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
budget=${GPU_CHECK_BUDGET_S:-450}
OUT=${OUT:-/tmp/ffsd_gpu_check}
DETAILS=/tmp/ffsd_gpu_check_details
rm -rf "$DETAILS"; mkdir -p "$OUT" "$DETAILS"
export PYTHONUNBUFFERED=1
left() { echo $(( budget - ($(date +%s) - start) )); }
log() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/summary.txt"; }

# 1. Wheels the GPU image lacks (tfds, grain, array-record, clu, ml-collections, tensorboardX, ...), into /tmp/site.
if [ -d .whl ] && [ -z "${SKIP_WHEELS:-}" ]; then
  wheels=()
  for w in .whl/*.whl; do
    case "$(basename "$w")" in
      # Keep the machine's protobuf/etils when they are new enough for tensorflow-datasets (>= 6.31.1, >= 1.9.1).
      protobuf-*) python3 -c "import google.protobuf as p, sys; v=tuple(map(int, p.__version__.split('.')[:2])); sys.exit(v < (6, 31))" 2>/dev/null && continue ;;
      etils-*) python3 -c "import etils, sys; v=tuple(map(int, etils.__version__.split('.')[:2])); sys.exit(v < (1, 9))" 2>/dev/null && continue ;;
    esac
    wheels+=("$w")
  done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
    || { log "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 - > "$OUT/versions.txt" 2>&1 <<'EOF'
import importlib, platform, jax
print('python', platform.python_version())
print('devices', jax.devices())
for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'grain', 'tensorflow_datasets', 'ml_collections',
             'clu', 'numpy', 'google.protobuf', 'etils', 'tensorboardX', 'PIL'):
  try:
    module = importlib.import_module(name)
    print(name, getattr(module, '__version__', '?'))
  except Exception as e:  # pylint: disable=broad-except
    print(name, 'MISSING', type(e).__name__, e)
EOF
cat "$OUT/versions.txt"
log "setup done"

if [ -n "${TINY:-}" ]; then
  r32=(--config configs/smoke.py --batch_sizes 16,32 --steps 3 --warmup 1)
  mesh=(--config configs/smoke.py --dtypes float32 --batch_sizes 24 --steps 3 --warmup 1)
  # The official part on the CPU (torch here is the CPU wheel): one small A/B round.
  compare=(--device cpu --configs resnet32 --batch_size 16 --rounds 1 --steps 2 --warmup 1)
  r18=(--config configs/smoke.py --config.model=resnet_imagenet_tiny --config.image_size=64 --dtypes bfloat16
       --batch_sizes 16 --steps 3 --warmup 1)
  test_args=(tests/test_objective.py)
  train_overrides=(--config.model=resnet8_tiny --config.num_epochs=1 --config.max_steps=20 --config.eval_batch_size=500)
else
  r32=(--config configs/cifar100_resnet32.py --batch_sizes 128,512 --steps 20 --warmup 3)
  mesh=(--config configs/cifar100_resnet32.py --dtypes bfloat16 --batch_sizes 384 --steps 20 --warmup 3)
  compare=(--device cuda --configs resnet32,resnet32:bfloat16,wrn16_2,densenet40 --rounds 3 --steps 10 --warmup 3)
  r18=(--config configs/imagenet_resnet18.py --dtypes bfloat16 --batch_sizes 256 --steps 20 --warmup 3)
  test_args=(tests)
  train_overrides=(--config.num_epochs=15 --config.lr_boundaries='(8,12)' --config.eval_batch_size=1000)
fi

# 2. Benchmarks on synthetic data: FFSD and independent side by side, float32/bfloat16, batch sweep.
timeout $(( $(left) > 240 ? 240 : $(left) )) python3 scripts/benchmark.py "${r32[@]}" --output "$OUT/bench_resnet32.json" \
  > "$DETAILS/bench_resnet32.log" 2>&1; log "bench resnet32 rc=$?"; grep '^#' "$DETAILS/bench_resnet32.log" | tee -a "$OUT/summary.txt"
timeout $(( $(left) > 120 ? 120 : $(left) )) python3 scripts/benchmark.py "${r18[@]}" --output "$OUT/bench_resnet18.json" \
  > "$DETAILS/bench_resnet18.log" 2>&1; log "bench resnet18 rc=$?"; grep '^#' "$DETAILS/bench_resnet18.log" | tee -a "$OUT/summary.txt"

# 2a. Several GPUs: the same FFSD step on one GPU, with the batch split over 3, and with the networks split over 3
# (each with global and per-device batch norm). One GPU cannot show it: recorded as such.
num_gpus=$(python3 -c 'import jax; print(jax.device_count())' 2>/dev/null || echo 1)
if [ "$num_gpus" -ge 3 ]; then
  timeout $(( $(left) > 180 ? 180 : $(left) )) python3 scripts/benchmark.py "${mesh[@]}" --methods ffsd --devices 1,3 \
    --network_parallelism 1,3 --batch_norm_statistics global,device --output "$OUT/bench_mesh.json" \
    > "$DETAILS/bench_mesh.log" 2>&1; log "bench mesh rc=$?"; grep '^#' "$DETAILS/bench_mesh.log" | tee -a "$OUT/summary.txt"
else
  log "bench mesh skipped: $num_gpus device(s); the networks-split A/B needs 3 (FFSD's 3 networks)"
fi

# 2b. The official PyTorch iteration (SJLeo/FFSD's own Trainer.train_with_test) against the FFSD step, A/B in one run.
official_src=${OFFICIAL_SRC:-.gpu_data/ffsd_official}
if [ -f "$official_src/CIFARTrainer.py" ] && python3 -c 'import torch' 2>/dev/null; then
  timeout $(( $(left) > 150 ? 150 : $(left) )) python3 scripts/compare_official.py --official_src "$official_src" \
    "${compare[@]}" --output "$OUT/compare_official.json" > "$DETAILS/compare_official.log" 2>&1
  log "compare_official rc=$?"; grep '^# [a-z]' "$DETAILS/compare_official.log" | tee -a "$OUT/summary.txt"
else
  log "compare_official skipped: no official checkout at $official_src or no torch"
fi

# 3. The test suite with the GPU as the default backend (tests that need 8 devices skip on a 1-GPU machine), in one
# process: `-o addopts=` drops pyproject's two xdist workers (the GPU image lacks pytest-xdist, and two processes would
# each reserve 75% of the GPU).
if [ "$(left)" -gt 60 ]; then
  FFSD_TEST_PLATFORMS=cuda,cpu timeout $(( $(left) - 30 > 180 ? 180 : $(left) - 30 )) \
    python3 -m pytest -q -p no:cacheprovider -o addopts= "${test_args[@]}" > "$OUT/tests.log" 2>&1
  log "tests rc=$? $(tail -n 1 "$OUT/tests.log")"
fi

# 4. With the time left: real CIFAR-10 (JPEG folder, decoded once) with ffsd and with independent, same schedule.
if [ -f .gpu_data/cifar10-jpeg.tar.gz ] && [ "$(left)" -gt 60 ]; then
  data_root=/tmp/ffsd_cifar10
  [ -d "$data_root/train" ] || { mkdir -p "$data_root" && tar -xzf .gpu_data/cifar10-jpeg.tar.gz -C "$data_root"; }
  [ -d "$data_root/train" ] || data_root=$(dirname "$(find /tmp/ffsd_cifar10 -maxdepth 3 -type d -name train | head -n 1)")
  for method in ffsd independent; do
    remaining=$(left)
    [ "$remaining" -gt 30 ] || break
    if [ "$method" = ffsd ]; then per_run=$(( remaining / 2 )); else per_run=$(( remaining - 10 )); fi
    workdir=/tmp/ffsd_train_$method
    rm -rf "$workdir"
    timeout "$per_run" python3 main.py --config configs/cifar10_resnet32.py --workdir "$workdir" \
      --config.method=$method --config.dataset=image_folder --config.image_folder="$data_root" \
      --config.normalization=cifar10 --config.data_cache_dir=/tmp/ffsd_cache --config.compute_dtype=bfloat16 \
      "${train_overrides[@]}" > "$DETAILS/train_$method.log" 2>&1
    log "train $method rc=$? $(cat "$workdir/summary.json" 2>/dev/null | tr -d '\n')"
    cp "$workdir/metrics.jsonl" "$DETAILS/train_${method}_metrics.jsonl" 2>/dev/null
    cp "$workdir/summary.json" "$DETAILS/train_${method}_summary.json" 2>/dev/null
  done
fi
tar -czf "$OUT/details.tar.gz" -C "$DETAILS" .
log "done"
