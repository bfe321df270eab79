"""slot_attention_probs (kvbench.kernels.slot_scores): Triton vs. its reference vs. the einsum formula that
``LayerCall.slot_attention`` used before it (copied below as the oracle).

Without CUDA the Triton path runs through Triton's interpreter (set for this module only, as in
test_kernels.py); with CUDA the same tests run compiled, and a CUDA-graph capture is checked too.
"""

import os

import pytest
import torch

from kvbench.cache import RaggedKV
from kvbench.kernels import slot_scores
from kvbench.kernels.decode_attention import ragged_attention_reference, ragged_attention_triton
from kvbench.kernels.slot_scores import (
    slot_attention_probs,
    slot_attention_probs_from_logits,
    slot_attention_probs_from_logits_reference,
    slot_attention_probs_from_logits_triton,
    slot_attention_probs_reference,
    slot_attention_probs_triton,
)

HAS_CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    """Triton's interpreter for this module only, when there is no GPU."""
    prev = os.environ.get("TRITON_INTERPRET")
    if not HAS_CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    yield
    if prev is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = prev


def einsum_oracle(queries, lse, store_k, seg, valid, n_kv_heads, scale, reduce):
    """``LayerCall.slot_attention`` as it was: queries [B, Hq, T, D], lse [B, Hq, T]; ``seg`` and ``valid``
    are the store's slot_segments() and slot_valid()."""
    B, Hq, T, D = queries.shape
    G = Hq // n_kv_heads
    q = queries[:, :, -1].reshape(B * n_kv_heads, G, D).float()
    lse = lse[:, :, -1].reshape(B * n_kv_heads, G).float()
    s = torch.einsum("sd,sgd->sg", store_k.float(), q[seg]) * scale
    p = torch.exp(s - lse[seg])
    p = p.amax(-1) if reduce == "max" else p.mean(-1)
    return torch.where(valid, p, torch.zeros_like(p))


def make_case(lens, G, D, dtype, seed, B=1):
    """Segments (B * Hkv = len(lens)) in random physical order with 0-7 slack slots each, holding NaN; the
    last query of each head as the model hands it over ([B, Hq, T, D], T = 3) and its true natural-log lse
    over the valid slots ([B, Hq, T])."""
    g = torch.Generator().manual_seed(seed)
    n = len(lens)
    seg_len = torch.tensor(lens, dtype=torch.int64)
    cap = seg_len + torch.randint(0, 8, (n,), generator=g)
    order = torch.randperm(n, generator=g)
    seg_start = torch.empty(n, dtype=torch.int64)
    seg_start[order] = torch.cumsum(cap[order], 0) - cap[order]
    S = int(cap.sum())
    seg_of_slot = torch.empty(S, dtype=torch.int64)
    for i in range(n):
        seg_of_slot[seg_start[i]:seg_start[i] + cap[i]] = i
    slot = torch.arange(S)
    valid = slot - seg_start[seg_of_slot] < seg_len[seg_of_slot]
    k = (torch.randn(S, D, generator=g) * 2).to(dtype)
    k[~valid] = float("nan")
    queries = torch.randn(B, n // B * G, 3, D, generator=g).to(dtype)
    scale = D ** -0.5
    _, lse = ragged_attention_reference(queries, k, k, seg_start, seg_len, scale)
    dev = [t.to(DEV) for t in (queries, lse, k, seg_start, seg_len, seg_of_slot, valid)]
    return dev, scale


def last_query(queries, lse, n_seg):
    """The [B*Hkv, G, D] and [B*Hkv, G] views ``LayerCall`` passes (strided, not copied)."""
    B, Hq, T, D = queries.shape
    return queries[:, :, -1].reshape(n_seg, -1, D), lse[:, :, -1].reshape(n_seg, -1)


LENS = [0, 37, 130, 1, 64, 0, 200, 5]   # empty segments, one slot, crossing 64-slot blocks


@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [48, 64])
@pytest.mark.parametrize("G", [1, 3, 4])
def test_triton_matches_reference(G, D, dtype, reduce):
    seed = int.from_bytes(os.urandom(4), "little")
    (queries, lse_full, k, seg_start, seg_len, seg_of_slot, valid), scale = make_case(LENS, G, D, dtype, seed, B=2)
    q, lse = last_query(queries, lse_full, len(LENS))
    args = (q, lse, k, seg_start, seg_len, max(LENS) + 7, scale, reduce)
    got = slot_attention_probs_triton(*args)
    ref = slot_attention_probs_reference(*args)
    msg = f"seed {seed}"
    assert got.dtype == torch.float32 and got.shape == (k.shape[0],)
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-7, msg=msg)
    assert (got[~valid] == 0).all(), msg  # slack holds NaN and must give exactly 0
    if reduce == "mean":  # lse is the natural-log normaliser: each segment's probabilities sum to 1
        sums = torch.zeros(len(LENS), dtype=torch.float64, device=DEV).index_add_(0, seg_of_slot, got.double())
        torch.testing.assert_close(sums, (seg_len > 0).double(), rtol=0, atol=1e-5, msg=msg)


