"""DeltaKV on tiny random models (CPU): references, reconstruction, flushes, checkpoints, kernel, errors."""
from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from kvbench import registry
from kvbench.cache import rope_inverse_factory
from kvbench.cli import main
from kvbench.kernels.deltakv_reconstruct import (dequantize_latents, quantize_latents, reconstruct_reference,
                                                 reconstruct_triton)
from kvbench.methods.deltakv.codec import (build_compressors, load_checkpoint, model_fingerprint, model_signature,
                                          save_checkpoint)
from kvbench.methods.deltakv.store import DeltaKVStore
from kvbench.models import ModelError
from kvbench.engine import Engine
from kvbench.io import roff_to_text
from kvbench.methods.deltakv.train import reconstruct_training
from tests.conftest import prompt, sample, tiny

SMALL = {"window": 8, "sinks": 4, "stride": 3, "neighbors": 2, "random_init": True}


def deltakv(lm, **params):
    method = registry.build_method("deltakv", 1.0, {**SMALL, **params})
    Engine(lm, method)  # prepares the method for the model
    return method


def make_identity(method) -> None:
    """r = D, linear down and up both the identity: reconstruction is exact."""
    for module in method.modules.values():
        module.down.weight.data = torch.eye(module.down.weight.shape[0])
        module.up.weight.data = torch.eye(module.up.weight.shape[0])
    method._up = {layer: module.up.weight.contiguous() for layer, module in method.modules.items()}


def feed_store(method, lm, n: int, seed: int = 0):
    """A compressed layer's store fed n random tokens in one chunk, flushed; with the raw keys/values."""
    H, hd = lm.model.config.num_key_value_heads, lm.model.config.head_dim
    g = torch.Generator().manual_seed(seed)
    k_pre = torch.randn(1, H, n, hd, generator=g)
    v = torch.randn(1, H, n, hd, generator=g)
    rope = rope_inverse_factory(lm.model.model.rotary_emb)
    pos = torch.arange(n)[None]
    store = DeltaKVStore(method, 1, 1, H, hd, torch.float32, "cpu")
    store.append(rope(k_pre, pos), v, pos)
    store.flush(rope, decoding=False)
    return store, k_pre, v, rope


def test_references_and_reconstruction_match_a_slow_loop():
    lm = tiny("llama")
    m = deltakv(lm, latent_dim=16, intermediate=24, latent_dtype="float32")
    n = 61
    store, k_pre, v, rope = feed_store(m, lm, n)
    H, hd = k_pre.shape[1], k_pre.shape[3]
    x = torch.cat([k_pre[0].transpose(0, 1).reshape(n, H * hd), v[0].transpose(0, 1).reshape(n, H * hd)], 1)
    n_comp = store.n_comp[0]
    assert n_comp == 4 + 48  # window 57 -> 6 blocks of 8 leave 9 (in [W, 2W))
    refs_at = [p for p in range(n_comp) if p < 4 or (p - 4) % 3 == 0]
    torch.testing.assert_close(store.refs.rows(0, "x"), x[refs_at], rtol=1e-5, atol=1e-5)
    comp = m.compressor_for(1)
    latents = [p for p in range(n_comp) if p not in refs_at]
    expected_k = torch.empty(n_comp, H, hd)
    expected_v = torch.empty(n_comp, H, hd)
    for i, p in enumerate(latents):
        earlier = [q for q in refs_at if q < p]
        dist = [float(((x[p] - x[q]) ** 2).sum()) for q in earlier]
        nearest = sorted(range(len(earlier)), key=lambda j: dist[j])[:2]
        assert sorted(store.latents.rows(0, "nbr")[i].tolist()) == sorted(nearest)
        mean = x[[earlier[j] for j in nearest]].mean(0)
        z = comp.down(x[p]) - comp.down(mean)
        torch.testing.assert_close(store.latents.rows(0, "z")[i], z, rtol=1e-4, atol=1e-5)
        x_hat = comp.up(z) + mean
        expected_k[p], expected_v[p] = x_hat[: H * hd].view(H, hd), x_hat[H * hd:].view(H, hd)
    for p in refs_at:
        expected_k[p], expected_v[p] = x[p, : H * hd].view(H, hd), x[p, H * hd:].view(H, hd)
    expected_k = rope(expected_k.transpose(0, 1)[None], torch.arange(n_comp)[None])[0]  # [H, n, hd]
    k_buf, v_buf = store.materialize(store.full_plan())
    torch.testing.assert_close(k_buf.view(H, n_comp, hd), expected_k, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v_buf.view(H, n_comp, hd), expected_v.transpose(0, 1), rtol=1e-4, atol=1e-4)


