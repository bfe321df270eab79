"""``selectfit``: attention-score eviction, then a least-squares fit of the kept values.

The Select+Fit baseline of Jiang and Jin, "KVSculpt: KV Cache Compression as Distillation" (arXiv
2603.27819; no official code): keep the tokens the observation window attends to most (scored as SnapKV scores them), then
replace the values of the kept tokens by the ridge least-squares solution that best reproduces, for a set
of target queries, the attention output the whole cache gave them. Keys stay the selected original keys.

Per (layer, KV head) the cache is split into an *exact* part (the first ``sinks`` tokens and the last
``recent`` ones, kept untouched with their real positions) and a *free* part of ``m`` slots that replaces
the rest (the middle). The fit is over the free values only, against the full output with the exact part
held fixed: ``out'(q) = P_E(q) V_E + P_F(q) V'``, with the softmax over exact plus free slots.

Choices the paper leaves open (shared with ``kvsculpt``, which starts from this method):

- Targets: the queries of the compressed chunk, all grouped query heads of the KV head, from its last
  ``target_window`` positions (0: all positions but the first ``sinks``, whose queries only ever saw
  themselves), at most ``max_targets`` of them, evenly spaced. ``targets="future"`` (default) re-rotates each
  query to a position just after the context (``seen + u``, u uniform in ``[0, future_span)``, seeded), so
  that targets look at the cache from where later tokens will; ``targets="prompt"`` keeps the queries at
  their own positions (they then attend to keys after themselves, which they never did in the model). The
  target outputs and log-sum-exps are the queries' attention over the whole uncompressed store, in float32.
  A model without rotary embeddings has nothing to re-rotate: its queries are used as they are.
  The default ``target_window = 0`` (all prompt queries re-rotated) was the best for the value fit alone;
  ``kvsculpt``'s key optimisation wants the opposite (its own default is 128): it fits whatever targets it
  gets closely, and early prompt queries re-rotated to the future attend in ways later tokens do not
  (measurements: results/kvsculpt/README.md).
- Selection: SnapKV's observation-window scores (``window`` queries, max-pooled over ``kernel`` slots),
  averaged over the query heads of the KV head; the ``m`` best middle tokens start the free part.
- Ridge: the value solve minimises ``mean_q |out' - out|^2 / mean_q |out|^2 + c |V' - V_0|^2``, where ``V_0``
  are the original values of the selected tokens, with ``c`` set once per problem so that the ridge is
  ``ridge`` times the mean diagonal of the initial normal matrix; solved by Cholesky in float64. Pulling
  towards the selected values (not towards zero) matters: with few targets a fit towards zero generalised
  worse than no fit at all; ``ridge = 1`` was the best of 0.01 to 10 (results/kvsculpt/README.md).
- Precision: on CUDA the normal matrix A'A (R x M x M multiply-adds, the solve's largest product when the
  targets outnumber the free slots: 12,288 rows at 16k) is formed from TF32-rounded probabilities with float32
  sums: its effect on the solved values is far below the bfloat16 rounding they are stored with (measured:
  results/kvsculpt/README.md). The right-hand side is float32, the Cholesky float64; the CPU computes the
  normal matrix in float32.
- Budget: the kept fraction counts every slot a head holds (exact and free alike); a budget smaller than
  ``sinks + recent`` shrinks the recent window first. A head whose budget covers its middle keeps it exact.
- Adaptive budgets (``adaptive=True``; the KVSculpt paper's allocation, here for both methods, so its effect
  can be told apart from the key optimisation's): a pilot fit per (layer, KV head) at the uniform budget
  (``fit`` with ``pilot_iterations``: Select+Fit's pilot is its value solve); a head's difficulty is the
  pilot objective times ``mean |out|^2`` (the absolute output error, as the paper's pilot MSE), raised to
  ``allocation_power``; free slots are split in proportion to it, each head between ``floor`` and ``cap``
  times its uniform share (and at most its middle), the total of every sequence conserved exactly (largest
  remainders). Heads whose uniform budget already covers their middle, and the exact slots, are outside
  the redistribution (its effect against uniform budgets: results/kvsculpt/README.md).
- Layers: each layer's targets and scores are taken in its own ``compress`` call; the fits of all layers
  run together (batched on the device) in the whole-cache hook ``compress_cache``, once the chunk has passed
  every layer, so until then the layers hold their full chunk. With chunked prefill this repeats after every chunk; free slots of earlier chunks (position -1)
  belong to the middle and are compressed again. Problems are batched by similar free size, each batch's
  padded score tensor under ``batch_elements`` entries.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.profiler import record_function

from kvbench.cache import LayerCall, RaggedKV, fraction_target
from kvbench.kernels.decode_attention import ragged_attention_many_queries
from kvbench.kernels.window_scores import pool_scores
from kvbench.method import BudgetError, Method
from kvbench.methods.snapkv import observation_scores
from kvbench.registry import UnknownNameError

TARGET_KINDS = ("future", "prompt")


@dataclass
class LayerTargets:
    """What a layer's ``compress`` call leaves for the batched fit at the last layer."""

    queries: torch.Tensor  # [B, Hq, R, D] float32, as the fit sees them (re-rotated for "future")
    out: torch.Tensor  # [B, Hq, R, D] float32 attention output over the whole store
    lse: torch.Tensor  # [B, Hq, R] float32
    scores: torch.Tensor  # [S] selection scores of the store's slots
    target: torch.Tensor  # [B] slots each head may hold
    scale: float  # the layer's softmax scale


