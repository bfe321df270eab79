"""Decode step time of the engine on the GPU, with and without CUDA graphs (llama-3.1-8b random weights).
    python scripts/gpu/prof_decode_gpu.py [context] [batch]"""
import os, sys, time, torch
from kvbench import models, registry
from kvbench.cache import KVCache
from kvbench.engine import Engine
from kvbench.task import Sample

ctx, batch = (int(a) for a in (sys.argv[1:] + ["4096", "4"])[:2])
lm = models.load("llama-3.1-8b", torch.bfloat16, "cuda", random_weights=True)


class Tok:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return ""


lm.tokenizer = Tok()
lm.model.generation_config.eos_token_id = None
for method, budget in [("full", 1.0), ("snapkv", 0.25)]:
    for graphs in ("0", "1"):
        eng = Engine(lm, registry.build_method(method, budget))
        eng.cuda_graphs = graphs == "1"
        caches, firsts = [], []
        for i in range(batch):
            c, f, _ = eng.prefill(Sample(str(i), list(range(100, 100 + ctx)), [], [], 64))
            caches.append(c)
            firsts.append(f)
        cache = KVCache.concat(caches, consume=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        toks, d = eng.decode(cache, torch.cat(firsts), [64] * batch, [False] * batch)
        dt = time.perf_counter() - t0
        print(f"{method:7s} ctx={ctx} batch={batch} graphs={graphs}: {1000 * dt / d['decode_steps']:.2f} ms/step "
              f"(graph used: {d['cuda_graph']}), first tokens {toks[0][:6]}", flush=True)
        del cache, caches
        torch.cuda.empty_cache()
