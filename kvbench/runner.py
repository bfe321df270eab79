"""The runner: prefill (chunked, compressing), question, batched decoding, scoring, results and traces.

Protocol: query-agnostic by default (the context is compressed before the question is seen; the question
and answer are then decoded on the compressed cache); ``query-aware`` compresses context and question
together. Prefill runs one sequence at a time (no padding anywhere); decoding runs a batch of sequences
over their concatenated stores.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from kvbench import distributed, registry, results
from kvbench.cache import KVCache, rope_inverse_factory
from kvbench.models import LoadedModel, cache_argument
from kvbench.task import Sample, TaskContext

PROTOCOLS = ("query-agnostic", "query-aware")


@dataclass
class RunConfig:
    method: str
    task: str
    budget: float | int = 1.0
    model: str = "smollm2-135m"
    random_weights: bool = False
    trust_remote_code: bool = False
    method_params: dict = field(default_factory=dict)
    task_params: dict = field(default_factory=dict)
    protocol: str = "query-agnostic"
    prefill_chunk: int | None = None
    batch_size: int = 1
    seed: int = 0
    temperature: float = 0.0
    dtype: str = "auto"
    device: str = "auto"
    data: str | None = None
    limit: int | None = None
    max_context: int | None = None
    trace_every: int = 64
    out: str = "results"


@dataclass
class Generation:
    tokens: list[int]
    text: str
    seconds: float


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


class Engine:
    """Drives one loaded model with one method."""

    def __init__(self, lm: LoadedModel, method, protocol: str = "query-agnostic",
                 prefill_chunk: int | None = None, temperature: float = 0.0, seed: int = 0):
        self.lm, self.model, self.tok, self.method = lm, lm.model, lm.tokenizer, method
        self.protocol, self.chunk, self.temperature = protocol, prefill_chunk, temperature
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
        self.head_shard = distributed.head_shard(self.model)  # [distributed] None unless tensor parallel
        method.prepare(lm)

    def new_cache(self, batch: int = 1) -> KVCache:
        return KVCache(self.method, self.model.config, batch, self.dtype, self.device, self.rope,
                       head_shard=self.head_shard)

    @torch.no_grad()
    def forward(self, cache: KVCache, ids: torch.Tensor, compress: bool, final: bool = True,
                all_logits: bool = False) -> torch.Tensor:
        B, T = ids.shape
        positions = cache.seen[:, None] + torch.arange(T, device=self.device)[None, :]
        cache.begin(positions, compress, final)
        out = self.model(input_ids=ids, position_ids=positions, **cache_argument(self.model, cache), use_cache=True,
                         kvbench_cache=cache, logits_to_keep=0 if all_logits else 1)
        if cache.unattended_layers():
            raise RuntimeError("the model attended without kvbench's cache (attn_implementation was changed); "
                               "refusing to report full attention as compressed")
        return out.logits

    def feed(self, cache: KVCache, ids: list[int], compress: bool, all_logits: bool = False) -> torch.Tensor | None:
        """Feed tokens to a batch-1 cache, in chunks of ``prefill_chunk``; returns the last logits."""
        if not ids:
            return None
        t = torch.tensor([ids], device=self.device)
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
               min_new: list[int] | None = None) -> tuple[list[list[int]], dict]:
        """Batched greedy/sampled decoding until EOS (or one of the row's ``stop_ids``) or each sequence's limit.

        Before a row has ``min_new`` tokens, EOS and its stop ids are banned (transformers' ``min_length``).

        On CUDA the decoding step is captured as a CUDA graph and replayed while the method's
        ``decode_epoch`` key holds (for methods whose decoding only appends, for ever; DeltaKV between its
        flushes): the step's hundreds of kernel launches would otherwise cost more host time than the GPU
        spends reading weights and KV. A step whose key is None runs eagerly; a new key is captured after
        one eager step at it (which warms every lazily built index). The stores reserve room for the new
        tokens before a capture (``KVCache.reserve``), so nothing moves while the graph replays.
        """
        B = first_logits.shape[0]
        out: list[list[int]] = [[] for _ in range(B)]
        done = [m <= 0 for m in max_new]
        use_graph = self.cuda_graphs and self.device.type == "cuda" and max(max_new) > 2
        if use_graph and self.method.decode_epoch(cache) is not None:
            cache.reserve(max(max_new))
        graph = graph_key = eager_key = static_ids = static_logits = None
        captures = 0
        ends = [self.eos | set(stop_ids[b] if stop_ids else ()) for b in range(B)]
        min_new = min_new or [0] * B

        def banned() -> list[set[int]]:
            return [ends[b] if len(out[b]) < min_new[b] else set() for b in range(B)]

        nxt = self.pick(first_logits, banned())
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
                if len(out[b]) >= max_new[b] or (stop_at_newline[b] and "\n" in self.tok.decode(out[b]).lstrip("\n")):
                    done[b] = True
            if all(done):
                break
            key = self.method.decode_epoch(cache) if use_graph else None
            if graph is not None and key != graph_key:  # the layout changed: this graph is stale
                graph = static_ids = static_logits = None
            fresh = False
            if key is not None and graph is None and key == eager_key:  # one eager step ran at this key
                cache.reserve(max(max_new) - steps)
                static_ids = nxt[:, None].clone()
                graph, graph_key, fresh = torch.cuda.CUDAGraph(), key, True
                with torch.cuda.graph(graph):
                    static_logits = self.forward(cache, static_ids, compress=False)
                captures += 1
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
            nxt = self.pick(logits[:, -1], banned())
        sync(self.device)
        t_end = time.perf_counter()
        # Steady-state time per step: after the eager warm-up step and the graph capture (a server pays
        # those once, not per request); decode_s / decode_steps keeps them in.
        steady_tpot = (t_end - steady[0]) / (steps - steady[1]) if steady and steps > steady[1] else None
        return out, {"decode_s": t_end - t0, "decode_steps": steps, "tpot_steady_s": steady_tpot,
                     "kv_layer_bytes_steps": kv_trace,
                     "cuda_graph": captures > 0, "graph_captures": captures,
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
                       kv_layer_bytes_steps=dinfo["kv_layer_bytes_steps"] if len(samples) == 1 else {},
                       kv_bytes_end=dinfo["kv_seq_bytes_end"][b], kv_bytes_full_end=dinfo["kv_seq_full_end"][b],
                       peak_prefill=prefill_peak, peak_batching=batching_peak, peak_decode=decode_peak)
            rec["kv_ratio_prefill"] = info["kv_bytes_prefill"] / max(info["kv_bytes_full_prefill"], 1)
            rec["kv_ratio_end"] = rec["kv_bytes_end"] / max(rec["kv_bytes_full_end"], 1)
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
            rec["kv_ratio_prefill"] = info["kv_bytes_prefill"] / max(info["kv_bytes_full_prefill"], 1)
            rec["kv_ratio_end"] = rec["kv_bytes_end"] / max(rec["kv_bytes_full_end"], 1)
            outs.append(rec)
        return outs

    @torch.no_grad()
    def continuation_logprobs(self, sample: Sample) -> tuple[torch.Tensor, dict]:
        """Log-probabilities [T-1, V] of the continuation (teacher-forced) on the compressed context."""
        cache, _, info = self.prefill(Sample(sample.id, sample.context_ids, sample.question_ids, [], 0))
        logits = self.feed(cache, sample.continuation_ids, compress=False, all_logits=True)
        info["kv_ratio_prefill"] = info["kv_bytes_prefill"] / max(info["kv_bytes_full_prefill"], 1)
        info["kv_ratio_end"] = cache.nbytes() / max(cache.full_nbytes(), 1)
        return F.log_softmax(logits[0, :-1].float(), dim=-1), info


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


def environment(device: str) -> dict:
    import transformers
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    info["device_name"] = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    return info


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except Exception:
        return None


def check_config(cfg: RunConfig) -> None:
    """What can be told wrong about a run before anything is loaded; a ``TaskError`` in one line."""
    from kvbench.task import TaskError
    if cfg.protocol not in PROTOCOLS:
        raise TaskError(f"unknown protocol '{cfg.protocol}'; use one of {', '.join(PROTOCOLS)}")
    for name, least in (("limit", 1), ("batch_size", 1), ("prefill_chunk", 1), ("max_context", 1),
                        ("trace_every", 0)):
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise TaskError(f"{name} must be a whole number >= {least}, got {value!r}")
    if not isinstance(cfg.temperature, (int, float)) or not 0 <= cfg.temperature < float("inf"):
        raise TaskError(f"temperature must be a finite number >= 0, got {cfg.temperature!r}")
    if cfg.random_weights:
        raise TaskError("tasks need a tokenizer, which random-weight presets lack: give a real --model "
                        "(random weights are for `kvbench bench`)")


def task_samples(task, tokenizer, window: int, cfg: RunConfig) -> list[Sample]:
    """The task's samples, checked: some, with distinct ids (results are keyed by id)."""
    from kvbench.task import TaskError
    max_ctx = cfg.max_context or max(window - 512, 256)
    # ``limit`` is the task's to apply: multi-part tasks (LongBench, RULER) take it per part.
    samples = task.samples(tokenizer, TaskContext(max_context_tokens=max_ctx, data=cfg.data, limit=cfg.limit,
                                                  seed=cfg.seed, window=window,
                                                  max_context_set=cfg.max_context is not None))
    if not samples:
        raise TaskError(f"task {cfg.task} has no samples" + (f" in {cfg.data}" if cfg.data else "")
                        + ": check the data (and --limit)")
    seen, dup = set(), []
    for s in samples:
        (dup.append(s.id) if s.id in seen else seen.add(s.id))
    if dup:
        raise TaskError(f"task {cfg.task} gave {len(dup)} samples an id that another sample has (first: "
                        f"{dup[0]}); each record would count twice: make the task's parameters distinct")
    return samples


def run(cfg: RunConfig, lm: LoadedModel | None = None, progress: bool = True,
        ranks: distributed.Ranks = distributed.SINGLE) -> Path:
    """Run (or resume) one configuration; returns the run directory.

    Everything that can be checked without the model (the configuration, the method's and the task's
    parameters, the task's data) is checked before the model is loaded. The run directory is locked while
    the run works in it; ``config.json`` is written with the first finished sample, or with ``error.json``
    when the run fails: a directory never holds a bare config that would pass for an unfinished run.
    ``ranks``: this process's place in a torchrun job (``kvbench.distributed``: samples shared out over the
    ranks, or the model's heads)."""
    from kvbench import models
    check_config(cfg)
    distributed.check_method(cfg.method, ranks)  # [distributed]
    device = distributed.local_device(resolve_device(cfg.device), ranks)  # [distributed]
    dtype = resolve_dtype(cfg.dtype, device)
    method = registry.build_method(cfg.method, cfg.budget, cfg.method_params)
    task = registry.build_task(cfg.task, cfg.task_params)
    samples = None
    if lm is None:
        early = models.tokenizer_only(cfg.model, cfg.trust_remote_code)
        if early is not None:  # the data is read and checked before the weights
            samples = task_samples(task, early[0], early[1], cfg)
        lm = models.load(cfg.model, dtype, device, cfg.random_weights, trust_remote_code=cfg.trust_remote_code,
                         seed=cfg.seed, tensor_parallel=ranks.tensor_parallel)  # [distributed]
    if lm.tokenizer is None:
        raise models.ModelError("tasks need a tokenizer: random-weight presets are for `kvbench bench`")
    torch.manual_seed(cfg.seed)
    config = asdict(cfg)
    config.update(device=device.split(":")[0], dtype=str(dtype).replace("torch.", ""), model_name=lm.name,
                  model_provenance=lm.provenance or None, weights_fingerprint=models.weights_fingerprint(lm.model),
                  method_params=asdict(method), task_params=asdict(task))
    if ranks.tensor_parallel:  # [distributed] another measurement than one process's: its own run
        config["tensor_parallel"] = ranks.world
    rid = results.run_id(config)
    config.update(run_id=rid, versions=environment(device), git_commit=git_commit(),
                  created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    config = distributed.from_rank0(config, ranks)  # [distributed] one run directory, one config
    run_dir = Path(cfg.out) / "runs" / config["run_id"]
    with distributed.lock_run(run_dir, ranks):  # [distributed] results.lock_run, held by rank 0
        try:
            if samples is None:
                samples = task_samples(task, lm.tokenizer, lm.window, cfg)
            _run_locked(cfg, lm, method, task, samples, config, run_dir, progress, ranks)
        except Exception as e:  # marked, so the directory shows as failed (with why), not as unfinished
            mark_failure(run_dir, config, "crash", e)
            raise
    (run_dir / FAILURE_FILE).unlink(missing_ok=True)  # an earlier failure of this run, now finished
    distributed.barrier(ranks)  # [distributed] every rank returns once rank 0 wrote the metrics
    return run_dir


FAILURE_FILE = "error.json"


def mark_failure(run_dir: Path, config: dict, status: str, err: BaseException) -> None:
    """``error.json`` (status, error, traceback) beside the run's config, written if it was not yet."""
    import traceback
    if not (run_dir / "config.json").exists():
        results.write_json(run_dir / "config.json", config)
    first = (str(err).strip().splitlines() or [""])[0][:500]
    results.write_json(run_dir / FAILURE_FILE, {"status": status, "error": f"{type(err).__name__}: {first}",
                                                 "traceback": traceback.format_exc()[-4000:],
                                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _run_locked(cfg: RunConfig, lm: LoadedModel, method, task, samples: list[Sample], config: dict, run_dir: Path,
                progress: bool, ranks: distributed.Ranks = distributed.SINGLE) -> None:
    # [distributed] this rank's record files (shards under torchrun) and records from every file
    samples_path, trace_path = distributed.record_files(run_dir, ranks)
    config_path = run_dir / "config.json"
    done = distributed.finished_ids(run_dir, ranks)
    todo = [s for s in distributed.shard(samples, ranks) if s.id not in done]  # [distributed]
    # A task may ask for sampling (AIME's pass@1 over n samples); the command line's --temperature wins.
    temperature = cfg.temperature if cfg.temperature > 0 else float(getattr(task, "temperature", 0.0) or 0.0)
    engine = Engine(lm, method, cfg.protocol, cfg.prefill_chunk, temperature, cfg.seed)
    share = len(distributed.shard(samples, ranks))  # [distributed]
    bar = _progress(share, share - len(todo), f"{cfg.method}@{cfg.budget} {cfg.task}", progress and ranks.main)
    i = 0
    while i < len(todo):
        s = todo[i]
        if s.turns or s.continuation_ids is not None:
            group = [s]
        else:
            group = [s]
            while len(group) < cfg.batch_size and i + len(group) < len(todo) and \
                    not todo[i + len(group)].turns and todo[i + len(group)].continuation_ids is None:
                group.append(todo[i + len(group)])
        i += len(group)
        for s, rec in zip(group, _evaluate(engine, task, group, cfg)):
            rec = distributed.across_ranks(rec, ranks)  # [distributed] TP: bytes summed over the ranks
            if not ranks.writes_records:  # [distributed] TP: rank 0 writes
                continue
            trace = {k: rec.pop(k) for k in list(rec) if k.startswith(("kv_layer_bytes", "peak_"))}
            trace.update({k: rec[k] for k in ("prefill_s", "compress_s", "decode_s", "ttft_s", "tpot_s",
                                              "tpot_steady_s", "tokens_per_s", "new_tokens", "batch_size")
                          if k in rec})
            if not config_path.exists():  # with the first finished sample: a directory is never just a config
                results.write_json(config_path, config)
            results.append_jsonl(trace_path, {"id": s.id, **trace})
            results.append_jsonl(samples_path, {"id": s.id, "meta": s.meta, "answers": s.answers, **rec})
            bar.update(1)
    bar.close()
    if not distributed.finish_records(run_dir, [s.id for s in samples], ranks):  # [distributed] rank 0 merges
        return
    records = results.read_jsonl(run_dir / "samples.jsonl")
    by_id = {r["id"]: r for r in records}
    ordered = [by_id[s.id] for s in samples if s.id in by_id]
    metrics = {"task": cfg.task, "method": cfg.method, "budget": cfg.budget, "protocol": cfg.protocol,
               "model": lm.name, "n_samples": len(ordered), "complete": len(ordered) == len(samples),
               "summary": task.summarize(ordered), **_run_stats(ordered)}
    stored = json.loads(config_path.read_text()) if config_path.exists() else config
    if stored.get("limit") != cfg.limit:  # the same run resumed with another --limit: the config says which
        results.write_json(config_path, {**stored, "limit": cfg.limit})
    results.write_json(run_dir / "metrics.json", metrics)


def _evaluate(engine: Engine, task, group: list[Sample], cfg: RunConfig) -> list[dict]:
    s = group[0]
    if s.continuation_ids is not None:
        return [task.score_logprobs(engine, s)]
    if s.turns:
        turns = engine.multi_turn(s, own_answers=bool(getattr(task, "own_answers", False)),
                                  trace_every=cfg.trace_every)
        preds = [t["prediction"] for t in turns]
        rec = dict(turns[0], prediction=preds[0], turn_predictions=preds, scores=task.score(s, preds))
        return [rec]
    recs = engine.generate(group, cfg.trace_every)
    for s, rec in zip(group, recs):
        rec["scores"] = task.score(s, rec["prediction"])
    return recs


def _run_stats(records: list[dict]) -> dict:
    def mean(key):
        vals = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else None
    return {"kv_ratio_prefill": mean("kv_ratio_prefill"), "kv_ratio_end": mean("kv_ratio_end"),
            "prefill_s": mean("prefill_s"), "decode_s": mean("decode_s"), "tpot_s": mean("tpot_s"),
            "tokens_per_s": mean("tokens_per_s"), "context_tokens": mean("context_tokens")}


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled or os.environ.get("CI"):
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="sample")

