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
  position's row (reference or latent) follows from arithmetic. The official runtime instead restarts the
  phase at each evicted block (``range(evict_start, evict_end, s)``), so when ``W`` is not a multiple of
  ``s`` (the defaults 128 and 10) its references after the first block sit at other positions than these
  (``ceil(W / s)`` a block there, about ``W / s`` here); with ``W % s == 0`` the two coincide.
- References are read back exactly (their stored pre-RoPE vector, re-rotated). The official less-memory
  runtime also stores a latent for each reference and reconstructs a selected reference from it, keeping
  the raw vector only as a neighbour for later tokens; here the exact vector serves both.
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

Files: ``codec.py`` (the compressor, the reference arithmetic, checkpoint files), ``store.py`` (the layer store),
``method.py`` (the method), ``train.py`` (``kvbench train deltakv``).
"""
from kvbench.methods.deltakv.method import DeltaKV

__all__ = ["DeltaKV"]
