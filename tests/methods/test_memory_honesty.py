"""The bytes a cache reports are the bytes it holds: for every method that runs on a tiny model without an
artifact, the harness's ``kv_bytes_prefill`` (and ``kv_bytes_end`` after a few decoding steps) against the bytes
of every distinct tensor storage reachable from the cache object."""
from __future__ import annotations

import weakref

import pytest
import torch
from tests.conftest import FIXTURES, prompt, sample, tiny

from kvbench import registry
from kvbench.engine import Engine
from kvbench.method import Method

COMPRESSKV = {"head_idx": str(FIXTURES / "compresskv" / "tiny_head_idx.json"),
              "layer_scores": str(FIXTURES / "compresskv" / "tiny_layer_score.jsonl")}
CASES = {  # name: (budget, params); kvcar without an artifact is an untrained, seeded codec with no reuse
    "full": (1.0, {}), "random": (0.25, {}), "knorm": (0.25, {}), "streamingllm": (0.25, {}),
    "snapkv": (0.25, {}), "pyramidkv": (0.25, {}), "h2o": (0.25, {"evict_during_decoding": True}),
    "tova": (0.25, {}), "adakv": (0.25, {}), "compresskv": (0.25, COMPRESSKV),
    "selectfit": (0.25, {"recent": 8}), "kvsculpt": (0.25, {"recent": 8, "iterations": 2}),
    "deltakv": (1.0, {"random_init": True, "window": 8, "sinks": 4}),
    "kvcar": (1.0, {}), "snapkv+kvcar": (0.25, {}),
}


def test_every_method_is_covered():
    assert set(registry.METHODS) <= set(CASES)


def held_bytes(root) -> int:
    """Bytes of every distinct storage of a tensor reachable from ``root`` through attributes and containers.
    Not followed: methods (their parameters, like a codec's weights, are the model's side, shared by every cache),
    modules and weak references (a store's pointer to its copy)."""
    storages, seen = {}, set()

    def visit(o):
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            storages[(st.data_ptr(), str(o.device))] = st.nbytes()
        elif isinstance(o, (Method, torch.nn.Module, weakref.ref, type)) or id(o) in seen:
            return
        elif isinstance(o, dict):
            seen.add(id(o))
            for v in o.values():
                visit(v)
        elif isinstance(o, (list, tuple, set)):
            seen.add(id(o))
            for v in o:
                visit(v)
        elif hasattr(o, "__dict__"):
            seen.add(id(o))
            for v in vars(o).values():
                visit(v)

    visit(root)
    return sum(storages.values())


def step_bytes(cache) -> int:
    """The one slack: what the cache holds for the step, not KV state (a full cache holds it too): the last
    forward's [B, T] positions and the [B] tokens seen (8 bytes each), and the values its layers share within that
    step (``per_step``: a method's [B] or [B*H] token targets)."""
    return held_bytes([cache.positions, cache.seen, cache._per_step])


@pytest.mark.parametrize("name", list(CASES))
def test_reported_bytes_are_the_held_bytes(name):
    budget, params = CASES[name]
    eng = Engine(tiny("llama"), registry.build_method(name, budget, params))
    cache, first, info = eng.prefill(sample(prompt(150, 1), prompt(6, 2)))
    assert step_bytes(cache) <= 8 * (6 + 1) + 8 * 4  # the question's positions, seen, a few targets
    assert held_bytes(cache) == info["kv_bytes_prefill"] + step_bytes(cache)
    _, out = eng.decode(cache, first, [5], [False], trace_every=0)
    assert held_bytes(cache) == out["kv_bytes_end"] + step_bytes(cache)
