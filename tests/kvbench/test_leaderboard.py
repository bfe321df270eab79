"""Leaderboard aggregation and ranking, plots, the HTML report and sweeps.

Synthetic run directories are written in the runner's layout (config.json, metrics.json, samples.jsonl,
trace.jsonl), so aggregation is tested on known numbers; the sweep test makes real (tiny) runs.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from kvbench import leaderboard as lb
from kvbench import plots, registry, report, results
from kvbench.cli import main
from kvbench.method import Method


def make_run(root: Path, method: str, budget: float, protocol: str, score: float, ratio: float, *,
             task: str = "niah", model: str = "tiny-model", complete: bool = True, error: dict | None = None,
             lengths=(1000, 2000), depths=(0.0, 0.5, 1.0), kv_steps: bool = False, task_params=None) -> Path:
    run_dir = root / "runs" / f"{task}-{method}-{budget}-{protocol}-{model}{'-' + str(len(task_params)) if task_params else ''}"
    run_dir.mkdir(parents=True)
    config = {"task": task, "method": method, "budget": budget, "protocol": protocol, "model": model,
              "model_name": model, "batch_size": 1, "device": "cpu", "dtype": "float32",
              "method_params": {"budget": budget}, "task_params": task_params or {}}
    results.write_json(run_dir / "config.json", config)
    grid = []
    for i, length in enumerate(lengths):
        for depth in depths:
            s = {"id": f"{length}-{depth}", "meta": {"length": length, "depth": depth}, "scores": {"score": score},
                 "kv_ratio_prefill": ratio, "kv_ratio_end": ratio, "tokens_per_s": 10.0 + i, "batch_size": 1,
                 "context_tokens": length}
            results.append_jsonl(run_dir / "samples.jsonl", s)
            steps = {str(k): [1000 * ratio * (1 + k / 100)] * 2 for k in (2, 4)} if kv_steps else {}
            results.append_jsonl(run_dir / "trace.jsonl", {
                "id": s["id"], "kv_layer_bytes_prefill": [1000 * ratio] * 2, "kv_layer_bytes_steps": steps,
                "peak_prefill": {"rss": 2 ** 30}, "peak_decode": {"rss": int(2 ** 30 * (1 + ratio))}})
            grid.append({"length": length, "depth": depth, "score": score})
    if complete:
        results.write_json(run_dir / "metrics.json", {
            "task": task, "method": method, "budget": budget, "protocol": protocol, "model": model,
            "n_samples": len(grid), "complete": True, "summary": {"score": score, "grid": grid},
            "kv_ratio_prefill": ratio, "kv_ratio_end": ratio, "tokens_per_s": 10.5, "tpot_s": 0.1, "prefill_s": 0.2})
    if error:
        results.write_json(run_dir / "error.json", error)
    return run_dir


@pytest.fixture
def board(tmp_path) -> Path:
    """Two methods whose knobs mean different memory: at budget 0.25 B scores higher than A, but at the
    same measured memory A is better. The query-aware protocol has the opposite order."""
    for proto, (a_scores, b_scores) in {"query-agnostic": ((50, 80), (55, 85)),
                                        "query-aware": ((10, 20), (90, 95))}.items():
        make_run(tmp_path, "full", 1.0, proto, 100.0, 1.03, kv_steps=True)
        for (budget, ra, rb), sa, sb in zip([(0.25, 0.2, 0.3), (0.5, 0.4, 0.6)], a_scores, b_scores):
            make_run(tmp_path, "alpha", budget, proto, float(sa), ra, kv_steps=True)
            make_run(tmp_path, "beta", budget, proto, float(sb), rb, kv_steps=True)
    make_run(tmp_path, "gamma", 0.25, "query-agnostic", 0.0, 0.2, complete=False)
    make_run(tmp_path, "delta", 0.25, "query-agnostic", 0.0, 0.2, complete=False,
             error={"status": "oom", "error": "OutOfMemoryError: CUDA out of memory"})
    return tmp_path


def test_collect_one_row_per_run_with_status(board):
    df = lb.collect(board)
    assert len(df) == 12
    status = dict(zip(df["method"] + "/" + df["protocol"], df["status"]))
    assert status["gamma/query-agnostic"] == "incomplete" and status["delta/query-agnostic"] == "oom"
    assert (df[df["method"].isin(["alpha", "beta", "full"])]["status"] == "complete").all()
    fails = lb.failures(df)
    assert list(fails["method"]) == ["delta"] and "out of memory" in fails["error"].iloc[0]
    table = lb.runs_table(df)
    assert set(table["method"]) == {"full", "alpha", "beta"}  # unfinished and failed runs stay out
    row = table[(table["method"] == "beta") & (table["budget"] == 0.25) & (table["protocol"] == "query-agnostic")]
    assert row["niah score"].item() == 55 and row["niah kv ratio"].item() == pytest.approx(0.3)


def test_method_variants_stay_apart():
    """A run that set a method's parameters away from its defaults is its own row, named by them."""
    assert lb.method_label("kvsculpt", {"budget": 0.3}) == "kvsculpt"
    assert lb.method_label("kvsculpt", {"budget": 0.3, "adaptive": True, "floor": 0.25}) == "kvsculpt(adaptive=True)"
    assert lb.method_label("snapkv", {"window": 8, "kernel": 9}) == "snapkv(kernel=9,window=8)"
    assert lb.method_label("alpha", {"x": 1}) == "alpha"  # not a registered method: its name as it is


@pytest.mark.parametrize("name", sorted(registry.METHODS))
def test_default_parameters_as_recorded_label_the_bare_name(name):
    """A run at a method's defaults records ``asdict`` of it through JSON (a factory-made default such as AdaKV's
    SnapKV scorer as a dict, tuples as lists): its label is the bare name, or every recorded row of the method
    would look like a variant (and `sweep --recorded` would run it again)."""
    try:
        recorded = json.loads(json.dumps(dataclasses.asdict(registry.build_method(name, 0.25, {})), default=str))
    except (ValueError, FileNotFoundError, OSError) as err:  # a method that needs an artifact to be built
        pytest.skip(f"{name} needs more than defaults here: {err}")
    assert lb.method_label(name, recorded) == name


def test_a_changed_nested_default_is_a_variant():
    recorded = json.loads(json.dumps(dataclasses.asdict(registry.build_method("adakv", 0.25, {}))))
    recorded["scorer"]["window"] = 8
    assert lb.method_label("adakv", recorded) == "adakv(scorer.window=8)"


@dataclasses.dataclass
class _EvictWithSeed:
    budget: float = 1.0
    seed: int = 0
    window: int = 32


@dataclasses.dataclass
class _CodecWithSeed:
    budget: float = 1.0
    seed: int = 0
    artifact: str | None = None


def test_composed_variants_stay_apart(monkeypatch):
    """snapkv+kvcar runs with two codecs are two rows: the label carries both parts' changed parameters (a run's
    config stores a composed method's parameters as {"evict": ..., "codec": ...})."""
    params = {"budget": 0.19, "evict": {"budget": 0.19, "window": 32, "kernel": 5},
              "codec": {"budget": 1.0, "artifact": "checkpoints/kvcar-a-long", "reuse": False}}
    assert lb.method_label("snapkv+kvcar", params) == "snapkv+kvcar(artifact=kvcar-a-long,reuse=False)"
    assert lb.method_label("snapkv+kvcar", {**params, "codec": {"reuse": True}}) == "snapkv+kvcar"
    # a key both parts changed is written as -m routes it: part.key
    monkeypatch.setitem(registry.METHODS, "ev", f"{__name__}:_EvictWithSeed")
    monkeypatch.setitem(registry.METHODS, "co", f"{__name__}:_CodecWithSeed")
    assert lb.method_label("ev+co", {"evict": {"seed": 1, "window": 8}, "codec": {"seed": 2, "artifact": "x/y"}}) \
        == "ev+co(artifact=y,co.seed=2,ev.seed=1,window=8)"


