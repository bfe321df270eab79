"""Decode-time attention probability of every slot of the ragged store (H2O, TOVA).

Store layout as in ``decode_attention.py``: ``k: [S, D]``; segment ``i = b * Hkv + h`` owns slots
``[seg_start[i], seg_start[i] + seg_len[i])`` plus slack after them. For the last query of each KV head's group,
``q: [B*Hkv, G, D]``, with ``lse: [B*Hkv, G]`` the natural-log normaliser of its attention over exactly the
valid slots (``ragged_attention`` returns it in natural log), the probability that query row ``g`` of segment
``i`` gives slot ``s`` is ``exp(scale * <k[s], q[i, g]> - lse[i, g])``; the result reduces it over ``g``:

    out[s] = mean_g (or max_g) exp(scale * <k[s], q[i, g]> - lse[i, g])   for the valid slots s of segment i

and 0 at slack slots (which may hold garbage, even NaN).

Public API
----------
``slot_attention_probs(q, lse, k, seg_start, seg_len, width, scale, reduce="mean", out=None) -> [S]``
    float32 (``out``: added into it, the valid slots only); ``width``: at least the longest segment (the
    store's largest capacity, known on the host). Triton when ``k`` is on CUDA or ``KVBENCH_TRITON=1``
    (``TRITON_INTERPRET=1`` on the CPU), else the PyTorch reference. ``slot_attention_probs_triton`` and
    ``slot_attention_probs_reference``: the two paths.
``slot_attention_probs_from_logits(logits, lse, seg_start, seg_len, width, reduce="mean", out=None) -> [S]``
    the same from the logits the decode attention kernel wrote in its pass (``ragged_attention(...,
    slot_logits=)``, ``[S, G]`` float32): ``exp(logits[s, g] - lse[i, g])`` reduced over ``g``. It reads
    ``4 G`` bytes a slot instead of the ``2 D`` bytes of a bf16 key (16 against 256 for Llama's G = 4,
    D = 128); ``slot_attention_probs_from_logits_triton`` / ``_reference``: its two paths.

Design: H2O and TOVA call this every decoding step, so it must cost about one read of the bf16 keys (the
PyTorch formula copies all keys to fp32 and gathers a ``[S, G, D]`` fp32 query per slot: ~15x the bytes).
The grid is one program per (segment, ``BLOCK_S`` of its slots) up to ``width`` (known on the host; no host
reads: CUDA-graph capturable); a program loads its keys once (fp32 in registers) and its segment's ``G``
query rows as one ``[D]`` vector each. (The first version ran one program per block of physical slots and
gathered each slot's query row through a slot-to-segment index: ``G`` x ``[BLOCK_S, D]`` loads a block, which
held it to about a third of the copy bandwidth at batch 8 on the H200, slower than the attention itself.)
"""

from __future__ import annotations

import argparse
import os

import torch

from .decode_attention import _LOG2E, _launch, _next_pow2, use_triton

__all__ = ["slot_attention_probs", "slot_attention_probs_triton", "slot_attention_probs_reference",
           "slot_attention_probs_from_logits", "slot_attention_probs_from_logits_triton",
           "slot_attention_probs_from_logits_reference"]

try:  # triton is a dependency, but keep the reference usable without it
    import triton.language as tl
except Exception:  # pragma: no cover
    tl = None


