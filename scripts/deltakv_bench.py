"""DeltaKV's measurements: quality at matched memory on a real model, and decoding throughput at 32k.

    python scripts/deltakv_bench.py eval --model M --artifact DIR --haystack DIR --out DIR [-m k=v ...]
    python scripts/deltakv_bench.py throughput --preset llama-3.1-8b --context 32768 --out DIR [-m k=v ...]

``eval`` runs, through ``kvbench.harness.run`` (the path of ``kvbench run``): NIAH at each length for
``full``, ``deltakv`` and ``snapkv``, and ``fidelity`` for ``deltakv`` and ``snapkv`` (its KL is against
the full cache). SnapKV's budget is set per length so that its measured KV ratio equals DeltaKV's
(SnapKV holds ``2 * head_dim`` values and an int32 position per kept token, and the question tokens
whole). It also prefills one NIAH context per length and reports DeltaKV's bytes by kind (full layers,
raw window, sinks, references, latents, scales, indices, bookkeeping) and the index share.

``throughput`` prefills one random-token sequence of ``context`` tokens per method, joins copies of its
cache into the largest batch that fits (stepping down 8% after an out-of-memory error), decodes
``warmup`` steps, then times ``steps`` more through ``Engine.decode`` (the engine's decoding, CUDA graph
included where the method allows it; with W=128 every 128 consecutive steps hold exactly one DeltaKV
window flush, so the default 128 steps include one). Every sequence is the same prompt: decoding
cost depends on the shapes, not the values, and one prefill instead of dozens keeps the run short.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvbench import models, registry
from kvbench.results import read_jsonl
from kvbench.engine import Engine, free_memory, sync
from kvbench.harness import RunConfig, run
from kvbench.task import Sample, TaskContext


def _params(pairs: list[str]) -> dict:
    return dict(p.split("=", 1) for p in pairs)


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _records(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "samples.jsonl")


def snapkv_budget(records: list[dict], target_ratio: float, head_dim: int, itemsize: int) -> float:
    """The SnapKV budget whose measured prefill ratio matches ``target_ratio`` on these samples."""
    per_kv = 2 * head_dim * itemsize
    per_slot = per_kv + 4  # + int32 position
    ctx = sum(r["context_tokens"] for r in records) / len(records)
    q = sum(r["question_tokens"] for r in records) / len(records)
    kept_ctx = target_ratio * (ctx + q) * per_kv / per_slot - q
    return round(min(1.0, max(kept_ctx / ctx, 0.01)), 4)


def breakdown(lm, method, sample: Sample) -> dict:
    """DeltaKV's bytes by kind after prefilling one sample."""
    cache, _, _ = Engine(lm, method).prefill(sample)
    out = {"full_layers": 0}
    for layer, store in enumerate(cache.stores):
        if layer in method.full_set:
            out["full_layers"] += store.nbytes()
            continue
        for kind, n in store.breakdown().items():
            out[kind] = out.get(kind, 0) + n
    total = cache.nbytes()
    full = cache.full_nbytes()
    return {"bytes": out, "total": total, "full_cache": full, "ratio": total / full,
            "index_share": out.get("indices", 0) / total, "tokens": int(cache.seen.sum()),
            "compressor_weight_bytes": method.compressor_nbytes()}


