import json
import math
from pathlib import Path

import pytest

from tests.conftest import FIXTURES as ALL_FIXTURES, make_tokenizer

from kvbench.task import TaskContext, TaskError  # noqa: E402
from kvbench.tasks import scbench as sc  # noqa: E402
from kvbench.tasks.scbench import SCBench  # noqa: E402

FIXTURES = ALL_FIXTURES / "scbench"
END = "<|im_end|>\n"
GEN = "<|im_start|>assistant\n"


def rows(task):
    return [json.loads(line) for line in (FIXTURES / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()]


def make(task_kw=None, ctx_tokens=8192, tok=None, **kw):
    tok = tok or make_tokenizer()
    task = SCBench(**(task_kw or {}))
    return tok, task, task.samples(tok, TaskContext(max_context_tokens=ctx_tokens, data=str(FIXTURES), **kw))


def test_all_twelve_fixtures_load_in_both_modes():
    assert len(sc.SCBENCH_TASKS) == 12
    assert set(sc.SCBENCH_TASKS) == set(sc.FIRST_TURN) == set(sc.FOLLOW_UP) == set(sc.FOLLOW_UP_CHAT)
    assert set(sc.SCBENCH_TASKS) == set(sc.SCDQ_CONTEXT) == set(sc.MAX_NEW_TOKENS)
    for mode in sc.MODES:
        tok, task, samples = make({"mode": mode})
        assert [s.meta["task"] for s in samples] == list(sc.SCBENCH_TASKS)
        for s in samples:
            assert s.turn_mode == mode
            assert len(s.turns) + 1 == s.meta["n_turns"] == len(rows(s.meta["task"])[0]["multi_turns"])
            assert all(t.answer_ids is None for t in s.turns)


def test_multi_turn_chat_golden_answers_between_turns():
    tok, task, samples = make({"tasks": "scbench_kv", "query_agnostic": True})
    s = samples[0]
    eg = rows("scbench_kv")[0]
    t0, t1 = eg["multi_turns"]
    assert s.id == "scbench_kv/0"
    head = tok.decode(s.context_ids)
    assert head == ("<|im_start|>user\nExtract the value corresponding to the specified key in the JSON object "
                    "below.\n\n" + eg["context"])
    assert tok.decode(s.question_ids) == "\n\n" + t0["input"] + END + GEN
    assert s.answers == [t0["answer"]] and s.max_new_tokens == 150
    turn = s.turns[0]
    # the follow-up starts with the previous GOLDEN answer closing the assistant message, then the new question
    assert tok.decode(turn.question_ids) == t0["answer"] + END + "<|im_start|>user\n" + t1["input"] + END + GEN
    n = turn.meta["golden_answer_tokens"]
    assert tok.decode(turn.question_ids[:n]) == t0["answer"]
    assert turn.answers == [t1["answer"]]
    assert s.meta["golden_context"] and not s.meta["own_answers"]
    # the whole conversation, replayed, is the chat rendering of the official golden-context dialogue
    convo = tok.decode(s.context_ids + s.question_ids + turn.question_ids)
    expected = tok.apply_chat_template(
        [{"role": "user", "content": sc.FIRST_TURN["scbench_kv"].format(context=eg["context"], input=t0["input"])},
         {"role": "assistant", "content": t0["answer"]},
         {"role": "user", "content": t1["input"]}], add_generation_prompt=True, tokenize=False)
    assert convo == expected


def test_multi_turn_own_answers_and_no_chat_template():
    tok = make_tokenizer()
    _, _, own = make({"tasks": "scbench_qa_eng", "own_answers": True}, tok=tok)
    q = tok.decode(own[0].turns[0].question_ids)
    assert q == "\n<|im_start|>user\nQuestion: How many crew members did Mara save?\nAnswer:" + END + GEN
    assert own[0].meta["own_answers"] and not own[0].meta["golden_context"]
    plain = make_tokenizer(chat_template=False)
    _, _, golden = make({"tasks": "scbench_qa_eng", "query_agnostic": True}, tok=plain)
    s = golden[0]
    assert plain.decode(s.context_ids).startswith("Read the book and answer the question. Be very concise")
    assert plain.decode(s.question_ids) == "\n\nQuestion: What is the name of Mara's cat?\nAnswer:"
    assert plain.decode(s.turns[0].question_ids) == "Pilot\n\nQuestion: How many crew members did Mara save?\nAnswer:"
    _, _, choice = make({"tasks": "scbench_choice_eng"}, tok=plain)
    assert plain.decode(choice[0].turns[0].question_ids).endswith("The letter of the correct answer is")


def test_multi_request_shares_the_context():
    tok, task, samples = make({"tasks": "scbench_qa_eng", "mode": "multi-request"})
    s = samples[0]
    assert s.turn_mode == "multi-request" and not s.meta["golden_context"]
    assert tok.decode(s.context_ids).endswith("Be very concise in your answer.\n\n" + rows("scbench_qa_eng")[0]["context"])
    # the official SCDQ query continues the user message directly
    assert tok.decode(s.question_ids) == "Question: What is the name of Mara's cat?\nAnswer:" + END + GEN
    assert tok.decode(s.turns[0].question_ids) == "Question: How many crew members did Mara save?\nAnswer:" + END + GEN
    with pytest.raises(TaskError):
        SCBench(mode="multi-request", own_answers=True)
    with pytest.raises(TaskError):
        SCBench(mode="sideways")


def test_mf_list_context_and_prefix():
    tok, task, samples = make({"tasks": "scbench_mf", "query_agnostic": True})
    s = samples[0]
    head = tok.decode(s.context_ids)
    assert head == "<|im_start|>user\nWhat is the largest number of the list?\n\n[17, 3, 92, 45, 8, 61]"
    assert tok.decode(s.turns[0].question_ids).startswith("92" + END + "<|im_start|>user\nWhat is the smallest number "
                                                          "of the list?\n\n")
    assert s.max_new_tokens == 5 and s.answers == ["92"]
    assert task.score(s, ["92", "The smallest is 3"])["score"] == 100.0
    assert task.score(s, ["17", "3"]) == {"turn_0": 0.0, "turn_1": 100.0, "score": 50.0}


def test_summary_follow_up_is_primed_and_mixed_tasks_max_tokens():
    tok, task, samples = make({"tasks": "scbench_summary,scbench_summary_with_needles,scbench_repoqa_and_kv",
                               "query_agnostic": True})
    summ, needles, rkv = samples
    assert tok.decode(summ.turns[0].question_ids).endswith(GEN + "This paper")
    assert not tok.decode(summ.question_ids).endswith("This paper")
    assert [needles.max_new_tokens] + [t.max_new_tokens for t in needles.turns] == [800, 15]
    assert [rkv.max_new_tokens] + [t.max_new_tokens for t in rkv.turns] == [1024, 80, 1024]
    assert needles.meta["turn_tasks"] == ["scbench_summary", "scbench_passkey"]
    out = task.score(needles, ["Attention-based eviction keeps accuracy with less KV cache memory.", "It is 71432."])
    assert out["summary"] == pytest.approx(100.0) and out["passkey"] == 100.0 and out["score"] == pytest.approx(100.0)


def test_context_truncated_so_the_conversation_fits():
    tok = make_tokenizer()
    _, _, full = make({"tasks": "scbench_repoqa", "query_agnostic": True}, tok=tok)
    _, _, cut = make({"tasks": "scbench_repoqa", "query_agnostic": True}, ctx_tokens=300, tok=tok)
    s = cut[0]
    total = len(s.context_ids) + len(s.question_ids) + sum(len(t.question_ids) for t in s.turns)
    assert len(full[0].context_ids) > len(s.context_ids)
    assert total <= 300 + 16  # chat template tokens and re-encoding drift
    assert s.question_ids == full[0].question_ids and s.turns[0].question_ids == full[0].turns[0].question_ids
    with pytest.raises(TaskError):
        make({"tasks": "scbench_repoqa"}, ctx_tokens=40, tok=tok)


def test_metrics_per_task():
    ts = sc.turn_score
    assert ts("scbench_kv", "scbench_kv", "The value is abc-123.", ["abc-123"]) == 100.0
    assert ts("scbench_prefix_suffix", "scbench_prefix_suffix", "qwY", ["qwYcd34zz"]) == 0.0
    assert ts("scbench_vt", "scbench_vt", "QWERT, ASDFG", ["QWERT", "ASDFG", "ZXCVB"]) == 67.0  # round(2/3, 2)
    assert ts("scbench_qa_eng", "scbench_qa_eng", " it was pilot.", ["Pilot"]) == 100.0
    assert ts("scbench_many_shot", "scbench_many_shot", "(B)", ["(A)"]) == 0.0  # not char by char
    assert ts("scbench_many_shot", "scbench_many_shot", "(a) yes", ["(A)"]) == 100.0
    # Chinese: one character one token; "北京市" vs "北京": P=2/3, R=1 -> F1=0.8
    assert ts("scbench_qa_chn", "scbench_qa_chn", "北京市", ["北京"]) == pytest.approx(80.0)
    assert ts("scbench_qa_chn", "scbench_qa_chn", "", ["北京"]) == 0.0
    refs = ["In a lighthouse", "B"]
    assert ts("scbench_choice_eng", "scbench_choice_eng", "B. In a lighthouse", refs) == 100.0
    assert ts("scbench_choice_eng", "scbench_choice_eng", " The answer is: B", refs) == 100.0
    assert ts("scbench_choice_eng", "scbench_choice_eng", "In a lighthouse", refs) == 100.0
    assert ts("scbench_choice_eng", "scbench_choice_eng", "C", refs) == 0.0
    assert ts("scbench_choice_eng", "scbench_choice_eng", "", refs) == 0.0
    assert ts("scbench_mf", "scbench_mf", "It is 92.0", ["92"]) == 100.0
    assert ts("scbench_mf", "scbench_mf", "-3", ["3"]) == 100.0  # the official regex has no sign
    assert ts("scbench_mf", "scbench_mf", "none", ["3"]) == 0.0
    assert ts("scbench_summary_with_needles", "scbench_passkey", "key 71432 ok 5", ["71432"]) == 100.0
    assert ts("scbench_summary", "scbench_summary", "", ["a b"]) == 0.0


def test_bleu_and_repoqa():
    # ref a b c d, hyp a b x d: p1 = 3/4, p2 = 1/3, p3 and p4 smoothed (method 4, k=5):
    # 1/(2 * 5 / ln 4) / 2 and 1/(4 * 5 / ln 4) / 1; brevity penalty 1 (equal lengths)
    p3, p4 = 1 / (2 * 5 / math.log(4)) / 2, 1 / (4 * 5 / math.log(4))
    expected = math.exp(0.25 * (math.log(0.75) + math.log(1 / 3) + math.log(p3) + math.log(p4)))
    assert sc.sentence_bleu4(list("abcd"), list("abxd")) == pytest.approx(expected)
    assert sc.sentence_bleu4(list("abcd"), list("abcd")) == pytest.approx(1.0)
    assert sc.sentence_bleu4(list("abcd"), []) == 0.0
    eg = rows("scbench_repoqa")[0]
    needles = [(t["name"], t["answer"]) for t in eg["multi_turns"]]
    scale = eg["multi_turns"][0]["answer"]
    assert sc.first_code_block("Here:\n```python\nx = 1\n```\nmore") == "x = 1\n"
    assert sc.repoqa_match(f"```python\n{scale}```", "scale", needles)
    assert not sc.repoqa_match(f"```python\n{scale}```", "first", needles)  # best match is the wrong function
    assert not sc.repoqa_match("```python\ndef scale(v):\n    pass\n```", "scale", needles)  # too dissimilar
    tok, task, samples = make({"tasks": "scbench_repoqa"})
    s = samples[0]
    assert s.meta["turn_names"] == ["scale", "first"] and s.meta["repo"] == "example/tiny-utils"
    first = eg["multi_turns"][1]["answer"]
    assert task.score(s, [f"```\n{scale}```", f"```\n{first}```"])["score"] == 100.0
    assert task.score(s, [f"```\n{first}```", ""])["score"] == 0.0


def test_score_string_prediction_and_summary():
    tok, task, samples = make({"tasks": "scbench_kv,scbench_prefix_suffix"})
    kv, ps = samples
    assert task.score(kv, kv.answers[0]) == {"turn_0": 100.0, "score": 100.0}
    recs = [{"id": kv.id, "scores": task.score(kv, [kv.answers[0], "nope"]), "meta": kv.meta},
            {"id": ps.id, "scores": task.score(ps, [ps.answers[0], ps.turns[0].answers[0]]), "meta": ps.meta}]
    out = task.summarize(recs)
    assert out["per_task"]["scbench_kv"]["turn_1"] == 0.0 and out["per_task"]["scbench_kv"]["score"] == 50.0
    assert out["score"] == pytest.approx(75.0)


def test_single_task_classes_and_missing_data(tmp_path):
    assert sc.ScbenchKv().tasks == ("scbench_kv",) and sc.ScbenchKv.name == "scbench_kv"
    assert sc.ScbenchRepoqaAndKv(mode="multi-request").mode == "multi-request"
    with pytest.raises(TaskError) as e:
        SCBench().samples(make_tokenizer(), TaskContext(max_context_tokens=100, data=str(tmp_path)))
    assert "--data" in str(e.value) and "microsoft/SCBench" in str(e.value)
    with pytest.raises(TaskError):
        SCBench(tasks="scbench_nope")


def test_parquet_hub_layout(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    (tmp_path / "scbench_vt").mkdir()
    pd.DataFrame(rows("scbench_vt")).to_parquet(tmp_path / "scbench_vt" / "test-00000-of-00001.parquet")
    tok = make_tokenizer()
    samples = SCBench(tasks="scbench_vt").samples(tok, TaskContext(max_context_tokens=4096, data=str(tmp_path)))
    assert samples[0].answers == ["QWERT", "ASDFG", "ZXCVB"]


class _EosTokenizer:
    """The engine's tokenizer for id-level tests: decode shows the ids; EOS is chosen per test."""

    def __init__(self, eos):
        self.eos_token_id = eos

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _engine(eos, protocol="query-agnostic", method="full", budget=1.0):
    from tests.conftest import tiny

    from kvbench import registry
    from kvbench.models import LoadedModel
    from kvbench.engine import Engine
    lm = tiny("llama")
    return Engine(LoadedModel(lm.model, _EosTokenizer(eos), lm.name, lm.window), registry.build_method(method, budget),
                  protocol=protocol)


def _two_turns(max_new=6):
    from tests.conftest import prompt

    from kvbench.task import Sample, Turn
    return Sample("s", prompt(40, 1), prompt(5, 2), [], max_new, turns=[Turn(prompt(4, 3), [], max_new)])


def _cached_tokens(rec) -> float:
    per_token = rec["kv_bytes_full_prefill"] / (rec["context_tokens"] + rec["question_tokens"])
    return rec["kv_bytes_full_end"] / per_token


def test_own_answers_feed_an_answer_once_and_eos_only_after_a_cut():
    s = _two_turns()
    free = _engine(None).multi_turn(s, own_answers=True)
    g = [int(t) for t in free[0]["prediction"].split()]
    assert len(g) == 6 and g[2] not in g[:2]
    base = 40 + 5 + 4  # context, first question, second question
    # ends on EOS after two tokens: both in the cache once, EOS not fed (the old runner fed the last one twice)
    ended = _engine(g[2]).multi_turn(s, own_answers=True)
    assert ended[0]["prediction"].split() == [str(t) for t in g[:2]]
    n1 = ended[1]["new_tokens"]
    assert _cached_tokens(ended[1]) == base + 2 + (n1 if n1 < 6 else n1 - 1)
    # cut at the limit (an EOS id never generated): its last token not fed, EOS fed instead (official loop)
    never = next(t for t in range(3, 1000) if t not in g)
    s3 = _two_turns(max_new=3)
    cut = _engine(never).multi_turn(s3, own_answers=True)
    assert cut[0]["new_tokens"] == 3
    n1 = cut[1]["new_tokens"]
    assert _cached_tokens(cut[1]) == base + (3 - 1) + 1 + (n1 if n1 < 3 else n1 - 1)


def test_first_question_is_compressed_with_the_context_by_default():
    tok = make_tokenizer()
    _, _, official = make({"tasks": "scbench_kv"}, tok=tok)
    _, _, agnostic = make({"tasks": "scbench_kv", "query_agnostic": True}, tok=tok)
    o, a = official[0], agnostic[0]
    assert o.question_ids == [] and o.context_ids == a.context_ids + a.question_ids and a.question_ids
    assert o.meta["first_question_with_context"] and not a.meta["first_question_with_context"]
    assert [t.question_ids for t in o.turns] == [t.question_ids for t in a.turns]
    # multi-request keeps the context alone (official SCDQ); the first query is answered on it like the others
    _, _, req = make({"tasks": "scbench_kv", "mode": "multi-request"}, tok=tok)
    assert req[0].question_ids and not req[0].meta["first_question_with_context"]


def test_runner_compresses_the_first_question_with_the_context():
    from tests.conftest import prompt

    from kvbench.task import Sample, Turn
    turns = [Turn(prompt(4, 3), [], 2)]
    ctx, q = prompt(120, 1), prompt(20, 2)
    official = Sample("o", ctx + q, [], [], 2, turns=turns)
    agnostic = Sample("a", ctx, q, [], 2, turns=turns)
    rec_o = _engine(None, method="snapkv", budget=0.25).multi_turn(official)[0]
    rec_a = _engine(None, method="snapkv", budget=0.25).multi_turn(agnostic)[0]
    assert rec_o["kv_bytes_compressed"] == pytest.approx(rec_a["kv_bytes_compressed"] * 35 / 30, rel=0.02)
    # query-aware protocol on the query-agnostic split compresses context and question together too
    rec_qa = _engine(None, protocol="query-aware", method="snapkv", budget=0.25).multi_turn(agnostic)[0]
    assert rec_qa["kv_bytes_compressed"] == rec_o["kv_bytes_compressed"]


def test_max_turns_defaults_to_five():
    assert SCBench().max_turns == 5
    eg = {"id": 0, "context": "abc " * 50, "multi_turns": [{"input": f"q{i}", "answer": f"a{i}"} for i in range(7)]}
    s = SCBench(tasks="scbench_kv")._sample("scbench_kv", 0, eg, make_tokenizer(), TaskContext(4096))
    assert s.meta["n_turns"] == 5 and len(s.turns) == 4
    assert len(SCBench(tasks="scbench_kv", max_turns=None)._sample(
        "scbench_kv", 0, eg, make_tokenizer(), TaskContext(4096)).turns) == 6
    with pytest.raises(TaskError):
        SCBench(max_turns=0)


def test_qa_chn_and_many_shot_official_character_loop_metric():
    tok = make_tokenizer()
    _, task, (chn,) = make({"tasks": "scbench_qa_chn"}, tok=tok)
    ans = rows("scbench_qa_chn")[0]["multi_turns"][0]["answer"]
    assert isinstance(ans, str) and len(ans) > 1
    pred = ans[0]  # one right character
    out = task.score(chn, [pred])
    # official: the best F1 over single characters of the answer (1.0 for a one-character prediction found there)
    assert out["score"] == out["score_official"] == 100.0
    assert out["score_whole_answer"] == pytest.approx(100 * sc.qa_f1_zh_chars(pred, ans))
    whole = SCBench(tasks="scbench_qa_chn", official_metric=False)
    assert whole.score(chn, [pred])["score"] == out["score_whole_answer"] < 100.0
    _, task, (shot,) = make({"tasks": "scbench_many_shot"}, tok=tok)
    label = rows("scbench_many_shot")[0]["multi_turns"][0]["answer"]
    other = next(c for c in "QXZJ#@" if c.upper() not in str(label).upper())
    wrong = other + str(label)[-1]  # shares one character with the answer, not the answer
    out = task.score(shot, [wrong])
    assert out["score_official"] == 100.0 and out["score_whole_answer"] == 0.0 and out["score"] == 100.0


def test_repoqa_candidates_are_the_whole_repos_functions():
    tok = make_tokenizer()
    fn_a = "def alpha(x):\n    return x + 1\n"
    fn_b = "def beta(y):\n    return y * 2\n"
    fn_c = "def gamma(z):\n    return z - 3\n"
    egs = [{"id": 0, "context": "code " * 30, "repo": "r", "lang": "python",
            "multi_turns": [{"input": "Find alpha", "answer": fn_a, "name": "alpha"}]},
           {"id": 1, "context": "code " * 30, "repo": "r", "lang": "python",
            "multi_turns": [{"input": "Find beta", "answer": fn_b, "name": "beta"}]},
           {"id": 2, "context": "code " * 30, "repo": "other", "lang": "python",
            "multi_turns": [{"input": "Find gamma", "answer": fn_c, "name": "gamma"}]}]
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        Path(d, "scbench_repoqa.jsonl").write_text("\n".join(json.dumps(e) for e in egs), encoding="utf-8")
        task = SCBench(tasks="scbench_repoqa")
        s0, s1, s2 = task.samples(tok, TaskContext(4096, data=d))
    assert sorted(n for n, _ in s0.meta["repo_needles"]) == ["alpha", "beta"]
    assert [n for n, _ in s2.meta["repo_needles"]] == ["gamma"]
    # answering beta's code to alpha's question: the repo has beta, so it is the best match, and wrong
    assert task.score(s0, ["```python\n" + fn_b + "```"])["score"] == 0.0
    assert task.score(s0, ["```python\n" + fn_a + "```"])["score"] == 100.0
