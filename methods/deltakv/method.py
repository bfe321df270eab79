"""The ``deltakv`` method: binds the compressors to a model, makes the stores, flushes the window and picks
the tokens the observation layers rank highest while decoding (the choices: the package docstring)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvbench.artifact import describe
from kvbench.cache import LayerCall, RaggedKV, ints_on
from kvbench.kernels.window_scores import window_scores
from kvbench.method import BudgetError, Method, in_range
from kvbench.models import ModelError
from kvbench.methods.deltakv.codec import (INDEX_DTYPES, LATENT_DTYPES, LayerCompressor, build_compressors,
                                          default_full_layers, load_checkpoint, model_fingerprint,
                                          model_signature, read_checkpoint_config)
from kvbench.methods.deltakv.store import DeltaKVStore, Plan, make_plan


@dataclass
class DeltaKV(Method):
    artifact_commands: ClassVar[dict[str, str]] = {"train": "kvbench.methods.deltakv.train:command"}
    artifact_param: ClassVar[str] = "checkpoint"
    uses_budget: ClassVar[bool] = False  # s, k, r, W and the dtypes set the memory

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
                                 f"({describe(ckpt['model_signature'])}, fingerprint {ckpt['model_fingerprint']}); "
                                 f"this run uses {lm.name} ({describe(signature)}, fingerprint {fingerprint}): "
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
            seq = store.slot_segments() // store.H  # kept per layout: no sync
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