def test_an_earlier_table_names_its_runs_as_their_folders_would(tmp_path):
    """A table written when composed methods carried no parameters in their name joins a new table under today's
    names: its snapkv+kvcar run stays apart from the same method with another codec."""
    run = make_run(tmp_path / "old", "snapkv+kvcar", 0.19, "query-agnostic", 50.0, 0.1)
    config = results.read_json(run / "config.json")
    results.write_json(run / "config.json", {**config, "method_params": {
        "budget": 0.19, "evict": {"budget": 0.19}, "codec": {"budget": 1.0, "artifact": "checkpoints/kvcar-a"}}})
    assert CliRunner().invoke(main, ["leaderboard", "--root", str(tmp_path / "old"), "--out", str(tmp_path)]).exit_code == 0
    table = json.loads((tmp_path / "leaderboard.json").read_text())
    assert [r["method"] for r in table["runs"]] == ["snapkv+kvcar(artifact=kvcar-a)"]
    for r in table["runs"]:
        r["method"] = "snapkv+kvcar"  # as the table of 2026-12-02 wrote it
    (tmp_path / "leaderboard.json").write_text(json.dumps(table))
    assert list(lb.earlier(tmp_path / "leaderboard.json")["method"]) == ["snapkv+kvcar(artifact=kvcar-a)"]

def test_a_task_without_full_is_still_ranked(tmp_path):
    make_run(tmp_path, "alpha", 0.25, "query-agnostic", 50.0, 0.3)
    make_run(tmp_path, "beta", 0.25, "query-agnostic", 60.0, 0.3)
    ranks = lb.ranking(lb.collect(tmp_path))
    assert list(ranks["method"]) == ["beta", "alpha"] and "niah full (ratio, score)" not in ranks.columns


def test_interpolation_never_extrapolates():
    pts = [(0.2, 50.0), (0.4, 80.0)]
    assert lb.interpolate(pts, 0.3) == pytest.approx(65.0)
    assert lb.interpolate(pts, 0.41) == 80.0  # within the tolerance: the end point
    assert lb.interpolate(pts, 0.5) is None and lb.interpolate(pts, 0.1) is None


def test_budgets_of_about_the_same_memory_make_one_level(tmp_path):
    # a token budget and a fraction that hold about the same memory (0.097 and 0.112, closer than the
    # tolerance) are one matched-memory level: alpha's single run fills one column and counts once
    make_run(tmp_path, "alpha", 0.1, "query-agnostic", 40.0, 0.112)
    make_run(tmp_path, "beta", 0.1, "query-agnostic", 30.0, 0.112)
    make_run(tmp_path, "beta", 512, "query-agnostic", 20.0, 0.097)
    make_run(tmp_path, "beta", 0.5, "query-agnostic", 70.0, 0.5)
    df = lb.collect(tmp_path)
    assert lb.default_levels(df, "kv_ratio_prefill") == [0.105, 0.5]
    by = lb.ranking(df).set_index("method")
    assert [c for c in by.columns if "score@" in c] == ["niah score@0.105"]  # beta alone at 0.5: not ranked
    assert by.loc["alpha", "cells ranked"] == 1 and by.loc["alpha", "niah score@0.105"] == 40.0
    assert by.loc["beta", "niah score@0.105"] == pytest.approx(20 + 10 * 0.008 / 0.015)


def test_codecs_at_one_budget_each_make_their_own_level(tmp_path):
    # codecs run at budget 1.0 and hold what their latents hold: a level at the median of that budget's runs
    # (0.49 here) would lie away from every run, leaving a ranked column no method has a score in
    make_run(tmp_path, "alpha", 1.0, "query-agnostic", 70.0, 0.53)
    make_run(tmp_path, "beta", 1.0, "query-agnostic", 55.0, 0.455)
    make_run(tmp_path, "gamma", 1.0, "query-agnostic", 60.0, 0.27)
    make_run(tmp_path, "gamma", 0.9, "query-agnostic", 62.0, 0.79)
    df = lb.collect(tmp_path)
    assert lb.default_levels(df, "kv_ratio_prefill") == [0.27, 0.455, 0.53, 0.79]
    by = lb.ranking(df).set_index("method")
    assert by.loc["alpha", "niah score@0.53"] == 70.0 and by.loc["beta", "niah score@0.455"] == 55.0
    # gamma is alone at its own two points (rank 1 of 1 would flatter it): those levels rank nothing
    assert [c for c in by.columns if "score@" in c] == ["niah score@0.455", "niah score@0.53"]
    assert by.loc["gamma", "cells ranked"] == 2 and by.loc["alpha", "cells ranked"] == 1
    make_run(tmp_path, "delta", 1.0, "query-agnostic", 50.0, 0.05)  # near no other method: listed, unranked
    by = lb.ranking(lb.collect(tmp_path)).set_index("method")
    assert by.loc["delta", "cells ranked"] == 0 and pd.isna(by.loc["delta", "mean rank"])
    assert lb.render_markdown(df)  # every ranked column belongs to some method


def test_a_parameter_added_later_at_its_default_ranks_beside_the_runs_before_it(tmp_path):
    # fidelity's stepwise came after runs were recorded without it; at its default (what they did) a new run
    # shares their setting, set to true it is another setting
    old = {"context_len": 64, "continuation_len": 8}
    make_run(tmp_path, "alpha", 0.25, "query-agnostic", 90.0, 0.25, task="fidelity", task_params=old)
    make_run(tmp_path, "beta", 0.25, "query-agnostic", 80.0, 0.25, task="fidelity",
             task_params={**old, "stepwise": False})
    make_run(tmp_path, "gamma", 0.25, "query-agnostic", 70.0, 0.25, task="fidelity",
             task_params={**old, "stepwise": True})
    setting = lb.collect(tmp_path).set_index("method")["setting"]
    assert setting["alpha"] == setting["beta"] != setting["gamma"]


@dataclasses.dataclass
class _ArtifactReader(Method):
    budget: float = 1.0
    artifact: str | None = None


def _with_artifact(run: Path, sha: str | None, created: str) -> Path:
    config = results.read_json(run / "config.json")
    results.write_json(run / "config.json", {**config, "created": created,
                                             "method_params": {"budget": 1.0, "artifact": "checkpoints/codec"},
                                             **({"artifact_sha256": sha} if sha else {})})
    return run


def test_a_codec_retrained_under_the_same_name_is_another_method(tmp_path, monkeypatch):
    """Two runs of one method and parameters whose artifacts differ (a codec retrained into the same directory)
    are two rows, each labelled with its artifact's checksum: neither replaces the other as the newer run of one
    configuration, and a table that did not record the checksum (before 2026-12-03) stays apart as unrecorded."""
    monkeypatch.setitem(registry.METHODS, "reader", f"{__name__}:_ArtifactReader")
    first = _with_artifact(make_run(tmp_path / "a", "reader", 1.0, "query-aware", 20.0, 0.5), "1" * 64, "2026-12-01")
    second = _with_artifact(make_run(tmp_path / "b", "reader", 1.0, "query-aware", 90.0, 0.8), "2" * 64, "2026-12-02")
    second.rename(second.with_name(second.name + "-retrained"))  # run ids differ by the artifact's checksum
    assert CliRunner().invoke(main, ["leaderboard", "--root", str(tmp_path / "a"), "--out", str(tmp_path)]).exit_code == 0
    table = json.loads((tmp_path / "leaderboard.json").read_text())
    assert [(r["method"], r["artifact"]) for r in table["runs"]] == [("reader(artifact=codec)", "1" * 12)]
    both = lb.newest(lb.collect(tmp_path / "b", tables=(tmp_path / "leaderboard.json",)))
    assert sorted(zip(both["method"], both["score"])) == [
        (f"reader(artifact=codec)#{'1' * 12}", 20.0), (f"reader(artifact=codec)#{'2' * 12}", 90.0)]
    for r in table["runs"]:
        del r["artifact"]  # as a table written before the column existed
    (tmp_path / "leaderboard.json").write_text(json.dumps(table))
    labels = set(lb.collect(tmp_path / "b", tables=(tmp_path / "leaderboard.json",))["method"])
    assert labels == {"reader(artifact=codec)#unrecorded", f"reader(artifact=codec)#{'2' * 12}"}
    shutil.rmtree(first.parent.parent)  # one artifact only: the label stays as it was
    assert set(lb.collect(tmp_path / "b")["method"]) == {"reader(artifact=codec)"}


def test_a_sweep_runs_again_what_was_recorded_with_another_artifact(tmp_path, monkeypatch):
    """`kvbench sweep --recorded` skips a point only when the table's run read the same artifact (its checksum):
    a retrained codec under the same directory name runs again; a run recorded without the checksum counts as
    another artifact."""
    from kvbench import artifact, sweep
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(registry.METHODS, "reader", f"{__name__}:_ArtifactReader")
    codec = tmp_path / "checkpoints" / "codec"
    codec.mkdir(parents=True)
    (codec / "artifact.json").write_text('{"made": 1}')
    point = sweep.RunConfig(method="reader", task="fidelity", budget=0.25, model="tiny-model",
                            method_params={"artifact": "checkpoints/codec"}, device="cpu", dtype="float32")
    key = sweep.point_key(point)
    assert json.loads(key)[-1] == artifact.identity(["checkpoints/codec"])[:12]
    (codec / "artifact.json").write_text('{"made": 2}')  # retrained: same directory, other contents
    assert sweep.point_key(point) != key


