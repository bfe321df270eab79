"""kernels/kvcar_decode.py: a KV-CAR store's one-launch decode writes what its PyTorch path writes.

Each test binds KV-CAR with random codecs (BatchNorm statistics away from (0, 1)) to a small random Llama,
fills a layer's store with random codes at ragged lengths (so the gather's rows are padded) and positions in
the tens of thousands, and compares ``KVCARStore.decode_heads`` with the kernel and with the PyTorch path
(``use_triton`` false for the store only). Without a GPU the kernel runs in Triton's interpreter."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import kvbench.methods.kvcar.store as store_module
from kvbench.methods.kvcar import KVCAR, LayerCodec
from kvbench.models import LoadedModel

HAS_CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
DEFAULT = {"rope_type": "default", "rope_theta": 10000.0}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024}


def _triton(monkeypatch):
    monkeypatch.setenv("KVBENCH_TRITON", "1")
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _kernels(monkeypatch):
    _triton(monkeypatch)


def bound_method(dtype, head_dim, heads, latent, latent_v, hidden, hidden_v, rope_keys="pre", rope=DEFAULT,
                 reuse=None) -> KVCAR:
    cfg = AutoConfig.for_model("llama", hidden_size=2 * heads * head_dim, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=2 * heads, num_key_value_heads=heads, head_dim=head_dim,
                               vocab_size=64, max_position_embeddings=4096, rope_parameters=rope)
    torch.manual_seed(0)
    with torch.device(DEV):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    codecs = torch.nn.ModuleDict({str(i): LayerCodec(heads, head_dim, hidden, latent, hidden_v, latent_v)
                                  for i in range(2)})
    for mod in codecs.values():
        for ae in (mod.k, mod.v):
            ae(torch.randn(heads, 64, head_dim) * 2)  # BatchNorm statistics away from (0, 1)
    method = KVCAR(rope_keys=rope_keys)
    method.rope_keys_ = rope_keys
    method.bind(LoadedModel(model, None, "tiny", 4096), codecs.eval(), reuse or {})
    return method


def filled_store(method: KVCAR, layer: int, batch: int, seed: int, max_pos: int = 40000):
    """Layer ``layer``'s store (made in layer order) holding random codes, a ragged count per segment."""
    heads, head_dim = method.codecs[0][0].w1.shape[:2]
    stores = [method.new_store(i, batch, heads, head_dim, method.dtype, DEV) for i in range(layer + 1)]
    store = stores[layer]
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 40, (batch * len(store.own),), generator=g)
    counts[0] = 70  # one head's row much longer than the others: the rest are padded
    n = int(counts.sum())
    z = [torch.randn(n, method.code_width_, generator=g).to(DEV, method.dtype) for _ in range(2)]
    pos = torch.randint(0, max_pos, (n,), generator=g, dtype=torch.int32)
    store.codes.replace(*z, pos.to(DEV), counts.to(DEV))
    return store


