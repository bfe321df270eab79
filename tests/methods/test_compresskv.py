"""CompressKV: head scoring with a planted retrieval head, budget arithmetic, selection against a slow
reference (PyTorch and the Triton kernel under the interpreter), calibration files and artifacts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kvbench import artifact, models, registry, results
from kvbench.cache import KVCache
from kvbench.kernels.window_scores import window_scores_reference, window_scores_triton
from kvbench.methods.compresskv import (CompressKV, CompressKVError, allocate_layer_budgets,
                                        read_official_head_ranking, read_official_layer_scores)
from kvbench.methods.compresskv.calibrate import Grid, NeedleProbe, find_span, rank_heads, score_test
from kvbench.models import LoadedModel
from kvbench.engine import Engine
from kvbench.task import Sample
from tests.conftest import FIXTURES, ROOT, IdTokenizer, tiny as tiny_model

FIX = FIXTURES / "compresskv"
HEAD_IDX, LAYER_SCORES = str(FIX / "tiny_head_idx.json"), str(FIX / "tiny_layer_score.jsonl")


def tiny(seed: int = 0) -> LoadedModel:
    return tiny_model("llama", seed)


# ---- budgets --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scores,total,lo,hi,want", [
    ([0.5, 0.25, 0.25], 192, 32, 192, [80, 56, 56]),       # exact shares
    ([1 / 3, 1 / 3, 1 / 3], 100, 0, 100, [34, 33, 33]),     # short by 1: the first most important gets it
    ([0.25] * 4, 10, 0, 10, [3, 3, 2, 2]),                   # 2.5 rounds half to even (2): +1 on two
    ([0.375, 0.375, 0.25], 4, 0, 4, [2, 2, 0]),              # 1.5 -> 2 twice: over by 1, least important pays
    ([1.0, 0.0, 0.0, 0.0], 160, 8, 120, [120, 14, 13, 13]),  # 136 clipped to 120; the 16 go round the others
    ([0.1, 0.9], 64, 32, 96, [32, 32]),                      # nothing above the floor to share
])
def test_layer_budget_allocation(scores, total, lo, hi, want):
    got = allocate_layer_budgets(scores, total, lo, hi)
    assert got == want
    assert sum(got) == total and all(lo <= b <= hi for b in got)


def test_budgets_follow_budget_semantics():
    m = CompressKV(budget=40, head_idx=HEAD_IDX, layer_scores=LAYER_SCORES)
    assert m.layer_budgets(40, 2) == [43, 37]  # 32 + round(0.7 * 16), 32 + round(0.3 * 16)
    assert m.layer_budgets(20, 2) == [20, 20]  # under the floor of 32: the floor drops to the budget
    frac = CompressKV(budget=0.5, head_idx=HEAD_IDX, layer_scores=LAYER_SCORES)
    assert frac.layer_budgets(50, 2) == [57, 43]  # 32 + round(0.7 * 36), 32 + round(0.3 * 36)
    assert CompressKV(budget=40, head_idx=HEAD_IDX, uniform=True).layer_budgets(40, 2) == [40, 40]


# ---- calibration files --------------------------------------------------------------------------------------
def test_official_files_are_read(tmp_path):
    assert read_official_head_ranking(HEAD_IDX) == [[1, 3, 0, 2], [2, 0, 3, 1]]
    assert read_official_layer_scores(LAYER_SCORES) == pytest.approx([0.7, 0.3])
    assert read_official_layer_scores(LAYER_SCORES, "qasper") == pytest.approx([0.2, 0.8])
    with pytest.raises(CompressKVError, match="has no 'lcc' scores"):
        read_official_layer_scores(LAYER_SCORES, "lcc")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"0": [1, 1], "1": [0, 1]}))
    with pytest.raises(CompressKVError, match="layer 0: expected a list of distinct"):
        read_official_head_ranking(bad)


def test_refused_without_calibration():
    with pytest.raises(CompressKVError, match="needs its calibration: --artifact DIR"):
        registry.build_method("compresskv", 64)
    with pytest.raises(CompressKVError, match="uniform=true"):
        registry.build_method("compresskv", 64, {"head_idx": HEAD_IDX})
    m = registry.build_method("compresskv", 64, {"head_idx": HEAD_IDX, "uniform": "true"})
    assert m.layer_budgets(64, 2) == [64, 64]
    with pytest.raises(CompressKVError, match="no room beside its window"):
        registry.build_method("compresskv", 8, {"head_idx": HEAD_IDX, "layer_scores": LAYER_SCORES})


def make_artifact(path, lm, layer_scores=(0.7, 0.3)):
    meta = {"head_ranking": [[1, 3, 0, 2], [2, 0, 3, 1]], "head_scores": [[0.0] * 4] * 2,
            "layer_scores": list(layer_scores) if layer_scores else None}
    return artifact.save(path, "compresskv", artifact.model_identity(lm), meta)


def test_artifact_round_trip_and_other_model_refused(tmp_path):
    lm = tiny(0)
    out = make_artifact(tmp_path / "ckv", lm)
    m = registry.build_method("compresskv", 40, {"artifact": str(out)})
    m.prepare(lm)
    assert m.layer_budgets(40, 2) == [43, 37]
    with pytest.raises(artifact.ArtifactError, match="was made for tiny-llama"):
        registry.build_method("compresskv", 40, {"artifact": str(out)}).prepare(tiny(1))
    other = models.random_model("tiny-qwen2", torch.float32, "cpu", 0)[0]
    with pytest.raises(artifact.ArtifactError):
        registry.build_method("compresskv", 40, {"artifact": str(out)}).prepare(
            LoadedModel(other, IdTokenizer(), "tiny-qwen2", 4096))
    bare = make_artifact(tmp_path / "bare", lm, layer_scores=None)
    with pytest.raises(CompressKVError, match="uniform=true"):
        registry.build_method("compresskv", 40, {"artifact": str(bare)})


# ---- selection ------------------------------------------------------------------------------------------------
def reference_keep(q, k, heads, budget, window, kernel, scale, pooling="avg"):
    """The official selection on dense tensors: q [1, Hq, N, D], k [1, Hkv, N, D] -> kept positions. Each chosen
    head's scores are pooled, then averaged over the heads (TUDa-HWAI/CompressKV snapkv_utils.py): the same as
    averaging first for average pooling, not for max pooling."""
    N = q.shape[2]
    if N < budget:
        return list(range(N))
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    a = torch.matmul(q[:, :, -window:].double(), k.double().transpose(2, 3)) * scale
    a[:, :, :, -window:] += torch.triu(torch.full((window, window), float("-inf"), dtype=torch.double), 1)
    p = torch.softmax(a, dim=-1)[:, :, :, :-window].sum(dim=-2)
    p = (F.avg_pool1d if pooling == "avg" else F.max_pool1d)(p, kernel_size=kernel, padding=kernel // 2, stride=1)
    layer = p[:, heads].mean(dim=1)[0]
    top = layer.topk(budget - window, dim=-1).indices
    return sorted(top.tolist()) + list(range(N - window, N)), layer


@pytest.mark.parametrize("triton,pooling", [(False, "avg"), (True, "avg"), (False, "max")])
def test_selection_matches_slow_reference(triton, pooling, monkeypatch):
    if triton:
        monkeypatch.setenv("KVBENCH_TRITON", "1")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    lm = tiny(0)
    method = CompressKV(budget=40, head_idx=HEAD_IDX, layer_scores=LAYER_SCORES, first_k=2, pooling=pooling)
    method.prepare(lm)
    cfg = lm.model.config
    cache = KVCache(method, cfg, 1, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    N, D, scale = 60, cfg.head_dim, cfg.head_dim ** -0.5
    cache.begin(torch.arange(N)[None], compress=True, final=True)
    for layer, budget in enumerate([43, 37]):
        q = torch.randn(1, cfg.num_attention_heads, N, D, generator=g) * 2
        k = torch.randn(1, cfg.num_key_value_heads, N, D, generator=g) * 2
        v = torch.randn(1, cfg.num_key_value_heads, N, D, generator=g)
        cache.attention(layer, q, k, v, scale)
        store = cache.stores[layer]
        want, ref_scores = reference_keep(q, k, method._heads[layer][:2], budget, 8, 5, scale, pooling)
        assert store.length.tolist() == [budget] * cfg.num_key_value_heads
        for h in range(cfg.num_key_value_heads):
            got = store.pos[int(store.start[h]): int(store.start[h] + store.length[h])].tolist()
            if pooling == "avg":
                assert got == want
            else:  # max pooling makes plateaus of equal scores: the same scores kept, ties broken either way
                assert got[-8:] == want[-8:]
                assert torch.equal(ref_scores[got[:-8]].sort().values, ref_scores[want[:-8]].sort().values)


def test_window_scores_per_head_kernel(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(1)
    B, Hkv, G, w, D = 2, 2, 3, 5, 16
    lengths = torch.tensor([37, 37, 20, 20])
    start = torch.zeros(4, dtype=torch.long)
    start[1:] = torch.cumsum(lengths + 3, 0)[:-1]  # slack between segments
    S = int(start[-1] + lengths[-1] + 3)
    k = torch.randn(S, D, generator=g)
    k_pos = torch.full((S,), -5, dtype=torch.int32)
    for i in range(4):
        k_pos[start[i]: start[i] + lengths[i]] = torch.arange(int(lengths[i]), dtype=torch.int32)
    q_pos = torch.stack([torch.arange(32, 37), torch.arange(15, 20)])
    q = torch.randn(B, Hkv * G, w, D, generator=g)
    ref = window_scores_reference(q, q_pos, k, k_pos, start, lengths, 0.3, "none")
    got = window_scores_triton(q, q_pos, k, k_pos, start, lengths, 0.3, "none", n_split=2, block_n=16)
    assert ref.shape == (S, G)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ref.mean(1), window_scores_reference(q, q_pos, k, k_pos, start, lengths, 0.3, "mean"))


def test_engine_keeps_layer_budgets_and_skips_short_prompts():
    lm = tiny(0)
    eng = Engine(lm, registry.build_method("compresskv", 40, {"head_idx": HEAD_IDX, "layer_scores": LAYER_SCORES}))
    g = torch.Generator().manual_seed(3)
    ctx = torch.randint(3, 1000, (90,), generator=g).tolist()
    cache, _, _ = eng.prefill(Sample("s", ctx, [5, 6], [], 4))
    counts = cache.token_counts()[:, 0]  # [layers, KV heads] after the question (appended, not compressed)
    assert counts.tolist() == [[45, 45], [39, 39]]
    short, _, _ = eng.prefill(Sample("t", ctx[:36], [5, 6], [], 4))
    assert short.token_counts()[:, 0].tolist() == [[38, 38], [38, 38]]  # 36 < 37 and 43: left alone
    rec = eng.generate([Sample("s", ctx, [5, 6], [], 4)])[0]
    assert len(rec["prediction"].split()) == 4


# ---- semantic retrieval heads -----------------------------------------------------------------------------
def planted(layer: int, head: int, needle_tokens: list[int], answer_token: int) -> LoadedModel:
    """A tiny model whose query head ``head`` of ``layer`` attends (almost) only to the needle tokens, and
    that always predicts ``answer_token`` (a needle token): the head's attention is all on the needle."""
    lm = tiny(0)
    m, cfg = lm.model, lm.model.config
    D, G = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    with torch.no_grad():
        emb = m.model.embed_tokens.weight
        emb[:, 0], emb[:, 1] = 1.0, 0.0  # a constant feature, and a needle feature
        emb[needle_tokens, 1] = 1.0
        attn = m.model.layers[layer].self_attn
        lowest = D // 2 - 1  # the slowest RoPE pair: barely rotates over a short prompt
        krow, qrow = (head // G) * D + lowest, head * D + lowest
        attn.k_proj.weight[krow] = 0.0
        attn.k_proj.weight[krow, 1] = 4.0
        attn.q_proj.weight[qrow] = 0.0
        attn.q_proj.weight[qrow, 0] = 4.0
        m.lm_head.weight[answer_token] = 0.0
        m.lm_head.weight[answer_token, 0] = 50.0
    return lm


def test_planted_retrieval_head_ranks_first():
    needle = [901, 902, 903, 904, 905, 906]
    lm = planted(layer=1, head=2, needle_tokens=needle, answer_token=903)
    g = torch.Generator().manual_seed(5)
    hay = torch.randint(10, 800, (120,), generator=g).tolist()
    ids = hay[:70] + needle + hay[70:]
    span = find_span(ids, needle)
    assert span == (70, 76)
    probe = NeedleProbe(budget=1.0)
    tokens, score = score_test(Engine(lm, probe), probe, ids, span, max_new=5)
    assert tokens == [903] * 5
    assert rank_heads(score)[1][0] == 2
    # five credited steps; the head's attention is on the needle (shared, after the first step, with the
    # answer tokens, which carry the needle feature too)
    assert score[1, 2] > 0.5 * 5
    assert score[1, 2] > 2 * score[1, [0, 1, 3]].max()
    # a step whose token is not in the needle earns nothing
    tokens, score = score_test(Engine(lm, probe), probe, ids[:70] + [1, 2, 3, 4, 5, 6] + ids[76:], (70, 76), 3)
    assert float(score.abs().sum()) == 0.0


def test_grid_parsing():
    g = Grid.parse("lengths=1000,2000,depths=0,50,100", 8192)
    assert g.lengths == [1000, 2000] and g.depths == [0.0, 50.0, 100.0]
    d = Grid.default(8192)
    assert len(d.lengths) == 20 and d.lengths[0] == 1000 and d.lengths[-1] == 8192
    assert d.depths == [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]
    with pytest.raises(CompressKVError, match="is not 'lengths="):
        Grid.parse("sizes=1", 8192)


# ---- the committed SmolLM2 calibration ------------------------------------------------------------------
@pytest.mark.slow
def test_committed_smollm2_calibration_runs():
    """checkpoints/compresskv-smollm2-135m was made by `kvbench calibrate compresskv` for this very model."""
    root = ROOT / "checkpoints" / "compresskv-smollm2-135m"
    try:
        lm = models.load("smollm2-135m")
    except models.ModelError as e:
        pytest.skip(f"SmolLM2 not available here: {e}")
    meta = artifact.read_meta(root, "compresskv")
    assert meta["counted_tests"] >= 1 and meta["layer_scores"] is not None
    method = registry.build_method("compresskv", 64, {"artifact": str(root)})
    eng = Engine(lm, method)
    ctx = lm.tokenizer.encode("The grass is green. The sky is blue. " * 60, add_special_tokens=False)
    cache, _, _ = eng.prefill(Sample("s", ctx, [], [], 1))
    want = method.layer_budgets(64, lm.model.config.num_hidden_layers)
    assert cache.token_counts()[:, 0, 0].tolist() == want and sum(want) == 64 * len(want)


def test_progress_resumes_only_the_same_calibration(tmp_path):
    from kvbench.methods.compresskv.calibrate import Progress
    out = tmp_path / "ckv"
    p = Progress(out, {"grid": [1]})
    p.add({"key": "0/1000/0", "recall": 100.0})
    p.add({"key": "0/1000/50", "recall": 0.0})
    with open(p.path, "a") as f:
        f.write('{"key": "0/1000/10')  # a line cut by a kill
    again = Progress(out, {"grid": [1]})
    assert sorted(again.done) == ["0/1000/0", "0/1000/50"]
    assert len(again.path.read_text().splitlines()) == 3  # header + 2: the torn line is gone
    lines = again.path.read_text().splitlines()
    again.path.write_text("\n".join([lines[0], "{not json", lines[2]]) + "\n")  # damaged in the middle
    with pytest.raises(results.CorruptRecordError, match="line 2"):  # refused, not silently cut short
        Progress(out, {"grid": [1]})
    again.path.write_text("\n".join(lines) + "\n")
    assert Progress(out, {"grid": [2]}).done == {}  # another grid starts over
    again.finish()
    assert not again.path.exists()


def test_layer_error_probe_drops_what_compresskv_drops():
    from kvbench.methods.compresskv.calibrate import LayerErrorProbe
    lm = tiny(0)
    heads = [torch.tensor(h[:2]) for h in read_official_head_ranking(HEAD_IDX)]
    g = torch.Generator().manual_seed(7)
    ctx = torch.randint(3, 1000, (70,), generator=g).tolist()
    probe = LayerErrorProbe(budget=1.0, heads=heads, probe_budget=32)
    eng = Engine(lm, probe)
    cache = eng.new_cache(1)
    eng.feed(cache, ctx, compress=True)
    for _ in range(3):
        eng.forward(cache, torch.tensor([[5]]), compress=False)
    assert all(e > 0 for e in probe.errors)
    # what the probe marked as dropped is what CompressKV at 32 tokens a layer (uniform) evicts
    ckv = Engine(lm, CompressKV(budget=32, head_idx=HEAD_IDX, uniform=True, first_k=2))
    kept_cache = ckv.new_cache(1)
    ckv.feed(kept_cache, ctx, compress=True)
    for layer in range(2):
        store, kept = cache.stores[layer], kept_cache.stores[layer]
        for h in range(store.H):
            seg = slice(int(store.start[h]), int(store.start[h] + store.length[h]))
            keep_pos = store.pos[seg][store.extra["dropped"][seg] == 0].tolist()
            assert keep_pos == kept.pos[int(kept.start[h]): int(kept.start[h] + kept.length[h])].tolist() + [70, 71, 72]
    # nothing dropped (a prompt within the probe budget): no error
    short = LayerErrorProbe(budget=1.0, heads=heads, probe_budget=32)
    eng = Engine(lm, short)
    cache = eng.new_cache(1)
    eng.feed(cache, ctx[:30], compress=True)
    eng.forward(cache, torch.tensor([[5]]), compress=False)
    assert short.errors == [0.0, 0.0]


def test_calibrate_command_bad_input_is_one_line(tmp_path):
    from click.testing import CliRunner
    from kvbench.cli import main
    cases = [
        (["--grid", "sizes=1"], "is not 'lengths="),
        (["--haystack", str(tmp_path / "none")], "no haystack at"),
        (["--layer-samples", "0"], "at least 1"),
    ]
    for args, needle in cases:
        res = CliRunner().invoke(main, ["calibrate", "compresskv", "--model", "smollm2-135m",
                                        "--out", str(tmp_path / "a"), *args])
        lines = [line for line in res.output.strip().splitlines() if line]
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], (args, res.output)


