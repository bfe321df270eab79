"""What the trainers of method artifacts share (``kvbench train METHOD``: DeltaKV's compressors, KV-CAR's
autoencoders): the optimisation loop and its learning-rate schedule."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch


def warmup_cosine(opt, lr: float, step: int, steps: int, started: float, minutes: float | None, warmup: int) -> None:
    """Set ``opt``'s learning rate: linear warm-up over ``warmup`` steps, then cosine from ``lr`` to a tenth of
    it over whichever ends first, the steps or the time limit (``minutes`` since ``started``), so that a timed
    run still anneals."""
    done = max(step / steps, (time.perf_counter() - started) / (60 * minutes) if minutes else 0.0)
    factor = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * min(done, 1.0)))
    for group in opt.param_groups:
        group["lr"] = lr * factor


def optimise(params, loss_fn: Callable, samples: torch.Tensor, batch: int, steps: int, lr: float,
             minutes: float | None, warmup: int, gen: torch.Generator, log, stop_message: Callable[[int], str],
             report: Callable[[int, object, float], str]) -> tuple[int, float, list]:
    """AdamW (betas 0.9, 0.95; no weight decay) on ``params`` over batches of ``samples`` in a random order
    (drawn with ``gen``, redrawn when fewer than a batch are left), ``warmup_cosine`` learning rates, gradients
    clipped at norm 1, until ``steps`` or ``minutes`` (then ``stop_message(step)`` is logged).
    ``loss_fn(batch) -> (loss, record)``; ``report(step, record, seconds)`` is logged at step 1 and every 25.
    Returns the steps taken, the seconds and the records."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    order, cursor, step, records = torch.randperm(len(samples), generator=gen), 0, 0, []
    t0 = time.perf_counter()
    while step < steps:
        if minutes is not None and time.perf_counter() - t0 > 60 * minutes:
            log(stop_message(step))
            break
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(samples), generator=gen), 0
        warmup_cosine(opt, lr, step, steps, t0, minutes, warmup)
        loss, record = loss_fn(samples[order[cursor: cursor + batch]])
        cursor += batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        records.append(record)
        if step % 25 == 0 or step == 1:
            log(report(step, record, time.perf_counter() - t0))
    return step, time.perf_counter() - t0, records