def evaluate(args) -> dict:
    out = Path(args.out)
    lm = models.load(args.model, torch.bfloat16, "cuda" if torch.cuda.is_available() else "cpu")
    head_dim = lm.model.config.head_dim
    deltakv = {"checkpoint": args.checkpoint, **_params(args.method_arg)}
    summary: dict = {"model": lm.name, "deltakv_params": deltakv, "niah": {}, "fidelity": {}, "memory": {}}
    common = dict(model=args.model, out=str(out / "results"), batch_size=args.batch_size, dtype="bfloat16")

    def one(method, task, budget=1.0, params=None, task_params=None):
        t0 = time.perf_counter()
        cfg = RunConfig(method=method, task=task, budget=budget, method_params=params or {}, task_params=task_params or {},
                        data=args.haystack if task == "niah" else None, **common)
        run_dir = run(cfg, lm=lm, progress=False)
        m = _metrics(run_dir)
        m["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({k: m[k] for k in ("method", "task", "budget", "summary", "kv_ratio_prefill", "kv_ratio_end",
                                            "seconds")}), flush=True)
        return run_dir, m

    for length in args.lengths:
        tp = {"lengths": [length]}
        row = {}
        _, row["full"] = one("full", "niah", task_params=tp)
        d_dir, row["deltakv"] = one("deltakv", "niah", params=deltakv, task_params=tp)
        budget = snapkv_budget(_records(d_dir), row["deltakv"]["kv_ratio_prefill"], head_dim, 2)
        _, row["snapkv"] = one("snapkv", "niah", budget=budget, task_params=tp)
        summary["niah"][length] = row
        method = registry.build_method("deltakv", 1.0, deltakv)
        task = registry.build_task("niah", {"lengths": [length], "depths": [0.5]})
        sample = task.samples(lm.tokenizer, TaskContext(max_context_tokens=lm.window - 512, data=args.haystack))[0]
        summary["memory"][length] = breakdown(lm, method, sample)
        print(json.dumps({"memory": length, **summary["memory"][length]}), flush=True)
    fp = {"context_len": args.fidelity_context, "n_samples": args.fidelity_samples}
    d_dir, summary["fidelity"]["deltakv"] = one("deltakv", "fidelity", params=deltakv, task_params=fp)
    budget = snapkv_budget(_records(d_dir), summary["fidelity"]["deltakv"]["kv_ratio_prefill"], head_dim, 2)
    _, summary["fidelity"]["snapkv"] = one("snapkv", "fidelity", budget=budget, task_params=fp)
    return summary


