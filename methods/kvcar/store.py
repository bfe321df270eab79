"""KV-CAR's store: latent codes per (sequence, KV head) decoded on read, and heads read from another layer.

``KVCARStore`` keeps the codes of the heads its layer stores in a ``RaggedKV`` whose ``k``/``v`` are the key
and value *latents* (``[S, latent]``), so the packing, growth, batching and eviction machinery of the
ragged store applies to codes unchanged (``keep``/``remove_one`` move codes, an evicting method may
compose with it). A head the layer reuses from an earlier layer keeps nothing: the store holds a pointer
to that layer's store and decodes its codes for that head when it attends. Bytes (``RaggedKV.nbytes``): the
codes, their positions and bookkeeping, and the gather index kept with their layout for reading (``RaggedKV.derived``:
an int32 slot number a slot, plus the padding of a head's row shorter than the longest, and 8 bytes a segment); a
reused head's entries are counted once, by their owner (the reusing layer holds only how many of them it has seen:
8 bytes a sequence). The head lists the reads index with are the method's (``KVCAR.head_list``).

Reading (``attend``): every slot of a head is decoded into a padded ``[heads * N, d]`` layout, head ``i``'s
slots in row block ``i`` (the gather indices depend only on the layout and are kept until it changes, so a
replayed decoding step reads them without the host), keys rotated to their positions (pre-RoPE codes), and
the decoded heads of this layer and of its sources are attended in one ragged attention call. Where Triton
runs, one kernel (``kernels/kvcar_decode.py``) does the gather, both decoder layers and the rotation, reading
each code once and writing each output once; otherwise (and as its reference) PyTorch gathers the codes
into ``[heads, N, latent]`` and ``KVCAR.decode`` decodes them (two ``baddbmm`` per autoencoder, the model's
rotary module). Only one layer's decoded keys and values exist at a time, and only during its attention.
"""
from __future__ import annotations

import weakref

import torch

from kvbench.cache import RaggedKV
from kvbench.kernels.decode_attention import ragged_attention, use_triton
from kvbench.kernels.kvcar_decode import kvcar_decode