def test_calibration_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    """The whole calibration on a tiny random model with a real (tiny BPE) tokenizer: a model that answers no
    needle is refused in one line (its tests kept for a rerun); with every test counted, the artifact holds a
    ranking and layer scores that the method loads for this model."""
    from tests.conftest import make_tokenizer
    from kvbench.methods.compresskv import calibrate as cal
    lm = tiny(0)
    lm.tokenizer = make_tokenizer()
    hay = tmp_path / "hay.txt"
    hay.write_text("The grass is green. The sky is blue. The sun is yellow. Here we go. " * 80)
    out = tmp_path / "ckv"
    args = dict(grid="lengths=300,depths=0,100", haystack=str(hay), layer_samples=2, log=lambda *_: None)
    with pytest.raises(CompressKVError, match="no needle test was answered"):
        cal.calibrate_model(lm, str(out), **args)
    assert len(progress_lines(out)) == 1 + 6  # header + 3 needles x 1 length x 2 depths, kept for a rerun
    monkeypatch.setattr(cal, "score_test", lambda *a, **k: pytest.fail("finished tests must not run again"))
    with pytest.raises(CompressKVError, match="no needle test"):  # resumed from the kept records
        cal.calibrate_model(lm, str(out), **args)
    monkeypatch.undo()
    # every answer counts (the wiring, not the model); other settings: the kept tests are not reused
    monkeypatch.setitem(cal.SETTINGS, "recall_threshold", -1.0)
    path = cal.calibrate_model(lm, str(out), **args)
    meta = artifact.read_meta(path, "compresskv")
    assert meta["counted_tests"] == 6 and meta["grid"]["lengths"] == [300]
    assert len(meta["head_ranking"]) == 2 and sorted(meta["head_ranking"][0]) == [0, 1, 2, 3]
    assert meta["layer_scores"] == pytest.approx(meta["layer_scores_by_data"]["niah"])
    assert sum(meta["layer_scores"]) == pytest.approx(1)
    CompressKV(budget=64, artifact=str(path)).prepare(lm)
    assert not list(tmp_path.glob(".ckv.progress.jsonl"))


