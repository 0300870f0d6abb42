#!/usr/bin/env bash
# `make demo`: the main job end to end on built-in data, on a CPU, in at most 15 minutes on 2 idle cores:
# scripted-expert demonstrations -> one-step shortcut policy -> rollouts in simulation (success rate + video),
# printed next to the shipped 1-step policy evaluated on the same seeds and the DDPM-100 policy's success rate from
# the shipped comparison (docs/results/pusht_policies_b256_all, every batch-256 entry pooled over its seeds).
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=${DEMO_DIR:-runs/demo}
N_DEMOS=${N_DEMOS:-200}
TRAIN_STEPS=${TRAIN_STEPS:-4500}   # the recipe's batch 256 on 2 threads: 5.5-7.5 steps/s on 2 idle cores
TRAIN_MIN=${TRAIN_MIN:-10}         # at most this many minutes of training, and less when the deadline below needs it
N_EVAL=${N_EVAL:-50}
N_ACTION=${N_ACTION:-4}            # actions executed per 1-step chunk (chosen on validation seeds: docs/results/pusht_policies_b256.md)
WARM_N_ACTION=${WARM_N_ACTION:-2}  # the warm-started 1-step policy: executing 2, each chunk from t = 0.875 of the previous
WARM_START=${WARM_START:-0.875}    # one (chosen on validation seeds: docs/results/pusht_policies_b256/session16/)
DEMO_T0=${DEMO_T0:-$(date +%s)}    # `make demo` sets it before building .venv, so that the budget includes the installation
DEMO_BUDGET_MIN=${DEMO_BUDGET_MIN:-14.5}
EVAL_RESERVE_MIN=${EVAL_RESERVE_MIN:-2.5} # what the five evaluations below take on a slow 2-core machine (2.2 min measured), with margin
mkdir -p "$OUT"
if [ ! -e "$OUT/pusht_expert.zarr" ]; then
  echo "== 1/3 expert demonstrations ($N_DEMOS episodes of Push-T, scripted planner, parallel workers)"
  "$BIN/shortcut-policy" demos task=pusht n_episodes="$N_DEMOS" out="$OUT/pusht_expert.zarr" run_dir="$OUT/demos" | tail -n 1
fi
TRAIN_MIN=$("$BIN/python" -c "import time; left = $DEMO_BUDGET_MIN - (time.time() - $DEMO_T0) / 60 - $EVAL_RESERVE_MIN; print(f'{max(1.0, min($TRAIN_MIN, left)):.2f}')")
echo "== 2/3 training a one-step shortcut policy (CPU recipe, M = 16, a quarter of each batch on bootstrap rows, weight decay 1e-6; ${TRAIN_STEPS} steps, capped at ${TRAIN_MIN} min so that the demo ends within ${DEMO_BUDGET_MIN} min; resumes if interrupted)"
"$BIN/shortcut-policy" train task=pusht_lowdim_cpu task.dataset.zarr_path="$OUT/pusht_expert.zarr" \
  objective=shortcut_m16 objective.bootstrap_fraction=0.25 train.weight_decay=1e-6 \
  train.num_steps="$TRAIN_STEPS" train.max_minutes="$TRAIN_MIN" train.threads=2 train.eval_every=0 logger=none \
  run_dir="$OUT/train" | tail -n 1
echo "== 3/3 evaluating 1-step sampling (executing $N_ACTION, and Diffusion Policy's 8, actions per chunk) and 8-step sampling on $N_EVAL Push-T test seeds (from 100000)"
"$BIN/shortcut-policy" eval checkpoint="$OUT/train/checkpoints/last.ckpt" steps=[1] n_episodes="$N_EVAL" \
  n_action_steps="$N_ACTION" run_dir="$OUT/eval" progress=false | tail -n 1 > "$OUT/eval_result.txt"
"$BIN/shortcut-policy" eval checkpoint="$OUT/train/checkpoints/last.ckpt" steps=[1,8] n_episodes="$N_EVAL" n_videos=0 \
  run_dir="$OUT/eval_dp8" progress=false | tail -n 1 > "$OUT/eval_dp8.txt"
"$BIN/shortcut-policy" eval checkpoint="$OUT/train/checkpoints/last.ckpt" steps=[1] n_episodes="$N_EVAL" n_videos=0 \
  n_action_steps="$WARM_N_ACTION" warm_start="$WARM_START" run_dir="$OUT/eval_warm" progress=false | tail -n 1 > "$OUT/eval_warm.txt"