def test_a_sweep_does_not_run_again_what_was_recorded_before_a_parameter_existed():
    from kvbench import sweep
    old = {"context_len": 64, "continuation_len": 8, "n_samples": 8, "name": "fidelity", "source": None}
    key = lambda params: sweep._recorded_key("tiny-model", "fidelity", "query-agnostic", "snapkv", 0.25, {},
                                             params, 1, None, "cpu", "float32")
    assert key(old) == key({**old, "stepwise": False}) != key({**old, "stepwise": True})


def test_a_sweep_does_not_run_again_what_was_recorded_before_a_method_parameter_existed():
    from dataclasses import asdict
    from kvbench import sweep
    key = lambda method, params: sweep._recorded_key("tiny-model", "fidelity", "query-agnostic", method, 0.25, params,
                                                     {}, 1, None, "cpu", "float32")
    now = asdict(registry.build_method("snapkv", 0.25))
    before = {k: v for k, v in now.items() if k != "kernel"}  # a row made before snapkv had that parameter
    assert key("snapkv", before) == key("snapkv", now) != key("snapkv", {**now, "kernel": now["kernel"] + 2})
    composed = {"evict": now, "codec": {"latent_dim": 32}}  # a composition's parts count apart
    assert key("snapkv+kvcar", composed) != key("snapkv+kvcar", {**composed, "codec": {"latent_dim": 16}})


def test_breakdown_tags_the_rows_it_keeps_from_an_earlier_table_as_their_runs(tmp_path):
    # fidelity runs recorded in a table without their samples, printed once without a settings tag; a run of
    # another setting joins: the kept rows get their runs' tag, so no row looks like a setting of its own
    import sys
    repo = Path(__file__).resolve().parents[2]
    breakdown = lambda *args: subprocess.run([sys.executable, "scripts/breakdown.py", *map(str, args)], cwd=repo,
                                             capture_output=True, text=True, check=True).stdout
    old, new = tmp_path / "old", tmp_path / "new"
    for name in ("alpha", "beta"):
        run = make_run(old, name, 0.25, "query-agnostic", 90.0, 0.25, task="fidelity", task_params={"n_samples": 2})
        with (run / "samples.jsonl").open("w") as f:  # the fidelity task's score: its KL
            f.write(json.dumps({"id": "s0", "meta": {}, "scores": {"kl": 0.125}}) + "\n")
    assert CliRunner().invoke(main, ["leaderboard", "--root", str(old), "--out", str(old)]).exit_code == 0
    (tmp_path / "earlier.md").write_text(breakdown(old, "--task", "fidelity"))
    assert "| query-agnostic | alpha | 0.25 | 0.125" in (tmp_path / "earlier.md").read_text()
    (old / lb.SAMPLES_FILE).unlink()  # the recorded runs' samples are gone: only the earlier table has them
    shutil.rmtree(old / "runs")
    run = make_run(new, "alpha", 0.25, "query-agnostic", 80.0, 0.25, task="fidelity",
                   task_params={"n_samples": 2, "stepwise": True})
    with (run / "samples.jsonl").open("w") as f:
        f.write(json.dumps({"id": "s0", "meta": {}, "scores": {"kl": 0.5}}) + "\n")
    lb._stored_samples.cache_clear()
    text = breakdown(new, "--task", "fidelity", "--table", old / "leaderboard.json", "--with", tmp_path / "earlier.md")
    rows = [line.split(" | ")[1] for line in text.splitlines() if line.startswith("| query-agnostic")]
    assert len(rows) == 3 and all("[settings " in r for r in rows), text
    assert len({r for r in rows if r.startswith("alpha")}) == 2 and "0.125" in text and "0.500" in text


def test_breakdown_prints_a_run_once_when_a_retrained_artifact_gives_its_label_a_checksum(tmp_path, monkeypatch,
                                                                                           capsys):
    # a codec's run printed in an earlier table as "reader(artifact=codec)"; the codec retrained into the same
    # directory: both runs are now "...#<checksum>", and the earlier table's row must not stay beside them
    import importlib.util
    import sys
    monkeypatch.setitem(registry.METHODS, "reader", f"{__name__}:_ArtifactReader")
    spec = importlib.util.spec_from_file_location("breakdown", Path(__file__).resolve().parents[2] / "scripts" / "breakdown.py")
    breakdown = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(breakdown)

    def printed(*args) -> str:
        monkeypatch.setattr(sys, "argv", ["breakdown.py", *map(str, args)])
        lb._stored_samples.cache_clear()
        breakdown.main()
        return capsys.readouterr().out

    old, new = tmp_path / "old", tmp_path / "new"
    for root, sha, kl, created in ((old, "1", 0.125, "2026-12-01"), (new, "2", 0.5, "2026-12-02")):
        run = _with_artifact(make_run(root, "reader", 1.0, "query-agnostic", 90.0, 0.5, task="fidelity"), sha * 64,
                             created)
        (run / "samples.jsonl").write_text(json.dumps({"id": "s0", "meta": {}, "scores": {"kl": kl}}) + "\n")
        run.rename(run.with_name(f"{run.name}-{sha}"))  # run ids differ by the artifact's checksum
    assert CliRunner().invoke(main, ["leaderboard", "--root", str(old), "--out", str(old)]).exit_code == 0
    (tmp_path / "earlier.md").write_text(printed(old, "--task", "fidelity"))
    assert "| reader(artifact=codec) | 1 | 0.125" in (tmp_path / "earlier.md").read_text()
    text = printed(new, "--task", "fidelity", "--table", old / "leaderboard.json", "--with", tmp_path / "earlier.md")
    rows = [line for line in text.splitlines() if line.startswith("| query-agnostic")]
    assert rows == [f"| query-agnostic | reader(artifact=codec)#{'1' * 12} | 1 | 0.125 [0.125, 0.125] n=1 |",
                    f"| query-agnostic | reader(artifact=codec)#{'2' * 12} | 1 | 0.500 [0.500, 0.500] n=1 |"], text
    assert lb.without_artifact(f"x(artifact=codec)#{'2' * 12} [settings 1234abcd]") == "x(artifact=codec) [settings 1234abcd]"
    assert lb.without_artifact("x#unrecorded") == "x" and lb.without_artifact("x#notachecksum") == "x#notachecksum"


def test_ranking_is_at_matched_memory_not_matched_knob(board):
    df = lb.select(lb.collect(board), protocol="query-agnostic")
    rank = lb.ranking(df, levels=[0.3, 0.4])
    by = rank.set_index("method")
    # At 0.3 of the memory: alpha interpolates to 65, beta measured 55 (beta won at the same knob, 0.25).
    assert by.loc["alpha", "niah score@0.3"] == pytest.approx(65.0)
    assert by.loc["beta", "niah score@0.3"] == pytest.approx(55.0)
    assert by.loc["alpha", "niah score@0.4"] == pytest.approx(80.0)
    assert by.loc["beta", "niah score@0.4"] == pytest.approx(55 + 30 * (0.1 / 0.3))
    assert list(rank["method"][:2]) == ["alpha", "beta"] and by.loc["alpha", "mean rank"] == 1.0
    assert by.loc["full", "niah full (ratio, score)"] == "1.03, 100"
    assert pd.isna(by.loc["full", "mean rank"])


def test_protocols_never_mix(board):
    df = lb.collect(board)
    both = lb.ranking(df, levels=[0.3, 0.4])
    for proto in ("query-agnostic", "query-aware"):
        alone = lb.ranking(lb.select(df, protocol=proto), levels=[0.3, 0.4])
        part = both[both["protocol"] == proto].reset_index(drop=True)
        pd.testing.assert_frame_equal(part[alone.columns], alone, check_dtype=False)
    aware = both[both["protocol"] == "query-aware"].set_index("method")
    assert aware.loc["beta", "mean rank"] == 1.0  # the opposite order of the query-agnostic protocol
    table = lb.runs_table(df)
    assert len(table[(table["method"] == "alpha") & (table["budget"] == 0.25)]) == 2  # one row per protocol
    md = lb.render_markdown(df)
    assert "## tiny-model, query-agnostic" in md and "## tiny-model, query-aware" in md


