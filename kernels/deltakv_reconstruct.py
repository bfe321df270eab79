"""DeltaKV reconstruction of selected tokens: gather references, mean, up-projection, add, rotate (Triton).

A DeltaKV layer stores each compressed token either exactly (a *reference*: the sink tokens and every
s-th token) or as a quantised latent ``z`` plus the rows of its ``K`` nearest references. The token's
vector ``x`` (pre-RoPE key of every KV head, then value of every KV head: width ``2 * H * head_dim``) is

    x_hat = z @ W_up^T + mean(refs[neighbours])            (a reference: x_hat = refs[row], exactly)

and the key half is rotated at the token's position before attention. This module builds, for a list of
``n`` tokens, the keys and values of every KV head straight into a packed ragged buffer that the shared
decode-attention kernel reads (``k_out``, ``v_out``: ``[S, head_dim]``; token ``t`` of head ``h`` goes to
slot ``dest[t] + h * hstride[t]``).

Inputs per token ``t``: ``lat_row[t]`` (its row in the latent table, ``-1`` for an exact token),
``self_ref[t]`` (its own reference row for an exact token), ``ref_base[t]`` (first reference row of its
sequence: the neighbour indices are stored relative to it, so they fit int16), ``cos``/``sin`` ``[n,
head_dim]`` of its position (the model's own rotary tables). An exact token is the same formula with a
zero latent and all ``K`` neighbours equal to itself: the up-projection has no bias, so it is exact.

Latent formats (``latent_format``): ``"float"`` (any float dtype, one value per latent dimension),
``"int8"`` (int8 values times a float16 scale per group of ``group`` dimensions), ``"int4"`` (uint8 bytes:
the low nibble holds dimension ``j``, the high nibble dimension ``j + r/2``, each as ``q + 8``; one float16
scale per group). ``quantize_latents``/``dequantize_latents`` define the formats; the kernel dequantises on
load.

Two ways to run it (``split``). Split (the default on the GPU, ``DEFAULT_TILE``): a small kernel dequantises
the selected latents, one matmul makes the up-projection ``[n, D]``, and the kernel below reads it instead of
computing it. Fused: the kernel computes the up-projection itself. The split is the faster one at real shapes
(``reconstruct_bench``; results/deltakv/README.md): cuBLAS streams ``W_up`` once where the fused tiles re-read it per tile.

Grid: token tiles x KV heads x 2 (keys, rotated, or values), flattened with the tile slowest so the programs
of one tile share its gathered rows through L2. Fused, each program computes the
two halves of one head's key or value for ``BLOCK_T`` tokens with two ``tl.dot`` over the latent (so the
rotation, which pairs dimension ``i`` with ``i + head_dim/2``, needs no shuffle; 64 tokens a program, so
each slice of ``W_up`` read from L2 serves 64 tokens), adds the neighbour mean
gathered for the same columns, rotates keys, and stores. The references of a sequence are re-read by many
tokens and stay in L2. ``reconstruct`` dispatches to the Triton kernel on CUDA (or with
``KVBENCH_TRITON=1``, e.g. under ``TRITON_INTERPRET=1``) when the shapes suit ``tl.dot`` (half head dim
and the latent width at least 16), else to ``reconstruct_reference``.
"""
from __future__ import annotations

import json
import os

import torch

from .decode_attention import _env_true, _launch, _next_pow2, use_triton

try:  # triton is a dependency, but keep the reference usable without it
    import triton.language as tl
except Exception:  # pragma: no cover
    tl = None

__all__ = ["reconstruct", "reconstruct_reference", "reconstruct_triton", "quantize_latents",
           "dequantize_latents", "LATENT_FORMATS"]

LATENT_FORMATS = ("float", "int8", "int4")


# ------------------------------------------------------------------ latent formats