class Item(NamedTuple):
    """A problem to fit: a (layer, segment) and its slot counts, read back from the device once a layer."""

    layer: int
    seg: int
    exact: int
    free: int
    middle: int


@dataclass
class Problems:
    """A batch of P compression problems (one per (layer, sequence, KV head)), padded to common sizes.

    Rows are target queries (R), free slots M, exact slots E. Everything is float32 except the masks."""

    queries: torch.Tensor  # [P, R, D]
    out: torch.Tensor  # [P, R, D]
    lse: torch.Tensor  # [P, R]
    exact_scores: torch.Tensor  # [P, R, E] scaled logits of the exact slots (-inf where padded)
    exact_values: torch.Tensor  # [P, E, D]
    free_mask: torch.Tensor  # [P, M] bool, valid free slots
    prior_values: torch.Tensor  # [P, M, D] the ridge pulls the free values towards these (selected originals)
    out_scale: torch.Tensor  # [P] mean squared norm of the target outputs
    scale: float
    ridge: torch.Tensor | None = None  # [P] absolute ridge on the normal matrix, fixed by the first solve

    def select(self, idx: torch.Tensor) -> "Problems":
        return Problems(self.queries[idx], self.out[idx], self.lse[idx], self.exact_scores[idx],
                        self.exact_values[idx], self.free_mask[idx], self.prior_values[idx], self.out_scale[idx],
                        self.scale,
                        None if self.ridge is None else self.ridge[idx])

    @property
    def free_counts(self) -> torch.Tensor:
        return self.free_mask.sum(dim=1)


def probabilities(pb: Problems, keys: torch.Tensor):
    """The targets' attention over exact + free slots: (lse [P, R], exact probs [P, R, E], free probs [P, R, M])."""
    free = torch.einsum("prd,pmd->prm", pb.queries, keys) * pb.scale
    free = free.masked_fill(~pb.free_mask[:, None, :], float("-inf"))
    lse = torch.logsumexp(torch.cat([pb.exact_scores, free], dim=-1), dim=-1)
    return lse, torch.exp(pb.exact_scores - lse[..., None]), torch.exp(free - lse[..., None])


def attend(pb: Problems, keys: torch.Tensor, values: torch.Tensor):
    """Attention of the targets over exact + free slots: (out [P, R, D], lse [P, R], free probs [P, R, M])."""
    lse, p_exact, p_free = probabilities(pb, keys)
    out = torch.einsum("pre,ped->prd", p_exact, pb.exact_values) + torch.einsum("prm,pmd->prd", p_free, values)
    return out, lse, p_free


def objective(pb: Problems, keys: torch.Tensor, values: torch.Tensor, lse_weight: float) -> torch.Tensor:
    """[P] relative output error + ``lse_weight`` x mean squared log-sum-exp error + ridge penalty."""
    out, lse, _ = attend(pb, keys, values)
    return _objective_of(pb, out, lse, values, lse_weight)


def _objective_of(pb: Problems, out: torch.Tensor, lse: torch.Tensor, values: torch.Tensor, lse_weight: float):
    rows = pb.queries.shape[1]
    err = ((out - pb.out) ** 2).sum(-1).mean(-1) / pb.out_scale
    penalty = pb.ridge / (rows * pb.out_scale) * ((values - pb.prior_values) ** 2).sum(dim=(-1, -2))
    f = err + penalty
    if lse_weight:
        f = f + lse_weight * ((lse - pb.lse) ** 2).mean(-1)
    return f


