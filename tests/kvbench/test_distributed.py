"""torchrun: data-parallel runs and sweeps, tensor-parallel models (``kvbench.distributed``), on the CPU.

Real jobs: ``python -m torch.distributed.run --standalone --nproc-per-node 2`` in a subprocess, gloo backend,
on conftest's ``tiny_dir`` (a tiny random Llama, 4 query heads and 2 KV heads: one KV head per rank under TP,
saved as a model directory with the offline test tokenizer) and ``haystack``. Each torchrun job costs two
interpreter starts (~15-30 s on two busy cores), so each test launches one job and checks as much as it can
against a one-process reference; the sweep and tensor-parallel jobs (~40 s each) are marked slow.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kvbench import distributed
from kvbench.cli import main

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")
# What differs between two runs of one configuration whatever the number of processes: clocks and memory.
TIMINGS = ("prefill_s", "compress_s", "decode_s", "ttft_s", "tpot_s", "tpot_steady_s", "tokens_per_s", "turn_s")


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch):
    monkeypatch.setenv("CI", "1")


def torchrun(*args, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(CI="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def cli(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, (res.output, res.exception)
    return res


def run_args(tiny_dir, haystack, out, n: int):
    depths = "[" + ",".join(f"{d / n:.2f}" for d in range(n)) + "]"
    return ["run", "--method", "snapkv", "--budget", "0.5", "--task", "niah", "--model", tiny_dir, "--data", haystack,
            "-t", "lengths=[160]", "-t", "max_new_tokens=8", "-t", f"depths={depths}", "--out", out]


def without_timings(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in TIMINGS}


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# ------------------------------------------------------------------------------------------ data parallel

def test_sharded_run_resumes_and_merges_to_the_one_process_result(tmp_path, tiny_dir, haystack):
    """A 2-rank run resuming what killed jobs left (rank 0 of 2: one whole record and a torn one; rank 1 of
    an earlier 3-process job: one record): the merged files equal a one-process run's (ids, order,
    predictions, scores, cache bytes; summary), the left records are kept byte for byte, the torn one is
    redone, no shard file remains, and the one-process layout is back."""
    n = 6
    ref = Path(cli(*run_args(tiny_dir, haystack, tmp_path / "one", n)).stdout.split("results: ")[1].strip())
    ref_samples, ref_trace = lines(ref / "samples.jsonl"), lines(ref / "trace.jsonl")
    ids = [json.loads(x)["id"] for x in ref_samples]
    assert len(ids) == n

    run_dir = tmp_path / "two" / "runs" / ref.name  # the run id does not depend on the number of processes
    shards = run_dir / distributed.SHARDS_DIR
    shards.mkdir(parents=True)
    (run_dir / "config.json").write_bytes((ref / "config.json").read_bytes())
    (shards / "samples.rank0-of-2.jsonl").write_bytes(ref_samples[0] + ref_samples[2][:40])  # killed mid-line
    (shards / "trace.rank0-of-2.jsonl").write_bytes(ref_trace[0])
    (shards / "samples.rank1-of-3.jsonl").write_bytes(ref_samples[1])
    (shards / "trace.rank1-of-3.jsonl").write_bytes(ref_trace[1])

    res = torchrun("-m", "kvbench.cli", *run_args(tiny_dir, haystack, tmp_path / "two", n))
    assert res.stdout.count("results: ") == 1, res.stdout  # rank 0 reports
    assert not shards.exists()
    got = lines(run_dir / "samples.jsonl")
    assert [json.loads(x)["id"] for x in got] == ids
    assert got[0] == ref_samples[0] and got[1] == ref_samples[1]  # kept byte for byte
    assert [without_timings(json.loads(x)) for x in got] == [without_timings(json.loads(x)) for x in ref_samples]
    assert [json.loads(x)["id"] for x in lines(run_dir / "trace.jsonl")] == ids
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (ref, run_dir))
    assert m2["complete"] and m2["n_samples"] == n
    assert m2["summary"] == m1["summary"]
    assert {k: m2[k] for k in ("kv_ratio_prefill", "kv_ratio_end")} == {k: m1[k] for k in ("kv_ratio_prefill", "kv_ratio_end")}
    kept = sum(a == b for a, b in zip(got, ref_samples[:2]))
    print(f"\nsharded resume: kept {kept}, redone {n - kept}, lost {n - len(set(ids))}")


@pytest.mark.slow
def test_killed_job_resumes_without_loss(tmp_path, tiny_dir, haystack):
    """A real 2-rank job killed (SIGKILL to every process of the job) once its shards hold records: nothing is
    merged, the rerun keeps every finished record byte for byte, redoes the rest, and merges to the
    one-process result."""
    import signal
    import time
    n = 8
    longer = ["-t", "max_new_tokens=24"]  # the later -t wins
    args = [*run_args(tiny_dir, haystack, tmp_path / "two", n), *longer]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(CI="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "kvbench.cli",
           *map(str, args)]
    with open(tmp_path / "job.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            found = list((tmp_path / "two" / "runs").glob("*/shards/samples.rank*-of-2.jsonl"))
            if len(found) == 2 and all(len(lines(f)) >= 1 for f in found):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before it was killed: " + (tmp_path / "job.log").read_text()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    run_dir = next((tmp_path / "two" / "runs").iterdir())
    assert not (run_dir / "samples.jsonl").exists() and not (run_dir / "metrics.json").exists()
    before = [x for f in sorted((run_dir / distributed.SHARDS_DIR).glob("samples.*")) for x in lines(f)
              if x.endswith(b"\n")]
    assert 2 <= len(before) < n
    torchrun("-m", "kvbench.cli", *args)
    got = lines(run_dir / "samples.jsonl")
    ref = Path(cli(*run_args(tiny_dir, haystack, tmp_path / "one", n), *longer).stdout.split("results: ")[1].strip())
    assert [without_timings(json.loads(x)) for x in got] == \
        [without_timings(json.loads(x)) for x in lines(ref / "samples.jsonl")]
    kept = sum(x in got for x in before)
    assert kept == len(before)
    print(f"\nkilled job: kept {kept}, redone {n - kept}, lost 0")


@pytest.mark.slow
def test_sharded_sweep_equals_one_process_sweep(tmp_path, tiny_dir, haystack):
    """3 points over 2 ranks: the same outcomes in plan order, the same closing line, one ledger (no rank
    files left), each point's records equal."""
    def config(out: Path) -> Path:
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(f"""
out: {out}
models: [{tiny_dir}]
methods: [full, snapkv, streamingllm]
budgets: [0.5]
tasks: {{niah: {{lengths: [160], depths: [0.0, 0.5], max_new_tokens: 4}}}}
data: {haystack}
""")
        return path

    one = cli("sweep", config(tmp_path / "one")).stdout
    res = torchrun("-m", "kvbench.cli", "sweep", config(tmp_path / "two"))
    done_line = [x for x in one.splitlines() if x.startswith("sweep done:")][0]
    assert done_line.startswith("sweep done: 3 done;")
    assert done_line.replace("/one/", "/two/").replace("one.jsonl", "two.jsonl") in res.stdout
    ledgers = {name: [json.loads(x) for x in lines(tmp_path / name / "sweeps" / f"{name}.jsonl")]
               for name in ("one", "two")}
    assert [(r["point"]["method"], r["status"]) for r in ledgers["two"]] == \
        [(r["point"]["method"], r["status"]) for r in ledgers["one"]]
    assert sorted(p.name for p in (tmp_path / "two" / "sweeps").iterdir()) == ["two.jsonl"]
    for a, b in zip(ledgers["one"], ledgers["two"]):
        ra, rb = ([without_timings(json.loads(x)) for x in lines(Path(r["run_dir"]) / "samples.jsonl")] for r in (a, b))
        assert ra == rb and len(ra) == 2