def quantize_latents(z: torch.Tensor, fmt: str, group: int, float_dtype: torch.dtype = torch.bfloat16):
    """``z [n, r]`` (float) -> (values, scales or None). Symmetric per-group absmax scales (float16)."""
    if fmt == "float":
        return z.to(float_dtype), None
    n, r = z.shape
    zf = z.float().view(n, r // group, group)
    levels = 127.0 if fmt == "int8" else 7.0
    scale = (zf.abs().amax(-1) / levels).clamp_min(1e-8).to(torch.float16)
    q = torch.round(zf / scale.float()[..., None]).clamp(-levels, levels).view(n, r)
    if fmt == "int8":
        return q.to(torch.int8), scale
    q = (q + 8).to(torch.uint8)
    half = r // 2
    return (q[:, :half] | (q[:, half:] << 4)).contiguous(), scale


def dequantize_latents(values: torch.Tensor, scales: torch.Tensor | None, fmt: str, group: int) -> torch.Tensor:
    """The float32 latents ``[n, r]`` that ``quantize_latents`` encoded."""
    if fmt == "float":
        return values.float()
    if fmt == "int8":
        q = values.float()
    else:
        q = torch.cat([(values & 15).float() - 8.0, (values >> 4).float() - 8.0], dim=1)
    return q * scales.float().repeat_interleave(group, dim=1)


# ------------------------------------------------------------------ reference

def reconstruct_reference(latents, scales, neighbours, refs, w_up, lat_row, self_ref, ref_base, cos, sin,
                          dest, hstride, k_out, v_out, heads: int, latent_format: str = "float",
                          group: int = 32) -> None:
    """Plain PyTorch (float32 math): writes ``k_out``/``v_out`` in place. Same arguments as ``reconstruct``."""
    n = lat_row.numel()
    if n == 0:
        return
    hd = k_out.shape[1]
    has_lat = lat_row >= 0
    row = lat_row.clamp(min=0)
    z = dequantize_latents(latents[row], None if scales is None else scales[row], latent_format, group)
    z = torch.where(has_lat[:, None], z, torch.zeros_like(z))
    nbr = torch.where(has_lat[:, None], ref_base[:, None] + neighbours[row].long(),
                      self_ref[:, None].expand(n, neighbours.shape[1]))
    x = z @ w_up.float().t() + refs[nbr].float().mean(dim=1)  # [n, D]
    k = x[:, : heads * hd].view(n, heads, hd)
    v = x[:, heads * hd:].view(n, heads, hd)
    half = hd // 2
    rot = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    k = k * cos.float()[:, None] + rot * sin.float()[:, None]
    slots = dest[:, None] + torch.arange(heads, device=dest.device)[None, :] * hstride[:, None]
    k_out[slots.reshape(-1)] = k.reshape(n * heads, hd).to(k_out.dtype)
    v_out[slots.reshape(-1)] = v.reshape(n * heads, hd).to(v_out.dtype)


# ------------------------------------------------------------------ Triton

def _dequant_kernel(LAT, SCALE, ROW, OUT, n_tok, stride_lat, stride_scale, stride_out,
                    RP: tl.constexpr, GROUP: tl.constexpr, FORMAT: tl.constexpr, BLOCK_T: tl.constexpr):
    # rows ROW[t] of the latent table as OUT's dtype, one token per row (a negative row: zeros)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < n_tok
    row = tl.load(ROW + t, mask=tmask, other=-1).to(tl.int64)
    has = (row >= 0) & tmask
    row = tl.where(has, row, 0)
    offs = tl.arange(0, RP)
    m = has[:, None]
    out = OUT + t.to(tl.int64)[:, None] * stride_out + offs[None, :]
    if FORMAT == 2:
        packed = tl.load(LAT + row[:, None] * stride_lat + offs[None, :], mask=m, other=0).to(tl.int32)
        s_lo = tl.load(SCALE + row[:, None] * stride_scale + (offs // GROUP)[None, :], mask=m, other=0.0)
        s_hi = tl.load(SCALE + row[:, None] * stride_scale + ((offs + RP) // GROUP)[None, :], mask=m, other=0.0)
        lo = ((packed & 15) - 8).to(tl.float32) * s_lo.to(tl.float32)
        hi = ((packed >> 4) - 8).to(tl.float32) * s_hi.to(tl.float32)
        tl.store(out, lo.to(OUT.dtype.element_ty), mask=tmask[:, None])
        tl.store(out + RP, hi.to(OUT.dtype.element_ty), mask=tmask[:, None])
    else:
        z = tl.load(LAT + row[:, None] * stride_lat + offs[None, :], mask=m, other=0).to(tl.float32)
        if FORMAT == 1:
            z = z * tl.load(SCALE + row[:, None] * stride_scale + (offs // GROUP)[None, :], mask=m,
                            other=0.0).to(tl.float32)
        tl.store(out, z.to(OUT.dtype.element_ty), mask=tmask[:, None])


def _reconstruct_kernel(
    LAT, SCALE, NBR, REFS, W, XUP, LAT_ROW, SELF_REF, REF_BASE, COS, SIN, DEST, HSTRIDE, KOUT, VOUT,
    n_tok, n_heads,
    stride_lat, stride_scale, stride_nbr, stride_ref, stride_w, stride_xup, stride_cos, stride_sin, stride_out,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, RP: tl.constexpr, GROUP: tl.constexpr, K: tl.constexpr,
    FORMAT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, DOT_F32: tl.constexpr,
    UP_DONE: tl.constexpr,
):
    # One flat grid, (head, key/value) fastest: the 2 x heads programs of one token tile run side by side,
    # so the tile's reference rows (all heads' columns), latents and rotary rows come from HBM once and the
    # other programs find them in L2.
    pid_all = tl.program_id(0)
    per_tile = 2 * n_heads
    pid = pid_all // per_tile
    h = (pid_all % per_tile) // 2
    is_value = pid_all % 2
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < n_tok
    lat_row = tl.load(LAT_ROW + t, mask=tmask, other=-1).to(tl.int64)
    has_lat = (lat_row >= 0) & tmask
    row = tl.where(has_lat, lat_row, 0)

    # columns of x this program produces: the two halves of head h's key (or value)
    col0 = is_value * n_heads * HEAD_DIM + h * HEAD_DIM
    offs_h = tl.arange(0, HALF)
    col_a = col0 + offs_h
    col_b = col0 + HALF + offs_h

    # the up-projection, BLOCK_R stored latent columns at a time (RP: values per row as stored, r or r/2
    # bytes for int4): small W slices per step keep shared memory low, so more programs fit on an SM
    lmask = has_lat[:, None]
    if UP_DONE:  # the up-projection came from a matmul (``XUP [n, D]``, token order): read its columns
        acc_a = tl.load(XUP + t[:, None] * stride_xup + col_a[None, :], mask=lmask, other=0.0).to(tl.float32)
        acc_b = tl.load(XUP + t[:, None] * stride_xup + col_b[None, :], mask=lmask, other=0.0).to(tl.float32)
    else:
        acc_a = tl.zeros([BLOCK_T, HALF], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_T, HALF], dtype=tl.float32)
        for c in range(0, RP, BLOCK_R):
            offs_r = c + tl.arange(0, BLOCK_R)
            if FORMAT == 2:  # int4: low nibble = dim j, high nibble = dim j + r/2
                packed = tl.load(LAT + row[:, None] * stride_lat + offs_r[None, :], mask=lmask, other=0).to(tl.int32)
                s_lo = tl.load(SCALE + row[:, None] * stride_scale + (offs_r // GROUP)[None, :], mask=lmask, other=0.0)
                s_hi = tl.load(SCALE + row[:, None] * stride_scale + ((offs_r + RP) // GROUP)[None, :], mask=lmask,
                               other=0.0)
                z_lo = ((packed & 15) - 8).to(tl.float32) * s_lo.to(tl.float32)
                z_hi = ((packed >> 4) - 8).to(tl.float32) * s_hi.to(tl.float32)
                wa_lo = tl.load(W + col_a[None, :] * stride_w + offs_r[:, None])
                wa_hi = tl.load(W + col_a[None, :] * stride_w + (offs_r + RP)[:, None])
                wb_lo = tl.load(W + col_b[None, :] * stride_w + offs_r[:, None])
                wb_hi = tl.load(W + col_b[None, :] * stride_w + (offs_r + RP)[:, None])
                if DOT_F32:
                    acc_a += tl.dot(z_lo, wa_lo.to(tl.float32), input_precision="ieee") + \
                        tl.dot(z_hi, wa_hi.to(tl.float32), input_precision="ieee")
                    acc_b += tl.dot(z_lo, wb_lo.to(tl.float32), input_precision="ieee") + \
                        tl.dot(z_hi, wb_hi.to(tl.float32), input_precision="ieee")
                else:
                    zl = z_lo.to(W.dtype.element_ty)
                    zh = z_hi.to(W.dtype.element_ty)
                    acc_a = tl.dot(zl, wa_lo, acc_a)
                    acc_a = tl.dot(zh, wa_hi, acc_a)
                    acc_b = tl.dot(zl, wb_lo, acc_b)
                    acc_b = tl.dot(zh, wb_hi, acc_b)
            else:
                z = tl.load(LAT + row[:, None] * stride_lat + offs_r[None, :], mask=lmask, other=0).to(tl.float32)
                if FORMAT == 1:  # int8 with a scale per group
                    z = z * tl.load(SCALE + row[:, None] * stride_scale + (offs_r // GROUP)[None, :], mask=lmask,
                                    other=0.0).to(tl.float32)
                wa = tl.load(W + col_a[None, :] * stride_w + offs_r[:, None])
                wb = tl.load(W + col_b[None, :] * stride_w + offs_r[:, None])
                if DOT_F32:
                    acc_a += tl.dot(z, wa.to(tl.float32), input_precision="ieee")
                    acc_b += tl.dot(z, wb.to(tl.float32), input_precision="ieee")
                else:
                    zc = z.to(W.dtype.element_ty)
                    acc_a = tl.dot(zc, wa, acc_a)
                    acc_b = tl.dot(zc, wb, acc_b)

    # plus the mean of the K neighbours (an exact token: K times itself), summed straight into the
    # accumulators (fewer live registers than separate sums)
    self_ref = tl.load(SELF_REF + t, mask=tmask, other=0).to(tl.int64)
    base = tl.load(REF_BASE + t, mask=tmask, other=0).to(tl.int64)
    for j in tl.static_range(K):
        nb = tl.load(NBR + row * stride_nbr + j, mask=has_lat, other=0).to(tl.int64)
        ref_row = tl.where(has_lat, base + nb, self_ref)
        acc_a += tl.load(REFS + ref_row[:, None] * stride_ref + col_a[None, :], mask=tmask[:, None],
                         other=0.0).to(tl.float32) * (1.0 / K)
        acc_b += tl.load(REFS + ref_row[:, None] * stride_ref + col_b[None, :], mask=tmask[:, None],
                         other=0.0).to(tl.float32) * (1.0 / K)
    xa = acc_a
    xb = acc_b

    dest = tl.load(DEST + t, mask=tmask, other=0).to(tl.int64) + \
        h * tl.load(HSTRIDE + t, mask=tmask, other=0).to(tl.int64)
    out_a = KOUT + dest[:, None] * stride_out + offs_h[None, :]
    if is_value == 0:
        cos_a = tl.load(COS + t[:, None] * stride_cos + offs_h[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
        cos_b = tl.load(COS + t[:, None] * stride_cos + (offs_h + HALF)[None, :], mask=tmask[:, None],
                        other=0.0).to(tl.float32)
        sin_a = tl.load(SIN + t[:, None] * stride_sin + offs_h[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
        sin_b = tl.load(SIN + t[:, None] * stride_sin + (offs_h + HALF)[None, :], mask=tmask[:, None],
                        other=0.0).to(tl.float32)
        ya = xa * cos_a - xb * sin_a
        yb = xb * cos_b + xa * sin_b
        tl.store(out_a, ya.to(KOUT.dtype.element_ty), mask=tmask[:, None])
        tl.store(out_a + HALF, yb.to(KOUT.dtype.element_ty), mask=tmask[:, None])
    else:
        out_v = VOUT + dest[:, None] * stride_out + offs_h[None, :]
        tl.store(out_v, xa.to(VOUT.dtype.element_ty), mask=tmask[:, None])
        tl.store(out_v + HALF, xb.to(VOUT.dtype.element_ty), mask=tmask[:, None])


def triton_supports(head_dim: int, latent_dim: int, latent_format: str) -> bool:
    """``tl.dot`` needs every matrix side >= 16 and power-of-two aranges."""
    half = head_dim // 2
    stored = latent_dim // 2 if latent_format == "int4" else latent_dim
    return half >= 16 and stored >= 16 and _next_pow2(half) == half and _next_pow2(stored) == stored


def reconstruct_triton(latents, scales, neighbours, refs, w_up, lat_row, self_ref, ref_base, cos, sin,
                       dest, hstride, k_out, v_out, heads: int, latent_format: str = "float",
                       group: int = 32, block_t: int = 64, block_r: int | None = None, num_warps: int = 8,
                       num_stages: int | None = None, split: bool = False) -> None:
    """``split``: the up-projection as a separate matmul (latents dequantised, ``[n, r] @ W_up^T`` in
    W_up's dtype, written out ``[n, D]``), the kernel adding the neighbour mean, rotating and scattering;
    otherwise the kernel does the up-projection too, ``block_r`` stored latent columns per step."""
    n = lat_row.numel()
    if n == 0:
        return
    hd = k_out.shape[1]
    r = w_up.shape[1]
    if not triton_supports(hd, r, latent_format):
        raise ValueError(f"Triton reconstruction needs head_dim/2 and the stored latent width to be powers of "
                         f"two >= 16 (head_dim {hd}, latent {r}, {latent_format})")
    if k_out.stride(1) != 1 or v_out.stride(0) != k_out.stride(0) or w_up.stride(1) != 1 or refs.stride(1) != 1:
        raise ValueError("k_out, v_out, w_up and refs need unit last strides (k_out and v_out alike)")
    fmt = LATENT_FORMATS.index(latent_format)
    stored = r // 2 if latent_format == "int4" else r
    block_r = min(block_r or stored, stored)
    if block_r < 16 or _next_pow2(block_r) != block_r:
        raise ValueError(f"block_r must be a power of two >= 16 (got {block_r})")
    if scales is None:
        scales = latents.new_zeros((1, 1), dtype=torch.float16)
    dot_f32 = _env_true("TRITON_INTERPRET") or w_up.dtype == torch.float32
    x_up = w_up  # unused unless split
    if split:  # exact tokens (lat_row -1) get zero latents; their rows are masked in the kernel anyway
        z = torch.empty((n, r), dtype=w_up.dtype, device=w_up.device)
        _launch(_dequant_kernel, (triton_cdiv(n, 64),), latents, scales, lat_row, z, n, latents.stride(0),
                scales.stride(0), z.stride(0), RP=stored, GROUP=group, FORMAT=fmt, BLOCK_T=64, num_warps=4)
        x_up = z @ w_up.t()
    grid = (triton_cdiv(n, block_t) * heads * 2,)
    _launch(
        _reconstruct_kernel, grid,
        latents, scales, neighbours, refs, w_up, x_up, lat_row, self_ref, ref_base, cos, sin, dest, hstride,
        k_out, v_out, n, heads,
        latents.stride(0), scales.stride(0), neighbours.stride(0), refs.stride(0), w_up.stride(0), x_up.stride(0),
        cos.stride(0), sin.stride(0), k_out.stride(0),
        HEAD_DIM=hd, HALF=hd // 2, RP=stored, GROUP=group, K=neighbours.shape[1], FORMAT=fmt,
        BLOCK_T=block_t, BLOCK_R=block_r, DOT_F32=dot_f32, UP_DONE=split, num_warps=num_warps,
        **({"num_stages": num_stages} if num_stages else {}),
    )


# The fastest tile of ``reconstruct_bench`` on the H100 (Llama-3.1-8B shapes, 48 sequences x 32k, 2048
# tokens each, int4 latents): the matmul split, 1.31 ms a call, against 1.90 ms for the best fused tile
# (results/deltakv/reconstruct-tiles.json).
DEFAULT_TILE = {"split": True, "block_t": 16, "num_warps": 8}


def _tile_override() -> dict:
    """``KVBENCH_RECONSTRUCT_TILE`` (JSON, e.g. ``{"block_t": 128, "block_r": 32}``): a tile to try in
    place of the defaults, as ``reconstruct_bench`` reports them, without editing code."""
    raw = os.environ.get("KVBENCH_RECONSTRUCT_TILE", "").strip()
    return json.loads(raw) if raw else {}


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def reconstruct(latents, scales, neighbours, refs, w_up, lat_row, self_ref, ref_base, cos, sin, dest, hstride,
                k_out, v_out, heads: int, latent_format: str = "float", group: int = 32) -> None:
    """Write the rotated keys and the values of ``n`` tokens into ``k_out``/``v_out`` ``[S, head_dim]``.

    ``latents`` ``[L, r]`` (``[L, r/2]`` uint8 for int4), ``scales`` ``[L, r/group]`` float16 or None,
    ``neighbours`` ``[L, K]`` (int16/int32, relative to the sequence's first reference), ``refs``
    ``[R, 2*heads*head_dim]``, ``w_up`` ``[2*heads*head_dim, r]`` (``nn.Linear`` weight); per token
    ``lat_row``, ``self_ref``, ``ref_base``, ``dest``, ``hstride`` (int64 ``[n]``), ``cos``, ``sin`` ``[n,
    head_dim]``."""
    if use_triton(refs) and triton_supports(k_out.shape[1], w_up.shape[1], latent_format):
        reconstruct_triton(latents, scales, neighbours, refs, w_up, lat_row, self_ref, ref_base, cos, sin,
                           dest, hstride, k_out, v_out, heads, latent_format, group,
                           **(_tile_override() or DEFAULT_TILE))
    else:
        reconstruct_reference(latents, scales, neighbours, refs, w_up, lat_row, self_ref, ref_base, cos, sin,
                              dest, hstride, k_out, v_out, heads, latent_format, group)
