"""``deltakv``: tokens stored as small residuals against similar earlier tokens, reconstructed sparsely.

Hao et al., "DeltaKV" (arXiv 2602.08005; official code: CURRENTF/Sparse-vLLM). Per compressed layer the
unit is one token's pre-RoPE key concatenated with its value over all KV heads (width ``D = 2 * H *
head_dim``). A learned compressor per layer (down: SwiGLU ``D -> 2I``, ``silu(a) * b``, ``I -> r``; up:
linear ``r -> D``; no biases) stores each token as ``z = down(x) - down(ref)`` where ``ref`` is the mean of
its ``k`` nearest (L2, full vector) visible references, plus the reference indices; it is read back as
``up(z) + ref``. References are the sink tokens and every ``s``-th token; they stay exact. The newest
tokens stay raw in a window: when it reaches ``2W`` tokens its oldest whole multiples of ``W`` are
compressed, during prefill chunks and during decoding alike. Some layers stay full; a full layer followed
by compressed layers observes: at each decoding step it picks the tokens its own attention ranks highest
(max over heads) and the following compressed layers reconstruct only those, plus the sinks, and attend
to them together with the raw window. Reconstruction (gather references, mean, up-projection, add,
rotate) runs on the GPU as a latent-dequantising Triton kernel, one matmul for the up-projection and a Triton
kernel for the rest, as the official runtime splits it (``kvbench.kernels.deltakv_reconstruct``).

Choices the paper leaves open, made here:
- The reference phase is global: after the ``sinks`` sink tokens, every position ``p`` with ``(p - sinks)
  % s == 0`` is a reference. The density is the paper's (1 in ``s``); no positions need storing, since a
  position's row (reference or latent) follows from arithmetic.
- "Visible" references of a token are the references at earlier positions (the sinks included), as in
  training, where a token's reconstruction must not depend on later tokens.
- Multi-token queries (prefill chunks, a question fed after compression, the fidelity continuation)
  reconstruct every compressed token: the official runtime's prefill top-k (``num_top_tokens_in_prefill``
  = 8192) covers whole contexts of the sizes run here. The observation-layer selection applies to
  single-token decoding steps.
- The decode-time kept share ``keep`` (default 0.15, inside the 0.11-0.17 of the official quality scripts) is
  a fraction of the compressed tokens of each sequence, or a count when > 1 (the official throughput script
  keeps 2048), chosen per sequence, shared by the KV heads and by the compressed layers up to the next full
  layer.
- Observation scores are the attention probabilities of the current query, max over all query heads;
  ``pool`` > 1 max-pools them along positions first (the official code's ``pool_kernel_size``, default 1),
  so the neighbours of an attended token come along: an induction head in a later layer reads the token
  *after* the one the observer attends to.
- Stored dtypes are options: references in the model dtype; latents ``bfloat16`` (the paper), ``float32``,
  ``int8`` or ``int4`` (symmetric, one float16 scale per ``quant_group`` dimensions, the official runtime's
  4-bit group size 32); neighbour indices ``int32`` or ``int16``, relative to the sequence's first
  reference. Every one of these tensors, the raw window, the sinks and all bookkeeping count in the
  store's bytes. The compressors are model weights, not cache: they are reported apart.
- Full layers, when neither a checkpoint nor ``full_layers`` names them: about 5 in 32 (the paper's
  Llama-3.1-8B share), layers 0, 1, 2 first, then a quarter and half of the depth. Layer 0 is always full.
  A checkpoint records its own, chosen by measurement (SmolLM2-135M's: results/deltakv/README.md).
- ``budget`` is not used: the memory follows from ``s``, ``k``, ``r``, ``W`` and the dtypes, and is measured.
- Decoding on CUDA: between two flushes nothing the step sizes changes, so the engine replays one captured
  CUDA graph (``decode_epoch``); the step that flushes runs eagerly and the layout after it is captured anew.
- Without a checkpoint the run is refused: random compressors reconstruct noise, and their scores are not
  DeltaKV's. ``random_init=true`` asks for them explicitly (seeded; for timing and tests only); the
  leaderboard labels such runs ``deltakv(random_init=True)``.
- A checkpoint is a directory of ``config.json`` (with the sha256 of the weights) and
  ``compressors.safetensors``; it is written weights first, config last, each atomically, and its weights
  are checked against the checksum and the config's dimensions on every load.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kvbench.cache import LayerCall, RaggedKV
from kvbench.kernels.decode_attention import merge_attention, ragged_attention
from kvbench.kernels.deltakv_reconstruct import dequantize_latents, quantize_latents, reconstruct
from kvbench.kernels.window_scores import window_scores
from kvbench.method import BudgetError, Method, in_range
from kvbench.models import ModelError
from kvbench.results import file_sha256

CHECKPOINT_FORMAT = "kvbench-deltakv/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "compressors.safetensors"
LATENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "int8": None, "int4": None}
INDEX_DTYPES = {"int16": torch.int16, "int32": torch.int32}


# ---------------------------------------------------------------------------------------------- compressor

def ints_on(values: list[int], device) -> torch.Tensor:
    """Host integers as an int64 device tensor without a device sync: a plain ``torch.tensor(list,
    device=cuda)`` copies from pageable memory and waits for the GPU; the decoding step makes several of these
    per observation layer, and each wait stalls the host's launches."""
    t = torch.tensor(values, dtype=torch.int64, pin_memory=torch.device(device).type == "cuda")
    return t.to(device, non_blocking=True)


