"""What the trainers of method artifacts share (``kvbench train METHOD``: DeltaKV's compressors, KV-CAR's
autoencoders): the learning-rate schedule."""
from __future__ import annotations

import math
import time


def warmup_cosine(opt, lr: float, step: int, steps: int, started: float, minutes: float | None, warmup: int) -> None:
    """Set ``opt``'s learning rate: linear warm-up over ``warmup`` steps, then cosine from ``lr`` to a tenth of
    it over whichever ends first, the steps or the time limit (``minutes`` since ``started``), so that a timed
    run still anneals."""
    done = max(step / steps, (time.perf_counter() - started) / (60 * minutes) if minutes else 0.0)
    factor = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * min(done, 1.0)))
    for group in opt.param_groups:
        group["lr"] = lr * factor
