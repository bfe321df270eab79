"""KVSculpt and Select+Fit: the value solve, the optimiser, the allocator, and the stores they leave."""
from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

from kvbench import registry
from kvbench.cli import main
from kvbench.methods.kvsculpt import BatchedLBFGS, sculpt
from kvbench.methods.selectfit import Problems, attend, objective, objective_and_key_grad, redistribute, solve_values
from kvbench.engine import Engine
from tests.conftest import prompt, sample, tiny


def random_problems(P=3, R=96, E=6, M=12, D=8, seed=0, pad_last=4, N=None) -> tuple[Problems, torch.Tensor, torch.Tensor]:
    """Problems whose targets come from a real attention over E exact + N middle keys; returns the batch,
    initial free keys (a subset of the middle) and the whole middle keys [P, N, D]."""
    g = torch.Generator().manual_seed(seed)
    N = N or 3 * M
    q = torch.randn(P, R, D, generator=g)
    ke, ve = torch.randn(P, E, D, generator=g), torch.randn(P, E, D, generator=g)
    km, vm = 1.5 * torch.randn(P, N, D, generator=g), torch.randn(P, N, D, generator=g)
    scale = D ** -0.5
    s = torch.einsum("prd,pnd->prn", q, torch.cat([ke, km], 1)) * scale
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("prn,pnd->prd", torch.softmax(s, -1), torch.cat([ve, vm], 1))
    free_mask = torch.ones(P, M, dtype=torch.bool)
    free_mask[-1, M - pad_last:] = False
    keys = km[:, :M].clone().masked_fill(~free_mask[..., None], 0.0)
    prior = vm[:, :M].clone().masked_fill(~free_mask[..., None], 0.0)
    pb = Problems(q, out, lse, torch.einsum("prd,ped->pre", q, ke) * scale, ve, free_mask, prior,
                  (out ** 2).sum(-1).mean(-1), scale)
    return pb, keys, (km, vm)


@pytest.mark.parametrize("rows, slots", [(96, 12), (8, 40)])  # the M x M system, then the R x R (dual) one
def test_value_solve_matches_direct_least_squares(rows, slots):
    pb, keys, _ = random_problems(R=rows, M=slots)
    values = solve_values(pb, keys, ridge=0.3)
    fixed, _, p_free = attend(pb, keys, torch.zeros_like(keys))  # the exact part's share of the output
    for p in range(len(keys)):
        m = int(pb.free_mask[p].sum())
        A = p_free[p, :, :m].double()
        lam = float(pb.ridge[p])
        stacked = torch.cat([A, math.sqrt(lam) * torch.eye(m, dtype=A.dtype)])
        rhs = torch.cat([(pb.out[p] - fixed[p]).double(), math.sqrt(lam) * pb.prior_values[p, :m].double()])
        direct = torch.linalg.lstsq(stacked, rhs).solution
        torch.testing.assert_close(values[p, :m].double(), direct, rtol=1e-4, atol=1e-5)
        assert bool((values[p, m:] == 0).all())
    # ... and it is the minimiser of the objective the key optimisation sees (zero gradient in the values)
    with torch.enable_grad():
        v = values.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(pb, keys, v, 0.3).sum(), v)
    assert float(grad.abs().max()) < 1e-4


def test_objective_never_increases_and_drops():
    pb, keys, _ = random_problems(seed=1)
    start = objective(pb, keys, solve_values(pb, keys, 1e-3), 0.5)
    pb.ridge = None
    new_keys, values, final, trace = sculpt(pb, keys, ridge=1e-3, lse_weight=0.5, iterations=25, value_every=5)
    steps = trace[1:] - trace[:-1]
    assert bool((steps <= 1e-6 * trace[:-1]).all()), "the objective went up"
    torch.testing.assert_close(trace[0], start)
    assert bool((final < 0.7 * start).all()), (start, final)
    torch.testing.assert_close(final, objective(pb, new_keys, values, 0.5), rtol=1e-4, atol=1e-7)
    assert bool((new_keys[-1, -4:] == 0).all())  # padded free slots stay untouched


