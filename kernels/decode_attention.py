"""Attention over the packed, ragged KV store (flash-decoding in Triton).

Store layout (one model layer): ``k, v: [S, D]``; segment ``i = b * Hkv + h``
owns slots ``[seg_start[i], seg_start[i] + seg_len[i])``.  Segments are
disjoint ranges of ``[0, S)``; a segment may have spare capacity beyond its
length, which is never read.  Query head ``j`` reads KV head ``j // G`` with
``G = Hq // Hkv``.  Every query attends to every valid token of its segment
(no causal mask: the segment holds the past only).

Public API
----------
``ragged_attention(q, k, v, seg_start, seg_len, scale, slot_logits=None) -> (out, lse)``
    dispatches to the Triton kernel when ``q`` is on CUDA or when
    ``KVBENCH_TRITON=1`` (use ``TRITON_INTERPRET=1`` on the CPU), otherwise to
    the PyTorch reference. ``slot_logits`` (decoding): ``[S, G]`` float32 that
    receives each valid slot's logit per query row, written by the same pass
    (H2O and TOVA rank slots by attention: this spares them a second read of
    the keys, ``slot_scores.slot_attention_probs_from_logits``).
``ragged_attention_triton``, ``ragged_attention_reference``: the two paths.
``merge_attention(out_a, lse_a, out_b, lse_b) -> (out, lse)``: exact merge of
two partial attentions over disjoint key sets.

Design (see NOTES.md): the grid is a flat list of work items, one per
(segment, chunk of ``chunk`` slots), plus a tile index over the query rows of
the group.  Each program finds its (segment, chunk) from ``seg_len`` inside
the kernel (a prefix sum over the segment chunk counts), so nothing is
synchronised with the host and the launch is CUDA-graph capturable; the grid
is sized by the upper bound ``S // chunk + n_seg``.  A program loads the
``G * Tq`` query rows of its KV head together, streams its chunk of K and V
once with an online softmax (fp32), and writes the final output directly when
its segment has a single chunk, or a partial (normalised output, log2-LSE)
otherwise; a second kernel merges the partials of multi-chunk segments and
writes ``out = 0, lse = -inf`` for empty segments.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Optional, Sequence, Tuple

import torch

__all__ = [
    "ragged_attention",
    "ragged_attention_triton",
    "ragged_attention_reference",
    "merge_attention",
    "use_triton",
]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# --------------------------------------------------------------------------
# dispatch helpers (shared with window_scores.py)
# --------------------------------------------------------------------------

def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "on", "yes")


def use_triton(x: torch.Tensor) -> bool:
    """The dispatch rule: Triton on CUDA tensors or when KVBENCH_TRITON=1."""
    return x.is_cuda or _env_true("KVBENCH_TRITON")


_CAPABILITY: dict = {}


def pdl_enabled() -> bool:
    """KVBENCH_PDL=1: programmatic dependent launch in the decoding step (issue 21; kernels/NOTES.md)."""
    return _env_true("KVBENCH_PDL")


def pdl_kwargs(x: torch.Tensor) -> dict:
    """A kernel's ``PDL`` constexpr (and Triton's ``launch_pdl``) for a launch on ``x``'s device.

    With programmatic dependent launch (KVBENCH_PDL=1, compiled kernels on Hopper or newer) a kernel may start
    while the one before it in the stream is still finishing: at a few rows a step's ~700 kernels are each a
    few microseconds of ramp-up and tail, which then overlap. A kernel launched so must wait (``gdc_wait``)
    before it touches anything an earlier kernel of the step writes, and reads before that only what no
    kernel writes (weights); it lets the next kernel start (``gdc_launch_dependents``) once all its programs
    have waited, so the next one's wait still covers every kernel before. Without PDL both are no-ops."""
    if not (x.is_cuda and pdl_enabled()) or _env_true("TRITON_INTERPRET"):
        return {"PDL": False}
    idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)[0]
    return {"PDL": True, "launch_pdl": True} if _CAPABILITY[idx] >= 9 else {"PDL": False}


_JIT_CACHE: dict = {}


