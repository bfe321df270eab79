"""kernels/segment_evict.py: the Triton search and move give exactly what the PyTorch ops of decode-time eviction
gave (ScoredEviction._evict_one's argmin over the padded view, RaggedKV.remove_one's copies), on ragged layouts
with empty and one-token segments, ties, NaN and garbage in the slack, and segments left out by the mask; and
h2o, tova and streamingllm decode to the same tokens and the same stores with the kernels as without.

Without CUDA the Triton paths run through Triton's interpreter; with CUDA the same
tests run compiled, and a CUDA-graph capture is checked too."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from kvbench.kernels import segment_evict
from kvbench.kernels.segment_evict import (
    move_last_into_reference,
    move_last_into_triton,
    segment_argmin_reference,
    segment_argmin_triton,
)

from tests.methods.test_decode_graph import _decode

HAS_CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def layout(lens, seed, max_slack=6):
    """Segments in random physical order with 0..max_slack slack slots each: start, length, capacity [N]."""
    g = torch.Generator().manual_seed(seed)
    seg_len = torch.tensor(lens, dtype=torch.int64)
    cap = seg_len + torch.randint(0, max_slack + 1, (len(lens),), generator=g)
    order = torch.randperm(len(lens), generator=g)
    start = torch.empty_like(cap)
    start[order] = torch.cumsum(cap[order], 0) - cap[order]
    return start, seg_len, cap


def scores_for(start, seg_len, cap, seed, kind):
    """Scores of every slot: ``ties`` draws from 3 values (many equal minima), ``nan`` puts NaN in some valid
    slots too; the slack holds NaN, -inf or huge negatives (what must never be picked)."""
    g = torch.Generator().manual_seed(seed)
    S = int(cap.sum())
    s = torch.randint(0, 3, (S,), generator=g).float() if kind == "ties" else torch.randn(S, generator=g)
    if kind == "inf":
        s[torch.rand(S, generator=g) < 0.5] = math.inf
    slot = torch.arange(S)
    seg = torch.empty(S, dtype=torch.int64)
    for i in range(len(start)):
        seg[int(start[i]):int(start[i] + cap[i])] = i
    slack = slot - start[seg] >= seg_len[seg]
    garbage = torch.tensor([math.nan, -math.inf, -1e30])[torch.randint(0, 3, (S,), generator=g)]
    s = torch.where(slack, garbage, s)
    if kind == "nan":
        s[(torch.rand(S, generator=g) < 0.05) & ~slack] = math.nan
    return s


def oracle(scores, start, seg_len):
    """Per segment in plain Python: the first NaN slot, else the lowest score's first slot; empty: slot 0."""
    out = []
    for a, n in zip(start.tolist(), seg_len.tolist()):
        vals = scores[a:a + n].tolist()
        nans = [j for j, x in enumerate(vals) if x != x]
        out.append(a + nans[0] if nans else a + min(range(n), key=lambda j: (vals[j], j)) if n else 0)
    return torch.tensor(out)


LENS = [5, 0, 1, 37, 2, 0, 18, 1, 64, 9]


@pytest.mark.parametrize("kind", ["randn", "ties", "nan", "inf"])
@pytest.mark.parametrize("seed", [0, 1])
def test_segment_argmin_equals_the_padded_argmin(kind, seed):
    start, seg_len, cap = layout(LENS, seed)
    scores = scores_for(start, seg_len, cap, seed, kind)
    width = int(cap.max())
    want = segment_argmin_reference(scores, start, seg_len, width)
    assert torch.equal(want, oracle(scores, start, seg_len))  # what torch's argmin gives, said plainly
    dev = [t.to(DEV) for t in (scores, start, seg_len)]
    for block in (16, None):  # several blocks per segment (ties and NaN across blocks), and the default
        got = segment_argmin_triton(*dev, width, block=block)
        assert got.dtype == torch.int64 and torch.equal(got.cpu(), want), (block, got, want)


