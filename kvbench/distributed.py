"""Runs over several processes with torchrun: data parallel (samples, or sweep points, shared out over ranks)
and tensor parallel (one model's heads split over ranks).

kvbench launches nothing itself: ``torchrun --nproc-per-node N -m kvbench.cli run|sweep ...`` starts N
processes and sets RANK, WORLD_SIZE and LOCAL_RANK; ``session()`` reads them, joins the process group
(NCCL for CUDA tensors and gloo for CPU ones, gloo alone without CUDA) and binds each rank to
``cuda:LOCAL_RANK``. Outside torchrun (no WORLD_SIZE, or 1) nothing here does anything.

Data parallel ``run``: rank r takes samples ``r, r + N, r + 2N, ...`` of the task's order (strided, so
that tasks ordered by length spread their long samples over every rank). Each rank appends its records to
files of its own, ``RUN/shards/samples.rank{r}-of-{N}.jsonl`` (and ``trace...``), one flushed line at a
time as a one-process run appends to ``samples.jsonl``: no two processes ever append to one file. A rank
resumes from every record under the run directory (``samples.jsonl`` and all shard files, whatever world
size wrote them), so a rerun after a killed rank, with the same or another number of processes, redoes
only what is missing. When every rank is done (a barrier), rank 0 merges: ``samples.jsonl`` and
``trace.jsonl`` are rewritten atomically in the task's order, byte for byte the lines a one-process run
writes, and the shard files are removed; the metrics follow as in a one-process run. Rank 0 holds the run
directory's lock for the whole run; a second job on the same run is refused on every rank.

Data parallel ``sweep``: point i of the plan belongs to rank ``i mod N`` (each point's run directory is
owned by one process, under its lock); each rank keeps its own ledger file and rank 0 folds them into the
sweep's ledger in plan order, so the ledger and the closing summary equal a one-process sweep's.

Tensor parallel (``run --tp``): the model is loaded with transformers' DTensor plan
(``DistributedConfig(tp_plan="auto")``: q/k/v and the MLP's gate/up column-wise, o and down row-wise):
rank r computes query heads and KV heads ``[r*H/N, (r+1)*H/N)``, so its cache (``HeadShard``) holds only
those KV heads. Every rank runs every sample; rank 0 writes the records, whose cache bytes are summed over
the ranks (with each rank's bytes and peak memory beside them). Methods whose choice pools the heads of a
layer do that step on all heads through a collective (``all_heads``): AdaKV's allocation across heads,
TOVA's mean over the layer's heads. Methods that need every head's keys in one place (trained compressors,
CompressKV's chosen query heads, random's per-head draws) are refused under ``--tp``.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import torch

from kvbench import results

SHARDS_DIR = "shards"
RECORD_FILES = ("samples.jsonl", "trace.jsonl")
# Methods whose per-head choices are made per KV head, or pool heads through ``all_heads``.
TENSOR_PARALLEL_METHODS = ("full", "snapkv", "pyramidkv", "adakv", "h2o", "tova", "streamingllm", "knorm")


class DistributedError(Exception):
    """A distributed run that cannot go as asked; one line."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes torchrun started."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    tensor_parallel: bool = False

    @property
    def sharded(self) -> bool:
        """Data parallel: each rank does its own share of the work."""
        return self.world > 1 and not self.tensor_parallel

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def writes_records(self) -> bool:
        """Tensor-parallel ranks compute the same records: rank 0 alone writes them."""
        return self.main or not self.tensor_parallel


SINGLE = Ranks()


