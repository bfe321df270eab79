"""``h2o``: heavy hitters (accumulated attention) plus a recent window, held during decoding.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models"
(NeurIPS 2023). Reference code: FMInference/H2O, h2o_hf/utils_real_drop/modify_llama.py
(``H2OKVCache_LayerWise``). Every token's attention is summed over all queries so far; the cache keeps
the ``recent`` newest tokens and the heaviest of the others, evicting one token per generated token.
Choices: the budget splits ``recent = int(n * recent_ratio)`` recent and the rest heavy (the paper's
50/50); prompt scores are the column sums of the whole chunk's attention (all its queries: exact,
computed without the [T, T] matrix), averaged over the query heads of each KV head (the reference is
MHA only); the accumulator is kept per slot in the store and counted in its bytes.

kvpress 0.5.5's ``ObservedAttentionPress`` (its H2O) differs in two ways, both offered: it keeps no
recent window (``recent_ratio=0``) and divides each key's sum by the number of queries that saw it
(``mean_over_queries=True``), so late tokens are not handicapped by having been seen less.
"""
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kvbench.cache import LayerCall, fraction_target
from kvbench.kernels.window_scores import window_scores
from kvbench.method import DecodeRanking, ScoredEviction, in_range, protect_recent


@dataclass
class H2O(ScoredEviction):
    decode_sync_free: ClassVar[bool] = True
    recent_ratio: float = field(default=0.5, metadata=in_range(0, 1))
    mean_over_queries: bool = False
    evict_during_decoding: bool = True

    def _accumulate(self, call: LayerCall) -> None:
        store = call.store
        if "acc" not in store.extra:
            store.extra["acc"] = torch.zeros(store.k.shape[0], device=store.k.device)
        acc = store.extra["acc"]
        if call.decoding:
            call.slot_attention(out=acc)  # added in the same launch
        else:
            acc += window_scores(call.queries, call.positions, store.k, store.pos, store.start,
                                 store.length, call.scale, reduce="mean")

    def decode_reads_slot_attention(self) -> bool:
        return True  # every decoding step adds the new query's attention to the running sum

    def compress(self, call: LayerCall) -> None:
        self._accumulate(call)
        super().compress(call)

    def on_decode(self, call: LayerCall) -> None:
        self._accumulate(call)
        super().on_decode(call)

    def score(self, call: LayerCall) -> torch.Tensor:
        store = call.store
        scores = store.extra["acc"].clone()
        if self.mean_over_queries:  # queries that saw a key: itself and every later token
            seen = call.seen.to(scores.device)[store.slot_segments() // store.H]
            scores = scores / (seen - store.pos.long()).clamp(min=1)
        target = self.layer_target(call, fraction_target(self.budget, call.seen))
        n_recent = (target.double() * self.recent_ratio).long()
        return protect_recent(store, scores, n_recent)

    def decode_ranking(self, call: LayerCall, target: torch.Tensor) -> DecodeRanking:
        if self.mean_over_queries:
            return DecodeRanking(self.score(call))
        # ``score`` without its copies: the accumulator, the ``recent`` newest tokens kept (in the kernel); the
        # count is the same in every layer (H2O has no per-layer budget), so it is made once a step
        recent = call.per_step(("h2o recent", self.budget, self.recent_ratio),
                               lambda: (target.double() * self.recent_ratio).long())
        return DecodeRanking(call.store.extra["acc"], recent=recent)