def _jit(fn):
    """``triton.jit`` applied lazily, at call time.

    Triton decides between the compiler and its interpreter when ``jit`` runs,
    reading ``TRITON_INTERPRET``.  Decorating lazily makes the choice follow the
    environment at the time of the call, so it does not matter which module
    imported this one first (tests switch the interpreter on in a fixture).
    """
    interp = _env_true("TRITON_INTERPRET")
    key = (fn.__module__, fn.__qualname__, interp)
    k = _JIT_CACHE.get(key)
    if k is None:
        import triton

        k = triton.jit(fn)
        _JIT_CACHE[key] = k
    return k


_STDLIB_INTERP: dict = {}


@contextlib.contextmanager
def _interpreter_stdlib():
    """Make triton.language's own jit functions (sum, max, cumsum, ...)
    interpretable for the duration of a launch.

    Triton decides compiler vs. interpreter for its standard library when it is
    first imported.  If that happened before TRITON_INTERPRET=1 was set (e.g.
    another module imported this one first), an interpreted kernel calling
    ``tl.sum`` fails; this swaps in interpreted twins, and restores the
    originals afterwards so compiled kernels in the same process are unaffected.
    """
    import triton.language as tlm
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    saved = {}
    for name in ("sum", "max", "min", "cumsum", "zeros", "zeros_like"):
        f = getattr(tlm, name, None)
        if isinstance(f, JITFunction):
            twin = _STDLIB_INTERP.get(name)
            if twin is None:
                twin = _STDLIB_INTERP[name] = InterpretedFunction(f.fn)
            saved[name] = f
            setattr(tlm, name, twin)
    try:
        yield
    finally:
        for name, f in saved.items():
            setattr(tlm, name, f)


def _launch(fn, grid, *args, **kwargs):
    """Launch kernel ``fn`` (a plain function, jitted lazily) on ``grid``."""
    k = _jit(fn)
    if _env_true("TRITON_INTERPRET"):
        with _interpreter_stdlib():
            return k[grid](*args, **kwargs)
    return k[grid](*args, **kwargs)


_SM_COUNT: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: keep grids small
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _SM_COUNT.get(idx)
    if n is None:
        n = torch.cuda.get_device_properties(idx).multi_processor_count
        _SM_COUNT[idx] = n
    return n


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


# --------------------------------------------------------------------------
# Triton kernels (plain functions; jitted lazily by _jit)
# --------------------------------------------------------------------------

try:  # triton is a dependency, but keep the reference usable without it
    import triton.language as tl
except Exception:  # pragma: no cover
    tl = None


