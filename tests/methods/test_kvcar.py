"""KV-CAR: autoencoders, folded BatchNorm, the latent store, reuse pointers, artifacts, and composition."""
from __future__ import annotations

import pytest
import torch
from tests.conftest import prompt, sample, tiny

from kvbench import artifact, registry
from kvbench.cache import KVCache
from kvbench.methods.kvcar import KVCAR, LayerCodec, choose_reuse
from kvbench.methods.kvcar.codec import HeadAutoencoder, make_identity, pca_init_
from kvbench.engine import Engine


def save_codec(lm, path, hidden=None, latent=None, identity=False, similarity=None, threshold=0.9,
               rope_keys="pre", seed=0):
    cfg = lm.model.config
    heads, d = cfg.num_key_value_heads, cfg.head_dim
    hidden, latent = (2 * d, d) if identity else (hidden or d, latent or d // 2)
    torch.manual_seed(seed)
    codecs = torch.nn.ModuleDict({str(i): LayerCodec(heads, d, hidden, latent) for i in range(cfg.num_hidden_layers)})
    if identity:
        for mod in codecs.values():
            make_identity(mod.k)
            make_identity(mod.v)
    sim = similarity or [[None] * heads] + [[0.0] * heads for _ in range(cfg.num_hidden_layers - 1)]
    meta = {"latent_dim": latent, "hidden": hidden, "rope_keys": rope_keys, "head_dim": d,
            "reuse_threshold": threshold, "similarity": sim}
    return artifact.save(path, "kvcar", artifact.model_identity(lm), meta, codecs.state_dict())


def samples():
    return [sample(prompt(40 + 13 * i, i), prompt(5, 50 + i), new=10, sid=str(i)) for i in range(2)]


def random_codecs(lm, seed: int, **widths) -> torch.nn.ModuleDict:
    """Untrained codecs for every layer of ``lm`` (hidden = head_dim, key latent head_dim / 2; ``widths``: the
    values'), their BatchNorm statistics moved away from (0, 1) so folding them is exercised; in eval mode."""
    cfg = lm.model.config
    H, d = cfg.num_key_value_heads, cfg.head_dim
    torch.manual_seed(seed)
    codecs = torch.nn.ModuleDict({str(i): LayerCodec(H, d, d, d // 2, **widths) for i in range(cfg.num_hidden_layers)})
    for mod in codecs.values():
        for ae in (mod.k, mod.v):
            ae(torch.randn(H, 64, d) * 2)
    return codecs.eval()


def test_autoencoder_shapes_and_identity_round_trip():
    ae = HeadAutoencoder(3, 16, 24, 6)
    x = torch.randn(3, 50, 16)
    assert ae.encode(x).shape == (3, 50, 6) and ae(x).shape == x.shape
    folded = ae.eval().fold()
    assert folded.encode(x).shape == (3, 50, 6) and folded.decode(folded.encode(x)).shape == x.shape
    assert folded.encode(x[1:2], torch.tensor([1])).shape == (1, 50, 6)
    ident = make_identity(HeadAutoencoder(3, 16, 32, 16)).eval()
    torch.testing.assert_close(ident(x), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ident.fold().decode(ident.fold().encode(x)), x, atol=1e-5, rtol=1e-5)


def test_folded_batchnorm_equals_unfolded():
    torch.manual_seed(0)
    ae = HeadAutoencoder(2, 16, 20, 8)
    for _ in range(5):  # running statistics away from (0, 1)
        ae(torch.randn(2, 64, 16) * 3 + 1)
    with torch.no_grad():
        for bn in (ae.enc_bn, ae.dec_bn):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1, 1)
    ae.eval()
    x = torch.randn(2, 40, 16)
    folded = ae.fold()
    torch.testing.assert_close(folded.encode(x), ae.encode(x), atol=1e-5, rtol=1e-5)
    z = torch.randn(2, 40, 8)
    torch.testing.assert_close(folded.decode(z), ae.decode(z), atol=1e-5, rtol=1e-5)
    # a single head picked out of the stack computes that head's codec
    torch.testing.assert_close(folded.decode(z[1:], torch.tensor([1])), ae.decode(z)[1:], atol=1e-5, rtol=1e-5)


def test_pca_start_is_the_best_affine_code():
    torch.manual_seed(0)
    x = torch.randn(2, 400, 16) @ torch.randn(16, 16) + torch.randn(16) * 3
    x[..., 8:] *= 0.01  # eight directions carry (nearly) everything
    ae = pca_init_(HeadAutoencoder(2, 16, 16, 8), x)
    for mode in (ae.eval, ae.train):
        mode()
        assert ((ae(x) - x) ** 2).mean() < 1e-3 * (x ** 2).mean()
    folded = ae.eval().fold()
    torch.testing.assert_close(folded.decode(folded.encode(x)), ae(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="hidden = 2"):
        pca_init_(HeadAutoencoder(2, 16, 20, 8), x)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("rope_keys", ["pre", "post"])
def test_identity_codec_reproduces_full(tmp_path, family, rope_keys):
    lm = tiny(family)
    path = save_codec(lm, tmp_path / "c", identity=True, rope_keys=rope_keys)
    full = Engine(lm, registry.build_method("full", 1.0)).generate(samples())
    eng = Engine(lm, registry.build_method("kvcar", 1.0, {"artifact": str(path)}))
    got = eng.generate(samples())
    assert [r["prediction"] for r in got] == [r["prediction"] for r in full]
    chunked = Engine(lm, registry.build_method("kvcar", 1.0, {"artifact": str(path)}), prefill_chunk=37,
                     protocol="query-aware").generate(samples())
    assert [r["prediction"] for r in chunked] == [r["prediction"] for r in full]
    _, want, _ = Engine(lm, registry.build_method("full", 1.0)).prefill(samples()[1])
    cache, ours, _ = eng.prefill(samples()[1])
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)
    assert all(isinstance(s, type(cache.stores[0])) for s in cache.stores)


def test_latent_store_bytes_are_the_codes(tmp_path):
    lm = tiny("llama")
    d = lm.model.config.head_dim
    path = save_codec(lm, tmp_path / "c", latent=d // 4)
    eng = Engine(lm, registry.build_method("kvcar", 1.0, {"artifact": str(path)}))
    cache, _, info = eng.prefill(samples()[0])
    store = cache.stores[0]
    assert store.codes.k.shape[1] == d // 4
    slots = int(store.codes.capacity.sum())
    perm, first = store._gather_index()  # kept with the codes' layout since the question's tokens read them
    assert perm.dtype == torch.int32 and perm.numel() == slots and first.numel() == store.codes.start.numel()
    # a slot: its float32 key and value codes, its position, its gather-index entry; a segment: start, length,
    # capacity and where it starts in its head's gathered row
    assert store.nbytes() == slots * (2 * (d // 4) * 4 + 4 + 4) + 4 * 8 * store.codes.start.numel()
    full = Engine(lm, registry.build_method("full", 1.0)).prefill(samples()[0])[2]
    assert info["kv_bytes_prefill"] < 0.35 * full["kv_bytes_prefill"]


def test_no_reuse_below_threshold_and_reused_heads_point_at_their_owner(tmp_path):
    lm = tiny("llama")
    cfg = lm.model.config
    L, H = cfg.num_hidden_layers, cfg.num_key_value_heads
    sim = [[None] * H] + [[0.5] * H for _ in range(L - 1)]
    assert choose_reuse(sim, 0.9) == {} and choose_reuse(sim, None) == {}
    sim[1][0] = 0.95
    assert choose_reuse(sim, 0.9) == {1: {0: 0}}
    # a threshold above every similarity shares nothing: the identity codec reproduces full
    path = save_codec(lm, tmp_path / "c", identity=True, similarity=sim, threshold=0.99)
    full = Engine(lm, registry.build_method("full", 1.0)).generate(samples())
    got = Engine(lm, registry.build_method("kvcar", 1.0, {"artifact": str(path)})).generate(samples())
    assert [r["prediction"] for r in got] == [r["prediction"] for r in full]
    # at 0.9 layer 1 head 0 stores nothing and reads layer 0's head 0
    eng = Engine(lm, registry.build_method("kvcar", 1.0, {"artifact": str(path), "reuse_threshold": 0.9}))
    caches = [eng.prefill(s)[0] for s in samples()]
    one = caches[0]
    s0, s1 = one.stores[0], one.stores[1]
    assert s1.own == list(range(1, H)) and s1.sources[0] is s0
    assert s1.nbytes() < s0.nbytes()
    k1, _, start1, len1 = s1.decoded()
    k0, _, start0, len0 = s0.decoded()
    n = int(len1[0])
    assert n == int(len0[0]) > 0
    torch.testing.assert_close(k1[start1[0]: start1[0] + n], k0[start0[0]: start0[0] + n])
    assert torch.equal(s1.token_counts(), s0.token_counts())
    joined = KVCache.concat(caches)
    assert joined.stores[1].sources[0] is joined.stores[0] and joined.stores[1].B == 2
    twin = joined.clone()
    assert twin.stores[1].sources[0] is twin.stores[0]
    # reuse off: every head stores its own codes
    off = Engine(lm, registry.build_method("kvcar", 1.0, {"artifact": str(path), "reuse_threshold": 0.9,
                                                          "reuse": False})).prefill(samples()[0])[0]
    assert off.stores[1].own == list(range(H)) and not off.stores[1].sources


def with_identical_layers(lm):
    """``lm`` with every layer computing layer 0's keys and values: the layers before the last leave the residual
    stream unchanged, and every layer has layer 0's key, value and norm weights."""
    layers = lm.model.model.layers
    with torch.no_grad():
        for layer in layers[:-1]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        for layer in layers[1:]:
            for name in ("k_proj", "v_proj"):
                getattr(layer.self_attn, name).weight.copy_(getattr(layers[0].self_attn, name).weight)
            layer.input_layernorm.weight.copy_(layers[0].input_layernorm.weight)
    return lm


def test_heads_equal_to_the_layer_before_are_found_and_reused_exactly(tmp_path):
    """Reuse end to end against full: a model whose layer 1 computes the same keys and values as layer 0 (layer 0
    leaves the residual stream unchanged and layer 1 has its key, value and norm weights). The calibration finds
    every head of layer 1 at similarity 1, a zero threshold reuses them all, and with an identity codec the
    generation is full's: layer 1 attends over layer 0's store through the pointers (a head read from the wrong
    owner, head or position would change it)."""
    from kvbench.cache import rope_inverse_factory
    from kvbench.methods.kvcar.train import similarity
    lm = with_identical_layers(tiny("llama"))
    H = lm.model.config.num_key_value_heads
    ids = torch.tensor([prompt(48, 3), prompt(48, 4)])
    sim = similarity(lm.model, ids, rope_inverse_factory(lm.model.model.rotary_emb), 2)
    assert sim[0] == [None] * H and all(abs(x - 1.0) < 1e-5 for x in sim[1]), sim
    path = save_codec(lm, tmp_path / "c", identity=True, similarity=sim, threshold=0.0)
    eng = Engine(lm, registry.build_method("kvcar", 1.0, {"artifact": str(path)}))
    cache, ours, _ = eng.prefill(samples()[1])
    assert cache.stores[1].own == [] and all(src is cache.stores[0] for src in cache.stores[1].sources.values())
    assert cache.stores[1].nbytes() == 8 * H == int(cache.stores[1].seq_nbytes().sum())  # what it has seen of each
    _, want, _ = Engine(lm, registry.build_method("full", 1.0)).prefill(samples()[1])
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)
    chunked = Engine(lm, registry.build_method("kvcar", 1.0, {"artifact": str(path)}), prefill_chunk=16)
    torch.testing.assert_close(chunked.prefill(samples()[1])[1], want, atol=1e-4, rtol=1e-4)
    full = Engine(lm, registry.build_method("full", 1.0)).generate(samples())
    assert [r["prediction"] for r in eng.generate(samples())] == [r["prediction"] for r in full]


def test_mixed_and_chained_reuse_reproduces_full(tmp_path, monkeypatch):
    """Three layers computing the same keys and values: layer 1 reuses head 0 from layer 0 and keeps head 1, layer 2
    keeps nothing (head 0 through layer 1 back to layer 0, head 1 from layer 1). With an identity codec that is
    full's attention in every layer, whole, in chunks, batched, and in a clone of the cache."""
    from kvbench import models
    monkeypatch.setitem(models.PRESETS, "tiny-llama", {**models.PRESETS["tiny-llama"], "num_hidden_layers": 3})
    lm = with_identical_layers(tiny("llama"))
    sim = [[None, None], [1.0, 0.0], [1.0, 1.0]]
    assert choose_reuse(sim, 0.5) == {1: {0: 0}, 2: {0: 0, 1: 1}}
    path = save_codec(lm, tmp_path / "c", identity=True, similarity=sim, threshold=0.5)
    method = registry.build_method("kvcar", 1.0, {"artifact": str(path)})
    _, want, _ = Engine(lm, registry.build_method("full", 1.0)).prefill(samples()[1])
    for chunk in (None, 7, 16):
        cache, ours, _ = Engine(lm, method, prefill_chunk=chunk).prefill(samples()[1])
        torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)
    first, second, third = cache.stores
    assert second.own == [1] and third.own == [] and third.sources == {0: first, 1: second}
    twin = cache.clone()
    assert twin.stores[2].sources == {0: twin.stores[0], 1: twin.stores[1]}
    assert torch.equal(twin.token_counts(), cache.token_counts())
    full = Engine(lm, registry.build_method("full", 1.0)).generate(samples())
    assert [r["prediction"] for r in Engine(lm, method).generate(samples())] == [r["prediction"] for r in full]


def test_decoding_with_reuse_runs_batched(tmp_path):
    lm = tiny("qwen2")
    cfg = lm.model.config
    H = cfg.num_key_value_heads
    sim = [[None] * H] + [[0.95] + [0.1] * (H - 1) for _ in range(cfg.num_hidden_layers - 1)]
    path = save_codec(lm, tmp_path / "c", similarity=sim, threshold=0.9)
    got = Engine(lm, registry.build_method("kvcar", 1.0, {"artifact": str(path)})).generate(samples())
    assert all(r["new_tokens"] == 10 for r in got)


@pytest.mark.parametrize("rope_keys,latent_v", [("pre", None), ("post", None), ("pre", 12)])
def test_decoding_reads_what_training_trains(rope_keys, latent_v):
    """Token by token, every key and value the model attends to is decoded from the store: the logits are
    those of the trainer's reconstructed forward pass (folded vs unfolded BatchNorm, RoPE, reuse)."""
    from kvbench.cache import rope_inverse_factory
    from kvbench.methods.kvcar.train import Reconstructed
    lm = tiny("llama")
    cfg = lm.model.config
    d = cfg.head_dim
    codecs = random_codecs(lm, seed=0, latent_v=latent_v)
    reuse = {1: {0: 0}}
    method = KVCAR(rope_keys=rope_keys)
    method.rope_keys_ = rope_keys
    method.bind(lm, codecs, reuse)
    assert method.code_width_ == (d // 2 + (latent_v or d // 2)) // 2
    eng = Engine(lm, method)
    x = torch.tensor([prompt(24, 7)])
    cache = eng.new_cache(1)
    got = [eng.forward(cache, x[:, t: t + 1], compress=False) for t in range(x.shape[1])]
    positions = torch.arange(x.shape[1])[None]
    attn = Reconstructed(codecs, reuse, rope_inverse_factory(lm.model.model.rotary_emb), positions,
                         rope_keys == "pre")
    with torch.no_grad():
        want = lm.model(input_ids=x, position_ids=positions, use_cache=False, kvbench_cache=attn).logits
    torch.testing.assert_close(torch.cat(got, dim=1), want, atol=2e-4, rtol=2e-4)
    assert cache.stores[1].sources[0] is cache.stores[0]


def test_generation_is_the_same_through_the_decode_kernel(monkeypatch):
    """The store decodes with the Triton kernel (``kernels/kvcar_decode.py``) or with PyTorch: the same tokens,
    and token by token the same logits. Other value widths, reuse (layer 1's rows are heads 1.. only) and
    pre-RoPE keys all go through it."""
    import kvbench.methods.kvcar.store as store_module
    monkeypatch.setenv("KVBENCH_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the tiny model is on the CPU
    lm = tiny("llama")
    codecs = random_codecs(lm, seed=2, hidden_v=24, latent_v=12)
    method = KVCAR()
    method.rope_keys_ = "pre"
    method.bind(lm, codecs, {1: {0: 0}})
    x = torch.tensor([prompt(16, 7)])

    def run():
        eng = Engine(lm, method)
        cache = eng.new_cache(1)
        logits = [eng.forward(cache, x[:, t: t + 1], compress=False) for t in range(x.shape[1])]
        return eng.generate(samples()), torch.cat(logits, dim=1)

    calls = []
    real = store_module.kvcar_decode
    monkeypatch.setattr(store_module, "kvcar_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    kernel, kernel_logits = run()
    assert calls, "the kernel did not run"
    monkeypatch.setattr(store_module, "use_triton", lambda x: False)
    reference, reference_logits = run()
    assert [r["prediction"] for r in kernel] == [r["prediction"] for r in reference]
    assert all(r["new_tokens"] == 10 for r in kernel)
    torch.testing.assert_close(kernel_logits, reference_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk", [None, 16])
def test_teacher_forced_continuation_reads_decoded_past_and_exact_chunk(chunk):
    """The fidelity task's path (``continuation_logprobs``): every chunk fed (context chunks, then the
    continuation as one chunk) attends exactly to its own keys and values and to the decoded codes of
    everything before it. Written out as a reference forward pass with the trainer's (unfolded) autoencoders:
    the cache path must give the same log-probabilities. (Training's reference decodes every key and value,
    as the token-by-token path does: ``test_decoding_reads_what_training_trains``.)"""
    import torch.nn.functional as F

    from kvbench.cache import rope_inverse_factory
    from kvbench.methods.kvcar.train import head_major
    from kvbench.task import Sample
    lm = tiny("qwen2")
    cfg = lm.model.config
    d = cfg.head_dim
    codecs = random_codecs(lm, seed=1, latent_v=d // 4 * 3)
    method = KVCAR()
    method.rope_keys_ = "pre"
    method.bind(lm, codecs, {})
    ctx, cont = prompt(40, 3), prompt(12, 4)
    got, _ = Engine(lm, method, prefill_chunk=chunk).continuation_logprobs(
        Sample("s", ctx, [], [], 0, continuation_ids=cont))
    rope = rope_inverse_factory(lm.model.model.rotary_emb)
    ids = torch.tensor([ctx + cont])
    T = ids.shape[1]
    positions = torch.arange(T)[None]
    step = chunk or len(ctx)
    chunk_of = torch.tensor([min(t // step, len(ctx) // step) if t < len(ctx) else 10 ** 6 for t in range(T)])

    class ExactChunkDecodedPast:
        def attention(self, layer, q, k, v, scale):
            codec = codecs[str(layer)]
            k_hat = rope(head_major(codec.k, rope(k, positions, inverse=True)), positions)
            v_hat = head_major(codec.v, v)
            same = chunk_of[:, None] == chunk_of[None, :]
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            # one softmax over the exact keys of the query's own chunk and the decoded keys of earlier ones
            mask = torch.cat([same & causal, ~same & causal], dim=1)
            return F.scaled_dot_product_attention(q, torch.cat([k, k_hat], 2), torch.cat([v, v_hat], 2),
                                                  attn_mask=mask, scale=scale, enable_gqa=True)

    with torch.no_grad():
        logits = lm.model(input_ids=ids, position_ids=positions, use_cache=False,
                          kvbench_cache=ExactChunkDecodedPast()).logits
    want = F.log_softmax(logits[0, len(ctx) - 1: -1].float(), -1)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_artifact_refused_for_another_model(tmp_path):
    path = save_codec(tiny("llama"), tmp_path / "c")
    with pytest.raises(artifact.ArtifactError, match="was made for tiny-llama"):
        Engine(tiny("llama", seed=1), registry.build_method("kvcar", 1.0, {"artifact": str(path)}))
    with pytest.raises(artifact.ArtifactError, match="no kvcar artifact"):
        registry.build_method("kvcar", 1.0, {"artifact": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="latent_dim=3 but artifact"):
        registry.build_method("kvcar", 1.0, {"artifact": str(path), "latent_dim": 3})
    tensors = next(p for p in path.iterdir() if p.suffix == ".safetensors")
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 1  # one bit of a weight changed: refused when the method is built, before any model is loaded
    tensors.write_bytes(bytes(data))
    with pytest.raises(artifact.ArtifactError, match="does not match the checksum"):
        registry.build_method("kvcar", 1.0, {"artifact": str(path)})


def test_composition_evicts_and_codes(tmp_path):
    lm = tiny("llama")
    ident = save_codec(lm, tmp_path / "ident", identity=True)
    alone = Engine(lm, registry.build_method("snapkv", 0.5, {"window": 8})).generate(samples())
    method = registry.build_method("snapkv+kvcar", 0.5, {"window": 8, "artifact": str(ident)})
    assert method.evict.window == 8 and method.codec.artifact == str(ident) and method.budget == 0.5
    both = Engine(lm, method).generate(samples())
    assert [r["prediction"] for r in both] == [r["prediction"] for r in alone]
    small = save_codec(lm, tmp_path / "small", latent=lm.model.config.head_dim // 4)
    eng = Engine(lm, registry.build_method("snapkv+kvcar", 0.5, {"window": 8, "artifact": str(small)}))
    cache, _, info = eng.prefill(samples()[1])
    snap_cache, _, snap = Engine(lm, registry.build_method("snapkv", 0.5, {"window": 8})).prefill(samples()[1])
    assert torch.equal(cache.token_counts(), snap_cache.token_counts())
    assert info["kv_bytes_compressed"] < 0.4 * snap["kv_bytes_compressed"]
    # decode-time eviction runs on the decoded view too
    h2o = Engine(lm, registry.build_method("h2o+kvcar", 0.5, {"evict_during_decoding": True,
                                                              "artifact": str(small)})).generate(samples())
    assert all(r["new_tokens"] == 10 for r in h2o)


@pytest.mark.parametrize("evictor,params", [("h2o", {"evict_during_decoding": True}), ("tova", {}),
                                            ("streamingllm", {}), ("adakv", {}), ("pyramidkv", {})])
def test_any_evictor_with_an_identity_codec_is_the_evictor_alone(tmp_path, evictor, params):
    """The composition keeps what the evictor keeps, through prefill and decoding-time eviction alike (H2O, TOVA and
    StreamingLLM evict every step, AdaKV and PyramidKV give heads and layers different budgets): with a codec
    that decodes exactly, the tokens are the evictor's own."""
    lm = tiny("llama")
    ident = save_codec(lm, tmp_path / "ident", identity=True)
    alone = Engine(lm, registry.build_method(evictor, 0.5, params)).generate(samples())
    both = Engine(lm, registry.build_method(f"{evictor}+kvcar", 0.5, {**params, "artifact": str(ident)})).generate(samples())
    assert [r["prediction"] for r in both] == [r["prediction"] for r in alone]


def test_composition_refuses_what_does_not_compose():
    with pytest.raises(ValueError, match="not a per-token codec"):
        registry.build_method("snapkv+snapkv", 0.5)
    with pytest.raises(ValueError, match="only an eviction method"):
        registry.build_method("kvcar+kvcar", 0.5)
    with pytest.raises(registry.UnknownNameError, match="neither snapkv nor kvcar has a parameter 'nope'"):
        registry.build_method("snapkv+kvcar", 0.5, {"nope": 1})
    with pytest.raises(registry.UnknownNameError, match="compose exactly two"):
        registry.build_method("snapkv+kvcar+kvcar", 0.5)
    assert registry.build_method("snapkv+kvcar", 0.5, {"kvcar.seed": 3}).codec.seed == 3


def test_reserved_decoding_moves_no_codes(tmp_path):
    """What a CUDA-graph replay of the decoding step needs: after ``reserve`` nothing is relaid out."""
    lm = tiny("llama")
    eng = Engine(lm, registry.build_method("kvcar", 1.0, {"artifact": str(save_codec(lm, tmp_path / "c"))}))
    assert eng.method.static_decode() and eng.method.decode_epoch(None) == ()
    cache, first, _ = eng.prefill(sample(prompt(60, 3), []))
    cache.reserve(12)
    moved = [s.codes.k.data_ptr() for s in cache.stores]
    layouts = [s._gather_index()[0].data_ptr() for s in cache.stores]
    eng.decode(cache, first, [12], [False])
    assert [s.codes.k.data_ptr() for s in cache.stores] == moved
    assert [s._gather_index()[0].data_ptr() for s in cache.stores] == layouts
    assert (cache.token_counts() == 60 + 11).all()


def test_train_command_checks_its_options_first(tmp_path):
    from click.testing import CliRunner

    from kvbench.cli import main
    out = CliRunner().invoke(main, ["train", "kvcar", "--model", "smollm2-135m", "--data", str(tmp_path),
                                    "--out", str(tmp_path / "a"), "--reuse-threshold", "high"])
    assert out.exit_code == 2 and "--reuse-threshold takes a number or 'none'" in out.output


def test_the_diagnosis_reads_the_answer_as_a_run_does():
    """``scripts/kvcar_diagnose.py`` models a run in one forward pass: the prompt attended exactly, the answer's
    tokens over the coded past. Its logits must be those of the engine prefilling the prompt, then decoding the
    answer token by token from the store."""
    import importlib.util
    from pathlib import Path

    from kvbench.cache import rope_inverse_factory
    path = Path(__file__).resolve().parents[2] / "scripts" / "kvcar_diagnose.py"
    spec = importlib.util.spec_from_file_location("kvcar_diagnose", path)
    diagnose = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diagnose)
    lm = tiny("llama")
    codecs = random_codecs(lm, seed=0)
    method = KVCAR()
    method.rope_keys_ = "pre"
    method.bind(lm, codecs, {})
    eng = Engine(lm, method)
    x, P = torch.tensor([prompt(24, 7)]), 16
    cache = eng.new_cache(1)
    got = [eng.forward(cache, x[:, :P], compress=False)]
    got += [eng.forward(cache, x[:, t: t + 1], compress=False) for t in range(P, x.shape[1])]
    positions = torch.arange(x.shape[1])[None]
    rope = rope_inverse_factory(lm.model.model.rotary_emb)
    with torch.no_grad():
        want = lm.model(input_ids=x, position_ids=positions, use_cache=False, kvbench_cache=
                        diagnose.PrefillExactAnswerCoded(codecs, rope, positions, P, True, True)).logits[:, P - 1:]
        exact = lm.model(input_ids=x, position_ids=positions, use_cache=False, kvbench_cache=
                         diagnose.PrefillExactAnswerCoded(codecs, rope, positions, P, False, False)).logits[:, P - 1:]
    torch.testing.assert_close(torch.cat(got, dim=1), want, atol=2e-4, rtol=2e-4)
    assert (want[:, 1:] - exact[:, 1:]).abs().max() > 1e-2  # the codec does change what the answer reads
