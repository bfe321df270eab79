"""``random``: keep a uniformly random subset of the tokens (the floor any scorer must beat).

Reference code: kvpress 0.5.5, kvpress/presses/random_press.py (``RandomPress``): scores drawn as
``torch.rand(batch, kv_heads, tokens)`` from a generator seeded with ``seed`` at every compression, so
every layer draws the same scores (and, at equal lengths, keeps the same positions).
Choices: the draw is float32 whatever the cache dtype (kvpress draws in the keys' dtype, whose bfloat16
ties would leave the choice to top-k's tie order); ``window`` > 0 keeps the newest tokens as every
observation-window method keeps them (0, kvpress's, by default).
"""
from dataclasses import dataclass

import torch

from kvbench.cache import LayerCall
from kvbench.method import ScoredEviction, protect_recent


@dataclass
class Random(ScoredEviction):
    seed: int = 0
    window: int = 0

    def score(self, call: LayerCall) -> torch.Tensor:
        store = call.store
        idx, valid = store.slot_index()
        g = torch.Generator(device=store.k.device).manual_seed(self.seed)
        draw = torch.rand(store.B, store.H, idx.shape[1], generator=g, device=store.k.device)
        scores = torch.zeros(store.k.shape[0], device=store.k.device)
        scores[idx[valid]] = draw.view(store.B * store.H, -1)[valid]
        return protect_recent(store, scores, self.window) if self.window else scores