def _slot_probs_kernel(
    Q, LSE, K, SEG_START, SEG_LEN, OUT,
    stride_qs, stride_qg, stride_qd, stride_ls, stride_lg, stride_ks, stride_kd,
    group, qk_scale, inv_group, LOG2E: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, REDUCE_MAX: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    seg = tl.program_id(0).to(tl.int64)  # one program per (segment, block of its slots)
    col = tl.program_id(1).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    start = tl.load(SEG_START + seg)
    valid = col < tl.load(SEG_LEN + seg)
    slot = start + col
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    # slack slots (garbage, even NaN) are never read
    k = tl.load(K + slot[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    total = tl.zeros([BLOCK_S], dtype=tl.float32)  # also the start of the max: probabilities are >= 0
    for g in range(0, group):  # the segment's query rows: one [D] vector each, loaded once per program
        q = tl.load(Q + seg * stride_qs + g * stride_qg + offs_d * stride_qd, mask=dmask, other=0.0).to(tl.float32)
        lse2 = tl.load(LSE + seg * stride_ls + g * stride_lg).to(tl.float32) * LOG2E
        p = tl.exp2(tl.sum(k * q[None, :], 1) * qk_scale - lse2)
        if REDUCE_MAX:
            total = tl.maximum(total, p)
        else:
            total += p
    if not REDUCE_MAX:
        total = total * inv_group
    if ACCUMULATE:  # OUT += the probabilities (H2O's running sum: no second launch)
        total += tl.load(OUT + slot, mask=valid, other=0.0)
    tl.store(OUT + slot, total, mask=valid)


def _slot_probs_from_logits_kernel(
    LOGITS, LSE, SEG_START, SEG_LEN, OUT, stride_ls, stride_lg, group, inv_group, LOG2E: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, REDUCE_MAX: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    seg = tl.program_id(0).to(tl.int64)  # one program per (segment, block of its slots), as above
    col = tl.program_id(1).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    start = tl.load(SEG_START + seg)
    valid = col < tl.load(SEG_LEN + seg)
    slot = start + col
    rows = tl.arange(0, BLOCK_G)
    rmask = rows < group
    lse2 = tl.load(LSE + seg * stride_ls + rows * stride_lg, mask=rmask, other=0.0).to(tl.float32) * LOG2E
    # a slot's G logits are contiguous: the [BLOCK_S, G] tile is one coalesced read; slack rows are never read
    logit = tl.load(LOGITS + slot[:, None] * group + rows[None, :], mask=valid[:, None] & rmask[None, :],
                    other=float("-inf"))
    p = tl.exp2(logit * LOG2E - lse2[None, :])  # padded rows: exp2(-inf) = 0
    if REDUCE_MAX:
        total = tl.max(p, 1)
    else:
        total = tl.sum(p, 1) * inv_group
    if ACCUMULATE:
        total += tl.load(OUT + slot, mask=valid, other=0.0)
    tl.store(OUT + slot, total, mask=valid)


def _check(q, lse, k, seg_start, seg_len, width, reduce):
    if q.dim() != 3:
        raise ValueError(f"q must be [B*Hkv, G, D], got {tuple(q.shape)}")
    n_seg, G, D = q.shape
    if lse.shape != (n_seg, G):
        raise ValueError(f"lse must be [B*Hkv, G] = {(n_seg, G)}, got {tuple(lse.shape)}")
    if k.dim() != 2 or k.shape[1] != D:
        raise ValueError(f"k must be [S, D] with D = {D}, got {tuple(k.shape)}")
    if seg_start.shape != (n_seg,) or seg_len.shape != (n_seg,):
        raise ValueError(f"seg_start / seg_len must hold B*Hkv = {n_seg} entries")
    if isinstance(width, torch.Tensor) or int(width) < 0:
        raise ValueError(f"width must be a host int (at least the longest segment), got {width!r}")
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    if any(t.device != k.device for t in (q, lse, seg_start, seg_len)):
        raise ValueError(f"q, lse and the segment tensors must be on k's device ({k.device})")


SLOT_CONFIG = {"BLOCK_S": 64, "num_warps": 4}
LOGITS_CONFIG = {"BLOCK_S": 256, "num_warps": 4}  # a tile is BLOCK_S x G floats: wider blocks, fewer programs


def _check_out(out, k):
    if out is not None and (out.shape != (k.shape[0],) or out.dtype != torch.float32 or not out.is_contiguous()
                            or out.device != k.device):
        raise ValueError(f"out must be a contiguous float32 [S] = [{k.shape[0]}] tensor on {k.device}")


def slot_attention_probs_triton(q, lse, k, seg_start, seg_len, width: int, scale, reduce="mean", out=None,
                                *, block_s=None, num_warps=None):
    """The Triton path (see the module docstring); every element of the result is written (``out``: added to
    at the valid slots)."""
    _check(q, lse, k, seg_start, seg_len, width, reduce)
    _check_out(out, k)
    S, D = k.shape
    accumulate = out is not None
    if out is None:  # slack slots are never visited: zeros there
        out = torch.zeros(S, dtype=torch.float32, device=k.device)
    n_seg, G = q.shape[0], q.shape[1]
    BLOCK_S = int(block_s or SLOT_CONFIG["BLOCK_S"])
    if S == 0 or n_seg == 0 or int(width) == 0:
        return out
    _launch(
        _slot_probs_kernel, (n_seg, -(-int(width) // BLOCK_S)),
        q, lse, k, seg_start, seg_len, out,
        q.stride(0), q.stride(1), q.stride(2), lse.stride(0), lse.stride(1), k.stride(0), k.stride(1),
        G, float(scale) * _LOG2E, 1.0 / max(G, 1), _LOG2E,
        HEAD_DIM=D, BLOCK_S=BLOCK_S, BLOCK_D=_next_pow2(D), REDUCE_MAX=(reduce == "max"), ACCUMULATE=accumulate,
        num_warps=int(num_warps or SLOT_CONFIG["num_warps"]),
    )
    return out


def slot_attention_probs_reference(q, lse, k, seg_start, seg_len, width: int, scale, reduce="mean", out=None,
                                   **_ignored):
    """PyTorch oracle, the formula ``LayerCall.slot_attention`` used before the kernel: fp32 keys and a
    per-slot copy of its segment's queries ([S, G, D])."""
    _check(q, lse, k, seg_start, seg_len, width, reduce)
    _check_out(out, k)
    return _reference_probs(lambda idx: torch.einsum("nwd,ngd->nwg", k.float()[idx], q.float()) * scale,
                            lse, seg_start, seg_len, width, k.shape[0], reduce, out)


def _reference_probs(logits_at, lse, seg_start, seg_len, width, S, reduce, out):
    """The references' common part: the padded view of the segments with fixed shapes (a replayed decoding step
    on the CPU runs this), ``logits_at(idx) -> [n_seg, width, G]``, exp against the lse, the reduction over
    the group, and the scatter back per slot (padding goes to a spare slot past the end)."""
    ar = torch.arange(int(width), device=lse.device)
    valid = ar[None, :] < seg_len[:, None]
    idx = torch.where(valid, seg_start[:, None] + ar[None, :], torch.zeros_like(ar)[None, :])
    p = torch.exp(logits_at(idx) - lse.float()[:, None, :])
    p = p.amax(-1) if reduce == "max" else p.mean(-1)
    at = torch.where(valid, idx, torch.full_like(idx, S)).reshape(-1)
    result = torch.zeros(S + 1, dtype=torch.float32, device=lse.device).index_put_((at,), p.reshape(-1))[:S]
    return result if out is None else out.add_(result)


def slot_attention_probs(q, lse, k, seg_start, seg_len, width: int, scale, reduce="mean", out=None, **kw):
    """Float32 ``[S]``: each slot's attention probability from its segment's last query, reduced over the
    ``G`` query rows of the KV head ("mean" or "max"); 0 at slack slots. ``out``: added into it instead (a
    running sum, as H2O's), at the valid slots, and returned. ``width``: at least the longest segment."""
    if use_triton(k):
        return slot_attention_probs_triton(q, lse, k, seg_start, seg_len, width, scale, reduce, out, **kw)
    return slot_attention_probs_reference(q, lse, k, seg_start, seg_len, width, scale, reduce, out)


def _check_logits(logits, lse, seg_start, seg_len, width, reduce):
    if logits.dim() != 2 or logits.dtype != torch.float32 or not logits.is_contiguous():
        raise ValueError(f"logits must be a contiguous float32 [S, G] tensor, got {tuple(logits.shape)} {logits.dtype}")
    n_seg = seg_start.shape[0]
    if lse.shape != (n_seg, logits.shape[1]):
        raise ValueError(f"lse must be [B*Hkv, G] = {(n_seg, logits.shape[1])}, got {tuple(lse.shape)}")
    if seg_len.shape != (n_seg,):
        raise ValueError(f"seg_start / seg_len must hold B*Hkv = {n_seg} entries")
    if isinstance(width, torch.Tensor) or int(width) < 0:
        raise ValueError(f"width must be a host int (at least the longest segment), got {width!r}")
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    if any(t.device != logits.device for t in (lse, seg_start, seg_len)):
        raise ValueError(f"lse and the segment tensors must be on the logits' device ({logits.device})")


def slot_attention_probs_from_logits_triton(logits, lse, seg_start, seg_len, width: int, reduce="mean", out=None,
                                            *, block_s=None, num_warps=None):
    """The Triton path of ``slot_attention_probs_from_logits`` (one launch, no host reads)."""
    _check_logits(logits, lse, seg_start, seg_len, width, reduce)
    _check_out(out, logits)
    S, G = logits.shape
    accumulate = out is not None
    if out is None:
        out = torch.zeros(S, dtype=torch.float32, device=logits.device)
    n_seg = lse.shape[0]
    BLOCK_S = int(block_s or LOGITS_CONFIG["BLOCK_S"])
    if S == 0 or n_seg == 0 or int(width) == 0:
        return out
    _launch(
        _slot_probs_from_logits_kernel, (n_seg, -(-int(width) // BLOCK_S)),
        logits, lse, seg_start, seg_len, out, lse.stride(0), lse.stride(1), G, 1.0 / max(G, 1), _LOG2E,
        BLOCK_S=BLOCK_S, BLOCK_G=max(2, _next_pow2(G)), REDUCE_MAX=(reduce == "max"), ACCUMULATE=accumulate,
        num_warps=int(num_warps or LOGITS_CONFIG["num_warps"]),
    )
    return out


def slot_attention_probs_from_logits_reference(logits, lse, seg_start, seg_len, width: int, reduce="mean", out=None,
                                               **_ignored):
    """PyTorch oracle of ``slot_attention_probs_from_logits`` (fixed shapes: no host reads)."""
    _check_logits(logits, lse, seg_start, seg_len, width, reduce)
    _check_out(out, logits)
    return _reference_probs(lambda idx: logits[idx], lse, seg_start, seg_len, width, logits.shape[0], reduce, out)


def slot_attention_probs_from_logits(logits, lse, seg_start, seg_len, width: int, reduce="mean", out=None, **kw):
    """``slot_attention_probs`` from the logits the decode attention wrote (``logits [S, G]``, natural log,
    ``scale * <q, k>``): the keys are not read again."""
    if use_triton(logits):
        return slot_attention_probs_from_logits_triton(logits, lse, seg_start, seg_len, width, reduce, out, **kw)
    return slot_attention_probs_from_logits_reference(logits, lse, seg_start, seg_len, width, reduce, out)


# --------------------------------------------------------------------------
# micro-benchmark: python -m kvbench.kernels.slot_scores [--tiny]
# --------------------------------------------------------------------------

def bench_inputs(n_seg, per_seg, G, D, dtype, device, seed=0):
    """A store of ``n_seg`` segments of ``per_seg`` slots each (the last 3% slack, as ``growth_slack`` leaves
    after a prefill), random keys and queries, and the true ``lse`` of each query over the valid slots."""
    from .decode_attention import ragged_attention_reference

    gen = torch.Generator().manual_seed(seed)
    cap = torch.full((n_seg,), per_seg, dtype=torch.int64)
    seg_len = cap - torch.randint(1, max(2, per_seg // 32), (n_seg,), generator=gen)
    seg_start = torch.cumsum(cap, 0) - cap
    k = torch.randn(n_seg * per_seg, D, generator=gen).to(device, dtype)
    q = torch.randn(n_seg, G, D, generator=gen).to(device, dtype)
    seg_start, seg_len = seg_start.to(device), seg_len.to(device)
    scale = D ** -0.5
    _, lse = ragged_attention_reference(q.view(1, n_seg * G, 1, D), k, k, seg_start, seg_len, scale)
    return [q, lse.view(n_seg, G), k, seg_start, seg_len, per_seg], scale


def main(argv=None):
    ap = argparse.ArgumentParser(description="Time slot_attention_probs against the einsum formula it replaces "
                                             "(CUDA graph replays, keys rotated over copies beyond L2).")
    ap.add_argument("--segments", type=int, default=8, help="B * Hkv (default 8: batch 1 of Llama-3.1-8B)")
    ap.add_argument("--slots", type=int, default=8192, help="slots per segment (default: 25%% of 32k)")
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--tiny", action="store_true", help="minute sizes on the CPU interpreter: checks the script")
    args = ap.parse_args(argv)
    from .bench import measure_copy_bw, time_calls

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("no CUDA device: run with --tiny to check the script (interpreter)")
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.segments, args.slots, args.head_dim, args.reps = 2, 96, 64, 2
    dev = torch.device("cuda" if cuda else "cpu")
    n_copies = 1 if args.tiny else max(1, -(-(256 << 20) // (args.segments * args.slots * args.head_dim * 2)))
    copies = [bench_inputs(args.segments, args.slots, args.group, args.head_dim, torch.bfloat16, dev, seed=i)
              for i in range(n_copies)]
    (q, lse, k, seg_start, seg_len, width), scale = copies[0]
    err = (slot_attention_probs_triton(q, lse, k, seg_start, seg_len, width, scale)
           - slot_attention_probs_reference(q, lse, k, seg_start, seg_len, width, scale)).abs().max().item()
    bw = measure_copy_bw(dev, nbytes=2**24 if args.tiny else 2 << 30, reps=3 if args.tiny else 20)
    floor_ms = k.numel() * k.element_size() / bw * 1e3   # the keys read once at the copy bandwidth
    S = k.shape[0]
    print(f"{torch.cuda.get_device_name() if cuda else 'cpu (interpreter)'}: S = {S} slots "
          f"({args.segments} x {args.slots}), G = {args.group}, D = {args.head_dim}, bf16; "
          f"max |new - einsum| = {err:.2e}; key-read floor {floor_ms * 1e3:.1f} us")
    old = [lambda t=t, s=s: slot_attention_probs_reference(*t, s) for t, s in copies]  # the formula it replaces
    ms, spread = time_calls(old, reps=args.reps)
    print(f"  einsum (before)          {ms * 1e3:9.1f} us  (spread {spread:.0%})")
    configs = [(64, 4)] if args.tiny else [(bs, nw) for bs in (32, 64, 128, 256) for nw in (2, 4, 8)]
    for bs, nw in configs:
        new = [lambda t=t, s=s: slot_attention_probs_triton(*t, s, block_s=bs, num_warps=nw) for t, s in copies]
        ms, spread = time_calls(new, reps=args.reps)
        star = " (default)" if (bs, nw) == (SLOT_CONFIG["BLOCK_S"], SLOT_CONFIG["num_warps"]) else ""
        print(f"  kernel BLOCK_S={bs:<3} warps={nw}  {ms * 1e3:9.1f} us  "
              f"({floor_ms / ms:.0%} of the floor; spread {spread:.0%}){star}")
    # From the logits the decode attention writes in its own pass: what it costs the attention to write them,
    # and what reading them back costs instead of the keys.
    from .decode_attention import ragged_attention_triton
    G = args.group
    q4 = [t[0].reshape(1, args.segments * G, 1, args.head_dim) for t, _ in copies]
    logits = [torch.empty(S, G, dtype=torch.float32, device=dev) for _ in copies]
    for (t, s), q, lg in zip(copies, q4, logits):
        ragged_attention_triton(q, t[2], t[2], t[3], t[4], s, slot_logits=lg)
    for label, kw in (("decode attention", lambda i: {}), ("decode attention + logits", lambda i: {"slot_logits": logits[i]})):
        calls = [lambda i=i, t=t, s=s: ragged_attention_triton(q4[i], t[2], t[2], t[3], t[4], s, **kw(i))
                 for i, (t, s) in enumerate(copies)]
        ms, spread = time_calls(calls, reps=args.reps)
        print(f"  {label:<28}{ms * 1e3:9.1f} us  (spread {spread:.0%})")
    (q, lse, k, seg_start, seg_len, width), scale = copies[0]
    err = (slot_attention_probs_from_logits_triton(logits[0], lse, seg_start, seg_len, width)
           - slot_attention_probs_reference(q, lse, k, seg_start, seg_len, width, scale)).abs().max().item()
    lfloor_ms = S * G * 4 / bw * 1e3
    print(f"  from logits: max |probs - einsum| = {err:.2e}; logit-read floor {lfloor_ms * 1e3:.1f} us")
    for bs, nw in ([(256, 4)] if args.tiny else [(bs, nw) for bs in (128, 256, 512) for nw in (2, 4, 8)]):
        calls = [lambda i=i, t=t: slot_attention_probs_from_logits_triton(logits[i], t[1], t[3], t[4], t[5],
                                                                          block_s=bs, num_warps=nw)
                 for i, (t, _) in enumerate(copies)]
        ms, spread = time_calls(calls, reps=args.reps)
        star = " (default)" if (bs, nw) == (LOGITS_CONFIG["BLOCK_S"], LOGITS_CONFIG["num_warps"]) else ""
        print(f"  from logits BLOCK_S={bs:<3} warps={nw}  {ms * 1e3:7.1f} us  (spread {spread:.0%}){star}")


if __name__ == "__main__":
    main()