@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("G,D,dtype", [(1, 64, torch.bfloat16), (3, 48, torch.float32), (4, 64, torch.float16)])
def test_reference_matches_einsum_oracle(G, D, dtype, reduce):
    (queries, lse_full, k, seg_start, seg_len, seg_of_slot, valid), scale = make_case(LENS, G, D, dtype, 7)
    q, lse = last_query(queries, lse_full, len(LENS))
    ref = slot_attention_probs_reference(q, lse, k, seg_start, seg_len, max(LENS), scale, reduce)
    want = einsum_oracle(queries, lse_full, k, seg_of_slot, valid, len(LENS), scale, reduce)
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-9)  # the same fp32 sums in another order


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_on_a_ragged_store_with_slack(reduce):
    """A real RaggedKV after a prefill, two decoding appends and a remove_one in some segments."""
    B, H, G, D, scale = 2, 3, 2, 64, 0.125
    g = torch.Generator().manual_seed(0)
    store = RaggedKV(B, H, D, torch.bfloat16, DEV)

    def append(T, first):
        k = torch.randn(B, H, T, D, generator=g).to(DEV)
        pos = (first + torch.arange(T)).expand(B, T).to(DEV)
        store.append(k, k, pos)

    append(40, 0)
    append(1, 40)
    store.remove_one(torch.tensor([3, 0, 17, 40, 9, 22], device=DEV),
                     torch.tensor([True, False, True, True, False, True], device=DEV))
    append(1, 41)
    store.remove_one(torch.tensor([5, 1, 2, 3, 4, 6], device=DEV))
    assert bool((store.length < store.capacity).all())  # every segment has slack
    queries = torch.randn(B, H * G, 1, D, generator=g).to(torch.bfloat16).to(DEV)
    _, lse_full = ragged_attention_reference(queries, store.k, store.v, store.start, store.length, scale)
    q, lse = last_query(queries, lse_full, B * H)
    seg = store.slot_segments()
    got = slot_attention_probs_triton(q, lse, store.k, store.start, store.length, store.cap_max, scale, reduce)
    want = einsum_oracle(queries, lse_full, store.k, seg, store.slot_valid(), H, scale, reduce)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-7)


def test_dispatch(monkeypatch):
    (queries, lse_full, k, seg_start, seg_len, seg_of_slot, _), scale = make_case([3, 0, 9, 2], 2, 48, torch.float32, 1)
    q, lse = last_query(queries, lse_full, 4)
    args = (q, lse, k, seg_start, seg_len, 9, scale)
    called = []
    monkeypatch.setattr(slot_scores, "slot_attention_probs_triton", lambda *a, **kw: called.append("triton"))
    monkeypatch.setattr(slot_scores, "slot_attention_probs_reference", lambda *a, **kw: called.append("ref"))
    monkeypatch.delenv("KVBENCH_TRITON", raising=False)
    slot_attention_probs(*args)
    monkeypatch.setenv("KVBENCH_TRITON", "1")
    slot_attention_probs(*args)
    assert called == (["triton", "triton"] if HAS_CUDA else ["ref", "triton"])


