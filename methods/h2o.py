"""``h2o``: heavy hitters (accumulated attention) plus a recent window, held during decoding.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models"
(NeurIPS 2023). Every token's attention is accumulated over all queries so far; the cache keeps the
heaviest tokens and the most recent ones, evicting one token per generated token. Choices: the budget
splits half heavy, half recent (the paper's 50/50); prompt scores are the column sums of the whole
chunk's attention (all its queries: exact, computed without the [T, T] matrix), averaged over the query
heads of each KV head; the accumulator is kept per slot in the store and counted in its bytes.
"""
from dataclasses import dataclass

import torch

from kvbench.cache import LayerCall, fraction_target
from kvbench.kernels.window_scores import window_scores
from kvbench.method import ScoredEviction, protect_recent


@dataclass
class H2O(ScoredEviction):
    recent_ratio: float = 0.5
    evict_during_decoding: bool = True

    def _accumulate(self, call: LayerCall) -> None:
        store = call.store
        acc = store.extra.setdefault("acc", torch.zeros(store.k.shape[0], device=store.k.device))
        if call.decoding:
            acc += call.slot_attention()
        else:
            acc += window_scores(call.queries, call.positions, store.k, store.pos, store.start,
                                 store.length, call.scale, reduce="mean")

    def compress(self, call: LayerCall) -> None:
        self._accumulate(call)
        super().compress(call)

    def on_decode(self, call: LayerCall) -> None:
        self._accumulate(call)
        super().on_decode(call)

    def score(self, call: LayerCall) -> torch.Tensor:
        target = self.layer_target(call, fraction_target(self.budget, call.seen))
        n_recent = (target.double() * self.recent_ratio).long()
        return protect_recent(call.store, call.store.extra["acc"].clone(), n_recent)
