"""``streamingllm``: attention sinks plus a recent window.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024). Reference code:
mit-han-lab/streaming-llm, streaming_llm/kv_cache.py (``StartRecentKVCache``), and kvpress 0.5.5's
``StreamingLLMPress`` (kvpress/presses/streaming_llm_press.py), which keep the same tokens: the first
``sinks`` tokens and the most recent ones; the oldest non-sink token is evicted as generation goes on.
Choices: the budget counts the sinks; positions are the original token positions (no re-indexing of
positions inside the cache, which the paper does for very long streams beyond the model's window).
"""
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.cache import LayerCall
from kvbench.method import KEEP_ALWAYS, DecodeRanking, ScoredEviction


@dataclass
class StreamingLLM(ScoredEviction):
    decode_sync_free: ClassVar[bool] = True
    sinks: int = 4
    evict_during_decoding: bool = True

    def score(self, call: LayerCall) -> torch.Tensor:
        pos = call.store.pos.float()
        return torch.where((pos < self.sinks) & (pos >= 0), torch.full_like(pos, KEEP_ALWAYS), pos)

    def decode_ranking(self, call: LayerCall, target: torch.Tensor) -> DecodeRanking:
        # the same rule as ``score`` in one kernel: the oldest position leaves, the sinks stay
        return DecodeRanking(call.store.pos, sinks=self.sinks)