def objective_and_key_grad(pb: Problems, keys: torch.Tensor, values: torch.Tensor, lse_weight: float):
    """``objective`` [P] and its gradient in the free keys [P, M, D], written out: autograd's graph for this
    launches several times the kernels, and KVSculpt evaluates it a few hundred times a compression, whose time
    on the GPU was the launches, not the arithmetic (results/kvsculpt/README.md).

    With p the attention probabilities of a target row over all slots, out = sum p v and lse its log-sum-exp,
    d out / d logit_m = p_m (v_m - out) and d lse / d logit_m = p_m; a free logit is scale x q . k_m."""
    out, lse, p_free = attend(pb, keys, values)
    rows = pb.queries.shape[1]
    diff = out - pb.out
    grad_out = diff * (2.0 / (rows * pb.out_scale))[:, None, None]  # d f / d out, [P, R, D]
    grad_logit = torch.einsum("prd,pmd->prm", grad_out, values) - (grad_out * out).sum(-1, keepdim=True)
    if lse_weight:
        grad_logit = grad_logit + (2.0 * lse_weight / rows) * (lse - pb.lse)[..., None]
    grad_keys = torch.einsum("prm,prd->pmd", p_free * grad_logit, pb.queries) * pb.scale
    return _objective_of(pb, out, lse, values, lse_weight), grad_keys


@contextlib.contextmanager
def fp32_matmul_precision(precision: str):
    """CUDA's float32 matrix products in ``precision`` ("tf32": inputs rounded to 10 mantissa bits, float32
    sums) inside the block, as they were after it. The CPU computes in float32 either way."""
    backend = torch.backends.cuda.matmul
    before = backend.fp32_precision
    backend.fp32_precision = "tf32" if precision == "tf32" else "ieee"
    try:
        yield
    finally:
        backend.fp32_precision = before


def solve_values(pb: Problems, keys: torch.Tensor, ridge: float, gram: str = "tf32") -> torch.Tensor:
    """The free values minimising ``objective`` for fixed keys: the ridge normal equations, in float64.

    With A the free attention probabilities [R, M], r what the exact part leaves of the target outputs and
    V_0 the prior values, V = V_0 + (A'A + c I)^-1 A'(r - A V_0) = V_0 + A'(AA' + c I)^-1 (r - A V_0): the
    Cholesky runs on the smaller of the two systems, M x M or R x R (KVSculpt's 128-position target window
    gives fewer rows than free slots; what the solves cost: results/kvsculpt/README.md).
    The first call fixes each problem's ridge c (``ridge`` x the mean diagonal of A'A), so the objective
    stays one function of the keys and values from then on. ``gram``: the precision of CUDA's products that
    form A'A ("tf32" or "float32"; the docstring's Precision)."""
    with torch.no_grad():
        _, p_exact, p_free = probabilities(pb, keys)
        residual = pb.out - torch.einsum("pre,ped->prd", p_exact, pb.exact_values)  # what the exact part leaves
        rows, slots = p_free.shape[1], p_free.shape[2]
        if pb.ridge is None:  # trace of A'A / M, summed in float64
            diag_mean = p_free.square().sum(dim=(1, 2), dtype=torch.float64) / pb.free_counts.clamp(min=1)
            pb.ridge = (ridge * diag_mean).clamp(min=1e-30).float()
        c = pb.ridge.double()[:, None, None]
        prior = pb.prior_values.double()
        if rows < slots:  # the dual system, R x R
            a = p_free.double()
            system = torch.einsum("prm,psm->prs", a, a)
            rhs = residual.double() - torch.einsum("prm,pmd->prd", a, prior)
        else:
            with fp32_matmul_precision(gram):
                system = torch.einsum("prm,prn->pmn", p_free, p_free).double()
            rhs = torch.einsum("prm,prd->pmd", p_free, residual).double() + c * prior
        system.diagonal(dim1=-2, dim2=-1).add_(c[..., 0])
        solved = cholesky_solve(system, rhs)
        values = prior + torch.einsum("prm,prd->pmd", p_free.double(), solved) if rows < slots else solved
        return values.float().masked_fill(~pb.free_mask[..., None], 0.0)


