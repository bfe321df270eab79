"""``snapkv``: observation-window attention, pooled.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (NeurIPS 2024). The last
``window`` queries of the prompt vote for earlier tokens by their softmax attention, summed over the
window and pooled along the sequence so neighbours of important tokens survive. Choices: scores are
averaged over the query heads that share a KV head (GQA; the official code predates GQA); the window
tokens themselves are always kept and count in the budget; with chunked prefill each chunk's own last
queries are the window. Defaults as the official code: window 32, average pooling with kernel 5.
"""
from dataclasses import dataclass

import torch

from kvbench.cache import LayerCall
from kvbench.kernels.window_scores import pool_scores, window_scores
from kvbench.method import ScoredEviction, protect_recent


def observation_scores(call: LayerCall, window: int, reduce: str = "mean") -> torch.Tensor:
    """[S] attention mass the last ``window`` queries of this call put on each slot."""
    store = call.store
    w = min(window, call.queries.shape[2])
    return window_scores(call.queries[:, :, -w:], call.positions[:, -w:], store.k, store.pos,
                         store.start, store.length, call.scale, reduce=reduce)


@dataclass
class SnapKV(ScoredEviction):
    window: int = 32
    kernel: int = 5
    pooling: str = "avg"

    def score(self, call: LayerCall) -> torch.Tensor:
        scores = observation_scores(call, self.window)
        if self.kernel > 1:
            scores = pool_scores(scores, call.store.start, call.store.length, self.kernel, self.pooling)
        return protect_recent(call.store, scores, min(self.window, call.queries.shape[2]))
