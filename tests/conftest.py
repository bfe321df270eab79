"""What every test shares: the paths, the tiny random models with an id tokenizer (``tiny``), random prompts
(``prompt``, ``sample``), the tiny offline tokenizer (``make_tokenizer``; fixture ``tokenizer``), the
``shared_data`` fixture, and the guard that turns transformers' deprecations reached from kvbench into failures.

Tests import the helpers from here (``from tests.conftest import tiny``); test modules import nothing from
each other. The folders mirror the code: tests/kvbench/ (the core, engine, harness, CLI, results), tests/methods/,
tests/tasks/, tests/kernels/; tests/fixtures/ holds recorded data.
"""
from __future__ import annotations

import os
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from kvbench import models
from kvbench.models import IdTokenizer, LoadedModel
from kvbench.task import Sample

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"
# kvbench's own code: the package and the folders installed as its subpackages.
KVBENCH_DIRS = tuple(str(ROOT / d) + os.sep for d in ("kvbench", "methods", "kernels", "tasks"))


FIXTURES = ROOT / "tests" / "fixtures"


# ---- tiny random models, prompts ------------------------------------------------------------------------
EVICTION = ["random", "knorm", "streamingllm", "snapkv", "pyramidkv", "h2o", "tova", "adakv"]


def tiny(family: str, seed: int = 0) -> LoadedModel:
    model, _ = models.random_model(f"tiny-{family}", torch.float32, "cpu", seed)
    model.generation_config.eos_token_id = None
    return LoadedModel(model, IdTokenizer(), f"tiny-{family}", 4096)



def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1000, (n,), generator=g).tolist()


def sample(ctx: list[int], q: list[int], new: int = 8, sid: str = "s") -> Sample:
    return Sample(sid, ctx, q, [], new)


# ---- a tiny offline tokenizer (byte-level BPE trained in memory, ChatML chat template) ---------------------
# Byte-level, so every string round-trips through encode/decode (Chinese too, a few tokens per character).
# Nothing is downloaded; ``make_tokenizer()`` is cached: the tokenizer is built once per test session.

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


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with the offline test tokenizer, saved as a model directory."""
    out = tmp_path_factory.mktemp("tiny-model")
    model, _ = models.random_model("tiny-llama", torch.float32, "cpu", seed=0)
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    model.config._attn_implementation = "sdpa"
    model.save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    return out


@pytest.fixture
def tokenizer():
    return make_tokenizer()


HAYSTACK = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
            "It was the best of times, it was the worst of times, it was the age of wisdom. ") * 40


@pytest.fixture(scope="session")
def haystack(tmp_path_factory) -> Path:
    """A short repetitive text file: a needle-in-a-haystack task's ``--data`` for the tiny models."""
    path = tmp_path_factory.mktemp("hay") / "hay.txt"
    path.write_text(HAYSTACK)
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/data is absent (real benchmark data for tests)")
    return SHARED.resolve()


@pytest.fixture(autouse=True, scope="session")
def _quiet():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class KvbenchDeprecationError(AssertionError):
    """transformers deprecated something that kvbench's own code called."""


def kvbench_caller(frame) -> str | None:
    """The innermost kvbench frame on the stack below ``frame`` ("file:line"), if any."""
    while frame is not None:
        if frame.f_code.co_filename.startswith(KVBENCH_DIRS):
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def _guarded_warn(real_warn):
    def warn(message, category=None, stacklevel=1, source=None, **kwargs):
        category = category or (message.__class__ if isinstance(message, Warning) else UserWarning)
        caller = sys._getframe(1)
        if issubclass(category, (FutureWarning, DeprecationWarning)) and \
                caller.f_globals.get("__name__", "").startswith("transformers"):
            where = kvbench_caller(caller)
            if where is not None:
                raise KvbenchDeprecationError(f"transformers deprecation reached from kvbench ({where}): {message}")
        return real_warn(message, category, stacklevel + 1, source, **kwargs)
    warn.kvbench_guard = True
    return warn


@pytest.fixture(autouse=True, scope="session")
def no_transformers_deprecations_from_kvbench():
    """Warnings as errors for kvbench's own frames: a FutureWarning/DeprecationWarning that transformers
    raises while kvbench code is on the stack fails the test (transformers attributes these warnings to
    torch's module call, so a ``filterwarnings`` module pattern cannot catch them)."""
    real = warnings.warn
    warnings.warn = _guarded_warn(real)
    yield
    warnings.warn = real
