#!/usr/bin/env bash
# The CUHK01-100 study on a CPU (docs/RESULTS.md, "CUHK01"): split 0, the CPU recipe, in three steps.
#   A. seed 0, cls+high and all (the full model) with the net's NCC parameters;
#   B. a sweep of stage 2's free parameters from seed 0's stage-1 weights, scored on the
#      validation identities only (tools/sweep_stage2.py);
#   C. seeds 1, 2 and 0, cls+high against all with the configuration B chose: each seed trains
#      its own stage 1 (seed 0's from A is reused) and both loss sets start stage 2 from it, the
#      paired test of the NCC loss with a spread that includes stage 1's. (A cheaper variant,
#      --stage1-seed 0, shares one stage 1 and varies stage 2's seed only.)
# About 3 h on 2 idle cores with AVX-512 (A 40 min, B 45, C 95: step C measured 94 min), 3.5-4 times as
# long on 2 AVX2 cores, longer on a busy machine.
# Usage: [STEPS="A B C"] [THREADS=auto|N] bash tools/study_cuhk01_cpu.sh RAW_DIR [OUT]   (STEPS: the steps to run;
# B resumes: finished configurations in OUT/sweep/sweep.json are reused)
set -euo pipefail
raw=${1:?usage: bash tools/study_cuhk01_cpu.sh RAW_DIR [OUT]}
out=${2:-runs/cuhk01_cpu}
common=(cuhk01-100 "$raw" --recipe cpu --splits 1 --val-ids 50 --test-interval 100 --out "$out"
        --loss-sets cls+high all --device cpu --threads "${THREADS:-auto}")
steps=${STEPS:-A B C}
stage1="$out/split00/seed0/stage1_cls+high/stage1_iter_800.caffemodel"
if [[ " $steps " == *" A "* ]]; then
  echo "== A: seed 0 $(date)"
  python tools/reproduce.py "${common[@]}" --seeds 0 --name A_seed0
fi
if [[ " $steps " == *" B "* ]]; then
  echo "== B: sweep $(date)"
  python tools/sweep_stage2.py --data "$out/split00/db" --weights "$stage1" --device cpu --seed 0 --bn-maf 0.986 \
    --threads "${THREADS:-auto}" \
  --set w_low=1,0.5,2 --set pos_floor=-1,0.3 --set neg_ceiling=1,0.6 --set lr=0.0016,0.005 \
  --out "$out/sweep"
fi
[[ " $steps " == *" C "* ]] || exit 0
# The configuration the sweep chose, as reproduce.py options (none for the baseline).
flags=$(python - "$out/sweep/sweep.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
best = next(x for x in r["runs"] if x["name"] == r["best"])
base = r["runs"][0]["config"]
opt = {"w_low": "--w-low", "pos_floor": "--pos-floor", "neg_ceiling": "--neg-ceiling", "lr": "--lr2"}
print(" ".join(f"{opt[k]} {v:g}" for k, v in best["config"].items() if v != base[k]))
PY
)
echo "== C: seeds 1 2 0, chosen stage-2 options: '${flags}' $(date)"
# shellcheck disable=SC2086
python tools/reproduce.py "${common[@]}" --seeds 1 2 0 --name C_ablation $flags
echo "== done $(date)"