def _ragged_decode_kernel(
    Q, K, V, SEG_START, SEG_LEN, O, LSE, OP, LSEP, LOGITS,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_ks, stride_kd, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_lb, stride_lh, stride_lt,
    n_seg, n_kv_heads, group, tq, chunk, qk_scale,
    HEAD_DIM: tl.constexpr, NSEG_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr, WRITE_LOGITS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:  # everything below reads what earlier kernels of the step wrote (pdl_kwargs)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)       # work item: (segment, chunk)
    pid_m = tl.program_id(1)     # tile of the G*Tq query rows

    # ---- locate the work item: prefix sum over per-segment chunk counts ----
    segs = tl.arange(0, NSEG_P2)
    lens = tl.load(SEG_LEN + segs, mask=segs < n_seg, other=0).to(tl.int32)
    nch = (lens + chunk - 1) // chunk
    cum = tl.cumsum(nch, 0)                    # inclusive
    total = tl.sum(nch, 0)
    if pid < total:
        seg = tl.sum((cum <= pid).to(tl.int32), 0)
        first = tl.sum(tl.where(segs < seg, nch, 0), 0)
        seg_chunks = tl.sum(tl.where(segs == seg, nch, 0), 0)
        seg_len = tl.sum(tl.where(segs == seg, lens, 0), 0)
        c = pid - first
        start = tl.load(SEG_START + seg).to(tl.int64)
        b = seg // n_kv_heads
        h = seg % n_kv_heads

        # ---- the query rows of this KV head's group ----
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n_rows = group * tq
        rmask = rows < n_rows
        g = rows // tq
        t = rows % tq
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM
        q_off = (b.to(tl.int64) * stride_qb + (h * group + g).to(tl.int64) * stride_qh
                 + t.to(tl.int64) * stride_qt)
        q = tl.load(Q + q_off[:, None] + offs_d[None, :] * stride_qd,
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        else:
            q = q.to(K.dtype.element_ty)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)

        lo = c * chunk
        hi = tl.minimum(lo + chunk, seg_len)
        offs_n = tl.arange(0, BLOCK_N)
        k_base = K + start * stride_ks
        v_base = V + start * stride_vs
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + offs_n
            nmask = n < hi
            kv_mask = nmask[:, None] & dmask[None, :]
            kt = tl.load(k_base + n.to(tl.int64)[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                         mask=nmask[None, :] & dmask[:, None], other=0.0)
            v = tl.load(v_base + n.to(tl.int64)[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                        mask=kv_mask, other=0.0)
            if DOT_F32:
                kt = kt.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
            if WRITE_LOGITS:  # decoding (tq == 1, so row = g): slot n's logit for query row g, natural log
                tl.store(LOGITS + (start + n.to(tl.int64))[None, :] * group + rows[:, None],
                         s * 0.6931471805599453, mask=rmask[:, None] & nmask[None, :])
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if DOT_F32:  # interpreter: round p as the compiled kernel does
                pv = p.to(V.dtype.element_ty).to(tl.float32)
            else:
                pv = p.to(V.dtype.element_ty)
            acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=PRECISION)
            m_i = m_new

        out = acc / l_i[:, None]
        lse2 = m_i + tl.log2(l_i)
        if seg_chunks == 1:
            o_off = (b.to(tl.int64) * stride_ob + (h * group + g).to(tl.int64) * stride_oh
                     + t.to(tl.int64) * stride_ot)
            tl.store(O + o_off[:, None] + offs_d[None, :] * stride_od,
                     out.to(O.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
            l_off = b * stride_lb + (h * group + g) * stride_lh + t * stride_lt
            tl.store(LSE + l_off, lse2 * 0.6931471805599453, mask=rmask)
        else:
            p_row = pid.to(tl.int64) * n_rows + rows
            tl.store(OP + p_row[:, None] * HEAD_DIM + offs_d[None, :], out,
                     mask=rmask[:, None] & dmask[None, :])
            tl.store(LSEP + p_row, lse2, mask=rmask)


def _ragged_reduce_kernel(
    SEG_LEN, O, LSE, OP, LSEP,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_lb, stride_lh, stride_lt,
    n_seg, n_kv_heads, group, tq, chunk,
    HEAD_DIM: tl.constexpr, NSEG_P2: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False,
):
    """One program per (segment, BLOCK_R query rows): merges the segment's
    chunk partials BLOCK_C at a time (vector loads of BLOCK_C partials, not a
    serial loop over chunks), or writes out = 0, lse = -inf if it is empty.
    BLOCK_R = 1 on the GPU (parallelism); larger under the interpreter."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    seg = tl.program_id(0)
    pid_r = tl.program_id(1)
    segs = tl.arange(0, NSEG_P2)
    lens = tl.load(SEG_LEN + segs, mask=segs < n_seg, other=0).to(tl.int32)
    nch = (lens + chunk - 1) // chunk
    n_c = tl.sum(tl.where(segs == seg, nch, 0), 0)
    if n_c != 1:  # single-chunk segments were written by the main kernel
        first = tl.sum(tl.where(segs < seg, nch, 0), 0)
        n_rows = group * tq
        b = seg // n_kv_heads
        h = seg % n_kv_heads
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        g = rows // tq
        t = rows % tq
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM
        offs_c = tl.arange(0, BLOCK_C)
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.full([BLOCK_R], 0.0, tl.float32)
        acc = tl.full([BLOCK_R, BLOCK_D], 0.0, tl.float32)
        for c0 in range(0, n_c, BLOCK_C):
            cc = c0 + offs_c
            cr_mask = (cc < n_c)[:, None] & rmask[None, :]
            p_row = (first + cc).to(tl.int64)[:, None] * n_rows + rows[None, :]      # [C, R]
            lse_c = tl.load(LSEP + p_row, mask=cr_mask, other=float("-inf"))
            o_c = tl.load(OP + p_row[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                          mask=cr_mask[:, :, None] & dmask[None, None, :], other=0.0)
            m_new = tl.maximum(m_i, tl.max(lse_c, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            w = tl.exp2(lse_c - m_safe[None, :])
            l_i = l_i * alpha + tl.sum(w, 0)
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o_c, 0)
            m_i = m_new
        has = l_i > 0.0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        o_off = (b.to(tl.int64) * stride_ob + (h * group + g).to(tl.int64) * stride_oh
                 + t.to(tl.int64) * stride_ot)
        tl.store(O + o_off[:, None] + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty),
                 mask=rmask[:, None] & dmask[None, :])
        tl.store(LSE + b * stride_lb + (h * group + g) * stride_lh + t * stride_lt, lse, mask=rmask)


# --------------------------------------------------------------------------
# host wrappers
# --------------------------------------------------------------------------

# Launch configuration of the main kernel, by device type.  Tuned on an H100
# (see NOTES.md); the interpreter ignores warps and stages.
_POISON_SCRATCH = False  # set by the tests

DECODE_CONFIG = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 4, "items_per_sm": 2,
                 "max_chunk": 4096,
                 "large": {"min_chunk": 2048, "BLOCK_N": 128, "num_stages": 3}}


def _check_inputs(q, k, v, seg_start, seg_len):
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Hq, Tq, D], got {tuple(q.shape)}")
    if k.dim() != 2 or v.shape != k.shape:
        raise ValueError(f"k, v must be [S, D] of one shape, got {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, Tq, D = q.shape
    if k.shape[1] != D:
        raise ValueError(f"head dim mismatch: q {D}, k {k.shape[1]}")
    n_seg = seg_start.numel()
    if seg_len.numel() != n_seg or n_seg % max(B, 1) != 0:
        raise ValueError("seg_start / seg_len must hold B * Hkv entries")
    hkv = n_seg // B if B else 0
    if hkv == 0 or Hq % hkv != 0:
        raise ValueError(f"Hq={Hq} is not a multiple of Hkv={hkv}")
    return B, Hq, Tq, D, hkv, Hq // hkv


def choose_chunk(total_tokens: int, device: torch.device, block_n: Optional[int] = None,
                 n_seg: int = 0, longest: Optional[int] = None, lengths: Optional[Sequence[int]] = None,
                 wide: bool = False) -> int:
    """Chunk (slots per work item): about ``items_per_sm`` items per SM for the
    given number of tokens, less one item per segment for the ragged tails
    (while that leaves at least half), a multiple of BLOCK_N, at most
    ``max_chunk``. ``longest`` (the longest segment, when the caller knows it on
    the host): the chunk is then evened out over it, as many items and none
    longer, so the critical path has no sliver: 8 x 8192-slot heads at batch 8
    were cut 2688 x 3 + 128. Evened over the mean head instead it cost ragged
    layouts time, the shorter chunk adding items to every other head
    (results/bench/h200-kernels/). ``lengths`` (every segment's length or an
    upper bound, on the host): the evened chunk is kept only if it adds no
    items past one item per slot, or past what the plain chunk already made:
    evening 8 x 16k ragged heads (the longest 39,590 slots) from 4096 to 3968
    slots added 16 items to a second wave (272 -> 288 on 264 slots), which the
    H200 ran slower (results/bench/h200-kernels/).
    ``wide``: the chunk as the launch will round it when long chunks take wide
    tiles (``DECODE_CONFIG["large"]``), so that items are counted as launched."""
    cfg = DECODE_CONFIG
    bn = block_n or cfg["BLOCK_N"]
    slots = max(1, cfg["items_per_sm"] * _num_sms(device))
    target = max(slots - n_seg, (slots + 1) // 2)
    c = -(-max(int(total_tokens), 1) // target)
    c = -(-c // bn) * bn
    c = min(max(c, bn), max(cfg["max_chunk"], bn))
    plain = c
    if longest is None and lengths:
        longest = max(lengths)
    if longest is not None and longest > c:
        items = -(-int(longest) // c)        # the longest segment's items at this chunk
        per_item = -(-int(longest) // items)  # the same number of items, evenly long
        c = -(-per_item // bn) * bn
    if wide:
        plain, c = _widened(plain), _widened(c)
    if lengths is not None and c != plain:
        def items_at(chunk: int) -> int:
            return sum(-(-int(n) // chunk) for n in lengths)
        if items_at(c) > max(items_at(plain), slots):
            c = plain
    return int(c)


def _widened(chunk: int) -> int:
    """``chunk`` rounded up to the wide tile, where long chunks take one."""
    large = DECODE_CONFIG.get("large")
    if large and chunk >= large["min_chunk"]:
        return -(-chunk // large["BLOCK_N"]) * large["BLOCK_N"]
    return chunk


def ragged_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    seg_start: torch.Tensor, seg_len: torch.Tensor, scale: float,
    *, chunk: Optional[int] = None, total_tokens: Optional[int] = None,
    block_n: Optional[int] = None, num_warps: Optional[int] = None,
    num_stages: Optional[int] = None, longest: Optional[int] = None,
    lengths: Optional[Sequence[int]] = None,
    out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
    slot_logits: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton flash-decoding over the ragged store.  See module docstring.

    ``chunk`` forces the split size (slots per work item); by default it is
    chosen from ``total_tokens`` (default: ``S``, an upper bound on the valid
    slots, so pass the real total when the store has much spare capacity) and
    ``longest`` (an upper bound on the longest segment, known on the host: the
    chunk is evened out over it) and ``lengths`` (upper bounds of every
    segment's length, on the host: the evening then adds no second-wave items;
    ``choose_chunk``).
    No host synchronisation; capturable in a CUDA graph.  ``out`` / ``lse``
    may be given (any strides, shapes ``[B, Hq, Tq, D]`` / ``[B, Hq, Tq]``);
    every element is written.
    """
    B, Hq, Tq, D, hkv, G = _check_inputs(q, k, v, seg_start, seg_len)
    _check_slot_logits(slot_logits, k, Tq, G)
    cfg = DECODE_CONFIG
    BLOCK_N = int(block_n or cfg["BLOCK_N"])
    nw = int(num_warps or cfg["num_warps"])
    ns = int(num_stages or cfg["num_stages"])
    S = k.shape[0]
    n_seg = B * hkv
    if chunk is None:
        chunk = choose_chunk(total_tokens if total_tokens is not None else S, q.device, BLOCK_N, n_seg, longest,
                             lengths, wide=block_n is None)
        large = cfg.get("large")
        if large and block_n is None and chunk >= large["min_chunk"]:
            # long chunks: wider tiles stream slightly better (H100 sweep, NOTES.md)
            BLOCK_N = int(large["BLOCK_N"])
            ns = int(num_stages or large["num_stages"])  # the chunk is already a multiple of it (``wide``)
    chunk = int(chunk)
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.device != q.device or out.stride(-1) != 1 and D > 1:
        raise ValueError("out must have q's shape and device and a unit last stride")
    if lse is None:
        lse = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    elif lse.shape != (B, Hq, Tq) or lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError("lse must be float32 [B, Hq, Tq] on q's device")
    if out.numel() == 0:
        return out, lse
    if seg_start.device != q.device:
        seg_start = seg_start.to(q.device)
    if seg_len.device != q.device:
        seg_len = seg_len.to(q.device)
    seg_start = seg_start.contiguous()
    seg_len = seg_len.contiguous()

    n_rows = G * Tq
    BLOCK_M = max(16, min(64, _next_pow2(n_rows)))
    BLOCK_D = max(16, _next_pow2(D))
    n_mt = -(-n_rows // BLOCK_M)
    NSEG_P2 = max(16, _next_pow2(n_seg))
    max_items = S // chunk + n_seg  # >= sum(ceil(len/chunk)) for disjoint segments
    op = torch.empty((max_items * n_rows * D,), dtype=torch.float32, device=q.device)
    lsep = torch.empty((max_items * n_rows,), dtype=torch.float32, device=q.device)
    if _POISON_SCRATCH:  # tests: unwritten partials would show as NaN
        op.fill_(float("nan"))
        lsep.fill_(float("nan"))
    # Triton's interpreter (3.9) computes bf16 dots wrongly: upcast there.
    dot_f32 = _env_true("TRITON_INTERPRET") and k.dtype == torch.bfloat16
    precision = "ieee" if (k.dtype == torch.float32 or dot_f32) else "tf32"

    _launch(
        _ragged_decode_kernel, (max_items, n_mt),
        q, k, v, seg_start, seg_len, out, lse, op, lsep, lsep if slot_logits is None else slot_logits,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        n_seg, hkv, G, Tq, chunk, float(scale) * _LOG2E,
        HEAD_DIM=D, NSEG_P2=NSEG_P2, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        PRECISION=precision, DOT_F32=dot_f32, WRITE_LOGITS=slot_logits is not None, num_warps=nw, num_stages=ns,
        **pdl_kwargs(q),
    )
    if q.is_cuda:
        BLOCK_R, BLOCK_C = 1, 64
    else:  # interpreter: per-program overhead dominates, so fewer, wider programs
        BLOCK_R, BLOCK_C = min(64, _next_pow2(n_rows)), 16
    _launch(
        _ragged_reduce_kernel, (n_seg, -(-n_rows // BLOCK_R)),
        seg_len, out, lse, op, lsep,
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        n_seg, hkv, G, Tq, chunk,
        HEAD_DIM=D, NSEG_P2=NSEG_P2, BLOCK_C=BLOCK_C, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
        num_warps=4, num_stages=2, **pdl_kwargs(q),
    )
    return out, lse


def _gather_segments(x: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor, width: int | None = None):
    """[S, D] -> padded [n_seg, Lmax, D] (float32) and mask [n_seg, Lmax]; ``width``: Lmax when the caller knows
    an upper bound on the host (no device sync)."""
    n_seg = seg_start.numel()
    lens = seg_len.to(device=x.device, dtype=torch.int64)
    starts = seg_start.to(device=x.device, dtype=torch.int64)
    lmax = width if width is not None else (int(lens.max().item()) if n_seg else 0)
    ar = torch.arange(lmax, device=x.device)
    mask = ar[None, :] < lens[:, None]
    idx = torch.where(mask, starts[:, None] + ar[None, :], torch.zeros_like(mask, dtype=torch.int64))
    g = x[idx].float()
    g = torch.where(mask.view(*mask.shape, *([1] * (x.dim() - 1))), g, torch.zeros((), device=x.device))
    return g, mask, idx


def ragged_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    seg_start: torch.Tensor, seg_len: torch.Tensor, scale: float,
    slot_logits: Optional[torch.Tensor] = None, **_ignored,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch oracle: gather into a padded tensor with a mask, fp32 math."""
    B, Hq, Tq, D, hkv, G = _check_inputs(q, k, v, seg_start, seg_len)
    _check_slot_logits(slot_logits, k, Tq, G)
    kp, mask, idx = _gather_segments(k, seg_start, seg_len)      # [n_seg, L, D]
    vp, _, _ = _gather_segments(v, seg_start, seg_len)
    L = kp.shape[1]
    kp = kp.view(B, hkv, 1, L, D)
    vp = vp.view(B, hkv, 1, L, D)
    qf = q.float().reshape(B, hkv, G, Tq, D)
    s = torch.matmul(qf, kp.transpose(-1, -2)) * float(scale)   # [B, hkv, G, Tq, L]
    m = mask.view(B, hkv, 1, 1, L)
    if slot_logits is not None:  # [n_seg, G, L] -> the valid slots' rows of [S, G]
        slot_logits[idx[mask]] = s.reshape(B * hkv, G, L).transpose(1, 2)[mask]
    s = s.masked_fill(~m, float("-inf"))
    lse = torch.logsumexp(s, dim=-1) if L > 0 else torch.full(s.shape[:-1], float("-inf"), device=q.device)
    p = torch.exp(s - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
    p = torch.where(m, p, torch.zeros_like(p))
    out = torch.matmul(p, vp)                                   # [B, hkv, G, Tq, D]
    out = torch.where(torch.isfinite(lse).unsqueeze(-1), out, torch.zeros_like(out))
    return out.reshape(B, Hq, Tq, D).to(q.dtype), lse.reshape(B, Hq, Tq).float()


def ragged_attention_many_queries(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    seg_start: torch.Tensor, seg_len: torch.Tensor, scale: float, host_lengths: Optional[list] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The oracle's float32 attention for thousands of query rows at once (the fitting methods' targets), its
    score tensor normalised in place: one [B * Hkv, G * Tq, L] float32 tensor where the oracle makes several
    (0.8 GB each for 12 x 2,048 rows over a 16k store; timings: results/kvsculpt/README.md).
    Returns ``out [B, Hq, Tq, D]`` and ``lse [B, Hq, Tq]``, both float32. ``host_lengths``: ``seg_len`` as
    the caller knows it on the host (else read back: one device sync)."""
    B, Hq, Tq, D, hkv, G = _check_inputs(q, k, v, seg_start, seg_len)
    if host_lengths is None:
        host_lengths = torch.stack([seg_len.min(), seg_len.max()]).tolist() if seg_len.numel() else [0]
    shortest, longest = min(host_lengths), max(host_lengths)
    kp, mask, _ = _gather_segments(k, seg_start, seg_len, width=longest)      # [n_seg, L, D]
    vp, _, _ = _gather_segments(v, seg_start, seg_len, width=longest)
    scores = torch.bmm((q.float() * float(scale)).reshape(B * hkv, G * Tq, D), kp.transpose(1, 2))
    if shortest < longest:
        scores.masked_fill_(~mask[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1) if kp.shape[1] else scores.new_full(scores.shape[:-1], float("-inf"))
    probs = scores.sub_(lse.clamp_min(torch.finfo(torch.float32).min).unsqueeze(-1)).exp_()
    out = torch.bmm(probs, vp).masked_fill_(~torch.isfinite(lse).unsqueeze(-1), 0.0)
    return out.reshape(B, Hq, Tq, D), lse.reshape(B, Hq, Tq)


def ragged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    seg_start: torch.Tensor, seg_len: torch.Tensor, scale: float, **kw,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [B, Hq, Tq, D]`` over the ragged store; returns
    ``out [B, Hq, Tq, D]`` (q's dtype) and ``lse [B, Hq, Tq]`` (float32, natural
    log; ``-inf`` and ``out = 0`` for an empty segment). ``slot_logits`` (decoding,
    ``Tq == 1``): a float32 ``[S, G]`` tensor that receives ``scale * <q, k>`` of
    every valid slot for each query row of its KV group (slack rows untouched), so a
    method that ranks slots by attention (H2O, TOVA) need not read the keys again."""
    if use_triton(q):
        return ragged_attention_triton(q, k, v, seg_start, seg_len, scale, **kw)
    return ragged_attention_reference(q, k, v, seg_start, seg_len, scale, kw.get("slot_logits"))


def _check_slot_logits(slot_logits, k, Tq, G):
    if slot_logits is None:
        return
    if Tq != 1:
        raise ValueError(f"slot_logits is for decoding (one query per row), got Tq = {Tq}")
    if (slot_logits.shape != (k.shape[0], G) or slot_logits.dtype != torch.float32
            or not slot_logits.is_contiguous() or slot_logits.device != k.device):
        raise ValueError(f"slot_logits must be a contiguous float32 [S, G] = [{k.shape[0]}, {G}] tensor on {k.device}")


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two attentions over disjoint key sets A and B.

    ``out_*: [..., D]``, ``lse_*: [...]`` (natural log).  Either side may be
    empty (``lse = -inf``); both empty gives ``out = 0, lse = -inf``.
    """
    la = lse_a.float()
    lb = lse_b.float()
    m = torch.maximum(la, lb)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa = torch.exp(la - m_safe)
    wb = torch.exp(lb - m_safe)
    tot = wa + wb
    lse = m_safe + torch.log(tot)
    lse = torch.where(tot > 0, lse, torch.full_like(lse, float("-inf")))
    denom = torch.where(tot > 0, tot, torch.ones_like(tot)).unsqueeze(-1)
    out = (wa.unsqueeze(-1) * out_a.float() + wb.unsqueeze(-1) * out_b.float()) / denom
    return out.to(out_a.dtype), lse