class SwiGLUDown(nn.Module):
    """``D -> 2I``, ``silu(a) * b``, ``I -> r``, no biases (the paper's down-projection)."""

    def __init__(self, dim: int, intermediate: int, latent_dim: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * intermediate, bias=False)
        self.out = nn.Linear(intermediate, latent_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.gate_up(x).chunk(2, dim=-1)
        return self.out(F.silu(a) * b)


class LayerCompressor(nn.Module):
    """One compressed layer's codec: ``z = down(x) - down(ref)``, ``x_hat = up(z) + ref``.

    ``kind="linear"`` (a plain ``D -> r`` down-projection, also offered by the official code) exists so
    that an exact identity codec can be built (r = D, identity weights)."""

    def __init__(self, dim: int, latent_dim: int, intermediate: int, kind: str = "swiglu"):
        super().__init__()
        self.kind = kind
        self.down = SwiGLUDown(dim, intermediate, latent_dim) if kind == "swiglu" else \
            nn.Linear(dim, latent_dim, bias=False)
        self.up = nn.Linear(latent_dim, dim, bias=False)

    def encode(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return self.down(x) - self.down(ref)

    def decode(self, z: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return self.up(z) + ref


def build_compressors(layers: list[int], dim: int, latent_dim: int, intermediate: int, kind: str,
                      seed: int = 0) -> nn.ModuleDict:
    torch.manual_seed(seed)
    return nn.ModuleDict({str(layer): LayerCompressor(dim, latent_dim, intermediate, kind) for layer in layers})


# ---------------------------------------------------------------------------------------------- references

def is_reference(pos: torch.Tensor, sinks: int, stride: int) -> torch.Tensor:
    """Positions that are references: the sinks and every ``stride``-th position after them."""
    return (pos < sinks) | ((pos - sinks) % stride == 0)


def reference_row(pos: torch.Tensor, sinks: int, stride: int) -> torch.Tensor:
    """Row of a reference position in its sequence's reference table."""
    return torch.where(pos < sinks, pos, sinks + (pos - sinks) // stride)


def latent_row(pos: torch.Tensor, sinks: int, stride: int) -> torch.Tensor:
    """Row of a non-reference position in its sequence's latent table."""
    c = pos - sinks
    return c - c // stride - 1


def visible_references(pos: torch.Tensor, sinks: int, stride: int) -> torch.Tensor:
    """How many references lie before each (non-reference) position: rows ``[0, n)`` of its table."""
    c = pos - sinks
    return torch.where(pos <= sinks, torch.clamp(pos, max=sinks), sinks + (c - 1) // stride + 1)


def nearest_references(x: torch.Tensor, refs: torch.Tensor, n_visible: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of the ``k`` references nearest (L2) to each token among the first ``n_visible`` rows.

    ``x [..., n, D]``, ``refs [..., R, D]``, ``n_visible [..., n]`` (at least ``k``) -> ``[..., n, k]``."""
    x, refs = x.float(), refs.float()
    d = (x * x).sum(-1, keepdim=True) - 2 * x @ refs.transpose(-1, -2) + (refs * refs).sum(-1).unsqueeze(-2)
    hidden = torch.arange(refs.shape[-2], device=x.device) >= n_visible[..., None]
    d = d.masked_fill(hidden, float("inf"))
    return d.topk(k, dim=-1, largest=False).indices


def tokens_from_kv(k_pre: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, hd]`` pre-RoPE keys and values -> ``[B, T, 2*H*hd]`` (keys of all heads, then values)."""
    B, H, T, hd = k_pre.shape
    return torch.cat([k_pre.transpose(1, 2).reshape(B, T, H * hd), v.transpose(1, 2).reshape(B, T, H * hd)], -1)


def kv_from_tokens(x: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``tokens_from_kv``."""
    B, T, D = x.shape
    hd = D // (2 * heads)
    k = x[..., : heads * hd].reshape(B, T, heads, hd).transpose(1, 2)
    v = x[..., heads * hd:].reshape(B, T, heads, hd).transpose(1, 2)
    return k, v


# ---------------------------------------------------------------------------------------------- checkpoints

def model_signature(config) -> dict:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"model_type": config.model_type, "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size, "num_key_value_heads": config.num_key_value_heads,
            "head_dim": head_dim, "vocab_size": config.vocab_size}


def model_fingerprint(model) -> str:
    from kvbench.models import weights_fingerprint
    return weights_fingerprint(model)




def save_checkpoint(directory: str | Path, compressors: nn.ModuleDict, config: dict) -> Path:
    """Weights first, then the config that names their checksum, each written atomically: a save cut short
    leaves the old checkpoint whole, or new weights that the old config's checksum refuses."""
    from safetensors.torch import save_file

    from kvbench import results
    out = Path(directory)
    # bfloat16 on disk halves the checkpoint; inference computes in float32 from these values.
    tensors = {f"{layer}.{name}": p.detach().to("cpu", torch.bfloat16).contiguous()
               for layer, module in compressors.items() for name, p in module.named_parameters()}
    with results.atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
        digest = file_sha256(tmp)
    config = {"format": CHECKPOINT_FORMAT, **config, "weights_sha256": digest}
    results.write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return out


_CONFIG_KEYS = {"model": str, "model_signature": dict, "model_fingerprint": str, "full_layers": list,
                "compressed_layers": list, "dim": int, "latent_dim": int, "intermediate": int, "compressor": str,
                "stride": int, "neighbors": int, "weights_sha256": str}


def read_checkpoint_config(directory: str | Path) -> dict:
    """A checkpoint's config, checked (format, keys, dimensions, the weights' checksum) before any model is
    loaded; a ``ModelError`` in one line for anything wrong."""
    path = Path(directory).expanduser()
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"no DeltaKV checkpoint at {directory} (expected {CONFIG_FILE} and {WEIGHTS_FILE}; "
                                "make one with `kvbench train deltakv`)")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except ValueError as e:
        raise ModelError(f"{path / CONFIG_FILE} is not valid JSON ({e}): the checkpoint is corrupt") from None
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path / CONFIG_FILE} is not a {CHECKPOINT_FORMAT} checkpoint")
    for key, kind in _CONFIG_KEYS.items():
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool):
            raise ModelError(f"{path / CONFIG_FILE}: '{key}' is missing or not {kind.__name__}; the checkpoint is "
                             "corrupt or was not made by `kvbench train deltakv`")
    sig = config["model_signature"]
    want_dim = 2 * int(sig.get("num_key_value_heads", 0)) * int(sig.get("head_dim", 0))
    if config["dim"] != want_dim:
        raise ModelError(f"{path / CONFIG_FILE}: dim {config['dim']} does not match its model "
                         f"(2 x {sig.get('num_key_value_heads')} KV heads x head_dim {sig.get('head_dim')} = {want_dim})")
    actual = file_sha256(path / WEIGHTS_FILE)
    if actual != config["weights_sha256"]:
        raise ModelError(f"{path / WEIGHTS_FILE} does not match the checksum in its {CONFIG_FILE} (sha256 "
                         f"{actual[:12]}..., expected {config['weights_sha256'][:12]}...): the weights are corrupt "
                         "or half-written; train or copy the checkpoint again")
    return config


def load_checkpoint(directory: str | Path) -> tuple[dict, nn.ModuleDict]:
    from safetensors.torch import load_file
    config = read_checkpoint_config(directory)
    modules = build_compressors(config["compressed_layers"], config["dim"], config["latent_dim"],
                                config["intermediate"], config["compressor"])
    path = Path(directory).expanduser() / WEIGHTS_FILE
    try:
        state = load_file(str(path))
        modules.load_state_dict({k: v.float() for k, v in state.items()})
    except Exception as e:  # the checksum matched: the config's dimensions do not fit these weights
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ModelError(f"{path} does not fit the dimensions in its {CONFIG_FILE} ({type(e).__name__}: {first})") from e
    return config, modules


def default_full_layers(n_layers: int) -> list[int]:
    n_full = max(1, round(n_layers * 5 / 32))
    candidates = [0, 1, 2, n_layers // 4, n_layers // 2, 3 * n_layers // 4]
    chosen: list[int] = []
    for layer in candidates:
        if layer not in chosen and layer < n_layers and len(chosen) < n_full:
            chosen.append(layer)
    return sorted(chosen)


# ---------------------------------------------------------------------------------------------- stores

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


# ---------------------------------------------------------------------------------------------- method

@dataclass
class DeltaKV(Method):
    checkpoint: str | None = None
    full_layers: list[int] | None = None
    latent_dim: int | None = None  # r (default: the checkpoint's, else D/4 as the released 7B compressor)
    intermediate: int | None = None  # I (default: the checkpoint's, else 3D as the released compressor)
    compressor: str | None = None  # "swiglu" (the paper) or "linear"
    stride: int | None = None  # s: one reference every s tokens (default: the checkpoint's, else 10)
    neighbors: int | None = None  # k references per token (default: the checkpoint's, else 4)
    sinks: int = 8
    window: int = field(default=128, metadata=in_range(1))
    keep: float = 0.15
    pool: int = field(default=1, metadata=in_range(1))  # max-pooling width of the observation scores along positions (1: none)
    latent_dtype: str = "bfloat16"
    index_dtype: str = "int32"
    quant_group: int = field(default=32, metadata=in_range(1))
    seed: int = 0
    random_init: bool = False  # no checkpoint: random compressors, asked for explicitly (timing and tests only)

    def __post_init__(self):
        if self.latent_dtype not in LATENT_DTYPES:
            raise BudgetError(f"latent_dtype '{self.latent_dtype}' unknown; use one of {', '.join(LATENT_DTYPES)}")
        if self.index_dtype not in INDEX_DTYPES:
            raise BudgetError(f"index_dtype '{self.index_dtype}' unknown; use int16 or int32")
        if self.compressor not in (None, "swiglu", "linear"):
            raise BudgetError(f"compressor '{self.compressor}' unknown; use swiglu or linear")
        if self.window < 1 or self.sinks < 0 or self.keep <= 0 or self.pool < 1 or self.pool % 2 == 0:
            raise BudgetError("DeltaKV needs window >= 1, sinks >= 0, keep > 0 and an odd pool >= 1")
        for name in ("stride", "neighbors", "latent_dim", "intermediate"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise BudgetError(f"DeltaKV {name} must be a positive whole number, got {value!r}")
        if self.checkpoint is None and not self.random_init:
            raise BudgetError("deltakv needs trained compressors: pass --checkpoint DIR (make one with `kvbench train "
                              "deltakv`), or -m random_init=true for random ones (timing and tests only)")
        if self.checkpoint is not None and self.random_init:
            raise BudgetError("deltakv: give either a checkpoint or random_init=true, not both")
        if self.checkpoint is not None:
            read_checkpoint_config(self.checkpoint)  # fail before a model is loaded
        self._prepared_for = None

    # ---- binding to a model ----
    def prepare(self, lm) -> None:
        cfg = lm.model.config
        signature = model_signature(cfg)
        fingerprint = model_fingerprint(lm.model)
        if self._prepared_for == (id(lm.model), fingerprint):
            return
        n_layers, heads, head_dim = cfg.num_hidden_layers, signature["num_key_value_heads"], signature["head_dim"]
        dim = 2 * heads * head_dim
        if self.checkpoint is not None:
            ckpt, modules = load_checkpoint(self.checkpoint)
            if ckpt["model_signature"] != signature or ckpt["model_fingerprint"] != fingerprint:
                raise ModelError(f"DeltaKV checkpoint {self.checkpoint} was trained for {ckpt['model']} "
                                 f"({_describe(ckpt['model_signature'])}, fingerprint {ckpt['model_fingerprint']}); "
                                 f"this run uses {lm.name} ({_describe(signature)}, fingerprint {fingerprint}): "
                                 "train one for this model with `kvbench train deltakv`")
            for name in ("latent_dim", "intermediate", "compressor"):
                if getattr(self, name) is not None and getattr(self, name) != ckpt[name]:
                    raise BudgetError(f"DeltaKV {name}={getattr(self, name)} but checkpoint {self.checkpoint} "
                                      f"was trained with {ckpt[name]}")
            self.latent_dim_, self.intermediate_, self.kind_ = ckpt["latent_dim"], ckpt["intermediate"], ckpt["compressor"]
            self.stride_ = self.stride or ckpt["stride"]
            self.neighbors_ = self.neighbors or ckpt["neighbors"]
            full = sorted(self.full_layers) if self.full_layers is not None else ckpt["full_layers"]
            missing = [layer for layer in range(n_layers) if layer not in full and str(layer) not in modules]
            if missing:
                raise BudgetError(f"DeltaKV checkpoint {self.checkpoint} has no compressor for layers {missing}; "
                                  f"keep them full (its full layers: {ckpt['full_layers']})")
        else:
            self.latent_dim_ = self.latent_dim or max(1, dim // 4)
            self.intermediate_ = self.intermediate or 3 * dim
            self.kind_ = self.compressor or "swiglu"
            self.stride_ = self.stride or 10
            self.neighbors_ = self.neighbors or 4
            full = sorted(self.full_layers) if self.full_layers is not None else default_full_layers(n_layers)
            modules = build_compressors([layer for layer in range(n_layers) if layer not in full], dim,
                                        self.latent_dim_, self.intermediate_, self.kind_, self.seed)
        if 0 not in full or any(not 0 <= layer < n_layers for layer in full):
            raise BudgetError(f"DeltaKV full_layers {full} must include layer 0 (the first observer) and lie in "
                              f"0..{n_layers - 1}")
        if self.sinks < self.neighbors_:
            raise BudgetError(f"DeltaKV needs sinks >= neighbors (every compressed token must see {self.neighbors_} "
                              f"references); got sinks={self.sinks}")
        if self.latent_format != "float" and self.latent_dim_ % (2 * self.quant_group if self.latent_format == "int4"
                                                                  else self.quant_group):
            raise BudgetError(f"latent_dim {self.latent_dim_} must be a multiple of "
                              f"{'2 x ' if self.latent_format == 'int4' else ''}quant_group={self.quant_group} "
                              f"for {self.latent_dtype} latents")
        param = next(lm.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.full_set = set(full)
        self.n_layers, self.heads = n_layers, heads
        self.modules = modules.to(self.device).eval().requires_grad_(False)
        self._up = {layer: mod.up.weight.to(self.dtype).contiguous() for layer, mod in self.modules.items()}
        self.rotary = lm.model.model.rotary_emb
        self.model_name, self.signature, self.fingerprint = lm.name, signature, fingerprint
        self._prepared_for = (id(lm.model), fingerprint)
        self._ints_cache: dict[tuple, torch.Tensor] = {}

    @property
    def latent_format(self) -> str:
        return self.latent_dtype if self.latent_dtype in ("int8", "int4") else "float"

    @property
    def latent_float_dtype(self) -> torch.dtype:
        return LATENT_DTYPES[self.latent_dtype] or torch.bfloat16

    def latent_columns(self, dtype) -> dict:
        r = self.latent_dim_
        cols = {"nbr": ((self.neighbors_,), INDEX_DTYPES[self.index_dtype])}
        if self.latent_format == "float":
            cols["z"] = ((r,), self.latent_float_dtype)
        else:
            cols["z"] = ((r // 2,), torch.uint8) if self.latent_format == "int4" else ((r,), torch.int8)
            cols["scale"] = ((r // self.quant_group,), torch.float16)
        return cols

    def compressor_for(self, layer: int) -> LayerCompressor:
        return self.modules[str(layer)]

    def up_weight(self, layer: int) -> torch.Tensor:
        return self._up[str(layer)]

    def compressor_nbytes(self) -> int:
        """Bytes of the compressor weights (model weights, held once, not per sequence)."""
        return sum(p.numel() * p.element_size() for p in self.modules.parameters())

    # ---- the cache hooks ----
    def new_store(self, layer: int, batch: int, heads: int, head_dim: int, dtype, device):
        if self._prepared_for is None:
            raise RuntimeError("DeltaKV.prepare(lm) must run before caches are made (the Engine calls it)")
        if layer in self.full_set:
            return RaggedKV(batch, heads, head_dim, dtype, device)
        return DeltaKVStore(self, layer, batch, heads, head_dim, dtype, device)

    def compress(self, call: LayerCall) -> None:
        if call.layer not in self.full_set:
            call.store.flush(call.cache.rope, decoding=False)

    def on_decode(self, call: LayerCall) -> None:
        if call.layer not in self.full_set:
            call.store.flush(call.cache.rope, decoding=True)
            return
        followers = []
        for layer in range(call.layer + 1, self.n_layers):
            if layer in self.full_set:
                break
            followers.append(call.cache.stores[layer])
        if followers:
            plan = self.observe(call, followers[0])
            for store in followers:
                store.plan = plan

    def observe(self, call: LayerCall, follower: DeltaKVStore) -> Plan:
        """The tokens the following compressed layers reconstruct at this step: the sinks and the
        compressed tokens this full layer's attention ranks highest (max over query heads)."""
        store: RaggedKV = call.store
        n_comp = follower.n_comp
        device = store.k.device
        B, width = len(n_comp), max(n_comp)
        n_sinks = [min(self.sinks, n) for n in n_comp]
        n_pick = [self._n_keep(n - s) for n, s in zip(n_comp, n_sinks)]
        counts = [s + p for s, p in zip(n_sinks, n_pick)]
        never = width + 1  # sorts after every real position
        columns = [torch.arange(self.sinks, device=device)[None, :].expand(B, self.sinks)]
        kmax = max(n_pick)
        if kmax > 0:
            # this step's attention already normalised the query over the store: its lse saves a pass
            lse = call.lse[:, :, -1:] if call.lse is not None else None
            slot = window_scores(call.queries[:, :, -1:], call.positions[:, -1:], store.k, store.pos, store.start,
                                 store.length, call.scale, reduce="max", lse=lse)
            seq = torch.repeat_interleave(torch.arange(B * store.H, device=device), store.capacity,
                                          output_size=store.k.shape[0]) // store.H  # sized on the host: no sync
            pos = store.pos.long()
            limit = self._ints(n_comp)
            inside = (pos >= self.sinks) & (pos < limit[seq])  # compressed, not sinks
            scores = torch.full((B * width + 1,), float("-inf"), device=device)  # the last cell takes the rest
            scores.scatter_reduce_(0, torch.where(inside, seq * width + pos, B * width), slot, reduce="amax")
            scores = scores[:-1].view(B, width)
            if self.pool > 1:  # a token's neighbours share its score (the official code's pool_kernel_size)
                scores = F.max_pool1d(scores[:, None], self.pool, stride=1, padding=self.pool // 2)[:, 0, :width]
                at = torch.arange(width, device=device)[None, :]
                scores = scores.masked_fill((at < self.sinks) | (at >= limit[:, None]), float("-inf"))
            top = scores.topk(kmax, dim=1).indices  # best first
            chosen = torch.arange(kmax, device=device)[None, :] < self._ints(n_pick)[:, None]
            columns.append(torch.where(chosen, top, never))
        table = torch.cat(columns, dim=1)
        if self.sinks:
            table[:, : self.sinks] = torch.where(table[:, : self.sinks] < self._ints(n_sinks)[:, None],
                                                 table[:, : self.sinks], never)
        table = torch.sort(table, dim=1).values  # each row: its valid positions in order, then ``never``
        # the valid entries are a prefix of counts[b] per row: gather them with host-built indices (no sync)
        counts_t = self._ints(counts)
        total = sum(counts)
        seq_of = torch.repeat_interleave(torch.arange(B, device=device), counts_t, output_size=total)
        first = torch.cumsum(counts_t, 0) - counts_t
        flat = seq_of * table.shape[1] + torch.arange(total, device=device) - first[seq_of]
        return make_plan(seq_of, table.reshape(-1)[flat], counts, self.heads, self.rotary, counts_t)

    def _ints(self, values: list[int]) -> torch.Tensor:
        """Host integers on the device, kept per value list: between flushes a decoding step asks for the
        same ones, so a captured step finds them made (a copy made during capture would read freed host
        memory at replay)."""
        key = tuple(values)
        if key not in self._ints_cache:
            if len(self._ints_cache) > 256:
                self._ints_cache.clear()
            self._ints_cache[key] = ints_on(values, self.device)
        return self._ints_cache[key]

    def decode_epoch(self, cache) -> tuple | None:
        """Steps between flushes change no layout and no host-side size (the kept count is fixed once a
        sequence has that many compressed tokens): one captured graph replays them. The step that
        flushes runs eagerly."""
        stores = [s for s in cache.stores if isinstance(s, DeltaKVStore)]
        if any(any(s._moves([n + 1 for n in s.n_seen])) for s in stores):
            return None
        return tuple((tuple(s.n_comp), tuple(s.refs.h_start), tuple(s.latents.h_start), s.refs.t["x"].data_ptr())
                     for s in stores[:1])

    def _n_keep(self, n_compressed: int) -> int:
        if n_compressed <= 0:
            return 0
        if self.keep <= 1.0:
            return min(n_compressed, math.ceil(self.keep * n_compressed))
        return min(n_compressed, int(self.keep))


def _describe(signature: dict) -> str:
    return (f"{signature['model_type']}, {signature['num_hidden_layers']} layers, "
            f"{signature['num_key_value_heads']} KV heads x {signature['head_dim']}")
