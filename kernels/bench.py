"""Benchmark of the shared attention kernels.

    python -m kvbench.kernels.bench --out results/bench [--sweep] [--tiny]

Measures, on the machine it runs on:
  1. device-to-device copy bandwidth (bytes read + written) and a bf16
     8192^3 matmul (random data) -- the two ceilings;
  2. ragged decode attention at Llama-3.1-8B shapes (32 query / 8 KV heads,
     D = 128, bf16), uniform and head-wise ragged (10x spread of lengths
     between the heads of a sequence, same total bytes), against
     ``scaled_dot_product_attention`` (flash backend) on the dense cache;
  3. window scores (N = 32k, 128k; w = 32, 64, 128) against the materialised
     fp32 reference and a materialised bf16-matmul softmax, with peak extra
     memory.
Small inputs are rotated over several copies (>= 256 MB in all) so that the
50 MB L2 does not serve them.  Kernel timings are medians of CUDA-event timed
replays of a CUDA graph holding one call per input copy ("graph"), and of the
same calls launched eagerly ("eager": includes Python launch overhead).
Writes ``<out>/kernels.md`` and ``<out>/kernels.json``; prints the table last.
``--tiny`` runs minute sizes (CPU: through the Triton interpreter) to check the
script itself; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import decode_attention as da
from . import window_scores as ws

HQ, HKV, D = 32, 8, 128
_CFG_KEYS = ("BLOCK_N", "num_warps", "num_stages", "items_per_sm", "max_chunk")
L2_BYTES = 50 * 2**20
ROTATE_BYTES = 256 * 2**20


# ------------------------------------------------------------------ timing

def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _Timer:
    def __init__(self):
        self.cuda = torch.cuda.is_available()

    def __enter__(self):
        if self.cuda:
            self.e0 = torch.cuda.Event(enable_timing=True)
            self.e1 = torch.cuda.Event(enable_timing=True)
            self.e0.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *a):
        if self.cuda:
            self.e1.record()
            self.e1.synchronize()
            self.ms = self.e0.elapsed_time(self.e1)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def time_calls(calls, reps=15, graph=True, min_round_ms=1.0):
    """Median ms per call; one round runs every callable once (one per input
    copy).  With ``graph`` the round is captured once in a CUDA graph (the
    graph replays ``k`` rounds so that one timed replay lasts >= min_round_ms)."""
    for c in calls:
        c()
    _sync()
    with _Timer() as t:
        for c in calls:
            c()
    est = max(t.ms, 1e-3)
    k = max(1, min(50, int(math.ceil(min_round_ms / est))))
    if graph and torch.cuda.is_available():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for c in calls:
                c()
        torch.cuda.current_stream().wait_stream(s)
        _sync()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(k):
                for c in calls:
                    c()

        def run():
            g.replay()
    else:
        def run():
            for _ in range(k):
                for c in calls:
                    c()
    run()
    _sync()
    times = []
    for _ in range(reps):
        with _Timer() as t:
            run()
        times.append(t.ms / (k * len(calls)))
    return statistics.median(times), (max(times) - min(times)) / statistics.median(times)


def measure_copy_bw(dev, nbytes=2 * 2**30, reps=20):
    n = nbytes // 2
    a = torch.randn(n, device=dev, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms, _ = time_calls([lambda: b.copy_(a)], reps=reps, graph=False)
    del a, b
    return 2 * nbytes / (ms * 1e-3)  # bytes read + written per second


def measure_matmul(dev, n=8192, reps=20):
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms, _ = time_calls([lambda: a @ b], reps=reps, graph=False)
    del a, b
    return 2 * n**3 / (ms * 1e-3)


# ------------------------------------------------------------------ inputs

def ragged_lengths(B, L, spread, gen):
    """Per (b, h) lengths, geometric from a to spread*a across the Hkv heads
    of each sequence (shuffled), summing to Hkv*L per sequence."""
    base = torch.tensor([spread ** (j / (HKV - 1)) for j in range(HKV)], dtype=torch.float64)
    lens = []
    for _ in range(B):
        f = base[torch.randperm(HKV, generator=gen)]
        x = f / f.sum() * (HKV * L)
        li = torch.floor(x).long()
        rem = HKV * L - int(li.sum())
        order = torch.argsort(x - li, descending=True)
        li[order[:rem]] += 1
        lens.append(li)
    return torch.cat(lens)


def _free_bytes():
    if not torch.cuda.is_available():
        return 8 * 2**30
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def sdpa_backend_ctx():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    except Exception:  # pragma: no cover
        import contextlib
        return contextlib.nullcontext()


def make_sdpa(q, kd, vd, scale):
    """Returns (callable, mode). mode: 'flash+gqa' or 'flash, expanded kv'."""
    def f_gqa():
        with sdpa_backend_ctx():
            return F.scaled_dot_product_attention(q, kd, vd, scale=scale, enable_gqa=True)
    try:
        f_gqa()
        _sync()
        return f_gqa, "flash+gqa"
    except Exception as e:  # noqa: BLE001
        print(f"  SDPA flash with enable_gqa failed ({type(e).__name__}: {str(e)[:80]}); expanding KV")
    ke = kd.repeat_interleave(HQ // HKV, dim=1)
    ve = vd.repeat_interleave(HQ // HKV, dim=1)

    def f_exp():
        with sdpa_backend_ctx():
            return F.scaled_dot_product_attention(q, ke, ve, scale=scale)
    return f_exp, "flash, expanded kv (reads 4x bytes)"


# ------------------------------------------------------------------ decode

def bench_decode(dev, batches, lengths, copy_bw, gen, reps, log):
    rows = []
    scale = D ** -0.5
    for B in batches:
        for L in lengths:
            tokens = B * HKV * L
            kv_bytes = tokens * D * 2 * 2
            n_sets = max(1, min(64, math.ceil(ROTATE_BYTES / kv_bytes)))
            need = kv_bytes * n_sets * 1.15 + 2**30
            if need > _free_bytes():
                log(f"decode B={B} L={L}: skipped ({need / 2**30:.1f} GiB needed)")
                continue
            row = {"B": B, "L": L, "kv_GB": kv_bytes / 1e9, "n_sets": n_sets}
            # ---- uniform: one dense cache per set, shared with SDPA
            sets = []
            for _ in range(n_sets):
                kd = torch.randn(B, HKV, L, D, device=dev, dtype=torch.bfloat16)
                vd = torch.randn(B, HKV, L, D, device=dev, dtype=torch.bfloat16)
                q = torch.randn(B, HQ, 1, D, device=dev, dtype=torch.bfloat16)
                sets.append((q, kd, vd))
            seg_start = torch.arange(B * HKV, device=dev, dtype=torch.int64) * L
            seg_len = torch.full((B * HKV,), L, device=dev, dtype=torch.int32)
            ours = [
                (lambda q=q, kd=kd, vd=vd: da.ragged_attention_triton(
                    q, kd.view(-1, D), vd.view(-1, D), seg_start, seg_len, scale, longest=L))
                for (q, kd, vd) in sets
            ]
            sdpa = []
            mode = None
            for (q, kd, vd) in sets:
                f, mode = make_sdpa(q, kd, vd, scale)
                sdpa.append(f)
            # correctness at size: ours vs SDPA
            o, _ = ours[0]()
            ref = sdpa[0]()
            row["err_vs_sdpa"] = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
            row["sdpa_mode"] = mode
            row["ours_us"], row["ours_spread"] = [x for x in time_calls(ours, reps)]
            row["ours_us"] *= 1e3
            row["sdpa_us"], row["sdpa_spread"] = time_calls(sdpa, reps)
            row["sdpa_us"] *= 1e3
            row["ours_eager_us"] = time_calls(ours, reps, graph=False)[0] * 1e3
            row["sdpa_eager_us"] = time_calls(sdpa, reps, graph=False)[0] * 1e3
            del sets, ours, sdpa, o, ref
            # ---- ragged: packed store, 10x spread between heads, same bytes
            sets = []
            for _ in range(n_sets):
                lens = ragged_lengths(B, L, 10.0, gen)
                starts = torch.cumsum(lens, 0) - lens
                k = torch.randn(tokens, D, device=dev, dtype=torch.bfloat16)
                v = torch.randn(tokens, D, device=dev, dtype=torch.bfloat16)
                q = torch.randn(B, HQ, 1, D, device=dev, dtype=torch.bfloat16)
                sets.append((q, k, v, starts.to(dev), lens.to(dev, torch.int32), lens.tolist()))
            row["ragged_min_max"] = [int(sets[0][4].min()), int(sets[0][4].max())]
            rag = [  # the lengths on the host, as the cache knows its capacities
                (lambda q=q, k=k, v=v, s=s, l=l, m=m: da.ragged_attention_triton(q, k, v, s, l, scale, lengths=m))
                for (q, k, v, s, l, m) in sets
            ]
            if B * L <= 8 * 4096:  # check ragged output against the reference once
                q, k, v, s, l, _ = sets[0]
                o, lse = rag[0]()
                ro, rl = da.ragged_attention_reference(q, k, v, s, l, scale)
                row["ragged_err_vs_ref"] = ((o.float() - ro.float()).norm() / ro.float().norm()).item()
            row["ragged_us"], row["ragged_spread"] = time_calls(rag, reps)
            row["ragged_us"] *= 1e3
            del sets, rag
            _free_bytes()
            t_floor = kv_bytes / copy_bw
            row["floor_us"] = t_floor * 1e6
            row["ours_frac_bw"] = (kv_bytes / (row["ours_us"] * 1e-6)) / copy_bw
            row["ragged_frac_bw"] = (kv_bytes / (row["ragged_us"] * 1e-6)) / copy_bw
            row["ratio_sdpa"] = row["ours_us"] / row["sdpa_us"]
            row["ratio_ragged_uniform"] = row["ragged_us"] / row["ours_us"]
            row["ratio_ragged_sdpa"] = row["ragged_us"] / row["sdpa_us"]
            log(f"decode B={B:>2} L={L:>6} kv={kv_bytes / 1e9:7.3f} GB  ours {row['ours_us']:9.1f} us "
                f"({row['ours_frac_bw'] * 100:5.1f}% of copy bw)  sdpa {row['sdpa_us']:9.1f} us  "
                f"ratio {row['ratio_sdpa']:.3f}  ragged {row['ragged_us']:9.1f} us "
                f"(x{row['ratio_ragged_uniform']:.3f})  eager ours/sdpa {row['ours_eager_us']:.1f}/"
                f"{row['sdpa_eager_us']:.1f}  err {row['err_vs_sdpa']:.1e}")
            rows.append(row)
    return rows


def sweep_decode(dev, shapes, reps, log, gen, cands=None):
    """Try launch configurations (``cands``, else a grid of 30) on a few
    (B, L, ragged) shapes; returns (best cfg by geometric-mean time, results)."""
    scale = D ** -0.5
    if not cands:
        cands = [{"BLOCK_N": bn, "num_warps": nw, "num_stages": ns, "items_per_sm": ips, "max_chunk": mc}
                 for bn, nw, ns in [(64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 3), (32, 4, 4)]
                 for ips in (2, 4, 8) for mc in (1024, 4096)]
    data = []
    for (B, L, ragged) in shapes:
        tokens = B * HKV * L
        n_sets = max(1, min(64, math.ceil(ROTATE_BYTES / (tokens * D * 4))))
        sets = []
        for _ in range(n_sets):
            k = torch.randn(tokens, D, device=dev, dtype=torch.bfloat16)
            v = torch.randn(tokens, D, device=dev, dtype=torch.bfloat16)
            q = torch.randn(B, HQ, 1, D, device=dev, dtype=torch.bfloat16)
            if ragged:
                lens = ragged_lengths(B, L, 10.0, gen)
                ss = (torch.cumsum(lens, 0) - lens).to(dev)
                sl = lens.to(dev, torch.int32)
                host_lengths = lens.tolist()
            else:
                ss = torch.arange(B * HKV, device=dev, dtype=torch.int64) * L
                sl = torch.full((B * HKV,), L, device=dev, dtype=torch.int32)
                host_lengths = [L] * (B * HKV)
            sets.append((q, k, v, ss, sl, host_lengths))
        data.append(((B, L, ragged), sets))
    results = []
    saved = dict(da.DECODE_CONFIG)
    for c in cands:
        da.DECODE_CONFIG.update(c)
        ts = []
        try:
            for (shape, sets) in data:
                calls = [(lambda q=q, k=k, v=v, ss=ss, sl=sl, m=m: da.ragged_attention_triton(
                    q, k, v, ss, sl, scale, lengths=m)) for (q, k, v, ss, sl, m) in sets]
                ts.append(time_calls(calls, reps)[0] * 1e3)
        except Exception as e:  # noqa: BLE001
            log(f"  sweep {c}: failed {type(e).__name__}: {str(e)[:100]}")
            continue
        gm = math.exp(sum(math.log(t) for t in ts) / len(ts))
        results.append({**c, "shapes": [list(d[0]) for d in data], "us": ts, "geomean_us": gm})
        log(f"  sweep {c}: " + " ".join(f"{t:.1f}" for t in ts) + f"  geomean {gm:.1f} us")
    da.DECODE_CONFIG.clear()
    da.DECODE_CONFIG.update(saved)
    del data
    _free_bytes()
    best = min(results, key=lambda r: r["geomean_us"]) if results else None
    return best, results


# ------------------------------------------------------------------ windows

def sweep_windows(dev, reps, log, N=32768, w=128):
    """Try window-score launch configs at one shape; returns (best, results)."""
    scale = D ** -0.5
    k = torch.randn(HKV * N, D, device=dev, dtype=torch.bfloat16)
    k_pos = torch.arange(N, device=dev).repeat(HKV)
    ss = torch.arange(HKV, device=dev) * N
    sl = torch.full((HKV,), N, device=dev, dtype=torch.int32)
    q = torch.randn(1, HQ, w, D, device=dev, dtype=torch.bfloat16)
    q_pos = torch.arange(N - w, N, device=dev).view(1, w)
    saved = dict(ws.WS_CONFIG)
    results = []
    for bn, bm, nw, ns in [(128, 64, 4, 2), (128, 32, 4, 2), (128, 64, 4, 3), (64, 64, 4, 2),
                           (256, 64, 8, 2), (128, 64, 8, 2)]:
        ws.WS_CONFIG.update({"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_W": bm, "num_warps": nw, "num_stages": ns})
        try:
            ms = time_calls([lambda: ws.window_scores_triton(q, q_pos, k, k_pos, ss, sl, scale)], reps,
                            graph=False)[0]
        except Exception as e:  # noqa: BLE001
            log(f"  ws sweep {bn, bm, nw, ns}: failed {type(e).__name__}: {str(e)[:100]}")
            continue
        results.append({"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_W": bm, "num_warps": nw, "num_stages": ns, "ms": ms})
        log(f"  ws sweep BLOCK_N={bn} BLOCK_M/W={bm} warps={nw} stages={ns}: {ms:.3f} ms")
    ws.WS_CONFIG.clear()
    ws.WS_CONFIG.update(saved)
    best = min(results, key=lambda r: r["ms"]) if results else None
    return best, results


def naive_bf16_window(q, q_pos, kd, k_pos_d, scale, reduce="mean"):
    """Materialised softmax with a bf16 matmul over a dense [B, Hkv, N, D] cache."""
    B, Hq, w, Dh = q.shape
    hkv, N = kd.shape[1], kd.shape[2]
    G = Hq // hkv
    s = torch.matmul(q.view(B, hkv, G, w, Dh), kd.unsqueeze(2).transpose(-1, -2)).float() * scale
    vis = k_pos_d.view(B, hkv, 1, 1, N) <= q_pos.view(B, 1, 1, w, 1)
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, dim=-1).sum(dim=3)
    return (p.amax(2) if reduce == "max" else p.mean(2)).reshape(-1)


def _peak_extra(fn):
    """Peak device memory allocated during fn beyond what was allocated before."""
    if not torch.cuda.is_available():
        fn()
        return float("nan")
    _sync()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    r = fn()
    _sync()
    peak = torch.cuda.max_memory_allocated() - base
    del r
    return peak


def bench_windows(dev, Ns, ws_list, reps, log, B=1):
    rows = []
    scale = D ** -0.5
    for N in Ns:
        kd = torch.randn(B, HKV, N, D, device=dev, dtype=torch.bfloat16)
        k = kd.view(-1, D)
        S = k.shape[0]
        k_pos = torch.arange(N, device=dev, dtype=torch.int64).repeat(B * HKV)
        ss = torch.arange(B * HKV, device=dev, dtype=torch.int64) * N
        sl = torch.full((B * HKV,), N, device=dev, dtype=torch.int32)
        for w in ws_list:
            q = torch.randn(B, HQ, w, D, device=dev, dtype=torch.bfloat16)
            q_pos = torch.arange(N - w, N, device=dev, dtype=torch.int64).repeat(B, 1)
            ours = lambda: ws.window_scores_triton(q, q_pos, k, k_pos, ss, sl, scale, "mean")  # noqa: E731
            ref = lambda: ws.window_scores_reference(q, q_pos, k, k_pos, ss, sl, scale, "mean")  # noqa: E731
            nb = lambda: naive_bf16_window(q, q_pos, kd, k_pos.view(B, HKV, N), scale)  # noqa: E731
            row = {"N": N, "w": w, "B": B}
            a = ours()
            r = ref()
            row["err_vs_ref"] = ((a - r).norm() / r.norm()).item()
            row["err_bf16_naive_vs_ref"] = ((nb() - r).norm() / r.norm()).item()
            del a, r
            row["ours_ms"] = time_calls([ours], reps, graph=False)[0]
            row["ref_ms"] = time_calls([ref], max(3, reps // 3), graph=False)[0]
            row["naive_bf16_ms"] = time_calls([nb], max(3, reps // 3), graph=False)[0]
            row["ours_peak_MB"] = _peak_extra(ours) / 1e6
            row["ours_extra_MB"] = row["ours_peak_MB"] - S * 4 / 1e6   # beyond the [S] output
            row["ref_peak_MB"] = _peak_extra(ref) / 1e6
            row["naive_bf16_peak_MB"] = _peak_extra(nb) / 1e6
            row["speedup_vs_ref"] = row["ref_ms"] / row["ours_ms"]
            row["speedup_vs_naive_bf16"] = row["naive_bf16_ms"] / row["ours_ms"]
            flops = 2 * (2 * B * HQ * w * N * D)   # two passes of QK^T
            row["tflops"] = flops / (row["ours_ms"] * 1e-3) / 1e12
            log(f"window N={N} w={w}: ours {row['ours_ms']:.3f} ms ({row['tflops']:.0f} TFLOP/s), ref "
                f"{row['ref_ms']:.3f} ms (x{row['speedup_vs_ref']:.1f}), naive bf16 {row['naive_bf16_ms']:.3f} ms "
                f"(x{row['speedup_vs_naive_bf16']:.1f}); peak MB ours {row['ours_peak_MB']:.1f} "
                f"(extra {row['ours_extra_MB']:.2f}) ref {row['ref_peak_MB']:.0f} naive {row['naive_bf16_peak_MB']:.0f}; "
                f"err {row['err_vs_ref']:.1e}")
            rows.append(row)
        del kd, k, k_pos
        _free_bytes()
    return rows


# ------------------------------------------------------------------ report

def fmt_table(info, decode_rows, win_rows, best_cfg):
    out = []
    out.append("# kvbench kernels benchmark\n")
    out.append(f"- machine: {info['device']} ({info['sms']} SMs, {info['mem_GiB']:.0f} GiB)")
    out.append(f"- date: {info['date']}; torch {info['torch']}, triton {info['triton']}, python {info['python']}")
    out.append(f"- measured copy bandwidth (read + write): **{info['copy_bw_GBs']:.0f} GB/s**; "
               f"bf16 8192^3 matmul: **{info['matmul_tflops']:.0f} TFLOP/s**")
    out.append(f"- decode config: {info['decode_config']}" + (f" (best of sweep: {best_cfg})" if best_cfg else ""))
    out.append("- timings: median of CUDA-graph replays (one call per rotated input copy, >= 256 MB in all); "
               "eager = the same calls launched from Python\n")
    out.append("## Decode attention (Llama-3.1-8B: Hq=32, Hkv=8, D=128, bf16, Tq=1)\n")
    out.append("Targets: fraction of copy bandwidth >= 0.80 once KV >= 1 GB; ours/SDPA <= 1.0; ragged/uniform <= 1.15.\n")
    out.append("| B | L | KV GB | ours us | frac of copy bw | SDPA flash us | ours/SDPA | ragged us | ragged/uniform "
               "| ragged frac bw | eager ours us | eager SDPA us | err vs SDPA |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in decode_rows:
        out.append(f"| {r['B']} | {r['L'] // 1024}k | {r['kv_GB']:.3f} | {r['ours_us']:.1f} | {r['ours_frac_bw']:.2f} "
                   f"| {r['sdpa_us']:.1f} | {r['ratio_sdpa']:.2f} | {r['ragged_us']:.1f} | {r['ratio_ragged_uniform']:.2f} "
                   f"| {r['ragged_frac_bw']:.2f} | {r['ours_eager_us']:.1f} | {r['sdpa_eager_us']:.1f} "
                   f"| {r['err_vs_sdpa']:.1e} |")
    if decode_rows:
        out.append(f"\nSDPA path: {decode_rows[0]['sdpa_mode']}. Ragged: per sequence, the 8 KV heads hold lengths "
                   f"in a geometric 1:10 spread summing to 8L.")
    out.append("\n## Window scores (B=1, Hq=32, Hkv=8, D=128, bf16, reduce=mean)\n")
    out.append(f"Config: {info.get('window_config')}\n")
    out.append("Target: >= 5x faster than the materialised reference at 32k; extra memory not growing with w*N.\n")
    out.append("| N | w | ours ms | TFLOP/s (2 passes) | ref fp32 ms | speedup vs ref | naive bf16 ms | speedup vs bf16 "
               "| ours peak MB | ours extra MB (beyond [S] output) | ref peak MB | naive bf16 peak MB | err vs ref |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in win_rows:
        out.append(f"| {r['N'] // 1024}k | {r['w']} | {r['ours_ms']:.3f} | {r['tflops']:.0f} | {r['ref_ms']:.2f} "
                   f"| {r['speedup_vs_ref']:.1f} | {r['naive_bf16_ms']:.2f} | {r['speedup_vs_naive_bf16']:.1f} "
                   f"| {r['ours_peak_MB']:.1f} | {r['ours_extra_MB']:.2f} | {r['ref_peak_MB']:.0f} "
                   f"| {r['naive_bf16_peak_MB']:.0f} | {r['err_vs_ref']:.1e} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--sweep", action="store_true", help="sweep decode launch configs first and use the best")
    ap.add_argument("--tiny", action="store_true", help="minute sizes, to check the script")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--skip-windows", action="store_true")
    ap.add_argument("--configs", type=json.loads, default=None, metavar="JSON",
                    help="with --sweep: only these launch configs, a JSON list of objects with the keys "
                         f"{', '.join(_CFG_KEYS)} (e.g. the default against one rival, in seconds not minutes)")
    args = ap.parse_args(argv)
    if args.configs is not None and not (isinstance(args.configs, list) and args.configs and all(
            isinstance(c, dict) and set(c) == set(_CFG_KEYS) for c in args.configs)):
        ap.error(f"--configs: a non-empty JSON list of objects with exactly the keys {', '.join(_CFG_KEYS)}")

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        if not args.tiny:
            sys.exit("no CUDA device: run with --tiny to check the script (interpreter)")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    logs = []

    def log(s):
        print(s, flush=True)
        logs.append(s)

    info = {
        "device": torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu",
        "sms": torch.cuda.get_device_properties(dev).multi_processor_count if cuda else 0,
        "mem_GiB": torch.cuda.get_device_properties(dev).total_memory / 2**30 if cuda else 0,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
    }
    if args.tiny:
        info["copy_bw_GBs"] = measure_copy_bw(dev, nbytes=2**24, reps=3) / 1e9
        info["matmul_tflops"] = measure_matmul(dev, n=256, reps=3) / 1e12
        batches, lengths, Ns, wl, reps = [1, 2], [64, 200], [300], [8], 2
        global HQ, HKV, D, ROTATE_BYTES
        HQ, HKV, D, ROTATE_BYTES = 8, 2, 64, 2**16
    else:
        info["copy_bw_GBs"] = measure_copy_bw(dev) / 1e9
        info["matmul_tflops"] = measure_matmul(dev) / 1e12
        batches, lengths, Ns, wl, reps = [1, 8, 32, 64], [1024, 4096, 16384, 32768, 131072], \
            [32768, 131072], [32, 64, 128], args.reps
    log(f"{info['device']}: copy {info['copy_bw_GBs']:.0f} GB/s, matmul {info['matmul_tflops']:.0f} TFLOP/s")
    copy_bw = info["copy_bw_GBs"] * 1e9

    best = None
    sweep_rows = []
    if args.sweep:
        # the bench's decoding shapes too (Llama-3.1-8B at 32k, batch 1 and 8: full, and 8k held at a quarter)
        shapes = ([(1, 4096, False), (1, 8192, False), (1, 16384, True), (1, 32768, False), (1, 131072, False),
                   (8, 4096, True), (8, 8192, False), (8, 32768, False), (8, 131072, False), (32, 1024, False),
                   (64, 4096, False)]
                  if not args.tiny else [(1, 64, False), (2, 100, True)])
        best, sweep_rows = sweep_decode(dev, shapes, max(5, reps // 2), log, gen, args.configs)
        if best:
            da.DECODE_CONFIG.update({k: best[k] for k in _CFG_KEYS})
            log(f"sweep best: {best}")
    info["decode_config"] = dict(da.DECODE_CONFIG)
    ws_sweep = []
    if args.sweep and not args.skip_windows:
        wbest, ws_sweep = sweep_windows(dev, max(5, reps // 2), log, *((300, 8) if args.tiny else ()))
        if wbest:
            ws.WS_CONFIG.update({k: wbest[k] for k in ("BLOCK_N", "BLOCK_M", "BLOCK_W", "num_warps", "num_stages")})
            log(f"window sweep best: {wbest}")
    info["window_config"] = dict(ws.WS_CONFIG)

    decode_rows = bench_decode(dev, batches, lengths, copy_bw, gen, reps, log)
    win_rows = [] if args.skip_windows else bench_windows(dev, Ns, wl, reps, log)

    table = fmt_table(info, decode_rows, win_rows, best and {k: best[k] for k in _CFG_KEYS})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.md").write_text(table)
    (out / "kernels.json").write_text(json.dumps(
        {"info": info, "decode": decode_rows, "windows": win_rows, "sweep": sweep_rows,
         "window_sweep": ws_sweep, "log": logs},
        indent=1))
    print()
    print(table)


if __name__ == "__main__":
    main()