def test_bad_input_says_what():
    (queries, lse_full, k, seg_start, seg_len, seg_of_slot, _), scale = make_case([3, 4], 2, 48, torch.float32, 1)
    q, lse = last_query(queries, lse_full, 2)
    with pytest.raises(ValueError, match="reduce must be 'mean' or 'max'"):
        slot_attention_probs(q, lse, k, seg_start, seg_len, 4, scale, "sum")
    with pytest.raises(ValueError, match=r"lse must be \[B\*Hkv, G\]"):
        slot_attention_probs(q, lse[:, :1], k, seg_start, seg_len, 4, scale)
    with pytest.raises(ValueError, match="width must be a host int"):
        slot_attention_probs(q, lse, k, seg_start, seg_len, seg_len.max(), scale)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_replay():
    (queries, lse_full, k, seg_start, seg_len, seg_of_slot, _), scale = make_case(LENS, 4, 64, torch.bfloat16, 3)
    q, lse = last_query(queries, lse_full, len(LENS))
    args = (q, lse, k, seg_start, seg_len, max(LENS), scale)
    slot_attention_probs(*args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = slot_attention_probs(*args)
    seg_len.sub_(1).clamp_(min=0)  # the store changed between steps: the replay must see it
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, slot_attention_probs_reference(*args), rtol=2e-5, atol=1e-7)


