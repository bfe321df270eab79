"""The one KV-cache interface every compression method plugs into.

How it hooks into transformers (public extension points only):

- ``KVCache`` is a ``transformers.Cache`` subclass passed as the model's cache argument (``cache``, ``past_key_values`` before transformers 5.24). Its ``update`` keeps
  nothing itself; it hands back the new keys and values so the model never builds a dense cache.
- The model is loaded with ``attn_implementation="kvbench"`` (``kvbench.attention``), registered in
  transformers' ``AttentionInterface``. The engine passes the cache as the forward kwarg
  ``kvbench_cache``; transformers forwards extra kwargs to the attention function, which calls
  ``KVCache.attention(...)``. transformers builds no mask for an implementation it does not know, so no
  [T, N] mask is ever made: each store knows what it holds.

Per layer the cache holds one *store* (``stores[layer]``; the ``Store`` protocol below says what one
provides). A store owns every tensor the method keeps for that layer, reports them in ``nbytes()``, and
answers ``attend(q)`` with the attention of the queries over what it holds (output and log-sum-exp, so
partial attentions merge exactly). The cache does, per forward call of a layer with T new tokens:

    prefill/append chunk (T > 1): out = merge(store.attend(q), causal attention of the chunk on itself);
                                  store.append(new keys/values); method.compress(...) if compressing
    decode step (T == 1):         store.append(new key/value); out = store.attend(q); method.on_decode(...)

so prefill attention is exact, chunked prefill compresses after every chunk (peak memory bounded by the
kept past plus one chunk), and decode-time methods see every generated token. After a compressing forward
has passed every layer, the engine calls ``method.compress_cache(cache)`` once (``KVCache.end_compression``):
the one place for work across layers (Select+Fit and KVSculpt fit every layer together there).

The four method shapes map onto this as follows:

1. Subsets of the original tokens per head (eviction: StreamingLLM, H2O, SnapKV, PyramidKV, TOVA, AdaKV;
   CompressKV): ``RaggedKV`` packs every (sequence, KV head) as its own contiguous segment of slots, so
   heads keep different numbers of tokens with no padding; methods score slots and call ``keep``/``remove``.
2. New synthetic KV pairs (KVSculpt): the same ``RaggedKV``; the method writes optimised keys/values
   into the kept slots (``replace``), with position -1 marking a synthetic slot.
3. Latent codes decoded on read with references to other stored tokens (DeltaKV, KV-CAR autoencoders,
   quantisation): a store class of the method's own (``method.new_store``) that keeps latents, indices and
   references and implements ``attend`` by reconstructing (all its tensors count in ``nbytes``).
4. A layer reading another layer's store (KV-CAR cross-layer reuse): the method's store for layer l keeps
   a reference to the store of layer l-1 and reads it in ``attend``; the shared tensors are counted once,
   by the store that owns them.

Keys are stored per KV head (GQA), never repeated for the query heads; keys carry RoPE at their own
positions (a method that wants pre-RoPE keys, like DeltaKV, un-rotates them with ``rope`` below).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Protocol

import torch
from transformers import Cache

from kvbench.kernels.decode_attention import merge_attention, ragged_attention
from kvbench.kernels.segment_evict import move_last_into
from kvbench.kernels.slot_scores import slot_attention_probs, slot_attention_probs_from_logits
from kvbench.kernels.store_append import append_tokens
from kvbench.models import head_dim


def ints_on(values: list[int], device) -> torch.Tensor:
    """Host integers as an int64 device tensor without a device sync: a plain ``torch.tensor(list,
    device=cuda)`` copies from pageable memory and waits for the GPU; a compressing prefill
    makes one per layer and DeltaKV's decoding step several, and each wait stalls the host's launches."""
    t = torch.tensor(values, dtype=torch.int64, pin_memory=torch.device(device).type == "cuda")
    return t.to(device, non_blocking=True)


class Store(Protocol):
    """What the cache and the engine ask of a layer's store (``RaggedKV``, ``DeltaKVStore``, ``KVCARStore``).

    Decoding under a CUDA graph: ``reserve`` makes room before a capture so that nothing moves while the graph
    replays, and ``replayed`` lets host-side mirrors catch up with steps that ran as replays."""

    def nbytes(self) -> int: ...  # every byte the store holds for this layer

    def seq_nbytes(self) -> torch.Tensor: ...  # [B] bytes held per sequence

    def token_counts(self) -> torch.Tensor: ...  # [B, H] tokens (or token-equivalents) per KV head

    def has_tokens(self) -> bool: ...

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None: ...

    # (out, lse). RaggedKV's also takes ``slot_logits=``: asked for only when the method's
    # ``decode_reads_slot_attention()``, and such a method keeps the default RaggedKV store.
    def attend(self, q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]: ...

    def reserve(self, n_tokens: int) -> None: ...

    def replayed(self, steps: int) -> None: ...

    @classmethod
    def concat(cls, stores: list) -> "Store": ...  # one store for the sequences of all of them, in order

    def clone(self) -> "Store": ...


def growth_slack(need):
    """Room a segment gets beyond ``need`` tokens when it grows (an int, or a tensor of them): about 3%, at least
    16 tokens, a multiple of 16, so that decoding regrows rarely."""
    slack = (need // 32 + 15) // 16 * 16
    return torch.clamp(slack, min=16) if isinstance(slack, torch.Tensor) else max(16, slack)


class RaggedKV:
    """Keys and values of B sequences x H KV heads as packed, ragged segments.

    ``k``, ``v``: [S, D]; ``pos``: [S] int32 position of each slot (-1: synthetic). Segment ``i = b*H + h``
    owns slots ``start[i] .. start[i] + capacity[i]``, of which the first ``length[i]`` are valid. Capacity
    beyond length is small slack for decoding and is counted in ``nbytes`` (memory held, not memory used).
    ``extra`` holds per-slot method state (e.g. H2O's accumulated attention); it moves with the slots and
    counts in ``nbytes`` too.
    """

    def __init__(self, batch: int, heads: int, head_dim: int, dtype, device):
        self.B, self.H, self.D = batch, heads, head_dim
        self.k = torch.empty(0, head_dim, dtype=dtype, device=device)
        self.v = torch.empty(0, head_dim, dtype=dtype, device=device)
        self.pos = torch.empty(0, dtype=torch.int32, device=device)
        n = batch * heads
        self.start = torch.zeros(n, dtype=torch.int64, device=device)
        self.length = torch.zeros(n, dtype=torch.int64, device=device)
        self.capacity = torch.zeros(n, dtype=torch.int64, device=device)
        self.extra: dict[str, torch.Tensor] = {}
        # A host-side lower bound on min(capacity - length): appends need no device sync while it lasts.
        self.free = 0
        # Host copies of ``length`` and ``capacity`` while the host knows them (a prefill that appends and keeps
        # counts it computed itself), else None: compression then sizes its work without reading the device back.
        # Decode-time eviction (``remove_one``) makes the lengths device-only.
        self.host_length: list[int] | None = [0] * n
        self.host_capacity: list[int] | None = [0] * n
        # Host-side facts of the layout (slot buffers, segment starts and capacities), which changes only in
        # ``_first_layout``/``_relayout``/``replace``: ``layout`` counts the changes (a CUDA graph captured at
        # one layout replays while it holds); ``cap_max`` is the largest capacity.
        self.layout, self.cap_max = 0, 0
        # Device tensors derived from the layout alone (``slot_segments``, a codec's gather index), kept while it
        # holds so that a replayed decoding step reads them without the host: dropped when it changes (a stale
        # one would outlive compression unseen), counted in ``nbytes`` while held.
        self.derived: dict[str, torch.Tensor] = {}

    # ---- what it holds -------------------------------------------------------------------------
    def nbytes(self) -> int:
        tensors = [self.k, self.v, self.pos, self.start, self.length, self.capacity, *self.extra.values(),
                   *self.derived.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def has_tokens(self) -> bool:
        # Whether it holds any slot, known on the host: asking the lengths would cost a device sync per layer
        # of every prefill. A slot past a segment's length is read as nothing (attention over an empty segment
        # is exact: lse -inf, output 0), so "holds slots" may stand for "holds tokens".
        return self.k.shape[0] > 0

    def token_counts(self) -> torch.Tensor:
        """[B, H] tokens held per (sequence, KV head)."""
        return self.length.view(self.B, self.H)

    def seq_nbytes(self) -> torch.Tensor:
        """[B] bytes held for each sequence (its slots, their per-slot state, its bookkeeping, and a share of
        the ``derived`` tensors in proportion to its slots: exact for the [S] slot index, the rounding
        remainder of a padded one going to the last sequence, so that the sum is ``nbytes``)."""
        per_slot = sum(t.element_size() * t.shape[1:].numel()
                       for t in (self.k, self.v, self.pos, *self.extra.values()))
        per_seg = self.start.element_size() + self.length.element_size() + self.capacity.element_size()
        out = (self.capacity * per_slot + per_seg).view(self.B, self.H).sum(dim=1)
        derived = sum(t.numel() * t.element_size() for t in self.derived.values())
        if derived:
            share = self.capacity.view(self.B, self.H).sum(dim=1) * derived // max(self.k.shape[0], 1)
            share[-1] += derived - share.sum()
            out += share
        return out

    def slot_segments(self, keep: bool = True) -> torch.Tensor:
        """[S] int32 the segment of every slot (slack included), made without a device sync and, with ``keep``,
        kept (and counted) until the layout changes."""
        seg = self.derived.get("slot_seg")
        if seg is None:
            seg = torch.repeat_interleave(torch.arange(self.B * self.H, dtype=torch.int32, device=self.k.device),
                                          self.capacity, output_size=self.k.shape[0])
            if keep:
                self.derived["slot_seg"] = seg
        return seg

    def slot_valid(self) -> torch.Tensor:
        """[S] whether a slot holds a token (not slack)."""
        seg = self.slot_segments()
        return torch.arange(self.k.shape[0], device=self.k.device) - self.start[seg] < self.length[seg]

    def padded_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``slot_index`` padded to the largest capacity instead of the longest segment: the width is known on
        the host, so no device sync (what a decoding step replayed as a CUDA graph needs)."""
        return self.slot_index(self.cap_max)

    def slot_index(self, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded view of the valid slots: ``idx`` [B*H, width] (slot numbers) and ``valid`` [B*H, width].
        ``width``: at least the longest segment (default: the longest segment, read back from the device)."""
        if width is None:
            width = int(self.length.max()) if self.length.numel() else 0
        ar = torch.arange(width, device=self.k.device)
        valid = ar[None, :] < self.length[:, None]
        idx = torch.where(valid, self.start[:, None] + ar[None, :], torch.zeros_like(ar)[None, :])
        return idx, valid

    def attend(self, q: torch.Tensor, scale: float, slot_logits: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse); ``slot_logits`` (decoding): ``[S, G]`` float32 filled with each valid slot's logit."""
        # the capacities bound the segments on the host: the kernel's chunk is evened out over the largest, as long
        # as that adds no second-wave items over all of them (a CUDA graph keeps its chunk while the layout holds)
        return ragged_attention(q, self.k, self.v, self.start, self.length, scale, slot_logits=slot_logits,
                                longest=self.cap_max, lengths=self.host_capacity)

    # ---- changing what it holds -----------------------------------------------------------------
    def _relayout(self, src_slots: torch.Tensor | None, counts: torch.Tensor, capacity: torch.Tensor,
                  host_counts: list[int] | None = None, host_capacity: list[int] | None = None) -> None:
        """Rebuild the buffers: segment i gets ``counts[i]`` slots copied from ``src_slots`` (flat, in
        segment order; None: the first ``counts[i]`` slots of each segment, in place) and room for
        ``capacity[i]``. ``host_counts``/``host_capacity``: the same numbers on the host, when known (no sync)."""
        new_start = torch.zeros_like(capacity)
        new_start[1:] = torch.cumsum(capacity, 0)[:-1]
        if host_counts is not None and host_capacity is not None:
            total, self.cap_max, n_slots = sum(host_capacity), max(host_capacity, default=0), sum(host_counts)
            free = host_free_room(host_counts, host_capacity)
        else:  # the sizes the host needs, read back in one transfer (one device sync, not four)
            total, self.cap_max, free, n_slots = (
                torch.stack([capacity.sum(), capacity.max(), (capacity - counts).min(), counts.sum()]).tolist()
                if len(capacity) else (0, 0, 0, 0))
        self._new_layout()
        seg = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts, output_size=n_slots)
        first = torch.zeros_like(counts)
        first[1:] = torch.cumsum(counts, 0)[:-1]
        offset = torch.arange(len(seg), device=counts.device) - first[seg]
        dest = new_start[seg] + offset
        if src_slots is None:
            src_slots = self.start[seg] + offset

        def move(t: torch.Tensor, fill=0) -> torch.Tensor:
            out = t.new_full((total, *t.shape[1:]), fill)
            out[dest] = t[src_slots]
            return out

        self.k, self.v, self.pos = move(self.k), move(self.v), move(self.pos, -1)
        self.extra = {name: move(t) for name, t in self.extra.items()}
        self.start, self.length, self.capacity = new_start, counts.clone(), capacity.clone()
        self.host_length = None if host_counts is None else list(host_counts)
        self.host_capacity = None if host_counts is None or host_capacity is None else list(host_capacity)
        self.free = free

    def _new_layout(self) -> None:
        """The slots moved or were resized: what was derived from the old layout is stale (and freed)."""
        self.layout += 1
        self.derived = {}

    def keep(self, slots: torch.Tensor, counts: torch.Tensor, host_counts: list[int] | None = None) -> None:
        """Keep only ``slots`` (flat slot numbers, grouped by segment, ``counts[i]`` for segment i), packed
        tightly: the memory of everything else is freed. ``host_counts``: ``counts`` on the host, when known."""
        self._relayout(slots, counts, counts, host_counts, host_counts)

    def remove_one(self, victim: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Evict slot ``victim[i]`` from every segment i (where ``mask[i]``): the segment's last slot moves
        into the hole. O(1) per segment, used by decode-time eviction; fixed shapes and no device sync (a
        segment outside ``mask`` keeps its slots), so a captured decoding step can replay it. One kernel on CUDA."""
        move_last_into([self.k, self.v, self.pos, *self.extra.values()], self.start, self.length, victim, mask)
        self.host_length = None  # which segments lost a token is known on the device only

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Append T new tokens to every segment: k, v [B, H, T, D], pos [B, T]."""
        T = k.shape[2]
        if self.k.shape[0] == 0:
            self._first_layout(T)
        if self.free < T and self._short_of_room(T):
            need = self.length + T
            cap = torch.where(need > self.capacity, need + growth_slack(need), self.capacity)
            host_cap = None if self.host_length is None or self.host_capacity is None else [
                max(c, n + T + growth_slack(n + T)) if n + T > c else c for n, c in zip(self.host_length, self.host_capacity)]
            self._relayout(None, self.length, cap, self.host_length, host_cap)
        if self.extra:  # per-slot method state starts at 0 for the new tokens
            dest = ((self.start + self.length)[:, None] + torch.arange(T, device=k.device)[None, :]).reshape(-1)
            for t in self.extra.values():
                t.index_fill_(0, dest, 0)  # not ``t[dest] = 0``: that makes a host tensor of the 0 and copies it over
        append_tokens(self.k, self.v, self.pos, self.start, self.length, k, v, pos)  # advances length; one kernel on CUDA
        if self.host_length is not None:
            self.host_length = [n + T for n in self.host_length]
        if self.free >= T:
            self.free -= T
        elif self.host_length is not None and self.host_capacity is not None:
            self.free = host_free_room(self.host_length, self.host_capacity)
        else:
            self.free = int((self.capacity - self.length).min())

    def _short_of_room(self, T: int) -> bool:
        """Whether a segment needs more than its capacity for ``T`` more tokens (from the host copies if known)."""
        if self.host_length is not None and self.host_capacity is not None:
            return any(n + T > c for n, c in zip(self.host_length, self.host_capacity))
        return bool((self.length + T > self.capacity).any())

    def _first_layout(self, n_tokens: int) -> None:
        """Buffers for a first append to an empty store, laid out on the host (the sizes are known there): the
        general path would read the lengths back from the device."""
        n = self.B * self.H
        cap = n_tokens + growth_slack(n_tokens)
        dev = self.k.device
        self.start = torch.arange(n, dtype=torch.int64, device=dev) * cap
        self.length = torch.zeros(n, dtype=torch.int64, device=dev)
        self.capacity = torch.full((n,), cap, dtype=torch.int64, device=dev)
        self.k = self.k.new_empty((n * cap, self.D))  # slots past a segment's length are never read
        self.v = self.v.new_empty((n * cap, self.D))
        self.pos = self.pos.new_full((n * cap,), -1)
        self.extra = {name: t.new_zeros((n * cap, *t.shape[1:])) for name, t in self.extra.items()}
        self.free, self.cap_max = cap, cap
        self.host_length, self.host_capacity = [0] * n, [cap] * n
        self._new_layout()

    def replayed(self, steps: int) -> None:
        """``steps`` decoding steps ran as graph replays (no Python ran): the host mirror follows."""
        self.free -= steps
        if self.host_length is not None:
            self.host_length = [n + steps for n in self.host_length]

    def reserve(self, n_tokens: int) -> None:
        if self.free < n_tokens:
            self._relayout(None, self.length, torch.maximum(self.capacity, self.length + n_tokens), self.host_length,
                           None if self.host_length is None or self.host_capacity is None else
                           [max(c, n + n_tokens) for n, c in zip(self.host_length, self.host_capacity)])

    def replace(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, counts: torch.Tensor) -> None:
        """Replace everything by new (possibly synthetic) slots: k, v [sum(counts), D], grouped by segment."""
        self.start = torch.zeros_like(counts)
        self.start[1:] = torch.cumsum(counts, 0)[:-1]
        self.length, self.capacity = counts.clone(), counts.clone()
        self.k, self.v = k.to(self.k.dtype).contiguous(), v.to(self.v.dtype).contiguous()
        self.pos = pos.to(torch.int32)
        self.extra = {name: t.new_zeros(len(k)) for name, t in self.extra.items()}
        self.host_length = self.host_capacity = None
        self.free = 0
        self.cap_max = int(counts.max()) if len(counts) else 0
        self._new_layout()

    @classmethod
    def concat(cls, stores: list["RaggedKV"]) -> "RaggedKV":
        """One store holding the sequences of several (for batched decoding after per-sequence prefill)."""
        first = stores[0]
        out = cls(sum(s.B for s in stores), first.H, first.D, first.k.dtype, first.k.device)
        offsets = [0]
        for s in stores[:-1]:
            offsets.append(offsets[-1] + s.k.shape[0])
        out.k = torch.cat([s.k for s in stores])
        out.v = torch.cat([s.v for s in stores])
        out.pos = torch.cat([s.pos for s in stores])
        out.start = torch.cat([s.start + o for s, o in zip(stores, offsets)])
        out.length = torch.cat([s.length for s in stores])
        out.capacity = torch.cat([s.capacity for s in stores])
        out.extra = {name: torch.cat([s.extra[name] for s in stores]) for name in first.extra}
        out.free = min(s.free for s in stores)
        out.cap_max = max(s.cap_max for s in stores)
        known = all(s.host_length is not None and s.host_capacity is not None for s in stores)
        out.host_length = [n for s in stores for n in s.host_length] if known else None
        out.host_capacity = [c for s in stores for c in s.host_capacity] if known else None
        return out

    def clone(self) -> "RaggedKV":
        out = RaggedKV.concat([self])
        out.k, out.v, out.pos = self.k.clone(), self.v.clone(), self.pos.clone()
        out.extra = {n: t.clone() for n, t in self.extra.items()}
        return out


class LayerCall:
    """What a method's hooks see of one layer's forward call."""

    def __init__(self, cache: "KVCache", layer: int, q: torch.Tensor, k: torch.Tensor, scale: float,
                 lse: torch.Tensor | None, slot_logits: torch.Tensor | None = None):
        self.cache, self.layer, self.queries, self.new_keys, self.scale = cache, layer, q, k, scale
        self.lse = lse  # [B, Hq, T] of the queries over store + chunk (decode: over the store)
        self.slot_logits = slot_logits  # decode, when the method asked: [S, G] logits of the attention's pass
        self.positions = cache.positions  # [B, T]
        self.n_layers = len(cache.stores)
        self.seen = cache.seen  # [B] context tokens seen so far, this call included
        self.final = cache.final_chunk
        self.decoding = not cache.compressing and q.shape[2] == 1

    @property
    def store(self):
        return self.cache.stores[self.layer]

    def slot_attention(self, reduce: str = "mean", out: torch.Tensor | None = None) -> torch.Tensor:
        """[S] attention probability of each slot for the last query of this call, reduced over the query
        heads of its KV group (``out``: added into that float32 [S] tensor at the store's tokens, in the same
        launch). Only valid in decode steps, where ``lse`` covers exactly the store."""
        store: RaggedKV = self.store
        B, Hq, T, D = self.queries.shape
        G = Hq // store.H
        lse = self.lse[:, :, -1].reshape(B * store.H, G)
        if self.slot_logits is not None:  # the attention wrote the logits: 4 G bytes a slot, not the keys again
            return slot_attention_probs_from_logits(self.slot_logits, lse, store.start, store.length, store.cap_max,
                                                    reduce, out)
        # One pass over the stored bf16 keys (a Triton kernel on CUDA): no fp32 copy of the keys, no gathered
        # queries per slot; no device sync, so a decoding step replayed as a CUDA graph runs it.
        return slot_attention_probs(self.queries[:, :, -1].reshape(B * store.H, G, D), lse, store.k, store.start,
                                    store.length, store.cap_max, self.scale, reduce, out)

    def per_step(self, key, make):
        """``make()``, computed once per forward and shared by its layers (``KVCache.per_step``)."""
        return self.cache.per_step(key, make)


def capturing(t: torch.Tensor) -> bool:
    """Whether the work on ``t``'s device is being captured into a CUDA graph (then nothing may be read back)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class SpanTimer:
    """Sums the time of code spans (``with timer:``) without a device sync per span: on CUDA a pair of events
    per span, read when ``seconds()`` is asked (one wait at the end of a prefill instead of one per layer,
    which kept the host from running ahead of the GPU); elsewhere the wall clock."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.total = 0.0
        self.pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._t0 = 0.0

    def __enter__(self):
        if self.cuda:
            self.pending.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.pending[-1][0].record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.pending[-1][1].record()
        else:
            self.total += time.perf_counter() - self._t0

    def seconds(self) -> float:
        if self.pending:
            self.pending[-1][1].synchronize()
            self.total += sum(start.elapsed_time(end) for start, end in self.pending) / 1000.0
            self.pending = []
        return self.total


class KVCache(Cache):
    """A transformers ``Cache`` whose layers are kvbench stores, driven by one compression method."""

    def __init__(self, method, config, batch: int, dtype, device, rope: Callable | None = None, head_shard=None):
        super().__init__(layers=[])
        self.method, self.config, self.dtype = method, config, dtype
        n_layers = config.num_hidden_layers
        self.head_dim = head_dim(config)
        # [distributed] tensor parallel: this process's KV heads only (kvbench.distributed.HeadShard)
        self.head_shard = head_shard
        self.kv_heads = head_shard.local if head_shard is not None else config.num_key_value_heads
        self.stores: list[Store] = [method.new_store(i, batch, self.kv_heads, self.head_dim, dtype, device)
                                  for i in range(n_layers)]
        self.rope = rope  # (x [B, H, T, D], positions [B, T], inverse: bool) -> x: (un)rotate keys
        self.batch = batch
        self.positions: torch.Tensor | None = None
        self.seen = torch.zeros(batch, dtype=torch.int64, device=device)
        self.seen_host = [0] * batch  # the same on the host (the engine knows what it feeds)
        self._per_step: dict = {}  # this forward's values shared by its layers (per_step)
        self.compressing = False
        self.final_chunk = False
        # Per-cache scratch a method fills in its per-layer hooks and consumes in ``compress_cache``.
        self.method_state: dict[str, Any] = {}
        self.compress_timer = SpanTimer(device)
        self._updated: set[int] = set()

    # transformers calls these -----------------------------------------------------------------------
    # ``update`` and ``attention`` run eagerly when the model's step is compiled (Engine.compile_decode): their
    # Python bookkeeping and the methods' hooks are not for dynamo to trace; the step around them fuses.
    @torch.compiler.disable
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # The keys are kept by ``attention`` below; remembering the call lets the engine prove that the
        # model really attended through kvbench (``unattended_layers``), never around it.
        self._updated.add(layer_idx)
        return key_states, value_states

    def unattended_layers(self) -> set[int]:
        """Layers whose keys reached ``update`` but whose attention did not come through kvbench."""
        missed, self._updated = self._updated, set()
        return missed

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.seen.max()) if self.seen.numel() else 0

    @property
    def is_compileable(self) -> bool:
        return False

    # kvbench ----------------------------------------------------------------------------------------
    def begin(self, positions: torch.Tensor, compress: bool, final: bool = True) -> None:
        """Called by the engine before each forward: positions [B, T] of the new tokens; whether this
        chunk is context to compress (and whether it is the last chunk of the context)."""
        self.positions = positions
        self.compressing, self.final_chunk = compress, final
        self.seen.add_(positions.shape[1])  # in place: a captured decoding step replays it
        self.seen_host = [n + positions.shape[1] for n in self.seen_host]
        self._per_step = {}

    def per_step(self, key, make):
        """A value that depends only on this forward's inputs (``seen``, ``positions``), not on the layer: made by
        the first layer that asks (``make()``) and reused by the others. A decoding step's token target is the
        same in every layer of a method without per-layer budgets: computing it 32 times was 32 x 4 small
        kernels of a replayed step. Under CUDA-graph capture the first layer's kernels are recorded once and
        replayed before the later layers read their result."""
        if key not in self._per_step:
            self._per_step[key] = make()
        return self._per_step[key]

    def reserve(self, n_tokens: int) -> None:
        """Room for ``n_tokens`` more tokens in every segment, so that decoding never relayouts a store
        (what a CUDA-graph replay of the decoding step needs). The room is held memory and counts."""
        for store in self.stores:
            store.reserve(n_tokens)

    def replayed(self, steps: int) -> None:
        """``steps`` decoding steps ran as replays of a captured graph: host-side mirrors catch up."""
        self.seen_host = [n + steps for n in self.seen_host]
        for store in self.stores:
            store.replayed(steps)

    @torch.compiler.disable
    def attention(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        self._updated.discard(layer)
        store = self.stores[layer]
        T = q.shape[2]
        if T == 1 and not self.compressing:
            store.append(k, v, self.positions)
            if self.method.decode_reads_slot_attention():  # logits written by the attention's own pass
                logits = torch.empty(store.k.shape[0], q.shape[1] // store.H, dtype=torch.float32, device=q.device)
                out, lse = store.attend(q, scale, slot_logits=logits)
            else:
                logits = None
                out, lse = store.attend(q, scale)
            self.method.on_decode(LayerCall(self, layer, q, k, scale, lse, logits))
            return out
        out, lse = causal_attention(q, k, v, scale)
        if store.has_tokens():
            out_past, lse_past = store.attend(q, scale)
            out, lse = merge_attention(out_past, lse_past, out, lse)
        store.append(k, v, self.positions)
        if self.compressing:
            with self.compress_timer:
                self.method.compress(LayerCall(self, layer, q, k, scale, lse))
        return out

    def end_compression(self) -> None:
        """After a compressing forward passed every layer: the method's whole-cache hook, timed with the rest
        of the compression."""
        with self.compress_timer:
            self.method.compress_cache(self)

    @property
    def compress_seconds(self) -> float:
        """Time the method's compression took so far (waits for the device once)."""
        return self.compress_timer.seconds()

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.stores)

    def layer_nbytes(self) -> list[int]:
        return [s.nbytes() for s in self.stores]

    def token_counts(self) -> torch.Tensor:
        """[layers, B, H] tokens (or token-equivalents) held."""
        return torch.stack([s.token_counts() for s in self.stores])

    def sequence_nbytes(self) -> torch.Tensor:
        """[B] bytes held per sequence, over all layers."""
        return sum(s.seq_nbytes() for s in self.stores)

    def sequence_full_nbytes(self) -> torch.Tensor:
        """[B] bytes a plain full cache would hold per sequence for the tokens it has seen."""
        return self.seen * (self.full_nbytes(1) // self.batch)

    def full_nbytes(self, n_tokens: int | None = None) -> int:
        """What a plain full cache (keys and values, nothing else) would hold for the tokens seen."""
        n = int(self.seen.sum()) if n_tokens is None else n_tokens * self.batch
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * len(self.stores) * self.kv_heads * self.head_dim * itemsize * n

    @classmethod
    def concat(cls, caches: list["KVCache"], consume: bool = False) -> "KVCache":
        """One cache for a batch of sequences; with ``consume`` the inputs are emptied as it goes."""
        first = caches[0]
        out = cls.__new__(cls)
        Cache.__init__(out, layers=[])
        out.method, out.config, out.rope, out.dtype = first.method, first.config, first.rope, first.dtype
        out.head_dim, out.kv_heads, out.head_shard = first.head_dim, first.kv_heads, first.head_shard
        out.stores = []
        for i in range(len(first.stores)):
            # Layer by layer, dropping the parts as we go: peak memory is the batch plus one layer.
            out.stores.append(type(first.stores[i]).concat([c.stores[i] for c in caches]))
            if consume:
                for c in caches:
                    c.stores[i] = None
        out.batch = sum(c.batch for c in caches)
        out.positions = None
        out.seen = torch.cat([c.seen for c in caches])
        out.seen_host = [n for c in caches for n in c.seen_host]
        out._per_step = {}
        out.compressing, out.final_chunk = False, False
        out.method_state = {}
        out.compress_timer = SpanTimer(out.seen.device)
        out._updated = set()
        return out

    def clone(self) -> "KVCache":
        out = KVCache.concat([self])
        out.stores = [s.clone() for s in self.stores]
        return out


def _flash(q, k, v, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)[:2]


def _cudnn(q, k, v, scale):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)[:2]


def _lse(lse: torch.Tensor, B: int, H: int, T: int) -> torch.Tensor:
    return lse.reshape(B, H, -1)[..., :T].float()  # flash pads the rows; cuDNN gives [B, H, T, 1]


_CUDNN_AGREES: dict[tuple, bool] = {}
# cuDNN builds an execution plan for every new sequence length (about 50 ms on the H200, measured on RULER's
# varied lengths): chunks are padded to a multiple of SHAPE_STEP so that lengths repeat, and short chunks
# (a question fed after the context) keep to flash, which plans nothing.
CUDNN_MIN_TOKENS, SHAPE_STEP = 1024, 256


def _cudnn_agrees(q: torch.Tensor) -> bool:
    """Whether cuDNN's fused attention runs here and gives flash's output and log-sum-exp (checked once per
    device, dtype and head width on a small input). On the H200 it is about twice as fast as FlashAttention-2
    for a prefill chunk (scripts/gpu/prof_prefill_gpu.py), which brings kvbench's prefill to transformers' SDPA."""
    key = (q.device, q.dtype, q.shape[-1])
    if key not in _CUDNN_AGREES:
        gen = torch.Generator(device=q.device).manual_seed(0)
        a, b, c = (torch.randn(1, 2, 300, q.shape[-1], device=q.device, generator=gen).to(q.dtype) for _ in range(3))
        scale = q.shape[-1] ** -0.5
        try:
            out_c, lse_c = _cudnn(a, b, c, scale)
            out_f, lse_f = _flash(a, b, c, scale)
            _CUDNN_AGREES[key] = bool(torch.allclose(out_c.float(), out_f.float(), atol=2e-2, rtol=0)
                                      and torch.allclose(_lse(lse_c, 1, 2, 300), _lse(lse_f, 1, 2, 300), atol=2e-2, rtol=0))
        except RuntimeError:  # no cuDNN attention in this build or for this shape
            _CUDNN_AGREES[key] = False
    return _CUDNN_AGREES[key]


def pad_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: int):
    """q, k, v padded with zero tokens at the end to a multiple of ``step``. Causal attention of the padded
    chunk gives the same output and log-sum-exp on the real rows: the padding keys come after every real
    query, so the causal mask hides them; the padding rows are dropped by the caller."""
    pad = -q.shape[2] % step
    if not pad:
        return q, k, v
    return tuple(torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Exact causal attention of a chunk on itself, with its log-sum-exp (for merging with the past).
    q [B, Hq, T, D]; k, v [B, Hkv, T, D]. The repeated keys exist only for this call (GQA)."""
    B, H, T = q.shape[:3]
    half = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    cudnn = half and T >= CUDNN_MIN_TOKENS and _cudnn_agrees(q)
    if cudnn:
        q, k, v = pad_chunk(q, k, v, SHAPE_STEP)
    G = q.shape[1] // k.shape[1]
    if G > 1:
        k = k.repeat_interleave(G, dim=1)
        v = v.repeat_interleave(G, dim=1)
    if cudnn:
        out, lse = _cudnn(q, k, v, scale)
    elif half:
        out, lse = _flash(q, k, v, scale)
    elif q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, True, scale=scale)[:2]
    else:
        qf, kf, vf = q.float(), k.float(), v.float()
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qf, kf, vf, 0.0, True, scale=scale)
        out = out.to(q.dtype)
    return out[:, :, :T], _lse(lse, B, H, T)


def rope_inverse_factory(rotary_emb) -> Callable:
    """(Un)rotate keys with a model's own rotary embedding module (``model.model.rotary_emb``)."""

    def apply(x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        cos, sin = rotary_emb(x, positions)  # [B, T, D]
        cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos - rot * sin if inverse else x * cos + rot * sin

    return apply


def host_free_room(lengths: list[int], capacities: list[int]) -> int:
    """The room every segment still has (the smallest capacity - length), from the host's copies."""
    return min((c - n for c, n in zip(capacities, lengths)), default=0)


def fraction_target_host(budget: float | int, seen: int) -> int:
    """``fraction_target`` for one sequence, on the host (the same numbers: float64 product, then truncation)."""
    if isinstance(budget, float) and budget <= 1.0:
        return max(1, int(seen * budget))
    return min(int(budget), seen)


def fraction_target(budget: float | int, seen: torch.Tensor) -> torch.Tensor:
    """Tokens to keep per sequence [B]: a kept fraction of those seen (0 < budget <= 1), or a count.

    The kept-fraction convention, the same for every method: ``max(1, int(seen * budget))`` tokens per
    head, i.e. the fraction rounded down but never below one token. This is kvpress's (``compute_n_kept``
    in kvpress/utils.py: ``max(1, int(k_len * (1 - compression_ratio)))``), which most published numbers
    use; kvbench's budget is kvpress's ``1 - compression_ratio``. A count (budget > 1) keeps
    ``min(budget, seen)``. Methods that shape the budget over layers or heads (PyramidKV, AdaKV) start
    from this number."""
    if isinstance(budget, float) and budget <= 1.0:
        return torch.clamp((seen.double() * budget).long(), min=1)
    return torch.full_like(seen, int(budget)).minimum(seen)