def test_segment_argmin_orders_floats_as_argmin():
    """Signed zeros tie, negatives order by magnitude, denormals count, NaN beats -inf, an all-inf row gives its
    first slot, and one token is its own minimum."""
    tiny = 1e-45  # the smallest float32 denormal
    rows = [[0.0, -0.0], [-0.0, 0.0], [-math.inf, math.nan, math.nan], [1.0, -tiny, -0.0, tiny], [math.inf] * 3,
            [-1.0, -2.0, -2.0, -1.5], [3e38, -3e38, -math.inf], [5.0], [2.0, math.nan]]
    scores = torch.tensor([x for r in rows for x in r])
    seg_len = torch.tensor([len(r) for r in rows])
    start = torch.cumsum(seg_len, 0) - seg_len
    want = segment_argmin_reference(scores, start, seg_len, 4)
    assert (want - start).tolist() == [0, 0, 1, 1, 0, 1, 2, 0, 1]
    assert torch.equal(segment_argmin_triton(scores.to(DEV), start.to(DEV), seg_len.to(DEV), 4).cpu(), want)


def test_segment_argmin_of_bf16_scores_and_a_narrow_width():
    start, seg_len, cap = layout(LENS, 3)
    scores = scores_for(start, seg_len, cap, 3, "randn").bfloat16()
    for width in (int(cap.max()), 20):  # a width below a segment's length: only its first ``width`` columns
        want = segment_argmin_reference(scores, start, seg_len, width)
        got = segment_argmin_triton(scores.to(DEV), start.to(DEV), seg_len.to(DEV), width, block=16)
        assert torch.equal(got.cpu(), want)


def per_slot_tensors(S, g):
    """k, v (bf16 [S, D]), pos (int32), and per-slot state of other kinds: float32 with NaNs, bool, [S, 3] int64."""
    D = 24
    acc = torch.randn(S, generator=g)
    acc[::7] = math.nan
    return [torch.randn(S, D, generator=g).bfloat16(), torch.randn(S, D, generator=g).bfloat16(),
            torch.randint(0, 1000, (S,), generator=g, dtype=torch.int32), acc,
            torch.rand(S, generator=g) < 0.5, torch.randint(-9, 9, (S, 3), generator=g)]