def throughput(args) -> dict:
    cuda = torch.cuda.is_available()
    lm = models.load(args.preset, torch.bfloat16 if cuda else torch.float32, "cuda" if cuda else "cpu",
                     random_weights=True)
    results = {"preset": args.preset, "context": args.context, "methods": {},
               "device": torch.cuda.get_device_name() if cuda else "cpu"}
    ids = torch.randint(10, lm.model.config.vocab_size, (args.context,), generator=torch.Generator().manual_seed(0))
    runs = [(name, {}) for name in args.methods if name != "deltakv"]
    if "deltakv" in args.methods:  # one run per decode-time keep (a fraction, or a count of tokens when > 1)
        keeps = args.keep or [None]
        runs += [("deltakv" if k is None or len(keeps) == 1 else f"deltakv(keep={k:g})",
                  {**_params(args.method_arg), **({"keep": k} if k is not None else {})}) for k in keeps]
    for name, params in runs:
        method = registry.build_for_timing(name.split("(")[0], 1.0, params)
        engine = Engine(lm, method)
        engine.eos = set()  # every sequence decodes every step
        free_memory()
        t0 = time.perf_counter()
        cache, first, info = engine.prefill(Sample("p", ids.tolist(), [], [], 0))
        sync(engine.device)
        prefill_s = time.perf_counter() - t0
        per_seq = cache.nbytes()
        batch = args.batch or max(1, int(torch.cuda.mem_get_info()[0] * 0.97 // per_seq))
        rec = {"prefill_s": round(prefill_s, 2), "kv_bytes_per_seq": per_seq, "full_bytes_per_seq": cache.full_nbytes(),
               "kv_ratio": per_seq / cache.full_nbytes(), "tries": []}
        if name.startswith("deltakv"):
            rec["compressor_weight_bytes"] = method.compressor_nbytes()
            rec["deltakv"] = {k: getattr(method, k) for k in ("sinks", "window", "keep", "latent_dtype", "index_dtype")}
            rec["deltakv"].update(r=method.latent_dim_, I=method.intermediate_, s=method.stride_, k=method.neighbors_,
                                  full_layers=sorted(method.full_set))
        while batch >= 1:
            try:
                rec.update(_decode_timing(engine, cache, first, batch, args.warmup, args.steps))
                rec["batch"] = batch
                break
            except torch.cuda.OutOfMemoryError as e:
                rec["tries"].append({"batch": batch, "error": str(e).splitlines()[0][:160]})
                free_memory()
                batch = int(batch * 0.92)
        if args.cprofile and name.startswith("deltakv") and "batch" in rec:
            _profile(engine, cache, first, rec["batch"], args.cprofile, host=True)
        if args.profile and name.startswith("deltakv") and "batch" in rec:  # replayed steps show as kernels only
            _profile(engine, cache, first, rec["batch"], args.profile)
        print(json.dumps({name: rec}), flush=True)
        results["methods"][name] = rec
        del cache, first, engine
        free_memory()
    timed = {n: m["tokens_per_s"] for n, m in results["methods"].items() if "tokens_per_s" in m}
    if "full" in timed:
        for n, tps in timed.items():
            if n != "full":
                results[f"ratio_{n}_over_full"] = tps / timed["full"]
                print(f"{n}: {tps:.1f} tokens/s at batch {results['methods'][n]['batch']}, "
                      f"{tps / timed['full']:.2f}x full's {timed['full']:.1f} (batch "
                      f"{results['methods']['full']['batch']})", flush=True)
    return results


def _decode_timing(engine, cache, first, batch: int, warmup: int, steps: int) -> dict:
    """Two ``Engine.decode`` calls on one batch (the engine's path: CUDA graphs replayed while the method's
    ``decode_epoch`` holds): ``warmup`` steps (kernels compile), then ``steps`` timed ones, the whole call."""
    from kvbench.cache import KVCache
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    work = KVCache.concat([cache] * batch) if batch > 1 else cache.clone()
    held = work.nbytes()
    try:
        engine.decode(work, first.repeat(batch, 1), [warmup + 1] * batch, [False] * batch, 0)
        _, info = engine.decode(work, first.repeat(batch, 1), [steps + 1] * batch, [False] * batch, 0)
    finally:
        del work
    dt, n = info["decode_s"], info["decode_steps"]
    return {"tokens_per_s": batch * n / dt, "step_ms": 1000 * dt / n, "steps_timed": n, "warmup": warmup,
            "cuda_graph": info.get("cuda_graph", False), "kv_bytes_batch": held,
            "peak_allocated": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}


def _profile(engine, cache, first, batch: int, steps: int, host: bool = False) -> None:
    """Where ``steps`` decoding steps' time goes, after a warm-up call: the torch profiler's top kernels and
    ops, or (``host``) cProfile's top Python functions."""
    import cProfile
    import pstats
    from torch.profiler import ProfilerActivity, profile
    from kvbench.cache import KVCache
    work = KVCache.concat([cache] * batch) if batch > 1 else cache.clone()
    engine.decode(work, first.repeat(batch, 1), [3] * batch, [False] * batch, 0)  # compiled, warm
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = cProfile.Profile() if host else profile(activities=activities)
    with prof:
        _, info = engine.decode(work, first.repeat(batch, 1), [steps + 1] * batch, [False] * batch, 0)
    del work
    print(f"profile: {info['decode_steps']} steps in {info['decode_s']:.3f} s", flush=True)
    if host:
        stats = pstats.Stats(prof)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(40)
        return
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60), flush=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval")
    e.add_argument("--model", required=True)
    e.add_argument("--artifact", "--checkpoint", dest="checkpoint", required=True)
    e.add_argument("--haystack", required=True)
    e.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    e.add_argument("--batch-size", type=int, default=5)
    e.add_argument("--fidelity-context", type=int, default=2048)
    e.add_argument("--fidelity-samples", type=int, default=8)
    e.add_argument("--out", required=True)
    e.add_argument("-m", "--method-arg", action="append", default=[])
    t = sub.add_parser("throughput")
    t.add_argument("--preset", default="llama-3.1-8b")
    t.add_argument("--context", type=int, default=32768)
    t.add_argument("--methods", nargs="+", default=["full", "deltakv"])
    t.add_argument("--warmup", type=int, default=8)
    t.add_argument("--steps", type=int, default=128)
    t.add_argument("--batch", type=int, default=None, help="a fixed batch (default: the largest that fits, CUDA)")
    t.add_argument("--profile", type=int, default=0, help="then profile this many decoding steps of deltakv")
    t.add_argument("--cprofile", type=int, default=0, help="then profile the host over this many decoding steps")
    t.add_argument("--keep", type=float, nargs="+", default=None,
                   help="deltakv's decode-time keep, one run each (a fraction, or a token count when > 1)")
    t.add_argument("--out", required=True)
    t.add_argument("-m", "--method-arg", action="append", default=[])
    args = ap.parse_args()
    result = evaluate(args) if args.cmd == "eval" else throughput(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"deltakv-{args.cmd}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
