"""``pyramidkv``: SnapKV's scores with layer budgets shaped as a pyramid.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling" (2024).
Lower layers spread attention widely and get more tokens; upper layers get fewer, on a linear schedule
whose mean over layers equals the budget. Choices: as the official code, the observation window sits
outside the schedule; the top layer gets (budget - window) / beta, the bottom layer
2 * (budget - window) - that; a layer's budget is clipped to what it holds (so on short prompts the mean
can fall below the budget; the measured ratio is recorded either way).
"""
from dataclasses import dataclass

import torch

from kvbench.cache import LayerCall
from kvbench.methods.snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    beta: float = 20.0

    def layer_target(self, call: LayerCall, target: torch.Tensor) -> torch.Tensor:
        w = min(self.window, call.queries.shape[2])
        avg = (target - w).clamp(min=0).double()
        low = avg / self.beta
        high = 2 * avg - low
        frac = call.layer / max(call.n_layers - 1, 1)
        layer = torch.round(high - (high - low) * frac).long() + w
        return torch.minimum(layer.clamp(min=1), call.seen)