def from_env(tensor_parallel: bool = False) -> Ranks:
    """The ranks torchrun set in the environment (``SINGLE`` outside torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        if tensor_parallel:
            raise DistributedError("--tp splits the model over the processes of a torchrun job: launch it with "
                                   "`torchrun --nproc-per-node N -m kvbench.cli run --tp ...` (N >= 2)")
        return SINGLE
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")), tensor_parallel)


@contextlib.contextmanager
def session(tensor_parallel: bool = False) -> Iterator[Ranks]:
    """The process group of a torchrun job for the block (joined here unless the caller joined one)."""
    ranks = from_env(tensor_parallel)
    own = ranks.world > 1 and not torch.distributed.is_initialized()
    if own:
        import torch.distributed as dist
        if torch.cuda.is_available():
            torch.cuda.set_device(ranks.local_rank)  # plain "cuda" is this rank's GPU from here on
            dist.init_process_group("cpu:gloo,cuda:nccl", device_id=torch.device("cuda", ranks.local_rank),
                                    timeout=timedelta(hours=2))
        else:
            dist.init_process_group("gloo", timeout=timedelta(hours=2))
    try:
        yield ranks
    finally:
        if own and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def local_device(device: str, ranks: Ranks) -> str:
    """Each rank on its own GPU: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if ranks.world > 1 and device == "cuda":
        return f"cuda:{ranks.local_rank}"
    return device


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        torch.distributed.barrier()


def from_rank0(obj, ranks: Ranks):
    """Rank 0's ``obj`` on every rank (the run's config: one run id, one creation time)."""
    if ranks.world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_rank0(obj, ranks: Ranks) -> list | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
    if ranks.world == 1:
        return [obj]
    out = [None] * ranks.world if ranks.main else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def shard(items: list, ranks: Ranks) -> list:
    """This rank's share: every world-th item from its rank on (all items unless data parallel)."""
    return items[ranks.rank::ranks.world] if ranks.sharded else items


def owns(index: int, ranks: Ranks) -> bool:
    """Whether item ``index`` of a list shared out by ``shard`` is this rank's."""
    return not ranks.sharded or index % ranks.world == ranks.rank


def check_method(method: str, ranks: Ranks) -> None:
    if ranks.tensor_parallel and method not in TENSOR_PARALLEL_METHODS:
        raise DistributedError(f"{method} cannot run tensor parallel (it needs every KV head of a layer in one "
                               f"process); with --tp use one of: {', '.join(TENSOR_PARALLEL_METHODS)}")


# ------------------------------------------------------------------------------------------ run directories

@contextlib.contextmanager
def lock_run(run_dir: Path, ranks: Ranks) -> Iterator[None]:
    """The run directory's lock, held by rank 0 for the job; when it is taken, every rank says so."""
    if ranks.world == 1:
        with results.lock_run(run_dir):
            yield
        return
    with contextlib.ExitStack() as stack:
        refused = None
        if ranks.main:
            try:
                stack.enter_context(results.lock_run(run_dir))
            except results.RunLockedError as e:
                refused = str(e)
        refused = from_rank0(refused, ranks)
        if refused:
            raise results.RunLockedError(refused)
        yield


def shard_path(path: Path, ranks: Ranks) -> Path:
    """Where this rank appends what a one-process run appends to ``path``."""
    if not ranks.sharded:
        return path
    return path.parent / SHARDS_DIR / f"{path.stem}.rank{ranks.rank}-of-{ranks.world}{path.suffix}"


def record_files(run_dir: Path, ranks: Ranks) -> tuple[Path, Path]:
    """(samples, trace) files this rank appends to."""
    samples, trace = (shard_path(run_dir / name, ranks) for name in RECORD_FILES)
    samples.parent.mkdir(parents=True, exist_ok=True)
    if ranks.sharded:
        samples.touch()  # rank 0 checks that it sees every rank's files (one results filesystem)
    return samples, trace


def _shard_files(run_dir: Path, name: str) -> list[Path]:
    stem, suffix = name.rsplit(".", 1)
    return sorted((run_dir / SHARDS_DIR).glob(f"{stem}.rank*-of-*.{suffix}"))


def finished_ids(run_dir: Path, ranks: Ranks) -> set:
    """The ids of every sample record already under the run directory: its merged file and every shard file
    (the others are only read: their owners may be writing). The files this rank appends to, its trace file
    too, are repaired (a torn last line trimmed) so that its next record starts a line of its own.
    Tensor-parallel ranks take rank 0's reading (they must do the same samples)."""
    samples_name = RECORD_FILES[0]
    own = record_files(run_dir, ranks) if ranks.writes_records else ()
    ids = set()
    for path in [run_dir / samples_name, *_shard_files(run_dir, samples_name)]:
        ids |= {r.get("id") for r in results.read_jsonl(path, repair=path in own)}
    for path in own[1:]:  # the trace: only repaired, its ids are not needed
        results.read_jsonl(path, repair=True)
    return from_rank0(ids, ranks) if ranks.tensor_parallel else ids


