"""``kvbench bench``: decoding throughput and memory of kvbench against its peers, on the same inputs.

One invocation measures, on the device it runs on:

- kvbench points: context lengths x methods x budgets x batch sizes, each through ``Engine.generate`` (the
  path ``kvbench run`` takes: sequences prefilled one at a time, joined, decoded together). Per point:
  prefill time (all sequences), time to first token, decode time per token, decode tokens/s, peak memory
  (allocated and reserved on CUDA, resident on the CPU) and the KV bytes each sequence holds.
- the largest batch that fits, per (context, method, budget), on CUDA: a line through the measured peak
  memory of two or more batch sizes predicts it; it is then run in full, and after an out-of-memory error
  run at what the line through the reserved peaks predicts (the allocator's fragmentation included) or 5%
  less, so the reported batch is one that really ran.
- peers, each in its own Python process (``python -m kvbench.bench --peer SPEC``) on the same token ids:
  ``hf``, transformers ``generate`` with its default dynamic cache and SDPA attention; ``kvpress``, the
  kvpress presses with the same method and kept fraction, prefilled and decoded the way kvpress's own
  pipeline does (``model.model`` under the press, then a greedy loop of forward calls), batched. kvpress
  pins transformers below 5.3, so its process runs with ``--kvpress-path`` (a directory holding
  transformers 5.2 and kvpress) first on ``PYTHONPATH``. A peer that cannot be imported is recorded as
  absent, with the error.
- the floor of a decoding step: the bytes a step must read (the weights, without the input embedding table
  unless it is tied to the output layer, plus the keys and values held) over the measured copy bandwidth
  (a device-to-device copy, bytes read plus bytes written); each point's time per token is reported as a
  multiple of it.
- chunked prefill (``--chunked-prefill N``): the peak memory of prefilling N tokens with compression
  every ``--prefill-chunk`` tokens, against a full-cache prefill of the same tokens in one pass.

Choices: every point decodes exactly ``new_tokens`` tokens (EOS is ignored: the kvbench engine's stop set
is emptied, the peers get ``min_new_tokens``), so all implementations do the same work. Prompts are
random token ids (seeded; the same ids for every implementation). A random-weight preset draws its
weights in each process with the same seed; their values change neither time nor memory. Decode tokens/s
counts the tokens produced after the first (the first comes out of the prefill) over the time after it.
The floor's KV bytes are what the method holds on average over the decoding: for kvbench's points the mean
of the bytes its stores hold per sequence after the prefill and at the end (measured: a codec's codes, a
decode-time evictor held at its budget, a method that ignores the budget keeping every token); for the peers'
plain caches, full-size keys and values of the kept tokens plus half the generated ones.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvbench import results

KVPRESS_PRESSES = {  # kvbench method -> (kvpress class, {kvbench parameter: kvpress parameter})
    "snapkv": ("SnapKVPress", {"window": "window_size", "kernel": "kernel_size"}),
    "streamingllm": ("StreamingLLMPress", {"sinks": "n_sink"}),
    "knorm": ("KnormPress", {}),
    "tova": ("TOVAPress", {}),
    "pyramidkv": ("PyramidKVPress", {"window": "window_size", "kernel": "kernel_size"}),
}
GIB = 1024 ** 3


@dataclass
class BenchConfig:
    model: str | None = None  # a model spec (real weights); None: the random-weight ``preset``
    preset: str | None = None  # None: llama-3.1-8b on CUDA, tiny-llama on the CPU
    contexts: list[int] = field(default_factory=lambda: [32768])
    batches: list[int] = field(default_factory=lambda: [1, 8])
    methods: list[str] = field(default_factory=lambda: ["full", "snapkv"])
    budgets: list[float] = field(default_factory=lambda: [0.25])
    new_tokens: int = 256
    largest_batch: bool = True
    compile_decode: bool = False  # the decoding step through torch.compile (kvbench.engine.Engine.compile_decode)
    skinny_gemm: bool = False  # the model's linear layers of <= 16 rows through kvbench.kernels.skinny_gemm
    freeze_weights: bool = False  # the compiled decoding step with the weights as constants (Engine.freeze)
    pdl: bool = False  # programmatic dependent launch (KVBENCH_PDL=1 for the bench's run; kernels/NOTES.md)
    peers: list[str] = field(default_factory=lambda: ["hf", "kvpress"])
    kvpress_path: str | None = None
    chunked_prefill: int | None = None
    prefill_chunk: int = 4096
    chunk_method: str = "snapkv"
    chunk_budget: float = 0.25
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    time_limit: float | None = None  # seconds; points after it are recorded as skipped
    out: str | None = None


class BenchError(ValueError):
    """A bench configuration that cannot run; the CLI prints it as one line."""


# ---- shared by the main process and the peers (which import no kvbench module before their own peer) ----

def prompt_ids(seed: int, context: int, n: int, vocab: int):
    """The ``n`` prompts of length ``context``: rows of one seeded draw, so a smaller batch is a prefix."""
    import torch
    g = torch.Generator().manual_seed(seed * 1_000_003 + context)
    low = min(10, vocab - 1)
    return torch.randint(low, vocab, (n, context), generator=g)


def peak_of(*phases: dict) -> dict:
    keys = {k for p in phases for k in p}
    return {k: max(p.get(k, 0) for p in phases) for k in keys}


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"


# ---- the peers (run in their own processes) ----------------------------------------------------------

def _peer_model(spec: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    dtype = getattr(torch, spec["dtype"])
    if spec.get("preset_config"):
        cfg = dict(spec["preset_config"])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        torch.manual_seed(spec["seed"])
        with torch.device(spec["device"]):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=dtype, attn_implementation="sdpa")
        model = model.to(spec["device"])
    return model.eval()


def _hf_point(model, ids, new_tokens: int, cuda: bool) -> dict:
    """transformers ``generate`` (greedy, default DynamicCache), timed around its first token."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from kvbench.models import output_cache
    from kvbench.engine import PeakMemory, sync

    class FirstToken(LogitsProcessor):
        # Called once per generated token; the first call comes right after the prefill forward.
        def __init__(self):
            self.t = None
            self.prefill_peak = None
            self.peak = PeakMemory(ids.device)

        def __call__(self, input_ids, scores):
            if self.t is None:
                sync("cuda" if cuda else "cpu")
                self.t = time.perf_counter()
                self.prefill_peak = self.peak.read()
                self.peak = PeakMemory(ids.device)  # the decoding phase from here
            return scores

    first = FirstToken()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             logits_processor=LogitsProcessorList([first]), return_dict_in_generate=True)
    sync("cuda" if cuda else "cpu")
    t_end = time.perf_counter()
    decode_peak = first.peak.read()
    produced = out.sequences.shape[1] - ids.shape[1]
    kv = _dynamic_cache_bytes(output_cache(out)) / ids.shape[0]
    return _peer_record(ids, first.t - t0, t_end - first.t, produced - 1, first.prefill_peak, decode_peak, kv)


