"""Peak memory and speed of edge LoRA training on SmolLM2 pruned at ratios 0, 0.25, 0.5 (one run).

Each ratio trains in a fresh child process (so one ratio's allocations cannot hide another's peak)
with the same items, batch, sequence length, steps and seed; the child loads the pruned model from
its directory, as an edge would. Peak memory = sampled resident memory above the child's level
before the model was loaded (CPU) or the CUDA allocator peak (GPU), median over repeats. Tensor peak =
the edge's own `stats.tensor_peak_bytes` (edgefuse.edge.memory.TensorPeak), without allocator overhead.
Speed = real (unpadded) tokens per second over the steps other than the first (it carries one-off
allocation costs) and the one TensorPeak measured (its meter costs time), each step timed as its fastest
over the repeats: every ratio trains the very same batches, so step i is the same work in every repeat,
and best-of-N discards slow-downs from other processes. Also shows the `--memory-budget` estimate next to
every measured peak, and which ratio a budget picks.

    .venv/bin/python bench/edge_memory.py [--steps 5 --batch 8 --seq 128 --repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median


def child(args) -> None:
    from edgefuse.data.mmlu import load_mmlu, select
    from edgefuse.edge.train import TrainConfig, train_edge

    items = select(load_mmlu(), "edge", domains=["stem"], limit=args.batch * args.steps, seed=0)
    cfg = TrainConfig(steps=args.steps, batch=args.batch, seq=args.seq, checkpoint_every=0, seed=0)
    out = Path(args.child) / "pkg"
    pkg = train_edge(Path(args.child) / "model", "stem", items, cfg, out, progress=lambda *a, **k: None)
    s = json.loads((pkg / "edgefuse.json").read_text())["stats"]
    tok, wall = sum(s["step_tokens"][1:]), sum(s["step_wall_s"][1:])
    print("RESULT " + json.dumps({"peak": s["peak_memory_bytes"], "tensor_peak": s["tensor_peak_bytes"], "tok_s": tok / wall, "tokens": s["tokens"],
                                  "padded": s["padded_tokens"], "step_wall_s": s["step_wall_s"],
                                  "step_tokens": s["step_tokens"], "metered_step": s["tensor_peak_step"]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        return child(args)

    import torch

    from edgefuse.edge.plan import save_pruned
    from edgefuse.edge.prune import estimate_for, prune_model, ratio_for_budget
    from edgefuse.edge.train import TrainConfig
    from edgefuse.models import count_parameters, load_model

    load0 = os.getloadavg()[0]
    cfg = TrainConfig(batch=args.batch, seq=args.seq)
    tmp = Path(tempfile.mkdtemp(prefix="edge-memory-"))
    base, tok = load_model("smollm2-135m")
    n_base = count_parameters(base)
    info = {}
    for r in args.ratios:
        res = prune_model(base, tok, method="magnitude", structure="width", ratio=r)
        save_pruned(res, tok, tmp / f"r{r}" / "model")
        info[r] = {"params": count_parameters(res.model), "estimate": estimate_for(base, "width", r, cfg)["total_bytes"]}
        del res
    runs: dict[float, list[dict]] = {r: [] for r in args.ratios}
    for _ in range(args.repeats):
        for r in args.ratios:
            cmd = [sys.executable, __file__, "--child", str(tmp / f"r{r}"), "--steps", str(args.steps),
                   "--batch", str(args.batch), "--seq", str(args.seq)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"child for ratio {r} failed:\n{out.stderr[-2000:]}")
            runs[r].append(json.loads(line[0][7:]))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, device {'cuda' if torch.cuda.is_available() else 'cpu'}; SmolLM2-135M, "
          f"width/magnitude pruning, batch {args.batch}, seq ≤ {args.seq}, {args.steps} steps, {args.repeats} run(s) "
          f"(peak: median; speed: fastest of the runs per step), r=8 on all 7 projections; load average at start "
          f"{load0:.2f}, at end {os.getloadavg()[0]:.2f}")
    def best_speed(rs: list[dict]) -> float:
        timed = [i for i in range(1, len(rs[0]["step_wall_s"])) if i + 1 != rs[0]["metered_step"]]
        walls = [min(x["step_wall_s"][i] for x in rs) for i in timed]
        return sum(rs[0]["step_tokens"][i] for i in timed) / sum(walls)

    r0 = args.ratios[0]
    if any(x["step_tokens"] != runs[r0][0]["step_tokens"] for r in args.ratios for x in runs[r]):
        sys.exit("the ratios did not train the same batches; speeds would not be comparable")
    peak0 = median(x["peak"] for x in runs[r0])
    speed0 = best_speed(runs[r0])
    print("| ratio | params | est. peak GiB | measured peak GiB | tensor peak GiB | peak vs ratio 0 | tokens/s | "
          "speed vs ratio 0 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in args.ratios:
        peak, speed = median(x["peak"] for x in runs[r]), best_speed(runs[r])
        print(f"| {r:g} | {info[r]['params'] / 1e6:.1f} M ({info[r]['params'] / n_base:.0%}) | "
              f"{info[r]['estimate'] / 2**30:.3f} | {peak / 2**30:.3f} | "
              f"{median(x['tensor_peak'] for x in runs[r]) / 2**30:.3f} | {peak / peak0:.2f}× | {speed:.0f} | "
              f"{speed / speed0:.2f}× |")
    for budget in (2.0, 1.6, 1.4, 1.0):
        try:
            r, est = ratio_for_budget(base, "width", budget, cfg)
            print(f"--memory-budget {budget} GiB → ratio {r:g} (estimate {est['total_gib']:.3f} GiB)")
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"--memory-budget {budget} GiB → {e}")


if __name__ == "__main__":
    main()