SHIPPED=${SHIPPED_POLICY:-assets/pusht_shortcut_m16_b256.ckpt}
if [ -f "$SHIPPED" ]; then
  echo "== also: the shipped 1-step policy $SHIPPED (trained by the 60-minute bench policies run, not in this demo) on the same $N_EVAL test seeds"
  "$BIN/shortcut-policy" eval checkpoint="$SHIPPED" steps=[1] n_episodes="$N_EVAL" n_videos=1 n_action_steps="$N_ACTION" \
    run_dir="$OUT/eval_shipped" progress=false | tail -n 1 > "$OUT/eval_shipped.txt"
  "$BIN/shortcut-policy" eval checkpoint="$SHIPPED" steps=[1] n_episodes="$N_EVAL" n_videos=0 n_action_steps="$WARM_N_ACTION" \
    warm_start="$WARM_START" run_dir="$OUT/eval_shipped_warm" progress=false | tail -n 1 > "$OUT/eval_shipped_warm.txt"
fi
"$BIN/python" - "$OUT" "$SHIPPED" "$DEMO_T0" <<'PY'
import json, sys, time
from pathlib import Path
out = sys.argv[1]
res = json.loads(open(f"{out}/eval_result.txt").read().split("RESULT ", 1)[1])
dp8 = json.loads(open(f"{out}/eval_dp8.txt").read().split("RESULT ", 1)[1])
lo, hi = res["success_ci95@1"]
print(f"\n1-step shortcut policy trained in this demo, executing {res['n_action_steps']} actions per chunk: success rate "
      f"{res['success_rate@1']:.2f} [{lo:.2f}, {hi:.2f}] (mean score {res['mean_score@1']:.3f}) on {res['n_episodes']} "
      f"Push-T test seeds; executing Diffusion Policy's {dp8['n_action_steps']}: 1 step {dp8['success_rate@1']:.2f}, "
      f"8 steps {dp8['success_rate@8']:.2f}")
warm = json.loads(open(f"{out}/eval_warm.txt").read().split("RESULT ", 1)[1])
lo, hi = warm["success_ci95@1"]
print(f"the same 1-step policy warm-started (each chunk refines the previous one's plan from t = {warm['warm_start']}, still "
      f"1 network evaluation per chunk), executing {warm['n_action_steps']}: success rate {warm['success_rate@1']:.2f} "
      f"[{lo:.2f}, {hi:.2f}] (mean score {warm['mean_score@1']:.3f})")
shipped_eval = Path(f"{out}/eval_shipped.txt")
if shipped_eval.exists():
    s = json.loads(shipped_eval.read_text().split("RESULT ", 1)[1])
    lo, hi = s["success_ci95@1"]
    import torch

    step = torch.load(sys.argv[2], map_location="cpu", weights_only=False).get("step")
    print(f"1-step shipped policy ({sys.argv[2]}, {step} training steps; evaluated now on the same seeds, executing {s['n_action_steps']} actions per chunk): success rate "
          f"{s['success_rate@1']:.2f} [{lo:.2f}, {hi:.2f}] (mean score {s['mean_score@1']:.3f})")
    sw = json.loads(Path(f"{out}/eval_shipped_warm.txt").read_text().split("RESULT ", 1)[1])
    lo, hi = sw["success_ci95@1"]
    print(f"1-step shipped policy warm-started (t = {sw['warm_start']}, executing {sw['n_action_steps']}): success rate "
          f"{sw['success_rate@1']:.2f} [{lo:.2f}, {hi:.2f}] (mean score {sw['mean_score@1']:.3f})")
table = Path("docs/results/pusht_policies_b256_all/summary.json")  # every batch-256 entry, pooled over its seeds
if table.exists():
    for r in json.loads(table.read_text())["rows"]:
        if (r["entry"] in ("diffusion", "diffusion_wd6") and r["sampler"] == "ddpm") or (r["entry"] == "shortcut_m16" and r["nfe"] == 1):
            print(f"shipped comparison (15,000 steps at batch 256, {r['n_episodes']} test episodes, training seeds "
                  f"{r['train_seeds']}; not trained in this demo): {r['entry']} NFE {r['nfe']}"
                  f"{' (DDPM)' if r['sampler'] == 'ddpm' else ''}: success {r['success_rate']:.2f} "
                  f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}], {r['latency_ms']:.1f} ms per action chunk")
print("videos:", ", ".join(res.get("videos") or []) or "none")
print("plot:", dp8.get("plot"))
print(f"demo wall time {(time.time() - float(sys.argv[3])) / 60:.1f} min (including the .venv when make built it)")
PY