def test_filters(board):
    df = lb.collect(board)
    assert set(lb.select(df, budget=[0.5])["budget"]) == {0.5, 1.0}  # the full reference stays
    assert lb.select(df, task="other").empty
    assert len(lb.select(df, model="TINY")) == len(df)
    assert set(lb.select(df, protocol="query-aware")["protocol"]) == {"query-aware"}


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.figures, self.imgs, self.tables, self.external = [], [], 0, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure":
            self.figures.append(a.get("data-plot"))
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "table":
            self.tables += 1
        for key in ("src", "href"):
            if a.get(key) and not a[key].startswith("data:"):
                self.external.append(a[key])


def test_written_files_plots_and_report(board, tmp_path):
    df = lb.collect(board)
    out = tmp_path / "out"
    paths = lb.write(df, out)
    assert [p.name for p in paths] == ["leaderboard.md", "leaderboard.csv", "leaderboard.json", "leaderboard.html",
                                       lb.SAMPLES_FILE]
    assert len(pd.read_csv(paths[1])) == len(df)
    payload = json.loads(paths[2].read_text())
    assert len(payload["runs"]) == len(df) and payload["ranking"]
    page = _Page()
    page.feed(paths[3].read_text())
    assert page.tables >= 4

    written = plots.make_all(board, out / "plots", df=df, bench_root=tmp_path / "no-bench")
    stems = {p.stem for p in written}
    for prefix in ("score-vs-kv-tiny-model-query-agnostic-niah", "niah-tiny-model-query-aware-budget0.25",
                   "kv-steps-tiny-model-niah-query-agnostic", "throughput-tiny-model"):
        assert prefix in stems, (prefix, stems)
    for p in written:
        assert p.stat().st_size > 5000, p
        head = p.read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n" if p.suffix == ".png" else b"<svg" in p.read_bytes()[:2000]

    html_path = report.build(board, out / "report.html", out / "plots", make_plots=False)
    page = _Page()
    page.feed(html_path.read_text())
    pngs = {p.stem for p in (out / "plots").glob("*.png")}
    assert set(page.figures) == pngs  # every plot is in the page, once
    assert all(src.startswith("data:image/png;base64,") for src in page.imgs) and not page.external
    assert page.tables >= 4


def test_niah_grids_leave_out_what_the_scores_leave_out(board, tmp_path):
    """`--drop length=...` scores every run without those samples; the NIAH grids drawn beside the scores leave them
    out too, for runs read from their folders and from an earlier table's stored samples alike."""
    drop = [("length", "2000")]
    here = lb.collect(board, drop)
    row = here[(here["task"] == "niah") & (here["status"] == "complete")].iloc[0]
    assert {c["length"] for c in plots._niah_grid(row)} == {1000, 2000}
    assert {c["length"] for c in plots._niah_grid(row, drop)} == {1000}
    lb.write(here, tmp_path, drop=drop)
    shutil.rmtree(board / "runs")
    stored = lb.collect(tmp_path / "none", drop, tables=(tmp_path / "leaderboard.json",))
    row = stored[stored["run_id"] == row["run_id"]].iloc[0]
    assert {c["length"] for c in plots._niah_grid(row, drop)} == {1000}


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="no Chromium on this machine (apt-get install chromium)")
def test_report_renders_in_headless_chromium(board, tmp_path):
    html_path = report.build(board, tmp_path / "report.html", tmp_path / "plots")
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,1600", html_path.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists()
    import matplotlib.image as mpimg
    pixels = mpimg.imread(shot)
    assert pixels.shape[0] >= 1000 and pixels.std() > 0.05  # a drawn page, not a blank one


