#!/usr/bin/env bash
# The full CUHK01-100 recipe of split 0 on a GPU, in one call: [1]'s solver settings for both
# stages (prototxt_equiv/solver_cuhk01_stage{1,2}.prototxt: 5500 + 1500 iterations of 50 pairs x
# iter_size 2), the single-shot CMC over 100 gallery draws beside the paper's 79.3% rank-1, the
# validation curve, and the share of time the GPU waited for the data layer (engine log lines
# "data wait N%"; the loader is first benchmarked alone, at 1, 2, 4, 8 and the same worker count).
#
#   bash tools/gpu_cuhk01.sh RAW_DIR [OUT]        RAW_DIR: CUHK01 as released (campus/ or its files),
#                                                 or a folder packed by tools/pack_images.py (unpacked
#                                                 first, into a temporary folder outside OUT)
#
# Training uses TF32 tensor cores (reproduce.py --tf32: inputs of convolutions and matrix products
# rounded to a 10-bit mantissa, float32 sums; the features for the CMC stay float32): the paper's
# 7,000 iterations of 200 images are about 6.6 P multiply-adds: 4.3 minutes even at 100% of the
# H200's measured float32 rate (25.5 T/s). FP32=1 trains in float32 as Caffe does. Measured on an
# H200 (2026-11-30): 0.089 s an iteration, bound by the host's kernel launches; the whole recipe
# about 12.5 minutes of GPU time, run as two calls (DEADLINE, then the resume); rank-1 80.9%.
# Environment: DEVICE (cuda), WORKERS (12 decoding workers: forked processes beyond 2), CUDA_GRAPHS=1
# to replay the training passes from CUDA graphs (reproduce.py --cuda-graphs; not yet run on a GPU:
# tests/test_gpu_tools.py::test_cuda_graphs_train_the_eager_weights first), EXTRA (more reproduce.py options,
# e.g. "--iters1 2 --iters2 2" for a smoke test), SKIP_BUILD=1 to use an existing build,
# TIME_LIMIT (seconds of training before reproduce.py stops with a snapshot; the same command with
# the same OUT then resumes the stopped stage, so the recipe can span several calls), DEADLINE (a
# time in seconds since the epoch, `date +%s`, by which training stops with a snapshot: TIME_LIMIT
# reckoned when training starts, after the conversion and the loader benchmark; the smaller wins),
# SKIP_BENCH=1 to leave out the loader benchmark (a resumed run),
# BENCH_PAIRS / BENCH_BATCHES (50 / 30) for the loader benchmark.
# Writes OUT (default ${OUT:-gpu_out}/cuhk01): gpu_split0.json, gpu_split0_curves.png, logs.
set -uo pipefail
raw=${1:?usage: bash tools/gpu_cuhk01.sh RAW_DIR [OUT]}
out=${2:-${OUT:-gpu_out}/cuhk01}
device=${DEVICE:-cuda}
workers=${WORKERS:-12}
precision=--tf32
[ "${FP32:-}" = 1 ] && precision=
[ "${CUDA_GRAPHS:-}" = 1 ] && precision="$precision --cuda-graphs"
mkdir -p "$out"
if grep -qs '"mspcnn-pack-1"' "$raw/manifest.json"; then  # packed (lossless WebP): the images first
  unpacked=$(mktemp -d "${TMPDIR:-/tmp}/mspcnn_cuhk01.XXXXXX")
  trap 'rm -rf "$unpacked"' EXIT
  PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} python3 tools/pack_images.py unpack "$raw" "$unpacked/campus" | tail -1 \
    || { echo "error: could not unpack $raw" >&2; exit 2; }
  raw=$unpacked
fi
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
if [ -z "${SKIP_BUILD:-}" ]; then
  start=$(date +%s)
  python3 setup.py build_ext --inplace > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the package from the repository (built in place)
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
args=(cuhk01-100 "$raw" --recipe paper --splits 1 --device "$device" --workers "$workers" --test-interval 500
      --out "$out" --name gpu_split0 $precision)
# The loader alone first (a few seconds), at 1, 2, 4, 8 and the recipe's worker count, as threads and
# as processes: its rate per core on this machine, on split 0 converted as the recipe converts it,
# with page-locked batches as training on the GPU makes them.
# shellcheck disable=SC2086
python3 tools/reproduce.py "${args[@]}" --convert-only ${EXTRA:-} > "$out/convert.log" 2>&1 \
  && { [ -n "${SKIP_BENCH:-}" ] || python3 tools/bench_data.py --db "$out/split00/db" --no-baseline --pairs-per-batch "${BENCH_PAIRS:-50}" \
    --batches "${BENCH_BATCHES:-30}" --workers $(printf '%s\n' 1 2 4 8 "$workers" | sort -nu) \
    --kind threads processes $([ "$device" = cuda ] && echo --pin-memory) --json "$out/bench_data.json" 2>&1 | tail -16; } || tail -5 "$out/convert.log"
limit=${TIME_LIMIT:-}
if [ -n "${DEADLINE:-}" ]; then
  left=$(( DEADLINE - $(date +%s) ))
  [ "$left" -lt 1 ] && left=1
  [ -z "$limit" ] || [ "$left" -lt "$limit" ] && limit=$left
fi
limit=(${limit:+--time-limit "$limit"})
start=$(date +%s)
# shellcheck disable=SC2086
python3 tools/reproduce.py "${args[@]}" "${limit[@]}" ${EXTRA:-} 2>&1 | tee -a "$out/reproduce.log" | \
  grep -E "^== |data wait|Test net output #0|ours:|chance|paper:|error|stopped"
status=${PIPESTATUS[0]}  # reproduce.py's own (130: stopped with a snapshot); no `|| true` here, which would reset it
echo "recipe: $(( $(date +%s) - start )) s, exit status $status"
exit "$status"
