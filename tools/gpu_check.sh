#!/usr/bin/env bash
# The GPU check, in one call: build the CUDA extension, run the `cuda` tests
# (the NCC kernels and their tensor-core path, the training command and the
# feature extraction on the GPU against the CPU, the fused batch normalisation,
# bench_train on the GPU),
# time a training iteration (bench_train.py --device cuda, float32 and TF32),
# run the CUDA benchmark (ncc_max with and without tensor cores, ncc_volume),
# with Nsight Compute's counters of each operator's kernels (NCU=0 leaves them out; ncu's raw CSV tables are
# packed into ncu_raw.tar.gz, since a device call brings back at most 8 files).
# Logs and JSON go to ${OUT:-gpu_out}. Usage: [SKIP_BUILD=1] [NCU=0] [QUICK=1] [BUNDLE=1] bash tools/gpu_check.sh [benchmark arguments]
# BUNDLE=1 packs everything under the output folder into one gpu_check.tar.gz when the script ends
# (a device call brings back at most 8 files, and the full check writes more).
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
if [ "${BUNDLE:-}" = 1 ]; then
  bundle() {
    local tmp
    tmp=$(mktemp "${TMPDIR:-/tmp}/gpu_check.XXXXXX") && tar -czf "$tmp" -C "$out" . && rm -rf "${out:?}"/* \
      && mv "$tmp" "$out/gpu_check.tar.gz" && echo "bundled into $out/gpu_check.tar.gz ($(du -h "$out/gpu_check.tar.gz" | cut -f1))"
  }
  trap bundle EXIT
fi
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
# tests/test_gpu_tools.py reads LMDBs and images: say so at once if a package is missing.
python3 -c "import lmdb, cv2" 2>/dev/null || {
  echo "error: python3 lacks lmdb or opencv (cv2), which the GPU tests of the tools need;" \
       "install them (pip install lmdb opencv-python-headless), or carry their wheels" >&2; exit 1; }
start=$(date +%s)
# An in-place build (the device machine has no network for pip's build
# dependencies); the package is then imported from the repository root.
# SKIP_BUILD=1 uses the extension already built in place (e.g. by tools/gpu_cuhk01.sh).
if [ -z "${SKIP_BUILD:-}" ]; then
  python3 setup.py build_ext --inplace > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch, mspcnn.ops; print('CUDA kernels registered:', torch._C._dispatch_has_kernel_for_dispatch_key('mspcnn::ncc_max', 'CUDA'))"
# The machine code of the NCC kernels under study, counted by opcode (tools/sass_summary.py): whether
# ptxas fused the normalisations alike, what a shared-memory float atomic compiles to, the widths of
# the shared loads. A few seconds.
so=$(ls mspcnn/_C*.so 2>/dev/null | head -1)
if command -v cuobjdump >/dev/null && [ -n "$so" ]; then
  cuobjdump -sass "$so" 2>/dev/null | python3 tools/sass_summary.py --arch sm_90 \
    --match 'max_fast_kernel<float, 5, 5, 1, true>|max_tiled_kernel<5, 5|max_backward_(fused|rows)<float, 5|volume_grad_tiled<float|volume_centre_fused<float>|volume_(tiled_)?kernel<float>|max_tc_kernel<5, 5' \
    > "$out/sass_summary.txt" 2>&1 || tail -2 "$out/sass_summary.txt"
fi
# QUICK=1: only what the newest unmeasured changes need, for a call with a few minutes left (about 3
# minutes after the build): the volume kernels' tests, the tiled max forward's tests, the max backward
# by rows' tests and the CUDA graphs' test against eager training, then ncc_max at 128 pairs with the
# default and the tiled forward (16 and 8 candidate columns a thread) and with the backward by rows
# (b's atomics in shared and in global memory), and ncc_volume with the direct forward, the tiled
# forward, and the tiled forward with the fused per-centre sums (no reference, no ncu).
if [ "${QUICK:-}" = 1 ]; then
  start=$(date +%s)
  python3 -m pytest -q -p no:cacheprovider -m "" tests/test_ncc_cuda.py tests/test_gpu_tools.py \
    -k "volume or max_tiled or max_backward_by_rows or cuda_graphs or does_not_wait" 2>&1 | tee "$out/pytest_quick.log" | tail -8
  echo "quick tests: $(( $(date +%s) - start )) s"
  for fwd in fast tiled16; do  # the accuracy table (float64 comparison) for the tiled forward only
    MSPCNN_NCC_MAX_FWD=${fwd%%[0-9]*} MSPCNN_NCC_MAX_TILE=${fwd##*[a-z]} python3 tools/bench_ncc.py --device cuda \
      --ops ncc_max --pairs 128 --no-reference --accuracy-pairs "$([ "$fwd" = tiled16 ] && echo 2 || echo 0)" \
      --json "$out/bench_ncc_cuda_max_$fwd.json" 2>&1 | tee -a "$out/bench_quick.log" | tail -4
  done
  for bwd in rows rows_global; do  # the max backward by rows (with its gradients' accuracy table)
    MSPCNN_NCC_MAX_BWD=$bwd python3 tools/bench_ncc.py --device cuda --ops ncc_max --pairs 128 --no-reference \
      --accuracy-pairs 2 --json "$out/bench_ncc_cuda_max_bwd_$bwd.json" 2>&1 | tee -a "$out/bench_quick.log" | tail -4
  done
  MSPCNN_NCC_MAX_FWD=tiled MSPCNN_NCC_MAX_TILE=8 python3 tools/bench_ncc.py --device cuda --ops ncc_max --pairs 128 \
    --no-reference --accuracy-pairs 0 --json "$out/bench_ncc_cuda_max_tiled8.json" 2>&1 | tee -a "$out/bench_quick.log" | tail -4
  for fwd in direct tiled tiled_fused; do  # tiled_fused: the tiled forward and the fused per-centre sums
    MSPCNN_NCC_VOLUME_FWD=${fwd%_fused} MSPCNN_NCC_VOLUME_CENTRE=$([ "$fwd" = tiled_fused ] && echo fused || echo separate) \
      python3 tools/bench_ncc.py --device cuda --ops ncc_volume --pairs 128 --no-reference --accuracy-pairs 0 \
      --json "$out/bench_ncc_cuda_volume_$fwd.json" 2>&1 | tee -a "$out/bench_quick.log" | tail -4
  done
  exit 0
fi
start=$(date +%s)
python3 -m pytest -q -p no:cacheprovider -m "" tests/test_ncc_cuda.py tests/test_ncc_tc.py tests/test_ncc_ops.py \
  tests/test_gpu_tools.py tests/test_bench_tools.py tests/test_layer_kernels.py -k "cuda or gpu" 2>&1 | tee "$out/pytest_cuda.log" | tail -15
echo "cuda tests: $(( $(date +%s) - start )) s"
ncu_args=()
[ "${NCU:-1}" != 0 ] && ncu_args=(--ncu --ncu-raw "$out/ncu_raw")
python3 tools/bench_ncc.py --device cuda --json "$out/bench_ncc_cuda.json" "${ncu_args[@]}" "$@" 2>&1 | tee "$out/bench_cuda.log"
status=${PIPESTATUS[0]}
# A training iteration on the GPU at the paper's batch: the engine's path against the separate
# Caffe layers (--torch-ops), the passes replayed from CUDA graphs (--cuda-graphs) and plain
# PyTorch, float32 and TF32, with the operations it issues.
for precision in "" --tf32; do
  python3 tools/bench_train.py --device cuda --batches paper --stages 1 2 --torch-ops --cuda-graphs --count-ops --repeat 10 \
    $precision --json "$out/bench_train_cuda${precision:+_tf32}.json" 2>&1 | tee -a "$out/bench_train_cuda.log" | tail -6
done
# The tiled volume forward (MSPCNN_NCC_VOLUME_FWD=tiled, opt-in until measured; its bit-for-bit test
# against the direct kernel is in test_ncc_cuda.py above): ncc_volume at 128 pairs, beside the reference.
MSPCNN_NCC_VOLUME_FWD=tiled python3 tools/bench_ncc.py --device cuda --ops ncc_volume --pairs 128 \
  --json "$out/bench_ncc_cuda_volume_tiled.json" 2>&1 | tee -a "$out/bench_cuda.log" | tail -8
# ... and with the backward's fused per-centre sums as well (MSPCNN_NCC_VOLUME_CENTRE=fused, opt-in until
# measured; its test against the separate kernels is in test_ncc_cuda.py above).
MSPCNN_NCC_VOLUME_FWD=tiled MSPCNN_NCC_VOLUME_CENTRE=fused python3 tools/bench_ncc.py --device cuda --ops ncc_volume \
  --pairs 128 --no-reference --accuracy-pairs 0 --json "$out/bench_ncc_cuda_volume_tiled_fused.json" 2>&1 | \
  tee -a "$out/bench_cuda.log" | tail -8
# The tiled max forward (MSPCNN_NCC_MAX_FWD=tiled, opt-in until measured; its bit-for-bit test against
# max_fast_kernel is in test_ncc_cuda.py above): ncc_max at 128 pairs beside the reference, with Nsight
# Compute's counters and --ncu-detail (warp instructions, stall reasons; the fwd+bwd profile has the
# backward's too), then at 8 candidate columns a thread (MSPCNN_NCC_MAX_TILE=8) without them, and the
# default forward's detail counters to compare the instruction counts with.
tiled_ncu=() fast_ncu=()
if [ "${NCU:-1}" != 0 ]; then
  tiled_ncu=(--ncu --ncu-detail --ncu-raw "$out/ncu_raw/max_tiled")
  fast_ncu=(--ncu --ncu-detail --ncu-raw "$out/ncu_raw/max_fast_detail")
fi
MSPCNN_NCC_MAX_FWD=tiled python3 tools/bench_ncc.py --device cuda --ops ncc_max --pairs 128 \
  --json "$out/bench_ncc_cuda_max_tiled.json" "${tiled_ncu[@]}" 2>&1 | tee -a "$out/bench_cuda.log" | tail -12
[ ${#fast_ncu[@]} -gt 0 ] && python3 tools/bench_ncc.py --device cuda --ops ncc_max --pairs 128 --no-reference \
  --repeat 3 --json "$out/bench_ncc_cuda_max_fast_detail.json" "${fast_ncu[@]}" 2>&1 | tee -a "$out/bench_cuda.log" | tail -8
MSPCNN_NCC_MAX_FWD=tiled MSPCNN_NCC_MAX_TILE=8 python3 tools/bench_ncc.py --device cuda --ops ncc_max --pairs 128 \
  --no-reference --json "$out/bench_ncc_cuda_max_tiled8.json" 2>&1 | tee -a "$out/bench_cuda.log" | tail -8
# The max backward by rows (MSPCNN_NCC_MAX_BWD=rows and rows_global, opt-in until measured; their tests
# against the fused kernel are in test_ncc_cuda.py above), with the detail counters of its kernels.
for bwd in rows rows_global; do
  rows_ncu=()
  [ "${NCU:-1}" != 0 ] && rows_ncu=(--ncu --ncu-detail --ncu-raw "$out/ncu_raw/max_bwd_$bwd")
  MSPCNN_NCC_MAX_BWD=$bwd python3 tools/bench_ncc.py --device cuda --ops ncc_max --pairs 128 --no-reference \
    --json "$out/bench_ncc_cuda_max_bwd_$bwd.json" "${rows_ncu[@]}" 2>&1 | tee -a "$out/bench_cuda.log" | tail -8
done
# Last, the non-default setting: without the forward kernels' plane-mean shift.
# The NCC tests without the forward kernels' plane-mean shift (MSPCNN_NCC_CUDA_SHIFT=0; the
# shift is the default), appended to the same log.
start=$(date +%s)
echo "== with MSPCNN_NCC_CUDA_SHIFT=0" >> "$out/pytest_cuda.log"
MSPCNN_NCC_CUDA_SHIFT=0 python3 -m pytest -q -p no:cacheprovider -m "" tests/test_ncc_cuda.py tests/test_ncc_ops.py -k "cuda" 2>&1 | \
  tee -a "$out/pytest_cuda.log" | tail -5
echo "cuda tests without the shift: $(( $(date +%s) - start )) s"
# The accuracy table and the operator's time without the shift (no reference, no ncu), same log.
echo "== with MSPCNN_NCC_CUDA_SHIFT=0" >> "$out/bench_cuda.log"
MSPCNN_NCC_CUDA_SHIFT=0 python3 tools/bench_ncc.py --device cuda --ops ncc_max --pairs 128 --no-reference \
  --json "$out/bench_ncc_cuda_noshift.json" 2>&1 | tee -a "$out/bench_cuda.log" | tail -12
if [ -d "$out/ncu_raw" ]; then
  tar -czf "$out/ncu_raw.tar.gz" -C "$out" ncu_raw && rm -rf "$out/ncu_raw"
fi
exit "$status"
