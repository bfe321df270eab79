"""The attention function transformers calls for models loaded with ``attn_implementation="kvbench"``.

It is registered in transformers' public ``AttentionInterface`` (``register()``, called by the model
loader, idempotent). All it does is hand the layer's queries, new keys and new values to the
``KVCache`` that the engine passes as the forward kwarg ``kvbench_cache``.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface

NAME = "kvbench"


class CacheMissingError(RuntimeError):
    pass


def kvbench_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, scaling: float | None = None, dropout: float = 0.0,
                      kvbench_cache=None, **kwargs):
    if kvbench_cache is None:
        # Never fall back to full attention silently: a forward without a kvbench cache is a bug.
        raise CacheMissingError("kvbench attention was called without a kvbench cache (pass kvbench_cache=...)")
    if attention_mask is not None and attention_mask.dim() == 4 and not bool(attention_mask.all()):
        raise CacheMissingError("kvbench attention does not take padding masks; the engine prefills sequences one by one")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = kvbench_cache.attention(module.layer_idx, query, key, value, scale)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    AttentionInterface.register(NAME, kvbench_attention)
