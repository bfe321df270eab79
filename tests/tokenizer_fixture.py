"""A tiny offline tokenizer for task tests: byte-level BPE trained in memory, ChatML chat template.

Byte-level, so every string round-trips through encode/decode (Chinese too, a few tokens per character).
Nothing is downloaded. ``make_tokenizer()`` is cached: the tokenizer is built once per test session.
"""
from __future__ import annotations

from functools import lru_cache

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "One of the special magic numbers for the key is: 1234567. What are all the special magic numbers?",
    "Answer the question based on the given passages. Only give me the answer and do not output any other words.",
    "You are given several news passages. Write a one-page summary of all news. Summary: Paragraph 1 2 3",
    "Please complete the code given below. def main(): return self.value + 1  # comment",
    "Memorize and track the chain(s) of variable assignment hidden in the following text. VAR ABCDE = 12345",
    "Below is a numbered list of words. In these words, some appear more often than others.",
    "Please reason step by step, and put your final answer within \\boxed{}. Find the number of integers.",
    "Question: What is the type of the question? Answer: Description Entity Location Number Human",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness.",
    "阅读以下文字并用中文简短回答 请基于给定的文章回答下述问题 现在请基于上面的文章回答下面的问题",
]


@lru_cache(maxsize=4)
def make_tokenizer(chat_template: bool = True, vocab_size: int = 600, english_words: bool = False):
    """``english_words``: also train on the wonderwords lists and numbered lists, with a larger vocabulary, so
    that RULER-sized prompts take about as many tokens as with a real tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = _CORPUS * 20
    if english_words:
        from importlib import resources

        for name in ("nounlist.txt", "adjectivelist.txt", "verblist.txt"):
            words = (resources.files("wonderwords") / "assets" / name).read_text(encoding="utf-8").split()
            corpus += [" ".join(f"{i}. {w}" for i, w in enumerate(words[j:j + 50], start=j))
                       for j in range(0, len(words), 50)] * 3
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = CHATML
    return fast
