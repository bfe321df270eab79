"""``tova``: evict the token the current query attends to least, every step.

Oren et al., "Transformers are Multi-State RNNs" (TOVA, 2024). At the end of the prompt the cache is cut
to the budget by the last prompt token's attention; then each generated token is added and the
lowest-attention token evicted. Choices: attention is averaged over the query heads sharing a KV head
(the paper averages over heads of a layer; with GQA the KV head is the unit that holds memory).
"""
from dataclasses import dataclass

import torch

from kvbench.cache import LayerCall
from kvbench.kernels.window_scores import window_scores
from kvbench.method import ScoredEviction


@dataclass
class TOVA(ScoredEviction):
    evict_during_decoding: bool = True

    def score(self, call: LayerCall) -> torch.Tensor:
        if call.decoding:
            return call.slot_attention()
        store = call.store
        return window_scores(call.queries[:, :, -1:], call.positions[:, -1:], store.k, store.pos,
                             store.start, store.length, call.scale, reduce="mean")
