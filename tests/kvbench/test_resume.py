"""Resuming a run: never complete with finished samples its metrics leave out (a smaller --limit), and no speed
from timings taken under different conditions."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from kvbench import leaderboard as lb
from kvbench import plots, results
from kvbench.engine import Engine
from kvbench.harness import RunConfig, run
from kvbench.models import LoadedModel
from tests.conftest import make_tokenizer, tiny


@pytest.fixture(scope="module")
def lm():
    model = tiny("llama")
    return LoadedModel(model.model, make_tokenizer(), "tiny-llama", 4096)


class _Uncompiled(Engine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, compile_decode=False, **kwargs)


def _cfg(tmp_path, limit):
    return RunConfig(method="snapkv", task="niah", budget=0.5, limit=limit, out=str(tmp_path),
                     task_params={"lengths": [200, 300], "depths": [0.0, 1.0], "max_new_tokens": 2})


def test_a_smaller_limit_is_refused_and_a_larger_one_extends_the_run(tmp_path, lm):
    run_dir = run(_cfg(tmp_path, 2), lm=lm, progress=False)
    assert run(_cfg(tmp_path, 3), lm=lm, progress=False) == run_dir  # a larger limit extends the run
    records = lambda: {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != results.LOCK_FILE}
    before = records()
    with pytest.raises(results.ResumeRefusedError, match="holds 1 finished sample.* limit=3, this call with limit=2"):
        run(_cfg(tmp_path, 2), lm=lm, progress=False)
    assert records() == before  # untouched: no error.json either
    row = lb.collect(tmp_path).iloc[0]
    assert (row.status, row.limit, row.n_samples) == ("complete", 3, 3)
    assert json.loads((run_dir / "metrics.json").read_text())["n_samples"] == 3


@pytest.mark.parametrize("resumed_under", [{}, {"KVBENCH_SHARED_DEVICE": "2"}, {"KVBENCH_COMPILE": "1"}],
                         ids=["same", "shared", "compiled"])
def test_a_run_resumed_under_other_conditions_reports_no_speed(tmp_path, lm, monkeypatch, resumed_under):
    from kvbench import harness
    monkeypatch.setattr(harness, "Engine", _Uncompiled)  # KVBENCH_COMPILE only names the conditions here
    run_dir = run(_cfg(tmp_path, 2), lm=lm, progress=False)
    for key, value in resumed_under.items():
        monkeypatch.setenv(key, value)
    run(_cfg(tmp_path, 4), lm=lm, progress=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    row = lb.collect(tmp_path).iloc[0]
    assert row.status == "complete" and row.score == metrics["summary"]["score"]  # the scores stand
    if resumed_under:
        assert metrics["tokens_per_s"] is None and metrics["prefill_s"] is None and pd.isna(row.tokens_per_s)
        assert plots.throughput(lb.collect(tmp_path), tmp_path / "plots") == []
    else:
        assert metrics["tokens_per_s"] > 0 and row.tokens_per_s == metrics["tokens_per_s"]
        assert plots.throughput(lb.collect(tmp_path), tmp_path / "plots")
