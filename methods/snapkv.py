"""``snapkv``: observation-window attention, pooled.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (NeurIPS 2024). Reference code:
FasterDecoding/SnapKV, snapkv/monkeypatch/snapkv_utils.py (``SnapKVCluster.update_kv``). The last
``window`` queries of the prompt vote for the tokens before the window by their softmax attention (over
every key they see), summed over the window; the votes are pooled along the sequence so neighbours of
important tokens survive; the best ``budget - window`` tokens before the window are kept, and the window
itself. As the official code, the window's own columns are cut before pooling (they neither get pooled
scores nor lend them to the tokens just before the window). kvpress 0.5.5's ``SnapKVPress`` follows the
same rule (it averages over the window instead of summing: the same ranking).

Choices: scores are averaged over the query heads that share a KV head (GQA; the official code predates
GQA and repeats the KV heads: SnapKV issue #22, kvpress and KVCache-Factory's GQA path average); the
window counts in the budget; with chunked prefill each chunk's own last queries are the window.
Defaults as the official code: window 32, average pooling with kernel 5.
"""
from dataclasses import dataclass, field

import torch

from kvbench.cache import LayerCall
from kvbench.kernels.window_scores import pool_scores, window_scores
from kvbench.method import ScoredEviction, in_range, protect_recent


def observation_scores(call: LayerCall, window: int, reduce: str = "mean") -> torch.Tensor:
    """[S] attention mass the last ``window`` queries of this call put on each slot."""
    store = call.store
    w = min(window, call.queries.shape[2])
    return window_scores(call.queries[:, :, -w:], call.positions[:, -w:], store.k, store.pos,
                         store.start, store.length, call.scale, reduce=reduce)


@dataclass
class SnapKV(ScoredEviction):
    window: int = field(default=32, metadata=in_range(1))
    kernel: int = field(default=5, metadata=in_range(1))
    pooling: str = "avg"

    def score(self, call: LayerCall) -> torch.Tensor:
        store = call.store
        w = min(self.window, call.queries.shape[2])
        scores = observation_scores(call, w)
        if self.kernel > 1:
            # The window is the last ``w`` slots of each segment: pool only the slots before it.
            before = (store.length - w).clamp(min=0)
            lengths = getattr(store, "host_length", None)  # the width on the host, when known: no device sync
            scores = pool_scores(scores, store.start, before, self.kernel, self.pooling,
                                 width=None if lengths is None else max(max(lengths, default=0) - w, 0))
        return protect_recent(store, scores, w)
