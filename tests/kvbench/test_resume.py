"""Resuming a run: never complete with finished samples its metrics leave out (a smaller --limit), and no speed
from timings taken under different conditions."""
from __future__ import annotations

import json

import pytest

from kvbench import leaderboard as lb
from kvbench import results
from kvbench.harness import RunConfig, run
from kvbench.models import LoadedModel
from tests.conftest import make_tokenizer, tiny


@pytest.fixture(scope="module")
def lm():
    model = tiny("llama")
    return LoadedModel(model.model, make_tokenizer(), "tiny-llama", 4096)


def _cfg(tmp_path, limit):
    return RunConfig(method="snapkv", task="niah", budget=0.5, limit=limit, out=str(tmp_path),
                     task_params={"lengths": [300], "depths": [0.0, 0.33, 0.67, 1.0], "max_new_tokens": 2})


def test_a_smaller_limit_is_refused_and_a_larger_one_extends_the_run(tmp_path, lm):
    run_dir = run(_cfg(tmp_path, 2), lm=lm, progress=False)
    assert run(_cfg(tmp_path, 3), lm=lm, progress=False) == run_dir  # a larger limit extends the run
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(results.ResumeRefusedError, match="holds 1 finished sample.* limit=3, this call with limit=2"):
        run(_cfg(tmp_path, 2), lm=lm, progress=False)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before  # untouched: no error.json either
    row = lb.collect(tmp_path).iloc[0]
    assert (row.status, row.limit, row.n_samples) == ("complete", 3, 3)
    assert json.loads((run_dir / "metrics.json").read_text())["n_samples"] == 3
