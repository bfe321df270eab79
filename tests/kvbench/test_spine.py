"""The cache interface, methods, engine, harness and CLI on tiny random models of each supported family."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, DynamicCache

from kvbench import models, registry
from kvbench.cache import KVCache
from kvbench.models import cache_argument
from kvbench.cli import main
from kvbench.models import LoadedModel
from kvbench.engine import Engine, ends_line
from kvbench.task import Sample
from tests.conftest import EVICTION, make_tokenizer, prompt, sample, tiny

def hf_twin(lm: LoadedModel):
    """The same weights under transformers' own SDPA attention and dynamic cache."""
    import copy
    twin = AutoModelForCausalLM.from_config(copy.deepcopy(lm.model.config), attn_implementation="sdpa",
                                            dtype=torch.float32)
    twin.load_state_dict(lm.model.state_dict())
    twin.config._attn_implementation = "sdpa"
    return twin.eval()


@torch.no_grad()
def hf_greedy(twin, ids: list[int], new: int) -> tuple[list[int], torch.Tensor]:
    cache = DynamicCache(config=twin.config)
    x = torch.tensor([ids])
    logits = twin(input_ids=x, **cache_argument(twin, cache), use_cache=True).logits[:, -1]
    first = logits.clone()
    out = []
    for _ in range(new):
        nxt = logits.argmax(-1)
        out.append(int(nxt))
        logits = twin(input_ids=nxt[:, None], **cache_argument(twin, cache), use_cache=True).logits[:, -1]
    return out, first


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("batch", [1, 2])
def test_full_reproduces_hf(family, batch):
    lm = tiny(family)
    twin = hf_twin(lm)
    samples = [sample(prompt(40 + 17 * i, i), prompt(5, 100 + i), sid=str(i)) for i in range(batch)]
    eng = Engine(lm, registry.build_method("full", 1.0))
    got = eng.generate(samples)
    for s, rec in zip(samples, got):
        want, first_logits = hf_greedy(twin, s.context_ids + s.question_ids, 8)
        assert rec["prediction"] == " ".join(map(str, want))
        _, ours, _ = eng.prefill(s)
        torch.testing.assert_close(ours, first_logits, rtol=1e-4, atol=1e-4)


def test_chunked_prefill_is_exact():
    lm = tiny("llama")
    s = sample(prompt(150, 1), prompt(6, 2))
    whole = Engine(lm, registry.build_method("full", 1.0)).prefill(s)[1]
    chunked = Engine(lm, registry.build_method("full", 1.0), prefill_chunk=32).prefill(s)[1]
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", EVICTION)
def test_budget_one_equals_full(name):
    lm = tiny("qwen2")
    samples = [sample(prompt(90, 3), prompt(5, 4), new=12)]
    want = Engine(lm, registry.build_method("full", 1.0)).generate(samples)[0]["prediction"]
    got = Engine(lm, registry.build_method(name, 1.0)).generate(samples)[0]["prediction"]
    assert got == want


def per_slot_bytes(cache: KVCache, store) -> int:
    return 2 * cache.head_dim * 4 + 4 + sum(t.element_size() for t in store.extra.values())


@pytest.mark.parametrize("name", EVICTION)
def test_budget_holds_what_it_claims(name):
    lm = tiny("llama")
    ctx = prompt(200, 5)
    eng = Engine(lm, registry.build_method(name, 0.25))
    cache, _, info = eng.prefill(sample(ctx, []))
    counts = cache.token_counts()  # [layers, B, H]
    target = 50  # int(0.25 * 200)
    if name == "pyramidkv":
        per_layer = counts.float().mean(dim=(1, 2))
        assert per_layer[0] > per_layer[-1]
        assert abs(per_layer.mean().item() - target) <= 2
    elif name == "adakv":
        # The layer's total is the budget, less what the reference's per-head rounding drops (< 1 a head).
        total = counts.sum(dim=2)
        assert ((total <= 2 * target) & (total >= 2 * target - 2)).all()
        assert (counts[..., 0] != counts[..., 1]).any(), "head-wise budgets should differ between heads"
    else:
        assert (counts == target).all()
    for store in cache.stores:
        assert store.k.shape[0] == int(store.length.sum())  # physically freed: no slack after compression
        expected = int(store.length.sum()) * per_slot_bytes(cache, store) + 3 * 8 * store.B * store.H
        assert store.nbytes() == expected
    assert info["kv_bytes_prefill"] == cache.nbytes()
    assert info["kv_bytes_prefill"] < 0.3 * info["kv_bytes_full_prefill"]