def test_benchmark_runs_tiny(capsys):
    slot_scores.main(["--tiny"])
    out = capsys.readouterr().out
    assert "einsum (before)" in out and "kernel BLOCK_S=64" in out


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_out_accumulates_at_valid_slots_only(reduce):
    """``out=``: H2O's running sum gains the probabilities in the same launch; slack keeps what it held."""
    (queries, lse_full, k, seg_start, seg_len, seg_of_slot, valid), scale = make_case(LENS, 4, 64, torch.bfloat16, 5)
    q, lse = last_query(queries, lse_full, len(LENS))
    args = (q, lse, k, seg_start, seg_len, max(LENS), scale, reduce)
    before = torch.rand(k.shape[0], device=DEV)
    before[~valid] = float("nan")  # garbage a moved slot may leave in the slack
    got = slot_attention_probs_triton(*args, out=before.clone())
    ref = slot_attention_probs_reference(*args, out=before.clone())
    torch.testing.assert_close(got[valid], ref[valid], rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(got[valid], before[valid] + slot_attention_probs_reference(*args)[valid],
                               rtol=2e-5, atol=1e-7)
    assert got[~valid].isnan().all() and ref[~valid].isnan().all()


def decode_case(G, D, dtype, seed, B=2):
    """``make_case`` seen by a decoding step: one query per head ([B, Hq, 1, D]), its lse over the store."""
    (queries, _, k, seg_start, seg_len, seg_of_slot, valid), scale = make_case(LENS, G, D, dtype, seed, B=B)
    q = queries[:, :, -1:].contiguous()
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(DEV)
    v[~valid] = float("nan")
    return q, k, v, seg_start, seg_len, valid, scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("G", [1, 3, 4])
def test_decode_attention_writes_every_valid_slots_logits(G, dtype):
    """``slot_logits=``: the decode kernel's pass writes ``scale * <q, k>`` of each valid slot and query row (the
    reference's too), leaves the slack alone, and its output and lse do not change."""
    seed = int.from_bytes(os.urandom(4), "little")
    q, k, v, seg_start, seg_len, valid, scale = decode_case(G, 64, dtype, seed)
    S = k.shape[0]
    got = torch.full((S, G), 7.0, device=DEV)
    ref = torch.full((S, G), 7.0, device=DEV)
    out, lse = ragged_attention_triton(q, k, v, seg_start, seg_len, scale, chunk=32, slot_logits=got)
    out_ref, lse_ref = ragged_attention_reference(q, k, v, seg_start, seg_len, scale, slot_logits=ref)
    plain_out, plain_lse = ragged_attention_triton(q, k, v, seg_start, seg_len, scale, chunk=32)
    assert torch.equal(out, plain_out) and torch.equal(lse, plain_lse)
    msg = f"seed {seed}"
    torch.testing.assert_close(got[valid], ref[valid], rtol=1e-4, atol=1e-4, msg=msg)
    assert (got[~valid] == 7).all() and (ref[~valid] == 7).all()
    torch.testing.assert_close(lse, lse_ref, rtol=1e-4, atol=1e-4, msg=msg)
    with pytest.raises(ValueError, match="slot_logits must be"):
        ragged_attention_triton(q, k, v, seg_start, seg_len, scale, slot_logits=got[:, :1].contiguous() if G > 1
                                else got.double())


@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("G", [1, 3, 4])
def test_probs_from_logits_equal_probs_from_keys(G, reduce):
    """From the logits the attention wrote, the slot probabilities (and H2O's accumulation) equal those computed
    from the keys, at the valid slots; the slack is 0 (or keeps what ``out`` held)."""
    seed = int.from_bytes(os.urandom(4), "little")
    q, k, v, seg_start, seg_len, valid, scale = decode_case(G, 64, torch.bfloat16, seed)
    n_seg = len(LENS)
    logits = torch.empty(k.shape[0], G, device=DEV)
    _, lse = ragged_attention_triton(q, k, v, seg_start, seg_len, scale, slot_logits=logits)
    q3, lse2 = q.reshape(n_seg, G, -1), lse.reshape(n_seg, G)
    width = max(LENS) + 7
    from_keys = slot_attention_probs_reference(q3, lse2, k, seg_start, seg_len, width, scale, reduce)
    for fn in (slot_attention_probs_from_logits_triton, slot_attention_probs_from_logits_reference,
               slot_attention_probs_from_logits):
        got = fn(logits, lse2, seg_start, seg_len, width, reduce)
        torch.testing.assert_close(got, from_keys, rtol=1e-4, atol=1e-6, msg=f"{fn.__name__} seed {seed}")
    before = torch.rand(k.shape[0], device=DEV)
    before[~valid] = float("nan")
    acc = slot_attention_probs_from_logits_triton(logits, lse2, seg_start, seg_len, width, reduce, out=before.clone())
    torch.testing.assert_close(acc[valid], before[valid] + from_keys[valid], rtol=1e-4, atol=1e-6)
    assert acc[~valid].isnan().all()
    with pytest.raises(ValueError, match="lse must be"):
        slot_attention_probs_from_logits(logits, lse2[:-1], seg_start, seg_len, width)


AOT_COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvbench.kernels import slot_scores as ss

for accumulate in (False, True):
    src = ASTSource(fn=triton.jit(ss._slot_probs_kernel), signature={
        "Q": "*bf16", "LSE": "*fp32", "K": "*bf16", "SEG_START": "*i64", "SEG_LEN": "*i64", "OUT": "*fp32",
        **{n: "i32" for n in ("stride_qs", "stride_qg", "stride_qd", "stride_ls", "stride_lg", "stride_ks",
                              "stride_kd", "group")},
        "qk_scale": "fp32", "inv_group": "fp32", **{n: "constexpr" for n in (
            "LOG2E", "HEAD_DIM", "BLOCK_S", "BLOCK_D", "REDUCE_MAX", "ACCUMULATE")}},
        constexprs={"LOG2E": 1.4426950408889634, "HEAD_DIM": 128, "BLOCK_S": 64, "BLOCK_D": 128, "REDUCE_MAX": False,
                    "ACCUMULATE": accumulate})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    src = ASTSource(fn=triton.jit(ss._slot_probs_from_logits_kernel), signature={
        "LOGITS": "*fp32", "LSE": "*fp32", "SEG_START": "*i64", "SEG_LEN": "*i64", "OUT": "*fp32",
        "stride_ls": "i32", "stride_lg": "i32", "group": "i32", "inv_group": "fp32",
        **{n: "constexpr" for n in ("LOG2E", "BLOCK_S", "BLOCK_G", "REDUCE_MAX", "ACCUMULATE")}},
        constexprs={"LOG2E": 1.4426950408889634, "BLOCK_S": 256, "BLOCK_G": 4, "REDUCE_MAX": False,
                    "ACCUMULATE": accumulate})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print("compiled")
"""


def test_kernel_compiles_for_the_h200():
    """The interpreter accepts what the compiler refuses: both slot-score kernels compiled ahead of time for sm_90,
    without a GPU, in a process of its own (see tests/kernels/test_segment_evict.py). The decode attention writing
    the logits: tests/kernels/test_pdl.py."""
    import subprocess
    import sys
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", AOT_COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
