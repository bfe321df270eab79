"""Triton kernels vs. their PyTorch references (kvbench.kernels).

On a machine without CUDA the kernels run through Triton's interpreter: the
module fixture below sets TRITON_INTERPRET=1 for these tests only (and restores
the environment afterwards).  The kernels are jitted lazily at call time, so the
setting takes effect whatever imported triton first.  With CUDA the same tests run
compiled.  Inputs are drawn fresh for every test (the seed is printed in each
failure message); outputs and scratch buffers are poisoned with NaN first.
"""

import os
import subprocess
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# The kernels are jitted lazily at call time (and triton's own jit helpers are
# swapped for interpreted twins during an interpreted launch), so the fixture
# below can switch the interpreter on for this module only, whatever imported
# triton first; see test_interpreter_after_triton_import.
from kvbench.kernels import decode_attention as da  # noqa: E402
from kvbench.kernels.decode_attention import (  # noqa: E402
    merge_attention,
    ragged_attention,
    ragged_attention_reference,
    ragged_attention_triton,
)
from kvbench.kernels.window_scores import (  # noqa: E402
    pool_scores,
    window_scores,
    window_scores_reference,
    window_scores_triton,
)

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
LSE_ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-3}


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    """Triton's interpreter for this module only, when there is no GPU."""
    prev = os.environ.get("TRITON_INTERPRET")
    if not HAS_CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    da._POISON_SCRATCH = True
    yield
    da._POISON_SCRATCH = False
    if prev is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = prev


def _fresh_gen():
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    return g, seed


def _rel(a, b):
    a = a.double()
    b = b.double()
    den = b.norm().item()
    return (a - b).norm().item() / max(den, 1e-30)


def make_store(lens, D, dtype, g, spare_max=7, poison_spare=True):
    """Packed ragged store: segments in random order with spare capacity
    (filled with NaN: never read).  Returns k, v, seg_start, seg_len."""
    n = len(lens)
    lens_t = torch.tensor(lens, dtype=torch.int64)
    cap = lens_t + torch.randint(0, spare_max + 1, (n,), generator=g)
    order = torch.randperm(n, generator=g)          # physical order of segments
    starts = torch.empty(n, dtype=torch.int64)
    off = int(torch.randint(0, 4, (1,), generator=g))  # a few unused slots at the front
    for i in order.tolist():
        starts[i] = off
        off += int(cap[i])
    S = off + int(torch.randint(0, 4, (1,), generator=g))
    k = torch.randn(S, D, generator=g).to(dtype)
    v = torch.randn(S, D, generator=g).to(dtype)
    if poison_spare:
        valid = torch.zeros(S, dtype=torch.bool)
        for i in range(n):
            valid[starts[i]: starts[i] + lens_t[i]] = True
        k[~valid] = float("nan")
        v[~valid] = float("nan")
    seg_len = lens_t.to(torch.int32) if torch.randint(0, 2, (1,), generator=g).item() else lens_t
    seg_start = starts if torch.randint(0, 2, (1,), generator=g).item() else starts.to(torch.int32)
    return k.to(DEV), v.to(DEV), seg_start.to(DEV), seg_len.to(DEV)


def ragged_lengths(n_seg, g, long_len):
    """Random lengths with the edge cases: 0, 1, block multiples +-1, one long."""
    others = [1, 15, 17, 31, 33, 63, 65, 97]
    pick = torch.randperm(len(others), generator=g).tolist()
    special = [0, long_len] + [others[i] for i in pick]
    lens = torch.randint(0, 120, (n_seg,), generator=g).tolist()
    pos = torch.randperm(n_seg, generator=g).tolist()
    for j, p in enumerate(pos[: min(len(special), n_seg)]):
        lens[p] = special[j]
    return lens


