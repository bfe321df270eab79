"""The method extension point.

A method is a dataclass whose fields are its parameters (with its paper's defaults). The base class gives
it five hooks, all optional:

- ``prepare(lm)``: once per engine, with the loaded model (weights a method trained for that model);
- ``new_store(layer, batch, heads, head_dim, dtype, device)``: the store a layer uses (``RaggedKV`` unless
  the method keeps something else: latents, references, another layer's store);
- ``compress(call)``: after every context chunk of the prefill, with the layer's queries of that chunk;
- ``compress_cache(cache)``: once after each such chunk has passed every layer: work across layers
  (what a method gathered per layer in ``compress`` waits in ``cache.method_state`` until then);
- ``on_decode(call)``: after every decoding step, the generated token included.

Eviction methods subclass ``ScoredEviction`` and write one function, ``score(call) -> [S]`` (higher is
kept), and optionally ``layer_target``/``head_counts`` to shape the budget across layers or heads, and
``decode_ranking`` to say what ``score`` computes in a form the decode-time eviction kernel applies itself
(per-slot values plus the tokens always kept), which keeps a replayed decoding step to a few launches a layer.
"""
from __future__ import annotations

import math
from collections.abc import Hashable
from typing import ClassVar

from dataclasses import dataclass

import torch

from kvbench.cache import LayerCall, RaggedKV, capturing, fraction_target, fraction_target_host, ints_on
from kvbench.distributed import everywhere
from kvbench.kernels.segment_evict import segment_argmin

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
    # False for a method whose memory follows from its own parameters, not from the budget (full, the codecs):
    # a sweep runs it once, at 1.0, whatever its budgets.
    uses_budget: ClassVar[bool] = True

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

    def artifact_paths(self) -> list[str]:
        """The artifacts this method reads (directories or files). Their identity goes into the run's id
        (``kvbench.artifact.identity``): an artifact remade at the same path never resumes, or passes for, a
        run made with the old one."""
        path = getattr(self, self.artifact_param, None)
        return [str(path)] if path else []

    def static_decode(self) -> bool:
        """True when decoding only appends tokens (no decode-time hook changes the stores): the engine may
        then replay the decoding step as a CUDA graph."""
        return type(self).on_decode is Method.on_decode

    def decode_reads_slot_attention(self) -> bool:
        """True when ``on_decode`` calls ``call.slot_attention()``: the decode attention then writes every
        slot's logit in its own pass (``LayerCall.slot_logits``), so the hook does not read the keys again."""
        return False

    def decode_epoch(self, cache) -> Hashable | None:
        """When the engine may replay a captured decoding step: a key that stays the same while every
        layout and host-side size the step uses stays fixed (a graph captured at one key replays while the
        key holds), or None: the coming step must run eagerly. By default one key for ever when decoding
        only appends."""
        return () if self.static_decode() else None


def place(values: torch.Tensor, at: torch.Tensor, keep: torch.Tensor, size: int) -> torch.Tensor:
    """A [size] tensor holding ``values[keep]`` at positions ``at[keep]``, zeros elsewhere, with fixed shapes: the
    entries not kept go to a spare place past the end (boolean indexing would read their count back)."""
    out = values.new_zeros(size + 1)
    out[torch.where(keep, at, torch.full_like(at, size))] = values
    return out[:size]


