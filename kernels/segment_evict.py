"""Decode-time eviction of one token per segment of the ragged store (H2O, TOVA, StreamingLLM).

Store layout as in ``decode_attention.py``: per-slot tensors of ``S`` rows (``k, v: [S, D]``, ``pos: [S]``, a
method's per-slot state such as H2O's ``[S]`` accumulator); segment ``i = b * Hkv + h`` owns slots
``[seg_start[i], seg_start[i] + capacity[i])``, of which the first ``seg_len[i]`` hold tokens; the slack
after them may hold anything (even NaN scores). A decoding step that holds the budget evicts, in every segment
that is over it, its lowest-scoring token; the segment's last token moves into the hole (O(1), fixed shapes).

Public API
----------
``segment_argmin(scores, seg_start, seg_len, width) -> victim [N] int64``: for each segment, the slot of
    ``[seg_start[i], seg_start[i] + min(seg_len[i], width))`` with the lowest score (real ``[S]``, compared as
    float32: integers such as positions exactly up to 2**24). Exactly what
    ``argmin`` over the padded ``[N, width]`` view of the scores (``inf`` past each length) gave, which this
    replaces: ties go to the lowest slot, a NaN score counts as the lowest (the first NaN wins, as
    ``torch.argmin``), and an empty segment yields slot 0 (the caller masks it out). Options, so that a method's
    whole ranking is this one launch: ``pos`` [S], ``newest`` [B] and ``recent`` (int or [B]) with ``sinks``
    protect slots (scored ``inf``) whose position is above ``newest[b] - recent[b]`` (the newest tokens) or
    below ``sinks``; ``shared=True`` ranks the ``heads`` segments of each sequence together (TOVA's one
    ranking per layer: they hold equally many tokens, position for position; a column scores the sum over the
    heads, in head order, which orders as their mean) and gives every one of them the same column.
``move_last_into(per_slot, seg_start, seg_len, victim, mask=None)``: in every segment ``i`` where ``mask[i]``
    (default: all), copy the last slot's row of every tensor of ``per_slot`` into slot ``victim[i]`` and
    decrement ``seg_len[i]`` in place; bit-exact with what ``RaggedKV.remove_one`` did in PyTorch. A segment in
    ``mask`` must hold a token and ``victim[i]`` must be one of its slots (``victim == last`` is fine).
Each is Triton when the scores (resp. ``seg_len``) are on CUDA or ``KVBENCH_TRITON=1`` (``TRITON_INTERPRET=1``
on the CPU), else the PyTorch reference (``*_reference``: the code the kernels replace; ``move_last_into`` takes
it too for a per-slot tensor it cannot copy as bits: strided or complex); ``*_triton``: the Triton paths.

Why: in PyTorch the eviction is ~15-20 small kernels per layer (the padded view's arange, compares, wheres and
gather; argmin; a gather; then a where, one indexed copy per per-slot tensor and the length update). At batch 1
a replayed decoding step of a 32-layer model spends several hundred launches of ~3-5 us on it, most of the gap
between the evicting methods' step and SnapKV's, whose step only appends. Here it is two launches per layer.

Design: both grids are one program per segment (``N = B * Hkv``, known on the host; nothing is read back, so a
decoding step with them is CUDA-graph capturable). ``segment_argmin``'s program scans its segment's valid
slots in blocks of ``BLOCK`` (the loop bound is the segment's length, capped by ``width``: slack is never
read), keeping the running minimum of (score, column) packed in one int64 (one reduction per block). Past
``ARGMIN_CONFIG["SPLIT_BLOCK"]`` columns the scan is split: one program per (segment, block) leaves its packed
minimum, and a second launch takes the least per segment (one program per segment scanning 8k slots serially
took 8 us on the H200, one per sequence of 8 heads 23 us).
``move_last_into``'s program copies one row per per-slot tensor, each viewed as integers of its element size (a
bit copy, NaN payloads included), all tensors in one launch (a tuple argument); a program reads the length
before writing it and only its own segment's slots, so programs never race, and ``victim == last`` copies a row
onto itself.
Why not one fused kernel: ``RaggedKV.remove_one`` (which calls ``move_last_into``) is a method that views may
override (a codec's decoded view routes it to the codes), so the eviction keeps it as its own step.
"""
from __future__ import annotations