def _check_attention(q, k, v, ss, sl, scale, seed, **kw):
    dtype = q.dtype
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), dtype=torch.float32, device=q.device)
    o, l = ragged_attention_triton(q, k, v, ss, sl, scale, out=out, lse=lse, **kw)
    assert o.data_ptr() == out.data_ptr() and l.data_ptr() == lse.data_ptr()
    ro, rl = ragged_attention_reference(q, k, v, ss, sl, scale)
    assert o.dtype == dtype and l.dtype == torch.float32
    assert not torch.isnan(o).any(), f"unwritten/NaN output (seed {seed})"
    assert not torch.isnan(l).any(), f"unwritten/NaN lse (seed {seed})"
    err = _rel(o, ro)
    assert err < TOL[dtype], f"rel err {err:.3g} (seed {seed}, {kw})"
    fin = torch.isfinite(rl)
    assert torch.equal(fin, torch.isfinite(l)), f"-inf pattern differs (seed {seed})"
    assert (l[~fin] == float("-inf")).all()
    if fin.any():
        lerr = (l[fin] - rl[fin]).abs().max().item()
        assert lerr < LSE_ATOL[dtype] * max(1.0, rl[fin].abs().max().item()), f"lse err {lerr} (seed {seed})"
    # empty segments: out exactly 0
    assert (o[~fin] == 0).all()
    return o, l


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 3, 4, 8])
def test_ragged_attention_matches_reference(dtype, G):
    g, seed = _fresh_gen()
    B, Hkv, D = 2, 2, 64
    n_seg = B * Hkv
    long_len = 700 if not HAS_CUDA else 5000
    lens = ragged_lengths(n_seg, g, long_len)
    k, v, ss, sl = make_store(lens, D, dtype, g)
    scale = D ** -0.5
    for Tq in (1, 5):
        q = torch.randn(B, Hkv * G, Tq, D, generator=g).to(dtype).to(DEV)
        # forced small chunks and tiles: many chunks per segment, ragged tails
        _check_attention(q, k, v, ss, sl, scale, seed, chunk=96, block_n=32)
        if Tq == 1:  # default configuration (chunk chosen from S)
            _check_attention(q, k, v, ss, sl, scale, seed)
            # chunk chosen for a huge store: the long-chunk tier (BLOCK_N 128)
            _check_attention(q, k, v, ss, sl, scale, seed, total_tokens=10**8)