def segment_view(store: RaggedKV, per_slot: torch.Tensor, fill=float("-inf"),
                 width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot values as a padded [B*H, Lmax] tensor (``fill`` where invalid) and the slot numbers.
    ``width``: the longest segment, when the caller has read it already."""
    idx, valid = store.slot_index(width)
    vals = torch.where(valid, per_slot[idx], torch.full_like(per_slot[idx], fill))
    return vals, idx


def keep_top(store: RaggedKV, scores: torch.Tensor, counts: torch.Tensor, host_counts: list[int] | None = None) -> None:
    """Keep the ``counts[i]`` best-scoring slots of every segment i (ties: the earlier slot), in slot order. A
    segment asked to keep fewer than its always-kept slots (a budget below SnapKV's window: a short prompt at a
    small fraction, which the reference implementations refuse) keeps the newest of them, not the earliest (it
    would drop the prompt's last token).
    ``host_counts``: ``counts`` on the host, when the caller knows them: with the store's host lengths the work is
    sized without reading the device back (a prefill then never waits for the GPU between layers); otherwise
    one read-back."""
    counts = torch.minimum(counts.to(store.length.device), store.length)
    lengths = getattr(store, "host_length", None)
    if host_counts is None or lengths is None:
        # Counts that follow from scores (AdaKV's heads): read them back, with the lengths when the host lacks
        # them, in one transfer (one device sync). The store then keeps host copies of what it holds, so the
        # layers and chunks after this one size their work without reading back again.
        if lengths is None:
            back = torch.cat([counts, store.length]).tolist()
            host_counts, lengths = back[:len(counts)], back[len(counts):]
        else:
            host_counts = counts.tolist()
    host_counts = [min(c, n) for c, n in zip(host_counts, lengths)]
    nothing_to_drop = host_counts == lengths
    kmax, total, longest = max(host_counts, default=0), sum(host_counts), max(lengths, default=0)
    if nothing_to_drop:
        return
    vals, idx = segment_view(store, scores.float(), width=longest)
    pinned = vals == KEEP_ALWAYS
    too_many = pinned.sum(dim=1) > counts  # rank those rows' pinned slots by position, the rest out (no sync)
    newest_first = torch.where(pinned, store.pos[idx].float(), torch.full_like(vals, float("-inf")))
    vals = torch.where(too_many[:, None], newest_first, vals)
    # a stable sort, not topk: equal scores (max pooling's plateaus) go to the earlier slot whatever the tensor's
    # shape, so a head keeps the same tokens alone (tensor parallel) as beside the others
    top = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :kmax]  # [BH, kmax]
    chosen = torch.arange(kmax, device=top.device)[None, :] < counts[:, None]
    top = torch.where(chosen, top, torch.full_like(top, vals.shape[1]))  # push unchosen to the end
    top = torch.sort(top, dim=1).values
    slots = torch.gather(idx, 1, top.clamp(max=max(vals.shape[1] - 1, 0)))
    # The chosen slots, flat in segment order: row i's first counts[i] entries go to first[i], first[i] + 1, ...
    first = torch.cumsum(counts, 0) - counts
    at = first[:, None] + torch.arange(kmax, device=top.device)[None, :]
    store.keep(place(slots, at, chosen, total), counts, host_counts)


def protect_recent(store: RaggedKV, scores: torch.Tensor, n_recent: torch.Tensor | int, sinks: int = 0) -> torch.Tensor:
    """Scores with the ``n_recent`` newest tokens of each sequence (and the first ``sinks``) kept always.
    No device sync (decode-time eviction replays it in a CUDA graph)."""
    B, H = store.B, store.H
    idx, valid = store.padded_slots()
    pos = torch.where(valid, store.pos[idx].long(), torch.full_like(idx, -1))
    newest = pos.max(dim=1).values
    if not isinstance(n_recent, torch.Tensor):
        n_recent = torch.full((B,), int(n_recent), dtype=torch.long, device=scores.device)
    n_recent = n_recent.expand(B).repeat_interleave(H)
    seg = store.slot_segments()
    slot_pos = store.pos.long()
    recent = slot_pos > (newest[seg] - n_recent[seg])
    keep = recent | ((slot_pos < sinks) & (slot_pos >= 0))
    return torch.where(keep, torch.full_like(scores, KEEP_ALWAYS), scores)


@dataclass
class DecodeRanking:
    """How one decoding step ranks a layer's tokens for eviction (the lowest leaves):

    - ``scores`` [S]: a real value per slot (compared as float32: positions too);
    - ``recent``: the newest tokens of each sequence kept whatever their score (an int, or [B] per sequence;
      None: none), and the first ``sinks`` positions;
    - ``shared_by_heads``: one ranking per sequence for all the layer's KV heads (their scores summed position
      by position; the heads hold the same positions in the same order, as TOVA keeps them)."""

    scores: torch.Tensor
    recent: torch.Tensor | int | None = None
    sinks: int = 0
    shared_by_heads: bool = False


@dataclass
class ScoredEviction(Method):
    """Keep the best-scoring tokens. Subclasses implement ``score``; compression runs after each context
    chunk (``compress``); ``evict_during_decoding`` makes the same rule hold the budget while generating."""

    evict_during_decoding: bool = False
    # Whether ``score`` reads nothing back from the device while decoding (then the engine replays the decoding
    # step, its eviction included, as a CUDA graph; tests/methods/test_decode_graph.py checks each that says so).
    decode_sync_free: ClassVar[bool] = False

    def score(self, call: LayerCall) -> torch.Tensor:
        raise NotImplementedError

    def static_decode(self) -> bool:
        return type(self).on_decode is ScoredEviction.on_decode and (
            not self.evict_during_decoding or self.keeps_everything())

    def decode_epoch(self, cache) -> Hashable | None:
        """Decode-time eviction replays as a CUDA graph while no store changes its layout: every step evicts at
        most one token per segment in place (``_evict_one``), with fixed shapes."""
        if self.static_decode():
            return ()
        if not self.decode_sync_free or cache.head_shard is not None:
            return None
        return tuple(store.layout for store in cache.stores)

    def layer_target(self, call: LayerCall, target: torch.Tensor) -> torch.Tensor:
        """Tokens per head for this layer, given the method's average target per sequence [B]."""
        return target

    def head_counts(self, call: LayerCall, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Tokens per (sequence, head) [B*H], given the layer's target per head [B]."""
        return target.repeat_interleave(call.store.H)

    def host_layer_target(self, call: LayerCall, per_seq: list[int]) -> list[int] | None:
        """``layer_target`` on the host, from the average target per sequence there (no device sync), or None
        where the method needs device values for it. Override it beside ``layer_target``."""
        return per_seq if type(self).layer_target is ScoredEviction.layer_target else None

    def compress(self, call: LayerCall) -> None:
        if self.keeps_everything():
            return
        store, shard = call.store, call.cache.head_shard
        # The layer's target from the host where the method can say it there (no wait for the GPU; not under
        # tensor parallelism, whose skip decision is collective): then only a transfer goes to the device.
        per_seq = [fraction_target_host(self.budget, n) for n in call.cache.seen_host]
        layer = self.host_layer_target(call, per_seq) if shard is None else None
        if layer is not None:
            target = ints_on(layer, call.seen.device)
        else:
            target = self.layer_target(call, fraction_target(self.budget, call.seen))
        lengths = getattr(store, "host_length", None)
        if layer is not None and lengths is not None:
            if all(n <= layer[i // store.H] for i, n in enumerate(lengths)):
                return
        # [distributed] tensor parallel: skipped on every rank or none (head_counts may be a collective)
        elif everywhere(shard, bool((store.token_counts().max(dim=1).values <= target).all())):
            return
        scores = self.score(call)
        # Counts per head known on the host unless the method splits the layer's budget over heads by scores.
        host = None if layer is None or type(self).head_counts is not ScoredEviction.head_counts else \
            [t for t in layer for _ in range(store.H)]
        keep_top(store, scores, self.head_counts(call, scores, target), host)

    def decode_ranking(self, call: LayerCall, target: torch.Tensor) -> DecodeRanking:
        """What a decoding step's one-token eviction ranks by, given the layer's target per sequence [B]: by
        default ``score(call)``. A method whose score is "these per-slot values, but keep the newest tokens"
        (or one ranking for all the heads of a layer) says so here instead, and the ranking is one kernel
        rather than the PyTorch ops of its ``score`` (dozens of small launches a layer in a replayed step)."""
        return DecodeRanking(self.score(call))

    def on_decode(self, call: LayerCall) -> None:
        if not self.evict_during_decoding or self.keeps_everything():
            return
        store = call.store
        if type(self).layer_target is ScoredEviction.layer_target:  # the same in every layer: made once a step
            per_seq = call.per_step(("target", self.budget), lambda: fraction_target(self.budget, call.seen))
            target = call.per_step(("target", self.budget, store.H), lambda: per_seq.repeat_interleave(store.H))
        else:
            per_seq = self.layer_target(call, fraction_target(self.budget, call.seen))
            target = per_seq.repeat_interleave(store.H)
        if capturing(call.queries):
            # Being captured: nothing may be read back. The eager step before any capture trimmed every segment
            # to its target, and a step adds one token while the target never falls: at most one is over.
            self._evict_one(call, store.length > target, per_seq)
            return
        over = store.length - target
        if not bool((over > 0).any()):
            return
        if bool((over <= 1).all()):
            self._evict_one(call, over > 0, per_seq)
        else:
            keep_top(store, self.score(call), torch.minimum(store.length, target))

    def _evict_one(self, call: LayerCall, over: torch.Tensor, per_seq: torch.Tensor) -> None:
        """The lowest-ranked token of every segment where ``over`` [B*H] (over its target) leaves (fixed shapes,
        no sync)."""
        store = call.store
        rank = self.decode_ranking(call, per_seq)
        protect = rank.recent is not None or rank.sinks > 0
        # One kernel each on CUDA; the search is bounded by the largest capacity, which the host knows.
        victim = segment_argmin(rank.scores, store.start, store.length, store.cap_max,
                                pos=store.pos if protect else None, newest=call.positions[:, -1] if protect else None,
                                recent=0 if rank.recent is None else rank.recent, sinks=rank.sinks,
                                heads=store.H, shared=rank.shared_by_heads)
        store.remove_one(victim, over)