def bits(t):
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _ranked_store(seed, B, H, shared):
    """Segments of a random ragged layout (each sequence's heads equally long when ``shared``), scores with NaN
    and all-inf rows, positions, and each sequence's newest position."""
    g = torch.Generator().manual_seed(seed)
    cap = torch.randint(5, 60, (B * H,), generator=g)
    if shared:
        seg_len = torch.randint(0, 50, (B,), generator=g).repeat_interleave(H)
        cap = cap.view(B, H).amax(1, keepdim=True).expand(B, H).reshape(-1) + 50
    else:
        seg_len = torch.minimum(torch.randint(0, 60, (B * H,), generator=g), cap)
    seg_start = torch.cumsum(cap, 0) - cap
    S = int(cap.sum())
    scores = torch.rand(S, generator=g)
    scores[::7] = float("nan") if seed % 2 else scores[::7]
    scores[: S // 3] = float("inf") if seed % 3 == 0 else scores[: S // 3]
    pos = torch.randint(0, 40, (S,), generator=g).to(torch.int32)
    newest = torch.randint(10, 40, (B,), generator=g)
    return scores, seg_start, seg_len, int(cap.max()), pos, newest, g


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("protect", ["none", "recent+sinks", "recent per sequence"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranking_options_and_the_split_search_equal_the_reference(shared, protect, seed):
    """Protected slots (newest tokens, sinks), TOVA's shared ranking and the search split over blocks of columns
    (two launches) give exactly the reference's slots."""
    B, H = 2, [1, 2, 4][seed]
    scores, seg_start, seg_len, width, pos, newest, g = _ranked_store(seed, B, H, shared)
    kw = {"none": {}, "recent+sinks": dict(pos=pos, newest=newest, recent=3, sinks=2),
          "recent per sequence": dict(pos=pos, newest=newest, recent=torch.randint(0, 5, (B,), generator=g))}[protect]
    want = segment_argmin_reference(scores, seg_start, seg_len, width, heads=H, shared=shared, **kw)
    for split, block in [(False, None), (True, 16), (True, 32)]:
        got = segment_argmin_triton(scores, seg_start, seg_len, width, heads=H, shared=shared, split=split,
                                    block=block, **kw)
        assert torch.equal(got, want), (split, block)
    if shared:  # one column for all the heads of a sequence
        col = (want - seg_start).view(B, H)
        assert bool((col == col[:, :1]).all())


def test_protection_needs_positions():
    scores, seg_start, seg_len, width, pos, newest, _ = _ranked_store(0, 2, 2, False)
    with pytest.raises(ValueError, match="need pos"):
        segment_argmin_triton(scores, seg_start, seg_len, width, sinks=2)
    with pytest.raises(ValueError, match="newest must be"):
        segment_argmin_triton(scores, seg_start, seg_len, width, pos=pos, newest=newest[:1], heads=2)


@pytest.mark.parametrize("masked", [True, False])
def test_move_last_into_equals_remove_ones_copies(masked):
    g = torch.Generator().manual_seed(5)
    start, seg_len, cap = layout(LENS, 5)
    S = int(cap.sum())
    scores = scores_for(start, seg_len, cap, 5, "ties")
    victim = segment_argmin_reference(scores, start, seg_len, int(cap.max()))
    victim[3] = start[3] + seg_len[3] - 1  # the last slot itself: copied onto itself
    nonempty = seg_len > 0
    # masked: some non-empty segments left out (the empty ones always are: a segment in the mask holds a token)
    mask = nonempty & (torch.rand(len(LENS), generator=g) < 0.7) if masked else None
    if not masked:
        start, seg_len, victim = start[nonempty], seg_len[nonempty], victim[nonempty]
    ref = per_slot_tensors(S, g)
    got = [t.clone().to(DEV) for t in ref]
    ref_len, got_len = seg_len.clone(), seg_len.clone().to(DEV)
    move_last_into_reference(ref, start, ref_len, victim, mask)
    move_last_into_triton(got, start.to(DEV), got_len, victim.to(DEV), None if mask is None else mask.to(DEV))
    assert torch.equal(got_len.cpu(), ref_len)
    assert torch.equal(ref_len, seg_len - (1 if mask is None else mask.long()))
    for a, b in zip(ref, got):
        assert torch.equal(bits(a), bits(b.cpu()))  # every slot, slack included, bit for bit (NaN too)


def test_move_last_into_refuses_what_it_cannot_copy(monkeypatch):
    S = 8
    one = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="contiguous, of real or integer dtype"):
        move_last_into_triton([torch.zeros(S, 4), torch.zeros(4, S).t()], one, one + 1, one)
    with pytest.raises(ValueError, match="contiguous, of real or integer dtype"):
        move_last_into_triton([torch.zeros(S, 4), torch.zeros(S + 1)], one, one + 1, one)
    # the dispatcher copies such a store in PyTorch instead (a strided per-slot tensor still moves)
    monkeypatch.setenv("KVBENCH_TRITON", "1")
    strided = torch.arange(2 * S, dtype=torch.float32).view(S, 2)[:, 0]
    seg_len = torch.tensor([S])
    segment_evict.move_last_into([torch.zeros(S, 4), strided], one, seg_len, one + 2)
    assert int(seg_len) == S - 1 and strided[2] == 2 * (S - 1)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_both_kernels_replay_in_a_cuda_graph():
    start, seg_len, cap = layout(LENS, 2)
    scores = scores_for(start, seg_len, cap, 2, "randn").to(DEV)
    S = int(cap.sum())
    rows = [t.to(DEV) for t in per_slot_tensors(S, torch.Generator().manual_seed(2))]
    start, seg_len = start.to(DEV), seg_len.to(DEV)
    mask = seg_len > 3
    ref_rows, ref_len = [t.clone() for t in rows], seg_len.clone()
    width = int(cap.max())

    def step(rows, seg_len, argmin, move):
        move(rows, start, seg_len, argmin(scores, start, seg_len, width), mask)

    step(ref_rows, ref_len, segment_argmin_reference, move_last_into_reference)
    step(ref_rows, ref_len, segment_argmin_reference, move_last_into_reference)
    warm = [t.clone() for t in rows], seg_len.clone()
    step(*warm, segment_argmin_triton, move_last_into_triton)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(rows, seg_len, segment_argmin_triton, move_last_into_triton)
    graph.replay()
    graph.replay()
    assert torch.equal(seg_len, ref_len)
    for a, b in zip(ref_rows, rows):
        assert torch.equal(bits(a), bits(b))


AOT_COMPILE = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvbench.kernels import segment_evict as se

scores, rows, widths, has_mask = json.loads(sys.argv[1])

def build(fn, signature, constexprs, num_warps):
    src = ASTSource(fn=triton.jit(fn), signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]

seg = {"START": "*i64", "LEN": "*i64"}
flags = ("PROTECT", "RECENT_PER_SEQ", "SHARED")
for protect, per_seq, shared in [(False, False, False), (True, True, False), (True, False, True)]:
    ptx = build(se._segment_argmin_kernel,
                {"SCORES": scores, **seg, "VICTIM": "*i64", "width": "i32", "POS": "*i32", "NEWEST": "*i64",
                 "RECENT": "*i64", "recent": "i32", "sinks": "i32", "heads": "i32", "PARTIAL": "*i64",
                 "n_chunks": "i32", **{f: "constexpr" for f in flags + ("STAGE", "BLOCK")}},
                {"PROTECT": protect, "RECENT_PER_SEQ": per_seq, "SHARED": shared, "STAGE": 0,
                 "BLOCK": se.ARGMIN_CONFIG["BLOCK"]},
                se.ARGMIN_CONFIG["num_warps"])
    assert "setp.eq.ftz" not in ptx, "denormal scores flushed to zero (argmin does not flush them)"
for stage, block in [(1, se.ARGMIN_CONFIG["SPLIT_BLOCK"]), (2, 16)]:  # the split search, shared and protected
    build(se._segment_argmin_kernel,
          {"SCORES": scores, **seg, "VICTIM": "*i64", "width": "i32", "POS": "*i32", "NEWEST": "*i64",
           "RECENT": "*i64", "recent": "i32", "sinks": "i32", "heads": "i32", "PARTIAL": "*i64", "n_chunks": "i32",
           **{f: "constexpr" for f in flags + ("STAGE", "BLOCK")}},
          {"PROTECT": True, "RECENT_PER_SEQ": True, "SHARED": True, "STAGE": stage, "BLOCK": block},
          se.ARGMIN_CONFIG["split_warps"])
build(se._move_last_kernel, {**seg, "VICTIM": "*i64", "MASK": "*u8", "ROWS": tuple(rows), "WIDTHS": "constexpr",
      "n_slots": "i64", "HAS_MASK": "constexpr", "BLOCK": "constexpr"},
      {"WIDTHS": tuple(widths), "HAS_MASK": has_mask, "BLOCK": 128}, 1)
print("compiled")
"""


@pytest.mark.parametrize("case", [
    ["*fp32", ["*i16", "*i16", "*i32", "*i32"], [128, 128, 1, 1], True],  # h2o's store: bf16 k/v, pos, fp32 acc
    ["*bf16", ["*i32", "*i32", "*i32", "*i8", "*i64"], [64, 64, 1, 1, 3], False]])
def test_kernels_compile_for_the_h200(case):
    """The interpreter accepts what the compiler refuses (a constexpr reassigned in a static loop did): both
    kernels compiled ahead of time for sm_90, without a GPU. In a process of its own: Triton's interpreter, once
    it has run in a process, leaves the compiler's code generation broken there."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", AOT_COMPILE, json.dumps(case)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]


def test_benchmark_runs_tiny(capsys):
    assert segment_evict.main(["--tiny"]) == 0
    out = capsys.readouterr().out
    assert "victims equal: True" in out and "(before)" in out and "segment_argmin kernel" in out


@pytest.mark.skipif(HAS_CUDA, reason="checks the message without a GPU")
def test_benchmark_without_a_gpu_says_so(capsys):
    assert segment_evict.main([]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out


@pytest.mark.parametrize("name,params", [("h2o", {}), ("tova", {}), ("streamingllm", {})])
def test_decoding_with_the_kernels_gives_the_same_tokens_and_stores(name, params, monkeypatch):
    """The replayed decoding step (its eviction through ``_evict_one``) with the kernels (interpreted on the CPU)
    against the PyTorch ops: same tokens, every store bit for bit (slots, slack, per-slot state, lengths)."""
    def run(kernels: bool):
        calls = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TRITON_INTERPRET", "1")  # the tiny model runs on the CPU, GPU or not
            mp.setattr(segment_evict, "use_triton", lambda x: kernels)
            for fn in ("segment_argmin_triton", "move_last_into_triton"):
                real = getattr(segment_evict, fn)
                mp.setattr(segment_evict, fn, lambda *a, _real=real, **kw: calls.append(fn) or _real(*a, **kw))
            out = _decode(name, 6, 1, mp, params)
        assert bool(calls) == kernels
        return out

    ref_tokens, ref = run(False)
    got_tokens, got = run(True)
    assert got_tokens == ref_tokens
    for a, b in zip(ref.stores, got.stores):
        assert torch.equal(a.length, b.length) and torch.equal(a.start, b.start)
        for x, y in zip([a.k, a.v, a.pos, *a.extra.values()], [b.k, b.v, b.pos, *b.extra.values()]):
            assert torch.equal(bits(x), bits(y))
        assert a.extra.keys() == b.extra.keys()
