"""Control: does a short STEM LoRA trained on the pruned SmolLM2 change the FULL model's predictions?

Usage: .venv/bin/python bench/edge_transfer_control.py RATIO STEPS LR [METHOD]   (e.g. 0.25 20 0.001 taylor)
Prunes (width, METHOD: magnitude by default; Wanda/Taylor calibrate on 16 public prompts), trains on the
STEM edge split, recovers, and compares base vs base + adapter on 100 stratified STEM test items:
accuracy, paired difference and how many predictions changed.
"""

import shutil
import sys
import time
from pathlib import Path

from collections import Counter

from edgefuse.data.mmlu import load_mmlu, select
from edgefuse.data.prompts import answer_text, mc_prompt
from edgefuse.edge.plan import save_pruned
from edgefuse.edge.prune import prune_model
from edgefuse.edge.recover import recover
from edgefuse.edge.train import TrainConfig, train_edge
from edgefuse.evaluate.mmlu import evaluate_mmlu
from edgefuse.evaluate.stats import fmt_ci, paired_diff_ci
from edgefuse.models import load_model
from edgefuse.peft_utils import apply_adapter


def main() -> None:
    ratio, steps, lr = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    method = sys.argv[4] if len(sys.argv) > 4 else "magnitude"
    work = Path(f"/tmp/edgefuse_ctrl_{ratio}_{steps}_{lr}_{method}")
    shutil.rmtree(work, ignore_errors=True)
    model, tok = load_model()
    ds = load_mmlu()
    calib = [mc_prompt(it) + answer_text(it.answer) for it in select(ds, "public")[:16]]
    save_pruned(prune_model(model, tok, method=method, structure="width", ratio=ratio, calib_prompts=calib), tok,
                work / "pruned")
    t = time.time()
    cfg = TrainConfig(steps=steps, lr=lr, batch=8, seq=256, rank=8, alpha=16)
    train_edge(work / "pruned", "stem", select(ds, "edge", ["stem"]), cfg, work / "pkg", progress=lambda *a, **k: None)
    print(f"train s {time.time() - t:.0f}")
    recover(work / "pkg", work / "pruned" / "plan.json", work / "adapter")
    items = select(ds, "test", ["stem"], limit=100, seed=0)
    model, tok = load_model()
    base = evaluate_mmlu(model, tok, items)
    adapted = evaluate_mmlu(apply_adapter(model, work / "adapter"), tok, items)
    b = [int(i["correct"]) for i in base["items"]]
    a = [int(i["correct"]) for i in adapted["items"]]
    changed = sum(x["pred"] != y["pred"] for x, y in zip(base["items"], adapted["items"]))
    d = paired_diff_ci(a, b)
    print("predicted letters: base", dict(Counter(x["pred"] for x in base["items"])), "adapted",
          dict(Counter(x["pred"] for x in adapted["items"])))
    print(f"ratio {ratio} {method} steps {steps} lr {lr}: base {fmt_ci(base['accuracy']['overall'])} "
          f"adapter {fmt_ci(adapted['accuracy']['overall'])} paired diff {100 * d['diff']:+.1f} "
          f"[{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}] predictions changed {changed}/{len(items)}")


if __name__ == "__main__":
    main()
