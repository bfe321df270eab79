"""``knorm``: keep the tokens with the lowest key norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression" (EMNLP 2024):
keys with a low L2 norm draw high attention, so the highest-norm keys are evicted. Reference code:
kvpress 0.5.5 (by the paper's authors), kvpress/presses/knorm_press.py (``KnormPress``): score = minus
the key's L2 norm, in at least float32. Choices left open: norms are taken on the RoPE-rotated keys as
stored (rotation preserves the norm), per KV head.
"""
from dataclasses import dataclass

import torch

from kvbench.cache import LayerCall
from kvbench.method import ScoredEviction


@dataclass
class KNorm(ScoredEviction):
    def score(self, call: LayerCall) -> torch.Tensor:
        return -call.store.k.float().norm(dim=-1)
