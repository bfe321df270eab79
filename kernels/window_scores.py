"""Observation-window scores over the ragged store (SnapKV / PyramidKV style).

``window_scores(q_win, q_pos, k, k_pos, seg_start, seg_len, scale, reduce)``
returns, for every slot of ``k: [S, D]``, the attention probability that the
last ``w`` prompt queries put on it, summed over the ``w`` queries and reduced
("mean" or "max") over the ``G`` query heads of the slot's KV head, or, with
reduce "none", kept per query head: ``[S, G]`` (column g: query head
``h * G + g`` of the slot's KV head h; CompressKV ranks by chosen heads).  Each query
takes a softmax over the keys of its segment that it may see: key visible iff
``k_pos[slot] <= q_pos[b, t]`` (causal by position; slots may be in any order).
Slots outside every valid range score 0.

The Triton path never materialises the ``[Hq, w, N]`` probabilities:

* pass 1 (``_ws_lse_kernel``): for each (segment, tile of the ``G * w`` query
  rows, split of the keys), the running row max and sum of ``exp`` give a
  partial log2-sum-exp; the splits are merged with one ``logsumexp`` over a
  small ``[n_seg, n_split, G * w]`` tensor (its size is capped by the SM
  count, not by ``w * N``);
* pass 2 (``_ws_score_kernel``): for each key tile, recompute the scores of
  all ``G * w`` rows, normalise with the row LSE, sum over the window, reduce
  over the group and write one float per slot (each slot written by exactly
  one program: no atomics).

``window_scores_reference`` materialises everything in fp32 (the oracle), and
``pool_scores`` is SnapKV's 1-D pooling along slot order inside each segment.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .decode_attention import _env_true, _launch, _next_pow2, _num_sms, use_triton, _gather_segments

try:
    import triton.language as tl
except Exception:  # pragma: no cover
    tl = None

__all__ = ["window_scores", "window_scores_triton", "window_scores_reference", "pool_scores"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _ws_lse_kernel(
    Q, QPOS, K, KPOS, SEG_START, SEG_LEN, LSEP,
    stride_qb, stride_qh, stride_qt, stride_qd, stride_pb, stride_pt,
    stride_ks, stride_kd,
    n_kv_heads, group, w, n_split, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    b = seg // n_kv_heads
    h = seg % n_kv_heads
    seg_len = tl.load(SEG_LEN + seg).to(tl.int32)
    start = tl.load(SEG_START + seg).to(tl.int64)

    n_rows = group * w
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    g = rows // w
    t = rows % w
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
    qpos = tl.load(QPOS + b.to(tl.int64) * stride_pb + t * stride_pt, mask=rmask, other=-1).to(tl.int64)

    per = (seg_len + n_split - 1) // n_split
    per = (per + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = split * per
    hi = tl.minimum(lo + per, seg_len)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + offs_n
        nmask = n < hi
        slot = start + n.to(tl.int64)
        kt = tl.load(K + slot[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                     mask=nmask[None, :] & dmask[:, None], other=0.0)
        kpos = tl.load(KPOS + slot, mask=nmask, other=0).to(tl.int64)
        if DOT_F32:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        vis = nmask[None, :] & (kpos[None, :] <= qpos[:, None])
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    lse2 = m_i + tl.log2(l_i)   # -inf where no key was visible
    tl.store(LSEP + (seg.to(tl.int64) * n_split + split) * n_rows + rows, lse2, mask=rmask)


def _ws_score_kernel(
    Q, QPOS, K, KPOS, SEG_START, SEG_LEN, LSE2, SCORES,
    stride_qb, stride_qh, stride_qt, stride_qd, stride_pb, stride_pt,
    stride_ks, stride_kd,
    n_kv_heads, group, w, n_split, qk_scale, inv_group,
    HEAD_DIM: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    REDUCE_MAX: tl.constexpr, REDUCE_NONE: tl.constexpr,
):
    seg = tl.program_id(0)
    split = tl.program_id(1)
    b = seg // n_kv_heads
    h = seg % n_kv_heads
    seg_len = tl.load(SEG_LEN + seg).to(tl.int32)
    start = tl.load(SEG_START + seg).to(tl.int64)
    n_rows = group * w

    per = (seg_len + n_split - 1) // n_split
    per = (per + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = split * per
    hi = tl.minimum(lo + per, seg_len)
    offs_n = tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_W)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + offs_n
        nmask = n < hi
        slot = start + n.to(tl.int64)
        kt = tl.load(K + slot[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                     mask=nmask[None, :] & dmask[:, None], other=0.0)
        if DOT_F32:
            kt = kt.to(tl.float32)
        kpos = tl.load(KPOS + slot, mask=nmask, other=0).to(tl.int64)
        tot = tl.full([BLOCK_N], 0.0, tl.float32)
        for g in range(0, group):
            acc = tl.full([BLOCK_N], 0.0, tl.float32)
            for t0 in range(0, w, BLOCK_W):
                t = t0 + offs_w
                tmask = t < w
                q_off = (b.to(tl.int64) * stride_qb + (h * group + g).to(tl.int64) * stride_qh
                         + t.to(tl.int64) * stride_qt)
                q = tl.load(Q + q_off[:, None] + offs_d[None, :] * stride_qd,
                            mask=tmask[:, None] & dmask[None, :], other=0.0)
                if DOT_F32:
                    q = q.to(tl.float32)
                else:
                    q = q.to(K.dtype.element_ty)
                qpos = tl.load(QPOS + b.to(tl.int64) * stride_pb + t * stride_pt,
                               mask=tmask, other=-1).to(tl.int64)
                lse2 = tl.load(LSE2 + seg.to(tl.int64) * n_rows + g * w + t, mask=tmask,
                               other=float("-inf"))
                s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
                vis = (nmask[None, :] & (kpos[None, :] <= qpos[:, None])
                       & (lse2 > float("-inf"))[:, None])
                p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
                acc += tl.sum(p, 0)
            if REDUCE_NONE:
                tl.store(SCORES + slot * group + g, acc, mask=nmask)
            elif REDUCE_MAX:
                tot = tl.maximum(tot, acc)
            else:
                tot += acc
        if not REDUCE_NONE:
            if not REDUCE_MAX:
                tot = tot * inv_group
            tl.store(SCORES + slot, tot, mask=nmask)


def _check(q_win, q_pos, k, k_pos, seg_start, seg_len, reduce):
    if q_win.dim() != 4:
        raise ValueError("q_win must be [B, Hq, w, D]")
    B, Hq, w, D = q_win.shape
    if q_pos.shape != (B, w):
        raise ValueError(f"q_pos must be [B, w] = {(B, w)}, got {tuple(q_pos.shape)}")
    if k.dim() != 2 or k.shape[1] != D or k_pos.shape != (k.shape[0],):
        raise ValueError("k must be [S, D] and k_pos [S]")
    n_seg = seg_start.numel()
    if seg_len.numel() != n_seg or n_seg % B != 0:
        raise ValueError("seg_start / seg_len must hold B * Hkv entries")
    hkv = n_seg // B
    if Hq % hkv != 0:
        raise ValueError(f"Hq={Hq} is not a multiple of Hkv={hkv}")
    if reduce not in ("mean", "max", "none"):
        raise ValueError(f"reduce must be 'mean', 'max' or 'none', got {reduce!r}")
    return B, Hq, w, D, hkv, Hq // hkv


WS_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_W": 64, "num_warps": 4, "num_stages": 2,
             "lse_keys_per_split": 512, "progs_per_sm": 4}


def window_scores_triton(
    q_win: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, k_pos: torch.Tensor,
    seg_start: torch.Tensor, seg_len: torch.Tensor, scale: float, reduce: str = "mean",
    *, n_split: Optional[int] = None, block_n: Optional[int] = None,
    out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Two-pass Triton window scores (no host synchronisation).

    ``out``: optional float32 ``[S]`` (reduce "none": ``[S, G]``) buffer, written at the valid slots only
    (the caller initialises the rest; by default a zero-filled tensor).
    ``lse``: optional ``[B, Hq, w]`` natural-log normalisers of the window's
    rows over these keys, when the caller has them (a decoding step's
    attention returns them): the first pass is skipped.
    """
    B, Hq, w, D, hkv, G = _check(q_win, q_pos, k, k_pos, seg_start, seg_len, reduce)
    S = k.shape[0]
    dev = k.device
    n_seg = B * hkv
    shape = (S, G) if reduce == "none" else (S,)
    if out is None:
        scores = torch.zeros(shape, dtype=torch.float32, device=dev)
    else:
        if out.shape != shape or out.dtype != torch.float32 or out.device != dev or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 {list(shape)} tensor on k's device")
        scores = out
    if S == 0 or w == 0:
        return scores
    seg_start = seg_start.to(dev).contiguous()
    seg_len = seg_len.to(dev).contiguous()
    q_pos = q_pos.to(dev)
    k_pos = k_pos.to(dev)
    cfg = WS_CONFIG
    BLOCK_N = int(block_n or cfg["BLOCK_N"])
    BLOCK_D = max(16, _next_pow2(D))
    n_rows = G * w
    BLOCK_M = max(16, min(cfg["BLOCK_M"], _next_pow2(n_rows)))
    BLOCK_W = max(16, min(cfg["BLOCK_W"], _next_pow2(w)))
    n_mt = -(-n_rows // BLOCK_M)
    sms = _num_sms(dev)
    avg = max(1, S // n_seg)
    if n_split is None:
        split1 = max(1, min(-(-avg // cfg["lse_keys_per_split"]), -(-cfg["progs_per_sm"] * sms // (n_seg * n_mt))))
        split2 = max(1, min(-(-avg // BLOCK_N), -(-cfg["progs_per_sm"] * sms // n_seg)))
    else:
        split1 = split2 = int(n_split)
    dot_f32 = _env_true("TRITON_INTERPRET") and k.dtype == torch.bfloat16
    precision = "ieee" if (k.dtype == torch.float32 or dot_f32) else "tf32"
    qk_scale = float(scale) * _LOG2E
    common = (q_win.stride(0), q_win.stride(1), q_win.stride(2), q_win.stride(3),
              q_pos.stride(0), q_pos.stride(1), k.stride(0), k.stride(1))

    if lse is not None:
        if lse.shape != (B, Hq, w):
            raise ValueError(f"lse must be [B, Hq, w] = {(B, Hq, w)}, got {tuple(lse.shape)}")
        lse2 = (lse.float() * _LOG2E).reshape(n_seg, n_rows).contiguous()
    else:
        lsep = torch.empty((n_seg, split1, n_rows), dtype=torch.float32, device=dev)
        _launch(
            _ws_lse_kernel, (n_seg, n_mt, split1),
            q_win, q_pos, k, k_pos, seg_start, seg_len, lsep, *common,
            hkv, G, w, split1, qk_scale,
            HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
            PRECISION=precision, DOT_F32=dot_f32,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        if split1 == 1:
            lse2 = lsep.view(n_seg, n_rows)
        else:
            lse2 = (torch.logsumexp(lsep * _LN2, dim=1) * _LOG2E).contiguous()
    _launch(
        _ws_score_kernel, (n_seg, split2),
        q_win, q_pos, k, k_pos, seg_start, seg_len, lse2, scores, *common,
        hkv, G, w, split2, qk_scale, 1.0 / G,
        HEAD_DIM=D, BLOCK_W=BLOCK_W, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        PRECISION=precision, DOT_F32=dot_f32, REDUCE_MAX=(reduce == "max"), REDUCE_NONE=(reduce == "none"),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return scores


def window_scores_reference(
    q_win: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, k_pos: torch.Tensor,
    seg_start: torch.Tensor, seg_len: torch.Tensor, scale: float, reduce: str = "mean",
    **_ignored,
) -> torch.Tensor:
    """PyTorch oracle: materialises the [B, Hq, w, Lmax] probabilities in fp32."""
    B, Hq, w, D, hkv, G = _check(q_win, q_pos, k, k_pos, seg_start, seg_len, reduce)
    S = k.shape[0]
    scores = torch.zeros((S, G) if reduce == "none" else (S,), dtype=torch.float32, device=k.device)
    if S == 0 or w == 0 or seg_len.numel() == 0:
        return scores
    kp, mask, idx = _gather_segments(k, seg_start, seg_len)        # [n_seg, L, D]
    L = kp.shape[1]
    if L == 0:
        return scores
    kpos = k_pos.to(k.device).long()[idx]                          # [n_seg, L]
    qf = q_win.float().reshape(B, hkv, G, w, D)
    s = torch.matmul(qf, kp.view(B, hkv, 1, L, D).transpose(-1, -2)) * float(scale)
    qp = q_pos.to(k.device).long().view(B, 1, 1, w, 1)
    vis = mask.view(B, hkv, 1, 1, L) & (kpos.view(B, hkv, 1, 1, L) <= qp)
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)                   # rows with no visible key -> 0
    p = p.sum(dim=3)                                               # [B, hkv, G, L]
    if reduce == "none":
        red = p.permute(0, 1, 3, 2).reshape(B * hkv, L, G)
    else:
        red = p.amax(dim=2) if reduce == "max" else p.mean(dim=2)  # [B, hkv, L]
        red = red.reshape(B * hkv, L)
    scores[idx[mask]] = red[mask]
    return scores


def window_scores(
    q_win: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, k_pos: torch.Tensor,
    seg_start: torch.Tensor, seg_len: torch.Tensor, scale: float, reduce: str = "mean",
    **kw,
) -> torch.Tensor:
    """Float32 ``[S]`` window scores (``[S, G]`` with reduce "none"); Triton on CUDA or with KVBENCH_TRITON=1."""
    if use_triton(q_win):
        return window_scores_triton(q_win, q_pos, k, k_pos, seg_start, seg_len, scale, reduce, **kw)
    return window_scores_reference(q_win, q_pos, k, k_pos, seg_start, seg_len, scale, reduce)


def pool_scores(
    scores: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor,
    kernel: int, kind: str = "max", width: int | None = None,
) -> torch.Tensor:
    """1-D pooling of ``scores [S]`` along slot order within each segment.

    Same-size output, window ``kernel`` centred on each slot (padding
    ``kernel // 2``; an even kernel leans right).  ``max`` never looks past
    its segment; ``avg`` counts the padding as zeros (``count_include_pad``,
    as SnapKV's ``F.avg_pool1d``).  Slots outside valid ranges: 0.
    ``width``: at least the longest segment, when the caller knows it on the
    host (then nothing is read back from the device: no sync).
    """
    if kind not in ("max", "avg"):
        raise ValueError(f"kind must be 'max' or 'avg', got {kind!r}")
    out = torch.zeros_like(scores, dtype=torch.float32)
    if scores.numel() == 0 or seg_len.numel() == 0:
        return out
    x, mask, idx = _gather_segments(scores.view(-1, 1), seg_start, seg_len, width)
    x = x.squeeze(-1)                                  # [n_seg, L] float32
    L = x.shape[1]
    if L == 0:
        return out
    if kernel <= 1:
        y = x
    elif kind == "max":
        y = F.max_pool1d(x.masked_fill(~mask, float("-inf")).unsqueeze(1), kernel_size=kernel, stride=1,
                         padding=kernel // 2).squeeze(1)[:, :L]
    else:
        y = F.avg_pool1d(x.masked_fill(~mask, 0.0).unsqueeze(1), kernel_size=kernel, stride=1, padding=kernel // 2,
                         count_include_pad=True).squeeze(1)[:, :L]
    # Written back with fixed shapes (a boolean index would read its count back): padding goes to a spare slot.
    spare = out.new_zeros(out.shape[0] + 1)
    spare[torch.where(mask, idx, torch.full_like(idx, out.shape[0]))] = y
    return spare[:-1]
