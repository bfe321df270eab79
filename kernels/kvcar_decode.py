"""KV-CAR's read path for one layer in one Triton launch: gather the codes, decode them, rotate the keys.

A KV-CAR store (``methods/kvcar/store.py``) holds, per slot, a token's key and value latents ``[zk, zv]``
split in halves over two tensors ``codes_k``, ``codes_v`` (``[S, W]`` each, ``2 W = latent_k + latent_v``)
and its position. Attention (``decode_attention.ragged_attention``) wants decoded keys (rotated to their
positions when they were coded before RoPE) and values, head ``i``'s slots in row block ``i``:
``k_out, v_out [n * width, d]``, row ``i * width + c`` decoding slot ``perm[rows[i], c]``. Written in PyTorch
that is a gather, a concatenation, four ``baddbmm``, two LeakyReLUs, the model's rotary module and the
rotation, about twenty kernels a layer each streaming every held token through memory; here one kernel reads
each code once and writes each output once.

Per head and kind (keys or values) the decoder is ``out = leaky_relu(z @ W3 + b3, 0.01) @ W4 + b4``.
``pack_decoders`` lays a layer's decoders out once (when the method binds to a model) so that one program
treats keys and values alike: the first matrix over the whole code row ``[a, b]`` (``a`` from ``codes_k``,
``b`` from ``codes_v``), zero-padded (keys' rows ``[0, latent_k)``, values' rows ``[latent_k, 2 W)``), so
``hidden = a @ W3[:W] + b @ W3[W:]`` whatever the two latents' widths; the hidden width padded with zero
columns (and zero rows of ``W4``) to a multiple of the hidden block. The padding is exact: a zero column gives
``leaky_relu(0) = 0``, which a zero row of ``W4`` ignores.

Grid: one flat axis of (token tile, head row, kind), kind fastest and the tile slowest, so the key and value
programs of one tile and head run side by side and read the same code rows (the second from L2). A program
decodes ``BLOCK_T`` tokens of one head: the tile's codes once, then, ``BLOCK_H`` hidden units at a time, two
``tl.dot`` for the hidden block and two for the output's halves (dimensions ``j`` and ``j + d/2``: the pairs
RoPE rotates together, so the rotation needs no shuffle), accumulating in float32. Each weight block is read
once per program and serves ``BLOCK_T`` tokens. Widths that ``tl.dot`` or ``tl.arange`` cannot take (under
16, not a power of two) are padded in the kernel with masked loads.

RoPE: cos and sin as transformers computes them (``position * inv_freq`` in float32, cosine and sine in
float32, times the scaling, cast to the model's dtype), read from a table of them for positions below its
length (``Rope.cos``/``Rope.sin``, made once by PyTorch for the model's position range: 8 MB for Qwen2.5's 32k
x 64 frequencies in bfloat16), else computed in the kernel: a tile with a position past the table computes
them all, with libdevice's ``cosf``/``sinf`` on the GPU (full range reduction, as PyTorch's CUDA ``cos``: a
position of tens of thousands times ``inv_freq`` up to 1 is far outside the range where an approximate ``cos``
is accurate). Computing them for every held key at every step was a large part of the kernel's time
(results/kvcar/README.md). The decoded key is rounded to the model's dtype before the rotation, as the
PyTorch path's is.

Everything is sized from tensor shapes and read from device memory: no host synchronisation, so a captured
decoding step (CUDA graph) replays it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .decode_attention import _env_true, _launch, _next_pow2

try:  # triton is a dependency, but keep the reference path usable without it
    import triton.language as tl
    from triton.language.extra import libdevice
except Exception:  # pragma: no cover
    tl = libdevice = None

__all__ = ["Decoders", "pack_decoders", "kvcar_decode"]

SLOPE = 0.01  # the decoder's LeakyReLU (methods/kvcar/codec.py)


@dataclass(frozen=True)
class Decoders:
    """One layer's key (kind 0) and value (kind 1) decoders, laid out for the kernel."""
    w3: torch.Tensor  # [2, H, 2W, hidden]: keys' rows [0, latent_k), values' rows [latent_k, 2W), others zero
    b3: torch.Tensor  # [2, H, hidden]
    w4: torch.Tensor  # [2, H, hidden, d]: rows past a kind's hidden width zero
    b4: torch.Tensor  # [2, H, d]
    hidden: tuple[int, int]  # the hidden columns each kind reads (its width rounded up to block_h)
    block_h: int


