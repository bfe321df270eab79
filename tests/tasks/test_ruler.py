import re
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, SHARED, make_tokenizer

from kvbench.task import TaskContext, TaskError  # noqa: E402
from kvbench.tasks import ruler as rl  # noqa: E402
from kvbench.tasks.ruler import Ruler  # noqa: E402

QA_FIXTURES = FIXTURES / "ruler"
HEAD = "<|im_start|>user\n"
NOISE_TASKS = "niah_single_1,niah_multikey_2,niah_multikey_3"


def tok():
    return make_tokenizer(vocab_size=8000, english_words=True)


def essay_dir() -> Path:
    p = SHARED / "ruler" / "PaulGrahamEssays.json"
    if not p.exists():
        pytest.skip("shared data ruler/PaulGrahamEssays.json absent (../shared/data)")
    return p.parent


def prefix_of(t, s) -> str:
    text = t.decode(s.context_ids)
    assert text.startswith(HEAD)
    return text[len(HEAD):]


def check_needles(t, s):
    prefix = prefix_of(t, s)
    lo, hi = s.meta["context_chars"]
    for nd in s.meta["needles"]:
        start = nd["char_start"]
        assert prefix[start:start + len(nd["text"])] == nd["text"]
        # the claimed depth is where the needle sits: count the haystack units (essay sentences, or lines of the
        # noise/needle haystacks) before it, other needles left out
        before_text = prefix[lo:start]
        earlier = sum(1 for other in s.meta["needles"] if other["char_start"] < start)
        if s.meta["haystack"] == "essay":
            units_before = len(rl.split_sentences(before_text)) - earlier
            assert nd["depth"] in rl.DEPTHS
            assert units_before == int(nd["units"] * nd["depth"] / 100)
        else:
            units_before = before_text.count("\n") - earlier
            n_needles = len(s.meta["needles"])
            assert nd["depth"] == pytest.approx(100 * (nd["units_before"] + earlier) / (nd["units"] + n_needles))
        assert units_before == nd["units_before"]
        assert abs(100 * (start - lo) / (hi - lo) - nd["depth"]) < 10.0
        n_tok = len(t.encode(nd["text"], add_special_tokens=False))
        window = t.decode(s.context_ids[max(nd["token_start"] - 1, 0): nd["token_start"] + n_tok + 2])
        assert nd["text"] in window
    for a in s.answers:
        assert a in prefix


def test_tables_match_ruler():
    assert len(rl.RULER_TASKS) == 13 and rl.RULER_TASKS[-2:] == ("qa_1", "qa_2")
    assert rl.DEPTHS[:5] == [0, 3, 5, 8, 10] and rl.DEPTHS[-1] == 100 and len(rl.DEPTHS) == 40
    assert {rl.TEMPLATES[c]["tokens_to_generate"] for c in rl.TEMPLATES} == {128, 30, 120, 50, 32}
    assert rl.NIAH_CONFIG["niah_multikey_3"]["type_needle_k"] == "uuids"
    assert rl.NIAH_CONFIG["niah_single_1"]["type_haystack"] == "noise"
    assert rl.zeta(2.0) == pytest.approx(1.6449340668482264, rel=1e-12)
    assert rl.split_sentences("One. Two? Three!  \"Four.\" Five") == ["One.", "Two?", "Three!", "\"Four.\"", "Five"]


def test_noise_tasks_offline_deterministic_and_fitted():
    t = tok()
    task = Ruler(tasks=NOISE_TASKS + ",vt,cwe,fwe", lengths=(2048,), n_per_task=2)
    a = task.samples(t, TaskContext(max_context_tokens=8192))
    b = Ruler(tasks=NOISE_TASKS + ",vt,cwe,fwe", lengths=(2048,), n_per_task=2).samples(
        t, TaskContext(max_context_tokens=8192))
    assert [s.id for s in a] == [s.id for s in b]
    assert all(x.context_ids == y.context_ids and x.question_ids == y.question_ids and x.answers == y.answers
               for x, y in zip(a, b))
    other = Ruler(tasks="niah_single_1", lengths=(2048,), n_per_task=1, seed=7).samples(
        t, TaskContext(max_context_tokens=8192))
    assert other[0].answers != a[0].answers
    assert a[0].id == "niah_single_1/2048/0" and a[0].answers != a[1].answers
    for s in a:
        total = len(s.context_ids) + len(s.question_ids) + s.max_new_tokens
        assert total <= 2048, s.id
        assert total > 2048 * 0.8, s.id
        assert s.meta["length"] == 2048


