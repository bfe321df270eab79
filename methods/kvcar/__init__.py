"""``kvcar``: keys and values stored as autoencoder latents, some heads read from the layer before.

Roy, Sridharan, Selvam, Raghunathan, "KV-CAR: KV Cache Compression using Autoencoders and KV Reuse in
Large Language Models" (arXiv 2512.06727). No reference code is public; this is built from the paper.

Per layer, an autoencoder along the embedding dimension codes each token's key and each token's value
(encoder ``Linear(d, hidden) -> BatchNorm -> LeakyReLU -> Linear(hidden, latent)``, decoder mirrored); the
cache holds the latents and decodes them before attention (``codec.py``, ``store.py``). Separately, a head
whose keys and values are close to the same head's in the previous layer (cosine on calibration text)
stores nothing and reads that layer's entries. Training (``train.py``, ``kvbench train kvcar``): first
reconstruction, then the language-model loss through the decoded cache with the base model frozen.

Choices the paper leaves open, made here:
- The "embedding dimension" of a layer's keys is ``KV heads x head_dim``; the layer's autoencoder is
  block-diagonal over its KV heads (one small autoencoder per head, computed together as batched matmuls).
  A dense autoencoder over all heads would tie the heads of a token together, so neither a reused head
  nor a token an eviction method drops from one head only could be left out of the cache. Keys and values
  have separate autoencoders; the values' latent may differ (``--latent-dim-v``: values are far less
  low-rank than pre-RoPE keys), a slot holding ``[zk, zv]`` split in halves over the store's two tensors.
- Keys are coded before RoPE (``rope_keys="pre"``, the default): a position-free autoencoder sees the
  same distribution at every position, and pre-RoPE keys are known to be far lower-rank than rotated
  ones (measured on SmolLM2: results/kvcar/README.md); the decoded keys are rotated to their positions
  on read (positions are stored, 4 bytes a slot, counted). ``--rope-keys post`` trains on rotated keys.
- ``hidden`` defaults to ``2 x latent``: then training starts from the principal components of
  calibration vectors (an exact construction through the LeakyReLU, ``codec.pca_init_``), so a short
  training budget starts from the best linear code rather than from noise.
- BatchNorm uses batch statistics over the tokens of a training batch in stage 1, and its running
  statistics (frozen; scale and shift still trained) in stage 2, so stage 2 optimises exactly the function
  inference computes; at inference it is folded into the linear layer before it. LeakyReLU slope 0.01.
- Losses: stage 1, the mean over layers of each autoencoder's MSE relative to its input's mean square (so
  layers with large key norms do not dominate); stage 2, next-token cross-entropy alone. AdamW, linear
  warm-up, cosine decay over the steps or the time limit.
- In stage 2 every key and value is replaced by its reconstruction (the worst case, as in decoding); at
  inference a prefill chunk attends exactly to its own tokens and to the decoded past (the cache
  interface's exact prefill).
- Reuse: similarity of head ``h`` of layer ``l`` is the lower of the mean token cosine of its keys and of
  its values against head ``h`` of layer ``l-1``, on the first calibration samples of the training corpus
  (cosine is the same before and after RoPE: both layers rotate a token by the same angle). A head at or
  above ``reuse_threshold`` (training's default 0.9; the paper gives no value) is reused; chains resolve to the nearest earlier layer that stores the head.
  Layer 0 stores everything. The artifact keeps the whole similarity matrix, so ``-m reuse_threshold=X``
  re-chooses the pairs at run time (stage 2 trained with the artifact's pairs), and ``-m reuse=false``
  turns reuse off (every head has an autoencoder: reused heads' are trained by stage 1 only).
- A layer that reuses heads decodes their owner's codes for those heads when it attends (no second copy
  is held; one layer's decoded keys and values exist at a time, plus the reused heads' for that layer).
- Decoding: every step decodes all of a layer's codes, then runs the shared ragged attention kernel over
  the decoded keys and values. Where Triton runs (CUDA, or ``KVBENCH_TRITON=1``) one kernel per layer
  (``kernels/kvcar_decode.py``) gathers each slot's codes, runs its head's key and value decoders (the
  first matrices zero-padded once, at ``bind``, over the slot's whole ``[zk, zv]`` row, so any two latent
  widths take the same path) and rotates the keys with cos/sin computed from the rotary module's
  ``inv_freq``: in PyTorch that is some twenty kernels a layer, each streaming every held token through
  memory. Elsewhere, and for RoPE types whose frequencies follow the positions asked for (transformers'
  dynamic ones), the PyTorch path (``decode``: gather, two ``baddbmm`` per autoencoder with the heads
  batched, the rotary module) runs; it is the kernel's reference. No fused decode-in-attention kernel yet.
- Latents are stored in the model's dtype (bfloat16 on GPU). ``budget`` is not used: the memory follows from
  ``latent / head_dim`` and the reuse, and is measured. The autoencoder weights are model weights, not
  cache, and are reported apart (``codec_nbytes``).
- Without an artifact the autoencoders are randomly initialised (seeded), with no reuse: for timing only.

Composition: ``--method snapkv+kvcar`` (any eviction method + this codec; ``kvbench.compose``) lets the
eviction method choose the tokens from the decoded cache and keeps their codes. It needs reuse off
(``-m reuse=false``): an eviction method scores every KV head of a layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench import artifact as artifacts
from kvbench.method import BudgetError, Method
from kvbench.kernels.decode_attention import use_triton
from kvbench.kernels.kvcar_decode import Rope, pack_decoders, rope_table
from kvbench.methods.kvcar.codec import FoldedAutoencoder, LayerCodec

NAME = "kvcar"
ROPE_KEYS = ("pre", "post")


def codecs_from_tensors(tensors: dict[str, torch.Tensor], n_layers: int, heads: int, head_dim: int, hidden: int,
                        latent: int, hidden_v: int, latent_v: int) -> torch.nn.ModuleDict:
    modules = torch.nn.ModuleDict({str(layer): LayerCodec(heads, head_dim, hidden, latent, hidden_v, latent_v)
                                   for layer in range(n_layers)})
    if tensors:
        modules.load_state_dict({k: v.float() for k, v in tensors.items()})
    return modules


def codecs_from_artifact(meta: dict, tensors: dict[str, torch.Tensor], n_layers: int, heads: int,
                         head_dim: int) -> torch.nn.ModuleDict:
    """An artifact's autoencoders (its widths from ``meta``; artifacts older than separate value widths use the
    keys' for both)."""
    return codecs_from_tensors(tensors, n_layers, heads, head_dim, meta["hidden"], meta["latent_dim"],
                               meta.get("hidden_v", meta["hidden"]), meta.get("latent_dim_v", meta["latent_dim"]))


