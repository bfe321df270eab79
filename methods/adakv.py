"""``adakv``: head-wise budget allocation over any scorer, with real per-head memory.

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
Inference" (2024). The layer's total budget (heads x per-head budget) goes to the globally best-scoring
tokens across the layer's KV heads, so concentrated heads keep few tokens and dispersed heads many;
a floor of ``alpha`` x the per-head budget protects every head (the paper's safeguard, alpha = 0.2).
Choices: the default scorer is SnapKV's (``scorer`` names any scored method); scores are normalised per
head by their sum before the global ranking; each head's tokens are really freed (ragged segments).
"""
from dataclasses import dataclass, field

import torch

from kvbench.cache import LayerCall
from kvbench.method import KEEP_ALWAYS, ScoredEviction, segment_view
from kvbench.methods.snapkv import SnapKV


@dataclass
class AdaKV(ScoredEviction):
    alpha: float = 0.2
    scorer: ScoredEviction = field(default_factory=SnapKV)

    def score(self, call: LayerCall) -> torch.Tensor:
        return self.scorer.score(call)

    def head_counts(self, call: LayerCall, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        store = call.store
        B, H = store.B, store.H
        vals, _ = segment_view(store, scores.float())  # [B*H, L]
        finite = torch.where(torch.isfinite(vals), vals, torch.zeros_like(vals)).clamp(min=0)
        norm = finite / finite.sum(dim=1, keepdim=True).clamp(min=1e-30)
        norm = torch.where(vals == KEEP_ALWAYS, torch.full_like(norm, 2.0), norm)  # protected first
        norm = torch.where(vals == float("-inf"), torch.full_like(norm, -1.0), norm)
        per_head = target.repeat_interleave(H)
        floor = torch.minimum((per_head.double() * self.alpha).ceil().long(), store.length)
        # Each head keeps its top `floor`; the rest of the layer's budget goes to the best of the remainder.
        ranked = torch.sort(norm, dim=1, descending=True).values
        col = torch.arange(ranked.shape[1], device=ranked.device)[None, :]
        rest = torch.where(col >= floor[:, None], ranked, torch.full_like(ranked, -2.0)).view(B, -1)
        extra_total = (per_head - floor).view(B, H).sum(dim=1)
        counts = floor.clone()
        for b in range(B):
            k = int(min(extra_total[b], int((rest[b] > -1.0).sum())))
            if k <= 0:
                continue
            top = torch.topk(rest[b], k).indices // ranked.shape[1]
            counts.view(B, H)[b] += torch.bincount(top, minlength=H)
        return torch.minimum(counts, store.length)
