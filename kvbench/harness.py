"""The harness: run (or resume) one configuration of method x task x model and write its results.

Checks the configuration before anything is loaded, builds the method and the task from the registry, asks
the task for its samples, batches them, hands them to the engine (``kvbench.engine``) by the task's declared
kind, scores them, and writes ``samples.jsonl`` / ``trace.jsonl`` / ``metrics.json`` atomically under a locked
run directory with the run's provenance (versions, commit, device, seed), so that a killed run resumes.
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

from kvbench import artifact, distributed, registry, results
from kvbench.engine import PROTOCOLS, Engine, is_oom, resolve_device, resolve_dtype
from kvbench.models import LoadedModel
from kvbench.task import GENERATION, LOGPROBS, MULTI_TURN, Sample, TaskContext

__all__ = ["PROTOCOLS", "RunConfig", "check_config", "run", "task_samples", "failure", "mark_failure"]


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


def environment(device: str) -> dict:
    import transformers
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    info["device_name"] = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    # Runs sharing one device (several sweeps at once, for throughput) score as usual, but their timings measure
    # the contention: KVBENCH_SHARED_DEVICE=N says so, and the leaderboard then shows no speed for them.
    if int(os.environ.get("KVBENCH_SHARED_DEVICE", "1") or 1) > 1:
        info["shared_device"] = int(os.environ["KVBENCH_SHARED_DEVICE"])
    if os.environ.get("KVBENCH_COMPILE", "0") == "1":  # the decoding step through torch.compile (its timings differ)
        info["compiled_decode"] = True
    return info


def git_commit() -> str | None:
    """HEAD of the checkout kvbench runs from; ``KVBENCH_GIT_COMMIT`` overrides it where the checkout's git
    metadata is not the tree's (a copied working tree on a remote machine)."""
    if os.environ.get("KVBENCH_GIT_COMMIT"):
        return os.environ["KVBENCH_GIT_COMMIT"]
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
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise TaskError(f"--out {cfg.out} is a file: give a directory for the results")
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
    if isinstance(cfg.budget, int) and not isinstance(cfg.budget, bool) and registry.uses_budget(cfg.method):
        longest = max(_sequence_tokens(s) for s in samples)
        if cfg.budget >= longest:  # a method at this budget is the full cache under another name
            raise TaskError(f"budget {cfg.budget} tokens holds every sample whole (the longest is {longest} tokens: "
                            "context, question and answer): nothing would be compressed; give a smaller token count "
                            "or a fraction such as 0.25")
    return samples


def _sequence_tokens(s: Sample) -> int:
    """Every token a sample can put in the cache: context, question, answer, teacher-forced continuation, turns."""
    return (len(s.context_ids) + len(s.question_ids) + s.max_new_tokens + len(s.continuation_ids or [])
            + sum(len(t.question_ids) + t.max_new_tokens + len(t.answer_ids or []) for t in s.turns))