class KVCARStore:
    def __init__(self, method, layer: int, batch: int, heads: int, head_dim: int, dtype, device,
                 sources: dict[int, "KVCARStore"]):
        self.method, self.layer, self.B, self.H, self.hd = method, layer, batch, heads, head_dim
        self.own: list[int] = method.own_heads(layer)  # heads whose codes this store keeps, ascending
        self.sources = sources  # reused head -> the store that owns its entries
        self.codes = RaggedKV(batch, len(self.own), method.code_width_, dtype, device)
        # What this layer has seen of each reused head: its owner's lengths as of this layer's last append. The
        # owner, an earlier layer, appends a prefill chunk before this layer attends over its past, so reading the
        # owner's lengths then would attend the chunk twice, the second time without the causal mask.
        self.reused = sorted(sources)
        self.seen = torch.zeros(batch, len(self.reused), dtype=torch.int64, device=device)  # [B, reused heads]
        self.seen_any = False  # on the host: whether this layer has appended anything (its sources then hold it)
        self._copy = None  # weakref to this store's copy while a cache is being concatenated or cloned

    # ---- what it holds ----
    def nbytes(self) -> int:
        return (self.codes.nbytes() if self.own else 0) + self.seen.numel() * self.seen.element_size()

    def seq_nbytes(self) -> torch.Tensor:
        seen = self.seen.shape[1] * self.seen.element_size()
        if not self.own:
            return torch.full((self.B,), seen, dtype=torch.int64, device=self.codes.length.device)
        return self.codes.seq_nbytes() + seen

    def head_lengths(self, head: int) -> torch.Tensor:
        """[B] tokens held for one head (own, or reused: as far as this layer has seen its owner's)."""
        if head in self.sources:
            return self.seen[:, self.reused.index(head)]
        return self.codes.length.view(self.B, len(self.own))[:, self.own.index(head)]

    def token_counts(self) -> torch.Tensor:
        """[B, H] tokens per (sequence, KV head); a reused head: as many of its owner's as this layer has seen."""
        return torch.stack([self.head_lengths(h) for h in range(self.H)], dim=1)

    def has_tokens(self) -> bool:  # known on the host (no device sync), as RaggedKV's
        if self.own:
            return self.codes.has_tokens()
        return self.seen_any

    @property
    def length(self) -> torch.Tensor:
        """Tokens per segment; a layer reusing every head reports what it has seen of its sources'."""
        if self.own:
            return self.codes.length
        return self.token_counts().reshape(-1)

    # ---- changing what it holds ----
    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """k, v [B, H, T, d] as the model made them (keys post-RoPE); only this layer's own heads are coded; a
        reused head's tokens are its owner's, which appended them before this layer (``seen`` catches up)."""
        if self.sources:
            self.seen.copy_(torch.stack([self.sources[h].head_lengths(h) for h in self.reused], dim=1))
            self.seen_any = True
        if not self.own:
            return
        zk, zv = self.method.encode(self.layer, k[:, self.own_t], v[:, self.own_t], pos, self.own_t)
        self.codes.append(zk, zv, pos)

    def reserve(self, n_tokens: int) -> None:
        if self.own:
            self.codes.reserve(n_tokens)

    def replayed(self, steps: int) -> None:
        if self.own:
            self.codes.replayed(steps)

    # ---- reading ----
    def _gather_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per own head: the slots of its segments, all sequences in order, padded to one width.

        Returns ``perm [n_own, N]`` int32 (slot numbers; padding points at slot 0) and ``first [B, n_own]``
        (where each sequence's segment starts in its head's row; head ``h``'s row holds slots up to column
        ``capacity.view(B, n_own)[:, h].sum()``, padding after). They depend only on the codes' layout, and are
        kept (and counted) with it: ``RaggedKV.derived``, dropped when the codes are relaid out."""
        c = self.codes
        if "kvcar perm" in c.derived:
            return c.derived["kvcar perm"], c.derived["kvcar first"]
        n_own = len(self.own)
        cap = c.capacity.view(self.B, n_own)
        first = torch.cumsum(cap, 0) - cap  # [B, n_own]
        per_head = cap.sum(0)
        width = int(per_head.max()) if per_head.numel() else 0
        S = c.k.shape[0]
        seg = c.slot_segments(keep=False)  # the index needs it only here: not kept, 4 bytes a slot less
        head, seq = seg % n_own, seg // n_own
        col = first[seq, head] + torch.arange(S, device=cap.device) - c.start[seg]
        # int32 slot numbers (the kernel widens them as it loads): half the bytes, held for the whole decode
        perm = torch.zeros(n_own, max(width, 1), dtype=torch.int32, device=cap.device)
        perm[head, col] = torch.arange(S, dtype=torch.int32, device=cap.device)
        c.derived["kvcar perm"], c.derived["kvcar first"] = perm, first
        return perm, first

    def _ints(self, values: list[int]) -> torch.Tensor:
        return self.method.head_list(values, self.codes.k.device)

    @property
    def own_t(self) -> torch.Tensor:
        return self._ints(self.own)

    def decode_heads(self, heads: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoded keys (post-RoPE) and values of some own heads: ``k, v [n*N, d]`` (head ``i``'s slots in
        row block ``i``) and ``start, length [B, n]`` of each (sequence, head) segment in them."""
        perm, first = self._gather_index()
        idx = self._ints([self.own.index(h) for h in heads])
        n, width = len(heads), perm.shape[1]
        decoders = self.method.decoders.get(self.layer)
        c = self.codes
        if decoders is not None and use_triton(c.k):
            k, v = kvcar_decode(c.k, c.v, c.pos, perm, idx, self._ints(heads), decoders, self.method.kernel_rope())
        else:  # the PyTorch path (the kernel's reference)
            slots = perm[idx]  # [n, N]
            k, v = self.method.decode(self.layer, c.k[slots], c.v[slots], c.pos[slots], self.own_t[idx])
            k, v = k.reshape(n * width, -1), v.reshape(n * width, -1)
        start = first[:, idx] + (torch.arange(n, device=perm.device) * width)[None, :]
        length = c.length.view(self.B, len(self.own))[:, idx]
        return k, v, start, length

    def decoded(self):
        """Every head's decoded keys and values (own and reused) as one ragged layout: ``k, v [S', d]``,
        ``start, length [B*H]``."""
        return self._decode_all()[:4]

    def _decode_all(self):
        """``decoded()``'s four, and the widest owner's padded width (a host int: it bounds every segment)."""
        groups: dict[int, tuple[KVCARStore, list[int]]] = {}
        for h in range(self.H):
            owner = self.sources.get(h, self)
            groups.setdefault(id(owner), (owner, []))[1].append(h)
        ks, vs = [], []
        start = torch.zeros(self.B, self.H, dtype=torch.int64, device=self.codes.k.device)
        length = torch.zeros_like(start)
        offset = widest = 0
        for owner, heads in groups.values():
            k, v, s, n = owner.decode_heads(heads)
            cols = self._ints(heads)
            start[:, cols] = s + offset
            length[:, cols] = n if owner is self else self.seen[:, self._ints([self.reused.index(h) for h in heads])]
            ks.append(k)
            vs.append(v)
            offset += k.shape[0]
            widest = max(widest, k.shape[0] // len(heads))
        cat = (lambda xs: xs[0]) if len(ks) == 1 else torch.cat
        return cat(ks), cat(vs), start.reshape(-1), length.reshape(-1), widest

    def attend(self, q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        # the attention kernel evens its chunk out over the widest padded head, as over a ragged store's capacity
        k, v, start, length, widest = self._decode_all()
        return ragged_attention(q, k.to(q.dtype), v.to(q.dtype), start, length, scale, longest=widest)

    def decoded_view(self) -> "DecodedView":
        """This layer's tokens decoded in the codes' own slot layout, for an evicting method to score; its
        ``keep``/``remove_one`` act on the codes (what a composed ``evictor+kvcar`` uses)."""
        if self.sources:
            raise ValueError("an evicting method cannot compose with reused heads: run kvcar with -m reuse=false")
        return DecodedView(self)

    # ---- batching and copies ----
    @classmethod
    def concat(cls, stores: list["KVCARStore"]) -> "KVCARStore":
        first = stores[0]
        out = cls.__new__(cls)
        out.method, out.layer, out.H, out.hd, out.own = first.method, first.layer, first.H, first.hd, first.own
        out.B = sum(s.B for s in stores)
        out.codes = RaggedKV.concat([s.codes for s in stores]) if first.own else \
            RaggedKV(out.B, 0, first.codes.D, first.codes.k.dtype, first.codes.k.device)
        # The caches are joined layer by layer in order, so every source (an earlier layer) has its copy.
        out.sources = {h: src._copy() for h, src in first.sources.items()}
        if any(s is None for s in out.sources.values()):
            raise RuntimeError("KV-CAR stores must be joined in layer order (a reused head's owner first)")
        out.reused, out.seen = first.reused, torch.cat([s.seen for s in stores])
        out.seen_any = any(s.seen_any for s in stores)
        out._copy = None
        for s in stores:
            s._copy = weakref.ref(out)
        return out

    def clone(self) -> "KVCARStore":
        out = KVCARStore.concat([self])
        out.codes = self.codes.clone() if self.own else out.codes
        return out


class DecodedView(RaggedKV):
    """A ``RaggedKV`` over a KV-CAR store's slots with decoded keys and values: what an eviction method
    scores. It shares the codes' layout, positions and per-slot state; evictions are applied to the codes."""

    def __init__(self, store: KVCARStore):
        c = store.codes
        self.store, self.B, self.H, self.D = store, c.B, c.H, store.hd
        self.pos, self.start, self.length, self.capacity, self.extra = c.pos, c.start, c.length, c.capacity, c.extra
        self.free, self.cap_max, self.layout, self.derived = c.free, c.cap_max, c.layout, {}
        self.host_length = self.host_capacity = None  # sizes come from the device (a view, not the codes' owner)
        perm, _ = store._gather_index()
        k, v, _, _ = store.decode_heads(store.own)
        n, width = perm.shape
        per_head = c.capacity.view(c.B, n).sum(0)
        # head h's slots fill the first per_head[h] columns of its row (slack included), the padding follows
        valid = torch.arange(width, device=perm.device)[None, :] < per_head[:, None]
        self.k = k.new_zeros(c.k.shape[0], k.shape[1])
        self.v = torch.zeros_like(self.k)
        flat = valid.reshape(-1)
        self.k[perm.reshape(-1)[flat]] = k[flat]
        self.v[perm.reshape(-1)[flat]] = v.reshape(n * width, -1)[flat]

    def keep(self, slots: torch.Tensor, counts: torch.Tensor, host_counts: list[int] | None = None) -> None:
        self.store.codes.keep(slots, counts, host_counts)

    def remove_one(self, victim: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        self.store.codes.remove_one(victim, mask)

    def _unsupported(self, *args, **kwargs):
        raise ValueError("a method that writes new keys and values (kvsculpt) cannot compose with a codec")

    append = replace = reserve = _relayout = _unsupported