def merge_records(run_dir: Path, order: list[str]) -> None:
    """Fold the shard files into ``samples.jsonl`` and ``trace.jsonl``: one record per id, in ``order`` (the
    task's), then any other ids as they were; written atomically, then the shards removed. Idempotent: a
    merge cut short is redone by the next run."""
    shards = [p for name in RECORD_FILES for p in _shard_files(run_dir, name)]
    if not shards:
        return
    rank_of = {sid: i for i, sid in enumerate(order)}
    for name in RECORD_FILES:
        by_id: dict = {}
        for path in [run_dir / name, *_shard_files(run_dir, name)]:
            for rec in results.read_jsonl(path):
                by_id.setdefault(rec.get("id"), rec)
        ordered = sorted(by_id.values(), key=lambda r: rank_of.get(r.get("id"), len(order)))
        results.write_jsonl(run_dir / name, ordered)
    for path in shards:
        path.unlink()
    with contextlib.suppress(OSError):
        (run_dir / SHARDS_DIR).rmdir()


def finish_records(run_dir: Path, order: list[str], ranks: Ranks) -> bool:
    """After this rank's share: wait for every rank, merge on rank 0. True where the run's metrics are
    written (rank 0; the one process outside torchrun)."""
    barrier(ranks)
    if ranks.main:
        if ranks.sharded:
            unseen = [r for r in range(ranks.world) if not shard_path(run_dir / RECORD_FILES[0],
                                                                         Ranks(r, ranks.world)).exists()]
            if unseen:
                raise DistributedError(f"rank 0 does not see the records of rank(s) {unseen} under {run_dir}: the "
                                       "ranks of a data-parallel run need one shared results filesystem (--out); "
                                       "their shards stay where they are and a rerun on a shared --out resumes them")
        merge_records(run_dir, order)
    return ranks.main


# ------------------------------------------------------------------------------------------ sweeps

def ledger_path(ledger: Path, ranks: Ranks) -> Path:
    """Where this rank appends its sweep outcomes (the ledger itself outside data parallel)."""
    if not ranks.sharded:
        return ledger
    return ledger.with_name(f".{ledger.stem}.rank{ranks.rank}-of-{ranks.world}{ledger.suffix}")


def merge_ledger(ledger: Path, outcomes: list[tuple[int, dict]], ranks: Ranks) -> list[dict]:
    """Rank 0: every rank's (plan index, outcome), in plan order, appended to the ledger, with what the rank
    files of a killed job hold folded in first (then removed); returns the outcomes of this sweep. Other
    ranks: their own outcomes."""
    gathered = gather_to_rank0(outcomes, ranks) if ranks.sharded else [outcomes]
    if not ranks.main:
        drop_rank_ledger(ledger, ranks)
        return [o for _, o in outcomes]
    everything = sorted((pair for part in gathered for pair in part), key=lambda pair: pair[0])
    rank_files = sorted(ledger.parent.glob(f".{ledger.stem}.rank*-of-*{ledger.suffix}"))
    mine = {json.dumps(o, sort_keys=True, default=str) for _, o in everything}
    for path in rank_files:
        for rec in results.read_jsonl(path):
            if json.dumps(rec, sort_keys=True, default=str) not in mine:  # a killed job's outcomes
                results.append_jsonl(ledger, rec)
    if ranks.sharded:  # one process appended to the ledger as it went
        for _, rec in everything:
            results.append_jsonl(ledger, rec)
    for path in rank_files:
        path.unlink()
    drop_rank_ledger(ledger, ranks)
    return [o for _, o in everything]


def drop_rank_ledger(ledger: Path, ranks: Ranks) -> None:
    """Once rank 0 wrote the ledger: each rank removes its own file (on a results root of its own too)."""
    if ranks.sharded:
        barrier(ranks)
        ledger_path(ledger, ranks).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ tensor parallel

@dataclass(frozen=True)
class HeadShard:
    """The KV heads this process holds under tensor parallelism: ``local`` heads, from ``rank * local``, of
    ``local * world``."""
    rank: int
    world: int
    local: int