def test_cli_commands(board, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["leaderboard", "--root", str(board), "--out", str(tmp_path / "lb"),
                               "--protocol", "query-aware"])
    assert res.exit_code == 0, res.output
    assert "query-aware" in res.output and "query-agnostic" not in (tmp_path / "lb" / "leaderboard.md").read_text()
    res = runner.invoke(main, ["plot", "--root", str(board), "--out", str(tmp_path / "p"), "--only", "score"])
    assert res.exit_code == 0 and len(list((tmp_path / "p").glob("score-vs-kv-*"))) == 4
    res = runner.invoke(main, ["report", "--root", str(board), "--out", str(tmp_path / "r.html"),
                               "--plots", str(tmp_path / "p")])
    assert res.exit_code == 0 and (tmp_path / "r.html").exists()
    res = runner.invoke(main, ["leaderboard", "--root", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "no runs" in res.output


def test_drop_leaves_out_a_part_and_rescores_the_run(tmp_path):
    """A NIAH length the full cache fails is left out (--drop length=2000): each run is scored on the rest."""
    run = make_run(tmp_path, "alpha", 0.25, "query-aware", 0.0, 0.25)
    lines = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    for rec in lines:
        rec["scores"]["score"] = 100.0 if rec["meta"]["length"] == 1000 else 0.0
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    whole = lb.collect(tmp_path).iloc[0]
    assert whole["score"] == 0.0 and whole["n_samples"] == 6  # metrics.json's summary, over every sample
    kept = lb.collect(tmp_path, [("length", "2000")]).iloc[0]
    assert kept["score"] == 100.0 and kept["n_samples"] == 3 and kept["status"] == "complete"
    res = CliRunner().invoke(main, ["leaderboard", "--root", str(tmp_path), "--out", str(tmp_path / "lb"),
                                    "--drop", "length=2000"])
    assert res.exit_code == 0, res.output
    assert "Samples left out of every run: length=2000." in (tmp_path / "lb" / "leaderboard.md").read_text()
    res = CliRunner().invoke(main, ["leaderboard", "--root", str(tmp_path), "--drop", "length"])
    assert res.exit_code == 2 and "--drop takes KEY=VALUE" in res.output


# ---- one run per configuration; a score and its interval are one statistic ----------------------------

def test_newest_compares_created_as_times():
    """10:00 at +0200 is 08:00 UTC, before 09:00 at +0000 (as text it sorts after); none recorded is oldest."""
    df = pd.DataFrame({"run_id": ["a", "b", "c"], "created": ["2026-03-01T10:00:00+0200", "2026-03-01T09:00:00+0000",
                                                              None], "run_dir": ["x", "y", "z"]}).assign(
        model="m", protocol="p", setting="s", task="niah", method="snapkv", method_params="{}", budget=0.25)
    assert list(lb.newest(df)["run_id"]) == ["b"]
    assert list(lb.newest(df.iloc[[0, 2]])["run_id"]) == ["a"]


def write_run(root: Path, name: str, task: str, records: list[dict], *, method: str = "snapkv",
              created: str | None = None, trace: list[dict] = (), **config) -> Path:
    """A finished run of ``records`` (id, meta, scores), its metrics' summary the task's own ``summarize``."""
    run_dir = root / "runs" / name
    run_dir.mkdir(parents=True)
    results.write_json(run_dir / "config.json", {
        "task": task, "method": method, "budget": 0.25, "protocol": "query-agnostic", "model": "m", "model_name": "m",
        "method_params": {}, "task_params": {}, "created": created, "trace_every": 64, **config})
    for rec in records:
        results.append_jsonl(run_dir / "samples.jsonl", {**rec, "kv_ratio_prefill": 0.25, "kv_ratio_end": 0.25})
    for rec in trace:
        results.append_jsonl(run_dir / "trace.jsonl", rec)
    results.write_json(run_dir / "metrics.json", {"complete": True, "summary": registry.build_task(task).summarize(
        records), "kv_ratio_prefill": 0.25, "kv_ratio_end": 0.25})
    return run_dir


def niah_records(scores: list[float]) -> list[dict]:
    return [{"id": f"s{i}", "meta": {"length": 1000 * (1 + i % 2), "depth": 0.5}, "scores": {"score": s}}
            for i, s in enumerate(scores)]


def test_the_tables_keep_the_newest_run_of_a_configuration_not_the_mean(tmp_path):
    """A run made again (differing in trace_every, no part of the configuration, and recording a parameter the
    older one did not, at its default) replaces the older one in both tables: neither averaged with it (50) nor
    ranked by it (0)."""
    write_run(tmp_path, "old", "niah", niah_records([0.0] * 4), created="2026-01-01T00:00:00+0000")
    write_run(tmp_path, "new", "niah", niah_records([100.0] * 4), created="2026-02-01T00:00:00+0000",
              trace_every=32, method_params={"budget": 0.25})
    write_run(tmp_path, "other", "niah", niah_records([60.0] * 4), method="h2o")
    df = lb.collect(tmp_path)
    assert sorted(lb.newest(df)["run_id"]) == ["new", "other"]
    runs = lb.runs_table(df).set_index("method")
    assert runs.loc["snapkv", "niah score"] == 100.0 and runs.loc["snapkv", "niah score 95% CI"] == "[100, 100] n=4"
    rank = lb.ranking(df).set_index("method")
    assert rank.loc["snapkv", "niah score@0.25"] == 100.0 and rank.loc["snapkv", "mean rank"] == 1.0


def test_a_macro_score_and_its_interval_are_one_statistic(tmp_path):
    """LongBench's score is the mean of its subsets' means: its interval resamples each subset's samples and
    recomputes that mean, so it holds the score (the plain mean's interval, 40 samples of lcc outweighing the
    rest, lay about 56, far above the score); --drop scores the rest as the task does, not by the plain mean."""
    from kvbench.stats import stratified_interval
    records = [{"id": f"{d}{i}", "meta": {"dataset": d}, "scores": {"score": base + 10.0 * (i % 3)}}
               for d, n, base in (("lcc", 42, 70.0), ("qasper", 12, 0.0), ("hotpotqa", 12, 10.0)) for i in range(n)]
    write_run(tmp_path, "lb", "longbench", records)
    row = lb.collect(tmp_path).iloc[0]
    assert row["score"] == pytest.approx((80.0 + 10.0 + 20.0) / 3)
    assert row["score_lo"] < row["score"] < row["score_hi"] and row["n_samples"] == 66
    from kvbench.tasks.longbench import LONGBENCH_TASKS
    parts = [[r["scores"]["score"] for r in records if r["meta"]["dataset"] == d]
             for d in sorted(("lcc", "qasper", "hotpotqa"), key=LONGBENCH_TASKS.index)]
    assert (row["score_lo"], row["score_hi"]) == stratified_interval([(1 / 3, p) for p in parts])
    kept = lb.collect(tmp_path, [("dataset", "hotpotqa")]).iloc[0]
    assert kept["score"] == pytest.approx((80.0 + 10.0) / 2) and kept["n_samples"] == 54
    assert kept["score_lo"] < kept["score"] < kept["score_hi"]
    bad = write_run(tmp_path / "bad", "r", "niah", niah_records([1.0, 0.0]))  # records the task cannot score
    (bad / "samples.jsonl").write_text('{"id": "s0", "meta": {"length": 1000}, "scores": {"score": 1.0}}\n'
                                       '{"id": "s1", "meta": {"length": 2000}, "scores": {"score": 0.0}}\n')
    row = lb.collect(tmp_path / "bad", [("length", "2000")]).iloc[0]
    assert row["status"] == "unreadable" and "cannot score its records (KeyError: 'depth')" in row["error"]


def aime_records(rates: list[float], n: int = 8) -> list[dict]:
    return [{"id": f"{p}#{k}", "meta": {"problem_id": str(p), "sample_index": k},
             "scores": {"score": 100.0 * ok, "correct": ok}}
            for p, rate in enumerate(rates) for k in range(n) for ok in [float(k < round(rate * n))]]


def test_aime_resamples_problems_not_generations(tmp_path):
    """30 problems x 8 generations, each problem mostly solved always or never: pass@1's interval resamples the
    30 problems (n=30), as wide as their spread says, not the 240 generations as if independent; the paired
    comparison pairs problems too."""
    from kvbench import paired
    from kvbench.stats import bootstrap_interval
    rates = [[0.0, 0.125, 0.875, 1.0][p % 4] for p in range(30)]
    write_run(tmp_path, "a", "aime24", aime_records(rates), task_params={"n_samples": 8})
    row = lb.collect(tmp_path).iloc[0]
    assert row["n_samples"] == 30 and row["score"] == pytest.approx(100 * sum(rates) / 30)
    assert (row["score_lo"], row["score_hi"]) == bootstrap_interval([100.0 * r for r in rates])
    assert row["score_hi"] - row["score_lo"] > 25  # the generations' bootstrap: about 12
    write_run(tmp_path, "b", "aime24", aime_records([min(1.0, r + 0.125) for r in rates]), method="h2o",
              task_params={"n_samples": 8})
    (cell,), _ = paired.cells(lb.collect(tmp_path), "aime24")
    assert cell.pairs[0].n == 30


def test_drop_leaves_out_the_dropped_samples_trace_too(tmp_path):
    """Peak memory after --drop is the kept samples' (1 GiB), not the dropped 32k needle's (9 GiB)."""
    trace = [{"id": "s0", "peak_decode": {"rss": 2 ** 30}}, {"id": "s1", "peak_decode": {"rss": 9 * 2 ** 30}}]
    write_run(tmp_path, "r", "niah", [{"id": "s0", "meta": {"length": 1024, "depth": 0.5}, "scores": {"score": 100.0}},
                                      {"id": "s1", "meta": {"length": 32768, "depth": 0.5}, "scores": {"score": 0.0}}],
              trace=trace)
    assert lb.collect(tmp_path).iloc[0]["peak_gib"] == 9.0
    assert lb.collect(tmp_path, [("length", "32768")]).iloc[0]["peak_gib"] == 1.0


def test_the_legend_says_what_a_rank_counts(board):
    """Ranks count the methods whose interval lies wholly above; the legend says so, and where pairs are told apart."""
    text = lb.render_markdown(lb.collect(board))
    assert "1 + the number of methods whose 95% interval at r lies wholly above" in text
    assert "two of different ranks may overlap" in text and "`kvbench pairs`" in text


# ---- sweeps ------------------------------------------------------------------------------------------

def _tiny_loader(spec, dtype, device, seed):
    from kvbench import models
    from kvbench.models import LoadedModel
    from tests.conftest import make_tokenizer
    if spec == "tiny-too-big":
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
    model, _ = models.random_model(spec, dtype, device, seed)
    model.generation_config.eos_token_id = None
    return LoadedModel(model, make_tokenizer(), spec, 4096)


def test_sweep_runs_the_product_skips_finished_and_records_failures(tmp_path):
    from kvbench.sweep import load_config, points, run_sweep
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
out: {tmp_path / 'results'}
models: [tiny-llama, tiny-too-big]
methods: [full, snapkv]
budgets: [0.5]
tasks:
  niah: {{lengths: [300], depths: [0.0, 1.0], max_new_tokens: 3}}
  fidelity: {{context_len: 5000}}
protocols: [query-agnostic]
""")
    plan = points(load_config(cfg))
    assert [(p.model, p.task, p.method, p.budget) for p in plan][:4] == [
        ("tiny-llama", "niah", "full", 1.0), ("tiny-llama", "niah", "snapkv", 0.5),
        ("tiny-llama", "fidelity", "full", 1.0), ("tiny-llama", "fidelity", "snapkv", 0.5)]
    assert len(plan) == 8
    # The fidelity context is longer than the model's window: it fails inside the run (a crash, recorded
    # with its error), and the model that does not fit is recorded as out of memory; the rest still runs.
    lines = []
    first = run_sweep(cfg, echo=lines.append, load_model=_tiny_loader, progress=False)
    status = [(o["point"]["model"], o["point"]["task"], o["status"]) for o in first]
    assert [s for m, t, s in status if m == "tiny-llama" and t == "niah"] == ["done", "done"]
    assert {s for m, t, s in status if m == "tiny-too-big"} == {"oom"}
    for o in first:
        assert ("->" in " ".join(lines)) and (o["status"] in ("done", "oom", "crash"))
        if o["status"] != "done":
            assert o["error"]
    crashed = [o for o in first if o["status"] == "crash"]
    assert [o["point"]["task"] for o in crashed] == ["fidelity", "fidelity"]
    assert "exceeds the usable context" in crashed[0]["error"]
    for o in crashed:
        assert o["run_dir"] and json.loads((Path(o["run_dir"]) / "error.json").read_text())["status"] == "crash"
    ledger = tmp_path / "results" / "sweeps" / "tiny.jsonl"
    assert len(results.read_jsonl(ledger)) == 8
    second = run_sweep(cfg, echo=lines.append, load_model=_tiny_loader, progress=False)
    assert [o["status"] for o in second if o["point"]["task"] == "niah" and o["point"]["model"] == "tiny-llama"] \
        == ["skipped", "skipped"]
    df = lb.collect(tmp_path / "results")
    assert set(df[df["status"] == "complete"]["method"]) >= {"full", "snapkv"}


def test_sweep_runs_each_parameter_set_of_a_method(tmp_path):
    from kvbench.sweep import load_config, points
    cfg = tmp_path / "ablation.yaml"
    cfg.write_text("""
methods: [full, snapkv]
budgets: [128, 256]
method_params:
  snapkv: [{window: 8}, {window: 32, kernel: 5}]
tasks: [niah]
""")
    plan = points(load_config(cfg))
    assert [(p.method, p.budget, p.method_params) for p in plan] == [
        ("full", 1.0, {}), ("snapkv", 128, {"window": 8}), ("snapkv", 256, {"window": 8}),
        ("snapkv", 128, {"window": 32, "kernel": 5}), ("snapkv", 256, {"window": 32, "kernel": 5})]
    # a method whose memory does not follow the budget (a codec) runs once, like full; a composition's
    # budget is its eviction method's
    cfg.write_text("methods: [kvcar, deltakv, snapkv+kvcar]\nbudgets: [0.1, 0.5]\ntasks: [niah]\n"
                   "method_params: {deltakv: {random_init: true}}\n")
    assert [(p.method, p.budget) for p in points(load_config(cfg))] == [
        ("kvcar", 1.0), ("deltakv", 1.0), ("snapkv+kvcar", 0.1), ("snapkv+kvcar", 0.5)]
    cfg.write_text("methods: [snapkv]\ntasks: [niah]\nmethod_params: {snapkv: [{window: abc}]}\n")
    res = CliRunner().invoke(main, ["sweep", str(cfg)])
    assert res.exit_code == 2 and "snapkv parameter window='abc'" in res.output
    cfg.write_text("methods: [snapkv]\ntasks: [niah]\nmethod_params: {snapkv: [8]}\n")
    res = CliRunner().invoke(main, ["sweep", str(cfg)])
    assert res.exit_code == 2 and "a list of them" in res.output


def test_sweep_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    cases = [("methods: [nope]\ntasks: [niah]\n", "unknown method 'nope'"),
             ("methods: [snapkv]\ntasks: [niah]\nprotocols: [sideways]\n", "unknown protocol"),
             ("methods: [snapkv]\ntasks: [niah]\nbudgets: [0]\n", "impossible"),
             ("methods: [snapkv]\ntasks: [niah]\nfoo: 1\n", "unknown key 'foo'"),
             ("tasks: [niah]\n", "'methods' is missing")]
    for text, needle in cases:
        bad.write_text(text)
        res = CliRunner().invoke(main, ["sweep", str(bad)])
        lines = [x for x in res.output.strip().splitlines() if x]
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], (text, res.output)


def test_sweep_builds_a_tasks_samples_once_for_all_its_methods(tmp_path, monkeypatch):
    from kvbench.sweep import run_sweep
    from kvbench.tasks import niah
    cfg = tmp_path / "memo.yaml"
    cfg.write_text(f"""
out: {tmp_path / 'results'}
models: [tiny-llama]
methods: [full, snapkv, streamingllm]
budgets: [0.5]
tasks:
  niah: {{lengths: [300], depths: [0.0, 1.0], max_new_tokens: 3}}
protocols: [query-agnostic, query-aware]
""")
    built = []
    original = niah.NIAH.samples
    monkeypatch.setattr(niah.NIAH, "samples", lambda self, *a, **k: built.append(1) or original(self, *a, **k))
    outcomes = run_sweep(cfg, echo=lambda line: None, load_model=_tiny_loader, progress=False)
    assert [o["status"] for o in outcomes] == ["done"] * 6
    assert len(built) == 1  # six runs, one set of samples (the protocol is applied by the engine, not the task)
    records = [results.read_jsonl(Path(o["run_dir"]) / "samples.jsonl") for o in outcomes]
    assert all([r["id"] for r in rec] == [r["id"] for r in records[0]] for rec in records)


def test_kept_tables_never_mix_settings_and_order_budgets_by_value(tmp_path):
    """Token budgets (128, 1024) and fractions in increasing order, and a run of another task setting (other
    lengths) in its own table: the report shows each setting apart."""
    for budget, score in ((0.1, 40), (0.25, 60), (128, 10), (1024, 90)):
        make_run(tmp_path, "snapkv", budget, "query-aware", score, 0.2)
    make_run(tmp_path, "full", 1.0, "query-aware", 100, 1.0)
    make_run(tmp_path, "snapkv", 0.25, "query-aware", 33, 0.25, task_params={"lengths": [4096]})
    df = lb.collect(tmp_path)
    settings = sorted(df["setting"].unique())
    assert len(settings) == 2
    tables = {st: lb.budget_table(df, "niah", setting=st) for st in settings}
    wide = next(t for t in tables.values() if "1024" in t.columns)
    assert list(wide.columns) == ["method", "0.1", "0.25", "128", "1024", "full"]
    narrow = next(t for t in tables.values() if "1024" not in t.columns)
    assert list(narrow.columns) == ["method", "0.25"] and narrow.iloc[0]["0.25"].startswith("33")
    page = report.build(tmp_path, tmp_path / "report.html").read_text()
    tables = page.split("<h2>Paired comparisons")[0]  # (the matched-memory pairs have a cell of their own)
    assert tables.count("niah: tiny-model, query-aware [") == 2 and "task settings: " in tables


def test_report_embeds_the_bench_results_it_is_given(board, tmp_path):
    """--bench FILE|DIR: a leaderboard's page shows the speed and memory measured elsewhere (a GPU bench);
    a path that is not there is one line, before any drawing."""
    measured = Path(__file__).resolve().parents[2] / "results/bench/h200-llama-3.1-8b-compiled/bench.jsonl"
    page = report.build(board, tmp_path / "r.html", tmp_path / "plots", make_plots=False, bench=(measured,))
    text = page.read_text()
    assert "kvbench bench: random:llama-3.1-8b" in text and "NVIDIA H200" in text and str(measured) in text
    res = CliRunner().invoke(main, ["report", "--root", str(board), "--out", str(tmp_path / "r2.html"),
                                    "--bench", str(tmp_path / "nowhere.jsonl")])
    assert res.exit_code == 2 and "nowhere.jsonl: no such bench file or directory" in res.output
    assert not (tmp_path / "r2-plots").exists()


def test_pairs_compare_methods_on_the_samples_both_ran(board, tmp_path):
    """beta is 5 points above alpha on every one of the same six samples: separated, at the family level too,
    though alone each run's interval says nothing about the other; the report shows the matrix."""
    from kvbench import paired
    found, missing = paired.cells(lb.collect(board), "niah")
    assert not missing
    (cell,) = [c for c in found if c.protocol == "query-agnostic" and c.kept == "0.25"]
    assert cell.methods == ["beta", "alpha"]  # best first
    (p,) = cell.pairs
    assert (p.first, p.second, p.mean, p.n, p.separated, p.family) == ("beta", "alpha", 5.0, 6, True, True)
    res = CliRunner().invoke(main, ["pairs", "--root", str(board), "--task", "niah"])
    assert res.exit_code == 0 and "| beta | alpha | +5.0 [+5.0, +5.0] | 6 | separated, family |" in res.output
    dropped = paired.cells(lb.collect(board), "niah", drop=[("length", "1000")])[0][0].pairs[0]
    assert dropped.n == 3
    page = report.build(board, tmp_path / "r.html", tmp_path / "plots", make_plots=False).read_text()
    assert "Paired comparisons (same samples)" in page and "<b>+5.0 [+5.0, +5.0]*</b>" in page
    res = CliRunner().invoke(main, ["pairs", "--root", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "no two methods with samples share a cell" in res.output


def test_pairs_cells_come_in_the_order_of_their_budgets(tmp_path):
    """Token budgets 128 / 256 / 1024 read in that order, not as strings (1024 before 128)."""
    from kvbench import paired
    for budget, ratio in ((1024, 0.18), (128, 0.03), (256, 0.05)):
        for method, score in (("alpha", 10.0), ("beta", 5.0)):
            make_run(tmp_path, method, budget, "query-aware", score, ratio)
    found, _ = paired.cells(lb.collect(tmp_path), "niah")
    assert [c.kept for c in found] == ["128", "256", "1024"]


def test_pairs_at_matched_memory_compare_runs_of_different_budgets_within_five_percent(tmp_path):
    """A composition keeping more tokens in an evictor's bytes is compared with it on the same samples: cells are
    measured ratios within 5% of each other, and only pairs of two budgets (the kept-fraction cells have the rest)."""
    from kvbench import paired
    make_run(tmp_path, "alpha", 0.25, "query-aware", 60.0, 0.250)
    make_run(tmp_path, "gamma", 0.25, "query-aware", 55.0, 0.252)
    make_run(tmp_path, "evict+code", 0.32, "query-aware", 50.0, 0.242)  # more tokens kept, each coded
    make_run(tmp_path, "evict+code", 0.64, "query-aware", 70.0, 0.485)  # nothing else near its bytes
    make_run(tmp_path, "alpha", 0.3, "query-aware", 65.0, 0.300)  # 20% more memory than 0.25: another cell
    found, missing = paired.cells(lb.collect(tmp_path), "niah", matched_memory=True)
    assert not missing
    (cell,) = found
    assert cell.kept == "measured KV ratio 0.242-0.252"
    assert cell.methods == ["alpha @0.25", "gamma @0.25", "evict+code @0.32"]
    assert [(p.first, p.second, p.mean) for p in cell.pairs] == [("alpha @0.25", "evict+code @0.32", 10.0),
                                                                 ("gamma @0.25", "evict+code @0.32", 5.0)]
    res = CliRunner().invoke(main, ["pairs", "--root", str(tmp_path), "--matched-memory"])
    assert res.exit_code == 0 and "niah: tiny-model, query-aware" in res.output, res.output
    assert "measured KV ratio 0.242-0.252" in res.output and "| gamma @0.25 | evict+code @0.32 | +5.0" in res.output
    by_kept = {c.kept: c.methods for c in paired.cells(lb.collect(tmp_path), "niah")[0]}
    assert by_kept == {"0.25": ["alpha", "gamma"]}  # without the flag: one kept fraction, as before
    page = report.build(tmp_path, tmp_path / "r.html", tmp_path / "plots", make_plots=False).read_text()
    assert "Paired comparisons at matched memory" in page and "<th>evict+code @0.32</th>" in page


def test_a_task_run_under_two_settings_plots_a_figure_for_each(tmp_path):
    """Fidelity teacher-forced and stepwise are two settings of one task: one curve through both would join
    points that measure different things (and draw the full reference twice)."""
    for stepwise, scores in ((False, (40.0, 60.0)), (True, (45.0, 65.0))):
        params = {"stepwise": stepwise}
        make_run(tmp_path / ("s" if stepwise else "t"), "full", 1.0, "query-agnostic", 100.0, 1.0, task="fidelity",
                 task_params=params)
        for budget, score in zip((0.25, 0.5), scores):
            make_run(tmp_path / ("s" if stepwise else "t"), "alpha", budget, "query-agnostic", score, budget,
                     task="fidelity", task_params=params)
    (tmp_path / "runs").mkdir()
    for sub in ("s", "t"):
        for run in (tmp_path / sub / "runs").iterdir():
            shutil.move(str(run), tmp_path / "runs" / f"{run.name}-{sub}")
    df = lb.newest(lb.collect(tmp_path))
    assert df["setting"].nunique() == 2
    written = plots.score_vs_ratio(df, tmp_path / "plots")
    stems = sorted({p.stem for p in written})
    assert len(stems) == 2 and all(s.startswith("score-vs-kv-tiny-model-query-agnostic-fidelity-") for s in stems)
    assert {s.rsplit("-", 1)[1] for s in stems} == set(df["setting"])
    apart = plots._what_differs(df)
    assert sorted(apart.values()) == ["stepwise=false", "stepwise=true"]

    one = df[df["setting"] == df["setting"].iloc[0]]  # a single setting keeps the plain name
    assert [p.stem for p in plots.score_vs_ratio(one, tmp_path / "one")][0] == \
        "score-vs-kv-tiny-model-query-agnostic-fidelity"


def test_a_sweep_restricted_to_some_methods_plans_and_checks_only_those(tmp_path):
    """`sweep --methods`: the trained configs name three methods; an artifact one of them lacks must not stop
    the others (the ninth round lost DeltaKV's runs to KV-CAR's missing artifact)."""
    from kvbench.artifact import ArtifactError
    from kvbench.sweep import load_config, plan_sweep, points
    cfg = tmp_path / "two.yaml"
    cfg.write_text("""
models: [tiny-llama]
methods: [snapkv, deltakv]
budgets: [0.25, 0.5]
method_params: {deltakv: {checkpoint: no/such/checkpoint}}
tasks: {niah: {lengths: [300], depths: [0.0]}}
""")
    with pytest.raises(ArtifactError, match="no DeltaKV checkpoint"):
        load_config(cfg)
    # planned for the GPU machine, where the checkpoint is trained first: its points are still to run
    statuses = [status for _, status in plan_sweep(cfg, echo=lambda line: None)]
    assert statuses[:2] == ["to run", "to run"] and all(
        s.startswith("to run, once its artifact is made (no DeltaKV checkpoint") for s in statuses[2:]), statuses
    only = load_config(cfg, ("snapkv",))
    assert only["methods"] == ["snapkv"] and [(p.method, p.budget) for p in points(only)] == [("snapkv", 0.25),
                                                                                                 ("snapkv", 0.5)]


def test_ruler_samples_are_split_by_where_their_needles_sit():
    import importlib.util
    script = Path(__file__).resolve().parents[2] / "scripts" / "breakdown.py"
    spec = importlib.util.spec_from_file_location("breakdown", script)
    breakdown = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(breakdown)
    half = breakdown.needle_half
    assert half({"needles": [{"depth": 76.4}]}) == "after 50%"
    assert half({"needles": [{"depth": 50.0}, {"depth": 99.0}]}) == "after 50%"
    assert half({"needles": [{"depth": 3.0}, {"depth": 49.9}]}) == "before 50%"
    assert half({"needles": [{"depth": 10.0}, {"depth": 90.0}]}) == "both halves"
    assert half({"task": "cwe"}) is None and half({"needles": []}) is None


def test_a_recorded_run_with_stored_samples_is_scored_as_a_folder_is_now(tmp_path):
    """A table folded before the interval became the score's own statistic (or with any other rule) does not keep
    its old interval when folded again: a run whose samples the table stored is scored again from them, dropped
    samples left out, so old and new runs in one table are ranked by one rule."""
    records = [{"id": f"{d}{i}", "meta": {"dataset": d, "length": 100 * (i % 2)},
                "scores": {"score": base + 10.0 * (i % 3)}}
               for d, n, base in (("lcc", 42, 70.0), ("qasper", 12, 0.0)) for i in range(n)]
    write_run(tmp_path / "a", "lb", "longbench", records)
    drop = [("length", "100")]
    lb.write(lb.collect(tmp_path / "a", drop), tmp_path / "t", drop=drop)
    fresh = lb.collect(tmp_path / "a", drop).iloc[0]
    table = json.loads((tmp_path / "t" / "leaderboard.json").read_text())
    table["runs"][0].update(score_lo=0.0, score_hi=100.0, n_samples=999)  # as an older rule wrote it
    (tmp_path / "t" / "leaderboard.json").write_text(json.dumps(table))
    row = lb.earlier(tmp_path / "t" / "leaderboard.json", drop).iloc[0]
    assert (row["score_lo"], row["score_hi"], row["n_samples"]) == (fresh["score_lo"], fresh["score_hi"], 27)
    assert row["score"] == pytest.approx(fresh["score"])


def _drawn(monkeypatch) -> dict:
    """Stand in for ``plots._save``: each figure's axes (lines and collections) by file stem, nothing written."""
    figures = {}

    def keep(fig, out, name):
        figures[name] = fig.axes
        return [Path(out) / f"{name}.png"]
    monkeypatch.setattr(plots, "_save", keep)
    return figures


def test_a_method_keeps_its_colour_and_marker_in_every_score_figure(tmp_path, monkeypatch):
    """A reader follows a method from one task's figure to the next by its colour: a colour given by the method's
    place among the methods of one figure made beta blue on RULER, where alpha did not run, and orange on NIAH."""
    import matplotlib.colors as mcolors
    for task, methods in (("niah", ("alpha", "beta", "gamma")), ("ruler", ("beta", "gamma"))):
        make_run(tmp_path, "full", 1.0, "query-agnostic", 100.0, 1.03, task=task)
        for m in methods:
            for budget in (0.25, 0.5):
                make_run(tmp_path, m, budget, "query-agnostic", 40.0 + 10 * budget, budget, task=task)
    drawn = _drawn(monkeypatch)
    plots.score_vs_ratio(lb.newest(lb.collect(tmp_path)), tmp_path / "plots")
    styles = {}
    for name, axes in drawn.items():
        for line in axes[0].get_lines():
            if line.get_label() in ("alpha", "beta", "gamma"):
                styles.setdefault(line.get_label(), set()).add(
                    (mcolors.to_hex(line.get_color()), line.get_marker()))
    assert set(styles) == {"alpha", "beta", "gamma"} and len(drawn) == 2
    assert all(len(s) == 1 for s in styles.values()), styles  # one style per method across the figures
    assert len({next(iter(s)) for s in styles.values()}) == 3  # and no two methods share one


def test_a_method_with_one_point_shows_its_interval(tmp_path, monkeypatch):
    """A band needs two points: a method measured at one budget (a codec at 1.0, fidelity's stepwise setting) drew
    no interval at all under a title promising 95% intervals; it gets a bar from its lower to its upper bound."""
    from matplotlib.collections import LineCollection
    make_run(tmp_path, "full", 1.0, "query-agnostic", 100.0, 1.03)
    make_run(tmp_path, "alpha", 0.25, "query-agnostic", 50.0, 0.25, lengths=(1000, 2000, 3000))
    df = lb.newest(lb.collect(tmp_path))
    # the samples all score 50: give the run a known interval to look for
    df.loc[df["method"] == "alpha", ["score_lo", "score_hi"]] = [35.0, 62.0]
    drawn = _drawn(monkeypatch)
    plots.score_vs_ratio(df, tmp_path / "plots")
    (axes,) = drawn.values()
    bars = [seg for c in axes[0].collections if isinstance(c, LineCollection) for seg in c.get_segments()]
    spans = {(round(float(s[0][0]), 6), *sorted(round(float(y), 6) for y in (s[0][1], s[-1][1]))) for s in bars}
    assert (0.25, 35.0, 62.0) in spans, spans


def test_niah_grids_and_memory_traces_of_two_settings_are_not_one_figure(tmp_path, monkeypatch):
    """Two settings of one task (NIAH at other lengths, fidelity stepwise or not) measure different things: their
    heatmaps and KV traces were drawn into one figure per budget, two panels or lines of one name ("alpha @ 0.25")
    that a reader cannot tell apart. A figure per setting, named and titled by what sets it apart."""
    for sub, params, lengths in (("a", {"haystack": "x"}, (1000, 2000)),
                                 ("b", {"haystack": "x", "needle": "y"}, (1000, 2000, 3000))):
        for method, budget, score, ratio in (("full", 1.0, 100.0, 1.03), ("alpha", 0.25, 40.0, 0.25)):
            make_run(tmp_path, method, budget, "query-agnostic", score, ratio, task_params=params, lengths=lengths,
                     kv_steps=True)
    df = lb.newest(lb.collect(tmp_path))
    assert df["setting"].nunique() == 2
    drawn = _drawn(monkeypatch)
    plots.niah_heatmaps(df, tmp_path / "plots")
    plots.kv_over_steps(df, tmp_path / "plots")
    plots.throughput(df, tmp_path / "plots")
    heat = {n: a for n, a in drawn.items() if n.startswith("niah-")}
    steps = {n: a for n, a in drawn.items() if n.startswith("kv-steps-")}
    speed = {n: a for n, a in drawn.items() if n.startswith("throughput-")}
    assert len([n for n in heat if "budget0.25" in n]) == 2 and len(steps) == 2 and len(speed) == 2, sorted(drawn)
    for name, axes in heat.items():
        titles = [ax.get_title() for ax in axes if ax.get_title()]
        assert len(titles) == len(set(titles)), (name, titles)
    for name, axes in {**steps, **speed}.items():
        labels = [line.get_label() for line in axes[0].get_lines()]
        assert sorted(labels) == ["alpha @ 0.25", "full"], (name, labels)


def test_throughput_figures_of_two_models_are_both_drawn(tmp_path):
    for model in ("tiny-model", "other-model"):
        for method, budget, ratio in (("full", 1.0, 1.03), ("alpha", 0.25, 0.25)):
            make_run(tmp_path, method, budget, "query-agnostic", 50.0, ratio, model=model)
    written = plots.make_all(tmp_path, tmp_path / "plots", kinds=("throughput",))
    assert {p.stem for p in written} == {"throughput-tiny-model", "throughput-other-model"}


def test_the_html_tables_say_what_the_markdown_says_of_ranks_and_unfinished_runs(board, tmp_path):
    """leaderboard.html and the report showed `=1 [..]` with no word on what a rank or `=` means, and said nothing of
    the unfinished runs they leave out, where leaderboard.md says both."""
    df = lb.collect(board)
    lb.write(df, tmp_path / "out")
    page = report.build(board, tmp_path / "r.html", tmp_path / "plots", make_plots=False).read_text()
    for text in ((tmp_path / "out" / "leaderboard.html").read_text(), page):
        assert "lies wholly above" in text and "<code>=</code>: a rank shared" in text
        assert "1 unfinished run(s) are left out of the tables: niah-gamma-0.25" in text
    assert "1 unfinished run(s) are left out of the tables: niah-gamma-0.25" in lb.render_markdown(df)


def test_table_numbers_just_under_a_thousand_are_not_printed_in_exponent_notation():
    """Three significant digits printed 999.7 decode tokens/s as '1e+03' in the tables."""
    frame = lb._fmt_frame(pd.DataFrame({"decode tok/s": [999.7, 999.4, 1234.5, 0.0189]}))
    assert list(frame["decode tok/s"]) == ["1000", "999", "1234", "0.0189"]


def test_the_reports_pairs_header_says_what_a_pair_compares(board, tmp_path):
    """Since pairs compare the two scores' own statistic (a macro average's parts, AIME's problems), the report's
    header calling each entry the 'mean per-sample difference' was wrong for RULER and LongBench."""
    page = report.build(board, tmp_path / "r.html", tmp_path / "plots", make_plots=False).read_text()
    assert "mean per-sample difference" not in page
    assert "the difference of their headline scores over the samples both ran, as the score averages them" in page


def test_figures_scored_without_some_samples_say_so(board, tmp_path, monkeypatch):
    """`--drop length=...` scores every run without those samples: the score figures and NIAH grids drawn from those
    scores said nothing of it (results/qwen's query-aware NIAH figure is titled lengths=[..., 31744], which no point
    on it measured)."""
    drop = [("length", "2000")]
    drawn = _drawn(monkeypatch)
    plots.make_all(board, tmp_path / "plots", df=lb.collect(board, drop), kinds=("score", "niah"), drop=drop)
    titles = {n: axes[0].get_title() if n.startswith("score-") else axes[0].figure.get_suptitle()
              for n, axes in drawn.items()}
    assert any(n.startswith("score-") for n in titles) and any(n.startswith("niah-") for n in titles)
    assert all("Samples left out of every run: length=2000." in t for t in titles.values()), titles


def test_folding_the_same_runs_again_writes_the_same_bytes(board, tmp_path):
    """A table folded again from the same runs is the same file, the samples' gzip too: its header held the
    temporary file's name (with the process id), so every fold changed a 2 MB binary in the repository for
    nothing. The second fold runs in a process of its own."""
    import subprocess
    import sys
    outs = [tmp_path / "a", tmp_path / "b"]
    res = CliRunner().invoke(main, ["leaderboard", "--root", str(board), "--out", str(outs[0])])
    assert res.exit_code == 0, res.output
    proc = subprocess.run([sys.executable, "-c", "from kvbench.cli import main; main()", "leaderboard", "--root",
                           str(board), "--out", str(outs[1])], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for f in (lb.SAMPLES_FILE, "leaderboard.json", "leaderboard.md", "leaderboard.csv", "leaderboard.html"):
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f


def test_the_qwen_tables_methods_get_a_colour_each():
    """The Qwen tables hold 23 methods: with ten colours, methods ten apart (snapkv and compresskv, at the top
    of the RULER figure) shared one; 28 colours tell them all apart, the marker any more."""
    from kvbench.plots import method_styles
    styles = method_styles([f"m{i:02d}" for i in range(30)] + ["full"])
    assert "full" not in styles
    colours = [tuple(styles[f"m{i:02d}"]["color"]) for i in range(30)]
    assert len(set(colours[:28])) == 28
    assert len({(tuple(v["color"]), v["marker"]) for v in styles.values()}) == 30
