"""``kvsculpt``: KV compression as distillation (free keys by L-BFGS, values by least squares).

Jiang and Jin, "KVSculpt: KV Cache Compression as Distillation" (arXiv 2603.27819; no official code).
Instead of keeping original tokens, each (layer, KV head) gets a smaller set of unconstrained key/value
pairs optimised so that the layer's attention behaves as with the whole cache: keys by L-BFGS in float32,
values in closed form by least squares, alternating every few steps. ``adaptive=True`` first runs a short
pilot optimisation per (layer, KV head) and redistributes the total budget in proportion to the pilot's
error, within a floor and a cap, so heads hold ragged numbers of slots.

Everything ``selectfit`` states holds here too (targets, selection, exact sinks and recent window, ridge,
layers fitted together in ``compress_cache``); this method starts from Select+Fit's keys and values, fitted to
its own targets. Choices the paper leaves open:

- Targets: the last ``target_window = 128`` prompt positions re-rotated to the future, tuned on other text
  than the tables (results/kvsculpt/README.md): with more targets the keys serve queries that later tokens
  do not resemble.
- Iterations: 100 key steps (layers and heads batched; the tuning and the compression times:
  results/kvsculpt/README.md).
- Objective per (layer, KV head), over the target queries of all its grouped query heads:
  ``mean |out' - out|^2 / mean |out|^2 + lse_weight * mean (lse' - lse)^2 + ridge penalty``, where
  ``out'``/``lse'`` are the targets' attention over exact + free slots and ``out``/``lse`` over the whole
  cache. Matching the log-sum-exp makes the cache weigh right against tokens appended after it (two
  blocks merge by their log-sum-exps). Keys live in the rotated (post-RoPE) space: stored keys are never
  re-rotated, so free keys need no position (stored with position -1).
- Optimiser: L-BFGS batched over every problem of every layer (each problem its own history of
  ``history`` pairs, its own step), Armijo backtracking per problem (halving, at most ``max_backtracks``
  times; a step that never satisfies it is rejected and that problem's history reset), the first step
  after a reset a steepest-descent move of ``initial_step`` x the keys' norm. Values are re-solved every
  ``value_every`` key steps and at the end; the ridge is part of the objective, so key steps (accepted
  only when they lower it) and value solves (its exact minimiser for fixed keys) both never raise it.
- Adaptive budgets (``adaptive=True``, implemented in ``selectfit``): the pilot is ``pilot_iterations`` key
  steps at the uniform budget (from Select+Fit's start); the rest as ``selectfit`` states (how much of the
  gain is the allocation's and how much the key optimisation's: results/kvsculpt/README.md).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from kvbench.method import BudgetError
from kvbench.methods.selectfit import Problems, SelectFit, objective_and_key_grad, solve_values


class BatchedLBFGS:
    """L-BFGS over P independent problems at once (x: [P, n]); each keeps its own history and step.

    Built for the GPU, where the history (P x 2 x ``history`` x n floats, hundreds of MB for a long prompt) and
    the kernel launches are the cost: the direction is the compact form of the inverse-Hessian product (Byrd,
    Nocedal and Schnabel 1994), the same vector as the textbook two-loop recursion, from two passes over the
    history (its products with the gradient, then one combination of its rows) and small ``history`` x
    ``history`` algebra; the pairs' mutual products are kept up to date as pairs arrive (one more pass), and a
    new pair overwrites the oldest in place (a ring; the order lives in ``age``), where shifting the history
    rewrote all of it every step."""

    def __init__(self, n_problems: int, n: int, history: int, initial_step: float, max_backtracks: int,
                 device, armijo: float = 1e-4, block: int = 4):
        self.h, self.initial_step, self.max_backtracks, self.armijo = history, initial_step, max_backtracks, armijo
        self.block = block  # step lengths tried at once after the first halving (``step``)
        self.every = torch.arange(n_problems, device=device)  # ``fn``'s rows for the whole batch (this object)
        self.pairs = torch.zeros(n_problems, 2 * history, n, device=device)  # s of slot i in row i, its y in h + i
        self.sy = torch.zeros(n_problems, history, history, device=device)  # s_i . y_j over slots
        self.yy = torch.zeros(n_problems, history, history, device=device)  # y_i . y_j
        self.age = torch.full((n_problems, history), -1, dtype=torch.long, device=device)  # push number, -1 empty
        self.count = torch.zeros(n_problems, dtype=torch.long, device=device)  # newest pairs in use
        self.pushes = 0
        # Problems whose last step searched along steepest descent and found nothing: from the same x, f, g they
        # would search the same way again (converged to float32 noise, e.g. a head fitted exactly), and every
        # step's backtracking rounds, one host sync each, ran for them alone. Cleared by ``objective_changed``.
        # (Identical iterates where a problem's arithmetic does not depend on the others evaluated beside it: on
        # the CPU, tested; a GPU GEMM may round differently as that set changes, a retry then tried again.)
        self.stuck = torch.zeros(n_problems, dtype=torch.bool, device=device)

    def objective_changed(self) -> None:
        """The function itself changed (KVSculpt's value solve): stuck problems may move again."""
        self.stuck.zero_()

    def direction(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """-H g with H the L-BFGS inverse Hessian (H0 = gamma I, gamma = s.y / y.y of the newest pair) of each
        problem's ``count`` newest pairs. The small algebra runs oldest pair first; pairs not in use are zeroed
        there, with a unit diagonal in R, which removes them from every product exactly."""
        h = self.h
        order = torch.argsort(self.age, dim=-1)  # slots, oldest first (empty ones before any pair)
        used = torch.arange(h, device=g.device)[None, :] >= h - self.count[:, None]
        both = used[:, :, None] & used[:, None, :]
        rows, cols = order[:, :, None].expand(-1, -1, h), order[:, None, :].expand(-1, h, -1)
        sy = self.sy.gather(1, rows).gather(2, cols) * both
        yy = self.yy.gather(1, rows).gather(2, cols) * both
        with_g = (self.pairs @ g[..., None])[..., 0]  # one pass: s_i . g and y_i . g
        a = with_g[:, :h].gather(1, order) * used
        b = with_g[:, h:].gather(1, order) * used
        gamma = (sy[:, -1, -1] / yy[:, -1, -1].clamp(min=1e-30))[:, None]
        R = torch.triu(sy) + torch.diag_embed((~used).to(sy.dtype))
        r_a = torch.linalg.solve_triangular(R, a[..., None], upper=True)[..., 0]  # R^-1 S'g
        inner = sy.diagonal(dim1=-2, dim2=-1) * r_a + gamma * (yy @ r_a[..., None])[..., 0] - gamma * b
        p1 = torch.linalg.solve_triangular(R.transpose(1, 2), inner[..., None], upper=False)[..., 0]
        coef = torch.cat([torch.zeros_like(a).scatter(1, order, p1),  # back to slot order
                          torch.zeros_like(a).scatter(1, order, -gamma * r_a)], dim=1)
        hg = gamma * g + (coef[:, None, :] @ self.pairs)[:, 0]  # the second pass: S p1 - gamma Y R^-1 S'g
        return torch.where((self.count == 0)[:, None], self.steepest(x, g), -hg)

    def push(self, s: torch.Tensor, y: torch.Tensor, push: torch.Tensor) -> None:
        """Store (s, y) where ``push`` in place of each problem's oldest pair, and its products with the others."""
        h, rows = self.h, torch.arange(len(s), device=s.device)
        slot = self.age.argmin(-1)
        keep = ~push[:, None]
        self.pairs[rows, slot] = torch.where(keep, self.pairs[rows, slot], s)
        self.pairs[rows, h + slot] = torch.where(keep, self.pairs[rows, h + slot], y)
        self.age[rows, slot] = torch.where(push, self.pushes, self.age[rows, slot])
        self.pushes += 1
        with_y = (self.pairs @ y[..., None])[..., 0]  # s_i . y and y_i . y, the new pair included
        y_with_s = (self.pairs[:, h:] @ s[..., None])[..., 0]  # y_j . s
        self.sy[rows, :, slot] = torch.where(keep, self.sy[rows, :, slot], with_y[:, :h])
        self.sy[rows, slot, :] = torch.where(keep, self.sy[rows, slot, :], y_with_s)
        self.yy[rows, :, slot] = torch.where(keep, self.yy[rows, :, slot], with_y[:, h:])
        self.yy[rows, slot, :] = torch.where(keep, self.yy[rows, slot, :], with_y[:, h:])
        self.count = torch.where(push, (self.count + 1).clamp(max=h), self.count)

    def steepest(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return -g * (self.initial_step * x.norm(dim=-1) / g.norm(dim=-1).clamp(min=1e-30))[:, None]

    def step(self, fn, x: torch.Tensor, f: torch.Tensor, g: torch.Tensor):
        """One iteration. ``fn(rows, x_rows) -> (f_rows, g_rows)`` evaluates problems ``rows`` (ids, which may
        repeat) at ``x_rows``; ``rows`` is ``self.every`` (the same object) for the whole batch.

        Masks (``torch.where``) rather than boolean indexing wherever the shapes allow: each boolean index is a
        host sync on the GPU, and KVSculpt's compression runs 100 of these steps beside other work. The one
        sync left per backtracking round is the list of problems still searching (it sizes the next
        evaluation and ends the search). The first round halves the step once; later rounds try ``block``
        halvings at once and keep each problem's first acceptable one: the iterate a search one halving at a
        time finds, in fewer rounds (profiled steps searched all eight halvings: results/kvsculpt/README.md)."""
        d = self.direction(x, g)
        slope = (g * d).sum(-1)
        uphill = ~(slope < 0)  # stale curvature: those problems restart from steepest descent
        steepest = uphill | (self.count == 0)
        self.count = torch.where(uphill, 0, self.count)
        d = torch.where(uphill[:, None], self.steepest(x, g), d)  # what direction() gives at count 0
        slope = (g * d).sum(-1)
        every = self.every
        xt = x + d  # the first try, t = 1, evaluates every problem: whole tensors, no gathers
        ft, gt = fn(every, xt)
        ok = torch.isfinite(ft) & (ft <= f + self.armijo * slope)
        x_new, f_new, g_new = torch.where(ok[:, None], xt, x), torch.where(ok, ft, f), torch.where(ok[:, None], gt, g)
        # the problems still searching halve their step together; a stuck one's search would fail as before
        skipped = ~ok & self.stuck
        todo, t, tried, block = every[~ok & ~self.stuck], 1.0, 0, 1
        while len(todo) and tried < self.max_backtracks:
            k = len(todo)  # as many rows as the whole batch at most: its memory bound
            n = min(block, self.max_backtracks - tried, max(1, len(every) // k))
            lengths = t * 0.5 ** torch.arange(1, n + 1, device=x.device, dtype=x.dtype)
            rows, length = todo.repeat(n), lengths.repeat_interleave(k)  # all of todo at each length in turn
            xt = x[rows] + length[:, None] * d[rows]
            ft, gt = fn(rows, xt)
            ok = (torch.isfinite(ft) & (ft <= f[rows] + self.armijo * length * slope[rows])).view(n, k)
            found = ok.any(0)
            pick = ok.int().argmax(0) * k + torch.arange(k, device=x.device)  # each one's first acceptable length
            x_new[todo] = torch.where(found[:, None], xt[pick], x_new[todo])
            f_new[todo] = torch.where(found, ft[pick], f_new[todo])
            g_new[todo] = torch.where(found[:, None], gt[pick], g_new[todo])
            todo, t, tried, block = todo[~found], t * 0.5 ** n, tried + n, self.block
        self.count[todo] = 0  # rejected: x stays, history restarts
        self.stuck = (skipped | torch.zeros_like(skipped).index_fill_(0, todo, True)) & steepest
        s, y = x_new - x, g_new - g
        sy = (s * y).sum(-1)
        push = sy > 1e-10 * s.norm(dim=-1) * y.norm(dim=-1)
        self.push(s, y, push)
        return x_new, f_new, g_new


@functools.cache
def compiled_key_grad():
    """``objective_and_key_grad`` through torch.compile, its shapes dynamic (the backtracking evaluates subsets
    of the problems): its thirty-odd small kernels fused into a few, where the eager key steps spent more
    time launching kernels than running them (results/kvsculpt/README.md). Built on first use."""
    return torch.compile(objective_and_key_grad, dynamic=True)


def sculpt(pb: Problems, keys: torch.Tensor, ridge: float, lse_weight: float, iterations: int,
           value_every: int, history: int = 10, initial_step: float = 0.05, max_backtracks: int = 8,
           compiled: bool | None = None):
    """Alternating optimisation from ``keys`` [P, M, D]. Returns keys, values, objective [P] and the
    objective after every key step and value solve ([steps, P]: never increasing). ``compiled``: the
    objective and gradient through torch.compile (default: on CUDA, unless KVBENCH_COMPILE_FIT=0)."""
    P, M, D = keys.shape
    values = solve_values(pb, keys, ridge)
    if compiled is None:
        compiled = keys.is_cuda and os.environ.get("KVBENCH_COMPILE_FIT", "1") != "0"
    key_grad = compiled_key_grad() if compiled else objective_and_key_grad

    def fn(idx: torch.Tensor | None, x: torch.Tensor):
        sub, vals = (pb, values) if idx is None else (pb.select(idx), values[idx])
        f, g = key_grad(sub, x.view(-1, M, D), vals, lse_weight)
        return f, g.reshape(len(f), -1)

    x = keys.reshape(P, -1).clone()
    f, g = fn(None, x)
    trace = [f]
    opt = BatchedLBFGS(P, M * D, history, initial_step, max_backtracks, keys.device)
    for it in range(iterations):
        with record_function("kvsculpt.key_step"):  # named for torch.profiler: where the compression time goes
            x, f, g = opt.step(lambda rows, xs: fn(None if rows is opt.every else rows, xs), x, f, g)
        trace.append(f)
        if (it + 1) % value_every == 0 or it == iterations - 1:
            with record_function("kvsculpt.value_solve"):
                values = solve_values(pb, x.view(P, M, D), ridge)
            f, g = fn(None, x)
            opt.objective_changed()
            trace.append(f)
    return x.view(P, M, D), values, f, torch.stack(trace)


@dataclass
class KVSculpt(SelectFit):
    lse_weight: float = 0.1
    target_window: int = 128
    iterations: int = 100
    value_every: int = 5
    history: int = 10
    initial_step: float = 0.05
    max_backtracks: int = 8

    def __post_init__(self):
        super().__post_init__()
        if self.lse_weight < 0 or self.iterations < 0:
            raise BudgetError("lse_weight and iterations must be >= 0")
        if min(self.value_every, self.history) < 1 or self.initial_step <= 0:
            raise BudgetError("value_every and history must be >= 1 and initial_step > 0")

    def fit(self, pb: Problems, keys: torch.Tensor, iterations: int | None = None):
        n = self.iterations if iterations is None else iterations
        keys, values, loss, _ = sculpt(pb, keys, self.ridge, self.lse_weight, n, self.value_every,
                                       self.history, self.initial_step, self.max_backtracks)
        return keys, values, loss
