"""``random``: keep a uniformly random subset of the tokens (the floor any scorer must beat)."""
from dataclasses import dataclass

import torch

from kvbench.cache import LayerCall
from kvbench.method import ScoredEviction, protect_recent


@dataclass
class Random(ScoredEviction):
    """Random eviction. Choices: the last ``window`` tokens are kept (as every observation-window method
    keeps them), the draw is seeded per layer so runs repeat."""

    seed: int = 0
    window: int = 0

    def score(self, call: LayerCall) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(self.seed * 1000 + call.layer)
        scores = torch.rand(call.store.k.shape[0], generator=g).to(call.store.k.device)
        return protect_recent(call.store, scores, self.window) if self.window else scores
