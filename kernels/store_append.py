"""Writing new tokens into the ragged store in one kernel (the decoding step's append).

Store layout as in ``decode_attention.py``: ``k, v: [S, D]``, ``pos: [S]`` (int32); segment ``i = b * H + h``
owns slots ``[seg_start[i], seg_start[i] + capacity[i])``, of which the first ``seg_len[i]`` hold tokens. Appending
``T`` tokens (``k_new, v_new: [B, H, T, D]`` in any strides and float dtype, ``pos_new: [B, T]``) writes token
``t`` of segment ``i`` to slot ``seg_start[i] + seg_len[i] + t`` (the caller has made the room) and advances
``seg_len`` by ``T``. A decoding step's single token (``T == 1``: one program a segment) advances it inside the
kernel; more tokens (programs of one segment must all read the old length) by an add after it.

Public API
----------
``append_tokens(k, v, pos, seg_start, seg_len, k_new, v_new, pos_new)``: Triton when ``k`` is on CUDA or
``KVBENCH_TRITON=1`` (``TRITON_INTERPRET=1`` on the CPU), else the PyTorch reference
(``append_tokens_reference``, what ``RaggedKV.append`` did: a destination index, three indexed writes, the
lengths' add).

Why: in PyTorch the append is about a dozen small kernels per layer (the destination's arithmetic, a cast and an
indexed write for each of k, v and pos); a decoding step of a 32-layer model spends several hundred launches on
it, each a few microseconds against a step floor of ~5 ms. One program per (segment, token) copies a row of k
and of v and writes the position: one launch, nothing read back (CUDA-graph capturable). Advancing the lengths
in the same launch when decoding saves a launch a layer, and keeps the step's launches a chain of kvbench's
kernels where programmatic dependent launch applies (``decode_attention.pdl_kwargs``).
"""
from __future__ import annotations

import torch

from .decode_attention import _launch, _next_pow2, pdl_kwargs, use_triton

__all__ = ["append_tokens", "append_tokens_triton", "append_tokens_reference"]

try:  # triton is a dependency, but keep the reference usable without it
    import triton.language as tl
except Exception:  # pragma: no cover
    tl = None


def _append_kernel(
    k_ptr, v_ptr, pos_ptr, start_ptr, len_ptr, kn_ptr, vn_ptr, pn_ptr,
    s_kn_b, s_kn_h, s_kn_t, s_kn_d, s_vn_b, s_vn_h, s_vn_t, s_vn_d, s_pn_b, s_pn_t,
    H, T, D,
    BLOCK_D: tl.constexpr, ADVANCE: tl.constexpr, PDL: tl.constexpr = False,
):
    if PDL:  # the new rows and the lengths come from earlier kernels of the step (decode_attention.pdl_kwargs)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    seg = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    b = seg // H
    h = seg % H
    length = tl.load(len_ptr + seg)
    dest = tl.load(start_ptr + seg).to(tl.int64) + length.to(tl.int64) + t
    if ADVANCE:  # T == 1: this is the segment's only program, so no other one reads the old length
        tl.store(len_ptr + seg, length + 1)
    d = tl.arange(0, BLOCK_D)
    m = d < D
    krow = tl.load(kn_ptr + b * s_kn_b + h * s_kn_h + t * s_kn_t + d * s_kn_d, mask=m)
    vrow = tl.load(vn_ptr + b * s_vn_b + h * s_vn_h + t * s_vn_t + d * s_vn_d, mask=m)
    tl.store(k_ptr + dest * D + d, krow, mask=m)
    tl.store(v_ptr + dest * D + d, vrow, mask=m)
    tl.store(pos_ptr + dest, tl.load(pn_ptr + b * s_pn_b + t * s_pn_t).to(tl.int32))


def append_tokens_reference(k, v, pos, seg_start, seg_len, k_new, v_new, pos_new) -> None:
    B, H, T, D = k_new.shape
    dest = ((seg_start + seg_len)[:, None] + torch.arange(T, device=k.device)[None, :]).reshape(-1)
    k[dest] = k_new.reshape(B * H * T, D).to(k.dtype)
    v[dest] = v_new.reshape(B * H * T, D).to(v.dtype)
    pos[dest] = pos_new[:, None, :].expand(B, H, T).reshape(-1).to(pos.dtype)
    seg_len += T


def append_tokens_triton(k, v, pos, seg_start, seg_len, k_new, v_new, pos_new) -> None:
    B, H, T, D = k_new.shape
    if k.shape[1] != D or not (k.is_contiguous() and v.is_contiguous() and pos.is_contiguous()):
        raise ValueError("append_tokens: the store's k, v and pos must be contiguous with the new rows' width")
    if B * H * T == 0:
        return
    # A cast, when needed, in PyTorch (round to nearest even, as the reference): the kernel then copies bits.
    # The model's keys and values already have the store's dtype, so the decoding step never pays for it.
    k_new, v_new = k_new.to(k.dtype), v_new.to(v.dtype)
    _launch(_append_kernel, (B * H, T), k, v, pos, seg_start, seg_len, k_new, v_new, pos_new,
            *k_new.stride(), *v_new.stride(), *pos_new.stride(), H, T, D, BLOCK_D=max(16, _next_pow2(D)),
            ADVANCE=T == 1, **pdl_kwargs(k))
    if T != 1:
        seg_len += T


def append_tokens(k, v, pos, seg_start, seg_len, k_new, v_new, pos_new) -> None:
    if use_triton(k):
        append_tokens_triton(k, v, pos, seg_start, seg_len, k_new, v_new, pos_new)
    else:
        append_tokens_reference(k, v, pos, seg_start, seg_len, k_new, v_new, pos_new)
