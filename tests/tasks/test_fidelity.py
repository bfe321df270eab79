"""Fidelity: the continuation fed as one chunk, or token by token through the decoding steps (``stepwise``)."""
from __future__ import annotations

import pytest
import torch
from tests.conftest import prompt, tiny

from kvbench import registry
from kvbench.engine import Engine
from kvbench.task import Sample


def _sample(n_ctx: int = 60, n_cont: int = 20) -> Sample:
    return Sample("s", prompt(n_ctx, 1), [], [], 0, continuation_ids=prompt(n_cont, 2))


def test_stepwise_equals_the_chunk_with_the_full_cache():
    """Nothing is compressed: token by token through the decoding loop gives the chunk's log-probabilities."""
    lm = tiny("llama")
    engine = Engine(lm, registry.build_method("full", 1.0))
    chunk, _ = engine.continuation_logprobs(_sample())
    steps, info = engine.continuation_logprobs(_sample(), stepwise=True)
    assert steps.shape == chunk.shape == (20, lm.model.config.vocab_size)
    torch.testing.assert_close(steps, chunk, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "adakv", "knorm", "random", "selectfit", "kvsculpt"])
def test_stepwise_equals_the_chunk_for_a_method_that_only_appends_after_compressing(name):
    """After the prefill's compression these methods only append: the decoding steps read the compressed store
    (its fitted keys and values too) as the continuation's chunk does, so the log-probabilities agree."""
    engine = Engine(tiny("llama"), registry.build_method(name, 0.5))
    chunk, _ = engine.continuation_logprobs(_sample())
    steps, _ = engine.continuation_logprobs(_sample(), stepwise=True)
    torch.testing.assert_close(steps, chunk, atol=1e-4, rtol=1e-4)


def test_stepwise_holds_a_decode_time_evictor_to_its_budget_and_reads_what_it_keeps():
    """streamingllm evicts one token per decoding step: fed stepwise it ends at its budget and each token reads
    the window it keeps (equal to feeding the tokens one by one by hand); as one chunk the cache grows by the
    whole continuation and the chunk reads all of it."""
    lm = tiny("llama")
    method = registry.build_method("streamingllm", 0.5)
    engine = Engine(lm, method)
    s = _sample()
    chunk, chunk_info = engine.continuation_logprobs(s)
    steps, step_info = engine.continuation_logprobs(s, stepwise=True)
    assert step_info["kv_ratio_end"] < chunk_info["kv_ratio_end"] - 0.1  # (both include the stores' growth slack)
    assert not torch.allclose(steps, chunk, atol=1e-3)
    cache, first, _ = engine.prefill(Sample("s", s.context_ids, [], [], 0))
    by_hand = [first[0]] + [engine.feed(cache, [t], compress=False)[0, -1] for t in s.continuation_ids[:-1]]
    want = torch.log_softmax(torch.stack(by_hand).float(), -1)
    torch.testing.assert_close(steps, want, atol=1e-4, rtol=1e-4)


def test_fidelity_task_takes_stepwise_as_a_parameter():
    task = registry.build_task("fidelity", {"stepwise": "true", "context_len": 64, "continuation_len": 16})
    assert task.stepwise is True


@pytest.mark.parametrize("stepwise", [False, True])
def test_fidelity_scores_every_continuation_token_the_first_included(stepwise):
    """Perplexity, KL and agreement cover all T continuation tokens: the first one's prediction (from the
    context alone) is one of them, and with chunked prefill it already reads the compressed cache. By hand:
    the full cache's perplexity is the model's over ``context + continuation`` at the continuation's tokens."""
    lm = tiny("llama")
    s = _sample()
    task = registry.build_task("fidelity", {"stepwise": str(stepwise).lower()})
    rec = task.score_logprobs(Engine(lm, registry.build_method("snapkv", 0.5), prefill_chunk=16), s)
    full = Engine(lm, registry.build_method("full", 1.0))  # one pass over context + continuation
    logits = full.feed(full.new_cache(1), s.context_ids + s.continuation_ids, False, all_logits=True)[0].float()
    n = len(s.context_ids)
    logp = torch.log_softmax(logits[n - 1: -1], -1)
    nll = -logp.gather(1, torch.tensor(s.continuation_ids)[:, None]).mean().item()
    assert rec["scores"]["ppl_full"] == pytest.approx(torch.tensor(nll).exp().item(), rel=1e-4)
    one = Sample("s1", s.context_ids, [], [], 0, continuation_ids=s.continuation_ids[:1])
    scores = task.score_logprobs(Engine(lm, registry.build_method("snapkv", 0.5), prefill_chunk=16), one)["scores"]
    assert all(torch.isfinite(torch.tensor(v)) for v in scores.values()), scores


def test_first_token_false_scores_as_the_runs_before_it_existed():
    """``first_token=false`` leaves out the first continuation token, as runs before 0e497c7 did; the parameter
    is in the comparability key, so the two kinds of run never share a table cell."""
    lm = tiny("llama")
    s = _sample()
    old = registry.build_task("fidelity", {"first_token": "false"})
    rec = old.score_logprobs(Engine(lm, registry.build_method("full", 1.0)), s)
    full = Engine(lm, registry.build_method("full", 1.0))
    logits = full.feed(full.new_cache(1), s.context_ids + s.continuation_ids, False, all_logits=True)[0].float()
    n = len(s.context_ids)
    logp = torch.log_softmax(logits[n: -1], -1)  # tokens 2..T
    nll = -logp.gather(1, torch.tensor(s.continuation_ids[1:])[:, None]).mean().item()
    assert rec["scores"]["ppl_full"] == pytest.approx(torch.tensor(nll).exp().item(), rel=1e-4)
    from kvbench import leaderboard as lb
    before = {"context_len": 8192, "continuation_len": 256, "n_samples": 8, "name": "fidelity", "source": None}
    assert lb.comparable_task_params("fidelity", before) != \
        lb.comparable_task_params("fidelity", {**before, "first_token": True})
