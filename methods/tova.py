"""``tova``: evict the token the current query attends to least, every step.

Oren et al., "Transformers are Multi-State RNNs" (TOVA, 2024). Reference code: schwartz-lab-NLP/TOVA,
src/tova_cache.py (``TOVACache.reduce``). At the end of the prompt the cache is cut to the budget by the
last prompt token's attention; then each generated token is added and the lowest-attention token
evicted. As the reference, the attention of the last query is averaged over all query heads of the layer,
so a layer keeps one set of positions for all its KV heads, and every key competes, the newest included
(the reference does not pin it; its own attention is usually high).

``pin_newest=True`` is kvpress 0.5.5's ``TOVAPress`` choice: the newest token is always kept and the
others ranked without it.
"""
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.cache import LayerCall
from kvbench.distributed import sum_heads
from kvbench.kernels.window_scores import window_scores
from kvbench.method import DecodeRanking, ScoredEviction, place, protect_recent


@dataclass
class TOVA(ScoredEviction):
    evict_during_decoding: bool = True
    decode_sync_free: ClassVar[bool] = True
    pin_newest: bool = False

    def decode_reads_slot_attention(self) -> bool:
        return self.evict_during_decoding and not self.keeps_everything()

    def score(self, call: LayerCall) -> torch.Tensor:
        store = call.store
        if call.decoding:
            per_group = call.slot_attention()
        else:
            per_group = window_scores(call.queries[:, :, -1:], call.positions[:, -1:], store.k, store.pos,
                                      store.start, store.length, call.scale, reduce="mean")
        # The mean over the KV heads of the group means is the mean over all query heads; it needs the
        # heads of a sequence to hold the same positions in the same slot order (TOVA keeps them so: checked
        # at the prompt; while decoding every head gains the same token and loses the same one).
        idx, valid = store.padded_slots()  # no device sync while decoding (a replayed CUDA graph)
        B, H = store.B, store.H
        if not call.decoding:
            pos = store.pos[idx].view(B, H, -1)
            if bool((pos != pos[:, :1]).any()):
                raise RuntimeError("tova: the KV heads of a layer hold different positions; TOVA keeps one set per layer")
        vals = torch.where(valid, per_group[idx], torch.zeros_like(per_group[idx]))
        # Tensor parallel: the mean over all the layer's heads, from each rank's sum (kvbench.distributed).
        shard, per_head = call.cache.head_shard, vals.view(B, H, -1)
        layer = per_head.mean(dim=1, keepdim=True) if shard is None else \
            sum_heads(shard, per_head.sum(dim=1, keepdim=True)) / (H * shard.world)
        layer = layer.expand(B, H, -1).reshape(B * H, -1)
        scores = place(layer, idx, valid, per_group.shape[0])  # back per slot, fixed shapes
        return protect_recent(store, scores, 1) if self.pin_newest else scores

    def decode_ranking(self, call: LayerCall, target: torch.Tensor) -> DecodeRanking:
        if call.cache.head_shard is not None:  # the mean over heads needs the other ranks' heads: ``score``
            return DecodeRanking(self.score(call))
        # ``score``'s mean over the layer's heads, placed back per slot, as one ranking shared by the heads
        return DecodeRanking(call.slot_attention(), recent=1 if self.pin_newest else None, shared_by_heads=True)