def run(cfg: RunConfig, lm: LoadedModel | None = None, progress: bool = True,
        sample_memo: dict | None = None, ranks: distributed.Ranks = distributed.SINGLE) -> Path:
    """Run (or resume) one configuration; returns the run directory.

    Everything that can be checked without the model (the configuration, the method's and the task's
    parameters, the task's data) is checked before the model is loaded. The run directory is locked while
    the run works in it; ``config.json`` is written with the first finished sample, or with ``error.json``
    when the run fails: a directory never holds a bare config that would pass for an unfinished run.
    ``sample_memo`` (a dict the caller owns, e.g. a sweep) keeps built samples for the next runs of the same task
    settings on the same model: RULER's 16k samples take about a minute of tokenising each time.
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
    artifact_paths = method.artifact_paths()
    if artifact_paths:  # a remade artifact is another run (never resumed into the old one's samples)
        config["artifact_sha256"] = artifact.identity(artifact_paths)
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
                memo = {} if sample_memo is None else sample_memo
                memo_key = json.dumps([cfg.task, asdict(task), cfg.data, cfg.limit, cfg.seed, cfg.max_context,
                                       lm.name, lm.window], sort_keys=True, default=str)
                samples = memo.get(memo_key)
                if samples is None:
                    samples = task_samples(task, lm.tokenizer, lm.window, cfg)
                    memo.clear()  # one task's samples at a time: long-context sets are large
                    memo[memo_key] = samples
            _run_locked(cfg, lm, method, task, samples, config, run_dir, progress, ranks)
        except Exception as e:  # marked, so the directory shows as failed (with why), not as unfinished
            if not isinstance(e, results.ResumeRefusedError):  # refused before anything ran: the run is as it was
                mark_failure(run_dir, config, e)
            raise
    (run_dir / FAILURE_FILE).unlink(missing_ok=True)  # an earlier failure of this run, now finished
    distributed.barrier(ranks)  # [distributed] every rank returns once rank 0 wrote the metrics
    return run_dir


FAILURE_FILE = "error.json"


def failure(err: BaseException) -> dict:
    """What a failed run records (in ``error.json``; a sweep's ledger too): its status, ``oom`` for an
    out-of-memory error (the user's to fix: a smaller batch, context or device) or ``crash``, the error's
    first line and the traceback (called while ``err`` is being handled)."""
    import traceback
    first = (str(err).strip().splitlines() or [""])[0][:500]
    return {"status": "oom" if is_oom(err) else "crash", "error": f"{type(err).__name__}: {first}",
            "traceback": traceback.format_exc()[-4000:]}


def mark_failure(run_dir: Path, config: dict, err: BaseException) -> None:
    """``error.json`` (``failure(err)`` and the time) beside the run's config, written if it was not yet."""
    if not (run_dir / "config.json").exists():
        results.write_json(run_dir / "config.json", config)
    results.write_json(run_dir / FAILURE_FILE, {**failure(err), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _run_locked(cfg: RunConfig, lm: LoadedModel, method, task, samples: list[Sample], config: dict, run_dir: Path,
                progress: bool, ranks: distributed.Ranks = distributed.SINGLE) -> None:
    # [distributed] this rank's record files (shards under torchrun) and records from every file
    samples_path, trace_path = distributed.record_files(run_dir, ranks)
    config_path = run_dir / "config.json"
    done = distributed.finished_ids(run_dir, ranks)
    outside = done - {s.id for s in samples}
    if outside:  # ``limit`` is not in the run id: a smaller one would score fewer samples than the records hold
        ran = (results.read_json(config_path) or {}).get("limit")
        raise results.ResumeRefusedError(
            f"{run_dir} already holds {len(outside)} finished sample(s) outside this call's {len(samples)} (it ran "
            f"with limit={ran}, this call with limit={cfg.limit}): rerun with that limit or a larger one, or give "
            "another --out")
    share = distributed.shard(samples, ranks)  # [distributed]
    todo = [s for s in share if s.id not in done]
    # A task may ask for sampling (AIME's pass@1 over n samples); the command line's --temperature wins.
    temperature = cfg.temperature if cfg.temperature > 0 else float(task.temperature or 0.0)
    engine = Engine(lm, method, cfg.protocol, cfg.prefill_chunk, temperature, cfg.seed)
    bar = _progress(len(share), len(share) - len(todo), f"{cfg.method}@{cfg.budget} {cfg.task}",
                    progress and ranks.main)
    i = 0
    while i < len(todo):
        # Only generation batches: a multi-turn sample owns its cache, a log-probability one is teacher-forced.
        size = cfg.batch_size if task.kind == GENERATION else 1
        group = todo[i:i + size]
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
            results.append_jsonl(trace_path, {"id": s.id, **trace, "timed_under": config["versions"]})
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
    # A run resumed under other conditions (a shared device, the compiled decode, another GPU or torch) keeps its
    # scores, but an average of timings taken under both measures neither: no speed. A record written before
    # records kept their conditions counts as timed under the run's first session's (its config's versions).
    timed_under = {json.dumps(t.get("timed_under", stored.get("versions")), sort_keys=True)
                   for t in results.read_jsonl(run_dir / "trace.jsonl")}
    if len(timed_under) > 1:
        metrics.update(dict.fromkeys(SPEED))
    if stored.get("limit") != cfg.limit:  # the same run resumed with another --limit: the config says which
        results.write_json(config_path, {**stored, "limit": cfg.limit})
    results.write_json(run_dir / "metrics.json", metrics)


def _evaluate(engine: Engine, task, group: list[Sample], cfg: RunConfig) -> list[dict]:
    s = group[0]
    if task.kind == LOGPROBS:
        return [task.score_logprobs(engine, s)]
    if task.kind == MULTI_TURN:
        turns = engine.multi_turn(s, own_answers=bool(task.own_answers), trace_every=cfg.trace_every)
        preds = [t["prediction"] for t in turns]
        rec = dict(turns[0], prediction=preds[0], turn_predictions=preds, scores=task.score(s, preds))
        return [rec]
    recs = engine.generate(group, cfg.trace_every)
    for s, rec in zip(group, recs):
        rec["scores"] = task.score(s, rec["prediction"])
    return recs


SPEED = ("prefill_s", "decode_s", "tpot_s", "tokens_per_s")  # the run's mean timings (``_run_stats``)


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
