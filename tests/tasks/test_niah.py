"""The needle test: its two prompt styles and its binary headline metric."""
import pytest

from kvbench.task import TaskContext, TaskError
from kvbench.tasks.niah import ORIGINAL_BUFFER, NIAH
from tests.conftest import make_tokenizer


def test_found_is_binary_and_rouge_is_secondary():
    task = NIAH()
    s = task.samples(make_tokenizer(), TaskContext(4096))[0]
    right = task.score(s, "Eat a sandwich and sit in dolores park.")
    wrong = task.score(s, "Eat a sandwich on a sunny day in the park.")  # shares words, misses the place
    assert right["score"] == right["found"] == 100.0
    assert wrong["score"] == wrong["found"] == 0.0 and wrong["rouge1"] > 50


def test_original_style_follows_kamradt(tmp_path):
    tok = make_tokenizer()
    (tmp_path / "a.txt").write_text("The grass is green. The sky is blue. ")
    (tmp_path / "b.txt").write_text("Here we go. There and back again. ")
    task = NIAH(style="original", lengths=[600, 900], depths=[0.0, 0.5, 1.0], haystack=str(tmp_path))
    samples = task.samples(tok, TaskContext(4096))
    assert [s.id for s in samples] == [f"niah-original-{n}-{d}" for n in (600, 900) for d in ("0.00", "0.50", "1.00")]
    for s in samples:
        text = tok.decode(s.context_ids)
        # the system prompt, then the context in its own user turn; the question in the next one
        assert text.startswith("<|im_start|>system\nYou are a helpful AI bot")
        assert "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n" in text
        question = tok.decode(s.question_ids)
        assert question.startswith("<|im_end|>\n<|im_start|>user\nWhat is the best thing to do in San Francisco? Don't give")
        assert question.endswith("<|im_start|>assistant\n")
        # the haystack (repeated small files) fills the length less the 200-token buffer, give or take re-encoding
        body = len(s.context_ids) - len(tok.encode(text.split("<|im_start|>user\n")[0] + "<|im_start|>user\n"))
        assert abs(body - (s.meta["length"] - ORIGINAL_BUFFER)) <= 3
        before = text.split("\nThe best thing")[0]
        if s.meta["depth"] == 0.0:
            assert before.endswith("<|im_start|>user\n")
        elif s.meta["depth"] < 1.0:  # the needle comes right after a sentence end
            assert before.endswith(".")
    end = tok.decode(samples[2].context_ids)
    assert end.endswith("sunny day.\n")  # depth 1.0 appends the needle


def test_style_and_length_checks():
    with pytest.raises(TaskError, match="style 'sideways' is unknown"):
        NIAH(style="sideways").samples(make_tokenizer(), TaskContext(4096))
    with pytest.raises(TaskError, match="no room for a haystack"):
        NIAH(style="original", lengths=[210]).samples(make_tokenizer(), TaskContext(4096))


def test_an_empty_haystack_is_one_clear_error(tmp_path):
    """Without text, the original style would make 'long' prompts of the needle alone, scored as usual."""
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(TaskError, match="has no text"):
        NIAH(style="original", lengths=[600], haystack=str(tmp_path)).samples(make_tokenizer(), TaskContext(4096))
