#!/usr/bin/env bash
# `make demo`: the main job at toy scale on this machine, end to end and offline:
#   tiny Qwen2.5-VL backbone (built here) + synthetic shards (jrm-prep)
#   → joint training with DeepSpeed ZeRO-3 on 2 CPU ranks (launchers/train_local.sh → torchrun, gloo)
#   → consolidated HF export (written by the trainer, same code as jrm-export)
#   → evaluation of the export (held-out accuracy + effective rank of the reward features).
# DEMO_DIR (default runs/demo) holds everything; each run starts training afresh.
set -euo pipefail

JRM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$JRM_ROOT"
DEMO_DIR="${DEMO_DIR:-runs/demo}"
DEMO_STEPS="${DEMO_STEPS:-300}"
RUN="$DEMO_DIR/run"

echo "== 1/5 tiny offline Qwen2.5-VL backbone"
jrm-make-tiny --out "$DEMO_DIR/tiny-backbone"

echo "== 2/5 synthetic shards (learnable task: the candidate painted in the asked colour wins)"
jrm-prep synthetic --out "$DEMO_DIR/data/train" --groups 512 --seed 0 --quiet --overwrite
jrm-prep synthetic --out "$DEMO_DIR/data/eval" --groups 64 --seed 1 --quiet --overwrite
jrm-prep verify "$DEMO_DIR/data/train" --quiet

echo "== 3/5 joint training: ZeRO-3 on 2 CPU ranks ($DEMO_STEPS steps)"
rm -rf "$RUN"
JRM_CONFIG=configs/tiny.yaml JRM_DEVICE=cpu JRM_NPROC_PER_NODE=2 launchers/train_local.sh \
  model.name="$DEMO_DIR/tiny-backbone" data.train_shards="$DEMO_DIR/data/train" \
  data.eval_shards="$DEMO_DIR/data/eval" train.output_dir="$RUN" train.max_steps="$DEMO_STEPS"

echo "== 4/5 export: $RUN/export"
test -f "$RUN/export/jrm_config.json"

echo "== 5/5 evaluation of the export on held-out groups"
jrm-eval rank --model "$RUN/export" --label jrm-demo --shards "$DEMO_DIR/data/eval" --out "$DEMO_DIR/eval"

python - "$RUN" <<'PY'
import json, sys
from pathlib import Path

run = Path(sys.argv[1])
steps = [json.loads(l) for l in (run / "steps.jsonl").read_text().splitlines() if l.strip()]
def avg(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / max(len(vals), 1)
head, tail = steps[:10], steps[-10:]
final = json.loads((run / "final_metrics.json").read_text())
print()
print("| | first 10 steps | last 10 steps |")
print("|---|---|---|")
for key in ("loss/total", "loss/rank", "loss/lm", "train/accuracy"):
    print(f"| {key} | {avg(head, key):.4f} | {avg(tail, key):.4f} |")
print()
print(f"held-out pairwise accuracy: {final.get('eval/accuracy', float('nan')):.3f} (chance 0.5) over "
      f"{int(final.get('eval/groups', 0))} groups; effective rank of reward features: "
      f"{final.get('eval/effective_rank', float('nan')):.2f}")
print(f"skipped steps: {final.get('skipped_steps', 0)}, corrupt samples: {final.get('corrupt_samples', 0)}")
print()
print("MLflow UI on this run:")
print(f"  mlflow ui --backend-store-uri sqlite:///{(run / 'mlflow.db').resolve()} --port 5000   # then open http://127.0.0.1:5000")
PY