def test_training_reconstruction_is_the_inference_one():
    lm = tiny("llama")
    m = deltakv(lm, latent_dim=16, intermediate=24, latent_dtype="float32")
    n = 61
    store, k_pre, v, _ = feed_store(m, lm, n, seed=3)
    x = torch.cat([k_pre[0].transpose(0, 1).reshape(n, -1), v[0].transpose(0, 1).reshape(n, -1)], 1)
    x_hat, _ = reconstruct_training(x[None], m.compressor_for(1), 4, 3, 2)
    n_comp = store.n_comp[0]
    plan = store.full_plan()
    lat = store.latents.t
    H, hd = k_pre.shape[1], k_pre.shape[3]
    k_buf = torch.empty(plan.slots, hd)
    v_buf = torch.empty(plan.slots, hd)
    # the same tokens reconstructed without rotation (cos 1, sin 0) are the training's x_hat
    from kvbench.methods.deltakv.codec import is_reference, latent_row, reference_row
    ref = is_reference(plan.pos, 4, 3)
    reconstruct_reference(lat["z"], None, lat["nbr"], store.refs.t["x"], m.up_weight(1),
                          torch.where(ref, -1, latent_row(plan.pos, 4, 3)),
                          torch.where(ref, reference_row(plan.pos, 4, 3), 0), torch.zeros_like(plan.pos),
                          torch.ones(n_comp, hd), torch.zeros(n_comp, hd), plan.dest, plan.hstride, k_buf, v_buf, H)
    got = torch.cat([k_buf.view(H, n_comp, hd).transpose(0, 1).reshape(n_comp, -1),
                     v_buf.view(H, n_comp, hd).transpose(0, 1).reshape(n_comp, -1)], 1)
    torch.testing.assert_close(got, x_hat[0, :n_comp], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_identity_compressor_reproduces_full(family):
    lm = tiny(family)
    m = deltakv(lm, compressor="linear", latent_dim=64, latent_dtype="float32", keep=1.0)
    make_identity(m)
    samples = [sample(prompt(70 + 23 * i, 40 + i), prompt(5, 50 + i), new=30, sid=str(i)) for i in range(2)]
    full = Engine(lm, registry.build_method("full", 1.0)).generate(samples)
    got = Engine(lm, m).generate(samples)
    assert [r["prediction"] for r in got] == [r["prediction"] for r in full]
    # prefilled in chunks that do not divide the flushes, and with the question seen first: still full's
    for proto in ("query-agnostic", "query-aware"):
        chunked = Engine(lm, m, prefill_chunk=37, protocol=proto).generate(samples)
        assert [r["prediction"] for r in chunked] == [r["prediction"] for r in full], proto
    cache, logits, _ = Engine(lm, m).prefill(samples[1])
    _, want, _ = Engine(lm, registry.build_method("full", 1.0)).prefill(samples[1])
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    assert cache.stores[1].n_comp[0] > 0, "the test must cross a flush"


@pytest.mark.parametrize("pool", [1, 3])
def test_observer_picks_sinks_and_top_attended(pool):
    lm = tiny("llama")
    m = deltakv(lm, keep=0.25, pool=pool)
    engine = Engine(lm, m)
    cache, first, _ = engine.prefill(sample(prompt(100, 9), []))
    follower = cache.stores[1]
    n_comp = follower.n_comp[0]
    plan_box = {}
    real = m.observe

    def spy(call, f):
        plan_box["plan"] = real(call, f)
        plan_box["call"] = call
        return plan_box["plan"]

    m.observe = spy
    try:
        engine.decode(cache, first, [2], [False])
    finally:
        del m.observe
    plan, call = plan_box["plan"], plan_box["call"]
    n_pick = -(-(n_comp - 4) * 25 // 100)
    assert plan.counts == [4 + n_pick]
    assert plan.pos[:4].tolist() == [0, 1, 2, 3]
    # the picks are the n_pick best of the observer's own attention (max over query heads)
    att = call.slot_attention(reduce="max")
    store = call.store
    per_pos = torch.full((int(store.pos.max()) + 1,), float("-inf"))
    per_pos.scatter_reduce_(0, store.pos.long()[store.pos >= 0], att[store.pos >= 0], reduce="amax")
    per_pos[:4] = float("-inf")  # only compressed, non-sink tokens compete
    per_pos[n_comp:] = float("-inf")
    if pool > 1:
        per_pos = torch.nn.functional.max_pool1d(per_pos[None, None], pool, stride=1, padding=pool // 2)[0, 0]
    best = torch.topk(per_pos[4:n_comp], n_pick).indices + 4
    assert sorted(plan.pos[4:].tolist()) == sorted(best.tolist())


@pytest.mark.parametrize("n", [4 + 15, 4 + 16, 4 + 23, 4 + 24, 4 + 31, 4 + 32])
def test_flush_boundaries_in_prefill(n):
    lm = tiny("llama")
    m = deltakv(lm)
    store, *_ = feed_store(m, lm, n)
    window = n - 4
    blocks = window // 8 - 1 if window >= 16 else 0
    assert store.n_comp == [4 + 8 * blocks if blocks else 0]
    assert store.raw.length.tolist() == [n - store.n_comp[0]] * 2
    if blocks:
        assert 8 <= n - store.n_comp[0] < 16


def test_flush_boundaries_in_decoding():
    lm = tiny("llama")
    m = deltakv(lm)
    engine = Engine(lm, m)
    cache, first, _ = engine.prefill(sample(prompt(10, 11), []))
    store = cache.stores[1]
    history = []
    real = store.flush

    def record(rope, decoding):
        real(rope, decoding)
        history.append((store.n_seen[0], store.n_comp[0]))

    store.flush = record
    engine.decode(cache, first, [40], [False])
    for seen, comp in history:
        assert seen - 4 < 16 if comp == 0 else 8 <= seen - comp < 16, (seen, comp)
    flushes = [(s, c) for (s, c), (_, c0) in zip(history[1:], history) if c != c0]
    assert flushes[0] == (4 + 16, 4 + 8)  # the window reached 2W: the sinks and one W leave
    assert all(c - c0 == 8 for (_, c), (_, c0) in zip(flushes[1:], flushes))
    assert all(s - c == 8 for s, c in flushes)


def test_batched_flushes_match_one_sequence_at_a_time():
    """Sequences that flush together (equal and unequal counts, different positions) get the tables each
    would get alone."""
    lm = tiny("llama")
    m = deltakv(lm, latent_dim=16, intermediate=24, latent_dtype="float32")
    engine = Engine(lm, m)
    from kvbench.cache import KVCache
    samples = [sample(prompt(23, 40), []), sample(prompt(23, 41), []), sample(prompt(30, 42), [])]
    alone = []
    for s in samples:
        cache, first, _ = engine.prefill(s)
        alone.append((cache, first))
    batch = KVCache.concat([c.clone() for c, _ in alone])
    firsts = torch.cat([f for _, f in alone])
    engine.decode(batch, firsts, [37] * 3, [False] * 3, 0)
    for b, (cache, first) in enumerate(alone):
        engine.decode(cache, first, [37], [False], 0)
        for layer, store in enumerate(cache.stores):
            if not isinstance(store, DeltaKVStore):
                continue
            got = batch.stores[layer]
            assert got.n_comp[b] == store.n_comp[0] > 0
            torch.testing.assert_close(got.refs.rows(b, "x"), store.refs.rows(0, "x"))
            assert torch.equal(got.latents.rows(b, "nbr"), store.latents.rows(0, "nbr"))
            torch.testing.assert_close(got.latents.rows(b, "z"), store.latents.rows(0, "z"), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("keep", [6, 0.3])
def test_cuda_graph_decoding_matches_eager(keep):
    """Between flushes the decoding step replays a captured graph; a flush runs eagerly and the next
    layout is captured anew. Tokens and stores must match an all-eager run."""
    from kvbench.cache import KVCache
    lm = tiny("llama")
    lm.model.to("cuda")
    m = registry.build_method("deltakv", 1.0, {**SMALL, "keep": keep})
    engine = Engine(lm, m)
    samples = [sample(prompt(23, 40), []), sample(prompt(31, 41), [])]
    runs = []
    for graphs in (False, True):
        engine.cuda_graphs = graphs
        parts = [engine.prefill(s) for s in samples]
        cache = KVCache.concat([c for c, _, _ in parts])
        out, info = engine.decode(cache, torch.cat([f for _, f, _ in parts]), [60, 60], [False, False], 0)
        runs.append((out, info, cache))
    (out_e, info_e, cache_e), (out_g, info_g, cache_g) = runs
    assert info_e["graph_captures"] == 0 and info_g["graph_captures"] > 2, info_g
    assert out_g == out_e
    for a, b in zip(cache_e.stores, cache_g.stores):
        if isinstance(a, DeltaKVStore):
            assert a.n_seen == b.n_seen and a.n_comp == b.n_comp
            assert torch.equal(a.latents.t["nbr"], b.latents.t["nbr"])
            a, b = a.raw, b.raw
        assert torch.equal(a.length, b.length)
        assert b.free == int((b.capacity - b.length).min()), "the host mirror lost count of replayed steps"


def test_memory_is_what_the_store_holds():
    lm = tiny("llama")
    sizes = {}
    for latent, index in [("bfloat16", "int32"), ("int8", "int16"), ("int4", "int16")]:
        m = deltakv(lm, latent_dim=64, intermediate=32, latent_dtype=latent, index_dtype=index, quant_group=32)
        store, *_ = feed_store(m, lm, 200)
        tensors = [store.raw.k, store.raw.v, store.raw.pos, store.raw.start, store.raw.length, store.raw.capacity,
                   *store.refs.t.values(), store.refs.start, store.refs.length, store.refs.capacity,
                   *store.latents.t.values(), store.latents.start, store.latents.length, store.latents.capacity]
        assert store.nbytes() == sum(t.numel() * t.element_size() for t in tensors)
        assert int(store.seq_nbytes().sum()) == store.nbytes()
        assert sum(store.breakdown().values()) == store.nbytes()
        sizes[latent] = store.nbytes()
    assert sizes["int4"] < sizes["int8"] < sizes["bfloat16"]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_latent_quantisation_round_trip(fmt):
    z = torch.randn(9, 64)
    values, scales = quantize_latents(z, fmt, 32)
    back = dequantize_latents(values, scales, fmt, 32)
    step = z.abs().view(9, 2, 32).amax(-1).repeat_interleave(32, 1) / (127 if fmt == "int8" else 7)
    assert (back - z).abs().le(step / 2 + 1e-3).all()


def test_checkpoint_round_trip(tmp_path):
    lm = tiny("llama")
    modules = build_compressors([1], 64, 16, 24, "swiglu", seed=5)
    config = {"model": "tiny", "model_signature": model_signature(lm.model.config),
              "model_fingerprint": model_fingerprint(lm.model), "full_layers": [0], "compressed_layers": [1], "dim": 64,
              "latent_dim": 16, "intermediate": 24, "compressor": "swiglu", "stride": 3, "neighbors": 2, "sinks": 4,
              "corpus": {"path": "x"}, "steps": 0, "final_losses": {}}
    save_checkpoint(tmp_path, modules, config)
    loaded_config, loaded = load_checkpoint(tmp_path)
    assert {k: v for k, v in loaded_config.items() if k not in ("format", "weights_sha256")} == \
        json.loads(json.dumps(config))
    for (name, p), (name2, q) in zip(modules.named_parameters(), loaded.named_parameters()):
        assert name == name2
        torch.testing.assert_close(q, p.detach().to(torch.bfloat16).float(), rtol=0, atol=0)
    m = registry.build_method("deltakv", 1.0, {"checkpoint": str(tmp_path), "window": 8})
    Engine(lm, m)
    assert m.stride_ == 3 and m.neighbors_ == 2 and m.full_set == {0}
    torch.testing.assert_close(m.compressor_for(1).up.weight, loaded["1"].up.weight)


def test_checkpoint_for_another_model_is_refused(tmp_path):
    lm = tiny("llama")
    modules = build_compressors([1], 64, 16, 24, "swiglu")
    config = {"model": "tiny-llama seed 0", "model_signature": model_signature(lm.model.config),
              "model_fingerprint": model_fingerprint(lm.model), "full_layers": [0], "compressed_layers": [1], "dim": 64,
              "latent_dim": 16, "intermediate": 24, "compressor": "swiglu", "stride": 3, "neighbors": 2, "sinks": 4}
    save_checkpoint(tmp_path, modules, config)
    for other in (tiny("llama", seed=1), tiny("qwen2")):
        m = registry.build_method("deltakv", 1.0, {"checkpoint": str(tmp_path)})
        with pytest.raises(ModelError, match="was trained for tiny-llama seed 0"):
            Engine(other, m)
    Engine(lm, registry.build_method("deltakv", 1.0, {"checkpoint": str(tmp_path)}))  # its own model is fine


def test_cli_errors_are_one_line(tmp_path):
    cases = [
        (["run", "--method", "deltakv", "--task", "niah", "--checkpoint", str(tmp_path / "none")], "no DeltaKV checkpoint"),
        (["run", "--method", "deltakv", "--task", "niah", "-m", "latent_dtype=int3"], "latent_dtype 'int3'"),
        (["train", "deltakv", "--model", "x", "--data", str(tmp_path / "none"), "--out", str(tmp_path)],
         "no training text"),
    ]
    for args, needle in cases:
        res = CliRunner().invoke(main, args + (["--out", str(tmp_path)] if args[0] == "run" else []))
        assert res.exit_code == 2, (args, res.output)
        lines = [line for line in res.output.strip().splitlines() if line]
        assert len(lines) == 1 and needle in lines[0], (args, res.output)


def test_roff_to_text_keeps_words_drops_macros():
    page = '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.B bold words\n.PP\n'
    assert roff_to_text(page) == "NAME\nls - list directory contents\nbold words"


@pytest.fixture
def interpreter():
    prev = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "KVBENCH_TRITON")}
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    yield
    for k, v in prev.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.parametrize("fmt", ["float", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_r", [None, 16, "split"])  # whole latent, a loop over it, a separate matmul
def test_kernel_matches_reference(interpreter, fmt, dtype, block_r):
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    H, hd, r, K, L, R, n = 2, 32, 64, 4, 50, 40, 37
    D = 2 * H * hd
    values, scales = quantize_latents(torch.randn(L, r, generator=g), fmt, 32, dtype)
    nbr = torch.randint(0, 20, (L, K), generator=g).to(torch.int16)
    refs = torch.randn(R, D, generator=g).to(dtype)
    w_up = (torch.randn(D, r, generator=g) / 8).to(dtype)
    lat_row = torch.randint(-1, L, (n,), generator=g)
    self_ref = torch.randint(0, R, (n,), generator=g)
    ref_base = torch.randint(0, 20, (n,), generator=g)
    angle = torch.randint(0, 4000, (n,), generator=g).float()[:, None] * torch.rand(hd // 2, generator=g)[None]
    cos, sin = torch.cat([angle.cos()] * 2, 1), torch.cat([angle.sin()] * 2, 1)
    order = torch.randperm(n, generator=g)  # tokens land in scattered slots
    dest, hstride = order * H, torch.ones(n, dtype=torch.int64)
    args = [t.to(dev) if t is not None else None for t in (values, scales, nbr, refs, w_up, lat_row, self_ref, ref_base,
                                                           cos, sin, dest, hstride)]
    outs = [torch.full((n * H, hd), float("nan"), dtype=dtype, device=dev) for _ in range(4)]
    tile = {"split": True} if block_r == "split" else {"block_r": block_r}
    reconstruct_triton(*args, outs[0], outs[1], H, fmt, 32, **tile)
    reconstruct_reference(*args, outs[2], outs[3], H, fmt, 32)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in ((outs[0], outs[2]), (outs[1], outs[3])):
        assert not got.isnan().any(), f"unwritten output (seed {seed})"
        rel = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert rel < tol, f"{fmt} {dtype}: relative error {rel} (seed {seed})"
