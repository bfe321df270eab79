"""``adakv``: head-wise budget allocation over any scorer, with real per-head memory.

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
Inference" (2024). Reference code: FFY0/AdaKV, adaptive_snapkv/monkeypatch/snapkv_utils.py
(``AdaptiveSnapKVCluster.update_kv_gqa``). The layer's budget goes preferentially to the heads whose
scores are highest, so concentrated heads keep few tokens and dispersed heads many; a floor of ``alpha``
x the per-head budget protects every head (the paper's safeguard, alpha = 0.2).

``allocation="official"`` (default), as the reference: with ``B = n - pinned`` tokens per head to choose
(``n`` the per-head budget, ``pinned`` the tokens the scorer always keeps: SnapKV's window), the layer's
``H * B`` best raw scores give each head a count ``c``; the head keeps its top
``round(c * (1 - alpha) + int(B * alpha))`` and its pinned tokens (so the layer total can fall short of
the budget by rounding, as in the reference).

``allocation="kvpress"``, kvpress 0.5.5's ``AdaKVPress``: each head's top ``max(1, int(n * alpha))``
scores are protected, then the layer keeps its ``H * n`` best (protected and pinned first).

The default scorer is the reference's: SnapKV's observation window of 32 with max pooling over 7 positions
(FFY0/AdaKV ``config_compress(window_size=32, kernel_size=7, pooling="maxpool")``, its LongBench scripts'
``w32_k7_maxpool``), not ``snapkv``'s own defaults (average over 5, as SnapKV's code); before 2026-12-04 it was
the latter: those runs are labelled ``adakv(scorer.kernel=5,scorer.pooling=avg)``, and ``-m scorer=snapkv``
(a scorer named is built with its own defaults) runs them again. ``scorer`` names any scored method.

Choices: each head's tokens are really freed (ragged segments); a budget below the window keeps the newest
tokens (the reference refuses it).
"""
from dataclasses import dataclass, field

import torch

from kvbench.cache import LayerCall
from kvbench.distributed import all_heads, own_heads
from kvbench.method import KEEP_ALWAYS, ScoredEviction, in_range, segment_view
from kvbench.methods.snapkv import SnapKV
from kvbench.registry import UnknownNameError


@dataclass
class AdaKV(ScoredEviction):
    alpha: float = field(default=0.2, metadata=in_range(0, 1))
    allocation: str = "official"
    scorer: ScoredEviction = field(default_factory=lambda: SnapKV(kernel=7, pooling="max"))

    def __post_init__(self):
        if self.allocation not in ("official", "kvpress"):
            raise UnknownNameError(f"adakv allocation '{self.allocation}' is unknown: use 'official' or 'kvpress'")

    def score(self, call: LayerCall) -> torch.Tensor:
        return self.scorer.score(call)

    def head_counts(self, call: LayerCall, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        store = call.store
        B, H = store.B, store.H
        lengths = getattr(store, "host_length", None)  # the width from the host when known: no device sync
        vals, _ = segment_view(store, scores.float(), width=None if lengths is None else max(lengths, default=0))
        per_head = torch.minimum(target.repeat_interleave(H), store.length)
        pinned = (vals == KEEP_ALWAYS).sum(dim=1)
        if self.allocation == "official":
            choose = (per_head - pinned).clamp(min=0)
            floor = (choose.double() * self.alpha).long()
            ranked = torch.where(vals == KEEP_ALWAYS, torch.full_like(vals, float("-inf")), vals)
        else:
            choose = per_head
            floor = (per_head.double() * self.alpha).long().clamp(min=1 if self.alpha > 0 else 0)
            ranked = vals
        ranked = torch.sort(ranked, dim=1, descending=True).values
        col = torch.arange(ranked.shape[1], device=ranked.device)[None, :]
        if self.allocation == "kvpress":  # the protected floor ranks first
            ranked = torch.where(col < floor[:, None], torch.full_like(ranked, KEEP_ALWAYS), ranked)
        # Tensor parallel: the heads of the layer compete across processes; every rank allocates over all of
        # them (gathered) and keeps its own heads' counts (kvbench.distributed).
        shard = call.cache.head_shard
        ranked, all_choose = all_heads(shard, ranked, B), all_heads(shard, choose, B)
        H = ranked.shape[0] // B
        # Each sequence's best ``total`` scores over all its heads (the finite ones), counted per head: one sort
        # of the layer's scores per sequence, no read-back (a top-k of a per-sequence k would need one).
        flat = ranked.view(B, -1)
        total = all_choose.view(B, H).sum(dim=1)
        best = torch.sort(flat, dim=1, descending=True)
        taken = torch.arange(flat.shape[1], device=flat.device)[None, :] < total[:, None]
        taken &= best.values > float("-inf")
        counts = torch.zeros((B, H), dtype=all_choose.dtype, device=flat.device).scatter_add_(
            1, best.indices // ranked.shape[1], taken.to(all_choose.dtype)).view(-1)
        counts = own_heads(shard, counts, B)
        if self.allocation == "official":
            # a head holds its pinned tokens (the window) on top, but never more of them than its budget
            counts = torch.round(counts.double() * (1 - self.alpha) + floor).long() + torch.minimum(pinned, per_head)
        return torch.minimum(counts, store.length)