def progress_lines(out: Path) -> list[str]:
    return (out.parent / f".{out.name}.progress.jsonl").read_text().splitlines()


def test_official_calibration_files_enter_the_run_identity(tmp_path):
    """The official head_idx/layer_scores files are the calibration as much as an artifact is: replaced at the
    same paths, they must change the run's id (artifact.identity), or the old run's samples are resumed."""
    import shutil

    from kvbench import artifact
    head, layers = tmp_path / "head_idx.json", tmp_path / "layer_score.jsonl"
    shutil.copy(HEAD_IDX, head)
    shutil.copy(LAYER_SCORES, layers)
    m = CompressKV(budget=40, head_idx=str(head), layer_scores=str(layers))
    assert m.artifact_paths() == [str(head), str(layers)]
    before = artifact.identity(m.artifact_paths())
    layers.write_text(layers.read_text().replace("0.", "0.1", 1))
    assert artifact.identity(m.artifact_paths()) != before


def test_calibration_progress_of_another_haystack_of_the_same_name_is_not_resumed(tmp_path):
    """The progress file's header named the haystack by its folder's name only: a calibration with another
    folder of that name (other text) resumed the finished tests of the first."""
    from kvbench.methods.compresskv import calibrate as cal
    texts = []
    for root, word in ((tmp_path / "a" / "hay", "alpha"), (tmp_path / "b" / "hay", "beta")):
        root.mkdir(parents=True)
        for i in range(3):
            (root / f"{i}.txt").write_text(f"{word} {i}. " * 50)
        texts.append(cal.read_haystacks(str(root)))
    assert texts[0][1] == texts[1][1]  # the same description
    g = cal.Grid([300], [50.0])
    first = cal.progress_header({"model": "m"}, g, *texts[0])
    cal.Progress(tmp_path / "out", first).add({"key": "done-test"})
    second = cal.Progress(tmp_path / "out", cal.progress_header({"model": "m"}, g, *texts[1]))
    assert not second.done