def choose_reuse(similarity: list[list[float]], threshold: float | None) -> dict[int, dict[int, int]]:
    """Reused heads per layer: ``{layer: {head: owner layer}}``; a head at or above the threshold reads the
    previous layer's entries, resolved to the nearest earlier layer that stores the head."""
    out: dict[int, dict[int, int]] = {}
    if threshold is None:
        return out
    for layer in range(1, len(similarity)):
        for head, sim in enumerate(similarity[layer]):
            if sim is not None and sim >= threshold:
                owner = out.get(layer - 1, {}).get(head, layer - 1)
                out.setdefault(layer, {})[head] = owner
    return out


@dataclass
class KVCAR(Method):
    token_codec: ClassVar[bool] = True  # its stores offer ``decoded_view``: an eviction method may compose with it
    artifact_commands: ClassVar[dict[str, str]] = {"train": "kvbench.methods.kvcar.train:command"}
    uses_budget: ClassVar[bool] = False  # the latent widths set the memory

    artifact: str | None = None
    reuse: bool = True
    reuse_threshold: float | None = None  # re-choose the reused heads from the artifact's similarities
    latent_dim: int | None = None  # without an artifact only (random codec, for timing; values alike)
    hidden: int | None = None
    rope_keys: str = "pre"
    seed: int = 0

    def __post_init__(self):
        if self.rope_keys not in ROPE_KEYS:
            raise BudgetError(f"kvcar rope_keys '{self.rope_keys}' unknown; use pre or post")
        for name in ("latent_dim", "hidden"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise BudgetError(f"kvcar {name} must be a positive whole number, got {value!r}")
        self._meta = None
        if self.artifact is not None:
            self._meta = artifacts.read_meta(self.artifact, NAME, verify=True)  # fail before a model is loaded
            for name in ("latent_dim", "hidden"):
                if getattr(self, name) is not None and getattr(self, name) != self._meta[name]:
                    raise BudgetError(f"kvcar {name}={getattr(self, name)} but artifact {self.artifact} was trained "
                                      f"with {self._meta[name]}")
        self._prepared_for = None

    # ---- binding to a model ----
    def prepare(self, lm) -> None:
        key = (id(lm.model), artifacts.weights_fingerprint(lm.model))
        if self._prepared_for == key:
            return
        cfg = lm.model.config
        sig = artifacts.model_signature(cfg)
        n_layers, heads, head_dim = sig["num_hidden_layers"], sig["num_key_value_heads"], sig["head_dim"]
        if self.artifact is not None:
            meta, tensors = artifacts.load(self.artifact, NAME)
            artifacts.check_model(meta, lm, self.artifact)
            self.rope_keys_ = meta["rope_keys"]
            modules = codecs_from_artifact(meta, tensors, n_layers, heads, head_dim)
            threshold = self.reuse_threshold if self.reuse_threshold is not None else meta.get("reuse_threshold")
            reuse = choose_reuse(meta["similarity"], threshold) if self.reuse and meta.get("similarity") else {}
        else:
            latent = self.latent_dim or max(1, head_dim // 2)
            hidden = self.hidden or 2 * latent
            self.rope_keys_ = self.rope_keys
            torch.manual_seed(self.seed)
            modules = codecs_from_tensors({}, n_layers, heads, head_dim, hidden, latent, hidden, latent)
            reuse = {}
        self.bind(lm, modules.eval(), reuse)

    def bind(self, lm, modules: torch.nn.ModuleDict, reuse: dict[int, dict[int, int]]) -> None:
        """Use these (trained) codecs and reused heads for ``lm`` (the trainer evaluates through this too)."""
        from kvbench.cache import rope_inverse_factory
        param = next(lm.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.n_layers = lm.model.config.num_hidden_layers
        self.reuse_ = reuse
        first = modules["0"]
        self.latent_dim_, self.latent_v_ = first.k.latent, first.v.latent
        if (self.latent_dim_ + self.latent_v_) % 2:
            raise BudgetError(f"kvcar key and value latents {self.latent_dim_} + {self.latent_v_} must sum to an even "
                              "number (a slot holds both codes, half in each of the store's two tensors)")
        self.code_width_ = (self.latent_dim_ + self.latent_v_) // 2
        self.codecs = {int(layer): (mod.k.fold(self.dtype), mod.v.fold(self.dtype))
                       for layer, mod in modules.to(self.device).items()}
        self.rotary = lm.model.model.rotary_emb
        self.rope = rope_inverse_factory(self.rotary)
        self.max_positions = lm.model.config.max_position_embeddings
        self._rope_table: tuple = (None, None)  # (what it was made for, (cos, sin)): ``kernel_rope``
        # The decode kernel's layout of the decoders (kernels/kvcar_decode.py). Not for a RoPE whose frequencies
        # follow the positions asked for (transformers' dynamic types): the rotary module itself rotates those.
        rope_type = getattr(self.rotary, "rope_type", "default")
        dynamic = self.rope_keys_ == "pre" and ("dynamic" in rope_type or rope_type == "longrope")
        self.decoders = {} if dynamic else {layer: pack_decoders(ck.decoder(), cv.decoder())
                                            for layer, (ck, cv) in self.codecs.items()}
        self._building: dict[int, object] = {}
        self._head_lists: dict[tuple, torch.Tensor] = {}
        self._prepared_for = (id(lm.model), artifacts.weights_fingerprint(lm.model))
        if self.decoders and use_triton(param):  # where the kernel reads: its table now, so the bytes
            self.kernel_rope()                       # counted do not change at the first decode

    def own_heads(self, layer: int) -> list[int]:
        heads = self.codecs[layer][0].w1.shape[0]
        return [h for h in range(heads) if h not in self.reuse_.get(layer, {})]

    def head_list(self, heads: list[int], device) -> torch.Tensor:
        """Head numbers as an int64 device tensor, made once: a decoding step captured as a CUDA graph must not
        copy from the host. Held here, with the decoders: a few bytes a layer, the same for every cache."""
        key = (tuple(heads), torch.device(device))
        if key not in self._head_lists:
            self._head_lists[key] = torch.tensor(heads, dtype=torch.int64, device=device)
        return self._head_lists[key]

    def codec_nbytes(self) -> int:
        """Bytes of the autoencoders' weights and of the decode kernel's padded copy of the decoders (model
        weights, held once, not per sequence)."""
        packed = sum(t.numel() * t.element_size() for dec in self.decoders.values()
                     for t in (dec.w3, dec.b3, dec.w4, dec.b4))
        packed += sum(t.numel() * t.element_size() for t in (self._rope_table[1] or ()))
        return packed + sum(k.nbytes() + v.nbytes() for k, v in self.codecs.values())

    def kernel_rope(self) -> Rope | None:
        """What the decode kernel rotates keys with (None for keys coded after RoPE): the rotary module's
        ``inv_freq`` and ``attention_scaling`` (read at each call: moving the model replaces the buffer) and
        their cos and sin for the model's position range, made once for that buffer (``codec_nbytes`` counts
        them)."""
        if self.rope_keys_ != "pre":
            return None
        inv_freq, scale = self.rotary.inv_freq, float(getattr(self.rotary, "attention_scaling", 1.0))
        made_for = (inv_freq.data_ptr(), inv_freq.device, scale)
        if self._rope_table[0] != made_for:
            self._rope_table = made_for, rope_table(inv_freq, scale, self.max_positions, self.dtype)
        return Rope(inv_freq, scale, *self._rope_table[1])

    # ---- coding ----
    def encode(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, heads: torch.Tensor):
        """k, v [B, n, T, d] (keys post-RoPE) of heads ``heads`` -> latents [B, n, T, latent]."""
        if self.rope_keys_ == "pre":
            k = self.rope(k, pos, inverse=True)
        ck, cv = self.codecs[layer]
        B, n, T, d = k.shape

        def code(ae: FoldedAutoencoder, x):
            z = ae.encode(x.transpose(0, 1).reshape(n, B * T, d), heads)
            return z.reshape(n, B, T, -1).transpose(0, 1)

        zk, zv = code(ck, k), code(cv, v)
        if self.latent_v_ == self.latent_dim_:
            return zk, zv
        z = torch.cat([zk, zv], dim=-1)  # other widths: the slot's two tensors hold halves of [zk, zv]
        return z[..., : self.code_width_], z[..., self.code_width_:]

    def decode(self, layer: int, zk: torch.Tensor, zv: torch.Tensor, pos: torch.Tensor, heads: torch.Tensor):
        """Latents [n, N, latent] of heads ``heads`` at positions ``pos [n, N]`` -> keys (post-RoPE) and values
        [n, N, d]."""
        ck, cv = self.codecs[layer]
        if self.latent_v_ != self.latent_dim_:
            z = torch.cat([zk, zv], dim=-1)
            zk, zv = z[..., : self.latent_dim_], z[..., self.latent_dim_:]
        k, v = ck.decode(zk, heads), cv.decode(zv, heads)
        if self.rope_keys_ == "pre":
            n, N, d = k.shape
            k = self.rope(k.reshape(1, 1, n * N, d), pos.reshape(1, n * N).long()).reshape(n, N, d)
        return k, v

    # ---- the cache hooks ----
    def new_store(self, layer: int, batch: int, heads: int, head_dim: int, dtype, device):
        from kvbench.methods.kvcar.store import KVCARStore
        if self._prepared_for is None:
            raise RuntimeError("KVCAR.prepare(lm) must run before caches are made (the Engine calls it)")
        if layer == 0:  # a new cache: its stores are made in layer order
            self._building = {}
        sources = {h: self._building[owner] for h, owner in self.reuse_.get(layer, {}).items()}
        store = KVCARStore(self, layer, batch, heads, head_dim, dtype, device, sources)
        self._building[layer] = store
        if layer == self.n_layers - 1:
            self._building = {}
        return store