# ------------------------------------------------------------------------------------------ tensor parallel

@pytest.mark.slow
def test_tensor_parallel_equals_one_process(tmp_path, tiny_dir):
    """Each of 2 ranks holds one of the 2 KV heads: the tokens equal a one-process run's and the first
    logits agree to fp32 rounding, for full, the methods that choose per head (snapkv, pyramidkv, h2o,
    streamingllm, knorm) and those that choose across heads through a collective (adakv's allocation, tova's
    mean over heads); the cache bytes summed over the ranks equal one process's, and adakv's ranks hold
    different amounts (its allocation crossed the ranks)."""
    assert json.loads((tiny_dir / "config.json").read_text())["num_key_value_heads"] == 2
    methods = ["full", "snapkv", "adakv", "tova", "pyramidkv", "h2o", "streamingllm", "knorm"]
    args = dict(budget=0.3, context=300, new_tokens=12)
    ref = distributed.probe(str(tiny_dir), methods, ranks=distributed.SINGLE, logits=True, **args)
    out = tmp_path / "tp.jsonl"
    torchrun("-m", "kvbench.distributed", "--model", tiny_dir, "--methods", ",".join(methods), "--budget", 0.3,
             "--context", 300, "--new-tokens", 12, "--tp", "--logits", "--out", out)
    got = [json.loads(x) for x in lines(out)]
    assert [r["method"] for r in got] == methods
    for one, two in zip(ref, got):
        assert two["tensor_parallel"] == 2 and one["tensor_parallel"] == 1
        assert two["prediction"] == one["prediction"], one["method"]
        assert len(one["prediction"].split()) == 12
        torch.testing.assert_close(torch.tensor(two["first_logits"]), torch.tensor(one["first_logits"]),
                                   rtol=1e-4, atol=1e-4)
        for key in ("kv_bytes_prefill", "kv_bytes_end", "kv_bytes_full_prefill"):
            assert two[key] == one[key] == sum(two[f"{key}_per_rank"]), (one["method"], key)
        assert two["kv_ratio_prefill"] == pytest.approx(one["kv_ratio_prefill"])
        assert len(two["peak_decode_per_rank"]) == 2
    per_rank = {r["method"]: r["kv_bytes_prefill_per_rank"] for r in got}
    assert per_rank["full"][0] == per_rank["full"][1]
    assert per_rank["adakv"][0] != per_rank["adakv"][1]


