"""Programmatic dependent launch (KVBENCH_PDL=1, issue 21): when kvbench's decoding-step kernels ask for it, and
that each waits for the kernel before it before touching anything an earlier kernel wrote (checked in the PTX,
compiled ahead of time for sm_90 without a GPU). Timing it needs the GPU (scripts/gpu/skinny-h200.sh pdl)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from kvbench.kernels import decode_attention


class _OnCuda:
    """A stand-in for a CUDA tensor: ``pdl_kwargs`` reads only where it lives."""
    is_cuda = True
    device = torch.device("cuda", 0)


@pytest.mark.parametrize("env,capability,want", [
    ({}, 9, {"PDL": False}),                                       # not asked for
    ({"KVBENCH_PDL": "1"}, 8, {"PDL": False}),                     # an A100: no PDL before Hopper
    ({"KVBENCH_PDL": "1"}, 9, {"PDL": True, "launch_pdl": True}),
    ({"KVBENCH_PDL": "1", "TRITON_INTERPRET": "1"}, 9, {"PDL": False}),  # the interpreter has no grid control
])
def test_pdl_is_asked_for_only_on_hopper_when_set(env, capability, want, monkeypatch):
    for k in ("KVBENCH_PDL", "TRITON_INTERPRET"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(decode_attention, "_CAPABILITY", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx=None: (capability, 0))
    assert decode_attention.pdl_kwargs(_OnCuda()) == want
    assert decode_attention.pdl_kwargs(torch.zeros(1)) == {"PDL": False}  # a CPU tensor never


AOT_COMPILE = """
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvbench.kernels import decode_attention as da, store_append as sa
pdl = json.loads(sys.argv[1])
i32 = lambda names: {n: "i32" for n in names.split()}
decode = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "SEG_START": "*i64", "SEG_LEN": "*i64", "O": "*bf16",
          "LSE": "*fp32", "OP": "*fp32", "LSEP": "*fp32", "LOGITS": "*fp32",
          **i32("stride_qb stride_qh stride_qt stride_qd stride_ks stride_kd stride_vs stride_vd stride_ob stride_oh "
                "stride_ot stride_od stride_lb stride_lh stride_lt n_seg n_kv_heads group tq chunk"), "qk_scale": "fp32"}
reduce = {"SEG_LEN": "*i64", "O": "*bf16", "LSE": "*fp32", "OP": "*fp32", "LSEP": "*fp32",
          **i32("stride_ob stride_oh stride_ot stride_od stride_lb stride_lh stride_lt n_seg n_kv_heads group tq chunk")}
append = {"k_ptr": "*bf16", "v_ptr": "*bf16", "pos_ptr": "*i32", "start_ptr": "*i64", "len_ptr": "*i64",
          "kn_ptr": "*bf16", "vn_ptr": "*bf16", "pn_ptr": "*i64",
          **i32("s_kn_b s_kn_h s_kn_t s_kn_d s_vn_b s_vn_h s_vn_t s_vn_d s_pn_b s_pn_t H T D")}
jobs = [(da._ragged_decode_kernel, decode, dict(HEAD_DIM=128, NSEG_P2=16, BLOCK_M=16, BLOCK_N=64, BLOCK_D=128,
                                                PRECISION="tf32", DOT_F32=False, WRITE_LOGITS=True)),
        (da._ragged_reduce_kernel, reduce, dict(HEAD_DIM=128, NSEG_P2=16, BLOCK_C=64, BLOCK_R=1, BLOCK_D=128)),
        (sa._append_kernel, append, dict(BLOCK_D=128, ADVANCE=True))]
for fn, sig, const in jobs:
    const = {**const, "PDL": pdl}
    src = ASTSource(fn=triton.jit(fn), signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "launch_pdl": pdl}).asm["ptx"]
    wait = ptx.find("griddepcontrol.wait")
    assert (wait >= 0) == pdl, fn.__name__
    if pdl:  # nothing read or written before the wait: every input may come from the kernel before
        body = ptx[:wait]
        assert not any(op in body for op in ("ld.global", "st.global", "cp.async")), fn.__name__
        assert "griddepcontrol.launch_dependents" in ptx[wait:], fn.__name__
print("compiled", len(jobs))
"""


@pytest.mark.parametrize("pdl", [True, False])
def test_step_kernels_wait_before_touching_memory(pdl):
    """The decode attention, its reduction and the store's append compiled for sm_90 (in a process of its own:
    the interpreter, once run in a process, leaves code generation broken there): with ``PDL`` each waits for
    the kernel before it before its first global load or store, and lets the next one start after; without,
    no grid control at all."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KVBENCH_TRITON")}
    out = subprocess.run([sys.executable, "-c", AOT_COMPILE, json.dumps(pdl)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