def test_niah_noise_and_needle_haystacks():
    t = tok()
    samples = Ruler(tasks=NOISE_TASKS, lengths=(2048,), n_per_task=2).samples(t, TaskContext(max_context_tokens=8192))
    for s in samples:
        check_needles(t, s)
        assert s.max_new_tokens == 128
        q = t.decode(s.question_ids)
        # singular template, answer prefix after the generation prompt
        assert q.startswith("\nWhat is the special magic ")
        assert "<|im_start|>assistant\n The special magic " in q and q.endswith("mentioned in the provided text is")
    single = samples[0]
    body = prefix_of(t, single)
    assert body.startswith("A special magic number is hidden within the following text.")
    assert body.count(rl.NOISE) == single.meta["haystack_size"]
    assert re.fullmatch(r"\d{7}", single.answers[0])
    mk3 = [s for s in samples if s.meta["task"] == "niah_multikey_3"][0]
    assert re.fullmatch(r"[0-9a-f-]{36}", mk3.answers[0])
    # the haystack is other needles: one line per needle, with different uuid keys
    lines = prefix_of(t, mk3).split("\n")[1:]
    assert sum(line.startswith("One of the special magic uuids for ") for line in lines) == mk3.meta["haystack_size"] + 1


def test_essay_tasks_need_data():
    with pytest.raises(TaskError) as e:
        Ruler(tasks="niah_single_2").samples(tok(), TaskContext(max_context_tokens=8192))
    assert "--data" in str(e.value) and "PaulGrahamEssays.json" in str(e.value)


def test_essay_niah_variants_with_shared_data():
    t = tok()
    tasks = "niah_single_2,niah_single_3,niah_multikey_1,niah_multivalue,niah_multiquery"
    samples = Ruler(tasks=tasks, lengths=(4096,), n_per_task=1).samples(
        t, TaskContext(max_context_tokens=8192, data=str(essay_dir())))
    by = {s.meta["task"]: s for s in samples}
    for s in samples:
        check_needles(t, s)
        assert len(s.context_ids) + len(s.question_ids) + 128 <= 4096
    assert len(by["niah_multikey_1"].meta["needles"]) == 4 and len(by["niah_multikey_1"].answers) == 1
    assert len(by["niah_multivalue"].answers) == 4
    assert len({n["text"].split(" is: ")[0] for n in by["niah_multivalue"].meta["needles"]}) == 1  # one key
    assert len(by["niah_multiquery"].answers) == 4
    q = t.decode(by["niah_multiquery"].question_ids)
    assert q.startswith("\nWhat are all the special magic numbers for ") and ", and " in q
    assert re.fullmatch(r"[0-9a-f-]{36}", by["niah_single_3"].answers[0])
    # depths are RULER's, sorted along the document
    depths = [n["depth"] for n in by["niah_multikey_1"].meta["needles"]]
    assert depths == sorted(depths) and all(d in rl.DEPTHS for d in depths)
    # the essay haystack keeps the essay's words in order
    assert "<|im_start|>" not in prefix_of(t, by["niah_single_2"])


def test_vt_chain_and_icl():
    t = tok()
    s = Ruler(tasks="vt", lengths=(2048,), n_per_task=1).samples(t, TaskContext(max_context_tokens=8192))[0]
    body = prefix_of(t, s)
    assert len(s.answers) == 5 and all(re.fullmatch(r"[A-Z]{5}", v) for v in s.answers)
    value = re.search(rf"VAR {s.answers[0]} = (\d+)", body).group(1)
    positions = [body.index(f"VAR {s.answers[0]} = {value}")]
    for prev, cur in zip(s.answers, s.answers[1:]):
        positions.append(body.index(f"VAR {cur} = VAR {prev}"))
    assert positions == sorted(positions)  # the chain appears in order
    # one worked example (3-letter names) comes first, then the task
    assert body.startswith("Memorize and track the chain(s)")
    assert body.count("Memorize and track the chain(s)") == 2
    q = t.decode(s.question_ids)
    assert f"assigned the value {value} in the text above." in q
    assert q.endswith(f"5 variables are assigned the value {value}, they are: ")
    assert Ruler().score(s, " ".join(s.answers))["score"] == 100.0
    assert Ruler().score(s, " ".join(s.answers[:2]))["score"] == pytest.approx(40.0)