def _dynamic_cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total


def _peer_record(ids, ttft: float, decode_s: float, steps: int, prefill_peak: dict, decode_peak: dict,
                 kv_seq: float) -> dict:
    batch = ids.shape[0]
    return {"status": "ok", "prefill_s": ttft, "ttft_s": ttft, "decode_s": decode_s, "decode_steps": steps,
            "tpot_s": decode_s / max(steps, 1), "decode_tok_s": batch * steps / max(decode_s, 1e-9),
            "peak_prefill": prefill_peak, "peak_decode": decode_peak, "peak": peak_of(prefill_peak, decode_peak),
            "kv_bytes_seq": kv_seq}


def _kvpress_point(model, press, ids, new_tokens: int, cuda: bool) -> dict:
    """kvpress's pipeline, batched: the context (all but the last token) prefilled by ``model.model`` under
    the press, then the last token and a greedy loop of forward calls on the compressed DynamicCache."""
    import torch
    from transformers import DynamicCache

    from kvbench.models import cache_argument
    from kvbench.engine import PeakMemory, sync
    peak = PeakMemory(ids.device)
    context, last = ids[:, :-1], ids[:, -1:]
    n = ids.shape[1] - 1
    t0 = time.perf_counter()
    with torch.no_grad():
        cache = DynamicCache()
        with press(model):
            model.model(input_ids=context, **cache_argument(model.model, cache))
        position = torch.full((ids.shape[0], 1), n, device=ids.device)
        logits = model(input_ids=last, **cache_argument(model, cache), position_ids=position, logits_to_keep=1).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        sync("cuda" if cuda else "cpu")
        t_first = time.perf_counter()
        prefill_peak = peak.read()
        peak = PeakMemory(ids.device)
        for i in range(new_tokens - 1):
            logits = model(input_ids=nxt, **cache_argument(model, cache), position_ids=position + 1 + i).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
        sync("cuda" if cuda else "cpu")
    t_end = time.perf_counter()
    decode_peak = peak.read()
    kv = _dynamic_cache_bytes(cache) / ids.shape[0]
    return _peer_record(ids, t_first - t0, t_end - t_first, new_tokens - 1, prefill_peak, decode_peak, kv)


def _make_press(kvpress, method: str, budget: float, method_params: dict):
    cls_name, param_map = KVPRESS_PRESSES[method]
    kwargs = {param_map[k]: v for k, v in method_params.items() if k in param_map}
    return getattr(kvpress, cls_name)(compression_ratio=1.0 - float(budget), **kwargs), kwargs


def peer_main(spec_path: str) -> None:
    """Entry point of a peer process: runs the points of a spec file, one JSON line per point."""
    from kvbench.engine import free_memory, is_oom
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    base = {"impl": spec["peer"]}

    def emit(rec: dict) -> None:
        with open(out, "a") as f:
            f.write(json.dumps({**base, **rec}) + "\n")

    try:
        import torch
        import transformers
        from safetensors.torch import load_file
        kvpress = None
        if spec["peer"] == "kvpress":
            import kvpress  # noqa: F811
            base["version"] = getattr(kvpress, "__version__", None) or _dist_version("kvpress")
        base["transformers"] = transformers.__version__
    except Exception as e:  # the peer is absent: say so, never substitute another implementation
        for point in spec["points"]:
            emit({**point, "status": "absent", "error": _error_text(e)})
        return
    cuda = spec["device"].startswith("cuda")
    model = _peer_model(spec)
    prompts = load_file(spec["prompts"])
    warm = prompts[f"context_{min(p['context'] for p in spec['points'])}"][:1, : spec["warmup_tokens"]]
    for point in [None] + spec["points"]:  # the first pass warms up kernels and allocator, unrecorded
        ids = (warm if point is None else prompts[f"context_{point['context']}"][: point["batch"]]).to(spec["device"])
        new = 4 if point is None else spec["new_tokens"]
        try:
            if spec["peer"] == "hf":
                rec = _hf_point(model, ids, new, cuda)
            else:
                method = spec["method"] if point is None else point["method"]
                budget = spec["budget"] if point is None else point["budget"]
                press, used = _make_press(kvpress, method, budget, spec["method_params"].get(method, {}))
                rec = _kvpress_point(model, press, ids, new, cuda)
                rec["press"] = {"class": type(press).__name__, "compression_ratio": 1.0 - float(budget), **used}
        except Exception as e:
            rec = {"status": "oom" if is_oom(e) else "error", "error": _error_text(e)}
        del ids
        free_memory()
        if point is not None:
            emit({**point, **rec})


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