@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_queries_attention_is_the_oracles(dtype, G):
    from kvbench.kernels.decode_attention import ragged_attention_many_queries
    g, seed = _fresh_gen()
    B, Hkv, D = 2, 2, 32
    for lens in (ragged_lengths(B * Hkv, g, 300), [40] * (B * Hkv)):  # ragged with an empty segment; all alike
        k, v, ss, sl = make_store(lens, D, dtype, g)
        q = torch.randn(B, Hkv * G, 37, D, generator=g).to(dtype).to(DEV)
        ro, rl = ragged_attention_reference(q.float(), k, v, ss, sl, 0.3)  # float32 out, as the new one's
        for known in (None, sl.tolist()):  # the lengths read back, or given as the host knows them
            o, l = ragged_attention_many_queries(q, k, v, ss, sl, 0.3, host_lengths=known)
            assert o.dtype == l.dtype == torch.float32 and o.shape == q.shape
            torch.testing.assert_close(o, ro, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
            torch.testing.assert_close(l, rl, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
            assert bool((o[~torch.isfinite(l)] == 0).all())


def test_ragged_attention_long_tq_and_row_tiles():
    """Tq large enough that the G*Tq rows span several row tiles."""
    g, seed = _fresh_gen()
    B, Hkv, G, Tq, D = 1, 2, 4, 24, 32   # 96 rows -> 2 tiles of 64
    lens = [0, 150]
    for dtype in (torch.float32, torch.bfloat16):
        k, v, ss, sl = make_store(lens, D, dtype, g)
        q = torch.randn(B, Hkv * G, Tq, D, generator=g).to(dtype).to(DEV)
        _check_attention(q, k, v, ss, sl, 0.3, seed, chunk=64, block_n=32)


def test_ragged_attention_odd_head_dim_and_strided_q():
    g, seed = _fresh_gen()
    B, Hkv, G, Tq, D = 2, 2, 2, 3, 40
    lens = ragged_lengths(B * Hkv, g, 200)
    k, v, ss, sl = make_store(lens, D, torch.float32, g)
    qbig = torch.randn(B, Tq, Hkv * G, D, generator=g).to(DEV)
    q = qbig.transpose(1, 2)                       # non-contiguous [B, Hq, Tq, D]
    _check_attention(q, k, v, ss, sl, 0.2, seed, chunk=64, block_n=16)


def test_an_evened_chunk_adds_no_second_wave(monkeypatch):
    """Given every segment's length, the chunk evened over the longest head is kept only if it adds no items past
    one a slot (264 on 132 SMs), or past the plain chunk's: on the H200 the ragged 8 x 16k bench layout evened from
    4096 to 3968 slots gained 8-16 second-wave items and ran 9% slower (results/bench/h200-kernels/), where 8 x 4k
    ragged and 8 x 8k uniform gained from it."""
    from kvbench.kernels.bench import HKV, ragged_lengths
    monkeypatch.setattr(da, "_num_sms", lambda device: 132)
    cpu = torch.device("cpu")

    def chunks(B, L, lengths):
        n = B * HKV
        return (da.choose_chunk(n * L, cpu, 64, n, max(lengths), wide=True),
                da.choose_chunk(n * L, cpu, 64, n, max(lengths), lengths, wide=True))

    def items(chunk, lengths):
        return sum(-(-x // chunk) for x in lengths)

    rag = {L: ragged_lengths(8, L, 10.0, torch.Generator().manual_seed(0)).tolist() for L in (4096, 16384, 32768)}
    assert chunks(8, 16384, rag[16384]) == (3968, 4096)  # 288 items against 280
    assert (items(3968, rag[16384]), items(4096, rag[16384])) == (288, 280)
    assert chunks(8, 32768, rag[32768]) == (3968, 4096)
    assert chunks(8, 4096, rag[4096]) == (1280, 1280)  # 240 items, under one a slot: kept
    assert chunks(8, 8192, [8192] * 64) == (2048, 2048)  # uniform: as many items, none a sliver
    g = torch.Generator().manual_seed(1)
    for _ in range(200):  # whatever the layout, never more items than one a slot or the plain chunk's
        n = int(torch.randint(1, 256, (1,), generator=g))
        lengths = torch.randint(1, 200_000, (n,), generator=g).tolist()
        chosen = da.choose_chunk(sum(lengths), cpu, 64, n, max(lengths), lengths, wide=True)
        plain = da.choose_chunk(sum(lengths), cpu, 64, n, wide=True)
        assert items(chosen, lengths) <= max(items(plain, lengths), 264), (n, chosen, plain)


def test_chunks_split_the_longest_head_evenly(monkeypatch):
    """On 132 SMs (an H100 / H200), 8 sequences of 8 heads x 8192 slots were cut 2688 x 3 + 128: given the longest
    segment, the chunk is evened out over it, as many items and none longer, the last one not a sliver. Without it
    the chunk is not evened: over the mean head it cut ragged layouts into more items (H200, 8 x 4k with a 1:10
    spread between heads: 1344 -> 1024 slots, 224 -> 280 items, 4-8% slower; results/bench/h200-kernels/)."""
    monkeypatch.setattr(da, "_num_sms", lambda device: 132)
    cpu = torch.device("cpu")
    assert da.choose_chunk(8 * 8 * 8192, cpu, 64, 64, longest=8192) == 2048
    assert da.choose_chunk(8 * 8 * 8192, cpu, 64, 64) == 2624  # 2688 once rounded to the wide tile (128)
    # the ragged bench shape (batch 8, heads 9898 slots at most): the longest head keeps its 8 items, evened
    assert da.choose_chunk(8 * 8 * 4096, cpu, 64, 64) == 1344
    assert da.choose_chunk(8 * 8 * 4096, cpu, 64, 64, longest=9898) == 1280
    for batch in (1, 2, 4, 8, 16, 27, 32, 64):
        for length in (1000, 1024, 4096, 5000, 8192, 16384, 32768, 131072):
            raw = da.choose_chunk(batch * 8 * length, cpu, 64, batch * 8)
            chunk = da.choose_chunk(batch * 8 * length, cpu, 64, batch * 8, longest=length)
            items = -(-length // chunk)
            assert chunk % 64 == 0 and chunk <= raw <= da.DECODE_CONFIG["max_chunk"], (batch, length, chunk)
            assert items == -(-length // raw), (batch, length, chunk, raw)  # as many items as before
            # as even as whole tiles allow: the smallest multiple of the tile that cuts a head into that many items
            assert items == 1 or chunk == -(-(-(-length // items)) // 64) * 64, (batch, length, chunk)


def test_all_segments_empty():
    g, seed = _fresh_gen()
    k, v, ss, sl = make_store([0, 0, 0], 32, torch.float32, g)
    q = torch.randn(3, 2, 1, 32, generator=g).to(DEV)  # B=3, Hkv=1, G=2
    o, l = _check_attention(q, k, v, ss, sl, 0.5, seed)
    assert (o == 0).all() and (l == float("-inf")).all()


def test_dispatch(monkeypatch):
    g, seed = _fresh_gen()
    lens = [5, 0, 33, 70]
    k, v, ss, sl = make_store(lens, 32, torch.float32, g)
    q = torch.randn(2, 4, 1, 32, generator=g).to(DEV)
    calls = []
    real = da.ragged_attention_triton
    monkeypatch.setattr(da, "ragged_attention_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.delenv("KVBENCH_TRITON", raising=False)
    o1, l1 = ragged_attention(q, k, v, ss, sl, 0.3)
    assert len(calls) == (1 if HAS_CUDA else 0)
    monkeypatch.setenv("KVBENCH_TRITON", "1")
    o2, l2 = ragged_attention(q, k, v, ss, sl, 0.3)
    assert len(calls) == (2 if HAS_CUDA else 1)
    assert _rel(o1, o2) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_attention(dtype):
    """Attention over A u B equals merge(attention over A, attention over B)."""
    g, seed = _fresh_gen()
    B, Hkv, G, Tq, D = 2, 2, 3, 2, 32
    lens = [0, 1, 90, 47]
    k, v, ss, sl = make_store(lens, D, dtype, g, poison_spare=False)
    q = torch.randn(B, Hkv * G, Tq, D, generator=g).to(dtype).to(DEV)
    sl64 = sl.long()
    # split every segment at a random point (A = prefix, B = the rest; some empty)
    cut = torch.stack([torch.randint(0, int(n) + 1, (1,), generator=g)[0] for n in sl64.cpu()]).to(DEV)
    cut[0] = 0
    if int(sl64[2]) > 0:
        cut[2] = sl64[2]            # B empty for this one
    ss_a, sl_a = ss.long(), cut
    ss_b, sl_b = ss.long() + cut, sl64 - cut
    for fn in (ragged_attention_reference, ragged_attention_triton):
        oa, la = fn(q, k, v, ss_a, sl_a, 0.25)
        ob, lb = fn(q, k, v, ss_b, sl_b, 0.25)
        om, lm = merge_attention(oa, la, ob, lb)
        ro, rl = ragged_attention_reference(q, k, v, ss, sl, 0.25)
        assert not torch.isnan(om).any() and not torch.isnan(lm).any()
        assert _rel(om, ro) < TOL[dtype], f"merge via {fn.__name__} (seed {seed})"
        fin = torch.isfinite(rl)
        assert torch.equal(fin, torch.isfinite(lm))
        assert (lm[fin] - rl[fin]).abs().max().item() < 1e-3
        assert (om[~fin] == 0).all()
    # both sides empty
    e = torch.full((2, 3), float("-inf"))
    om, lm = merge_attention(torch.zeros(2, 3, 4), e, torch.zeros(2, 3, 4), e)
    assert (om == 0).all() and (lm == float("-inf")).all()


# ----------------------------------------------------------------- windows

def _window_inputs(g, B, Hkv, G, w, D, dtype, lens):
    k, _, ss, sl = make_store(lens, D, dtype, g, poison_spare=True)
    S = k.shape[0]
    k_pos = torch.full((S,), 10**9, dtype=torch.int64)   # invalid slots: far future
    ss_c, sl_c = ss.long().cpu(), sl.long().cpu()
    for i in range(len(lens)):
        n = int(sl_c[i])
        k_pos[ss_c[i]: ss_c[i] + n] = torch.randperm(n, generator=g) + 3  # any slot order
    prompt = max(max(lens), 1) + 3
    q_pos = torch.stack([torch.arange(prompt - w, prompt) for _ in range(B)])
    if B > 1:  # a batch element whose window starts before every key: rows see nothing
        q_pos[1] = torch.arange(0, w)
    q = torch.randn(B, Hkv * G, w, D, generator=g).to(dtype)
    kp = k_pos.to(torch.int32) if torch.randint(0, 2, (1,), generator=g).item() else k_pos
    return q.to(DEV), q_pos.to(DEV), k, kp.to(DEV), ss, sl


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_window_scores_matches_reference(dtype, reduce):
    g, seed = _fresh_gen()
    B, Hkv, G, w, D = 2, 2, 4 if reduce == "mean" else 3, 7, 32
    lens = ragged_lengths(B * Hkv, g, 300 if not HAS_CUDA else 3000)
    q, qp, k, kp, ss, sl = _window_inputs(g, B, Hkv, G, w, D, dtype, lens)
    ref = window_scores_reference(q, qp, k, kp, ss, sl, 0.2, reduce)
    in_seg = torch.zeros_like(ref, dtype=torch.bool)
    for i in range(len(lens)):
        s0, n = int(ss[i]), int(sl[i])
        in_seg[s0: s0 + n] = True
    for kw in ({"n_split": 3, "block_n": 32}, {}):
        out = torch.zeros_like(ref)
        out[in_seg] = float("nan")   # poison every valid slot (a 0 score is legal there)
        got = window_scores_triton(q, qp, k, kp, ss, sl, 0.2, reduce, out=out, **kw)
        assert not torch.isnan(got).any(), f"unwritten scores (seed {seed})"
        err = _rel(got, ref)
        assert err < TOL[dtype], f"rel err {err:.3g} (seed {seed}, {kw})"
        assert (got[~in_seg] == 0).all()
    assert (ref[~in_seg] == 0).all()


def test_window_scores_with_given_normalisers():
    """Handing in the rows' log-sum-exp (as a decoding step's attention returns it) skips pass 1 and gives
    the same scores."""
    g, seed = _fresh_gen()
    B, Hkv, G, w, D = 2, 2, 3, 1, 32
    lens = ragged_lengths(B * Hkv, g, 300)
    q, qp, k, kp, ss, sl = _window_inputs(g, B, Hkv, G, w, D, torch.float32, lens)
    lse = torch.full((B, Hkv * G, w), float("-inf"))
    for b in range(B):
        for h in range(Hkv):
            s0, n = int(ss[b * Hkv + h]), int(sl[b * Hkv + h])
            keys, pos = k[s0: s0 + n].float().cpu(), kp[s0: s0 + n].long().cpu()
            for j in range(G):
                for t in range(w):
                    seen = pos <= int(qp[b, t])
                    if seen.any():
                        lse[b, h * G + j, t] = torch.logsumexp(keys[seen] @ q[b, h * G + j, t].float().cpu() * 0.2, 0)
    for reduce in ("mean", "max"):
        ref = window_scores_reference(q, qp, k, kp, ss, sl, 0.2, reduce)
        got = window_scores_triton(q, qp, k, kp, ss, sl, 0.2, reduce, lse=lse.to(q.device))
        assert _rel(got, ref) < 1e-4, f"{reduce}: seed {seed}"


def test_window_scores_large_window_and_dispatch(monkeypatch):
    g, seed = _fresh_gen()
    B, Hkv, G, w, D = 1, 2, 2, 40, 64        # G*w = 80 rows: 2 row tiles in pass 1
    lens = [257, 130]
    q, qp, k, kp, ss, sl = _window_inputs(g, B, Hkv, G, w, D, torch.float32, lens)
    ref = window_scores_reference(q, qp, k, kp, ss, sl, 0.125, "mean")
    got = window_scores_triton(q, qp, k, kp, ss, sl, 0.125, "mean", n_split=2, block_n=64)
    assert _rel(got, ref) < 1e-4, f"seed {seed}"
    # every window row sees every key here: each head's probabilities sum to w
    assert abs(ref.sum().item() - Hkv * w) < 1e-3
    monkeypatch.setenv("KVBENCH_TRITON", "1")
    got2 = window_scores(q, qp, k, kp, ss, sl, 0.125, "mean")
    assert _rel(got2, ref) < 1e-4


def _pool_loop(scores, ss, sl, kernel, kind):
    out = torch.zeros_like(scores)
    pad = kernel // 2
    for s0, n in zip(ss.tolist(), sl.tolist()):
        x = scores[s0: s0 + n]
        for j in range(n):
            lo, hi = j - pad, j - pad + kernel
            win = x[max(lo, 0): min(hi, n)]
            if kind == "max":
                out[s0 + j] = win.max()
            else:
                out[s0 + j] = win.sum() / kernel
    return out


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("kernel", [1, 4, 7])
def test_pool_scores(kind, kernel):
    g, seed = _fresh_gen()
    lens = [0, 1, 3, 12, 40]
    ss = torch.tensor([50, 0, 5, 10, 25 + 50])   # arbitrary order, gaps between segments
    sl = torch.tensor(lens)
    S = 130
    scores = torch.rand(S, generator=g) + 0.1
    got = pool_scores(scores, ss, sl, kernel, kind)
    want = _pool_loop(scores, ss, sl, kernel, kind)
    assert torch.allclose(got, want, atol=1e-6), f"seed {seed}"
    valid = torch.zeros(S, dtype=torch.bool)
    for s0, n in zip(ss.tolist(), lens):
        valid[s0: s0 + n] = True
    assert (got[~valid] == 0).all()


@pytest.mark.skipif(HAS_CUDA, reason="interpreter-only concern")
def test_interpreter_after_triton_import():
    """TRITON_INTERPRET set after triton (and the kernels) were imported."""
    code = (
        "import triton, triton.language, os, torch\n"
        "from kvbench.kernels.decode_attention import ragged_attention_triton, ragged_attention_reference\n"
        "from kvbench.kernels.window_scores import window_scores_triton, window_scores_reference\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "q = torch.randn(1, 4, 1, 32); k = torch.randn(50, 32); v = torch.randn(50, 32)\n"
        "ss = torch.tensor([0, 20]); sl = torch.tensor([20, 30])\n"
        "o, l = ragged_attention_triton(q, k, v, ss, sl, 0.2, chunk=16, block_n=16)\n"
        "r, rl = ragged_attention_reference(q, k, v, ss, sl, 0.2)\n"
        "assert (o - r).abs().max() < 1e-4 and (l - rl).abs().max() < 1e-4\n"
        "qp = torch.tensor([[48, 49]]); kp = torch.arange(50)\n"
        "qw = torch.randn(1, 4, 2, 32)\n"
        "a = window_scores_triton(qw, qp, k, kp, ss, sl, 0.2)\n"
        "b = window_scores_reference(qw, qp, k, kp, ss, sl, 0.2)\n"
        "assert (a - b).abs().max() < 1e-5\n"
        "assert isinstance(triton.language.sum, triton.runtime.jit.JITFunction)  # restored\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]