def cholesky_solve(system: torch.Tensor, rhs: torch.Tensor, batched_up_to: int = 1024) -> torch.Tensor:
    """``system^-1 rhs`` for a batch of symmetric positive definite systems [P, N, N]. Systems larger than
    ``batched_up_to`` are factorised one at a time: for a batch, torch calls batched cuSOLVER / MAGMA kernels
    meant for many small matrices, several times slower on large ones (results/kvsculpt/README.md)."""
    if system.shape[-1] <= batched_up_to:
        return _cholesky_solve_batch(system, rhs)
    return torch.stack([_cholesky_solve_batch(s[None], r[None])[0] for s, r in zip(system, rhs)])


def _cholesky_solve_batch(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(system)
    if bool((info > 0).any()):  # float64 with a positive ridge: only for a pathological problem
        jitter = 1e-8 * system.diagonal(dim1=-2, dim2=-1).amax(-1)
        chol, _ = torch.linalg.cholesky_ex(system + torch.diag_embed(jitter[:, None].expand(-1, system.shape[-1])))
    return torch.cholesky_solve(rhs, chol)


def slots_first(mask: torch.Tensor) -> torch.Tensor:
    """``[N, L]`` column order putting each row's True entries first, in slot order: row ``n``'s first
    ``mask[n].sum()`` columns are its True ones (a count the caller knows on the host: no device sync)."""
    return torch.sort((~mask).to(torch.int16), dim=1, stable=True).indices


def redistribute(difficulty: torch.Tensor, base: torch.Tensor, most: torch.Tensor, floor: float, cap: float,
                 power: float = 1.0) -> torch.Tensor:
    """Integer budgets in proportion to ``difficulty ** power``, each within ``[ceil(floor * base),
    min(floor(cap * base), most)]``, summing to ``base.sum()`` exactly (1-D tensors of one sequence)."""
    base_f = base.double()
    lo = torch.ceil(floor * base_f)
    hi = torch.minimum(torch.floor(cap * base_f), most.double()).clamp(min=lo)
    total = base_f.sum()
    w = difficulty.double().clamp(min=0) ** power
    if not bool((w > 0).any()) or float(hi.sum()) < float(total) or float(lo.sum()) > float(total):
        return base.clone()
    lo_c, hi_c = 0.0, 1.0
    while float(torch.clamp(hi_c * w, lo, hi).sum()) < float(total):
        hi_c *= 2.0
    for _ in range(200):  # bisection on the proportionality constant
        mid = 0.5 * (lo_c + hi_c)
        if float(torch.clamp(mid * w, lo, hi).sum()) < float(total):
            lo_c = mid
        else:
            hi_c = mid
    real = torch.clamp(hi_c * w, lo, hi)
    counts = torch.floor(real).clamp(lo, hi)
    deficit = int(round(float(total - counts.sum())))
    if deficit > 0:
        frac = torch.where(counts < hi, real - counts, torch.full_like(real, -1.0))
        counts[torch.topk(frac, min(deficit, len(frac))).indices] += 1
    elif deficit < 0:
        frac = torch.where(counts > lo, real - counts, torch.full_like(real, 2.0))
        counts[torch.topk(-frac, min(-deficit, len(frac))).indices] -= 1
    return counts.round().long().to(base.device)


@dataclass
class LayerPlan:
    """How one layer's store splits: per segment the exact slots, the middle slots, and the free count."""

    layer: int
    idx: torch.Tensor  # [BH, L] slot numbers (padded view)
    exact: torch.Tensor  # [BH, L] bool
    middle: torch.Tensor  # [BH, L] bool
    free: torch.Tensor  # [BH] free slots wanted (0: drop the middle; >= middle count: keep it exact)


@dataclass
class SelectFit(Method):
    sinks: int = 4
    recent: int = 32
    window: int = 32
    kernel: int = 7
    targets: str = "future"
    max_targets: int = 2048
    target_window: int = 0
    future_span: int = 256
    ridge: float = 1.0
    seed: int = 0
    batch_elements: int = 2 ** 28
    adaptive: bool = False
    pilot_iterations: int = 5
    floor: float = 0.25
    cap: float = 4.0
    allocation_power: float = 1.0

    def __post_init__(self):
        if self.targets not in TARGET_KINDS:
            raise UnknownNameError(f"unknown targets '{self.targets}'; use one of {', '.join(TARGET_KINDS)}")
        if self.ridge <= 0:
            raise BudgetError(f"ridge must be positive (got {self.ridge}): the value solve needs it")
        if min(self.sinks, self.recent, self.pilot_iterations) < 0 or min(self.max_targets, self.future_span,
                                                                         self.batch_elements) < 1:
            raise BudgetError("sinks, recent and pilot_iterations must be >= 0; max_targets, future_span, "
                              "batch_elements >= 1")
        if not (0 < self.floor <= 1 <= self.cap):
            raise BudgetError(f"adaptive budgets need 0 < floor <= 1 <= cap (got floor={self.floor}, cap={self.cap})")

    # ---- per layer: remember targets and scores -----------------------------------------------------------
    def compress(self, call: LayerCall) -> None:
        pending: dict[int, LayerTargets] = call.cache.method_state.setdefault("selectfit", {})
        store: RaggedKV = call.store
        target = fraction_target(self.budget, call.seen)
        if bool((store.length > target.repeat_interleave(store.H)).any()):
            pending[call.layer] = self.layer_targets(call, target)

    def compress_cache(self, cache) -> None:
        pending: dict[int, LayerTargets] = cache.method_state.pop("selectfit", {})
        if pending:
            self.compress_layers(cache, pending)

    @record_function("selectfit.targets")  # named for torch.profiler: where the compression time goes
    def layer_targets(self, call: LayerCall, target: torch.Tensor) -> LayerTargets:
        store: RaggedKV = call.store
        q, positions = call.queries, call.positions
        T = q.shape[2]
        first = min(self.sinks, T - 1)
        if self.target_window:
            first = max(first, T - self.target_window)
        n = min(self.max_targets, T - first)
        rows = torch.linspace(first, T - 1, n, device=q.device).round().long()
        q = q[:, :, rows]
        if self.targets == "future" and call.cache.rope is not None:
            g = torch.Generator().manual_seed(self.seed)
            offsets = torch.randint(0, self.future_span, (n,), generator=g).to(q.device)
            future = call.seen[:, None] + offsets[None, :]
            q = call.cache.rope(call.cache.rope(q.float(), positions[:, rows], inverse=True), future)
        q = q.float()
        lengths = store.host_length  # known on the host while prefilling: no device sync
        out, lse = ragged_attention_many_queries(q, store.k, store.v, store.start, store.length, call.scale,
                                                 host_lengths=lengths)
        scores = observation_scores(call, self.window)
        if self.kernel > 1:
            scores = pool_scores(scores, store.start, store.length, self.kernel, "max",
                                 width=None if lengths is None else max(lengths, default=0))
        return LayerTargets(q, out.float(), lse, scores, target, call.scale)

    # ---- all layers at once -----------------------------------------------------------------------------
    def plan(self, layer: int, store: RaggedKV, target: torch.Tensor) -> LayerPlan:
        """Exact and middle slots of every segment, and the free slots of a uniform budget."""
        idx, valid = store.padded_slots()  # as wide as the largest capacity: known on the host, no sync
        pos = torch.where(valid, store.pos[idx].long(), torch.full_like(idx, -1))
        per_seg = target.repeat_interleave(store.H).to(idx.device)
        sinks = per_seg.clamp(max=self.sinks)
        recent = (per_seg - sinks).clamp(max=self.recent)
        newest = pos.max(dim=1).values
        exact = valid & (pos >= 0) & ((pos < sinks[:, None]) | (pos > (newest - recent)[:, None]))
        middle = valid & ~exact
        free = (per_seg - exact.sum(1)).clamp(min=0)
        return LayerPlan(layer, idx, exact, middle, free)

    def allocate(self, cache, plans: list[LayerPlan], pending: dict[int, LayerTargets]) -> None:
        """``adaptive``: move free slots across the heads and layers of each sequence, in proportion to a pilot
        fit's error (the method's own ``fit`` with ``pilot_iterations``: for Select+Fit, its value solve)."""
        if not self.adaptive:
            return
        pilot = self.fit_plans(cache, plans, pending, iterations=self.pilot_iterations)
        by_layer = {p.layer: p for p in plans}
        pool = [(layer, seg, loss) for layer, (segs, _, _, losses) in pilot.items() for seg, loss in zip(segs, losses)]
        if not pool:
            return
        H = cache.stores[plans[0].layer].H
        moved: dict[int, tuple[list[int], list[int]]] = {}  # layer -> its segments and their new free counts
        for b in sorted({seg // H for _, seg, _ in pool}):
            mine = [(layer, seg, loss) for layer, seg, loss in pool if seg // H == b]
            # on the host: the allocation's bisection reads its sums a few hundred times (each a device sync)
            base, most = torch.stack([torch.stack([by_layer[layer].free[seg], by_layer[layer].middle[seg].sum()])
                                      for layer, seg, _ in mine], dim=1).cpu()
            difficulty = torch.tensor([loss for _, _, loss in mine], dtype=torch.float64)
            counts = redistribute(difficulty, base, most, self.floor, self.cap, self.allocation_power).tolist()
            for (layer, seg, _), c in zip(mine, counts):
                moved.setdefault(layer, ([], []))[0].append(seg)
                moved[layer][1].append(c)
        for layer, (segs, counts) in moved.items():  # one copy to the device a layer
            free = by_layer[layer].free
            free[torch.tensor(segs, device=free.device)] = torch.tensor(counts, dtype=free.dtype, device=free.device)


    def compress_layers(self, cache, pending: dict[int, LayerTargets]) -> None:
        plans = [self.plan(layer, cache.stores[layer], t.target) for layer, t in sorted(pending.items())]
        self.allocate(cache, plans, pending)
        fitted = self.fit_plans(cache, plans, pending)
        for plan in plans:
            self.write_back(cache.stores[plan.layer], plan, *fitted[plan.layer])

    def problems_of(self, cache, plans: list[LayerPlan], pending: dict[int, LayerTargets]) -> list[Item]:
        """The problems to fit: the segments whose budget is smaller than their middle, with their slot counts.
        One host sync a layer (each is a wait for the device)."""
        out = []
        for plan in plans:
            n_mid = plan.middle.sum(1)
            fits = (plan.free > 0) & (plan.free < n_mid)
            rows = torch.stack([fits.long(), plan.exact.sum(1), plan.free.long(), n_mid], dim=1).tolist()
            out += [Item(plan.layer, seg, *counts) for seg, (fit, *counts) in enumerate(rows) if fit]
        return out

    def build(self, cache, plans: dict[int, LayerPlan], pending: dict[int, LayerTargets],
              items: list[Item]) -> tuple[Problems, torch.Tensor]:
        """The padded problem batch for ``items`` and its initial free keys [P, M, D] (the best-scored
        middle tokens)."""
        q_rows, outs, lses, e_keys, e_vals, f_keys, f_vals = [], [], [], [], [], [], []
        packed = {}  # per layer: the exact and the middle slots of every segment first (``slots_first``)
        for layer, seg, exact, free, middle in items:
            plan, t, store = plans[layer], pending[layer], cache.stores[layer]
            if layer not in packed:
                packed[layer] = slots_first(plan.exact), slots_first(plan.middle)
            b, h = divmod(seg, store.H)
            G = t.queries.shape[1] // store.H
            q_rows.append(t.queries[b, h * G:(h + 1) * G].reshape(-1, store.D))
            outs.append(t.out[b, h * G:(h + 1) * G].reshape(-1, store.D))
            lses.append(t.lse[b, h * G:(h + 1) * G].reshape(-1))
            slots = plan.idx[seg]
            e_slots = slots[packed[layer][0][seg, :exact]]
            e_keys.append(store.k[e_slots].float())
            e_vals.append(store.v[e_slots].float())
            mid = slots[packed[layer][1][seg, :middle]]
            best = torch.argsort(t.scores[mid].float(), descending=True, stable=True)[:free]
            chosen = mid[best.sort().values]
            f_keys.append(store.k[chosen].float())
            f_vals.append(store.v[chosen].float())
        pad = torch.nn.utils.rnn.pad_sequence
        ke, ve = pad(e_keys, batch_first=True), pad(e_vals, batch_first=True)
        kf, vf = pad(f_keys, batch_first=True), pad(f_vals, batch_first=True)
        e_count = torch.tensor([len(k) for k in e_keys], device=ke.device)
        f_count = torch.tensor([len(k) for k in f_keys], device=ke.device)
        e_mask = torch.arange(ke.shape[1], device=ke.device)[None, :] < e_count[:, None]
        f_mask = torch.arange(kf.shape[1], device=ke.device)[None, :] < f_count[:, None]
        queries, out = torch.stack(q_rows), torch.stack(outs)
        scale = pending[items[0][0]].scale
        exact_scores = (torch.einsum("prd,ped->pre", queries, ke) * scale).masked_fill(~e_mask[:, None, :], float("-inf"))
        out_scale = (out ** 2).sum(-1).mean(-1).clamp(min=1e-12)
        return Problems(queries, out, torch.stack(lses), exact_scores, ve, f_mask, vf, out_scale, scale), kf

    def groups(self, sizes: list[tuple[int, int, int]]) -> list[list[int]]:
        """Problem indices in batches whose padded score tensors stay under ``batch_elements`` and whose free
        sizes are within 2x of each other (ragged adaptive budgets would otherwise pad every problem to
        the largest). ``sizes``: rows, exact, free of each problem."""
        order = sorted(range(len(sizes)), key=lambda i: sizes[i][2])
        out, cur, widest, smallest = [], [], 0, 0
        for i in order:
            rows, exact, free = sizes[i]
            w = max(widest, rows * (exact + free))
            if cur and ((len(cur) + 1) * w > self.batch_elements or free > 2 * max(smallest, 1)):
                out.append(cur)
                cur, w = [], rows * (exact + free)
            if not cur:
                smallest = free
            cur.append(i)
            widest = w
        if cur:
            out.append(cur)
        return out

    def fit_plans(self, cache, plans: list[LayerPlan], pending: dict[int, LayerTargets],
                  iterations: int | None = None):
        """Fit every problem; returns per layer (items' segments, free keys list, free values list, final
        objective per item). ``iterations`` overrides the key optimisation length (the adaptive pilot)."""
        by_layer = {p.layer: p for p in plans}
        items = self.problems_of(cache, plans, pending)
        sizes = []
        for item in items:
            t, store = pending[item.layer], cache.stores[item.layer]
            sizes.append((t.queries.shape[1] // store.H * t.queries.shape[2], item.exact, item.free))
        fitted = {p.layer: ([], [], [], []) for p in plans}
        for group in self.groups(sizes):
            chosen = [items[i] for i in group]
            pb, keys = self.build(cache, by_layer, pending, chosen)
            keys, values, loss = self.fit(pb, keys, iterations)
            absolute = (loss.double() * pb.out_scale.double()).tolist()  # one sync a group, not two a problem
            for j, item in enumerate(chosen):  # a fitted problem fills its free slots
                segs, ks, vs, ls = fitted[item.layer]
                segs.append(item.seg)
                ks.append(keys[j, :item.free])
                vs.append(values[j, :item.free])
                ls.append(absolute[j])
        return fitted

    def fit(self, pb: Problems, keys: torch.Tensor, iterations: int | None = None):
        """Select+Fit: the selected keys, the values solved once. Returns keys, values, objective [P]."""
        with record_function("selectfit.value_solve"):
            values = solve_values(pb, keys, self.ridge)
        return keys, values, objective(pb, keys, values, 0.0)

    def write_back(self, store: RaggedKV, plan: LayerPlan, segs: list[int], keys: list[torch.Tensor],
                   values: list[torch.Tensor], _loss: list[float]) -> None:
        """Each segment holds its exact slots, then either its free slots (fitted segments), its whole
        middle (budget covers it) or nothing more (budget of zero free slots)."""
        n_mid = plan.middle.sum(1)
        keep_middle = (plan.free >= n_mid)[:, None] & plan.middle
        keep = plan.exact | keep_middle
        seg_of = torch.arange(len(plan.free), device=keep.device)[:, None].expand_as(keep)
        slots = plan.idx[keep]
        k_parts, v_parts, pos_parts, seg_parts = [store.k[slots]], [store.v[slots]], [store.pos[slots]], [seg_of[keep]]
        for seg, k, v in zip(segs, keys, values):
            k_parts.append(k.to(store.k.dtype))
            v_parts.append(v.to(store.v.dtype))
            pos_parts.append(torch.full((len(k),), -1, dtype=store.pos.dtype, device=k.device))
            seg_parts.append(torch.full((len(k),), seg, dtype=seg_of.dtype, device=k.device))
        seg_ids = torch.cat(seg_parts)
        order = torch.sort(seg_ids, stable=True).indices
        counts = torch.bincount(seg_ids, minlength=len(plan.free))
        store.replace(torch.cat(k_parts)[order], torch.cat(v_parts)[order], torch.cat(pos_parts)[order], counts)