@pytest.mark.parametrize("length,freq", [(2048, 6), (4096, 30)])
def test_cwe_frequencies(length, freq):
    t = tok()
    s = Ruler(tasks="cwe", lengths=(length,), n_per_task=1).samples(t, TaskContext(max_context_tokens=8192))[0]
    body = prefix_of(t, s)
    main = body.split("\n")[-1] if "\n" in body else body
    listing = main[main.index("\n") + 1:] if "\n" in main else main
    counts = Counter(re.findall(r"\d+\. (\S+)", listing))
    assert len(s.answers) == 10
    assert all(counts[w] == freq for w in s.answers)
    assert max(c for w, c in counts.items() if w not in s.answers) < freq
    assert body.count("Question: What are the 10 most common words in the above list?") == 1  # the shot's


def test_fwe_answer_is_the_three_most_frequent():
    t = tok()
    s = Ruler(tasks="fwe", lengths=(2048,), n_per_task=1).samples(t, TaskContext(max_context_tokens=8192))[0]
    body = prefix_of(t, s)
    coded = body.split("coded words. ", 1)[1]
    counts = Counter(w for w in coded.split() if w != "...")
    assert [w for w, _ in counts.most_common(3)] == s.answers


def test_scores_summary_and_skipped_lengths():
    t = tok()
    with pytest.warns(UserWarning):
        task = Ruler(tasks="niah_single_1", lengths="1024,65536", n_per_task=2)
        samples = task.samples(t, TaskContext(max_context_tokens=4000))
    assert {s.meta["length"] for s in samples} == {1024}
    assert samples[0].meta["skipped_lengths"] == [65536]
    recs = [{"id": s.id, "scores": task.score(s, s.answers[0] if i == 0 else "no"), "meta": s.meta}
            for i, s in enumerate(samples)]
    out = task.summarize(recs)
    assert out["per_task"]["niah_single_1"] == {1024: 50.0} and out["per_length"] == {1024: 50.0}
    assert out["score"] == 50.0 and out["skipped_lengths"] == [65536]
    with pytest.raises(TaskError):
        Ruler(tasks="niah_single_1", lengths=(65536,)).samples(t, TaskContext(max_context_tokens=4000))
    with pytest.raises(TaskError):
        Ruler(tasks="qa_3")


def test_qa_readers_follow_ruler():
    squad = rl.read_qa(str(QA_FIXTURES / "squad.json"), "squad")
    assert [q["query"] for q in squad.qas] == ["What does the osprey eat?", "Where do ospreys spend the winter?",
                                               "What is granite mostly made of?", "Where was the Pharos?"]  # no impossible
    assert len(squad.docs) == 7 and list(squad.docs) == sorted(squad.docs)
    first = squad.qas[0]
    assert first["outputs"] == ["fish", "fish-eating"]
    assert squad.docs[first["context"][0]].startswith("The osprey is a fish-eating bird")
    assert [squad.docs[i] for i in first["more_context"]] == [
        "Ospreys migrate to South America in the winter and return to the north in spring."]
    hotpot = rl.read_qa(str(QA_FIXTURES / "hotpotqa.json"), "hotpotqa")
    assert len(hotpot.qas) == 3 and len(hotpot.docs) == 10  # the shared "Difference Engine" document once
    assert hotpot.docs[hotpot.qas[0]["context"][1]] == ("Ada Lovelace\nAda Lovelace wrote the first program for the "
                                                        "Analytical Engine. She was a mathematician.")


