"""The whole path on the real model, SmolLM2-135M-Instruct, with needles around 2k tokens of essays."""
from __future__ import annotations

import pytest

from kvbench import models, registry
from kvbench.engine import Engine
from kvbench.task import TaskContext
from kvbench.tasks.niah import NIAH

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    try:
        return models.load("smollm2-135m")
    except models.ModelError as e:
        pytest.skip(f"SmolLM2 not available here: {e}")


@pytest.fixture(scope="module")
def needles(smollm2, request):
    from tests.conftest import SHARED
    essays = SHARED / "paul_graham_essays"
    if not essays.is_dir():
        pytest.skip("../shared/data/paul_graham_essays is absent")
    task = NIAH(lengths=[2048], depths=[0.1, 0.5, 0.9], haystack=str(essays))
    return task, task.samples(smollm2.tokenizer, TaskContext(7000))


def answers(smollm2, samples, method, budget, protocol="query-agnostic"):
    eng = Engine(smollm2, registry.build_method(method, budget), protocol=protocol)
    return [r["prediction"] for r in eng.generate(samples)]


def test_full_finds_every_needle(smollm2, needles):
    task, samples = needles
    for s, pred in zip(samples, answers(smollm2, samples, "full", 1.0)):
        assert task.score(s, pred)["found"] == 100, (s.id, pred)


def test_streamingllm_small_budget_misses_mid_context(smollm2, needles):
    task, samples = needles
    mid = [s for s in samples if 0 < s.meta["depth"] < 1]
    for s, pred in zip(mid, answers(smollm2, mid, "streamingllm", 0.1)):
        # "sandwich" and "Dolores" occur in the needle only, never in the essays.
        assert "sandwich" not in pred.lower() and "dolores" not in pred.lower(), (s.id, pred)


def test_snapkv_query_aware_quarter_finds_needles(smollm2, needles):
    task, samples = needles
    preds = answers(smollm2, samples, "snapkv", 0.25, "query-aware")
    for s, pred in zip(samples, preds):
        assert "sandwich" in pred.lower(), (s.id, pred)
