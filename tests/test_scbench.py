import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tokenizer_fixture import make_tokenizer  # noqa: E402

from kvbench.task import TaskContext, TaskError  # noqa: E402
from kvbench.tasks import scbench as sc  # noqa: E402
from kvbench.tasks.scbench import SCBench  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "scbench"
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
    tok, task, samples = make({"tasks": "scbench_kv"})
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
    _, _, golden = make({"tasks": "scbench_qa_eng"}, tok=plain)
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
    tok, task, samples = make({"tasks": "scbench_mf"})
    s = samples[0]
    head = tok.decode(s.context_ids)
    assert head == "<|im_start|>user\nWhat is the largest number of the list?\n\n[17, 3, 92, 45, 8, 61]"
    assert tok.decode(s.turns[0].question_ids).startswith("92" + END + "<|im_start|>user\nWhat is the smallest number "
                                                          "of the list?\n\n")
    assert s.max_new_tokens == 5 and s.answers == ["92"]
    assert task.score(s, ["92", "The smallest is 3"])["score"] == 100.0
    assert task.score(s, ["17", "3"]) == {"turn_0": 0.0, "turn_1": 100.0, "score": 50.0}


def test_summary_follow_up_is_primed_and_mixed_tasks_max_tokens():
    tok, task, samples = make({"tasks": "scbench_summary,scbench_summary_with_needles,scbench_repoqa_and_kv"})
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
    _, _, full = make({"tasks": "scbench_repoqa"}, tok=tok)
    _, _, cut = make({"tasks": "scbench_repoqa"}, ctx_tokens=300, tok=tok)
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
