"""``pyramidkv``: SnapKV's scores with layer budgets shaped as a pyramid.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling" (2024).
Reference code: Zefan-Cai/KVCache-Factory, pyramidkv/pyramidkv_utils.py (``PyramidKVCluster``, its GQA
path ``_update_kv_kv_head``). Lower layers spread attention widely and get more tokens, upper layers
fewer, on a linear schedule; every layer keeps its observation window on top of its share.

``schedule="official"`` (default), the reference's integer arithmetic with ``n`` the kept tokens per head
(kvbench's kept-fraction convention, window included) and ``base = n - window``:
``min = base // beta``, ``max = 2 * base - min``; when ``max >= T - window`` it is clipped there and
``min = 2 * base - max``; ``steps = (max - min) // (layers - 1)``; layer ``l`` keeps
``max - l * steps`` tokens before the window plus the window, except that it keeps ``base`` plus the
window (SnapKV's uniform budget) when ``T < 2 * base``. The whole budget, windows included, is spread.

``schedule="kvpress"``: kvpress 0.5.5's ``PyramidKVPress.get_layer_budget``, in floats with
``X = T * budget``: ``min = X / beta``, ``max = 2X - min`` (clipped as above); layer ``l`` keeps
``round(max - l * (max - min) / (layers - 1))`` tokens, window included; uniform ``max(1, round(X))``
when not ``T >= max >= min >= window`` (so whenever ``X / beta < window``).

Choices: the scores are ``snapkv``'s, with its choices and defaults (window 32, average pooling over 5; scores
averaged over the query heads of a KV head; with chunked prefill each chunk's own last queries are the window).
"""
from dataclasses import dataclass, field

import torch

from kvbench.cache import LayerCall, ints_on
from kvbench.method import in_range
from kvbench.methods.snapkv import SnapKV
from kvbench.registry import UnknownNameError


def official_kept(T: int, n: int, window: int, beta: float, layer: int, n_layers: int) -> int:
    base = n - window
    if T < n or base <= 0:
        return n
    if T < base * 2:
        return base + window
    min_num = base // beta
    max_num = base * 2 - min_num
    if max_num >= T - window:
        max_num = T - window
        min_num = base * 2 - max_num
    steps = (max_num - min_num) // max(n_layers - 1, 1)
    return int(max_num - layer * steps) + window


def kvpress_kept(T: int, x: float, window: int, beta: float, layer: int, n_layers: int) -> int:
    min_num = x / beta
    max_num = x * 2 - min_num
    if max_num >= T - window:
        max_num = T - window
        min_num = x * 2 - max_num
    if not (T >= max_num >= min_num >= window):
        return max(1, round(x))
    steps = (max_num - min_num) / (n_layers - 1) if n_layers > 1 else 0.0
    return round(max_num - layer * steps)


@dataclass
class PyramidKV(SnapKV):
    beta: float = field(default=20.0, metadata=in_range(1))
    schedule: str = "official"

    def __post_init__(self):
        if self.schedule not in ("official", "kvpress"):
            raise UnknownNameError(f"pyramidkv schedule '{self.schedule}' is unknown: use 'official' or 'kvpress'")

    def layer_target(self, call: LayerCall, target: torch.Tensor) -> torch.Tensor:
        return ints_on(self.host_layer_target(call, target.tolist()), target.device)

    def host_layer_target(self, call: LayerCall, per_seq: list[int]) -> list[int]:
        # A function of the tokens seen and the layer only: the host knows both (no device sync).
        w = min(self.window, call.queries.shape[2])
        kept = []
        for T, n in zip(call.cache.seen_host, per_seq):
            if self.schedule == "official":
                k = official_kept(T, n, w, self.beta, call.layer, call.n_layers)
            else:
                x = T * self.budget if isinstance(self.budget, float) else float(n)
                k = kvpress_kept(T, x, w, self.beta, call.layer, call.n_layers)
            kept.append(min(max(k, 1), T))
        return kept