# ------------------------------------------------------------------------------------------ without torchrun

def test_outside_torchrun_nothing_is_distributed(monkeypatch, tiny_dir, haystack, tmp_path):
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    assert distributed.from_env() == distributed.SINGLE
    res = CliRunner().invoke(main, [str(a) for a in [*run_args(tiny_dir, haystack, tmp_path, 2), "--tp"]])
    assert res.exit_code == 2 and res.stderr.strip().startswith("error: --tp splits the model"), res.output
    assert not (tmp_path / "runs").exists()


def test_sharding_and_method_checks():
    ranks = [distributed.Ranks(r, 3, r) for r in range(3)]
    items = list(range(8))
    shares = [distributed.shard(items, r) for r in ranks]
    assert shares == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert [[i for i in items if distributed.owns(i, r)] for r in ranks] == shares
    tp = distributed.Ranks(0, 2, 0, tensor_parallel=True)
    assert distributed.shard(items, tp) == items and not tp.sharded and tp.writes_records
    assert not distributed.Ranks(1, 2, 1, tensor_parallel=True).writes_records
    for name in ("deltakv", "kvsculpt", "compresskv", "random"):
        with pytest.raises(distributed.DistributedError, match="cannot run tensor parallel"):
            distributed.check_method(name, tp)
    distributed.check_method("deltakv", distributed.SINGLE)


