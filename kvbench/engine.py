"""The engine: one loaded model driving one method's cache.

Prefill (chunked, compressing), feeding tokens, the forward pass through kvbench's cache, and one decoding
loop that owns CUDA-graph capture, replay and eager steps; multi-turn and teacher-forced log-probabilities on
a compressed context; peak-memory accounting per phase. Protocol: query-agnostic by default (the context is
compressed before the question is seen; the question and answer are then decoded on the compressed cache);
``query-aware`` compresses context and question together. Prefill runs one sequence at a time (no padding
anywhere); decoding runs a batch of sequences over their concatenated stores. What to run, in which order,
and what to write is the harness's (``kvbench.harness``).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kvbench import distributed
from kvbench.cache import KVCache, ints_on, rope_inverse_factory
from kvbench.kernels.decode_attention import pdl_enabled
from kvbench.models import LoadedModel, cache_argument
from kvbench.registry import ParameterError
from kvbench.task import Sample

PROTOCOLS = ("query-agnostic", "query-aware")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def is_oom(err: BaseException) -> bool:
    """An out-of-memory error (CUDA's own type, or a RuntimeError that says so)."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def ends_line(tok, tokens: list[int]) -> bool:
    """``stop_at_newline``'s rule: the answer's text has a newline after some text (leading newlines don't count).

    Only a token whose own text holds a newline can end the line, so the whole answer is decoded only at such a
    token: decoding it every step made the check quadratic in the answer's length. The decision stays that of
    the whole text (a token's text alone may differ from its text in context, e.g. a sentencepiece word's
    leading space, or one byte of a multi-byte character).
    """
    return "\n" in tok.decode(tokens[-1:]) and "\n" in tok.decode(tokens).lstrip("\n")


def free_memory() -> None:
    """Give back what a failed or finished phase left: Python garbage, then CUDA's cached blocks."""
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def kv_ratio(held: int, full: int) -> float:
    """Bytes held over the bytes a plain full cache would hold for the same tokens."""
    return held / max(full, 1)


def compile_mode() -> str | None:
    """torch.compile's mode for the decoding step, from KVBENCH_COMPILE_MODE: e.g. max-autotune-no-cudagraphs
    (autotuned matmuls for batch 1's 1-row GEMMs). kvbench captures the step as a CUDA graph itself, so a mode
    that adds its own graphs (reduce-overhead, max-autotune) is refused."""
    mode = os.environ.get("KVBENCH_COMPILE_MODE") or None
    if mode not in (None, "default", "max-autotune-no-cudagraphs"):
        raise ParameterError(f"KVBENCH_COMPILE_MODE={mode} is not supported: use default or "
                             "max-autotune-no-cudagraphs (kvbench captures the step as a CUDA graph itself)")
    return mode


def freeze_weights() -> bool:
    """KVBENCH_FREEZE_WEIGHTS=1: the compiled decoding step takes the weights as constants (inductor's freezing),
    which lets inductor fuse the linear layers that share an input where its patterns match (what it fused on
    the CPU and on the GPU, and what that gained: kernels/NOTES.md). At batch 1-8 a GEMM's time is
    its weight bytes plus a fixed few microseconds, paid per GEMM. It costs the fused weights' memory beside
    the originals (which prefill still reads) and a compile per layer instead of one for all."""
    return os.environ.get("KVBENCH_FREEZE_WEIGHTS", "0") == "1"


def inductor_has_pdl() -> bool:
    """Whether this torch's inductor can launch its Triton kernels with programmatic dependent launch."""
    import torch._inductor.config as inductor_config
    return hasattr(inductor_config.triton, "enable_pdl")


class Engine:
    """Drives one loaded model with one method."""

    def __init__(self, lm: LoadedModel, method, protocol: str = "query-agnostic",
                 prefill_chunk: int | None = None, temperature: float = 0.0, seed: int = 0,
                 compile_decode: bool | None = None, freeze: bool | None = None):
        self.lm, self.model, self.tok, self.method = lm, lm.model, lm.tokenizer, method
        self.protocol, self.chunk, self.temperature, self.seed = protocol, prefill_chunk, temperature, seed
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        rotary = getattr(getattr(self.model, "model", None), "rotary_emb", None)
        self.rope = rope_inverse_factory(rotary) if rotary is not None else None
        eos = set()
        for src in (getattr(self.tok, "eos_token_id", None), getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                eos.add(src)
            elif src:
                eos.update(src)
        self.eos = eos
        self.cuda_graphs = os.environ.get("KVBENCH_CUDA_GRAPHS", "1") != "0"
        # The decoding step through torch.compile (or KVBENCH_COMPILE=1): the model's own small per-layer operations
        # (norms, rotary, activation, residuals: about 50 kernels a layer eagerly) fuse into a few; kvbench's cache
        # (its attention and the method's hooks) runs eagerly inside it (``torch.compiler.disable`` on
        # ``KVCache.attention``), and the whole step is then captured in the CUDA graph as before.
        self.compile_decode = (os.environ.get("KVBENCH_COMPILE", "0") == "1") if compile_decode is None else compile_decode
        self.compile_mode = compile_mode()
        self.freeze = freeze_weights() if freeze is None else freeze  # only with compile_decode
        self._compiled_model = None
        if self.compile_decode and pdl_enabled() and not inductor_has_pdl():
            raise ParameterError(f"KVBENCH_PDL=1 with a compiled decoding step needs inductor's triton.enable_pdl "
                                 f"(torch >= 2.9; this is {torch.__version__}): upgrade torch or unset KVBENCH_PDL")
        self.head_shard = distributed.head_shard(self.model)  # [distributed] None unless tensor parallel
        method.prepare(lm)

    def _compiled_step(self, kwargs: dict):
        import torch._dynamo
        import torch._inductor.config
        if self._compiled_model is None:
            self._compiled_model = torch.compile(self.model, mode=self.compile_mode)
        # A layer's index is an int attribute of its module: static by default, so every layer would compile again
        # (past dynamo's recompile limit, the rest eagerly); dynamic, one compiled layer serves them all. Frozen
        # weights are constants of the compiled code, so then each layer compiles on its own: room for all of them
        # (past the limit the rest would run eagerly, unfrozen, without a word).
        dynamo = {"allow_unspec_int_on_nn_module": True}
        if self.freeze:
            layers = self.model.config.num_hidden_layers
            dynamo["recompile_limit"] = max(torch._dynamo.config.recompile_limit, 2 * layers + 8)
        inductor = {"freezing": self.freeze}
        if pdl_enabled():  # inductor's own kernels launched as kvbench's are (KVBENCH_PDL, kernels/NOTES.md)
            inductor["triton.enable_pdl"] = True
        with torch._dynamo.config.patch(**dynamo), torch._inductor.config.patch(**inductor):
            return self._compiled_model(**kwargs)

    def full_reference(self) -> "Engine":
        """The same model, protocol and prefill chunk with the full cache: what a compressed run is compared with."""
        from kvbench import registry
        return Engine(self.lm, registry.build_method("full", 1.0), self.protocol, self.chunk, self.temperature,
                      self.seed, self.compile_decode, self.freeze)

    def new_cache(self, batch: int = 1) -> KVCache:
        return KVCache(self.method, self.model.config, batch, self.dtype, self.device, self.rope,
                       head_shard=self.head_shard)

    @torch.no_grad()
    def forward(self, cache: KVCache, ids: torch.Tensor, compress: bool, final: bool = True,
                all_logits: bool = False) -> torch.Tensor:
        B, T = ids.shape
        positions = cache.seen[:, None] + torch.arange(T, device=self.device)[None, :]
        cache.begin(positions, compress, final)
        kwargs = dict(input_ids=ids, position_ids=positions, **cache_argument(self.model, cache), use_cache=True,
                      kvbench_cache=cache, logits_to_keep=0 if all_logits else 1)
        if self.compile_decode and T == 1 and not compress and not all_logits:
            out = self._compiled_step(kwargs)
        else:
            out = self.model(**kwargs)
        if cache.unattended_layers():
            raise RuntimeError("the model attended without kvbench's cache (attn_implementation was changed); "
                               "refusing to report full attention as compressed")
        if compress:
            cache.end_compression()
        return out.logits

    def feed(self, cache: KVCache, ids: list[int], compress: bool, all_logits: bool = False) -> torch.Tensor | None:
        """Feed tokens to a batch-1 cache, in chunks of ``prefill_chunk``; returns the last logits."""
        if not ids:
            return None
        t = ints_on(ids, self.device)[None]  # pinned, non-blocking: a second feed (the question) waits for nothing
        step = self.chunk or len(ids)
        logits = []
        for s in range(0, len(ids), step):
            last = s + step >= len(ids)
            logits.append(self.forward(cache, t[:, s:s + step], compress, final=last, all_logits=all_logits))
        return torch.cat(logits, dim=1) if all_logits else logits[-1]

    def prefill(self, sample: Sample) -> tuple[KVCache, torch.Tensor, dict]:
        cache = self.new_cache(1)
        t0 = time.perf_counter()
        if self.protocol == "query-aware":
            logits = self.feed(cache, sample.context_ids + sample.question_ids, compress=True)
            compressed_bytes = cache.nbytes()
        else:
            logits = self.feed(cache, sample.context_ids, compress=True)
            compressed_bytes = cache.nbytes()
            q_logits = self.feed(cache, sample.question_ids, compress=False)
            logits = q_logits if q_logits is not None else logits
        sync(self.device)
        info = {"prefill_s": time.perf_counter() - t0, "compress_s": cache.compress_seconds,
                "context_tokens": len(sample.context_ids), "question_tokens": len(sample.question_ids),
                "kv_bytes_compressed": compressed_bytes,
                "kv_bytes_prefill": cache.nbytes(), "kv_bytes_full_prefill": cache.full_nbytes(),
                "kv_layer_bytes_prefill": cache.layer_nbytes()}
        return cache, logits[:, -1], info

    def pick(self, logits: torch.Tensor, banned: list[set[int]] | None = None) -> torch.Tensor:
        """The next token of each row; ``banned[b]``: ids row b may not take now (EOS before min_new_tokens)."""
        if banned and any(banned):
            logits = logits.clone()
            for b, ids in enumerate(banned):
                if ids:
                    logits[b, list(ids)] = float("-inf")
        if self.temperature <= 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]

    @torch.no_grad()
    def decode(self, cache: KVCache, first_logits: torch.Tensor, max_new: list[int],
               stop_at_newline: list[bool], trace_every: int = 64, stop_ids: list[list[int]] | None = None,
               min_new: list[int] | None = None, forced: list[list[int]] | None = None,
               on_logits: Callable[[torch.Tensor], None] | None = None) -> tuple[list[list[int]], dict]:
        """Batched greedy/sampled decoding until EOS (or one of the row's ``stop_ids``) or each sequence's limit.

        Before a row has ``min_new`` tokens, EOS and its stop ids are banned (transformers' ``min_length``).
        ``forced``: teacher forcing through the decoding steps: row b takes ``forced[b]`` token by token (no end
        token stops it; ``max_new`` still does), and ``on_logits`` gets each step's next-token logits [B, V].

        On CUDA the decoding step is captured as a CUDA graph and replayed while the method's
        ``decode_epoch`` key holds (for methods whose decoding only appends, for ever; for h2o, tova and
        streamingllm, which evict one token a step in place, while no store changes its layout; DeltaKV
        between its flushes): the step's hundreds of kernel launches would otherwise cost more host time than
        the GPU spends reading weights and KV. A step whose key is None runs eagerly; a new key is captured
        after one eager step at it (which warms every lazily built index). The stores reserve room for the new
        tokens before a capture (``KVCache.reserve``), so nothing moves while the graph replays. A step that
        fails to capture is run eagerly from then on, and the run records why (``graph_error``).
        """
        B = first_logits.shape[0]
        out: list[list[int]] = [[] for _ in range(B)]
        done = [m <= 0 for m in max_new]
        use_graph = self.cuda_graphs and self.device.type == "cuda" and max(max_new) > 2
        if use_graph and self.method.decode_epoch(cache) is not None:
            cache.reserve(max(max_new))
        graph = graph_key = eager_key = static_ids = static_logits = graph_error = None
        captures = 0
        ends = [set() if forced else self.eos | set(stop_ids[b] if stop_ids else ()) for b in range(B)]
        min_new = min_new or [0] * B

        def banned() -> list[set[int]]:
            return [ends[b] if len(out[b]) < min_new[b] else set() for b in range(B)]

        def choose(logits: torch.Tensor) -> torch.Tensor:
            if forced is None:
                return self.pick(logits, banned())
            return ints_on([forced[b][len(out[b])] if len(out[b]) < len(forced[b]) else 0 for b in range(B)],
                           self.device)

        nxt = choose(first_logits)
        steps, kv_trace, steady = 0, {}, None
        t0 = time.perf_counter()
        while True:
            for b, token in enumerate(nxt.tolist()):
                if done[b]:
                    continue
                if token in ends[b]:
                    done[b] = True
                    continue
                out[b].append(token)
                if len(out[b]) >= max_new[b] or (stop_at_newline[b] and ends_line(self.tok, out[b])):
                    done[b] = True
            if all(done):
                break
            key = self.method.decode_epoch(cache) if use_graph else None
            if graph is not None and key != graph_key:  # the layout changed: this graph is stale
                graph = static_ids = static_logits = None
            fresh = False
            if key is not None and graph is None and key == eager_key:  # one eager step ran at this key
                cache.reserve(max(max_new) - steps)
                key = self.method.decode_epoch(cache)  # the room just made may have moved the stores
                static_ids = nxt[:, None].clone()
                graph, graph_key, fresh = torch.cuda.CUDAGraph(), key, True
                try:
                    with torch.cuda.graph(graph):
                        static_logits = self.forward(cache, static_ids, compress=False)
                    captures += 1
                except RuntimeError as e:  # a step that cannot be captured: decode eagerly, and say so
                    graph_error, use_graph = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", False
                    graph = static_ids = static_logits = None
                    fresh = False
            if steps == 1 and steady is None:  # one-time costs (warm-up step, graph capture) end here
                sync(self.device)
                steady = (time.perf_counter(), steps)
            if graph is not None:
                static_ids.copy_(nxt[:, None])
                graph.replay()
                if not fresh:  # the capture ran the step's Python once already
                    cache.replayed(1)
                logits = static_logits
            else:
                logits = self.forward(cache, nxt[:, None], compress=False)
                eager_key = key
            steps += 1
            if trace_every and steps % trace_every == 0:
                kv_trace[steps] = cache.layer_nbytes()
            if on_logits is not None:
                on_logits(logits[:, -1])
            nxt = choose(logits[:, -1])
        sync(self.device)
        t_end = time.perf_counter()
        # Steady-state time per step: after the eager warm-up step and the graph capture (a server pays
        # those once, not per request); decode_s / decode_steps keeps them in.
        steady_tpot = (t_end - steady[0]) / (steps - steady[1]) if steady and steps > steady[1] else None
        return out, {"decode_s": t_end - t0, "decode_steps": steps, "tpot_steady_s": steady_tpot,
                     "kv_layer_bytes_steps": kv_trace,
                     "cuda_graph": captures > 0, "graph_captures": captures, "graph_error": graph_error,
                     "kv_bytes_end": cache.nbytes(), "kv_bytes_full_end": cache.full_nbytes(),
                     "kv_seq_bytes_end": cache.sequence_nbytes().tolist(),
                     "kv_seq_full_end": cache.sequence_full_nbytes().tolist()}

    def generate(self, samples: list[Sample], trace_every: int = 64) -> list[dict]:
        """Prefill each sample, decode them together; one result dict per sample."""
        caches, firsts, infos = [], [], []
        peak = PeakMemory(self.device)
        for s in samples:
            cache, first, info = self.prefill(s)
            caches.append(cache)
            firsts.append(first)
            infos.append(info)
        prefill_peak = peak.read()
        # Joining the per-sequence caches holds one extra layer at a time: its own phase, so no peak is missed.
        peak = PeakMemory(self.device)
        batch = KVCache.concat(caches, consume=True) if len(caches) > 1 else caches[0]
        del caches
        batching_peak = peak.read()
        peak = PeakMemory(self.device)
        tokens, dinfo = self.decode(batch, torch.cat(firsts), [s.max_new_tokens for s in samples],
                                    [s.stop_at_newline for s in samples], trace_every,
                                    [s.stop_token_ids for s in samples], [s.min_new_tokens for s in samples])
        decode_peak = peak.read()
        results_ = []
        for b, (s, info) in enumerate(zip(samples, infos)):
            n_new = len(tokens[b])
            rec = dict(info)
            rec.update(prediction=self.tok.decode(tokens[b], skip_special_tokens=True), new_tokens=n_new,
                       batch_size=len(samples), decode_s=dinfo["decode_s"], decode_steps=dinfo["decode_steps"],
                       tpot_steady_s=dinfo["tpot_steady_s"], cuda_graph=dinfo["cuda_graph"],
                       graph_error=dinfo["graph_error"],
                       kv_layer_bytes_steps=dinfo["kv_layer_bytes_steps"] if len(samples) == 1 else {},
                       kv_bytes_end=dinfo["kv_seq_bytes_end"][b], kv_bytes_full_end=dinfo["kv_seq_full_end"][b],
                       peak_prefill=prefill_peak, peak_batching=batching_peak, peak_decode=decode_peak)
            rec["kv_ratio_prefill"] = kv_ratio(info["kv_bytes_prefill"], info["kv_bytes_full_prefill"])
            rec["kv_ratio_end"] = kv_ratio(rec["kv_bytes_end"], rec["kv_bytes_full_end"])
            rec["ttft_s"] = info["prefill_s"]
            rec["tpot_s"] = dinfo["decode_s"] / max(dinfo["decode_steps"], 1)
            rec["tokens_per_s"] = sum(len(t) for t in tokens) / max(dinfo["decode_s"], 1e-9)
            results_.append(rec)
        return results_

    @torch.no_grad()
    def multi_turn(self, sample: Sample, own_answers: bool = False, trace_every: int = 64) -> list[dict]:
        """SCBench-style turns on one compressed context. Returns one result per turn (first included).

        multi-turn: the context and the first question are prefilled as ``prefill`` does for any sample (under
        the engine's protocol; SCBench's official first turn puts its question in ``context_ids``); each later
        turn is appended uncompressed. multi-request: the context alone is prefilled, every turn starts from it.
        ``own_answers`` (SCBench's disable_golden_context): the answer stays in the cache as the official loop
        leaves it: ended on EOS, every answer token fed and not the EOS; cut at the limit, its last token not
        fed and EOS fed instead.
        """
        multi_request = sample.turn_mode == "multi-request"
        first = Sample(sample.id, sample.context_ids, [] if multi_request else sample.question_ids, sample.answers, 0)
        cache, last_logits, info = self.prefill(first)
        base = cache.clone() if multi_request else None
        turns = [(sample.question_ids if multi_request else [], sample.answers, sample.max_new_tokens, None)]
        turns += [(t.question_ids, t.answers, t.max_new_tokens, t.answer_ids) for t in sample.turns]
        outs = []
        for i, (q_ids, _answers, max_new, gold_ids) in enumerate(turns):
            work = base.clone() if base is not None else cache
            t0 = time.perf_counter()
            logits = self.feed(work, q_ids, compress=False)
            logits = last_logits if logits is None else logits[:, -1]
            answer_cache = work if (own_answers or base is not None) else work.clone()
            tokens, dinfo = self.decode(answer_cache, logits, [max_new], [sample.stop_at_newline], trace_every)
            if base is None:
                if own_answers:  # decode fed every answer token, except the last one of an answer cut at its limit
                    cut = len(tokens[0]) >= max_new and self.tok.eos_token_id is not None
                    last_logits = self.feed(work, [self.tok.eos_token_id], compress=False)[:, -1] if cut else None
                elif gold_ids:
                    last_logits = self.feed(work, gold_ids, compress=False)[:, -1]
            rec = dict(info, prediction=self.tok.decode(tokens[0], skip_special_tokens=True), turn=i,
                       new_tokens=len(tokens[0]), decode_s=dinfo["decode_s"], decode_steps=dinfo["decode_steps"],
                       turn_s=time.perf_counter() - t0, kv_bytes_end=dinfo["kv_bytes_end"],
                       kv_bytes_full_end=dinfo["kv_bytes_full_end"], batch_size=1)
            rec["kv_ratio_prefill"] = kv_ratio(info["kv_bytes_prefill"], info["kv_bytes_full_prefill"])
            rec["kv_ratio_end"] = kv_ratio(rec["kv_bytes_end"], rec["kv_bytes_full_end"])
            outs.append(rec)
        return outs

    @torch.no_grad()
    def continuation_logprobs(self, sample: Sample, stepwise: bool = False) -> tuple[torch.Tensor, dict]:
        """Log-probabilities [T, V] of the continuation's T tokens (teacher-forced) on the compressed context, row t
        predicting token t (row 0 from the prefill's last logits): fed as one chunk (its own keys and values
        exact, as a prefill chunk's), or ``stepwise`` through the decoding steps (each token reads the cache as
        the method keeps it while decoding: its evictions, its codes)."""
        cache, first, info = self.prefill(Sample(sample.id, sample.context_ids, sample.question_ids, [], 0))
        ids = sample.continuation_ids
        if stepwise:
            rows = [F.log_softmax(first[0].float(), dim=-1)]
            self.decode(cache, first, [len(ids)], [False], trace_every=0,
                        forced=[ids], on_logits=lambda logits: rows.append(F.log_softmax(logits[0].float(), dim=-1)))
            logp = torch.stack(rows)
        else:
            logits = self.feed(cache, ids, compress=False, all_logits=True)
            logp = F.log_softmax(torch.cat([first, logits[0, :-1]]).float(), dim=-1)
        info["kv_ratio_prefill"] = kv_ratio(info["kv_bytes_prefill"], info["kv_bytes_full_prefill"])
        info["kv_ratio_end"] = kv_ratio(cache.nbytes(), cache.full_nbytes())
        return logp, info


class PeakMemory:
    """Peak device memory of a phase (CUDA), or resident memory (CPU)."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
            return {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}
        import psutil
        return {"rss": psutil.Process().memory_info().rss}