@pytest.mark.parametrize("task", ["qa_1", "qa_2"])
def test_qa_samples_in_the_official_format(task):
    t = tok()
    samples = Ruler(tasks=task, lengths=(1024, 512), n_per_task=3).samples(
        t, TaskContext(max_context_tokens=8192, data=str(QA_FIXTURES)))
    assert [s.id for s in samples] == [f"{task}/{L}/{i}" for L in (1024, 512) for i in range(3)]
    data = rl.read_qa(str(QA_FIXTURES / ("squad.json" if task == "qa_1" else "hotpotqa.json")), rl.QA_DATASETS[task])
    for s in samples:
        assert s.max_new_tokens == 32 and len(s.context_ids) + len(s.question_ids) + 32 <= s.meta["length"]
        qa = data.qas[s.meta["question_index"]]
        assert s.answers == qa["outputs"]
        body = prefix_of(t, s)
        assert body.startswith("Answer the question based on the given documents. Only give me the answer and do not "
                               "output any other words.\n\nThe following are given documents.\n\nDocument 1:\n")
        for i in qa["context"]:  # the question's own documents are always there
            assert data.docs[i] in body
        assert body.count("Document ") == s.meta["num_docs"]
        q = t.decode(s.question_ids)
        assert q.startswith("\n\nAnswer the question based on the given documents.")
        assert q.endswith(f"Question: {qa['query']}<|im_end|>\n<|im_start|>assistant\n Answer:")
    # sample i asks the i-th question; a longer length holds more documents (up to repeating the dataset)
    assert [s.meta["question_index"] for s in samples[:3]] == [0, 1, 2]
    assert samples[0].meta["num_docs"] > samples[3].meta["num_docs"]
    # RULER's string_match_part for QA: any one reference
    s = samples[0]
    assert Ruler().score(s, f"It is {s.answers[-1]}.")["score"] == 100.0
    assert Ruler().score(s, "no idea")["score"] == 0.0


def test_qa_needs_its_file_and_the_average_is_over_thirteen(tmp_path):
    with pytest.raises(TaskError) as e:
        Ruler(tasks="qa_1").samples(tok(), TaskContext(max_context_tokens=8192, data=str(tmp_path)))
    assert "squad.json" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "hotpotqa.json").write_text('{"not": "a list"}', encoding="utf-8")
    with pytest.raises(TaskError) as e:
        Ruler(tasks="qa_2").samples(tok(), TaskContext(max_context_tokens=8192, data=str(tmp_path)))
    assert "official schema" in str(e.value)
    (tmp_path / "squad.json").write_text('{"data": [', encoding="utf-8")  # cut mid-file: not JSON at all
    with pytest.raises(TaskError) as e:
        Ruler(tasks="qa_1").samples(tok(), TaskContext(max_context_tokens=8192, data=str(tmp_path)))
    assert "squad.json" in str(e.value) and "\n" not in str(e.value)
    records = [{"scores": {"score": float(i)}, "meta": {"task": t, "length": 4096}}
               for i, t in enumerate(rl.RULER_TASKS)]
    out = Ruler().summarize(records)
    assert len(out["per_task"]) == 13 and out["score"] == pytest.approx(sum(range(13)) / 13)


def test_cwe_shot_in_its_own_chat_turn():
    t = tok()
    s = Ruler(tasks="cwe", lengths=(2048,), n_per_task=1).samples(t, TaskContext(max_context_tokens=8192))[0]
    text = t.decode(s.context_ids + s.question_ids)
    turns = text.split("<|im_start|>user\n")
    assert turns[0] == "" and len(turns) == 3  # the worked example's turn, then the task's
    shot = turns[1]
    assert shot.startswith("Below is a numbered list of words.")
    assert "<|im_end|>\n<|im_start|>assistant\n Answer: The top 10 words that appear most often in the list are: 1. " \
        in shot and shot.endswith("\n")
    assert turns[2].endswith("<|im_end|>\n<|im_start|>assistant\n Answer: The top 10 words that appear most often "
                             "in the list are:")
    assert len(s.context_ids) + len(s.question_ids) + 120 <= 2048


def test_corrupt_essay_file_is_one_clear_error(tmp_path):
    from kvbench.task import TaskError
    from kvbench.tasks import ruler
    bad = tmp_path / "PaulGrahamEssays.json"
    bad.write_text("{broken")
    with pytest.raises(TaskError, match="is not RULER's essay file"):
        ruler._essay_words(str(bad))
    bad.write_text('{"text": 3}')
    with pytest.raises(TaskError, match="'text' is not a string"):
        ruler._essay_words(str(bad))
    bad.write_text('{"text": "  "}')  # an empty haystack would widen the search without end (out of memory)
    with pytest.raises(TaskError, match="'text' is empty"):
        ruler._essay_words(str(bad))