# ---- the main process ----------------------------------------------------------------------------------

class Bench:
    def __init__(self, cfg: BenchConfig, echo=print):
        import torch
        from kvbench import models
        from kvbench.engine import resolve_device, resolve_dtype
        self.cfg, self.echo = cfg, echo
        self.device = resolve_device(cfg.device)
        self.cuda = self.device.startswith("cuda")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise BenchError(f"unknown --device '{cfg.device}': give auto, cpu, cuda or cuda:N") from None
        if self.cuda and not torch.cuda.is_available():
            raise BenchError(f"--device {cfg.device}: no CUDA device is available here (use --device cpu)")
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if cfg.model is None:
            self.preset = cfg.preset or ("llama-3.1-8b" if self.cuda else "tiny-llama")
            if self.preset not in models.PRESETS:
                raise BenchError(f"unknown preset '{self.preset}'; known: {', '.join(sorted(models.PRESETS))}")
        else:
            self.preset = None
        if not cfg.contexts or not cfg.batches or not cfg.methods:
            raise BenchError("give at least one context length, batch size and method")
        if min(cfg.contexts) < 2 or min(cfg.batches) < 1 or cfg.new_tokens < 2:
            raise BenchError("contexts need at least 2 tokens, batches at least 1, --new-tokens at least 2")
        if cfg.freeze_weights and not cfg.compile_decode:
            raise BenchError("--freeze-weights freezes the compiled decoding step: add --compile")
        for p in cfg.peers:
            if p not in ("hf", "kvpress"):
                raise BenchError(f"unknown peer '{p}'; peers are hf and kvpress")
        from kvbench import registry
        from kvbench.engine import compile_mode
        compile_mode()  # a KVBENCH_COMPILE_MODE it cannot use fails here, before loading
        from kvbench import engine
        from kvbench.kernels.decode_attention import pdl_enabled
        if cfg.compile_decode and pdl_enabled() and not engine.inductor_has_pdl():
            raise BenchError(f"--pdl with --compile needs inductor's triton.enable_pdl (torch >= 2.9; this is "
                             f"{torch.__version__}): upgrade torch or drop --pdl")
        for m in cfg.methods + ([cfg.chunk_method] if cfg.chunked_prefill else []):
            registry.build_for_timing(m, 0.5 if m != results.FULL else 1.0)  # unknown names fail here, before loading
        name = self.preset or Path(cfg.model).name
        self.out = Path(cfg.out or f"results/bench/{name}-{self.device.split(':')[0]}")
        if self.out.exists() and not self.out.is_dir():
            raise BenchError(f"--out {self.out} is a file: give a directory for the bench results")
        self.out.mkdir(parents=True, exist_ok=True)
        # Records go to a partial file, renamed over bench.jsonl when the bench ends: a bench that is killed
        # or fails leaves the previous bench.jsonl whole.
        self.final_path = self.out / "bench.jsonl"
        self.records_path = self.out / "bench.jsonl.partial"
        self.records_path.write_text("")
        self.started = time.perf_counter()
        if cfg.model is None:
            lm = models.load(self.preset, self.dtype, self.device, random_weights=True, seed=cfg.seed)
        else:
            lm = models.load(cfg.model, self.dtype, self.device, seed=cfg.seed)
        self.lm = models.LoadedModel(lm.model, models.IdTokenizer(), lm.name, lm.window)
        if cfg.skinny_gemm:  # the decoding step's weight GEMMs through kvbench's kernel (prefill keeps cuBLAS)
            from kvbench.kernels.skinny_gemm import use_skinny_linear
            use_skinny_linear(self.lm.model)
        too_long = [c for c in cfg.contexts if c + cfg.new_tokens > self.lm.window]
        if too_long:
            raise BenchError(f"context {too_long[0]} + {cfg.new_tokens} new tokens exceeds the model's window "
                             f"of {self.lm.window} tokens")
        if cfg.chunked_prefill and cfg.chunked_prefill > self.lm.window:
            raise BenchError(f"--chunked-prefill {cfg.chunked_prefill} exceeds the model's window of {self.lm.window}")
        mc = self.lm.model.config
        head_dim = models.head_dim(mc)
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        self.kv_token_bytes = 2 * mc.num_hidden_layers * mc.num_key_value_heads * head_dim * itemsize
        self.weight_bytes = self._weight_bytes_read()
        self.vocab = mc.vocab_size

    # -- helpers --
    def _weight_bytes_read(self) -> int:
        model = self.lm.model
        seen, total = set(), 0
        for p in model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        tied = head is not None and head.weight is emb.weight
        if not tied:  # a step reads only B rows of the input table
            total -= emb.weight.numel() * emb.weight.element_size()
        return total

    def emit(self, rec: dict) -> dict:
        with open(self.records_path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        return rec

    def out_of_time(self) -> bool:
        return self.cfg.time_limit is not None and time.perf_counter() - self.started > self.cfg.time_limit

    def kept_tokens(self, method: str, budget, context: int) -> int:
        if method == results.FULL:
            return context
        import torch

        from kvbench.cache import fraction_target
        return int(fraction_target(budget, torch.tensor([context]))[0])

    def floor_s(self, method: str, budget, context: int, batch: int, bandwidth: float,
                kv_seq: float | None = None) -> float:
        """``kv_seq``: the bytes a sequence holds on average over the decoding, as measured; without it (the
        peers' plain caches) full-size keys and values of the kept tokens plus half the generated ones."""
        if kv_seq is None:
            kv_seq = self.kv_token_bytes * (self.kept_tokens(method, budget, context) + (self.cfg.new_tokens - 1) / 2)
        return (self.weight_bytes + batch * kv_seq) / bandwidth

    def method_points(self) -> list[tuple[str, float | int]]:
        from kvbench.method import parse_budget
        points = []
        for m in self.cfg.methods:
            for b in ([1.0] if m == results.FULL else [parse_budget(x) for x in self.cfg.budgets]):
                if (m, b) not in points:
                    points.append((m, b))
        return points

    # -- measurements --
    def bandwidth(self) -> float:
        from kvbench.engine import free_memory, sync
        import torch
        n = (1 << 30) if self.cuda else (1 << 27)
        x = torch.randn(n // 4, device=self.device, dtype=torch.float32)
        y = torch.empty_like(x)
        times = []
        for i in range(13):
            sync(self.device)
            t0 = time.perf_counter()
            y.copy_(x)
            sync(self.device)
            if i >= 3:
                times.append(time.perf_counter() - t0)
        del x, y
        free_memory()
        times.sort()
        return 2 * n / times[len(times) // 2]

    def kvbench_point(self, method: str, budget, context: int, batch: int, new_tokens: int | None = None) -> dict:
        from kvbench import registry
        from kvbench.engine import Engine, free_memory, is_oom
        from kvbench.task import Sample
        new = new_tokens or self.cfg.new_tokens
        ids = prompt_ids(self.cfg.seed, context, batch, self.vocab)
        samples = [Sample(f"b{i}", ids[i].tolist(), [], [], new) for i in range(batch)]
        del ids
        engine = Engine(self.lm, registry.build_for_timing(method, budget), compile_decode=self.cfg.compile_decode,
                        freeze=self.cfg.freeze_weights)
        engine.eos = set()  # exactly ``new`` tokens, like the peers' min_new_tokens
        failure = None
        try:
            if self.cfg.compile_decode:  # compiling happens here, not in the timed decoding (dynamo keeps it)
                engine.generate([Sample(s.id, s.context_ids[:64], [], [], 4) for s in samples], trace_every=0)
            recs = engine.generate(samples, trace_every=0)
        except Exception as e:  # recorded (an out-of-memory error is a result), and the bench goes on
            failure = {"status": "oom" if is_oom(e) else "error", "error": _error_text(e)}
        if failure:  # outside the handler: the exception's frames (and their tensors) are gone by now
            del engine, samples
            free_memory()
            return failure
        r = recs[0]
        steps = r["decode_steps"]
        phases = [r["peak_prefill"], r.get("peak_batching", {}), r["peak_decode"]]
        rec = {"status": "ok", "prefill_s": sum(x["prefill_s"] for x in recs),
               "ttft_s": sum(x["prefill_s"] for x in recs), "compress_s": sum(x["compress_s"] for x in recs),
               "decode_s": r["decode_s"], "decode_steps": steps, "tpot_s": r["decode_s"] / max(steps, 1),
               "tpot_steady_s": r.get("tpot_steady_s"), "cuda_graph": r.get("cuda_graph"),
               "graph_error": r.get("graph_error"),
               "decode_tok_s": batch * steps / max(r["decode_s"], 1e-9), "peak_prefill": r["peak_prefill"],
               "peak_batching": r.get("peak_batching"), "peak_decode": r["peak_decode"], "peak": peak_of(*phases),
               "kv_bytes_seq": sum(x["kv_bytes_end"] for x in recs) / batch,
               "kv_bytes_prefill_seq": sum(x["kv_bytes_prefill"] for x in recs) / batch,
               "kv_ratio_end": sum(x["kv_ratio_end"] for x in recs) / batch}
        del recs, engine, samples
        free_memory()
        return rec

    def capacity(self) -> int:
        from kvbench.engine import free_memory
        import torch
        free_memory()
        free, _total = torch.cuda.mem_get_info()
        return free + torch.cuda.memory_reserved()

    def run(self) -> list[dict]:
        import torch
        cfg = self.cfg
        from kvbench.engine import compile_mode
        from kvbench.kernels.decode_attention import pdl_kwargs
        env = {"kind": "env", "device": self.device, "device_name": torch.cuda.get_device_name() if self.cuda else
               (os.uname().machine + " CPU"), "torch": torch.__version__, "model": self.lm.name,
               "dtype": str(self.dtype).replace("torch.", ""), "new_tokens": cfg.new_tokens,
               "weight_bytes_read": self.weight_bytes, "kv_token_bytes": self.kv_token_bytes, "config": asdict(cfg)}
        import transformers
        env["transformers"] = transformers.__version__
        env["compile_mode"] = compile_mode() if cfg.compile_decode else None
        # in effect, not only asked for: KVBENCH_PDL=1 on a GPU of compute capability 9 or more (kernels/NOTES.md)
        env["pdl"] = pdl_kwargs(torch.empty(0, device=self.device))["PDL"]
        bw = self.bandwidth()
        env["copy_bandwidth"] = bw
        self.emit(env)
        self.echo(f"device {env['device_name']}; copy bandwidth {bw / 1e9:.0f} GB/s; weights read per step "
                  f"{self.weight_bytes / GIB:.3g} GiB; KV {self.kv_token_bytes / 1024:.3g} KiB/token")
        # Warm-up: Triton kernels compile and the allocator grows outside the measured points.
        for method, budget in self.method_points():
            self.kvbench_point(method, budget, min(cfg.contexts[0], 512), 1, new_tokens=4)
        # The first prefill at a length builds its attention plans (cuDNN: 3 s at 32k on the H200, 2026-12-02), and
        # the first decoding step at a batch compiles the decode kernel's variant for its tiles (Triton picks wider
        # tiles and more segments past 2,048 slots a work item; most likely the ~1 s that full's and snapkv's first
        # batch-8 point at 32k paid, TPOT 1.35-2.1x the floor against 1.09-1.38x steady): either would land in
        # whichever method is measured first there. A method's own kernels have size-dependent variants too (the
        # decode-time evictors' argmin splits its search past 1,024 slots, and Triton specialises integer
        # arguments by their divisibility): tova's, h2o's and streamingllm's first points at 32k paid 0.3-0.8 s
        # more before their steady state than snapkv's (TPOT against steady, bench-evictors-83f073e), so every
        # method warms at every (context, batch): one prefill and one eager decoding step each.
        for context in cfg.contexts:
            for batch in cfg.batches:
                for method, budget in self.method_points():
                    self.kvbench_point(method, budget, context, batch, new_tokens=2)
        points = []
        for context in cfg.contexts:
            for method, budget in self.method_points():
                for batch in cfg.batches:
                    points.append(self._measured("kvbench", method, budget, context, batch, bw))
        peer_recs = self.run_peers(bw)
        chunked = self.chunked_prefill() if cfg.chunked_prefill else []
        largest = self.largest_batches(points, bw) if cfg.largest_batch else []
        records = [env] + points + peer_recs + largest + chunked
        records.append(self.emit({"kind": "comparisons", "rows": comparisons(records)}))
        os.replace(self.records_path, self.final_path)
        write_table(self.out / "bench.md", records)
        return records

    def _measured(self, impl: str, method: str, budget, context: int, batch: int, bw: float,
                  kind: str = "point") -> dict:
        base = {"kind": kind, "impl": impl, "method": method, "budget": budget, "context": context, "batch": batch}
        if self.out_of_time():
            return self.emit({**base, "status": "skipped", "error": "time limit reached"})
        self.echo(f"kvbench {method}@{budget} context {context} batch {batch} ...")
        rec = {**base, **self.kvbench_point(method, budget, context, batch)}
        return self.emit(self._with_floor(rec, bw))

    def _with_floor(self, rec: dict, bw: float) -> dict:
        held = None  # what kvbench's method holds (a codec's codes, a decode-time evictor's budget), measured
        if rec.get("kv_bytes_prefill_seq") is not None and rec.get("kv_bytes_seq") is not None:
            held = (rec["kv_bytes_prefill_seq"] + rec["kv_bytes_seq"]) / 2
        floor = self.floor_s(rec["method"], rec["budget"], rec["context"], rec["batch"], bw, held)
        rec["floor_s"] = floor
        if rec.get("status") == "ok":
            rec["x_floor"] = rec["tpot_s"] / floor
            if rec.get("tpot_steady_s"):
                rec["x_floor_steady"] = rec["tpot_steady_s"] / floor
        self.echo("  " + _line(rec))
        return rec

    def run_peers(self, bw: float) -> list[dict]:
        from kvbench.engine import free_memory
        from safetensors.torch import save_file
        from kvbench import models
        cfg = self.cfg
        if not cfg.peers:
            return []
        # Beside the output: results/bench/tmp/<name> (git-ignored) holds the prompts and the peers' raw output.
        tmp = self.out.parent / "tmp" / self.out.name
        tmp.mkdir(parents=True, exist_ok=True)
        prompts = tmp / "prompts.safetensors"
        n = max(cfg.batches)
        save_file({f"context_{c}": prompt_ids(cfg.seed, c, n, self.vocab).contiguous() for c in cfg.contexts},
                  str(prompts))
        compressing = [(m, b) for m, b in self.method_points() if m in KVPRESS_PRESSES]
        method_params = {}
        for m, _ in compressing:
            from kvbench import registry
            params = asdict(registry.build_for_timing(m, 0.5))
            method_params[m] = {k: v for k, v in params.items() if not isinstance(v, (dict, list))}
        spec_base = {"device": self.device, "dtype": str(self.dtype).replace("torch.", ""), "seed": cfg.seed,
                     "new_tokens": cfg.new_tokens, "prompts": str(prompts), "warmup_tokens": min(cfg.contexts[0], 512),
                     "preset_config": models.PRESETS[self.preset] if self.preset else None,
                     "model_path": None if self.preset else str(self.lm.model.config._name_or_path),
                     "method_params": method_params}
        out = []
        # The peers get the device to themselves: this process's weights wait on the host meanwhile.
        self.lm.model.to("cpu")
        free_memory()
        for peer in cfg.peers:
            if peer == "hf":
                pts = [{"kind": "point", "method": "full", "budget": 1.0, "context": c, "batch": b}
                       for c in cfg.contexts for b in cfg.batches]
                extra = {}
            else:
                pts = [{"kind": "point", "method": m, "budget": bud, "context": c, "batch": b}
                       for c in cfg.contexts for m, bud in compressing for b in cfg.batches]
                extra = {"method": compressing[0][0], "budget": compressing[0][1]} if compressing else {}
            if not pts:
                continue
            out += self._run_peer(peer, {**spec_base, **extra, "peer": peer, "points": pts}, tmp, bw)
        self.lm.model.to(self.device)
        return out

    def _run_peer(self, peer: str, spec: dict, tmp: Path, bw: float) -> list[dict]:
        from kvbench.engine import free_memory
        if self.out_of_time():
            return [self.emit({**p, "impl": peer, "status": "skipped", "error": "time limit reached"})
                    for p in spec["points"]]
        spec_path, out_path = tmp / f"{peer}.json", tmp / f"{peer}.jsonl"
        out_path.write_text("")
        spec["out"] = str(out_path)
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ)
        if peer == "kvpress":
            path = self.cfg.kvpress_path or os.environ.get("KVBENCH_KVPRESS_PATH")
            if path:
                env["PYTHONPATH"] = os.pathsep.join([path] + [p for p in [env.get("PYTHONPATH")] if p])
        self.echo(f"peer {peer}: {len(spec['points'])} points in its own process ...")
        timeout = None
        if self.cfg.time_limit is not None:
            timeout = max(30.0, self.cfg.time_limit - (time.perf_counter() - self.started))
        free_memory()
        try:
            proc = subprocess.run([sys.executable, "-m", "kvbench.bench", "--peer", str(spec_path)], env=env,
                                  capture_output=True, text=True, timeout=timeout)
            failure = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["exit " + str(proc.returncode)])[-1]
        except subprocess.TimeoutExpired:
            failure = "time limit reached"
        done = results.read_jsonl(out_path)
        seen = {(r["context"], r["batch"], r["method"], r["budget"]) for r in done}
        for p in spec["points"]:  # points the process never reached (it crashed or ran out of time)
            if (p["context"], p["batch"], p["method"], p["budget"]) not in seen:
                done.append({**p, "impl": peer, "status": "error", "error": failure or "no result"})
        return [self.emit(self._with_floor(r, bw)) for r in done]

    def largest_batches(self, points: list[dict], bw: float) -> list[dict]:
        if not self.cuda:
            self.echo("largest batch: measured on CUDA only (the CPU has no fixed memory to fill)")
            return []
        out = []
        for context in self.cfg.contexts:
            for method, budget in self.method_points():
                ok = [p for p in points if p["status"] == "ok" and p["context"] == context
                      and p["method"] == method and p["budget"] == budget]
                base = {"kind": "largest_batch", "impl": "kvbench", "method": method, "budget": budget,
                        "context": context}
                if len({p["batch"] for p in ok}) < 2:
                    out.append(self.emit({**base, "status": "error",
                                          "error": "needs two batch sizes that ran, to fit memory against batch"}))
                    continue
                xs = [p["batch"] for p in ok]
                cap = self.capacity()
                slope, intercept = _line_fit(xs, [p["peak"]["allocated"] for p in ok])
                guess = _fitting_batch(slope, intercept, cap)
                model = {"bytes_per_sequence": slope, "fixed_bytes": intercept, "capacity": cap, "predicted": guess}
                if all(p["peak"].get("reserved") for p in ok):
                    r_slope, r_intercept = _line_fit(xs, [p["peak"]["reserved"] for p in ok])
                    model["predicted_reserved"] = _fitting_batch(r_slope, r_intercept, cap)
                rec, tried = largest_batch_search(
                    guess, model.get("predicted_reserved", guess),
                    lambda b: self._measured("kvbench", method, budget, context, b, bw, kind="largest_batch"))
                model["tried"] = tried
                rec["memory_model"] = model
                self.emit({**rec, "kind": "largest_batch_result"})
                out.append({**rec, "kind": "largest_batch_result"})
        return out

    def chunked_prefill(self) -> list[dict]:
        from kvbench import registry
        from kvbench.engine import Engine, PeakMemory, free_memory, is_oom
        from kvbench.method import parse_budget
        from kvbench.task import Sample
        cfg = self.cfg
        n = cfg.chunked_prefill
        sample = Sample("chunked", prompt_ids(cfg.seed, n, 1, self.vocab)[0].tolist(), [], [], 1)
        out = []
        for method, budget, chunk in (("full", 1.0, None), (cfg.chunk_method, parse_budget(cfg.chunk_budget),
                                                            cfg.prefill_chunk)):
            base = {"kind": "chunked_prefill", "impl": "kvbench", "method": method, "budget": budget,
                    "context": n, "prefill_chunk": chunk}
            if self.out_of_time():
                out.append(self.emit({**base, "status": "skipped", "error": "time limit reached"}))
                continue
            self.echo(f"prefill {n} tokens: {method}@{budget}, chunk {chunk} ...")
            engine = Engine(self.lm, registry.build_for_timing(method, budget), prefill_chunk=chunk,
                            compile_decode=self.cfg.compile_decode, freeze=self.cfg.freeze_weights)
            peak = PeakMemory(self.device)
            try:
                cache, _, info = engine.prefill(sample)
                rec = {**base, "status": "ok", "prefill_s": info["prefill_s"], "compress_s": info["compress_s"],
                       "peak": peak.read(), "kv_bytes": info["kv_bytes_compressed"]}
                del cache
            except Exception as e:
                if not is_oom(e):
                    raise
                rec = {**base, "status": "oom", "error": _error_text(e)}
            del engine
            free_memory()
            rec["weight_bytes"] = self.weight_bytes
            self.echo("  " + ", ".join(f"{k}={_fmt(v)}" for k, v in rec.items() if k not in ("kind", "impl")))
            out.append(self.emit(rec))
        return out


def _fitting_batch(bytes_per_sequence: float, fixed_bytes: float, capacity: float) -> int:
    return max(1, int((0.97 * capacity - fixed_bytes) / max(bytes_per_sequence, 1)))


def largest_batch_search(guess: int, cautious: int, run, attempts: int = 4) -> tuple[dict, list[str]]:
    """The largest batch that runs: ``guess`` first (the line through the allocated peaks), and after an
    out-of-memory error ``cautious`` (the line through the reserved peaks: what the allocator held, its
    fragmentation included) when that is smaller, else 5% less. Each attempt prefills every sequence, which at
    32k is minutes, so the second guess should be a safe one (why: results/kvcar/README.md, kvcar's largest
    batch). Returns the last attempt and what was tried."""
    batch, tried, rec = guess, [], None
    for _ in range(attempts):
        rec = run(batch)
        tried.append(f"{batch} {rec['status']}")
        if rec["status"] != "oom" or batch == 1:
            break
        batch = max(1, min(batch - max(1, batch // 20), cautious))
    return rec, tried


def _line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
    return slope, my - slope * mx


# ---- the table ----------------------------------------------------------------------------------------

def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def _peak_gib(rec: dict) -> float | None:
    peak = rec.get("peak") or {}
    v = results.peak_bytes(peak)
    return v / GIB if v is not None else None


def _line(rec: dict) -> str:
    if rec.get("status") != "ok":
        return f"{rec.get('impl')} {rec.get('method')}@{rec.get('budget')} batch {rec.get('batch')}: {rec.get('status')} " \
               f"({rec.get('error', '')})"
    return (f"{rec['impl']} {rec['method']}@{rec['budget']} ctx {rec['context']} batch {rec['batch']}: "
            f"prefill {rec['prefill_s']:.2f} s, TPOT {rec['tpot_s'] * 1e3:.2f} ms, {rec['decode_tok_s']:.1f} tok/s, "
            f"peak {_peak_gib(rec):.2f} GiB, {rec['x_floor']:.2f}x floor")


TABLE_COLUMNS = ["impl", "method", "budget", "context", "batch", "status", "prefill s", "TPOT ms", "decode tok/s",
                 "peak GiB", "KV/seq GiB", "floor ms", "x floor", "steady TPOT ms", "steady x floor"]


def table_rows(records: list[dict]) -> list[list[str]]:
    rows = []
    for r in records:
        if r.get("kind") not in ("point", "largest_batch_result"):
            continue
        ok = r.get("status") == "ok"
        label = r["impl"] + (" (largest batch)" if r["kind"] == "largest_batch_result" else "")
        rows.append([label, r["method"], _fmt(r["budget"]), str(r["context"]), str(r["batch"]),
                     r["status"] if ok else f"{r['status']}: {r.get('error', '')[:80]}",
                     f"{r['prefill_s']:.2f}" if ok else "", f"{r['tpot_s'] * 1e3:.2f}" if ok else "",
                     f"{r['decode_tok_s']:.1f}" if ok else "", f"{_peak_gib(r):.3g}" if ok else "",
                     f"{r['kv_bytes_seq'] / GIB:.3g}" if ok and r.get("kv_bytes_seq") is not None else "",
                     f"{r['floor_s'] * 1e3:.2f}" if r.get("floor_s") else "",
                     f"{r['x_floor']:.2f}" if ok else "",
                     f"{r['tpot_steady_s'] * 1e3:.2f}" if ok and r.get("tpot_steady_s") else "",
                     f"{r['x_floor_steady']:.2f}" if ok and r.get("x_floor_steady") else ""])
    return rows


def _find(records, **match) -> list[dict]:
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def comparisons(records: list[dict]) -> list[dict]:
    """Ratios between the measured points (kvbench against the peers, against the step floor, largest batches,
    chunked prefill), each ``{"what", "value"}``; a side that did not run gives no row. No goals: what a ratio
    should be is the project's business (results READMEs), not the product's."""
    rows = []
    pts = [r for r in records if r.get("kind") == "point" and r.get("status") == "ok"]
    for r in pts:
        if r["impl"] != "kvbench":
            continue
        tag = f"{results.point_label(r['method'], r['budget'])}, ctx {r['context']}, batch {r['batch']}"
        for hf in _find(pts, impl="hf", context=r["context"], batch=r["batch"]):
            if r["method"] == results.FULL:
                rows.append({"what": f"kvbench full / HF generate decode tok/s, ctx {r['context']}, batch {r['batch']}",
                             "value": r["decode_tok_s"] / hf["decode_tok_s"]})
            rows.append({"what": f"kvbench prefill (compression included) / HF prefill, {tag}",
                         "value": r["prefill_s"] / hf["prefill_s"]})
        rows.append({"what": f"kvbench TPOT / step floor, {tag}", "value": r["x_floor"]})
        if r.get("x_floor_steady"):
            rows.append({"what": f"same, steady state (after the warm-up step and graph capture), {tag}",
                         "value": r["x_floor_steady"]})
        if r["method"] not in (results.FULL, "snapkv"):  # a method's step beside snapkv's at the same budget
            for snap in _find(pts, impl="kvbench", method="snapkv", budget=r["budget"], context=r["context"],
                              batch=r["batch"]):
                rows.append({"what": f"kvbench TPOT / snapkv TPOT, {tag}",
                             "value": (r.get("tpot_steady_s") or r["tpot_s"])
                             / (snap.get("tpot_steady_s") or snap["tpot_s"])})
    largest = [r for r in records if r.get("kind") == "largest_batch_result" and r.get("status") == "ok"]
    for full in [r for r in largest if r["method"] == results.FULL]:
        for other in [r for r in largest if r["method"] != results.FULL and r["context"] == full["context"]]:
            tag = f"{other['method']}@{other['budget']} / full, ctx {full['context']}"
            rows.append({"what": f"largest batch {tag} ({other['batch']} / {full['batch']})",
                         "value": other["batch"] / full["batch"]})
            rows.append({"what": f"decode tok/s at own largest batch {tag}",
                         "value": other["decode_tok_s"] / full["decode_tok_s"]})
    for r in pts:
        if r["impl"] != "kvbench" or r["method"] == results.FULL:
            continue
        for kp in _find(pts, impl="kvpress", method=r["method"], budget=r["budget"], context=r["context"],
                        batch=r["batch"]):
            tag = f"{r['method']}@{r['budget']}, ctx {r['context']}, batch {r['batch']}"
            rows.append({"what": f"kvbench / kvpress decode tok/s, {tag}",
                         "value": r["decode_tok_s"] / kp["decode_tok_s"]})
            rows.append({"what": f"kvbench / kvpress peak memory, {tag}",
                         "value": _peak_gib(r) / _peak_gib(kp)})
    chunked = [r for r in records if r.get("kind") == "chunked_prefill" and r.get("status") == "ok"]
    full = [r for r in chunked if r["method"] == results.FULL]
    for r in [r for r in chunked if r["method"] != results.FULL]:
        for f in full:
            rows.append({"what": f"chunked prefill peak {r['method']}@{r['budget']} (chunk {r['prefill_chunk']}) / "
                                 f"full prefill peak, {r['context']} tokens", "value": _peak_gib(r) / _peak_gib(f)})
            wb = r.get("weight_bytes", 0) / GIB
            rows.append({"what": f"same, memory above the weights ({_peak_gib(r) - wb:.2f} / {_peak_gib(f) - wb:.2f} GiB)",
                         "value": (_peak_gib(r) - wb) / max(_peak_gib(f) - wb, 1e-9)})
    return rows


def comparison_rows(records: list[dict]) -> list[dict]:
    """The comparisons a bench recorded (older files call them "targets"), else computed from its points."""
    saved = next((r["rows"] for r in records if r.get("kind") in ("comparisons", "targets")), None)
    return [{"what": t["what"], "value": t["value"]} for t in saved] if saved is not None else comparisons(records)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render(records: list[dict]) -> str:
    env = next((r for r in records if r.get("kind") == "env"), {})
    parts = [f"# kvbench bench: {env.get('model', '?')} on {env.get('device_name', '?')}", "",
             f"{env.get('dtype')}, {env.get('new_tokens')} new tokens per sequence; torch {env.get('torch')}, "
             f"transformers {env.get('transformers')}. Copy bandwidth {env.get('copy_bandwidth', 0) / 1e9:.0f} GB/s "
             f"(read + write); a decoding step must read {env.get('weight_bytes_read', 0) / GIB:.3g} GiB of weights "
             f"plus {env.get('kv_token_bytes', 0) / 1024:.3g} KiB of keys and values per token held. kvbench's "
             f"decoding step is {'compiled (torch.compile)' if (env.get('config') or {}).get('compile_decode') else 'eager'}, "
             f"replayed as a CUDA graph where the method allows"
             + ("; its weight GEMMs of at most 16 rows through kvbench's skinny GEMM kernel"
                if (env.get('config') or {}).get('skinny_gemm') else "")
             + ("; its weights frozen into the compiled step (inductor fusing the linear layers that share an input where its patterns match)"
                if (env.get('config') or {}).get('freeze_weights') else "")
             + ("; its kernels launched with programmatic dependent launch (KVBENCH_PDL=1)" if env.get("pdl") else "")
             + ".", "",
             markdown(TABLE_COLUMNS, table_rows(records))]
    chunked = [r for r in records if r.get("kind") == "chunked_prefill"]
    if chunked:
        parts += ["", "## Prefill peak memory", "",
                  markdown(["method", "budget", "tokens", "chunk", "status", "prefill s", "peak GiB"],
                           [[r["method"], _fmt(r["budget"]), str(r["context"]), str(r.get("prefill_chunk")),
                             r["status"], f"{r['prefill_s']:.2f}" if r["status"] == "ok" else "",
                             f"{_peak_gib(r):.3g}" if r["status"] == "ok" else ""] for r in chunked])]
    tg = comparison_rows(records)
    if tg:
        parts += ["", "## Comparisons", "", markdown(["comparison", "ratio"], [[t["what"], f"{t['value']:.3g}"]
                                                                               for t in tg])]
    models = [r for r in records if r.get("kind") == "largest_batch_result" and r.get("memory_model")]
    if models:
        parts += ["", "## Largest batch: memory model", ""]
        for r in models:
            m = r["memory_model"]
            parts.append(f"- {r['method']}@{_fmt(r['budget'])}, ctx {r['context']}: peak = "
                         f"{m['fixed_bytes'] / GIB:.2f} GiB + {m['bytes_per_sequence'] / GIB:.3f} GiB x batch; capacity "
                         f"{m['capacity'] / GIB:.2f} GiB; predicted {m['predicted']}"
                         + (f" ({m['predicted_reserved']} by the reserved peaks)" if "predicted_reserved" in m else "")
                         + f", ran {r['batch']} ({r['status']})"
                         + (f"; tried {', '.join(m['tried'])}" if len(m.get("tried", [])) > 1 else ""))
    return "\n".join(parts) + "\n"


def write_table(path: Path, records: list[dict]) -> None:
    results.write_text(path, render(records))


def run_bench(cfg: BenchConfig, echo=print) -> tuple[Path, list[dict]]:
    before = os.environ.get("KVBENCH_PDL")
    if cfg.pdl:  # read by kvbench's kernels at every launch and by the engine when it compiles the step
        os.environ["KVBENCH_PDL"] = "1"
    try:
        bench = Bench(cfg, echo)
        records = bench.run()
    finally:
        if before is None:
            os.environ.pop("KVBENCH_PDL", None)
        else:
            os.environ["KVBENCH_PDL"] = before
    return bench.out, records


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peer":
        peer_main(sys.argv[2])
    else:
        sys.exit("usage: python -m kvbench.bench --peer SPEC.json (the CLI is `kvbench bench`)")
