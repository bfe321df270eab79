"""What the trainers of method artifacts share (``kvbench train METHOD``: DeltaKV's compressors, KV-CAR's
autoencoders): the corpus packed into training samples, the optimisation loop and its learning-rate schedule."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kvbench.task import TaskError

HELDOUT_SHARE = 50  # one packed sample in 50 (the last 2% of the corpus, at least one) is held out


def pack_corpus(tokenizer, text: str, corpus: dict, seq_len: int, min_train: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``text`` tokenised (no special tokens), cut into consecutive samples of ``seq_len`` tokens (a shorter
    tail is dropped): (training samples, held-out samples: the last 2%), each ``[n, seq_len]``. ``corpus``
    (``kvbench.io.read_corpus``'s description) gains the counts; fewer than ``min_train`` training samples is a
    TaskError."""
    ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.int64)
    n_samples = len(ids) // seq_len
    n_held = max(1, n_samples // HELDOUT_SHARE)
    if n_samples - n_held < min_train:
        raise TaskError(f"corpus too small: {len(ids)} tokens make {n_samples} samples of {seq_len}; need more than "
                        f"{min_train + n_held}")
    samples = ids[: n_samples * seq_len].view(n_samples, seq_len)
    train, held = samples[:-n_held], samples[-n_held:]
    corpus.update(tokens=len(ids), train_samples=len(train), heldout_samples=len(held), seq_len=seq_len)
    return train, held


LOSS_CHUNK_TOKENS = 2048


def next_token_loss(model, ids: torch.Tensor, chunk_tokens: int = LOSS_CHUNK_TOKENS, **forward) -> torch.Tensor:
    """Mean next-token cross-entropy of the causal LM ``model`` on ``ids`` [batch, seq] (``forward``: what its
    forward takes besides the ids: positions, the attention function's kwargs), without holding the whole
    batch's logits: the output head and the loss run over ``chunk_tokens`` positions at a time, each chunk
    recomputed in the backward pass, so float32 logits of one chunk live at once. A 150k vocabulary (Qwen2.5)
    makes 16 x 1024 positions' float32 logits 10 GB, and their gradient as much again: more than the rest of
    a 1.5B model's training step, and what ran KV-CAR's training out of memory beside other work on one GPU."""
    hidden = model.base_model(input_ids=ids, **forward).last_hidden_state[:, :-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    head = model.get_output_embeddings()

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    return _chunked_sum(chunk_loss, hidden, targets, chunk_tokens) / len(targets)


def _chunked_sum(chunk_loss, hidden: torch.Tensor, other: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """The sum of ``chunk_loss`` over chunks of ``chunk_tokens`` rows, each recomputed in the backward pass."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(hidden), chunk_tokens):
        h, o = hidden[start: start + chunk_tokens], other[start: start + chunk_tokens]
        total = total + (checkpoint(chunk_loss, h, o, use_reentrant=False) if torch.is_grad_enabled()
                         else chunk_loss(h, o))
    return total


def distillation_loss(model, ids: torch.Tensor, teacher_forward: dict, chunk_tokens: int = LOSS_CHUNK_TOKENS,
                      **forward) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) between next-token distributions: the teacher is ``model``
    run with ``teacher_forward`` (e.g. the exact cache), without gradient; the student is ``model`` run with
    ``forward`` (e.g. the decoded cache). Chunked like ``next_token_loss``, so neither float32 logits of the whole
    batch exist at once. Zero exactly when the student's distributions are the teacher's."""
    with torch.no_grad():
        teacher = model.base_model(input_ids=ids, **teacher_forward).last_hidden_state[:, :-1]
    hidden = model.base_model(input_ids=ids, **forward).last_hidden_state[:, :-1]
    teacher, hidden = teacher.reshape(-1, teacher.shape[-1]), hidden.reshape(-1, hidden.shape[-1])
    head = model.get_output_embeddings()

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            log_p = F.log_softmax(head(t).float(), dim=-1)
        return F.kl_div(F.log_softmax(head(h).float(), dim=-1), log_p, log_target=True, reduction="sum")

    return _chunked_sum(chunk_loss, hidden, teacher, chunk_tokens) / len(hidden)


@torch.no_grad()
def heldout_losses(model, ids: torch.Tensor, reference_forward: dict, chunk_tokens: int = LOSS_CHUNK_TOKENS,
                   **forward) -> dict[str, float]:
    """An evaluation's three numbers from one forward each: the next-token cross-entropy of ``model`` run with
    ``reference_forward`` (e.g. the exact cache) and with ``forward`` (e.g. the decoded cache), and the mean
    KL(reference || model) between their next-token distributions; what ``next_token_loss`` twice and
    ``distillation_loss`` once give, at half their forwards."""
    reference = model.base_model(input_ids=ids, **reference_forward).last_hidden_state[:, :-1]
    hidden = model.base_model(input_ids=ids, **forward).last_hidden_state[:, :-1]
    reference, hidden = reference.reshape(-1, reference.shape[-1]), hidden.reshape(-1, hidden.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    head = model.get_output_embeddings()
    sums = {"ce_reference": 0.0, "ce": 0.0, "kl": 0.0}
    for start in range(0, len(hidden), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        log_ref = F.log_softmax(head(reference[part]).float(), dim=-1)
        log_p = F.log_softmax(head(hidden[part]).float(), dim=-1)
        sums["ce_reference"] += F.nll_loss(log_ref, targets[part], reduction="sum").item()
        sums["ce"] += F.nll_loss(log_p, targets[part], reduction="sum").item()
        sums["kl"] += F.kl_div(log_p, log_ref, log_target=True, reduction="sum").item()
    return {k: v / len(targets) for k, v in sums.items()}


def corpus_summary(corpus: dict) -> str:
    """One log line's start, from ``pack_corpus``'s description."""
    return (f"corpus: {corpus['files']} files, {corpus['tokens']} tokens, {corpus['train_samples']} samples of "
            f"{corpus['seq_len']}")


WARMUP_SHARE = 0.05  # the warm-up's longest share of a run, by its steps or its time limit


def warmup_cosine(opt, lr: float, step: int, steps: int, started: float, minutes: float | None, warmup: int) -> float:
    """Set ``opt``'s learning rate (and return its factor): linear warm-up over ``warmup`` steps or the first 5% of
    the run, whichever is shorter, then cosine from ``lr`` to a tenth of it; the run's progress is that of
    whichever ends first, the steps or the time limit (``minutes`` since ``started``), so that a timed run warms
    up and anneals however many steps it was allowed. (A warm-up in steps alone held DeltaKV's four-minute Qwen
    run, 189 steps of a nominal 100,000, at under 4% of its learning rate: it warmed up for 5,000.)"""
    done = max(step / steps, (time.perf_counter() - started) / (60 * minutes) if minutes else 0.0)
    ramp = max((step + 1) / warmup, done / WARMUP_SHARE)
    factor = ramp if ramp < 1 else 0.1 + 0.45 * (1 + math.cos(math.pi * min(done, 1.0)))
    for group in opt.param_groups:
        group["lr"] = lr * factor
    return factor


def optimise(params, loss_fn: Callable, samples: torch.Tensor, batch: int, steps: int, lr: float,
             minutes: float | None, warmup: int, gen: torch.Generator, log, stop_message: Callable[[int], str],
             report: Callable[[int, object, float], str]) -> tuple[int, float, list]:
    """AdamW (betas 0.9, 0.95; no weight decay) on ``params`` over batches of ``samples`` in a random order
    (drawn with ``gen``, redrawn when fewer than a batch are left), ``warmup_cosine`` learning rates, gradients
    clipped at norm 1, until ``steps`` or ``minutes`` (then ``stop_message(step)`` is logged).
    ``loss_fn(batch) -> (loss, record)``, ``record`` a tensor of what to report (the loss, or its terms);
    ``report(step, record as a float or list of floats, seconds)`` is logged at step 1 and every 25.
    Returns the steps taken, the seconds and the records (floats, or lists of floats). The records stay on
    the device until a report or the end: reading one back every step would sync the GPU every step."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    order, cursor, step, records = torch.randperm(len(samples), generator=gen), 0, 0, None
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
        if records is None:
            records = record.new_empty((steps, *record.shape))
        records[step - 1] = record.detach()
        if step % 25 == 0 or step == 1:
            log(report(step, records[step - 1].tolist(), time.perf_counter() - t0))
    return step, time.perf_counter() - t0, [] if records is None else records[:step].tolist()