import argparse
import os

import torch

from .decode_attention import _launch, _next_pow2, use_triton

__all__ = ["segment_argmin", "segment_argmin_triton", "segment_argmin_reference",
           "move_last_into", "move_last_into_triton", "move_last_into_reference"]

try:  # triton is a dependency, but keep the reference usable without it
    import triton.language as tl
except Exception:  # pragma: no cover
    tl = None


# --------------------------------------------------------------------------
# segment_argmin
# --------------------------------------------------------------------------

def _segment_argmin_kernel(SCORES, START, LEN, VICTIM, width, POS, NEWEST, RECENT, recent, sinks, heads,
                           PARTIAL, n_chunks, PROTECT: tl.constexpr, RECENT_PER_SEQ: tl.constexpr,
                           SHARED: tl.constexpr, STAGE: tl.constexpr, BLOCK: tl.constexpr):
    # One program per segment, or (SHARED) per sequence: its `heads` segments ranked together. STAGE 0 scans all
    # the columns; a split search runs STAGE 1, one program per (that, block of BLOCK columns) leaving its packed
    # minimum in PARTIAL, then STAGE 2, one per segment (or sequence) taking the least of them.
    prog = tl.program_id(0).to(tl.int64)
    first = prog * heads if SHARED else prog
    start = tl.load(START + first).to(tl.int64)
    n = tl.minimum(tl.load(LEN + first).to(tl.int64), width)  # the padded view it replaces had `width` columns
    if STAGE == 2:
        c = tl.arange(0, BLOCK)
        best = tl.min(tl.load(PARTIAL + prog * n_chunks + c, mask=c < n_chunks, other=0x7FFFFFFFFFFFFFFF), 0)
    else:
        if PROTECT:
            b = prog if SHARED else prog // heads
            if RECENT_PER_SEQ:
                keep_above = tl.load(NEWEST + b).to(tl.int64) - tl.load(RECENT + b).to(tl.int64)
            else:
                keep_above = tl.load(NEWEST + b).to(tl.int64) - recent
        offs = tl.arange(0, BLOCK).to(tl.int64)
        # (score, column) as one int64 whose order is argmin's: the float's bits made order-preserving as a signed
        # int32 (negatives: the magnitude bits flipped; -0.0 counted as 0.0, NaN lowest of all) in the high half,
        # the column in the low half (ties: the earliest). One reduction per block.
        best = tl.full([], 0x7F800000, tl.int64) << 32  # +inf at column 0: what an all-inf (or empty) row gives
        if STAGE == 1:
            c_first = tl.program_id(1).to(tl.int64) * BLOCK
            c_end = tl.minimum(c_first + BLOCK, n)
        else:
            c_first = tl.zeros([], tl.int64)
            c_end = n
        for c0 in range(c_first, c_end, BLOCK):
            col = c0 + offs
            m = col < c_end
            x = tl.load(SCORES + start + col, mask=m, other=float("inf")).to(tl.float32)
            if SHARED:  # the sum over the sequence's heads at the same column (the order of a mean)
                for h in range(1, heads):
                    x += tl.load(SCORES + tl.load(START + first + h).to(tl.int64) + col, mask=m,
                                 other=0.0).to(tl.float32)
            if PROTECT:  # the newest tokens and the sinks stay: scored +inf
                p = tl.load(POS + start + col, mask=m, other=0).to(tl.int64)
                x = tl.where((p > keep_above) | ((p >= 0) & (p < sinks)), float("inf"), x)
            bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
            key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
            key = tl.where(x != x, -2147483648, key)
            best = tl.minimum(best, tl.min((key.to(tl.int64) << 32) | col, 0))
        if STAGE == 1:
            tl.store(PARTIAL + prog * n_chunks + tl.program_id(1), best)
            return
    col = best - ((best >> 32) << 32)
    if SHARED:
        for h in range(0, heads):
            tl.store(VICTIM + first + h, tl.where(col < n, tl.load(START + first + h).to(tl.int64) + col, 0))
    else:
        tl.store(VICTIM + prog, tl.where(col < n, start + col, 0))