def decode_both(store, heads, monkeypatch):
    calls = []
    real = store_module.kvcar_decode
    monkeypatch.setattr(store_module, "kvcar_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    kernel = store.decode_heads(heads)
    assert calls, "the kernel did not run"
    monkeypatch.setattr(store_module, "use_triton", lambda x: False)
    reference = store.decode_heads(heads)
    monkeypatch.undo()
    return kernel, reference


def assert_same(kernel, reference, dtype):
    (k, v, start, length), (k_ref, v_ref, start_ref, length_ref) = kernel, reference
    assert k.shape == k_ref.shape and k.dtype == k_ref.dtype and v.dtype == v_ref.dtype
    assert torch.equal(start, start_ref) and torch.equal(length, length_ref)
    for got, want in ((k, k_ref), (v, v_ref)):
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        else:  # bfloat16: the PyTorch path rounds after every operation, the kernel once per matmul (and
            # Triton's interpreter rounds float32 to bfloat16 toward zero): about 1 % apart
            err = (got.float() - want.float()).norm() / want.float().norm()
            assert err < 2e-2, err
            torch.testing.assert_close(got.float(), want.float(), atol=0.1 * want.float().abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope_keys", ["pre", "post"])
def test_kernel_equals_pytorch_with_other_value_widths(dtype, rope_keys, monkeypatch):
    """Latents 16 (keys) and 48 (values), hidden 2 x latent: the Qwen codec's proportions (hidden 96 is
    padded to the hidden block; the keys skip the values' columns)."""
    method = bound_method(dtype, 32, 2, 16, 48, 32, 96, rope_keys)
    store = filled_store(method, 0, 2, seed=1)
    assert_same(*decode_both(store, [0, 1], monkeypatch), dtype)


@pytest.mark.parametrize("rope", [LLAMA3, YARN], ids=["llama3", "yarn"])
def test_kernel_rotates_as_the_models_rope(rope, monkeypatch):
    """llama3-style frequencies, and YaRN's attention scaling (cos and sin times 1.14)."""
    method = bound_method(torch.float32, 32, 2, 32, 32, 64, 64, rope=rope)
    assert (method.kernel_rope()[1] != 1.0) == (rope is YARN)
    store = filled_store(method, 0, 1, seed=2)
    assert_same(*decode_both(store, [0, 1], monkeypatch), torch.float32)


def test_positions_below_the_table_take_cos_and_sin_from_it(monkeypatch):
    """The model's position range (4096 here) comes from the table, the same values as the rotary module's;
    a tile holding a later position computes its own (the other tests: positions up to 40,000)."""
    method = bound_method(torch.float32, 32, 2, 32, 32, 64, 64)
    store = filled_store(method, 0, 2, seed=5, max_pos=4096)
    assert_same(*decode_both(store, [0, 1], monkeypatch), torch.float32)
    _triton(monkeypatch)  # decode_both undid it
    rope = method.kernel_rope()
    assert rope.cos.shape == (4096, 16) and method.kernel_rope().cos is rope.cos  # made once
    rope.cos.zero_(), rope.sin.zero_()  # what the kernel reads: keys rotated by a zero matrix are zero
    k, v, _, _ = store.decode_heads([0, 1])
    assert bool((k == 0).all()) and bool((v != 0).any())
    far = filled_store(method, 0, 2, seed=5, max_pos=40000)  # past the table: computed, not read
    assert bool((far.decode_heads([0, 1])[0] != 0).any())


@pytest.mark.parametrize("heads", [[2], [1, 2]])
def test_kernel_decodes_a_subset_of_heads_with_their_own_decoders(heads, monkeypatch):
    """Layer 1 reuses head 0 of layer 0: it stores heads 1 and 2, in rows 0 and 1 of its gather."""
    method = bound_method(torch.bfloat16, 32, 3, 16, 16, 32, 32, reuse={1: {0: 0}})
    store = filled_store(method, 1, 2, seed=3)
    assert store.own == [1, 2]
    kernel, reference = decode_both(store, heads, monkeypatch)
    assert_same(kernel, reference, torch.bfloat16)
    if heads == [2]:  # and not head 1's decoder on row 1
        other = method.decoders[1]
        assert not torch.equal(other.w4[:, 1], other.w4[:, 2])


def test_kernel_pads_widths_tl_dot_cannot_take(monkeypatch):
    """head_dim 16 (halves of 8), code width 10, hidden 20 and 12: masked in the kernel, padded to 16."""
    method = bound_method(torch.float32, 16, 2, 8, 12, 20, 12)
    store = filled_store(method, 0, 2, seed=4)
    assert_same(*decode_both(store, [0, 1], monkeypatch), torch.float32)


def test_dynamic_rope_keeps_the_pytorch_path():
    """Dynamic RoPE types change ``inv_freq`` with the positions asked for: the rotary module rotates those
    keys (the kernel still serves keys coded after RoPE)."""
    dynamic = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    assert bound_method(torch.float32, 16, 2, 16, 16, 32, 32, rope=dynamic).decoders == {}
    assert bound_method(torch.float32, 16, 2, 16, 16, 32, 32, "post", rope=dynamic).decoders


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_kernel_replays_in_a_cuda_graph():
    method = bound_method(torch.bfloat16, 128, 2, 64, 64, 128, 128)
    store = filled_store(method, 0, 2, seed=5)
    store.decode_heads([0, 1])  # compiles the kernel and caches the gather indices
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        k, v, _, _ = store.decode_heads([0, 1])
    store.codes.k.mul_(-1)
    store.codes.v.normal_()
    graph.replay()
    k_now, v_now, _, _ = store.decode_heads([0, 1])
    assert torch.equal(k, k_now) and torch.equal(v, v_now)


AOT_COMPILE = """
import inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvbench.kernels import kvcar_decode as kd

W, hidden, hidden_k, hidden_v = json.loads(sys.argv[1])
launch = {k: p.default for k, p in inspect.signature(kd.kvcar_decode).parameters.items()}  # the shape it launches
sig = {"CK": "*bf16", "CV": "*bf16", "POS": "*i32", "PERM": "*i32", "ROWS": "*i64", "HEADS": "*i64", "W3": "*bf16",
       "B3": "*bf16", "W4": "*bf16", "B4": "*bf16", "INV_FREQ": "*fp32", "COS": "*bf16", "SIN": "*bf16",
       "KOUT": "*bf16", "VOUT": "*bf16", "width": "i32", "n_rows": "i32", "n_heads": "i32", "stride_perm": "i64",
       "rope_scale": "fp32", "n_table": "i32"}
const = dict(W=W, W_P=W, HID=hidden, HID_K=hidden_k, HID_V=hidden_v, BLOCK_H=64, D=128, HALF=64, HALF_P=64,
             BLOCK_T=launch["block_t"], SLOPE=kd.SLOPE, ROPE=True, DOT_F32=False, PRECISION="tf32", PRECISE_TRIG=True)
src = ASTSource(fn=triton.jit(kd._decode_kernel), signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const)
triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": launch["num_warps"], "num_stages": launch["num_stages"]})
print("compiled")
"""


@pytest.mark.parametrize("shape", [[64, 192, 64, 192], [64, 128, 128, 128]])  # the Qwen codec; the Llama timing one
def test_the_kernel_compiles_for_the_h200(shape):
    """The interpreter accepts what the compiler may refuse: the kernel compiled ahead of time for sm_90 (bf16,
    the launch shape ``kvcar_decode`` uses), without a GPU, in a process of its own (the interpreter, once run
    in a process, leaves code generation broken there). Checked by hand on triton 3.6, the H200's."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", AOT_COMPILE, json.dumps(shape)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