def tensor_parallel_config(model_config):
    """What ``from_pretrained`` takes to shard a model of ``model_config`` over the torchrun job (transformers'
    DTensor plan); a ``DistributedError`` when its heads do not split evenly over the ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    heads = {"query": model_config.num_attention_heads, "KV": model_config.num_key_value_heads}
    uneven = [f"{n} {kind} heads" for kind, n in heads.items() if n % world]
    if uneven:
        raise DistributedError(f"the model has {' and '.join(uneven)}, which do not split over {world} processes: "
                               f"use --tp with a number of processes that divides {heads['KV']}")
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        import transformers
        raise DistributedError(f"--tp needs transformers' DTensor tensor parallelism (transformers.distributed), "
                               f"which transformers {transformers.__version__} lacks: upgrade transformers") from None
    return DistributedConfig(tp_plan="auto")


def shard_model(model):
    """A model built whole in each process (random weights, the same seed everywhere) sharded over the job
    as ``from_pretrained`` shards loaded weights: each rank keeps its slices of its own copy."""
    cls = type(model)
    config, _, meshes = cls.prepare_distribute_model(tensor_parallel_config(model.config), device_map=None)
    return cls.maybe_distribute_model(model, config, meshes)


def head_shard(model) -> HeadShard | None:
    """The KV heads of this process when the model is sharded over a tensor-parallel job; None otherwise."""
    attn = next((m for m in model.modules() if hasattr(m, "k_proj")), None)
    if attn is None:
        return None
    weight = attn.k_proj.weight
    if not hasattr(weight, "to_local"):
        return None
    local = weight.to_local().shape[0] // attn.head_dim
    mesh = weight.device_mesh
    return HeadShard(mesh.get_local_rank(), mesh.size(), local)


def all_heads(shard: HeadShard | None, x: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-(sequence, head) rows [B * local, ...] of every rank, as [B * H, ...] in the model's head order;
    rows may differ in length along dim 1 (padded with -inf to the longest). ``x`` itself without TP."""
    if shard is None:
        return x
    width = torch.tensor([x.shape[1] if x.dim() > 1 else 0], device=x.device)
    torch.distributed.all_reduce(width, op=torch.distributed.ReduceOp.MAX)
    if x.dim() > 1 and x.shape[1] < int(width):
        pad = x.new_full((x.shape[0], int(width) - x.shape[1], *x.shape[2:]), float("-inf"))
        x = torch.cat([x, pad], dim=1)
    parts = [torch.empty_like(x) for _ in range(shard.world)]
    torch.distributed.all_gather(parts, x.contiguous())
    per_rank = [p.view(batch, shard.local, *p.shape[1:]) for p in parts]
    return torch.cat(per_rank, dim=1).reshape(batch * shard.local * shard.world, *x.shape[1:])


def own_heads(shard: HeadShard | None, x: torch.Tensor, batch: int) -> torch.Tensor:
    """This rank's rows [B * local, ...] of per-(sequence, head) rows [B * H, ...] (``x`` without TP)."""
    if shard is None:
        return x
    heads = x.view(batch, shard.local * shard.world, *x.shape[1:])
    return heads[:, shard.rank * shard.local:(shard.rank + 1) * shard.local].reshape(-1, *x.shape[1:])


