"""kernels/skinny_gemm.py: the few-row linear kernel computes F.linear, falls back where it does not apply, and
a model with it swapped in decodes the same tokens (eagerly and through torch.compile)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import prompt, tiny
from torch import nn

from kvbench import registry
from kvbench.engine import Engine
from kvbench.kernels import skinny_gemm
from kvbench.kernels.skinny_gemm import SkinnyLinear, skinny_linear, use_skinny_linear
from kvbench.task import Sample


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("KVBENCH_TRITON", "1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,N,K,bias", [(1, 37, 300, True), (2, 9, 1100, False), (3, 64, 256, False),
                                           (16, 100, 513, True), (8, 16, 16, False)])
def test_the_kernel_computes_f_linear(rows, N, K, bias, dtype):
    """Row counts 1-16, N and K off the blocks' multiples (masked edges), with and without a bias."""
    g = torch.Generator().manual_seed(rows * 1000 + N)
    x = torch.randn(rows, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    exact = F.linear(x.double(), w.double(), b.double() if bias else None)
    got = skinny_linear(x, w, b)
    assert got.shape == (rows, N) and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), exact, atol=1e-4, rtol=1e-5)
    else:  # one rounding of a float32 sum (the interpreter rounds toward zero): well within bfloat16's 2^-8
        assert ((got.double() - exact).abs() / exact.abs().max()).max() < 2e-2


