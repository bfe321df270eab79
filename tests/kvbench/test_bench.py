"""Traces of a real (tiny) run, and ``kvbench bench`` on the CPU.

"Never above full", precisely: at every traced point of a sample (the end of prefill, and every
``trace_every`` decoding steps) and in every layer, the bytes a compressing method's store holds (all its
tensors: keys, values, positions, per-slot state, bookkeeping) are at most what the ``full`` method's store
holds at the same point of the same sample. It is not "at most the formula" ``kv_bytes_full_*`` (keys and
values of the tokens seen, nothing else): ``full`` itself is above that formula, by its int32 positions
(4 bytes a slot), its per-segment bookkeeping and the slack it grows by, which the test bounds.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvbench import results
from kvbench.cli import main
from kvbench.models import LoadedModel, random_model
from kvbench.harness import RunConfig, run

TRACE_EVERY = 2
NEW = 7
COMPRESSING = ["snapkv", "streamingllm", "h2o"]


@pytest.fixture(scope="module")
def traced_runs(tmp_path_factory):
    import torch
    from tests.conftest import make_tokenizer
    out = tmp_path_factory.mktemp("runs")
    model, _ = random_model("tiny-llama", torch.float32, "cpu", 0)
    model.generation_config.eos_token_id = None  # every method decodes the same number of steps
    lm = LoadedModel(model, make_tokenizer(), "tiny-llama", 4096)
    dirs = {}
    for method in ["full"] + COMPRESSING:
        cfg = RunConfig(method=method, task="niah", budget=1.0 if method == "full" else 0.5,
                        task_params={"lengths": [300, 400], "depths": [0.5], "max_new_tokens": NEW},
                        trace_every=TRACE_EVERY, out=str(out))
        dirs[method] = run(cfg, lm=lm, progress=False)
    return dirs


def _trace(run_dir: Path) -> dict[str, dict]:
    return {r["id"]: r for r in results.read_jsonl(run_dir / "trace.jsonl")}


def test_trace_fields_present_and_consistent(traced_runs):
    for method, run_dir in traced_runs.items():
        samples = {r["id"]: r for r in results.read_jsonl(run_dir / "samples.jsonl")}
        trace = _trace(run_dir)
        assert set(trace) == set(samples) and len(trace) == 2
        for sid, t in trace.items():
            s = samples[sid]
            for key in ("prefill_s", "compress_s", "decode_s", "ttft_s", "tpot_s", "tokens_per_s", "new_tokens",
                        "batch_size", "peak_prefill", "peak_batching", "peak_decode", "kv_layer_bytes_prefill",
                        "kv_layer_bytes_steps"):
                assert key in t, (method, key)
            assert t["prefill_s"] > 0 and t["decode_s"] > 0 and t["compress_s"] >= 0
            assert t["ttft_s"] == t["prefill_s"]
            assert t["new_tokens"] == NEW and s["decode_steps"] == NEW - 1
            assert t["tpot_s"] * s["decode_steps"] == pytest.approx(t["decode_s"])
            # steady state: the steps after the first (warm-up) one, so never more time than all of them
            assert 0 < t["tpot_steady_s"] * (s["decode_steps"] - 1) <= t["decode_s"]
            assert t["tokens_per_s"] == pytest.approx(NEW / t["decode_s"])
            for phase in ("peak_prefill", "peak_batching", "peak_decode"):
                assert t[phase]["rss"] > 0  # on the CPU: resident memory
            layers = t["kv_layer_bytes_prefill"]
            assert len(layers) == 2 and sum(layers) == s["kv_bytes_prefill"]
            steps = {int(k): v for k, v in t["kv_layer_bytes_steps"].items()}
            assert sorted(steps) == list(range(TRACE_EVERY, NEW, TRACE_EVERY))
            assert all(len(v) == 2 and min(v) > 0 for v in steps.values())


def test_full_is_above_the_formula_only_by_positions_bookkeeping_and_slack(traced_runs):
    for s in results.read_jsonl(traced_runs["full"] / "samples.jsonl"):
        # tiny-llama in float32: keys + values are 2 x 16 x 4 = 128 bytes a slot, positions 4 more.
        per_slot = 1 + 4 / 128
        slack = 1 + max(16, (s["context_tokens"] + s["question_tokens"]) // 32 + 15) / (
            s["context_tokens"] + s["question_tokens"])
        assert 1.0 < s["kv_ratio_prefill"] <= per_slot * slack + 0.01
        assert 1.0 < s["kv_ratio_end"] <= per_slot * slack + 0.01


def test_compressing_methods_never_hold_more_than_full(traced_runs):
    full = _trace(traced_runs["full"])
    for method in COMPRESSING:
        for sid, t in _trace(traced_runs[method]).items():
            ref = full[sid]
            points = [(0, t["kv_layer_bytes_prefill"], ref["kv_layer_bytes_prefill"])]
            points += [(k, v, ref["kv_layer_bytes_steps"][k]) for k, v in t["kv_layer_bytes_steps"].items()]
            assert len(points) == 1 + len(range(TRACE_EVERY, NEW, TRACE_EVERY))
            for step, mine, theirs in points:
                for layer, (a, b) in enumerate(zip(mine, theirs)):
                    assert a <= b, (method, sid, step, layer, a, b)
                # and well below: half the context is kept (the question is appended whole)
                assert sum(mine) < 0.8 * sum(theirs), (method, sid, step)


def _broken_kvpress(tmp_path: Path) -> Path:
    """A directory whose ``kvpress`` cannot be imported: the peer must be reported absent, not faked."""
    site = tmp_path / "site"
    (site / "kvpress").mkdir(parents=True)
    (site / "kvpress" / "__init__.py").write_text("raise ImportError('kvpress is not usable here')\n")
    return site


def test_bench_on_cpu_with_a_tiny_preset(tmp_path):
    out = tmp_path / "bench" / "tiny"
    args = ["bench", "--preset", "tiny-llama", "--contexts", "40", "--batches", "1,2", "--methods", "full,snapkv,h2o",
            "--budgets", "0.5", "--new-tokens", "4", "--peers", "hf,kvpress", "--kvpress-path",
            str(_broken_kvpress(tmp_path)), "--device", "cpu", "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in (out / "bench.jsonl").read_text().splitlines()]
    env = next(r for r in recs if r["kind"] == "env")
    assert env["copy_bandwidth"] > 0 and env["weight_bytes_read"] > 0 and env["kv_token_bytes"] == 2 * 2 * 2 * 16 * 4
    points = [r for r in recs if r["kind"] == "point"]
    mine = [r for r in points if r["impl"] == "kvbench"]
    assert sorted((r["method"], r["batch"]) for r in mine) == [("full", 1), ("full", 2), ("h2o", 1), ("h2o", 2),
                                                                  ("snapkv", 1), ("snapkv", 2)]
    hf = [r for r in points if r["impl"] == "hf"]
    assert sorted(r["batch"] for r in hf) == [1, 2]
    for r in mine + hf:
        assert r["status"] == "ok", r
        assert r["decode_steps"] == 3 and r["prefill_s"] > 0 and r["decode_s"] > 0
        assert r["decode_tok_s"] == pytest.approx(r["batch"] * 3 / r["decode_s"])
        assert r["floor_s"] > 0 and r["x_floor"] == pytest.approx(r["tpot_s"] / r["floor_s"])
        if r["impl"] == "kvbench":
            assert r["x_floor_steady"] == pytest.approx(r["tpot_steady_s"] / r["floor_s"])
        assert r["peak"]["rss"] > 0 and r["kv_bytes_seq"] > 0
    snap = {r["batch"]: r for r in mine if r["method"] == "snapkv"}
    full = {r["batch"]: r for r in mine if r["method"] == "full"}
    assert snap[1]["kv_bytes_seq"] < 0.7 * full[1]["kv_bytes_seq"]
    assert snap[1]["floor_s"] < full[1]["floor_s"]
    # floor(B) = (weights + B x KV per sequence) / bandwidth: one more sequence adds its KV only
    weights_s = env["weight_bytes_read"] / env["copy_bandwidth"]
    assert full[2]["floor_s"] - full[1]["floor_s"] == pytest.approx(full[1]["floor_s"] - weights_s)
    kp = [r for r in points if r["impl"] == "kvpress"]
    assert len(kp) == 2 and all(r["status"] == "absent" and "kvpress is not usable here" in r["error"] for r in kp)
    targets = next(r for r in recs if r["kind"] == "comparisons")["rows"]
    assert all(set(t) == {"what", "value"} for t in targets)  # ratios only: no project goals in product output
    assert any("HF generate" in t["what"] for t in targets)
    # every method's step against its floor and its prefill against transformers'; an evicting method beside snapkv
    ratios = {t["what"]: t["value"] for t in targets}
    for m in ("full", "snapkv @ 0.5", "h2o @ 0.5"):
        for b in (1, 2):
            assert ratios[f"kvbench TPOT / step floor, {m}, ctx 40, batch {b}"] > 0
            assert ratios[f"kvbench prefill (compression included) / HF prefill, {m}, ctx 40, batch {b}"] > 0
    h2o = next(r for r in mine if r["method"] == "h2o" and r["batch"] == 2)
    assert ratios["kvbench TPOT / snapkv TPOT, h2o @ 0.5, ctx 40, batch 2"] == pytest.approx(
        (h2o["tpot_steady_s"] or h2o["tpot_s"]) / (snap[2]["tpot_steady_s"] or snap[2]["tpot_s"]))
    assert not any("kvpress" in t["what"] for t in targets)  # an absent peer is compared with nothing
    table = (out / "bench.md").read_text()
    assert "| kvpress | snapkv | 0.5 | 40 | 1 | absent: ImportError: kvpress is not usable here |" in table
    assert "largest batch: measured on CUDA only" in res.output


def test_bench_errors_are_one_line(tmp_path):
    cases = [(["--preset", "nope"], "unknown preset 'nope'"),
             (["--preset", "tiny-llama", "--peers", "vllm"], "unknown peer 'vllm'"),
             (["--preset", "tiny-llama", "--methods", "nope"], "unknown method 'nope'"),
             (["--preset", "tiny-llama", "--contexts", "4090"], "exceeds the model's window"),
             (["--preset", "tiny-llama", "--batches", "x"], "comma-separated list of ints"),
             (["--preset", "tiny-llama", "--freeze-weights"], "--freeze-weights freezes the compiled decoding step")]
    for extra, needle in cases:
        res = CliRunner().invoke(main, ["bench", "--device", "cpu", "--out", str(tmp_path / "b")] + extra)
        lines = [x for x in res.output.strip().splitlines() if x]
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], (extra, res.output)


def test_bench_compiles_the_decoding_step_when_asked(tmp_path):
    out = tmp_path / "bench-compiled"
    args = ["bench", "--preset", "tiny-llama", "--contexts", "40", "--batches", "1", "--methods", "full",
            "--new-tokens", "4", "--peers", "", "--compile", "--device", "cpu", "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in (out / "bench.jsonl").read_text().splitlines()]
    assert next(r for r in recs if r["kind"] == "env")["config"]["compile_decode"] is True
    assert [r["status"] for r in recs if r["kind"] == "point"] == ["ok"]
    assert "decoding step is compiled (torch.compile)" in (out / "bench.md").read_text()


def test_bench_puts_the_skinny_gemm_kernel_in_the_compiled_step_when_asked(tmp_path, monkeypatch):
    """--skinny-gemm: the decoding step's linear layers through the Triton kernel (here Triton's interpreter),
    inside the compiled step; the env record and the table say so."""
    from kvbench.kernels import skinny_gemm
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("KVBENCH_TRITON", "1")
    launches = []
    launch = skinny_gemm._launch_shape
    monkeypatch.setattr(skinny_gemm, "_launch_shape", lambda *a: (launches.append(a[0].shape[0]), launch(*a)))
    out = tmp_path / "bench-skinny"
    args = ["bench", "--preset", "tiny-llama", "--contexts", "40", "--batches", "2", "--methods", "full",
            "--new-tokens", "4", "--peers", "", "--compile", "--skinny-gemm", "--device", "cpu", "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in (out / "bench.jsonl").read_text().splitlines()]
    assert next(r for r in recs if r["kind"] == "env")["config"]["skinny_gemm"] is True
    assert [r["status"] for r in recs if r["kind"] == "point"] == ["ok"]
    assert launches.count(2) > 0  # decoding steps of the batch of two went through the kernel
    assert "through kvbench's skinny GEMM kernel" in (out / "bench.md").read_text()


def test_largest_batch_search_falls_back_to_the_reserved_peaks_after_an_out_of_memory_error():
    """An allocator that fragments: 55 (the allocated peaks' line) does not run, 40 (the reserved peaks') does;
    without a smaller cautious guess the search steps down 5% at a time and stops after four attempts."""
    from kvbench.bench import largest_batch_search, render
    run = lambda b: {"status": "oom" if b > 45 else "ok", "batch": b}  # noqa: E731
    rec, tried = largest_batch_search(55, 40, run)
    assert rec == {"status": "ok", "batch": 40} and tried == ["55 oom", "40 ok"]
    rec, tried = largest_batch_search(55, 55, run)
    assert rec["status"] == "oom" and tried == ["55 oom", "53 oom", "51 oom", "49 oom"]
    assert largest_batch_search(47, 60, run)[1] == ["47 oom", "45 ok"]  # a larger cautious guess is no help
    model = {"bytes_per_sequence": 2 * 2**30, "fixed_bytes": 20 * 2**30, "capacity": 139 * 2**30, "predicted": 55,
             "predicted_reserved": 40, "tried": ["55 oom", "53 oom", "51 oom", "49 oom"]}
    measured = Path(__file__).resolve().parents[2] / "results/bench/h200-llama-3.1-8b-compiled-2/bench-kvcar-kernel-5d2cd44.jsonl"
    records = [json.loads(line) for line in measured.read_text().splitlines()]
    (last,) = [r for r in records if r.get("kind") == "largest_batch_result" and r["method"] == "kvcar"]
    last.update(batch=49, status="oom", memory_model=model)
    text = render(records)
    assert "predicted 55 (40 by the reserved peaks), ran 49 (oom); tried 55 oom, 53 oom, 51 oom, 49 oom" in text


def test_the_step_floor_counts_the_bytes_the_method_holds(tmp_path):
    """The floor's KV is what the method holds while decoding (measured after the prefill and at the end), not
    full-size keys and values of ``budget`` x the context: kvcar ignores the budget (it keeps every token, as
    codes), h2o holds its budget while decoding. The floor had kvcar reading full-size bytes of half its tokens."""
    out = tmp_path / "bench-held"
    args = ["bench", "--preset", "tiny-llama", "--contexts", "64", "--batches", "1,2", "--methods", "full,kvcar,h2o",
            "--budgets", "0.5", "--new-tokens", "8", "--peers", "", "--device", "cpu", "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in (out / "bench.jsonl").read_text().splitlines()]
    env = next(r for r in recs if r["kind"] == "env")
    points = [r for r in recs if r["kind"] == "point"]
    assert sorted(r["method"] for r in points) == ["full", "full", "h2o", "h2o", "kvcar", "kvcar"]
    for r in points:
        assert r["status"] == "ok", r
        kv_seq = (r["floor_s"] * env["copy_bandwidth"] - env["weight_bytes_read"]) / r["batch"]
        assert kv_seq == pytest.approx((r["kv_bytes_prefill_seq"] + r["kv_bytes_seq"]) / 2, rel=1e-6), r["method"]
    kvcar = next(r for r in points if r["method"] == "kvcar" and r["batch"] == 1)
    half_context = env["kv_token_bytes"] * (32 + 7 / 2)  # the old floor: full-size bytes of half the context
    assert kvcar["kv_bytes_prefill_seq"] > 1.1 * half_context


def test_every_method_warms_at_every_context_and_batch_before_any_point_is_timed(tmp_path, monkeypatch):
    """A method's own kernels have size-dependent variants (Triton compiles one per shape class on first use): the
    decode-time evictors' first points at 32k paid 0.3-0.8 s of it inside their TPOT where snapkv's did not
    (warmed at each (context, batch) with the first method only). Every (method, budget) now runs one prefill and
    one decoding step at every (context, batch) before the first timed point."""
    from kvbench import bench as bench_mod
    calls = []
    real = bench_mod.Bench.kvbench_point

    def recording(self, method, budget, context, batch, new_tokens=None):
        calls.append((method, budget, context, batch, new_tokens))
        return real(self, method, budget, context, batch, new_tokens)

    monkeypatch.setattr(bench_mod.Bench, "kvbench_point", recording)
    args = ["bench", "--preset", "tiny-llama", "--contexts", "40,48", "--batches", "1,2", "--methods", "full,h2o",
            "--budgets", "0.5", "--new-tokens", "3", "--peers", "", "--no-largest-batch", "--device", "cpu",
            "--out", str(tmp_path / "bench-warm")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    timed = [c for c in calls if c[4] is None]
    first_timed = calls.index(timed[0])
    warmed = {c[:4] for c in calls[:first_timed] if c[4] == 2}
    assert {c[:4] for c in timed} == warmed and len(timed) == 2 * 2 * 2


def test_bench_pdl_is_recorded_as_asked_and_in_effect_and_the_environment_restored(tmp_path, monkeypatch):
    """``--pdl``: KVBENCH_PDL=1 for the bench's run only; the config records it was asked for, the env record
    whether it was in effect (never on the CPU); with --compile on a torch whose inductor lacks the option, one
    line before any model is loaded."""
    import os

    from kvbench import engine
    monkeypatch.delenv("KVBENCH_PDL", raising=False)
    out = tmp_path / "bench-pdl"
    args = ["bench", "--preset", "tiny-llama", "--contexts", "40", "--batches", "1", "--methods", "full",
            "--new-tokens", "3", "--peers", "", "--no-largest-batch", "--pdl", "--device", "cpu", "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    env = next(r for r in map(json.loads, (out / "bench.jsonl").read_text().splitlines()) if r["kind"] == "env")
    assert env["config"]["pdl"] is True and env["pdl"] is False
    assert "KVBENCH_PDL" not in os.environ
    monkeypatch.setattr(engine, "inductor_has_pdl", lambda: False)
    loads = []
    monkeypatch.setattr("kvbench.models.load", lambda *a, **k: loads.append(a))
    res = CliRunner().invoke(main, args + ["--compile"])
    assert res.exit_code != 0 and "--pdl with --compile needs inductor's triton.enable_pdl" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not loads
    assert "KVBENCH_PDL" not in os.environ