@pytest.mark.parametrize("lse_weight", [0.0, 0.5])
def test_the_written_out_key_gradient_is_autograds(lse_weight):
    """In float64, padded free slots included (their gradient is zero)."""
    pb, keys, _ = random_problems(seed=4)
    values = solve_values(pb, keys, 0.1)
    pb64 = Problems(*(t.double() if torch.is_floating_point(t) else t for t in
                      (pb.queries, pb.out, pb.lse, pb.exact_scores, pb.exact_values, pb.free_mask, pb.prior_values,
                       pb.out_scale)), pb.scale, pb.ridge.double())
    k = (keys.double() + 0.3 * torch.randn(keys.shape, generator=torch.Generator().manual_seed(1)).double())
    k = k.masked_fill(~pb.free_mask[..., None], 0.0)
    f, g = objective_and_key_grad(pb64, k, values.double(), lse_weight)
    with torch.enable_grad():
        kg = k.clone().requires_grad_(True)
        f_ref = objective(pb64, kg, values.double(), lse_weight)
        (g_ref,) = torch.autograd.grad(f_ref.sum(), kg)
    torch.testing.assert_close(f, f_ref.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
    assert bool((g[~pb.free_mask] == 0).all())


def quadratics(scales: torch.Tensor, seed: int):
    """P diagonal quadratics sum scales (x - target)^2 as an L-BFGS ``fn``, and a random start."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(scales.shape, generator=g)

    def quad(idx, x):
        diff = x - target[idx]
        return (scales[idx] * diff ** 2).sum(-1), 2 * scales[idx] * diff

    quad.target, quad.generator = target, g
    return quad, torch.randn(scales.shape, generator=g)


def two_loop_direction(opt: BatchedLBFGS, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The textbook two-loop recursion (Nocedal and Wright, algorithm 7.4) per problem: the reference."""
    out = []
    for p in range(len(g)):
        c = int(opt.count[p])
        if c == 0:
            out.append(opt.steepest(x[p:p + 1], g[p:p + 1])[0])
            continue
        newest = torch.argsort(opt.age[p])[-c:]  # the slots in use, oldest first
        S, Y = opt.pairs[p, newest].double(), opt.pairs[p, opt.h + newest].double()
        q, alphas = g[p].double().clone(), []
        for s, y in zip(reversed(S), reversed(Y)):
            a = (s @ q) / (s @ y)
            q -= a * y
            alphas.append(a)
        r = q * (S[-1] @ Y[-1]) / (Y[-1] @ Y[-1])
        for s, y, a in zip(S, Y, reversed(alphas)):
            r += (a - (y @ r) / (s @ y)) * s
        out.append(-r)
    return torch.stack(out).to(g.dtype)


def test_the_compact_lbfgs_direction_is_the_two_loop_recursions():
    """Histories of every length (0 to full, after rejected steps reset some), on an ill-conditioned quadratic."""
    P, n = 5, 12
    quad, x = quadratics(torch.logspace(0, 3, n)[None, :] * torch.tensor([1.0, 2.0, 5.0, 0.5, 3.0])[:, None], seed=3)
    opt = BatchedLBFGS(P, n, history=4, initial_step=0.1, max_backtracks=20, device="cpu")
    f, grad = quad(torch.arange(P), x)
    seen = set()
    for it in range(14):  # more pushes than slots: the ring wraps
        if it == 5:
            opt.count[1:3] = torch.tensor([0, 2])  # as a rejected step or a short history leaves them
        seen.update(opt.count.tolist())
        torch.testing.assert_close(opt.direction(x, grad), two_loop_direction(opt, x, grad), rtol=2e-4, atol=1e-6)
        x, f, grad = opt.step(quad, x, f, grad)
    assert {0, 2, 4} <= seen


def test_compiled_objective_gives_the_eager_iterates():
    """The GPU's default (torch.compile of the objective and gradient), here on the CPU: the same optimisation
    to float32 rounding."""
    pb, keys, _ = random_problems(P=4, R=48, M=10, D=8)
    runs = []
    for compiled in (False, True):
        pb.ridge = None
        runs.append(sculpt(pb, keys.clone(), 1.0, 0.1, 12, 4, compiled=compiled))
    (k0, v0, f0, t0), (k1, v1, f1, t1) = runs
    torch.testing.assert_close(t1, t0, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(k1, k0, rtol=1e-3, atol=1e-4)
    assert bool((t1[1:] <= t1[:-1] + 1e-6).all())


def test_lbfgs_solves_quadratics_and_rejects_bad_steps():
    P, n = 4, 10
    quad, x = quadratics(torch.logspace(0, 2, n)[None, :] * torch.tensor([1.0, 3.0, 10.0, 0.3])[:, None], seed=0)
    target = quad.target
    g = quad.generator
    opt = BatchedLBFGS(P, n, history=8, initial_step=0.1, max_backtracks=20, device="cpu")
    f, grad = quad(torch.arange(P), x)
    for _ in range(60):
        x, f, grad = opt.step(quad, x, f, grad)
    torch.testing.assert_close(x, target, rtol=1e-3, atol=1e-3)

    # A function that only gets worse away from x0: every step is rejected, x and f stay.
    x0 = torch.randn(P, n, generator=g)

    def spike(idx, x):
        moved = (x != x0[idx]).any(-1).float()
        return (x ** 2).sum(-1) + 1e3 * moved, 2 * x

    opt = BatchedLBFGS(P, n, history=8, initial_step=0.1, max_backtracks=5, device="cpu")
    f0, g0 = spike(torch.arange(P), x0)
    x1, f1, _ = opt.step(spike, x0, f0, g0)
    assert torch.equal(x1, x0) and torch.equal(f1, f0) and bool((opt.count == 0).all())


def test_an_lbfgs_step_waits_for_the_device_once_per_backtracking_round():
    """KVSculpt runs 100 steps a compression, in lanes beside other runs: each boolean index is a host sync on
    the GPU (nonzero), each .any() too (item). A step whose first try is accepted everywhere syncs once (the
    problems still searching); one where some must backtrack, once a round (the boolean-indexed step before
    synced 20 times in the first case)."""
    from torch.profiler import ProfilerActivity, profile
    P, n = 6, 5
    target = torch.arange(float(P * n)).view(P, n) / 10

    def quad(idx, x):
        return ((x - target[idx]) ** 2).sum(-1), 2 * (x - target[idx])

    def syncs(opt, x):
        f, g = quad(torch.arange(P), x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.step(quad, x, f, g)
        counts = {e.key: e.count for e in prof.key_averages()}
        return counts.get("aten::nonzero", 0) + counts.get("aten::item", 0) + counts.get("aten::is_nonzero", 0)

    assert syncs(BatchedLBFGS(P, n, history=4, initial_step=0.5, max_backtracks=8, device="cpu"), target + 1) == 1
    # a first move 40x the keys' norm overshoots everywhere: rounds of halving until Armijo holds
    overshoot = BatchedLBFGS(P, n, history=4, initial_step=40.0, max_backtracks=8, device="cpu")
    assert 2 <= syncs(overshoot, target + 1) <= 9


def test_halvings_tried_in_blocks_find_the_one_at_a_time_iterates():
    """After the first halving, ``block`` step lengths are evaluated at once (one host sync a round instead of
    one a halving) and each problem keeps its first acceptable one: the same iterates, bit for bit, as halving
    one at a time, in fewer rounds."""
    P, n = 8, 9
    quad, x0 = quadratics(torch.logspace(0, 2, n)[None, :] * torch.linspace(0.5, 4.0, P)[:, None], seed=5)
    cliff = torch.zeros(P)
    cliff[:2] = 1e6  # two problems may move only 1e-3 from where they start: many halvings each step

    def fn(rows, xs):
        f, g = quad(rows, xs)
        away = xs - x0[rows]
        over = (away.norm(dim=-1) - 1e-3).clamp(min=0)
        pull = (cliff[rows] * 2 * over / away.norm(dim=-1).clamp(min=1e-30))[:, None] * away
        return f + cliff[rows] * over ** 2, g + pull

    runs = []
    for block in (1, 4):
        opt = BatchedLBFGS(P, n, history=4, initial_step=0.1, max_backtracks=16, device="cpu", block=block)
        calls, x = [], x0.clone()
        f, g = fn(torch.arange(P), x)
        for _ in range(10):
            x, f, g = opt.step(lambda rows, xs: calls.append(len(rows)) or fn(rows, xs), x, f, g)
        runs.append((x, f, len(calls)))
    (x1, f1, calls1), (x4, f4, calls4) = runs
    assert torch.equal(x1, x4) and torch.equal(f1, f4)
    assert calls4 < calls1 * 0.6, (calls4, calls1)


def test_problems_stuck_at_their_optimum_are_not_searched_again(monkeypatch):
    """A problem fitted exactly (as many free slots as middle tokens) converges to float32 noise, where every
    try fails: from the same point along steepest descent it would search the same way again, so it is left
    out of the backtracking until the value solve changes the function. Same iterates, bit for bit, as
    searching it; far fewer evaluations (each backtracking round is a host sync on the GPU)."""
    def run(skip: bool):
        pb, keys, _ = random_problems(P=16, R=64, M=24, D=16, E=8, N=24, seed=3)
        evaluations = []
        original = BatchedLBFGS.step

        def step(self, fn, x, f, g):
            if not skip:
                self.stuck.zero_()  # what the step did before: search everything that failed its first try
            return original(self, lambda idx, xs: evaluations.append(len(idx)) or fn(idx, xs), x, f, g)

        monkeypatch.setattr(BatchedLBFGS, "step", step)
        keys, values, final, trace = sculpt(pb, keys, ridge=1.0, lse_weight=0.1, iterations=60, value_every=5)
        monkeypatch.undo()
        return keys, final, trace, len(evaluations)

    keys, final, trace, evaluations = run(skip=True)
    keys_all, final_all, trace_all, evaluations_all = run(skip=False)
    assert torch.equal(keys, keys_all) and torch.equal(final, final_all) and torch.equal(trace, trace_all)
    assert evaluations_all > 5 * 60 and evaluations < evaluations_all / 2, (evaluations, evaluations_all)


def test_full_middle_budget_reproduces_attention():
    """Free slots as many as the middle, started from it: the optimum is the original cache and the
    optimisation stays there (within the ridge)."""
    pb, _, (km, vm) = random_problems(seed=2, M=24, N=24, pad_last=0)
    keys, values, final, _ = sculpt(pb, km, ridge=1e-6, lse_weight=1.0, iterations=10, value_every=5)
    out, lse, _ = attend(pb, keys, values)
    assert float(((out - pb.out).norm() / pb.out.norm())) < 1e-3
    assert float((lse - pb.lse).abs().max()) < 1e-3
    assert float(final.max()) < 1e-5


@pytest.mark.parametrize("params", [{}, {"adaptive": True}])
@pytest.mark.parametrize("name", ["selectfit", "kvsculpt"])
def test_budget_one_equals_full(name, params):
    lm = tiny("llama")
    s = sample(prompt(90, 3), prompt(5, 4), new=10)
    full = Engine(lm, registry.build_method("full", 1.0))
    ours = Engine(lm, registry.build_method(name, 1.0, params))
    assert ours.generate([s])[0]["prediction"] == full.generate([s])[0]["prediction"]
    torch.testing.assert_close(ours.prefill(s)[1], full.prefill(s)[1])


def test_redistribute_conserves_and_respects_floor_and_cap():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = 30
        difficulty = torch.exp(6 * torch.rand(n, generator=g))  # spans ~400x, like the paper's heads
        base = torch.randint(5, 60, (n,), generator=g)
        most = base + torch.randint(0, 200, (n,), generator=g)
        counts = redistribute(difficulty, base, most, floor=0.3, cap=3.0)
        lo, hi = torch.ceil(0.3 * base.double()), torch.minimum(torch.floor(3.0 * base.double()), most.double())
        assert int(counts.sum()) == int(base.sum())
        assert bool((counts >= lo).all()) and bool((counts <= hi).all())
        # in proportion: where neither bound binds, budgets follow the difficulty
        free = (counts > lo) & (counts < hi)
        if int(free.sum()) >= 2:
            ratio = counts[free].double() / difficulty[free].double()
            assert float(ratio.max() / ratio.min()) < 1.0 + 2.0 / float(counts[free].min())
    same = redistribute(torch.zeros(4), torch.tensor([3, 4, 5, 6]), torch.tensor([9, 9, 9, 9]), 0.5, 2.0)
    assert same.tolist() == [3, 4, 5, 6]


@pytest.mark.parametrize("name,params", [("kvsculpt", {"iterations": 6}), ("selectfit", {})])
def test_adaptive_heads_are_ragged_and_held_for_real(name, params):
    lm = tiny("llama")
    ctx = prompt(200, 5)
    eng = Engine(lm, registry.build_method(name, 0.25, {"adaptive": True, **params}))
    cache, _, info = eng.prefill(sample(ctx, []))
    counts = cache.token_counts()  # [layers, B, H]
    assert int(counts.sum()) == counts.numel() * 50  # int(0.25 * 200) per head on average, all conserved
    assert len(set(counts.flatten().tolist())) > 1, "adaptive budgets should differ between heads"
    for store in cache.stores:
        assert store.k.shape[0] == int(store.length.sum())  # no slack: what is counted is what is there
        per_slot = 2 * store.D * store.k.element_size() + store.pos.element_size()
        assert store.nbytes() == int(store.length.sum()) * per_slot + 3 * 8 * store.B * store.H
        idx, valid = store.slot_index()
        for seg in range(store.B * store.H):
            pos = store.pos[idx[seg][valid[seg]]]
            real = sorted(pos[pos >= 0].tolist())
            assert real == [0, 1, 2, 3] + list(range(200 - 32, 200))  # sinks and recent window stay exact
            assert int((pos == -1).sum()) == int(store.length[seg]) - 36
        # attention reads each head's own length: compare with a dense per-head computation
        q = torch.randn(1, 4, 3, store.D)
        out, lse = store.attend(q, 0.25)
        for h in range(store.H):
            sl = idx[h][valid[h]]
            s = torch.einsum("gtd,sd->gts", q[0, 2 * h:2 * h + 2], store.k[sl]) * 0.25
            torch.testing.assert_close(out[0, 2 * h:2 * h + 2], torch.softmax(s, -1) @ store.v[sl])
            torch.testing.assert_close(lse[0, 2 * h:2 * h + 2], torch.logsumexp(s, -1))
    assert info["kv_bytes_prefill"] == cache.nbytes()


def test_chunked_prefill_keeps_the_budget():
    lm = tiny("qwen2")
    eng = Engine(lm, registry.build_method("kvsculpt", 0.3, {"iterations": 4}), prefill_chunk=64)
    cache, _, _ = eng.prefill(sample(prompt(192, 8), []))
    assert (cache.token_counts() == int(0.3 * 192)).all()  # kvpress's convention: int(T * budget)


def test_sculpt_beats_select_fit_beats_selection():
    """The fitted values lower the error of the selected tokens; the optimised keys lower it further."""
    pb, keys, (km, vm) = random_problems(seed=3, pad_last=0)
    M = keys.shape[1]
    selectfit = registry.build_method("selectfit", 0.3)
    kvsculpt = registry.build_method("kvsculpt", 0.3)
    _, _, fitted = selectfit.fit(pb, keys)
    original = objective(pb, keys, vm[:, :M], 0.0)  # same objective (the fit fixed its ridge)
    pb.ridge = None
    _, _, sculpted = kvsculpt.fit(pb, keys)
    assert bool((fitted < original).all()) and bool((sculpted < 0.8 * fitted).all()), (original, fitted, sculpted)


def test_bad_parameters_are_one_line_errors(tmp_path):
    cases = [(["-m", "targets=somewhere"], "unknown targets"), (["-m", "floor=2"], "floor"),
             (["-m", "ridge=0"], "ridge")]
    for args, needle in cases:
        res = CliRunner().invoke(main, ["run", "--method", "kvsculpt", "--task", "niah", *args, "--out", str(tmp_path)])
        lines = [line for line in res.output.strip().splitlines() if line]
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], res.output


def test_the_matmul_precision_is_set_inside_the_block_only():
    from kvbench.methods.selectfit import fp32_matmul_precision
    backend = torch.backends.cuda.matmul
    before = backend.fp32_precision
    with fp32_matmul_precision("tf32"):
        assert backend.fp32_precision == "tf32"
        with fp32_matmul_precision("float32"):
            assert backend.fp32_precision == "ieee"
        assert backend.fp32_precision == "tf32"
    with pytest.raises(RuntimeError), fp32_matmul_precision("tf32"):
        raise RuntimeError("the block failed")
    assert backend.fp32_precision == before


def test_large_systems_solved_one_at_a_time_equal_the_batched_solve():
    from kvbench.methods.selectfit import cholesky_solve
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 40, 24, generator=g, dtype=torch.float64)
    system = a.transpose(1, 2) @ a + 0.1 * torch.eye(24, dtype=torch.float64)
    rhs = torch.randn(3, 24, 5, generator=g, dtype=torch.float64)
    one_by_one, batched = cholesky_solve(system, rhs, batched_up_to=0), cholesky_solve(system, rhs)
    torch.testing.assert_close(one_by_one, batched)
    torch.testing.assert_close(system @ batched, rhs)
    singular = system.clone()
    u = torch.randn(24, 3, generator=g, dtype=torch.float64)
    singular[1] = u @ u.T  # rank 3, not positive definite: solved after the jitter, the others untouched
    solved = cholesky_solve(singular, rhs, batched_up_to=0)
    assert torch.isfinite(solved).all() and torch.allclose(solved[0], batched[0])


def test_batches_bound_padding_and_memory():
    method = registry.build_method("kvsculpt", 0.3, {"batch_elements": 10_000})
    sizes = [(50, 4, f) for f in (3, 90, 7, 40, 5, 12, 100, 60, 1, 25)]
    groups = method.groups(sizes)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    for g in groups:
        free = [sizes[i][2] for i in g]
        assert max(free) <= 2 * max(min(free), 1)
        assert len(g) * max(50 * (4 + f) for f in free) <= 10_000 or len(g) == 1


def test_select_fit_waits_for_the_device_as_often_for_one_sequence_as_for_three():
    """Each read-back of a device value is a host sync on the GPU: they stay per layer (the problems' slot
    counts in one read-back a layer), not per problem (there were several a problem: 977 in a 16k prefill).
    (The adaptive allocation's bisection reads its sums hundreds of times a sequence: from host tensors, which
    this CPU count cannot tell from device ones.)"""
    from torch.profiler import ProfilerActivity, profile
    lm = tiny("qwen2")
    eng = Engine(lm, registry.build_method("selectfit", 0.25))

    def syncs(batch: int) -> int:
        ids = torch.tensor([prompt(200, seed) for seed in range(batch)])
        cache = eng.new_cache(batch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            eng.forward(cache, ids, compress=True)
        counts = {e.key: e.count for e in prof.key_averages()}
        return sum(counts.get(k, 0) for k in ("aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero"))

    assert syncs(1) == syncs(3) > 0