def pack_decoders(key: tuple, value: tuple, block_h: int = 64) -> Decoders:
    """``key``, ``value``: ``(w3 [H, latent, hidden], b3 [H, hidden], w4 [H, hidden, d], b4 [H, d])`` (the
    folded decoders' tensors; the two kinds' latent and hidden widths may differ)."""
    (w3k, b3k, w4k, b4k), (w3v, b3v, w4v, b4v) = key, value
    H, lk, hk = w3k.shape
    lv, hv = w3v.shape[1:]
    d = w4k.shape[2]
    block_h = min(block_h, max(16, _next_pow2(max(hk, hv))))
    hidden = tuple(-(-h // block_h) * block_h for h in (hk, hv))
    w3 = w3k.new_zeros(2, H, lk + lv, max(hidden))
    b3 = w3k.new_zeros(2, H, max(hidden))
    w4 = w3k.new_zeros(2, H, max(hidden), d)
    w3[0, :, :lk, :hk], w3[1, :, lk:, :hv] = w3k, w3v
    b3[0, :, :hk], b3[1, :, :hv] = b3k, b3v
    w4[0, :, :hk], w4[1, :, :hv] = w4k, w4v
    return Decoders(w3, b3, w4, torch.stack([b4k, b4v]).contiguous(), hidden, block_h)


def _decode_kernel(
    CK, CV, POS, PERM, ROWS, HEADS, W3, B3, W4, B4, INV_FREQ, COS, SIN, KOUT, VOUT,
    width, n_rows, n_heads, stride_perm, rope_scale, n_table,
    W: tl.constexpr, W_P: tl.constexpr, HID: tl.constexpr, HID_K: tl.constexpr, HID_V: tl.constexpr,
    BLOCK_H: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, BLOCK_T: tl.constexpr,
    SLOPE: tl.constexpr, ROPE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    PRECISE_TRIG: tl.constexpr,
):
    pid = tl.program_id(0)
    tile = pid // (2 * n_rows)
    i = (pid // 2) % n_rows
    kind = pid % 2  # 0: keys, 1: values
    c = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = c < width
    slot = tl.load(PERM + tl.load(ROWS + i).to(tl.int64) * stride_perm + c, mask=tmask, other=0).to(tl.int64)
    mat = kind * n_heads + tl.load(HEADS + i).to(tl.int64)  # this head's decoder of this kind

    # the tile's code rows, both halves of [zk, zv]
    offs_l = tl.arange(0, W_P)
    lmask = offs_l < W
    zmask = tmask[:, None] & lmask[None, :]
    za = tl.load(CK + slot[:, None] * W + offs_l[None, :], mask=zmask, other=0.0)
    zb = tl.load(CV + slot[:, None] * W + offs_l[None, :], mask=zmask, other=0.0)
    # the decoders' dtype, as in PyTorch; float32 in the interpreter, whose bf16 dots are wrong (decode_attention.py)
    za = za.to(tl.float32 if DOT_F32 else W3.dtype.element_ty)
    zb = zb.to(tl.float32 if DOT_F32 else W3.dtype.element_ty)

    w3 = W3 + mat * (2 * W * HID)
    w4 = W4 + mat * (HID * D)
    offs_d = tl.arange(0, HALF_P)
    dmask = offs_d < HALF
    acc_lo = tl.zeros([BLOCK_T, HALF_P], dtype=tl.float32)  # output dimensions [0, d/2)
    acc_hi = tl.zeros([BLOCK_T, HALF_P], dtype=tl.float32)  # and [d/2, d)
    n_hid = tl.where(kind == 0, HID_K, HID_V)  # a kind's zero columns past its width are skipped
    for h0 in range(0, n_hid, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        wa = tl.load(w3 + offs_l[:, None] * HID + offs_h[None, :], mask=lmask[:, None], other=0.0)
        wb = tl.load(w3 + (W + offs_l)[:, None] * HID + offs_h[None, :], mask=lmask[:, None], other=0.0)
        w4_lo = tl.load(w4 + offs_h[:, None] * D + offs_d[None, :], mask=dmask[None, :], other=0.0)
        w4_hi = tl.load(w4 + offs_h[:, None] * D + HALF + offs_d[None, :], mask=dmask[None, :], other=0.0)
        if DOT_F32:
            wa, wb, w4_lo, w4_hi = wa.to(tl.float32), wb.to(tl.float32), w4_lo.to(tl.float32), w4_hi.to(tl.float32)
        hid = tl.dot(zb, wb, tl.dot(za, wa, input_precision=PRECISION), input_precision=PRECISION)
        hid += tl.load(B3 + mat * HID + offs_h).to(tl.float32)[None, :]
        hid = tl.where(hid >= 0, hid, hid * SLOPE)
        hid = hid.to(W4.dtype.element_ty)  # the second matmul takes the model's dtype, as in PyTorch
        if DOT_F32:
            hid = hid.to(tl.float32)
        acc_lo = tl.dot(hid, w4_lo, acc_lo, input_precision=PRECISION)
        acc_hi = tl.dot(hid, w4_hi, acc_hi, input_precision=PRECISION)
    x_lo = acc_lo + tl.load(B4 + mat * D + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    x_hi = acc_hi + tl.load(B4 + mat * D + HALF + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]

    out = VOUT
    if kind == 0:
        out = KOUT
        if ROPE:  # rotate to the slot's position: cos/sin as transformers' rotary module makes them
            dt = KOUT.dtype.element_ty
            x_lo = x_lo.to(dt).to(tl.float32)
            x_hi = x_hi.to(dt).to(tl.float32)
            p = tl.load(POS + slot, mask=tmask, other=0)
            if tl.max(p, axis=0) < n_table:  # the tile's cos and sin from the table
                at = p.to(tl.int64)[:, None] * HALF + offs_d[None, :]
                cos = tl.load(COS + at, mask=dmask[None, :], other=0.0).to(tl.float32)
                sin = tl.load(SIN + at, mask=dmask[None, :], other=0.0).to(tl.float32)
            else:
                angle = p.to(tl.float32)[:, None] * tl.load(INV_FREQ + offs_d, mask=dmask, other=0.0)[None, :]
                if PRECISE_TRIG:
                    cos, sin = libdevice.cos(angle), libdevice.sin(angle)
                else:  # the interpreter has no libdevice (and uses numpy's accurate float32 ones)
                    cos, sin = tl.cos(angle), tl.sin(angle)
                cos = (cos * rope_scale).to(dt).to(tl.float32)
                sin = (sin * rope_scale).to(dt).to(tl.float32)
            x_lo, x_hi = x_lo * cos - x_hi * sin, x_hi * cos + x_lo * sin
    row = i.to(tl.int64) * width + c
    omask = tmask[:, None] & dmask[None, :]
    dst = out + row[:, None] * D + offs_d[None, :]
    tl.store(dst, x_lo.to(out.dtype.element_ty), mask=omask)
    tl.store(dst + HALF, x_hi.to(out.dtype.element_ty), mask=omask)


class Rope(NamedTuple):
    """What the kernel rotates keys with: the rotary module's ``inv_freq`` and ``attention_scaling``, and
    optionally ``cos``/``sin`` ``[n, d/2]`` (the keys' dtype) for positions 0 .. n-1 (``rope_table``)."""

    inv_freq: torch.Tensor
    scale: float
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


def rope_table(inv_freq: torch.Tensor, scale: float, n: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[n, d/2]`` of positions 0 .. n-1 as transformers' rotary module makes them: the angle and
    its cosine and sine in float32, times ``scale``, cast to ``dtype``."""
    angle = torch.arange(n, device=inv_freq.device, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
    return (angle.cos() * scale).to(dtype), (angle.sin() * scale).to(dtype)


def kvcar_decode(codes_k: torch.Tensor, codes_v: torch.Tensor, pos: torch.Tensor, perm: torch.Tensor,
                 rows: torch.Tensor, heads: torch.Tensor, dec: Decoders, rope: Rope | None,
                 block_t: int = 128, num_warps: int = 8, num_stages: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded keys and values ``[n * width, d]`` (the decoders' dtype) of rows ``rows`` (``[n]``) of ``perm``
    (``[n_own, width]`` slot numbers), row ``i`` with the decoders of head ``heads[i]``. ``codes_k``,
    ``codes_v`` ``[S, W]``, ``pos [S]`` (int32); ``rope``: how to rotate the keys to their positions (``Rope``),
    or None. The launch shape's default is within 2% of the
    fastest of `python -m kvbench.kernels.kvcar_decode`'s 18 at both codecs' shapes, batch 1 and 8, on the H200 (64 / 8 / 2,
    the first default, was 27-40% slower: results/bench/h200-llama-3.1-8b-compiled-2/kernel-kvcar-5d2cd44.log)."""
    n, width = rows.numel(), perm.shape[1]
    W, d = codes_k.shape[1], dec.w4.shape[-1]
    if d % 2 or dec.w3.shape[2] != 2 * W:
        raise ValueError(f"codes of width {W} and decoders {tuple(dec.w3.shape)} -> {d} do not fit")
    if not (codes_k.is_contiguous() and codes_v.is_contiguous() and perm.stride(1) == 1):
        raise ValueError("codes and perm need contiguous rows")
    k_out = torch.empty((n * width, d), dtype=dec.w4.dtype, device=codes_k.device)
    v_out = torch.empty_like(k_out)
    if k_out.numel() == 0:
        return k_out, v_out
    interp = _env_true("TRITON_INTERPRET")
    dot_f32 = interp and dec.w4.dtype != torch.float32
    inv_freq, scale = (rope.inv_freq.float(), rope.scale) if rope is not None else (dec.b4, 1.0)  # unread: no rope
    table = rope is not None and rope.cos is not None
    if table and (rope.cos.shape[1] != d // 2 or rope.cos.dtype != k_out.dtype or rope.sin.shape != rope.cos.shape):
        raise ValueError(f"a rope table of {tuple(rope.cos.shape)} {rope.cos.dtype} for keys of {d} {k_out.dtype}")
    cos, sin, n_table = (rope.cos, rope.sin, rope.cos.shape[0]) if table else (k_out, k_out, 0)  # unread at 0
    # Launch shape from the sm_90 compile (not yet timed): at 64 tokens, 8 warps hold the two float32 halves of
    # the output and the rotation's operands in about 120 registers a thread (4 warps: over 200), and 2 stages
    # (the hidden loop is a few blocks long) leave the shared memory for two programs per SM (3 stages: one).
    _launch(
        _decode_kernel, (-(-width // block_t) * n * 2,),
        codes_k, codes_v, pos, perm, rows, heads, dec.w3, dec.b3, dec.w4, dec.b4, inv_freq, cos, sin, k_out, v_out,
        width, n, dec.w3.shape[1], perm.stride(0), float(scale), n_table,
        W=W, W_P=max(16, _next_pow2(W)), HID=dec.w3.shape[3], HID_K=dec.hidden[0], HID_V=dec.hidden[1],
        BLOCK_H=dec.block_h, D=d, HALF=d // 2, HALF_P=max(16, _next_pow2(d // 2)), BLOCK_T=block_t,
        SLOPE=SLOPE, ROPE=rope is not None, DOT_F32=dot_f32,
        PRECISION="ieee" if (dec.w4.dtype == torch.float32 or dot_f32) else "tf32", PRECISE_TRIG=not interp,
        num_warps=num_warps, num_stages=num_stages,
    )
    return k_out, v_out


def main(argv=None):
    """``python -m kvbench.kernels.kvcar_decode``: one layer's decode, the kernel (launch shapes) against the PyTorch
    path it replaces, at the Llama-3.1-8B timing codec's and the Qwen codec's shapes (CUDA graph replays)."""
    import argparse
    import os

    from transformers import AutoConfig, AutoModelForCausalLM

    from kvbench.methods.kvcar import KVCAR, LayerCodec
    from kvbench.models import LoadedModel

    from .bench import measure_copy_bw, time_calls

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--diagnose", action="store_true",
                    help="the default launch shape only, with and without the keys' rotation, and the rate of the "
                         "matmuls it executes (where its time goes, without a profiler)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = dev.type == "cpu"  # without a GPU: minute sizes in Triton's interpreter, to check the script
    if tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.context, args.batches = 80, "1"
    bw = measure_copy_bw(dev, nbytes=2**24 if tiny else 2 << 30, reps=3 if tiny else 20)
    # Llama-3.1-8B's attention shapes and RoPE, two small layers (only the rotary module and the shapes are used)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = AutoConfig.for_model("llama", hidden_size=1024, intermediate_size=64, num_hidden_layers=2, vocab_size=64,
                               num_attention_heads=8, num_key_value_heads=8, head_dim=128, rope_parameters=rope,
                               max_position_embeddings=131072)
    with torch.device(dev):
        lm = LoadedModel(AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval(), None, "llama", 131072)
    shapes = [("llama-3.1-8b timing codec", 8, 64, 64, 128, 128), ("qwen codec", 2, 32, 96, 64, 192)]
    for label, H, lk, lv, hk, hv in shapes:
        codecs = torch.nn.ModuleDict({str(i): LayerCodec(H, 128, hk, lk, hv, lv) for i in range(2)})
        method = KVCAR()
        method.rope_keys_ = "pre"
        method.bind(lm, codecs.eval(), {})
        for B in (int(b) for b in args.batches.split(",")):
            store = method.new_store(0, B, H, 128, torch.bfloat16, dev)
            n = B * H * args.context
            z = [torch.randn(n, method.code_width_, device=dev, dtype=torch.bfloat16) for _ in range(2)]
            pos = torch.arange(args.context, device=dev, dtype=torch.int32).repeat(B * H)
            store.codes.replace(*z, pos, torch.full((B * H,), args.context, device=dev))
            perm, _ = store._gather_index()
            rows = torch.arange(H, device=dev)
            slots = perm[rows]
            ref = lambda: method.decode(0, z[0][slots], z[1][slots], pos[slots], rows)  # noqa: E731
            ms, _ = time_calls([ref], reps=3 if tiny else 15)
            floor = n * (4 * method.code_width_ + 4 * 128) / bw * 1e3  # codes read, keys and values written
            print(f"{label}, batch {B}, {args.context} tokens: PyTorch {ms * 1e3:.0f} us; bytes floor "
                  f"{floor * 1e3:.0f} us", flush=True)
            configs = [(64, 4, 2, True)] if tiny else [(bt, nw, ns, True) for bt in (32, 64, 128) for nw in (4, 8)
                                                            for ns in (1, 2, 3)]
            if args.diagnose:  # one launch shape (kvcar_decode's default), rotating the keys and not
                bt, nw, ns = (64, 4, 2) if tiny else (128, 8, 2)
                configs = [(bt, nw, ns, True), (bt, nw, ns, False)]
            dec = method.decoders[0]
            # the multiply-adds the kernel executes per token and kind: both code halves into the kind's hidden
            # columns (one half zero rows for this kind), those into the output
            macs = n * sum(dec.w3.shape[2] * h + h * dec.w4.shape[3] for h in dec.hidden)
            for bt, nw, ns, rotate in configs:
                rot = method.kernel_rope() if rotate else None
                call = lambda: kvcar_decode(z[0], z[1], pos, perm, rows, rows, dec,  # noqa: E731
                                            rot, block_t=bt, num_warps=nw, num_stages=ns)
                ms, _ = time_calls([call], reps=3 if tiny else 15)
                print(f"  kernel block_t {bt:3d} warps {nw} stages {ns}{'' if rot is not None else ' (keys not rotated)'}"
                      f": {ms * 1e3:7.1f} us ({floor / ms:.0%} of the bytes floor, "
                      f"{2 * macs / ms / 1e9:.0f} TFLOP/s of matmuls)", flush=True)


if __name__ == "__main__":
    main()