@pytest.mark.parametrize("name,params", [("selectfit", {}), ("selectfit", {"adaptive": True}), ("kvsculpt", {}),
                                         ("kvsculpt", {"adaptive": True})])
def test_fitting_methods_hold_what_they_claim(name, params):
    """The methods that fit what they keep count every slot a head holds against the kept fraction; adaptive
    budgets move slots between heads of a sequence and conserve the total exactly."""
    lm = tiny("llama")
    cache, _, info = Engine(lm, registry.build_method(name, 0.25, params)).prefill(sample(prompt(200, 5), []))
    counts = cache.token_counts()  # [layers, B, H]
    assert int(counts.sum()) == 50 * counts.numel()  # int(0.25 * 200) a head on average
    if not params:
        assert (counts == 50).all()
    assert info["kv_bytes_prefill"] == cache.nbytes() < 0.3 * info["kv_bytes_full_prefill"]


@pytest.mark.parametrize("name", ["streamingllm", "h2o", "tova"])
def test_decode_time_eviction_holds_budget(name):
    lm = tiny("llama")
    eng = Engine(lm, registry.build_method(name, 24))
    cache, first, _ = eng.prefill(sample(prompt(60, 6), []))
    assert (cache.token_counts() == 24).all()
    tokens, _ = eng.decode(cache, first, [30], [False])
    assert len(tokens[0]) == 30
    assert (cache.token_counts() == 24).all()
    kept = cache.stores[0].pos[: int(cache.stores[0].length[0])]
    assert int(kept.max()) == 60 + 29 - 1  # the newest generated token (fed to the model) is held


def test_streamingllm_keeps_sinks_and_recent():
    lm = tiny("llama")
    eng = Engine(lm, registry.build_method("streamingllm", 20))
    cache, first, _ = eng.prefill(sample(prompt(100, 7), []))
    eng.decode(cache, first, [10], [False])
    store = cache.stores[1]
    pos = sorted(store.pos[store.start[0]: store.start[0] + store.length[0]].tolist())
    assert pos == [0, 1, 2, 3] + list(range(100 + 9 - 16, 100 + 9))