def test_one_row_takes_the_gemv_kernel_and_more_the_dot_kernel(monkeypatch):
    """The split between the CUDA-core kernel and the tensor-core one, with each one's first launch shape."""
    used = []
    monkeypatch.setattr(skinny_gemm, "_launch", lambda fn, grid, *a, **kw: used.append((fn, grid)))
    w = torch.randn(40, 32)
    for rows in (1, 2, 16):
        skinny_linear(torch.randn(rows, 32), w)
    gemv, dot = skinny_gemm._gemv_kernel, skinny_gemm._skinny_kernel
    bn_gemv, bn_dot = skinny_gemm.GEMV_CONFIGS[0][0], skinny_gemm.DOT_CONFIGS[0][0]
    assert used == [(gemv, (-(-40 // bn_gemv),)), (dot, (-(-40 // bn_dot),)), (dot, (-(-40 // bn_dot),))]


def test_a_shape_tuned_to_cublas_goes_to_f_linear(monkeypatch):
    """Where the timing found cuBLAS faster the op returns F.linear's result and launches nothing."""
    launched = []
    monkeypatch.setattr(skinny_gemm, "_launch_shape", lambda *a: launched.append(a))
    monkeypatch.setattr(skinny_gemm, "_config_for", lambda *a: skinny_gemm.CUBLAS)
    x, w, b = torch.randn(1, 1, 32), torch.randn(24, 32), torch.randn(24)
    assert torch.equal(skinny_linear(x, w, b), F.linear(x, w, b)) and not launched


def test_more_rows_or_a_strided_weight_go_to_f_linear(monkeypatch):
    """17 rows (a prefill), a transposed weight, mixed dtypes, autograd: F.linear itself, bit for bit; the kernel
    is never launched."""
    launched = []
    monkeypatch.setattr(skinny_gemm, "_launch_shape", lambda *a: launched.append(a))
    x = torch.randn(17, 32)
    w = torch.randn(24, 32)
    assert torch.equal(skinny_linear(x, w), F.linear(x, w))
    assert torch.equal(skinny_linear(x[:2], w.t().contiguous().t()[:, :32]), F.linear(x[:2], w))
    assert torch.equal(skinny_linear(x[:2].double(), w.double()), F.linear(x[:2].double(), w.double()))
    wg = w.clone().requires_grad_(True)
    skinny_linear(x[:2], wg).sum().backward()  # training: cuBLAS, with its backward
    assert wg.grad is not None and not launched
    with torch.no_grad():
        skinny_linear(x[:2], w)
    assert len(launched) == 1


def test_the_swap_keeps_parameters_and_names_and_is_done_once():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4, bias=False)))
    before = {k: v.data_ptr() for k, v in m.state_dict().items()}
    assert use_skinny_linear(m) == 2 and use_skinny_linear(m) == 0
    assert isinstance(m[0], SkinnyLinear) and isinstance(m[2][0], SkinnyLinear)
    assert {k: v.data_ptr() for k, v in m.state_dict().items()} == before


def test_a_tiny_model_decodes_the_same_tokens_with_the_kernel(monkeypatch):
    """Greedy decoding of a batch of two with the full cache and with snapkv: the same tokens with the kernel
    in every linear layer (the output layer included) as with F.linear. The kernel serves the 5 decoding steps
    after the prefill's token (both rows at once) and the prefill's few-row products (the 5-token question fed
    after the context, the output layer's last row); the 40-token contexts go to F.linear."""
    launches = []
    launch = skinny_gemm._launch_shape
    monkeypatch.setattr(skinny_gemm, "_launch_shape", lambda *a: (launches.append(a[0].shape[0]), launch(*a)))
    samples = [Sample(f"s{i}", prompt(40 + 7 * i, i), prompt(5, 9), [], 6) for i in range(2)]
    outs = {}
    for swapped in (False, True):
        lm = tiny("llama")
        if swapped:
            assert use_skinny_linear(lm.model) == 7 * lm.model.config.num_hidden_layers + 1
        for method, budget in (("full", 1.0), ("snapkv", 0.5)):
            engine = Engine(lm, registry.build_method(method, budget))
            outs[swapped, method] = [(r["prediction"], r["new_tokens"]) for r in engine.generate(samples, trace_every=0)]
    layers = 7 * tiny("llama").model.config.num_hidden_layers + 1
    assert launches.count(2) == 2 * 5 * layers and set(launches) == {1, 2, 5}  # two methods x 5 steps
    for method in ("full", "snapkv"):
        assert outs[True, method] == outs[False, method]
        assert all(n == 6 for _, n in outs[True, method])


def test_the_op_compiles_whole():
    """torch.compile (fullgraph) keeps the custom op as one call: the result is the eager one."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32, bias=False))
    x = torch.randn(2, 64)
    with torch.no_grad():
        want = m(x)
        use_skinny_linear(m)
        got = torch.compile(m, fullgraph=True)(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


AOT_COMPILE = """
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvbench.kernels import skinny_gemm as sg
ptrs = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16"}
sig_gemv = {**ptrs, "N": "i32", "K": "i32"}
sig_dot = {**ptrs, "M": "i32", "N": "i32", "K": "i32", "s_xm": "i32", "s_om": "i32"}
aligned = {(i,): [["tt.divisibility", 16]] for i in range(len(sig_dot)) if i not in (2, 4)}  # as at K = 4096
dot = dict(BLOCK_M=16, PRECISION="tf32", DOT_F32=False)
# every launch shape with programmatic dependent launch (the kernel's longer form); the first without it
jobs = [(sg._gemv_kernel, sig_gemv, {"PDL": i > 0}, c) for i, c in enumerate(sg.GEMV_CONFIGS[:1] + sg.GEMV_CONFIGS)]
jobs += [(sg._skinny_kernel, sig_dot, {**dot, "PDL": i > 0}, c) for i, c in enumerate(sg.DOT_CONFIGS[:1] + sg.DOT_CONFIGS)]
for fn, sig, extra, (bn, bk, warps, stages) in jobs:
    const = dict(HAS_BIAS=True, BLOCK_N=bn, BLOCK_K=bk, **extra)
    src = ASTSource(fn=triton.jit(fn), signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const,
                    attrs={k: v for k, v in aligned.items() if k[0] < len(sig)})
    options = {"num_warps": warps, "num_stages": stages, "launch_pdl": extra["PDL"]}
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    assert "ld.global.v4" in ptx or "cp.async" in ptx, (fn.__name__, const)  # 16-byte loads of the weight
    # with PDL: the wait before the activations, and after the first weight tile's load
    waits = ptx.find("griddepcontrol.wait")
    assert (waits >= 0) == extra["PDL"], (fn.__name__, const)
    assert waits < 0 or "ld.global" in ptx[:waits] or "cp.async" in ptx[:waits], (fn.__name__, const)
print("compiled", len(jobs))
"""


def test_every_launch_shape_compiles_for_the_h200_with_wide_loads():
    """The interpreter accepts what the compiler may refuse: every candidate launch shape of both kernels compiled
    ahead of time for sm_90 (bf16, K a multiple of 16 as at a launch on the models' shapes), in a process of its
    own (the interpreter, once run in a process, leaves code generation broken there), each loading the weight
    16 bytes at a time; with programmatic dependent launch (``PDL``), waiting for the kernel before only after
    the first weight tile's load was issued."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KVBENCH_TRITON")}
    out = subprocess.run([sys.executable, "-c", AOT_COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
