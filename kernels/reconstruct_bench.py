"""Benchmark and tile sweep of the DeltaKV reconstruction kernel at a real model's shapes.

    python -m kvbench.kernels.reconstruct_bench [--batch 48] [--context 32768] [--keep 0.15] [--out DIR]

Builds one compressed layer's tables the way ``methods/deltakv/store.py`` lays them out (``B`` sequences of
``context`` compressed tokens: the sinks and every ``s``-th token as references, the rest as int4 latents
with ``k`` neighbour indices each), picks ``keep`` of each sequence's tokens (the sinks plus random
positions, sorted, as the observation layer hands them over), and times ``reconstruct_triton`` over a
grid of tiles (``block_t`` tokens, ``block_r`` stored latent columns per step, warps, stages). Timings are
medians of CUDA-event timed calls; the first result is checked against ``reconstruct_reference`` on a slice.
Prints a table (ms per call, tokens per microsecond, and the traffic the call needs at least: HBM for the
latents, indices and outputs, L2 for the neighbour rows and the up-projection's weight per tile) and
returns the fastest tile. Shapes default to Llama-3.1-8B (8 KV heads x 128, r = 256, int4, group 32).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch

from .deltakv_reconstruct import quantize_latents, reconstruct_reference, reconstruct_triton


def build_inputs(batch: int, context: int, keep: float, heads: int = 8, head_dim: int = 128, latent: int = 256,
                 fmt: str = "int4", sinks: int = 8, stride: int = 10, neighbours: int = 4, seed: int = 0,
                 device="cuda") -> dict:
    """One compressed layer of ``batch`` sequences and one decoding step's selection (see the module doc)."""
    g = torch.Generator().manual_seed(seed)
    D = 2 * heads * head_dim
    pos = torch.arange(context)
    is_ref = (pos < sinks) | ((pos - sinks) % stride == 0)
    n_ref, n_lat = int(is_ref.sum()), int((~is_ref).sum())
    ref_row = torch.cumsum(is_ref.long(), 0) - 1  # row of each position in its table
    lat_row = torch.cumsum((~is_ref).long(), 0) - 1
    visible = ref_row[~is_ref] + 1  # references before each latent position
    nbr = (torch.rand(batch * n_lat, neighbours, generator=g) * visible.repeat(batch)[:, None]).long()
    z = torch.randn(batch * n_lat, latent, generator=g)
    values, scales = quantize_latents(z, fmt, 32, torch.bfloat16)
    refs = torch.randn(batch * n_ref, D, generator=g, dtype=torch.bfloat16)
    w_up = (torch.randn(D, latent, generator=g) / latent ** 0.5).to(torch.bfloat16)
    n_pick = max(1, int(keep * (context - sinks)))
    seqs, picks = [], []
    for b in range(batch):
        chosen = torch.randperm(context - sinks, generator=g)[:n_pick] + sinks
        p = torch.cat([torch.arange(sinks), chosen.sort().values])
        picks.append(p)
        seqs.append(torch.full_like(p, b))
    p, s = torch.cat(picks), torch.cat(seqs)
    n = len(p)
    count = n // batch
    angle = p.float()[:, None] * (10000.0 ** (-torch.arange(head_dim // 2) / (head_dim // 2)))[None]
    cos, sin = torch.cat([angle.cos()] * 2, 1), torch.cat([angle.sin()] * 2, 1)
    index_in_seq = torch.arange(n) - s * count
    t = dict(latents=values, scales=scales, neighbours=nbr.to(torch.int16), refs=refs, w_up=w_up,
             lat_row=torch.where(is_ref[p], -1, s * n_lat + lat_row[p]),
             self_ref=torch.where(is_ref[p], s * n_ref + ref_row[p], 0), ref_base=s * n_ref,
             cos=cos, sin=sin, dest=heads * s * count + index_in_seq, hstride=torch.full((n,), count))
    t = {k: v.to(device) for k, v in t.items() if v is not None} | ({} if scales is not None else {"scales": None})
    t["k_out"] = torch.empty(n * heads, head_dim, dtype=torch.bfloat16, device=device)
    t["v_out"] = torch.empty_like(t["k_out"])
    t.update(heads=heads, latent_format=fmt, group=32)
    return t


ARG_ORDER = ("latents", "scales", "neighbours", "refs", "w_up", "lat_row", "self_ref", "ref_base", "cos", "sin",
             "dest", "hstride", "k_out", "v_out", "heads", "latent_format", "group")


def run(inputs: dict, **tile) -> None:
    reconstruct_triton(*(inputs[k] for k in ARG_ORDER), **tile)


def time_ms(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check(inputs: dict, n_check: int = 4096, **tile) -> float:
    """Relative error of the kernel against the PyTorch reference on the first ``n_check`` tokens."""
    sub = dict(inputs)
    for k in ("lat_row", "self_ref", "ref_base", "cos", "sin"):
        sub[k] = inputs[k][:n_check]
    heads, hd = inputs["heads"], inputs["k_out"].shape[1]
    sub["dest"] = torch.arange(n_check, device=inputs["dest"].device) * heads
    sub["hstride"] = torch.ones(n_check, dtype=torch.int64, device=inputs["dest"].device)
    outs = [torch.zeros(n_check * heads, hd, dtype=torch.bfloat16, device=sub["dest"].device) for _ in range(4)]
    sub["k_out"], sub["v_out"] = outs[0], outs[1]
    run(sub, **tile)
    sub["k_out"], sub["v_out"] = outs[2], outs[3]
    reconstruct_reference(*(sub[k] for k in ARG_ORDER))
    return max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in ((outs[0], outs[2]),
                                                                                      (outs[1], outs[3])))


def traffic(inputs: dict, block_t: int, split: bool = False) -> tuple[float, float]:
    """(HBM bytes, L2 bytes) a call needs at least (split: the matmul's output written and read back, and
    no weight slices per tile)."""
    n = inputs["lat_row"].numel()
    lat = inputs["latents"]
    per_lat = lat.shape[1] * lat.element_size() + inputs["neighbours"].shape[1] * 2 + \
        (inputs["scales"].shape[1] * 2 if inputs["scales"] is not None else 0)
    D = inputs["refs"].shape[1]
    out = 2 * inputs["k_out"].numel() * 2
    hbm = n * per_lat + out + inputs["refs"].numel() * 2 * min(1.0, n / max(1, inputs["latents"].shape[0]) * 4)
    if split:
        return hbm + 2 * n * D * 2, n * inputs["neighbours"].shape[1] * D * 2
    l2 = n * inputs["neighbours"].shape[1] * D * 2 + -(-n // block_t) * inputs["w_up"].numel() * 2
    return hbm, l2


def sweep(inputs: dict, tiles: list[dict], reps: int = 10, log=print) -> list[dict]:
    rows = []
    n = inputs["lat_row"].numel()
    for tile in tiles:
        try:
            ms = time_ms(lambda: run(inputs, **tile), reps)
        except Exception as e:  # a tile that does not compile or fit (shared memory) is skipped, with its reason
            log(f"  {tile}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        hbm, l2 = traffic(inputs, tile["block_t"], tile.get("split", False))
        row = {**tile, "ms": round(ms, 3), "tokens_per_us": round(n / ms / 1000, 1),
               "hbm_GBps": round(hbm / ms / 1e6), "l2_GBps": round(l2 / ms / 1e6)}
        rows.append(row)
        log(f"  {json.dumps(row)}")
    return rows


def default_tiles() -> list[dict]:
    tiles = [{"block_t": 64, "block_r": None, "num_warps": 8, "num_stages": None}]  # the whole latent at once
    for block_t, block_r, warps in ((64, 64, 4), (64, 32, 4), (64, 128, 4), (32, 64, 4), (32, 32, 2),
                                    (128, 64, 8), (128, 32, 8)):
        tiles.append({"block_t": block_t, "block_r": block_r, "num_warps": warps, "num_stages": 2})
    for block_t, warps in itertools.product((16, 32, 64, 128), (2, 4, 8)):
        tiles.append({"split": True, "block_t": block_t, "num_warps": warps})
    return tiles


def tune(batch: int = 48, context: int = 32768, keep: float = 0.15, reps: int = 10, log=print) -> dict:
    """Sweep the tiles at these shapes; returns ``{"best": tile, "rows": [...], "rel_error": e, "tokens": n}``."""
    inputs = build_inputs(batch, context, keep)
    n = inputs["lat_row"].numel()
    log(f"reconstruct: {batch} sequences x {context} compressed tokens, keep {keep}: {n} tokens per call")
    rows = sweep(inputs, default_tiles(), reps, log)
    best = min(rows, key=lambda r: r["ms"])
    tile = {k: best[k] for k in ("split", "block_t", "block_r", "num_warps", "num_stages") if k in best}
    err = check(inputs, **tile)
    log(f"fastest: {json.dumps(best)}; relative error against the reference {err:.2e}")
    del inputs
    torch.cuda.empty_cache()
    return {"best": tile, "rows": rows, "rel_error": err, "tokens": n, "batch": batch, "context": context,
            "keep": keep, "device": torch.cuda.get_device_name()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--keep", type=float, default=0.15)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None, help="write reconstruct-tiles.json here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("reconstruct_bench times the Triton kernel on a CUDA GPU; none is visible here")
    result = tune(args.batch, args.context, args.keep, args.reps)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "reconstruct-tiles.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