def _sentencepiece_tokenizer():
    """A Llama-2-style tokenizer (byte fallback, a decoder that strips the text's leading space): a token's
    text alone can differ from its text in context ("▁" alone decodes to nothing)."""
    from tokenizers import Tokenizer, decoders, models as tok_models
    from transformers import PreTrainedTokenizerFast
    pieces = ["<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "a", "b", "▁foo", "▁a", "é"]
    tok = Tokenizer(tok_models.BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_ends_line_agrees_with_decoding_the_whole_answer():
    """The incremental newline check decides as the old rule did, which decoded the whole answer each step."""
    g = torch.Generator().manual_seed(0)
    for tok in (make_tokenizer(), _sentencepiece_tokenizer()):
        newline = tok.convert_tokens_to_ids("Ċ" if "Ċ" in tok.get_vocab() else "<0x0A>")
        texts = ["\n\nfoo\n", "a\nb", "\n\n\n", "é\nx", "答案\n\n是", " \n\nx y\n"]
        sequences = [tok.encode(t, add_special_tokens=False) for t in texts]
        for _ in range(200):  # random answers, newline-heavy, with tokens of several characters and partial bytes
            ids = torch.randint(0, len(tok), (12,), generator=g)
            ids[torch.rand(12, generator=g) < 0.3] = newline
            sequences.append(ids.tolist())
        sequences.append([newline, tok.convert_tokens_to_ids("▁"), newline] if "▁" in tok.get_vocab() else [newline])
        for seq in sequences:  # decoding stops at the first length where the rule holds
            stops = [n for n in range(1, len(seq) + 1) if ends_line(tok, seq[:n])]
            old_stops = [n for n in range(1, len(seq) + 1) if "\n" in tok.decode(seq[:n]).lstrip("\n")]
            assert stops[:1] == old_stops[:1], (tok.decode(seq), seq)


@pytest.mark.parametrize("name,params", [(n, {}) for n in EVICTION] + [
    ("h2o", {"evict_during_decoding": True}), ("selectfit", {}), ("selectfit", {"adaptive": True}), ("kvsculpt", {}),
    ("kvsculpt", {"adaptive": True}), ("kvcar", {}), ("deltakv", {"random_init": True})])
def test_batched_decode_matches_single(name, params):
    """A sample's answer does not depend on the samples batched with it (ragged stores, per-sequence budgets and
    compression, decode-time eviction, adaptive allocations; prompts of three lengths)."""
    lm = tiny("llama")
    samples = [sample(prompt(70 + 30 * i, 10 + i), prompt(4, 20 + i), new=10, sid=str(i)) for i in range(3)]
    batched = Engine(lm, registry.build_method(name, 0.5, params)).generate(samples)
    for s, rec in zip(samples, batched):
        assert Engine(lm, registry.build_method(name, 0.5, params)).generate([s])[0]["prediction"] == rec["prediction"]


def test_query_aware_differs_from_agnostic_in_what_is_compressed():
    lm = tiny("llama")
    s = sample(prompt(120, 8), prompt(20, 9))
    agn, _, a = Engine(lm, registry.build_method("snapkv", 0.25)).prefill(s)
    awr, _, b = Engine(lm, registry.build_method("snapkv", 0.25), protocol="query-aware").prefill(s)
    assert (agn.token_counts() == 30 + 20).all()  # int(0.25 * 120) kept, then the question appended whole
    assert (awr.token_counts() == 35).all()  # int(0.25 * 140)


def test_cli_errors_are_one_line(tmp_path):
    runner = CliRunner()
    cases = [
        (["run", "--method", "nope", "--task", "niah"], "unknown method 'nope'"),
        (["run", "--method", "snapkv", "--task", "nope"], "unknown task 'nope'"),
        (["run", "--method", "snapkv", "--task", "niah", "--budget", "0"], "impossible"),
        (["run", "--method", "snapkv", "--task", "niah", "--budget", "1.5"], "neither a fraction"),
        (["run", "--method", "snapkv", "--task", "niah", "-m", "windw=3"], "no parameter 'windw'"),
        (["run", "--method", "full", "--task", "niah", "--model", str(tmp_path / "missing.gguf")], "no such GGUF"),
        (["run", "--method", "full", "--task", "niah", "--model", str(tmp_path)], "not a model directory"),
    ]
    for args, needle in cases:
        res = CliRunner().invoke(main, args + ["--out", str(tmp_path)])
        assert res.exit_code == 2, (args, res.output)
        lines = [line for line in res.output.strip().splitlines() if line]
        assert len(lines) == 1 and needle in lines[0], (args, res.output)
    res = runner.invoke(main, ["list"])
    assert res.exit_code == 0 and "snapkv" in res.output and "niah" in res.output and "llama-3.1-8b" in res.output


def test_unsupported_model_type_is_refused():
    from transformers import AutoConfig
    cfg = AutoConfig.for_model("gpt2", n_layer=1, n_head=2, n_embd=16, vocab_size=50)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(models.ModelError, match="not supported"):
        models.check_drivable(model)


def test_attention_without_cache_never_falls_back():
    lm = tiny("llama")
    with pytest.raises(Exception, match="without a kvbench cache"):
        lm.model(input_ids=torch.tensor([[1, 2, 3]]))


def test_killed_run_resumes_without_loss_or_repeat(tmp_path, monkeypatch):
    from kvbench import harness, tasks  # noqa: F401
    from kvbench.harness import RunConfig, run
    from kvbench.tasks.niah import NIAH

    lm = tiny("llama")
    from tests.conftest import make_tokenizer
    lm = LoadedModel(lm.model, make_tokenizer(), "tiny-llama", 4096)
    cfg = RunConfig(method="snapkv", task="niah", budget=0.5, task_params={"lengths": [300], "depths": [0.0, 0.5, 1.0],
                    "max_new_tokens": 4}, out=str(tmp_path))
    calls = []
    real = Engine.generate

    def counting(self, samples, *a, **k):
        calls.extend(s.id for s in samples)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed in the middle of the second sample
        return real(self, samples, *a, **k)

    monkeypatch.setattr(Engine, "generate", counting)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, lm=lm, progress=False)
    run_dir = next((tmp_path / "runs").iterdir())
    with open(run_dir / "samples.jsonl", "a") as f:
        f.write('{"id": "torn')  # a write cut off by the kill
    run(cfg, lm=lm, progress=False)
    lines = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [s.id for s in NIAH(lengths=[300], depths=[0.0, 0.5, 1.0]).samples(
        lm.tokenizer, __import__("kvbench.task", fromlist=["TaskContext"]).TaskContext(3000))]
    assert calls == ["niah-300-0.00", "niah-300-0.50", "niah-300-0.50", "niah-300-1.00"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["complete"] and metrics["n_samples"] == 3
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method_params"]["window"] == 32 and config["versions"]["torch"]


def test_static_decode_flags_and_reserve():
    static = {n: registry.build_method(n, 0.25).static_decode() for n in ["full", *EVICTION]}
    assert static == {"full": True, "random": True, "knorm": True, "streamingllm": False, "snapkv": True,
                      "pyramidkv": True, "h2o": False, "tova": False, "adakv": True}
    lm = tiny("llama")
    eng = Engine(lm, registry.build_method("snapkv", 0.25))
    cache, first, _ = eng.prefill(sample(prompt(120, 11), []))
    before = [s.k.data_ptr() for s in cache.stores]
    cache.reserve(20)
    moved = [s.k.data_ptr() for s in cache.stores]
    eng.decode(cache, first, [20], [False])
    assert [s.k.data_ptr() for s in cache.stores] == moved != before  # room made once, nothing moved after
    assert (cache.token_counts() == 30 + 19).all()


def test_a_task_without_samples_or_score_cannot_be_built():
    from kvbench.task import Task

    class NoScore(Task):
        name = "no-score"

        def samples(self, tokenizer, ctx):
            return []

    with pytest.raises(TypeError, match="score"):
        NoScore()


def test_list_shows_every_parameter_and_never_cuts_a_value():
    """`kvbench list` is where the README sends a newcomer for the -m/-t keys: fields with a default factory
    (adakv's scorer, NIAH's lengths) are listed, `kvbench list methods` prints every field, and the overview's
    long lines are cut between fields (deltakv's keep=0.15 once printed as "keep=0.1...")."""
    res = CliRunner().invoke(main, ["list", "methods"])
    assert res.exit_code == 0
    lines = {line.split()[0]: line for line in res.output.splitlines() if line.startswith("  ")}
    assert "scorer=" in lines["adakv"]
    assert "keep=0.15" in lines["deltakv"] and "random_init=False" in lines["deltakv"]
    assert "adaptive=False" in lines["selectfit"] and "adaptive=False" in lines["kvsculpt"]
    res = CliRunner().invoke(main, ["list", "tasks"])
    lines = {line.split()[0]: line for line in res.output.splitlines() if line.startswith("  ")}
    assert "lengths=[1024, 2048]" in lines["niah"] and "style='kvbench'" in lines["niah"]
    res = CliRunner().invoke(main, ["list"])
    for line in res.output.splitlines():
        if line.endswith("..."):
            assert line.endswith(", ...") or line.endswith("=..."), line
    assert "keep=0.1..." not in res.output


def test_help_texts_print_as_written():
    """click does not %-format help texts: a '%%' reaches the reader as is (pairs --matched-memory said '5%%')."""
    import click

    def walk(cmd, path):
        yield path
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + [name])

    for path in walk(main, []):
        res = CliRunner().invoke(main, path + ["--help"])
        assert res.exit_code == 0, (path, res.output)
        assert "%%" not in res.output, (path, res.output)