def sum_heads(shard: HeadShard | None, x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the tensor-parallel ranks (a sum over all heads from per-rank partial sums)."""
    if shard is not None:
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


def everywhere(shard: HeadShard | None, flag: bool) -> bool:
    """Whether ``flag`` holds on every tensor-parallel rank (``flag`` itself without TP)."""
    if shard is None:
        return flag
    t = torch.tensor([int(flag)])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


PER_RANK_SUMMED = ("kv_bytes_compressed", "kv_bytes_prefill", "kv_bytes_full_prefill", "kv_bytes_end",
                   "kv_bytes_full_end")


def across_ranks(rec: dict, ranks: Ranks) -> dict:
    """A tensor-parallel record: cache bytes summed over the ranks, with each rank's bytes (``..._per_rank``)
    and its peak memory (``peak_..._per_rank``) beside them; the ratios recomputed from the sums. Every rank
    calls it for every record (a collective)."""
    if not ranks.tensor_parallel:
        return rec
    mine = {k: rec[k] for k in rec if k in PER_RANK_SUMMED or k.startswith(("peak_", "kv_layer_bytes"))}
    box = [None] * ranks.world
    torch.distributed.all_gather_object(box, mine)
    out = dict(rec)
    for key in mine:
        values = [part[key] for part in box]
        out[f"{key}_per_rank"] = values
        if key in PER_RANK_SUMMED:
            out[key] = sum(values)
        elif key.startswith("kv_layer_bytes") and isinstance(rec[key], list):
            out[key] = [sum(v) for v in zip(*values)]
        elif key.startswith("kv_layer_bytes"):  # {step: [bytes per layer]}
            out[key] = {s: [sum(v) for v in zip(*(part[s] for part in values))] for s in rec[key]}
    if "kv_bytes_prefill" in out:
        out["kv_ratio_prefill"] = out["kv_bytes_prefill"] / max(out["kv_bytes_full_prefill"], 1)
    if "kv_bytes_end" in out:
        out["kv_ratio_end"] = out["kv_bytes_end"] / max(out["kv_bytes_full_end"], 1)
    return out


# ------------------------------------------------------------------------------------------ a probe

def probe(model: str, methods: list[str], budget: float, context: int, new_tokens: int, ranks: Ranks,
          random_weights: bool = False, dtype: str = "auto", seed: int = 0, logits: bool = False) -> list[dict]:
    """One prompt of ``context`` random token ids through each method, on this job's ranks (tensor parallel
    when ``ranks.tensor_parallel``): the tokens decoded, the cache bytes (summed, and per rank), each
    rank's peak memory, TTFT and TPOT; with ``logits``, the first token's logits. For the tensor-parallel
    tests and ``scripts/gpu/distributed.sh``."""
    from kvbench import models, registry
    from kvbench.bench import prompt_ids
    from kvbench.engine import Engine, resolve_device, resolve_dtype
    from kvbench.task import Sample
    device = local_device(resolve_device("auto"), ranks)
    torch_dtype = resolve_dtype(dtype, device)
    lm = models.load(model, torch_dtype, device, random_weights, seed=seed, tensor_parallel=ranks.tensor_parallel)
    lm.model.generation_config.eos_token_id = None
    lm.tokenizer = models.IdTokenizer()  # token ids in, token ids out: any model, no EOS
    ids = prompt_ids(seed, context, 1, lm.model.config.vocab_size)[0]
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    out = []
    for name in methods:
        check_method(name, ranks)
        engine = Engine(lm, registry.build_method(name, 1.0 if name == "full" else budget))
        sample = Sample("probe", ids, [], [], new_tokens)
        rec = across_ranks(engine.generate([sample])[0], ranks)
        if logits:
            rec["first_logits"] = engine.prefill(sample)[1][0].float().tolist()
        rec.update(method=name, budget=1.0 if name == "full" else budget, tensor_parallel=ranks.world
                   if ranks.tensor_parallel else 1, context=context, device=device.split(":")[0])
        out.append(rec)
    return out


def main(argv: list[str] | None = None) -> None:
    """``[torchrun --nproc-per-node N] python -m kvbench.distributed --model M [--tp] ...``: ``probe``'s records
    as JSON lines (rank 0)."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m kvbench.distributed", description=probe.__doc__)
    p.add_argument("--model", required=True, help="a model directory, HF id or alias; a preset with --random-weights")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--methods", default="full", help="comma-separated")
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", action="store_true", help="split the heads over the torchrun job")
    p.add_argument("--logits", action="store_true", help="record the first token's logits")
    p.add_argument("--out", default=None, help="append the records to this JSON-lines file (default: stdout)")
    a = p.parse_args(argv)
    with session(tensor_parallel=a.tp) as ranks:
        recs = probe(a.model, [m for m in a.methods.split(",") if m], a.budget, a.context, a.new_tokens, ranks,
                     a.random_weights, a.dtype, a.seed, a.logits)
    if not ranks.main:
        return
    for rec in recs:
        line = json.dumps(rec, default=results._jsonable)
        if a.out:
            results.append_jsonl(Path(a.out), rec)
        else:
            print(line)


if __name__ == "__main__":
    main()
