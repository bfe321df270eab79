"""The method extension point.

A method is a dataclass whose fields are its parameters (with its paper's defaults). The base class gives
it four hooks, all optional:

- ``prepare(lm)``: once per engine, with the loaded model (weights a method trained for that model);
- ``new_store(layer, batch, heads, head_dim, dtype, device)``: the store a layer uses (``RaggedKV`` unless
  the method keeps something else: latents, references, another layer's store);
- ``compress(call)``: after every context chunk of the prefill, with the layer's queries of that chunk;
- ``compress_cache(cache)``: once after each such chunk has passed every layer: work across layers
  (what a method gathered per layer in ``compress`` waits in ``cache.method_state`` until then);
- ``on_decode(call)``: after every decoding step, the generated token included.

Eviction methods subclass ``ScoredEviction`` and write one function, ``score(call) -> [S]`` (higher is
kept), and optionally ``layer_target``/``head_counts`` to shape the budget across layers or heads.
"""
from __future__ import annotations

import math
from collections.abc import Hashable
from typing import ClassVar

from dataclasses import dataclass

import torch

from kvbench.cache import LayerCall, RaggedKV, fraction_target
from kvbench.distributed import everywhere

KEEP_ALWAYS = float("inf")


class BudgetError(ValueError):
    pass


def parse_budget(text: str | float | int) -> float | int:
    """``0.25`` -> keep a quarter of the tokens; ``512`` -> keep 512 tokens per head."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise BudgetError(f"budget '{text}' is not a number: give a fraction in (0, 1] such as 0.25, "
                          "or a token count such as 512") from None
    if not math.isfinite(value):
        raise BudgetError(f"budget {text} is not a finite number: give a fraction in (0, 1] or a token count >= 1")
    if value <= 0:
        raise BudgetError(f"budget {text} is impossible: give a fraction in (0, 1] or a token count >= 1")
    if value <= 1.0:
        return value
    if value != int(value):
        raise BudgetError(f"budget {text} is neither a fraction in (0, 1] nor a whole token count")
    return int(value)


def in_range(lo=None, hi=None) -> dict:
    """Field metadata: the inclusive range of a numeric parameter (None: open), checked with every other
    parameter's type when a method or task is built from user input (``kvbench.registry.check_params``)."""
    return {"range": (lo, hi)}


@dataclass
class Method:
    budget: float | int = 1.0

    # What the method learns or calibrates for a model, as commands that write an artifact: {"train" or
    # "calibrate": "module:click_command"}; `kvbench train/calibrate NAME` runs them (kvbench.registry).
    artifact_commands: ClassVar[dict[str, str]] = {}
    # The parameter that takes the artifact's directory (`kvbench run --artifact DIR`, alias --checkpoint).
    artifact_param: ClassVar[str] = "artifact"

    def prepare(self, lm) -> None:
        """Called by the engine with the loaded model before any cache is made (a trained method loads and
        checks its weights here)."""

    def new_store(self, layer: int, batch: int, heads: int, head_dim: int, dtype, device):
        return RaggedKV(batch, heads, head_dim, dtype, device)

    def compress(self, call: LayerCall) -> None:
        pass

    def compress_cache(self, cache) -> None:
        pass

    def on_decode(self, call: LayerCall) -> None:
        pass

    def keeps_everything(self) -> bool:
        return isinstance(self.budget, float) and self.budget >= 1.0

    def static_decode(self) -> bool:
        """True when decoding only appends tokens (no decode-time hook changes the stores): the engine may
        then replay the decoding step as a CUDA graph."""
        return type(self).on_decode is Method.on_decode

    def decode_epoch(self, cache) -> Hashable | None:
        """When the engine may replay a captured decoding step: a key that stays the same while every
        layout and host-side size the step uses stays fixed (a graph captured at one key replays while the
        key holds), or None: the coming step must run eagerly. By default one key for ever when decoding
        only appends."""
        return () if self.static_decode() else None


