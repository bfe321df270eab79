"""Decode-time eviction (h2o, tova, streamingllm) as the engine replays it in a CUDA graph: the step reads nothing
back from the device, and gives the same tokens and the same stores as the eager step with its host checks."""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from kvbench import method as method_module
from kvbench import registry
from kvbench.cache import LayerCall
from kvbench.engine import Engine

from tests.conftest import prompt, sample, tiny

# What would make the host wait for the device (and fail a CUDA-graph capture).
HOST_READS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero", "unique", "masked_select"}


class NoHostReads(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            raise AssertionError(f"host read of a device value in a replayed step: {name}")
        if name in ("__getitem__", "__setitem__") and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in _flat(args[1:2])):
            raise AssertionError("boolean-mask indexing (a data-dependent shape) in a replayed step")
        if name == "repeat_interleave" and isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"),
                                                      torch.Tensor) and kwargs.get("output_size") is None:
            raise AssertionError("repeat_interleave with tensor repeats and no output_size in a replayed step")
        return func(*args, **kwargs)


class NoHostData(TorchDispatchMode):
    """A tensor made from host data inside the step (``t[i] = 0`` lifts the 0 into a CPU tensor): on CUDA its copy
    to the device fails the capture ("Cannot copy between CPU and CUDA tensors during CUDA graph capture")."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default):
            raise AssertionError(f"a tensor made from host data in a replayed step: {func}")
        return func(*args, **(kwargs or {}))


def _flat(items):
    for a in items:
        if isinstance(a, (tuple, list)):
            yield from _flat(a)
        else:
            yield a


def _decode(name: str, steps: int, replayed_from: int | None, monkeypatch, params=None):
    """Greedy decoding of ``steps`` tokens one forward at a time; from step ``replayed_from`` on, each step runs as
    a capture would (``capturing`` true) and under NoHostReads."""
    lm = tiny("llama")
    eng = Engine(lm, registry.build_method(name, 0.5, params or {}), protocol="query-agnostic")
    hook = eng.method.on_decode

    def on_decode_without_host_reads(call):  # the method's hook (the store's attention on CUDA is a Triton
        with NoHostReads():                   # kernel, already replayed for every method; on the CPU it is not)
            hook(call)
    cache, logits, _ = eng.prefill(sample(prompt(40, 3), prompt(6, 4)))
    cache.reserve(steps)  # as the engine does before decoding with graphs: appends then never regrow
    tokens = []
    for step in range(steps):
        nxt = logits.argmax(-1)
        tokens.append(int(nxt))
        graphed = replayed_from is not None and step >= replayed_from
        monkeypatch.setattr(method_module, "capturing", lambda t: graphed)
        if graphed:
            if step == replayed_from:  # the engine reserves room for the rest before it captures
                cache.reserve(steps - step)
                monkeypatch.setattr(eng.method, "on_decode", on_decode_without_host_reads)
            with NoHostData():  # the whole step: the store's append and the method's hook
                logits = eng.forward(cache, nxt[:, None], compress=False)[:, -1]
        else:
            logits = eng.forward(cache, nxt[:, None], compress=False)[:, -1]
    return tokens, cache


@pytest.mark.parametrize("name,params", [("h2o", {}), ("h2o", {"mean_over_queries": True}), ("tova", {}),
                                         ("tova", {"pin_newest": True}), ("streamingllm", {})])
def test_replayed_eviction_step_reads_nothing_back_and_matches_eager(name, params, monkeypatch):
    eager_tokens, eager = _decode(name, 12, None, monkeypatch, params)
    graph_tokens, graphed = _decode(name, 12, 1, monkeypatch, params)  # step 0 eager: it trims the question
    assert graph_tokens == eager_tokens
    for a, b in zip(eager.stores, graphed.stores):
        assert torch.equal(a.length, b.length)
        idx, valid = a.slot_index()
        jdx, _ = b.slot_index()
        assert torch.equal(a.pos[idx][valid], b.pos[jdx][valid])
        torch.testing.assert_close(a.k[idx][valid], b.k[jdx][valid])
    # the budget holds: half of the tokens seen, per head
    assert int(graphed.stores[0].length.max()) == (40 + 6 + 12) // 2


def test_only_sync_free_evictors_replay_their_decoding(monkeypatch):
    lm = tiny("llama")
    for name, replays in [("h2o", True), ("tova", True), ("streamingllm", True), ("snapkv", True)]:
        eng = Engine(lm, registry.build_method(name, 0.5))
        cache, _, _ = eng.prefill(sample(prompt(40, 3), prompt(6, 4)))
        assert (eng.method.decode_epoch(cache) is not None) == replays, name
    evicting_snapkv = registry.build_method("snapkv", 0.5, {"evict_during_decoding": True})
    eng = Engine(lm, evicting_snapkv)
    cache, _, _ = eng.prefill(sample(prompt(40, 3), prompt(6, 4)))
    assert evicting_snapkv.decode_epoch(cache) is None  # its decode-time scoring is not checked sync-free
    eng = Engine(lm, registry.build_method("h2o", 0.5))
    cache, _, _ = eng.prefill(sample(prompt(40, 3), prompt(6, 4)))
    key = eng.method.decode_epoch(cache)
    assert eng.method.decode_epoch(cache) == key  # nothing moved: a captured graph replays
    cache.reserve(64)  # a relayout: a graph captured before it would be stale
    assert eng.method.decode_epoch(cache) != key


@pytest.mark.parametrize("triton", [False, True])
@pytest.mark.parametrize("name,params", [("h2o", {}), ("tova", {}), ("tova", {"pin_newest": True}),
                                         ("streamingllm", {})])
def test_one_kernel_ranking_evicts_what_score_ranks(name, params, triton, monkeypatch):
    """A method's ``decode_ranking`` (per-slot values plus kept recent tokens, sinks or one ranking for all heads,
    applied inside the argmin kernel) evicts exactly the tokens its ``score`` ranks lowest: decoding with it and
    with the base class's ranking (``score(call)`` as it stands) gives the same tokens and the same stores; with
    ``triton`` the kernels run (interpreted)."""
    if triton:
        monkeypatch.setenv("KVBENCH_TRITON", "1")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    tokens, fused = _decode(name, 10, 1, monkeypatch, params)
    cls = type(registry.build_method(name, 0.5, params))
    monkeypatch.setattr(cls, "decode_ranking", method_module.ScoredEviction.decode_ranking)
    score_tokens, scored = _decode(name, 10, 1, monkeypatch, params)
    assert tokens == score_tokens
    for a, b in zip(fused.stores, scored.stores):
        assert torch.equal(a.length, b.length) and torch.equal(a.pos, b.pos)


@pytest.mark.parametrize("triton", [False, True])
@pytest.mark.parametrize("name,params", [("h2o", {}), ("tova", {})])
def test_logits_from_the_attention_pass_evict_what_the_keys_do(name, params, triton, monkeypatch):
    """H2O and TOVA read each slot's attention from the logits the decode attention wrote in its pass
    (``decode_reads_slot_attention``), not from a second read of the keys: both ways give the same tokens and
    the same stores (the replayed steps included); with ``triton`` the kernels run (interpreted)."""
    if triton:
        monkeypatch.setenv("KVBENCH_TRITON", "1")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    cls = type(registry.build_method(name, 0.5, params))
    assert cls(budget=0.5).decode_reads_slot_attention()
    seen = []
    slot_attention = LayerCall.slot_attention

    def spy(call, *a, **k):
        seen.append(call.slot_logits is not None)
        return slot_attention(call, *a, **k)

    monkeypatch.setattr(LayerCall, "slot_attention", spy)
    tokens, from_logits = _decode(name, 10, 1, monkeypatch, params)
    assert seen and all(seen)
    monkeypatch.setattr(cls, "decode_reads_slot_attention", lambda self: False)
    seen.clear()
    key_tokens, from_keys = _decode(name, 10, 1, monkeypatch, params)
    assert seen and not any(seen)
    assert tokens == key_tokens
    for a, b in zip(from_logits.stores, from_keys.stores):
        assert torch.equal(a.length, b.length) and torch.equal(a.pos, b.pos)
        if "acc" in a.extra:  # H2O's running sums: equal up to the float rounding of two formulas
            torch.testing.assert_close(a.extra["acc"][a.slot_valid()], b.extra["acc"][b.slot_valid()],
                                       rtol=1e-4, atol=1e-6)


class CountOps(TorchDispatchMode):
    """PyTorch operations that launch work (views and allocations left out)."""
    FREE = {"view", "_unsafe_view", "expand", "reshape", "select", "slice", "unsqueeze", "squeeze", "t", "transpose",
            "as_strided", "alias", "detach", "permute", "_reshape_alias", "lift_fresh", "empty", "empty_like",
            "empty_strided"}

    def __init__(self, paused):
        super().__init__()
        self.n, self.paused = 0, paused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.overloadpacket.__name__ not in self.FREE and not self.paused[0]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name,limit", [("streamingllm", 1), ("tova", 2), ("h2o", 1)])
def test_replayed_eviction_is_a_few_launches_a_layer(name, limit, monkeypatch):
    """In a replayed step every PyTorch op of the hook is a kernel of ~2-3 us on the GPU: the evictors' hooks had
    15 (streamingllm), 24 (tova) and 41 (h2o) a layer, which made their step 1.4-1.9x snapkv's on the H200. The
    ranking is now in the argmin kernel and the target made once a step (``KVCache.per_step``): what is left a
    layer beyond the first is the mask of the segments over their target (and tova's zeroed slot scores)."""
    monkeypatch.setenv("KVBENCH_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import kvbench.kernels.decode_attention as kernels
    launch, in_kernel = kernels._launch, [0]

    def counted_launch(*a, **k):  # the interpreter's tensor work inside a kernel is one launch on the GPU
        in_kernel[0] += 1
        try:
            return launch(*a, **k)
        finally:
            in_kernel[0] -= 1

    for module in (kernels, __import__("kvbench.kernels.segment_evict", fromlist=["x"]),
                   __import__("kvbench.kernels.slot_scores", fromlist=["x"])):
        monkeypatch.setattr(module, "_launch", counted_launch)
    lm = tiny("llama")
    eng = Engine(lm, registry.build_method(name, 0.5), protocol="query-agnostic")
    hook, per_layer = eng.method.on_decode, {}

    def counting_hook(call):
        mode = CountOps(in_kernel)
        with mode:
            hook(call)
        per_layer.setdefault(call.layer, []).append(mode.n)

    cache, logits, _ = eng.prefill(sample(prompt(40, 3), prompt(6, 4)))
    # eager, as the engine before it captures: a step that trims the question (a new layout), room reserved for
    # the rest (another), a step that warms it
    logits = eng.forward(cache, logits.argmax(-1)[:, None], compress=False)[:, -1]
    cache.reserve(4)
    logits = eng.forward(cache, logits.argmax(-1)[:, None], compress=False)[:, -1]
    assert eng.method.decode_epoch(cache) is not None  # what the engine asks before it captures
    monkeypatch.setattr(method_module, "capturing", lambda t: True)
    monkeypatch.setattr(eng.method, "on_decode", counting_hook)
    for _ in range(3):
        logits = eng.forward(cache, logits.argmax(-1)[:, None], compress=False)[:, -1]
    later = [n for layer, counts in per_layer.items() if layer > 0 for n in counts]
    assert later and max(later) <= limit, per_layer
