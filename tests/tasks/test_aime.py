import json
from pathlib import Path

import pytest

from tests.conftest import SHARED, make_tokenizer

from kvbench.task import TaskContext, TaskError  # noqa: E402
from kvbench.tasks.aime import (  # noqa: E402
    AIME24,
    AIME25,
    INSTRUCTION,
    extract_answer,
    is_correct,
    last_boxed,
    to_int,
)



def shared(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"shared data {rel} absent (../shared/data)")
    return p


def test_last_boxed_balanced_braces():
    assert last_boxed(r"so \boxed{12} but finally \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed(r"The answer is $\boxed{025}$.") == "025"
    assert last_boxed(r"\boxed{a{b{c}}d} tail") == "a{b{c}}d"
    assert last_boxed(r"\boxed 42") == "42"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed("no box here") is None
    assert last_boxed(r"\boxed{unclosed") is None
    assert last_boxed("") is None


def test_integer_comparison():
    assert to_int("025") == 25 and to_int("25") == 25 and to_int("$1,000$") == 1000
    assert to_int(r"\text{ 33 }") == 33 and to_int("33.0") == 33 and to_int("x") is None
    assert is_correct(r"... \boxed{25}", "025")
    assert is_correct(r"... \boxed{025}", "25")
    assert not is_correct(r"\boxed{24}", "025")
    assert is_correct("25", "025")  # no box: the last number (Qwen2.5-Math's fallback)
    assert is_correct(r"first \boxed{3} then \boxed{70}", "70")
    assert not is_correct(r"first \boxed{70} then \boxed{3}", "70")


def test_aime24_real_data_and_prompt():
    path = shared("aime24/test.jsonl")
    tok = make_tokenizer()
    task = AIME24()
    samples = task.samples(tok, TaskContext(max_context_tokens=4096, data=str(path.parent)))
    rows = [json.loads(line) for line in path.open(encoding="utf-8")]
    assert len(samples) == 30 == len(rows)
    s = samples[0]
    assert s.id == f"aime24/{rows[0]['id']}" and s.answers == [rows[0]["answer"]]
    assert s.max_new_tokens == 8192 and s.meta["temperature"] == 0.0
    head, tail = tok.decode(s.context_ids), tok.decode(s.question_ids)
    assert head == "<|im_start|>user\n" + rows[0]["problem"]
    assert tail == "\n" + INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n"
    # scoring: "025"-style references
    i025 = next(i for i, r in enumerate(rows) if r["answer"] == "025")
    assert task.score(samples[i025], r"\boxed{25}")["score"] == 100.0
    assert task.score(samples[i025], r"\boxed{26}")["score"] == 0.0


def test_aime25_file_path_n_samples_and_pass_at_1():
    path = shared("aime25/test.jsonl")
    tok = make_tokenizer()
    task = AIME25(n_samples=2, temperature=0.6, max_new_tokens=100)
    samples = task.samples(tok, TaskContext(max_context_tokens=4096, data=str(path), limit=3))
    assert len(samples) == 6
    assert [s.id for s in samples[:2]] == ["aime25/0#0", "aime25/0#1"]
    assert [s.meta["sample_index"] for s in samples[:2]] == [0, 1]
    assert samples[0].meta["temperature"] == 0.6 and samples[0].max_new_tokens == 100
    assert samples[0].answers == ["70"]
    # problem 0: 2/2 right; problem 1: 1/2; problem 2: 0/2 -> pass@1 = (1 + 0.5 + 0) / 3
    preds = [r"\boxed{70}", r"\boxed{070}", r"\boxed{588}", "no", "no", r"\boxed{1}"]
    records = [{"id": s.id, "scores": task.score(s, p), "meta": s.meta} for s, p in zip(samples, preds)]
    out = task.summarize(records)
    assert out["pass@1"] == pytest.approx(50.0) and out["score"] == out["pass@1"]
    assert out["n_problems"] == 3 and out["n"] == 6


def test_missing_data(tmp_path):
    with pytest.raises(TaskError) as e:
        AIME24().samples(make_tokenizer(), TaskContext(max_context_tokens=100, data=str(tmp_path)))
    assert "test.jsonl" in str(e.value)
    with pytest.raises(TaskError):
        AIME24(year=2023)


def test_qwen_math_fallbacks_without_a_box():
    assert extract_answer(r"so \boxed{7} and the answer is 9") == ("7", "boxed")  # a box wins
    assert extract_answer("Thus the answer is 25.") == ("25", "answer is")
    assert extract_answer("The final answer is $25$") == ("$25$", "answer is")
    assert extract_answer("first 12, then 1,025") == ("1025", "last number")
    assert extract_answer("no digits") == ("", "none")
    assert is_correct("Thus the answer is 25.", "025") and is_correct("The final answer is $25$", "25")
    assert is_correct("we get 12 and then 25", "25") and not is_correct("we get 25 and then 12", "25")
    assert not is_correct("no digits", "25")
    s = AIME24().score(_sample(), "Therefore the answer is 25.")
    assert s["score"] == 100.0 and s["boxed"] == 0.0 and s["unboxed_answer"] == 1.0


def _sample():
    from kvbench.task import Sample
    return Sample("aime24/x", [1], [2], ["025"], 10, meta={"problem_id": "x"})


@pytest.mark.parametrize("boxed", [r"x=25", r"25^\circ", r"\dfrac{50}{2}", r"25 \text{ degrees}", r"\text{25}",
                                   r"$25$", r"25.0", r"50/2"])
def test_equivalent_forms_through_math_verify(boxed):
    assert is_correct(rf"The result: \boxed{{{boxed}}}", "025")
    assert not is_correct(rf"The result: \boxed{{{boxed}}}", "026")
