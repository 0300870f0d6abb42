#!/usr/bin/env bash
# `make demo`: the main job end to end on built-in data, on a CPU, in about 15 minutes:
# scripted-expert demonstrations -> one-step shortcut policy -> rollouts in simulation (success rate + video).
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=${DEMO_DIR:-runs/demo}
N_DEMOS=${N_DEMOS:-100}
TRAIN_MIN=${TRAIN_MIN:-10}
TRAIN_STEPS=${TRAIN_STEPS:-3000}
N_EVAL=${N_EVAL:-20}
mkdir -p "$OUT"
if [ ! -e "$OUT/pusht_expert.zarr" ]; then
  echo "== 1/3 expert demonstrations ($N_DEMOS episodes of Push-T, scripted planner, parallel workers)"
  "$BIN/shortcut-policy" demos task=pusht n_episodes="$N_DEMOS" out="$OUT/pusht_expert.zarr" run_dir="$OUT/demos" | tail -n 1
fi
echo "== 2/3 training a one-step shortcut policy (CPU recipe net, ${TRAIN_STEPS} steps, capped at ${TRAIN_MIN} min; resumes if interrupted)"
"$BIN/shortcut-policy" train task=pusht_lowdim_cpu task.dataset.zarr_path="$OUT/pusht_expert.zarr" \
  train.num_steps="$TRAIN_STEPS" train.max_minutes="$TRAIN_MIN" train.threads=1 logger=none run_dir="$OUT/train" | tail -n 1
echo "== 3/3 evaluating 1-step and 8-step sampling on $N_EVAL Push-T test seeds (from 100000)"
"$BIN/shortcut-policy" eval checkpoint="$OUT/train/checkpoints/last.ckpt" steps=[1,8] n_episodes="$N_EVAL" \
  run_dir="$OUT/eval" progress=false | tail -n 1 > "$OUT/eval_result.txt"
"$BIN/python" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
res = json.loads(open(f"{out}/eval_result.txt").read().split("RESULT ", 1)[1])
print(f"\n1-step shortcut policy: success rate {res['success_rate@1']:.2f} (mean score {res['mean_score@1']:.3f}) "
      f"on {res['n_episodes']} Push-T test seeds; 8 steps: success {res['success_rate@8']:.2f}")
print("videos:", ", ".join(res.get("videos") or []) or "none")
print("plot:", res.get("plot"))
PY