def test_merge_orders_dedups_and_is_idempotent(tmp_path):
    """The merge: one record per id, in the task's order, ids outside it last; a merge cut short (shards
    still there beside a merged file) is redone to the same bytes."""
    run_dir = tmp_path / "run"
    shards = run_dir / distributed.SHARDS_DIR
    shards.mkdir(parents=True)

    def write(path, ids):
        path.write_text("".join(json.dumps({"id": i, "x": "é"}, ensure_ascii=False) + "\n" for i in ids))

    write(run_dir / "samples.jsonl", ["old"])
    write(shards / "samples.rank0-of-2.jsonl", ["a", "c"])
    write(shards / "samples.rank1-of-2.jsonl", ["b", "c"])
    write(shards / "trace.rank1-of-2.jsonl", ["b"])
    assert distributed.finished_ids(run_dir, distributed.SINGLE) == {"old", "a", "b", "c"}
    distributed.merge_records(run_dir, ["a", "b", "c"])
    merged = (run_dir / "samples.jsonl").read_bytes()
    assert [json.loads(x)["id"] for x in merged.splitlines()] == ["a", "b", "c", "old"]
    assert "é".encode() in merged
    assert [json.loads(x)["id"] for x in lines(run_dir / "trace.jsonl")] == ["b"]
    assert not shards.exists()
    shards.mkdir()
    write(shards / "samples.rank0-of-2.jsonl", ["c"])
    distributed.merge_records(run_dir, ["a", "b", "c"])
    assert (run_dir / "samples.jsonl").read_bytes() == merged


def test_finished_ids_read_samples_and_repair_only_this_ranks_trace(tmp_path):
    """The ids come from the sample files; another rank's trace shard is not read (here: a corrupt one, which
    would raise), this rank's trace file is repaired so that its next record starts a line of its own."""
    run_dir = tmp_path / "run"
    shards = run_dir / distributed.SHARDS_DIR
    shards.mkdir(parents=True)
    rank0 = distributed.Ranks(0, 2, 0)
    samples, trace = distributed.record_files(run_dir, rank0)
    samples.write_text(json.dumps({"id": "a"}) + "\n")
    trace.write_text(json.dumps({"id": "a"}) + "\n" + '{"id": "b", "kv')  # torn by a kill
    (shards / "samples.rank1-of-2.jsonl").write_text(json.dumps({"id": "c"}) + "\n")
    (shards / "trace.rank1-of-2.jsonl").write_text("not json\n" + json.dumps({"id": "c"}) + "\n")
    assert distributed.finished_ids(run_dir, rank0) == {"a", "c"}
    assert trace.read_text() == json.dumps({"id": "a"}) + "\n"


def test_ledger_of_a_killed_sharded_sweep_is_folded_in(tmp_path):
    ledger = tmp_path / "sweeps" / "s.jsonl"
    ledger.parent.mkdir()
    (ledger.parent / ".s.rank1-of-2.jsonl").write_text(json.dumps({"point": {"method": "h2o"}, "status": "done"}) + "\n")
    ledger.write_text(json.dumps({"point": {"method": "full"}, "status": "done"}) + "\n")
    out = distributed.merge_ledger(ledger, [(1, {"point": {"method": "full"}, "status": "done"})], distributed.SINGLE)
    assert out == [{"point": {"method": "full"}, "status": "done"}]
    assert [json.loads(x)["point"]["method"] for x in lines(ledger)] == ["full", "h2o"]
    assert not list(ledger.parent.glob(".s.rank*"))


def test_tensor_parallel_needs_heads_that_split(monkeypatch):
    from types import SimpleNamespace
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(distributed.DistributedError, match="4 query heads and 2 KV heads, which do not split over 3"):
        distributed.tensor_parallel_config(SimpleNamespace(num_attention_heads=4, num_key_value_heads=2))
    monkeypatch.setenv("WORLD_SIZE", "2")
    try:
        config = distributed.tensor_parallel_config(SimpleNamespace(num_attention_heads=4, num_key_value_heads=2))
    except distributed.DistributedError as e:  # a transformers without DTensor tensor parallelism
        assert "upgrade transformers" in str(e)
    else:
        assert config.tp_plan == "auto"


def test_a_tensor_parallel_run_is_not_the_sweeps_one_process_point():
    from kvbench.sweep import _config_identity
    config = {"model": "tiny-llama", "method": "snapkv", "task": "niah", "budget": 0.5, "device": "cpu"}
    assert _config_identity({**config, "tensor_parallel": 2}) != _config_identity(config)
    assert _config_identity({**config, "tensor_parallel": None}) == _config_identity(config)
