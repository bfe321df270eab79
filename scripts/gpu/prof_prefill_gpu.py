"""Where a kvbench prefill spends its time on the GPU (issue 21), on an untrained model of a real shape.

    python scripts/gpu/prof_prefill_gpu.py PRESET CONTEXT[,CONTEXT...] [--profile CONTEXT] [--attention]

Per context (batch 1, median of 3 after a warm-up; and the first prefill at that length alone, which pays for
what is built per length, such as cuDNN's plans): the engine's prefill with the full cache and with snapkv at
25% (compression included), against transformers' own SDPA prefill of the same weights (a DynamicCache, as
`kvbench bench --peers hf` does); the device syncs the host waited for in one engine prefill (counted by
torch.profiler: cudaStreamSynchronize, cudaDeviceSynchronize, cudaEventSynchronize, D2H copies); with
``--attention`` the causal attention of one layer through each PyTorch kernel that returns the log-sum-exp
(what merging with a store needs) against SDPA's GQA call; with ``--profile`` the top operators of one full
prefill at that context by host and by device time (``--profile-method``: another method's prefill, e.g.
kvsculpt, whose named ranges are printed with their wall time: ``"" --methods kvsculpt --param
kvsculpt.adaptive=true --profile 8192 --profile-method kvsculpt``; the empty context list skips the timed
prefills, five more compressions of a slow method).
"""
import argparse
import os
import statistics
import time

import torch
import torch._dynamo
import yaml

from kvbench import cache, models, registry
from kvbench.engine import Engine
from kvbench.task import Sample


def timed(fn, reps: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hf_prefill(model, ids):
    from transformers import DynamicCache
    model.config._attn_implementation = "sdpa"
    try:
        with torch.no_grad():
            model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
    finally:
        model.config._attn_implementation = "kvbench"


def syncs_in(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync")
    counts = {n: 0 for n in names}
    for e in prof.events():
        if e.name in counts:
            counts[e.name] += 1
    return counts


def attention_kernels(preset_cfg, T: int) -> None:
    Hq, Hkv, D = preset_cfg.num_attention_heads, preset_cfg.num_key_value_heads, models.head_dim(preset_cfg)
    G = Hq // Hkv
    q = torch.randn(1, Hq, T, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    scale = D ** -0.5
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    ops = torch.ops.aten
    cands = {
        "sdpa(enable_gqa) [transformers]": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=True),
        "repeat + flash (lse)": lambda: ops._scaled_dot_product_flash_attention(
            q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), 0.0, True, False, scale=scale),
        "flash (lse), pre-repeated": lambda: ops._scaled_dot_product_flash_attention(
            q, kr, vr, 0.0, True, False, scale=scale),
        "repeat + cudnn (lse)": lambda: ops._scaled_dot_product_cudnn_attention(
            q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), None, True, 0.0, True, False, scale=scale),
        "repeat + efficient (lse)": lambda: ops._scaled_dot_product_efficient_attention(
            q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), None, True, 0.0, True, scale=scale),
    }
    flops = 4 * T * T * D * Hq / 2
    for name, fn in cands.items():
        try:
            s = timed(fn, reps=10)
            print(f"  attention T={T:6d} {name:34s} {s * 1e3:8.3f} ms  {flops / s / 1e12:6.0f} TFLOP/s")
        except Exception as e:  # a kernel this build lacks: say so
            print(f"  attention T={T:6d} {name:34s} unavailable: {str(e).splitlines()[0][:100]}")


