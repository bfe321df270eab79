"""How much of DeltaKV's decode-time selection one step shares with the step before (issue 21's question: would a
cache of reconstructed tokens, kept across steps, spare most of the reconstruction?).

    python scripts/deltakv_selection_overlap.py --checkpoint checkpoints/deltakv-smollm2-135m --keep 0.15 \
        --context 4000 --essays ../shared/data/paul_graham_essays

Prefills the first ``--context`` tokens of the essays (query-agnostic, no question), decodes ``--steps`` tokens
greedily, and records the tokens each observing full layer picks at every step (``DeltaKV.observe``); prints per
observer the share of a step's picks that the step before picked too.
"""
import argparse
import glob
import os

import torch

from kvbench import models, registry
from kvbench.engine import Engine
from kvbench.methods.deltakv import method as deltakv_method
from kvbench.task import Sample


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--keep", type=float, default=0.15)
    ap.add_argument("--context", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--essays", required=True, help="a directory of .txt essays (Paul Graham's)")
    args = ap.parse_args()
    files = sorted(glob.glob(os.path.join(args.essays, "**", "*.txt"), recursive=True))
    if not files:
        raise SystemExit(f"no .txt files under {args.essays}")
    lm = models.load(args.model, torch.float32, "cpu")
    ids = lm.tokenizer(" ".join(open(f).read() for f in files[:40]))["input_ids"][: args.context]
    method = registry.build_method("deltakv", 1.0, {"checkpoint": args.checkpoint, "keep": args.keep})
    picks: dict[int, list[set]] = {}
    observe = deltakv_method.DeltaKV.observe

    def recording(self, call, follower):
        plan = observe(self, call, follower)
        picks.setdefault(call.layer, []).append(set(plan.pos.tolist()))
        return plan

    deltakv_method.DeltaKV.observe = recording
    engine = Engine(lm, method, protocol="query-agnostic")
    cache, first, _ = engine.prefill(Sample("essays", ids, [], [], 1))
    engine.decode(cache, first, [args.steps], [False], trace_every=0)
    for layer, sets in picks.items():
        shared = [len(now & before) / max(len(now), 1) for before, now in zip(sets, sets[1:])]
        print(f"observer layer {layer}: {len(sets[-1])} tokens picked a step over {len(sets)} steps; picked the step "
              f"before too: mean {sum(shared) / len(shared):.3f}, min {min(shared):.3f}")


if __name__ == "__main__":
    main()
