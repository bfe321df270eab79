"""A budget below SnapKV's observation window (a short prompt at a small fraction): the references refuse it
(``assert max_capacity_prompt - window_size > 0``); kvbench keeps the newest tokens the budget allows, never more."""
import math
from types import SimpleNamespace

import pytest
import torch

from kvbench import registry
from kvbench.cache import KVCache


def kept_positions(method, T=200, B=1, Hq=4, Hkv=2, D=16, layers=2):
    cfg = SimpleNamespace(num_hidden_layers=layers, num_key_value_heads=Hkv, num_attention_heads=Hq, head_dim=D,
                          hidden_size=Hq * D)
    cache = KVCache(method, cfg, B, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    cache.begin(torch.arange(T)[None].expand(B, T), compress=True, final=True)
    for layer in range(layers):
        q = torch.randn(B, Hq, T, D, generator=g) * 2
        k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
        cache.attention(layer, q, k, v, 1 / math.sqrt(D))
    cache.end_compression()
    return [[sorted(st.pos[int(a):int(a) + int(n)].tolist()) for a, n in zip(st.start, st.length)]
            for st in cache.stores]


@pytest.mark.parametrize("name", ["snapkv", "adakv", "pyramidkv"])
def test_a_budget_below_the_window_keeps_the_newest_tokens(name):
    T, budget = 200, 0.1  # 20 tokens a head on average against a window of 32
    layers = kept_positions(registry.build_method(name, budget), T=T)
    for heads in layers:
        held = sum(len(h) for h in heads)
        assert held <= len(heads) * int(T * budget) * (2 if name == "pyramidkv" else 1)  # pyramidkv: its schedule
        for h in heads:
            assert h == list(range(T - len(h), T)), h  # the window's newest, the prompt's last token among them
    if name != "pyramidkv":
        assert all(sum(len(h) for h in heads) == len(heads) * int(T * budget) for heads in layers)


def test_a_budget_above_the_window_is_unchanged_by_the_rule():
    """Above the window the rule is not applied: the window is kept whole and the rest chosen by score."""
    for heads in kept_positions(registry.build_method("snapkv", 0.5)):
        for h in heads:
            assert h[-32:] == list(range(168, 200)) and len(h) == 100