def decode_profile(lm, engines: dict, context: int, batch: int) -> None:
    """Steady decoding step (CUDA graph) per method against the floor (weights + KV held, read once at the
    copy bandwidth measured here), and the device time of one eager step by kernel."""
    from torch.profiler import ProfilerActivity, profile
    from kvbench.cache import KVCache
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    bw = 2 * x.numel() / timed(lambda: y.copy_(x), reps=10)
    del x, y
    weights = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    weights -= lm.model.get_input_embeddings().weight.numel() * 2  # one embedding row per token is read, not all
    print(f"decode: context {context}, batch {batch}, copy bandwidth {bw / 1e12:.2f} TB/s, weights read {weights / 2**30:.2f} GiB")
    ids = list(range(1000, 1000 + context))
    for m, eng in engines.items():
        eng.protocol = "query-agnostic"
        caches, firsts = [], []
        for b in range(batch):
            c, f, _ = eng.prefill(Sample(str(b), ids, [], [], 1))
            caches.append(c)
            firsts.append(f)
        cache = KVCache.concat(caches, consume=True) if batch > 1 else caches[0]
        kv = cache.nbytes()
        _, info = eng.decode(cache, torch.cat(firsts), [96] * batch, [False] * batch, trace_every=0)
        floor = (weights + kv) / bw
        step = info["tpot_steady_s"]
        print(f"  {m}: steady step {step * 1e3:.3f} ms, floor {floor * 1e3:.3f} ms ({step / floor:.2f}x), "
              f"kv held {kv / 2**30:.2f} GiB, graph {info['cuda_graph']}"
              + (f" ({info['graph_error']})" if info.get("graph_error") else ""))
        nxt = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
        eng.forward(cache, nxt, compress=False)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                eng.forward(cache, nxt, compress=False)
            torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        total = sum(e.self_device_time_total for e in kernels) / 3 / 1e3
        n = sum(e.count for e in kernels) / 3
        print(f"    one eager step: {n:.0f} kernels, {total:.3f} ms of kernel time; by kernel (ms per step, count):")
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:14]:
            print(f"      {e.self_device_time_total / 3 / 1e3:7.3f} {e.count // 3:5d}  {e.key[:90]}")
        del cache, caches


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("preset")
    ap.add_argument("contexts")
    ap.add_argument("--profile", type=int, default=0)
    ap.add_argument("--attention", action="store_true")
    ap.add_argument("--methods", default="full,snapkv")
    ap.add_argument("--protocols", default="query-agnostic,query-aware")
    ap.add_argument("--decode", type=int, default=0, help="profile decoding steps after a prefill of this many tokens")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together with --decode")
    ap.add_argument("--kernels", default="cudnn", help="prefill attention kernels to time the engine with (flash,cudnn)")
    ap.add_argument("--compile", action="store_true", help="the decoding step through torch.compile (Engine.compile_decode)")
    ap.add_argument("--profile-method", default="full", help="the method whose prefill --profile traces")
    ap.add_argument("--budget", type=float, default=0.25, help="the kept fraction of every method but full")
    ap.add_argument("--freeze", choices=("off", "on", "both"), default="off",
                    help="with --compile: the weights frozen into the compiled decoding step (Engine.freeze: q/k/v "
                         "and gate/up fused); both: --decode unfrozen, then frozen, one model load")
    ap.add_argument("--skinny-gemm", choices=("off", "on", "both"), default="off",
                    help="the linear layers of <= 16 rows through kvbench.kernels.skinny_gemm (as kvbench bench "
                         "--skinny-gemm); both: --decode with cuBLAS, then again with the kernel, one model load")
    ap.add_argument("--pdl", choices=("off", "on", "both"), default="off",
                    help="programmatic dependent launch (KVBENCH_PDL=1: kvbench's kernels, and inductor's with "
                         "--compile); both: --decode without, then again with, one model load")
    ap.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                    help="a method's parameter (repeatable), e.g. kvsculpt.adaptive=true")
    args = ap.parse_args()
    params: dict[str, dict] = {}
    for p in args.param:
        target, _, value = p.partition("=")
        method, _, key = target.partition(".")
        if not (method and key and value):
            ap.error(f"--param {p}: write METHOD.KEY=VALUE, e.g. kvsculpt.adaptive=true")
        params.setdefault(method, {})[key] = yaml.safe_load(value)
    if args.pdl == "on":
        os.environ["KVBENCH_PDL"] = "1"
    contexts = [int(c) for c in args.contexts.split(",") if c]  # "": no prefill timings (--decode alone)
    lm = models.load(args.preset, torch.bfloat16, "cuda", random_weights=True)
    lm.tokenizer = models.IdTokenizer()
    model = lm.model
    from kvbench.kernels.skinny_gemm import use_skinny_linear
    if args.skinny_gemm == "on":
        print(f"skinny GEMM kernel in {use_skinny_linear(model)} linear layers")
    print(f"{args.preset}: torch {torch.__version__}, {torch.cuda.get_device_name()}")
    def build_engines(freeze: bool = args.freeze == "on") -> dict:
        return {m: Engine(lm, registry.build_method(m, 1.0 if m == "full" else args.budget, params.get(m)),
                          compile_decode=args.compile, freeze=freeze) for m in args.methods.split(",")}

    engines = build_engines()
    for T in contexts:
        ids = list(range(1000, 1000 + T))
        sample = Sample("s", ids[:-32], ids[-32:], [], 1)  # a context and a 32-token question
        t_hf = timed(lambda: hf_prefill(model, torch.tensor([ids], device="cuda")))
        line = [f"T={T:6d} hf-sdpa {t_hf * 1e3:8.1f} ms"]
        for kernel in args.kernels.split(","):  # cudnn: where it agrees with flash (kvbench.cache._cudnn_agrees)
            cache._CUDNN_AGREES.clear()
            if kernel == "flash":
                cache._CUDNN_AGREES.update({(torch.device("cuda", 0), torch.bfloat16, models.head_dim(model.config)): False})
            for m, eng in engines.items():
                for proto in args.protocols.split(","):
                    eng.protocol = proto
                    t0 = time.perf_counter()  # the first prefill at this length: plans and kernels built for it
                    eng.prefill(sample)
                    torch.cuda.synchronize()
                    first = time.perf_counter() - t0
                    t = timed(lambda: eng.prefill(sample))
                    line.append(f"{m}/{proto[6:] or proto}/{kernel} {t * 1e3:8.1f} ms ({t / t_hf:4.2f}x), "
                                f"first at this length {first * 1e3:8.1f} ms")
        cache._CUDNN_AGREES.clear()
        print("\n    ".join(line))
        for m, eng in engines.items():
            eng.protocol = "query-agnostic"
            print(f"  syncs in one {m} prefill (query-agnostic): {syncs_in(lambda: eng.prefill(sample))}")
        if args.attention:
            attention_kernels(model.config, T)
    if args.decode:
        decode_profile(lm, engines, args.decode, args.batch)
        if args.freeze == "both":
            torch._dynamo.reset()  # dynamo's compiled code is keyed by the code, not by inductor's options
            print("weights frozen into the compiled step; the same again:")
            decode_profile(lm, build_engines(freeze=True), args.decode, args.batch)
        if args.skinny_gemm == "both":
            print(f"skinny GEMM kernel in {use_skinny_linear(model)} linear layers; the same again:")
            decode_profile(lm, build_engines(), args.decode, args.batch)
        if args.pdl == "both":
            os.environ["KVBENCH_PDL"] = "1"
            torch._dynamo.reset()  # inductor's kernels compiled again, with PDL
            print("programmatic dependent launch (KVBENCH_PDL=1); the same again:")
            decode_profile(lm, build_engines(), args.decode, args.batch)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        ids = list(range(1000, 1000 + args.profile))
        eng = engines[args.profile_method]
        eng.protocol = "query-agnostic"
        sample = Sample("s", ids[:-32], ids[-32:], [], 1)
        eng.prefill(sample)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            eng.prefill(sample)
            torch.cuda.synchronize()
        avg = prof.key_averages()
        for e in avg:  # a method's own named ranges (e.g. kvsculpt.key_step, kvsculpt.value_solve): wall time inside
            if "." in e.key and not e.key.startswith(("aten::", "cuda", "void", "triton")):
                print(f"  range {e.key}: {e.count} x, {e.cpu_time_total / 1e3:.1f} ms in all (host, children included)")
        print(avg.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
        print(avg.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