def _check_segments(seg_start, seg_len, device):
    if seg_start.dim() != 1 or seg_start.shape != seg_len.shape:
        raise ValueError(f"seg_start and seg_len must be [N], got {tuple(seg_start.shape)} and {tuple(seg_len.shape)}")
    if seg_start.device != device or seg_len.device != device:
        raise ValueError(f"seg_start and seg_len must be on {device}")


def _protect_args(seg_start, pos, newest, recent, sinks: int, heads: int):
    """The protection's arguments checked: with ``pos`` [S], ``newest`` [B] and ``recent`` (an int or [B])."""
    if pos is None:
        if newest is not None or (isinstance(recent, torch.Tensor) or recent) or sinks:
            raise ValueError("segment_argmin: newest, recent and sinks need pos")
        return
    if newest is None or newest.shape != (seg_start.shape[0] // heads,) or seg_start.shape[0] % heads:
        raise ValueError(f"segment_argmin: newest must be [B] = [{seg_start.shape[0]} segments // heads={heads}]")
    if isinstance(recent, torch.Tensor) and recent.shape != newest.shape:
        raise ValueError(f"segment_argmin: recent must be an int or [B] like newest, got {tuple(recent.shape)}")


def segment_argmin_reference(scores, seg_start, seg_len, width: int, *, pos=None, newest=None, recent=0,
                             sinks: int = 0, heads: int = 1, shared: bool = False, **_ignored) -> torch.Tensor:
    """The PyTorch formula ``ScoredEviction._evict_one`` used: argmin over the padded view (``inf`` past each
    length; an empty row gives column 0, whose padded slot number is 0); protected slots score ``inf``; shared:
    the padded rows of a sequence's heads summed first (in head order), one column for all of them."""
    _check_segments(seg_start, seg_len, scores.device)
    _protect_args(seg_start, pos, newest, recent, sinks, heads)
    if width == 0:
        return torch.zeros_like(seg_start)
    ar = torch.arange(width, device=scores.device)
    lengths = seg_len.view(-1, heads)[:, :1].expand(-1, heads).reshape(-1) if shared else seg_len
    valid = ar[None, :] < lengths[:, None]
    idx = torch.where(valid, seg_start[:, None] + ar[None, :], torch.zeros_like(ar)[None, :])
    vals = torch.where(valid, scores.float()[idx], torch.zeros_like(idx, dtype=torch.float32))
    if shared:  # every head's row becomes the sum over its sequence's heads (padding: 0, as the kernel's loads)
        rows = vals.view(-1, heads, width)
        total = rows[:, 0]
        for h in range(1, heads):
            total = total + rows[:, h]
        vals = total[:, None].expand(-1, heads, -1).reshape(-1, width)
    if pos is not None:
        keep_above = newest.long() - (recent.long() if isinstance(recent, torch.Tensor) else int(recent))
        per_seg = keep_above.repeat_interleave(heads)[:, None]
        first = idx.view(-1, heads, width)[:, :1].expand(-1, heads, -1).reshape(-1, width) if shared else idx
        p = pos.long()[first]
        vals = torch.where((p > per_seg) | ((p >= 0) & (p < sinks)), float("inf"), vals)
    vals = torch.where(valid, vals, float("inf"))
    return torch.gather(idx, 1, vals.argmin(dim=1, keepdim=True))[:, 0]


# A store past SPLIT_BLOCK columns is searched in blocks of that many by programs of their own (two launches):
# one program per segment scanned 8,448 slots in 8 us on the H200, one per sequence (TOVA, 8 heads) in 23 us.
ARGMIN_CONFIG = {"BLOCK": 2048, "num_warps": 8, "SPLIT_BLOCK": 1024, "split_warps": 4}


def segment_argmin_triton(scores, seg_start, seg_len, width: int, *, pos=None, newest=None, recent=0,
                          sinks: int = 0, heads: int = 1, shared: bool = False, split: bool | None = None,
                          block=None, num_warps=None) -> torch.Tensor:
    """The Triton path (see the module docstring)."""
    _check_segments(seg_start, seg_len, scores.device)
    _protect_args(seg_start, pos, newest, recent, sinks, heads)
    if scores.dim() != 1 or scores.is_complex() or scores.dtype == torch.bool:
        raise ValueError(f"scores must be a real [S] tensor, got {scores.dtype} {tuple(scores.shape)}")
    victim = torch.empty_like(seg_start, dtype=torch.int64)
    n_seg = seg_start.shape[0]
    if n_seg == 0:
        return victim
    n_prog = n_seg // heads if shared else n_seg
    per_seq = isinstance(recent, torch.Tensor)
    args = (scores.contiguous(), seg_start, seg_len, victim, int(width), seg_start if pos is None else pos,
            seg_start if newest is None else newest.contiguous(), recent.contiguous() if per_seq else seg_start,
            0 if per_seq else int(recent), int(sinks), int(heads))
    flags = dict(PROTECT=pos is not None, RECENT_PER_SEQ=per_seq, SHARED=bool(shared))
    if split is None:
        split = int(width) > ARGMIN_CONFIG["SPLIT_BLOCK"]
    if split:  # one program per block of columns, then one per segment (or sequence) for the least of them
        block = int(block or ARGMIN_CONFIG["SPLIT_BLOCK"])
        n_chunks = max(1, -(-int(width) // block))
        partial = torch.empty(n_prog * n_chunks, dtype=torch.int64, device=scores.device)
        _launch(_segment_argmin_kernel, (n_prog, n_chunks), *args, partial, n_chunks, **flags, STAGE=1,
                BLOCK=block, num_warps=int(num_warps or ARGMIN_CONFIG["split_warps"]))
        _launch(_segment_argmin_kernel, (n_prog,), *args, partial, n_chunks, **flags, STAGE=2,
                BLOCK=max(16, _next_pow2(n_chunks)), num_warps=1)
        return victim
    # no longer than the longest segment can be (the host knows width): a tiny store gets a tiny block
    block = int(block or min(ARGMIN_CONFIG["BLOCK"], max(16, _next_pow2(max(int(width), 1)))))
    _launch(_segment_argmin_kernel, (n_prog,), *args, seg_start, 1, **flags, STAGE=0, BLOCK=block,
            num_warps=int(num_warps or ARGMIN_CONFIG["num_warps"]))
    return victim


def segment_argmin(scores, seg_start, seg_len, width: int, **kw) -> torch.Tensor:
    """[N] int64: each segment's lowest-scoring slot (see the module docstring)."""
    if use_triton(scores):
        return segment_argmin_triton(scores, seg_start, seg_len, width, **kw)
    return segment_argmin_reference(scores, seg_start, seg_len, width, **kw)


# --------------------------------------------------------------------------
# move_last_into
# --------------------------------------------------------------------------

def _move_last_kernel(START, LEN, VICTIM, MASK, ROWS, WIDTHS: tl.constexpr, n_slots,
                       HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    seg = tl.program_id(0).to(tl.int64)
    n = tl.load(LEN + seg).to(tl.int64)
    # negative slot numbers wrap, as PyTorch's indexing in the reference (only a masked-in empty segment has one)
    last = tl.load(START + seg).to(tl.int64) + n - 1
    last = tl.where(last < 0, last + n_slots, last)
    victim = tl.load(VICTIM + seg).to(tl.int64)
    victim = tl.where(victim < 0, victim + n_slots, victim)
    if HAS_MASK:
        flag = (tl.load(MASK + seg) != 0).to(tl.int64)
    else:
        flag = tl.full([], 1, tl.int64)
    go = (flag + tl.zeros([BLOCK], tl.int64)) != 0
    offs = tl.arange(0, BLOCK)
    for i in tl.static_range(len(ROWS)):
        # a plain loop: triton 3.6 does not take a constexpr tuple's item as a static_range bound
        for w0 in range(0, WIDTHS[i], BLOCK):
            m = (w0 + offs < WIDTHS[i]) & go
            row = tl.load(ROWS[i] + last * WIDTHS[i] + w0 + offs, mask=m)
            tl.store(ROWS[i] + victim * WIDTHS[i] + w0 + offs, row, mask=m)
    tl.store(LEN + seg, n - flag)


def move_last_into_reference(per_slot, seg_start, seg_len, victim, mask=None) -> None:
    """What ``RaggedKV.remove_one`` did in PyTorch: a segment outside ``mask`` copies its last slot onto itself."""
    last = seg_start + seg_len - 1
    if mask is not None:
        victim = torch.where(mask, victim, last)
    for t in per_slot:
        t[victim] = t[last]
    seg_len -= 1 if mask is None else mask.long()


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_int_rows(t: torch.Tensor, n_slots: int) -> tuple[torch.Tensor, int] | None:
    """``t`` as [S, W] integers of its element size (a view: a bit copy moves it), or None when it cannot be."""
    if t.shape[:1] != (n_slots,) or not t.is_contiguous() or t.is_complex() or t.element_size() not in _INT_OF_SIZE:
        return None
    return t.view(_INT_OF_SIZE[t.element_size()]).reshape(-1), t[0].numel() if n_slots else 1


def move_last_into_triton(per_slot, seg_start, seg_len, victim, mask=None, *, block=256) -> None:
    """The Triton path (see the module docstring): one launch for every per-slot tensor and the length."""
    _check_segments(seg_start, seg_len, seg_len.device)
    if not per_slot:
        raise ValueError("move_last_into: no per-slot tensors")
    n_slots = per_slot[0].shape[0]
    rows = [_as_int_rows(t, n_slots) for t in per_slot]
    if any(r is None for r in rows):
        raise ValueError("move_last_into: per-slot tensors must be contiguous, of real or integer dtype, with "
                         f"{n_slots} rows each; got {[(tuple(t.shape), t.dtype) for t in per_slot]}")
    n_seg = seg_len.shape[0]
    if n_seg == 0:
        return
    widths = tuple(w for _, w in rows)
    mask_bytes = seg_len if mask is None else mask.contiguous().view(torch.uint8)  # bool as bytes (no copy)
    _launch(_move_last_kernel, (n_seg,), seg_start, seg_len, victim, mask_bytes,
            tuple(r for r, _ in rows), widths, n_slots, HAS_MASK=mask is not None,
            BLOCK=min(int(block), max(16, _next_pow2(max(widths)))), num_warps=1)


def move_last_into(per_slot, seg_start, seg_len, victim, mask=None) -> None:
    """Evict slot ``victim[i]`` of every segment ``i`` in ``mask`` (see the module docstring); in place."""
    n_slots = per_slot[0].shape[0] if per_slot else 0
    # a per-slot tensor the kernel cannot copy as bits (a strided view, complex numbers): the PyTorch copies
    if use_triton(seg_len) and per_slot and all(_as_int_rows(t, n_slots) is not None for t in per_slot):
        move_last_into_triton(per_slot, seg_start, seg_len, victim, mask)
    else:
        move_last_into_reference(per_slot, seg_start, seg_len, victim, mask)


# --------------------------------------------------------------------------
# micro-benchmark: python -m kvbench.kernels.segment_evict
# --------------------------------------------------------------------------

def bench_inputs(n_seg, per_seg, slack, D, device, seed=0):
    """A store as a 25% budget of 32k leaves it while decoding: ``n_seg`` segments holding ``per_seg`` tokens
    with ``slack`` free slots each; bf16 keys and values, positions, one float32 per-slot state (H2O's
    accumulator) and float32 scores (NaN in the slack, as a method may leave there)."""
    gen = torch.Generator().manual_seed(seed)
    cap = torch.full((n_seg,), per_seg + slack, dtype=torch.int64)
    seg_start, seg_len = (torch.cumsum(cap, 0) - cap).to(device), torch.full((n_seg,), per_seg).to(device)
    S = int(cap.sum())
    per_slot = [torch.randn(S, D, generator=gen).to(device, torch.bfloat16),
                torch.randn(S, D, generator=gen).to(device, torch.bfloat16),
                torch.arange(S, dtype=torch.int32).to(device), torch.rand(S, generator=gen).to(device)]
    scores = torch.rand(S, generator=gen)
    scores[(torch.arange(S) % (per_seg + slack)) >= per_seg] = float("nan")
    return per_slot, seg_start, seg_len, scores.to(device), int(cap.max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Time one decoding step's eviction in one layer: the PyTorch ops "
                                             "ScoredEviction._evict_one ran (padded view, argmin, gather, "
                                             "RaggedKV.remove_one's copies) against segment_argmin + move_last_into "
                                             "(CUDA graph replays).")
    ap.add_argument("--segments", type=int, default=8, help="B * Hkv (default 8: batch 1 of Llama-3.1-8B)")
    ap.add_argument("--slots", type=int, default=8192, help="tokens per segment (default: 25%% of 32k)")
    ap.add_argument("--slack", type=int, default=256, help="free slots per segment (default: growth_slack(8192))")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--tiny", action="store_true", help="minute sizes on the CPU interpreter: checks the script")
    args = ap.parse_args(argv)
    from .bench import time_calls

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("segment_evict benchmark: needs a CUDA GPU (run with --tiny to check the script on the CPU)")
        return 0
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.segments, args.slots, args.slack, args.head_dim, args.reps = 2, 40, 8, 16, 2
    dev = torch.device("cuda" if cuda else "cpu")
    # One store per path, each evicted from at every call (a few hundred of its thousands of tokens).
    old_in, new_in = (bench_inputs(args.segments, args.slots, args.slack, args.head_dim, dev) for _ in range(2))
    mask = torch.ones(args.segments, dtype=torch.bool, device=dev)

    victim = segment_argmin_reference(*old_in[3:4], *old_in[1:3], old_in[4])
    same = torch.equal(victim, segment_argmin_triton(new_in[3], *new_in[1:3], new_in[4]))
    S = new_in[0][0].shape[0]
    print(f"{torch.cuda.get_device_name() if cuda else 'cpu (interpreter)'}: S = {S} slots ({args.segments} x "
          f"({args.slots} + {args.slack} slack)), D = {args.head_dim}, bf16 k/v + int32 pos + fp32 state; "
          f"victims equal: {same}")

    def old_argmin(inp=old_in):
        return segment_argmin_reference(inp[3], inp[1], inp[2], inp[4])

    def new_argmin(inp=new_in, **kw):
        return segment_argmin_triton(inp[3], inp[1], inp[2], inp[4], **kw)

    rows = [("argmin: padded view + argmin + gather (before)", lambda: old_argmin()),
            ("evict: that + RaggedKV.remove_one's copies (before)",
             lambda: move_last_into_reference(old_in[0], old_in[1], old_in[2], old_argmin(), mask)),
            ("argmin: segment_argmin kernel", lambda: new_argmin()),
            ("argmin: one program per segment (no split)", lambda: new_argmin(split=False)),
            ("argmin: one ranking per sequence of 8 heads (TOVA)",
             lambda: new_argmin(heads=min(8, args.segments), shared=True)),
            ("argmin: the same, no split", lambda: new_argmin(heads=min(8, args.segments), shared=True, split=False)),
            ("evict: segment_argmin + move_last_into kernels",
             lambda: move_last_into_triton(new_in[0], new_in[1], new_in[2], new_argmin(), mask))]
    if not args.tiny:
        rows += [(f"argmin: split kernel BLOCK={b} warps={w}",
                  lambda b=b, w=w: new_argmin(block=b, num_warps=w, split=True))
                 for b in (256, 512, 1024, 2048) for w in (2, 4, 8)]
    for name, call in rows:
        ms, spread = time_calls([call], reps=args.reps)
        print(f"  {name:<56} {ms * 1e3:8.1f} us  (spread {spread:.0%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
