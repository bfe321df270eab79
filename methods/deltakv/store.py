"""DeltaKV's store: per layer the sinks and references exact, every other token a latent residual against
the mean of its nearest references, the newest tokens raw in a window; reconstruction on read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvbench.cache import RaggedKV, ints_on
from kvbench.kernels.decode_attention import merge_attention, ragged_attention
from kvbench.kernels.deltakv_reconstruct import quantize_latents, reconstruct
from kvbench.method import BudgetError
from kvbench.methods.deltakv.codec import (is_reference, latent_row, nearest_references, reference_row,
                                          tokens_from_kv, visible_references)

if TYPE_CHECKING:
    from kvbench.methods.deltakv.method import DeltaKV


class SegmentTable:
    """Rows of B sequences packed in shared tensors: sequence b owns rows ``start[b] .. start[b] + cap[b]``,
    the first ``length[b]`` valid. Several tensors share the layout (latents, scales, indices).
    Bookkeeping lives on the device (counted in bytes) and is mirrored on the host (no syncs)."""

    def __init__(self, batch: int, columns: dict[str, tuple[tuple[int, ...], torch.dtype]], device):
        self.B, self.device = batch, device
        self.t = {name: torch.empty((0, *shape), dtype=dtype, device=device) for name, (shape, dtype) in columns.items()}
        self.h_start, self.h_len, self.h_cap = [0] * batch, [0] * batch, [0] * batch
        self._sync_device()

    def _sync_device(self) -> None:
        self.start = ints_on(self.h_start, self.device)
        self.length = ints_on(self.h_len, self.device)
        self.capacity = ints_on(self.h_cap, self.device)

    def row_bytes(self) -> int:
        return sum(t.element_size() * t.shape[1:].numel() for t in self.t.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.t.values(), self.start, self.length, self.capacity))

    def seq_nbytes(self) -> list[int]:
        return [cap * self.row_bytes() + 3 * 8 for cap in self.h_cap]

    def rows(self, b: int, name: str) -> torch.Tensor:
        s = self.h_start[b]
        return self.t[name][s: s + self.h_len[b]]

    def extend(self, rows: dict[int, dict[str, torch.Tensor]], slack) -> None:
        """Append rows to several sequences (``rows[b][name]``), growing the tensors at most once; a sequence
        that outgrows its capacity gets ``slack(b)`` spare rows."""
        caps = list(self.h_cap)
        for b, cols in rows.items():
            need = self.h_len[b] + next(iter(cols.values())).shape[0]
            if need > caps[b]:
                caps[b] = need + slack(b)
        if caps != self.h_cap:
            self._relayout(caps)
        # one indexed copy per column for all the sequences (a copy per sequence and column cost the
        # decoding step's flushes thousands of launches at large batches)
        order = list(rows)
        if not order:
            return
        counts = [next(iter(rows[b].values())).shape[0] for b in order]
        first = torch.tensor([self.h_start[b] + self.h_len[b] for b in order])
        dest = torch.repeat_interleave(first - torch.cumsum(torch.tensor([0] + counts[:-1]), 0),
                                       torch.tensor(counts)) + torch.arange(sum(counts))
        dest = ints_on(dest.tolist(), self.device)
        for name, t in self.t.items():
            t.index_copy_(0, dest, torch.cat([rows[b][name] for b in order]).to(t.dtype))
        for b, n in zip(order, counts):
            self.h_len[b] += n
        self._sync_device()

    def _relayout(self, caps: list[int]) -> None:
        starts = [0] * self.B
        for b in range(1, self.B):
            starts[b] = starts[b - 1] + caps[b - 1]
        total = starts[-1] + caps[-1] if self.B else 0
        new = {name: t.new_zeros((total, *t.shape[1:])) for name, t in self.t.items()}
        for b in range(self.B):
            n = self.h_len[b]
            for name in self.t:
                new[name][starts[b]: starts[b] + n] = self.t[name][self.h_start[b]: self.h_start[b] + n]
        self.t, self.h_start, self.h_cap = new, starts, caps

    @classmethod
    def concat(cls, tables: list["SegmentTable"]) -> "SegmentTable":
        out = cls.__new__(cls)
        out.B, out.device = sum(t.B for t in tables), tables[0].device
        out.t = {name: torch.cat([t.t[name] for t in tables]) for name in tables[0].t}
        out.h_start, out.h_len, out.h_cap = [], [], []
        offset = 0
        for t in tables:
            out.h_start += [s + offset for s in t.h_start]
            out.h_len += list(t.h_len)
            out.h_cap += list(t.h_cap)
            offset += next(iter(t.t.values())).shape[0]
        out._sync_device()
        return out


@dataclass
class Plan:
    """Which compressed-region tokens to reconstruct for one forward call, shared by the layers that use
    it: token ``i`` is position ``pos[i]`` of sequence ``seq[i]``, grouped by sequence (``counts``)."""

    seq: torch.Tensor
    pos: torch.Tensor
    counts: list[int]
    cos: torch.Tensor
    sin: torch.Tensor
    dest: torch.Tensor
    hstride: torch.Tensor
    seg_start: torch.Tensor
    seg_len: torch.Tensor
    slots: int
    rows: dict = field(default_factory=dict)  # table rows of the tokens, per table layout (shared by layers)


def make_plan(seq: torch.Tensor, pos: torch.Tensor, counts: list[int], heads: int, rotary,
              counts_t: torch.Tensor | None = None) -> Plan:
    device = pos.device
    counts_t = ints_on(counts, device) if counts_t is None else counts_t
    first = torch.zeros_like(counts_t)
    first[1:] = torch.cumsum(counts_t, 0)[:-1]
    index_in_seq = torch.arange(len(pos), device=device) - first[seq]
    dest = heads * first[seq] + index_in_seq
    hstride = counts_t[seq]
    seg_start = (heads * first)[:, None] + torch.arange(heads, device=device)[None, :] * counts_t[:, None]
    seg_len = counts_t[:, None].expand(len(counts), heads)
    cos, sin = rotary(torch.empty(0, device=device, dtype=torch.float32), pos[None, :])
    return Plan(seq, pos, counts, cos[0].float().contiguous(), sin[0].float().contiguous(), dest, hstride,
                seg_start.reshape(-1).contiguous(), seg_len.reshape(-1).contiguous(), heads * len(pos))


class DeltaKVStore:
    """One compressed layer: a raw ``RaggedKV`` (the sinks until the first flush, then the recent window;
    keys post-RoPE, as the model made them), a reference table (pre-RoPE ``[R, D]``: the sinks, then every
    ``s``-th compressed token) and a latent table (latents, their scales, neighbour indices)."""

    def __init__(self, method: "DeltaKV", layer: int, batch: int, heads: int, head_dim: int, dtype, device):
        self.method, self.layer, self.B, self.H, self.hd, self.dtype = method, layer, batch, heads, head_dim, dtype
        self.D = 2 * heads * head_dim
        self.raw = RaggedKV(batch, heads, head_dim, dtype, device)
        self.refs = SegmentTable(batch, {"x": ((self.D,), dtype)}, device)
        self.latents = SegmentTable(batch, method.latent_columns(dtype), device)
        self.n_seen = [0] * batch  # tokens appended, per sequence (host mirror: flush decisions need no sync)
        self.n_comp = [0] * batch  # tokens moved out of the raw store (the sinks included)
        self.plan: Plan | None = None  # set by the observation layer for the coming decoding step

    # ---- what it holds ----
    def nbytes(self) -> int:
        return self.raw.nbytes() + self.refs.nbytes() + self.latents.nbytes()

    def seq_nbytes(self) -> torch.Tensor:
        extra = torch.tensor([a + b for a, b in zip(self.refs.seq_nbytes(), self.latents.seq_nbytes())],
                             device=self.raw.length.device)
        return self.raw.seq_nbytes() + extra

    def breakdown(self) -> dict[str, int]:
        """Bytes by kind: raw window, sinks, references, latents, scales, indices, bookkeeping."""
        lat = self.latents
        sink_rows = sum(min(self.method.sinks, n) for n in self.refs.h_len)
        ref_item = self.D * self.refs.t["x"].element_size()
        out = {"raw_window": self.raw.nbytes(), "sinks": sink_rows * ref_item,
               "references": self.refs.t["x"].numel() * self.refs.t["x"].element_size() - sink_rows * ref_item,
               "latents": lat.t["z"].numel() * lat.t["z"].element_size(),
               "indices": lat.t["nbr"].numel() * lat.t["nbr"].element_size(),
               "scales": lat.t["scale"].numel() * lat.t["scale"].element_size() if "scale" in lat.t else 0}
        out["bookkeeping"] = self.nbytes() - sum(out.values())
        return out

    def token_counts(self) -> torch.Tensor:
        comp = torch.tensor(self.n_comp, device=self.raw.length.device)
        return self.raw.token_counts() + comp[:, None]

    def num_tokens(self) -> int:
        return sum(self.n_seen)

    def has_tokens(self) -> bool:
        return self.num_tokens() > 0

    # ---- changing what it holds ----
    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        self.raw.append(k, v, pos)
        self.n_seen = [n + k.shape[2] for n in self.n_seen]

    def _moves(self, n_seen: list[int]) -> list[int]:
        """Tokens each sequence moves out of the raw store at a flush after ``n_seen`` tokens."""
        m, moves = self.method, []
        for b in range(self.B):
            sinks_raw = min(m.sinks, n_seen[b]) if self.n_comp[b] == 0 else 0
            window = n_seen[b] - self.n_comp[b] - sinks_raw
            blocks = window // m.window - 1 if window >= 2 * m.window else 0
            moves.append(sinks_raw + blocks * m.window if blocks > 0 else 0)
        return moves

    def steps_to_flush(self) -> int:
        """Decoding steps until the one that flushes (1: the coming step flushes)."""
        for ahead in range(1, 2 * self.method.window + self.method.sinks + 2):
            if any(self._moves([n + ahead for n in self.n_seen])):
                return ahead
        return 2 * self.method.window + self.method.sinks + 2

    def reserve(self, n_tokens: int) -> None:
        """Room in the raw store for the tokens the coming steps append before the next flush."""
        self.raw.reserve(min(n_tokens, self.steps_to_flush()))

    def replayed(self, steps: int) -> None:
        self.n_seen = [n + steps for n in self.n_seen]
        self.raw.replayed(steps)

    def flush(self, rope, decoding: bool) -> None:
        """Compress the oldest whole multiples of W once the window reaches 2W (the sinks go first)."""
        m = self.method
        moves = self._moves(self.n_seen)
        if not any(moves):
            return
        idx, valid = self.raw.slot_index()
        lengths = self.raw.length.new_tensor(moves).repeat_interleave(self.H)
        first = torch.arange(idx.shape[1], device=idx.device)[None, :] < lengths[:, None]
        kept = valid & ~first
        new_refs, new_latents = {}, {}
        # sequences that move the same number of tokens are compressed together (in lockstep decoding that
        # is all of them): a few batched passes instead of one small pass per sequence. A pass holds its
        # sequences' references in float32, padded: at most about 256 MB of them.
        groups: dict[int, list[int]] = {}
        for b, n in enumerate(moves):
            if n:
                groups.setdefault(n, []).append(b)
        for n, members in groups.items():
            refs_after = max(self.refs.h_len[b] for b in members) + n // m.stride_ + m.sinks + 1
            per_pass = max(1, (256 << 20) // (refs_after * self.D * 4))
            for i in range(0, len(members), per_pass):
                bs = members[i: i + per_pass]
                rows = idx.view(self.B, self.H, -1)[ints_on(bs, idx.device), :, :n]  # [G, H, n] oldest n
                positions = ints_on([self.n_comp[b] for b in bs], idx.device)[:, None] + \
                    torch.arange(n, device=idx.device)[None, :]
                k_pre = rope(self.raw.k[rows].float(), positions, inverse=True)
                refs, latents = self._compress_group(bs, tokens_from_kv(k_pre, self.raw.v[rows].float()))
                new_refs.update(refs)
                new_latents.update(latents)
        for b, n in enumerate(moves):
            self.n_comp[b] += n
        per_flush = m.window // m.stride_ + 1
        self.refs.extend(new_refs, lambda b: max(per_flush, self.refs.h_len[b] // 32) if decoding else 0)
        self.latents.extend(new_latents, lambda b: max(m.window, self.latents.h_len[b] // 32) if decoding else 0)
        self.raw.keep(idx[kept], valid.sum(1) - lengths)

    def _compress_group(self, bs: list[int], x: torch.Tensor):
        """New reference rows and latent rows of sequences ``bs``, whose next ``n`` tokens to compress are
        ``x [G, n, D]`` (float32, pre-RoPE keys then values). Which tokens are references follows from
        positions, known on the host: no device syncs."""
        m, dev = self.method, x.device
        G, n, D = x.shape
        pos = torch.tensor([self.n_comp[b] for b in bs])[:, None] + torch.arange(n)[None, :]  # host
        is_ref = is_reference(pos, m.sinks, m.stride_)
        old = torch.tensor([self.refs.h_len[b] for b in bs])
        r_max = int((old + is_ref.sum(1)).max())
        if m.index_dtype == "int16" and r_max > torch.iinfo(torch.int16).max:
            raise BudgetError(f"DeltaKV index_dtype int16 holds {torch.iinfo(torch.int16).max} references per "
                              "sequence; this context needs more: use index_dtype=int32")
        # each sequence's references, padded to r_max rows: the table's, then the new ones (stored values:
        # distances and means use what the cache holds)
        ar = torch.arange(r_max, device=dev)
        in_old = ar[None, :] < ints_on(old.tolist(), dev)[:, None]
        slot = ints_on([self.refs.h_start[b] for b in bs], dev)[:, None] + ar[None, :]
        table = self.refs.t["x"]
        refs = table[torch.where(in_old, slot, 0)].float() * in_old[..., None] if len(table) else \
            torch.zeros((G, r_max, D), device=dev)
        g_new, j_new = is_ref.nonzero(as_tuple=True)
        row_new = old[g_new] + torch.cumsum(is_ref.long(), 1)[g_new, j_new] - 1
        gn, jn = ints_on(g_new.tolist(), dev), ints_on(j_new.tolist(), dev)
        new_x = x[gn, jn].to(self.dtype)
        refs[gn, ints_on(row_new.tolist(), dev)] = new_x.float()
        # the k nearest visible references of every token (bounded distance matrices), then the latents
        visible = ints_on(visible_references(pos, m.sinks, m.stride_).flatten().tolist(), dev).view(G, n)
        step = max(64, 8192 // G)
        nbr = torch.cat([nearest_references(x[:, s: s + step], refs, visible[:, s: s + step], m.neighbors_)
                         for s in range(0, n, step)], dim=1)
        g_lat, j_lat = (~is_ref).nonzero(as_tuple=True)
        compressor = m.compressor_for(self.layer)
        parts = []
        for s in range(0, len(g_lat), 8192):
            gi, ji = ints_on(g_lat[s: s + 8192].tolist(), dev), ints_on(j_lat[s: s + 8192].tolist(), dev)
            nb = nbr[gi, ji]  # [N, k] rows relative to the sequence's first reference
            z = compressor.encode(x[gi, ji], refs[gi[:, None], nb].mean(dim=1))
            values, scales = quantize_latents(z, m.latent_format, m.quant_group, m.latent_float_dtype)
            parts.append({"z": values, "nbr": nb, **({"scale": scales} if scales is not None else {})})
        cols = {name: torch.cat([part[name] for part in parts]) for name in parts[0]} if parts else \
            {name: t.new_zeros((0, *t.shape[1:])) for name, t in self.latents.t.items()}
        lat_split = {name: torch.split(t, (~is_ref).sum(1).tolist()) for name, t in cols.items()}
        ref_split = torch.split(new_x, is_ref.sum(1).tolist())
        return ({b: {"x": ref_split[g]} for g, b in enumerate(bs)},
                {b: {name: parts[g] for name, parts in lat_split.items()} for g, b in enumerate(bs)})

    # ---- reading ----
    def attend(self, q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = self.raw.attend(q, scale)
        plan, self.plan = self.plan, None
        if not any(self.n_comp):
            return out, lse
        if plan is None or q.shape[2] != 1:
            plan = self.full_plan()
        k_buf, v_buf = self.materialize(plan)
        out_c, lse_c = ragged_attention(q, k_buf, v_buf, plan.seg_start, plan.seg_len, scale)
        return merge_attention(out_c, lse_c, out, lse)

    def full_plan(self) -> Plan:
        device = self.raw.length.device
        seq = torch.repeat_interleave(torch.arange(self.B, device=device), ints_on(self.n_comp, device),
                                      output_size=sum(self.n_comp))
        pos = torch.cat([torch.arange(n, device=device) for n in self.n_comp])
        return make_plan(seq, pos, list(self.n_comp), self.H, self.method.rotary)

    def materialize(self, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated) and values of the plan's tokens, packed as ragged (sequence, head) segments."""
        m = self.method
        # the compressed layers of one observer usually share their tables' layout: compute the rows once
        layout = (tuple(self.refs.h_start), tuple(self.latents.h_start))
        if layout not in plan.rows:
            ref = is_reference(plan.pos, m.sinks, m.stride_)
            ref_base = self.refs.start[plan.seq]
            lat_row = torch.where(ref, torch.full_like(plan.pos, -1),
                                  self.latents.start[plan.seq] + latent_row(plan.pos, m.sinks, m.stride_))
            self_ref = torch.where(ref, ref_base + reference_row(plan.pos, m.sinks, m.stride_),
                                   torch.zeros_like(plan.pos))
            plan.rows[layout] = lat_row, self_ref, ref_base
        lat_row, self_ref, ref_base = plan.rows[layout]
        k_buf = torch.empty(plan.slots, self.hd, dtype=self.dtype, device=plan.pos.device)
        v_buf = torch.empty_like(k_buf)
        lat = self.latents.t
        reconstruct(lat["z"], lat.get("scale"), lat["nbr"], self.refs.t["x"], m.up_weight(self.layer), lat_row,
                    self_ref, ref_base, plan.cos, plan.sin, plan.dest, plan.hstride, k_buf, v_buf, self.H,
                    m.latent_format, m.quant_group)
        return k_buf, v_buf

    @classmethod
    def concat(cls, stores: list["DeltaKVStore"]) -> "DeltaKVStore":
        first = stores[0]
        out = cls.__new__(cls)
        out.method, out.layer, out.H, out.hd, out.dtype, out.D = \
            first.method, first.layer, first.H, first.hd, first.dtype, first.D
        out.B = sum(s.B for s in stores)
        out.raw = RaggedKV.concat([s.raw for s in stores])
        out.refs = SegmentTable.concat([s.refs for s in stores])
        out.latents = SegmentTable.concat([s.latents for s in stores])
        out.n_seen = [n for s in stores for n in s.n_seen]
        out.n_comp = [n for s in stores for n in s.n_comp]
        out.plan = None
        return out

    def clone(self) -> "DeltaKVStore":
        out = DeltaKVStore.concat([self])
        out.raw = self.raw.clone()
        out.refs.t = {n: t.clone() for n, t in self.refs.t.items()}
        out.latents.t = {n: t.clone() for n, t in self.latents.t.items()}
        return out
