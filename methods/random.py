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
        lengths = getattr(store, "host_length", None)  # the width from the host when known: no device sync
        idx, valid = store.slot_index(None if lengths is None else max(lengths, default=0))
        g = torch.Generator(device=store.k.device).manual_seed(self.seed)
        draw = torch.rand(store.B, store.H, idx.shape[1], generator=g, device=store.k.device)
        # each valid slot gets its draw; the padding's draws go to one spare slot past the end (a boolean mask
        # would size its result from the device: a read-back per layer)
        n = store.k.shape[0]
        scores = torch.zeros(n + 1, device=store.k.device)
        scores[torch.where(valid, idx, n).view(-1)] = draw.view(-1)
        scores = scores[:n]
        return protect_recent(store, scores, self.window) if self.window else scores
