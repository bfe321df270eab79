"""`kvbench sweep --recorded`: a table row records a point only when every setting that changes results matches;
the sweep ledger survives a cut-off last line."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from kvbench import leaderboard as lb
from kvbench import registry, results, sweep
from kvbench.harness import RunConfig

POINT = RunConfig(method="snapkv", task="niah", budget=0.5, model="tiny-model", task_params={"lengths": [512]},
                  limit=2, device="cpu", dtype="float32")


def _table(tmp_path: Path, point: RunConfig) -> Path:
    """A leaderboard.json recording ``point`` as complete, its run's config as the harness writes it."""
    run_dir = tmp_path / "root" / "runs" / "one"
    run_dir.mkdir(parents=True)
    config = {**asdict(point), "model_name": point.model,
              "method_params": asdict(registry.build_method(point.method, point.budget, point.method_params)),
              "task_params": asdict(registry.build_task(point.task, point.task_params))}
    results.write_json(run_dir / "config.json", config)
    results.append_jsonl(run_dir / "samples.jsonl", {"id": "a", "meta": {}, "scores": {"score": 1.0}})
    results.write_json(run_dir / "metrics.json", {"complete": True, "n_samples": 1, "summary": {"score": 1.0}})
    lb.write(lb.collect(tmp_path / "root"), tmp_path / "table")
    return tmp_path / "table" / "leaderboard.json"


CHANGES = [{"seed": 1}, {"temperature": 0.7}, {"max_context": 300}, {"prefill_chunk": 128}, {"data": "essays"}]


@pytest.mark.parametrize("change", CHANGES, ids=lambda c: next(iter(c)))
def test_a_point_of_another_setting_is_not_recorded(tmp_path, change):
    in_table = sweep.recorded([_table(tmp_path, POINT)])
    assert sweep.point_key(POINT) in in_table
    assert sweep.point_key(replace(POINT, **change)) not in in_table


@pytest.mark.parametrize("change", CHANGES, ids=lambda c: next(iter(c)))
def test_a_recorded_setting_away_from_its_default_matches_only_itself(tmp_path, change):
    in_table = sweep.recorded([_table(tmp_path, replace(POINT, **change))])
    assert sweep.point_key(replace(POINT, **change)) in in_table
    assert sweep.point_key(POINT) not in in_table


def test_a_row_whose_settings_lack_a_value_counts_it_at_its_default(tmp_path):
    """A table that did not keep a setting (no settings text) recorded the default: a point that sets another
    value runs."""
    table = _table(tmp_path, replace(POINT, seed=1))
    payload = json.loads(table.read_text())
    for row in payload["runs"]:
        row["settings"] = None
    table.write_text(json.dumps(payload))
    in_table = sweep.recorded([table])
    assert sweep.point_key(replace(POINT, seed=1)) not in in_table and sweep.point_key(POINT) in in_table


def test_settings_text_reads_values_that_hold_commas_and_equals():
    text = lb._setting_text({"data": "d", "task_params": {"needle": "x, seed=3"}, "seed": 2, "limit": None})
    assert sweep.settings_text(text) == {"data": "d", "task_params": {"needle": "x, seed=3"}, "seed": 2,
                                         "limit": None}


def test_the_ledger_is_repaired_before_a_sweep_appends_to_it(tmp_path, monkeypatch):
    """A ledger line cut off by a killed sweep is trimmed; the next outcome does not join it."""
    from kvbench import harness
    config = tmp_path / "cut.yaml"
    config.write_text(f"out: {tmp_path / 'out'}\nmodels: [tiny-model]\nmethods: [snapkv]\nbudgets: [0.5]\n"
                      "tasks: {niah: {lengths: [512]}}\ndevice: cpu\n")
    ledger = tmp_path / "out" / "sweeps" / "cut.jsonl"
    ledger.parent.mkdir(parents=True)
    ledger.write_text('{"status": "done"}\n{"status": "do')
    monkeypatch.setattr(harness, "run", lambda point, lm, progress, sample_memo: tmp_path)
    sweep.run_sweep(config, echo=lambda line: None, load_model=lambda *args, **kwargs: None)
    assert [r["status"] for r in results.read_jsonl(ledger)] == ["done", "incomplete"]