def segment_view(store: RaggedKV, per_slot: torch.Tensor, fill=float("-inf")) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot values as a padded [B*H, Lmax] tensor (``fill`` where invalid) and the slot numbers."""
    idx, valid = store.slot_index()
    vals = torch.where(valid, per_slot[idx], torch.full_like(per_slot[idx], fill))
    return vals, idx


def keep_top(store: RaggedKV, scores: torch.Tensor, counts: torch.Tensor) -> None:
    """Keep the ``counts[i]`` best-scoring slots of every segment i (ties: earlier slot), in slot order."""
    counts = torch.minimum(counts.to(store.length.device), store.length)
    if bool((counts == store.length).all()):
        return
    vals, idx = segment_view(store, scores.float())
    kmax = int(counts.max())
    top = torch.topk(vals, kmax, dim=1, sorted=True).indices  # [BH, kmax]
    chosen = torch.arange(kmax, device=top.device)[None, :] < counts[:, None]
    top = torch.where(chosen, top, torch.full_like(top, vals.shape[1]))  # push unchosen to the end
    top = torch.sort(top, dim=1).values
    slots = torch.gather(idx, 1, top.clamp(max=max(vals.shape[1] - 1, 0)))
    store.keep(slots[chosen], counts)


def protect_recent(store: RaggedKV, scores: torch.Tensor, n_recent: torch.Tensor | int, sinks: int = 0) -> torch.Tensor:
    """Scores with the ``n_recent`` newest tokens of each sequence (and the first ``sinks``) kept always."""
    B, H = store.B, store.H
    idx, valid = store.slot_index()
    pos = torch.where(valid, store.pos[idx].long(), torch.full_like(idx, -1))
    newest = pos.max(dim=1).values
    n_recent = torch.as_tensor(n_recent, device=scores.device).expand(B).repeat_interleave(H)
    seg = torch.repeat_interleave(torch.arange(B * H, device=scores.device), store.capacity)
    slot_pos = store.pos.long()
    recent = slot_pos > (newest[seg] - n_recent[seg])
    keep = recent | ((slot_pos < sinks) & (slot_pos >= 0))
    return torch.where(keep, torch.full_like(scores, KEEP_ALWAYS), scores)


@dataclass
class ScoredEviction(Method):
    """Keep the best-scoring tokens. Subclasses implement ``score``; compression runs after each context
    chunk (``compress``); ``evict_during_decoding`` makes the same rule hold the budget while generating."""

    evict_during_decoding: bool = False

    def score(self, call: LayerCall) -> torch.Tensor:
        raise NotImplementedError

    def static_decode(self) -> bool:
        return type(self).on_decode is ScoredEviction.on_decode and (
            not self.evict_during_decoding or self.keeps_everything())

    def layer_target(self, call: LayerCall, target: torch.Tensor) -> torch.Tensor:
        """Tokens per head for this layer, given the method's average target per sequence [B]."""
        return target

    def head_counts(self, call: LayerCall, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Tokens per (sequence, head) [B*H], given the layer's target per head [B]."""
        return target.repeat_interleave(call.store.H)

    def compress(self, call: LayerCall) -> None:
        if self.keeps_everything():
            return
        store = call.store
        target = self.layer_target(call, fraction_target(self.budget, call.seen))
        # [distributed] tensor parallel: skipped on every rank or none (head_counts may be a collective)
        if everywhere(call.cache.head_shard, bool((store.token_counts().max(dim=1).values <= target).all())):
            return
        scores = self.score(call)
        keep_top(store, scores, self.head_counts(call, scores, target))

    def on_decode(self, call: LayerCall) -> None:
        if not self.evict_during_decoding or self.keeps_everything():
            return
        store = call.store
        target = self.layer_target(call, fraction_target(self.budget, call.seen)).repeat_interleave(store.H)
        over = store.length - target
        if not bool((over > 0).any()):
            return
        scores = self.score(call)
        if bool((over <= 1).all()):
            vals, idx = segment_view(store, scores.float(), fill=float("inf"))
            victim = torch.gather(idx, 1, vals.argmin(dim=1, keepdim=True))[:, 0]
            store.remove_one(victim, over > 0)
        else:
            keep_top(store, scores, torch.minimum(store.length, target))
