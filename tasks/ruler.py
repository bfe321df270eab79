"""RULER's synthetic tasks (NVIDIA/RULER), generated with the model's own tokenizer at the requested lengths.

Tasks and their settings are RULER's ``synthetic.yaml``, all 13: niah_single_1/2/3, niah_multikey_1/2/3,
niah_multivalue, niah_multiquery, vt (variable tracking), cwe (common words extraction), fwe (frequent words
extraction), qa_1 (SQuAD) and qa_2 (HotpotQA); the score is the average over the tasks run. Templates, answer prefixes, tokens to generate,
needle format ("One of the special magic {type_needle_v} for {key} is: {value}."), the three haystacks (the
repeated noise sentences, Paul Graham's essays, distractor needles), the 40 insertion depths, the key/value
generators (wonderwords adjective-noun pairs, 7-digit numbers, UUIDs) and the metric (string_match_all; for the
QA tasks string_match_part) follow RULER's code.

QA (RULER's ``qa.py``): the question's own documents (and, for SQuAD, the other paragraphs of its article first)
plus documents drawn from the rest of the dataset, shuffled with the fixed seed, as "Document i:\n..." blocks;
the number of documents is the largest that fits (binary search, step 10); sample i asks the dataset's i-th
question (SQuAD: answerable questions only). Data in the official files' schema, named as RULER's
``download_qa_dataset.sh`` names them: ``squad.json`` (SQuAD 2.0 dev, ``dev-v2.0.json``) and ``hotpotqa.json``
(HotpotQA dev distractor, ``hotpot_dev_distractor_v1.json``; both names are looked for), in the ``--data``
folder.

cwe's few-shot example is wrapped in the model's chat template with its answer, then the task in its own chat
turn, as RULER's ``prepare.py`` does (it formats every example with the model template plus answer prefix).

A sample's length L counts the whole prompt (chat template included) plus the task's tokens to generate, as
RULER's ``max_seq_length`` does: the haystack size is the largest that fits, found by binary search with the
tokenizer. The answer prefix (" The special magic numbers for ... are") is put after the generation prompt,
as RULER's chat templates do; the compressed context is the prompt up to the end of the haystack.

Determinism: every sample is drawn from ``random.Random("<seed>:<task>:<length>:<index>")``, so the same seed,
tokenizer and length give the same samples on every machine. RULER's own random streams (one global generator
across the binary search) are not reproduced: the samples are RULER's distribution, not RULER's files.

Data: the essay variants (niah_single_2/3, niah_multikey_1, niah_multivalue, niah_multiquery) need RULER's
``PaulGrahamEssays.json`` (``--data`` pointing at it or at a folder holding it); the others need no data.
Sentences of the essay haystack are split with a regular expression (RULER uses NLTK's punkt model, which
would need a download). cwe's RULER fallback word list (for more distinct words than wonderwords has, only
reached at very long lengths) is not shipped: such lengths raise an error.
"""
from __future__ import annotations

import json
import math
import random
import re
import string
import uuid
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, ClassVar

from kvbench.method import in_range
from kvbench.task import Sample, Task, TaskContext, TaskError, as_names, build_prompt

from .metrics import string_match_all, string_match_part

RULER_TASKS: tuple[str, ...] = (
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2",
)
QA_DATASETS = {"qa_1": "squad", "qa_2": "hotpotqa"}  # synthetic.yaml
# RULER's download_qa_dataset.sh saves them as <name>.json; the original file names are accepted too.
QA_FILES = {"squad": ("squad.json", "dev-v2.0.json"), "hotpotqa": ("hotpotqa.json", "hotpot_dev_distractor_v1.json")}

# synthetic.yaml
NIAH_CONFIG: dict[str, dict[str, Any]] = {
    "niah_single_1": dict(type_haystack="noise", type_needle_k="words", type_needle_v="numbers", num_needle_k=1,
                          num_needle_v=1, num_needle_q=1),
    "niah_single_2": dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_k=1,
                          num_needle_v=1, num_needle_q=1),
    "niah_single_3": dict(type_haystack="essay", type_needle_k="words", type_needle_v="uuids", num_needle_k=1,
                          num_needle_v=1, num_needle_q=1),
    "niah_multikey_1": dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_k=4,
                            num_needle_v=1, num_needle_q=1),
    "niah_multikey_2": dict(type_haystack="needle", type_needle_k="words", type_needle_v="numbers",
                            num_needle_k=1, num_needle_v=1, num_needle_q=1),
    "niah_multikey_3": dict(type_haystack="needle", type_needle_k="uuids", type_needle_v="uuids", num_needle_k=1,
                            num_needle_v=1, num_needle_q=1),
    "niah_multivalue": dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_k=1,
                            num_needle_v=4, num_needle_q=1),
    "niah_multiquery": dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_k=1,
                            num_needle_v=1, num_needle_q=4),
}
VT_CONFIG = dict(type_haystack="noise", num_chains=1, num_hops=4)
CWE_CONFIG = dict(freq_cw=30, freq_ucw=3, num_cw=10, num_fewshot=1)
FWE_CONFIG = dict(alpha=2.0, coded_wordlen=6)

# scripts/data/synthetic/constants.py
TEMPLATES: dict[str, dict[str, Any]] = {
    "niah": {
        "tokens_to_generate": 128,
        "template": "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
                    "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
                    "magic {type_needle_v} for {query} mentioned in the provided text?",
        "answer_prefix": " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    },
    "variable_tracking": {
        "tokens_to_generate": 30,
        "template": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",
        "answer_prefix": " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
                         "variables are assigned the value {query}, they are: ",
    },
    "common_words_extraction": {
        "tokens_to_generate": 120,
        "template": "Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                    "the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the "
                    "above list?",
        "answer_prefix": " Answer: The top 10 words that appear most often in the list are:",
    },
    "qa": {
        "tokens_to_generate": 32,
        "template": "Answer the question based on the given documents. Only give me the answer and do not output any "
                    "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based "
                    "on the given documents. Only give me the answer and do not output any other words.\n\n"
                    "Question: {query}",
        "answer_prefix": " Answer:",
    },
    "freq_words_extraction": {
        "tokens_to_generate": 50,
        "template": "Read the following coded text and track the frequency of each coded word. Find the three most "
                    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
                    "ignore the dots '....'. What are the three most frequently appeared words in the above coded "
                    "text?",
        "answer_prefix": " Answer: According to the coded text above, the three most frequently appeared words are:",
    },
}
CATEGORY = {**{t: "niah" for t in NIAH_CONFIG}, "vt": "variable_tracking", "cwe": "common_words_extraction",
            "fwe": "freq_words_extraction", "qa_1": "qa", "qa_2": "qa"}
DOCUMENT = "Document {i}:\n{document}"

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS: list[int] = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40)); no ties
ESSAY_FILE = "PaulGrahamEssays.json"
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]\u201d\u2019])\s+")


# ---------------------------------------------------------------------------------------------------------
# word lists, essay, helpers
# ---------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def wonderwords_list(name: str) -> tuple[str, ...]:
    """A word list of the ``wonderwords`` package (nounlist.txt, adjectivelist.txt, verblist.txt)."""
    try:
        text = (resources.files("wonderwords") / "assets" / name).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise TaskError(f"RULER needs the wonderwords package's word lists ({name}): pip install wonderwords") from e
    return tuple(w.rstrip() for w in text.splitlines())


@lru_cache(maxsize=1)
def _key_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(sorted(set(wonderwords_list("adjectivelist.txt")))), tuple(sorted(set(wonderwords_list("nounlist.txt"))))


@lru_cache(maxsize=8)
def _cwe_words(seed: int) -> tuple[str, ...]:
    words = sorted(set(wonderwords_list("nounlist.txt") + wonderwords_list("adjectivelist.txt")
                       + wonderwords_list("verblist.txt")))
    random.Random(seed).shuffle(words)
    return tuple(words)


def find_essay(data: str | None) -> Path | None:
    if not data:
        return None
    root = Path(data)
    if root.is_file():
        return root if root.name == ESSAY_FILE else None
    for p in (root / ESSAY_FILE, root / "ruler" / ESSAY_FILE, root / "json" / ESSAY_FILE):
        if p.is_file():
            return p
    return None


@lru_cache(maxsize=2)
def _essay_words(path: str) -> tuple[str, ...]:
    try:
        with open(path, encoding="utf-8") as f:
            essay = json.load(f)["text"]
    except (ValueError, KeyError, TypeError) as e:  # not JSON, or not RULER's {"text": ...}
        raise TaskError(f"{path} is not RULER's essay file (a JSON object with a 'text' string: {type(e).__name__}); "
                        "point --data at the official PaulGrahamEssays.json") from None
    if not isinstance(essay, str):
        raise TaskError(f"{path}: 'text' is not a string; point --data at the official PaulGrahamEssays.json")
    if not essay.strip():
        raise TaskError(f"{path}: 'text' is empty; point --data at the official PaulGrahamEssays.json")
    return tuple(re.sub(r"\s+", " ", essay).split(" "))


def find_qa_file(data: str | None, dataset: str) -> Path | None:
    if not data:
        return None
    root = Path(data)
    if root.is_file():
        return root if root.name in QA_FILES[dataset] else None
    for folder in (root, root / "ruler", root / "json"):
        for name in QA_FILES[dataset]:
            if (folder / name).is_file():
                return folder / name
    return None


@dataclass(frozen=True)
class QAData:
    qas: tuple[dict, ...]  # {"query", "outputs", "context": [doc ids], "more_context": [doc ids]}
    docs: tuple[str, ...]


def _bad_qa(path: Path, e: Exception) -> TaskError:
    return TaskError(f"{path} is not in the official schema of its dataset ({type(e).__name__}: {e}); RULER's "
                     f"download_qa_dataset.sh gets SQuAD dev-v2.0.json and HotpotQA hotpot_dev_distractor_v1.json")


@lru_cache(maxsize=4)
def read_qa(path: str, dataset: str) -> QAData:
    """RULER's read_squad / read_hotpotqa: the questions and the sorted set of distinct documents."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if dataset == "squad":
            docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
            index = {c: i for i, c in enumerate(docs)}
            qas = []
            for d in data["data"]:
                article = [index[p["context"]] for p in d["paragraphs"]]
                for p in d["paragraphs"]:
                    own = index[p["context"]]
                    for qa in p["qas"]:
                        if not qa.get("is_impossible", False):
                            qas.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                        "context": [own], "more_context": [i for i in article if i != own]})
        else:
            def doc(title, sentences):
                return f"{title}\n{''.join(sentences)}"
            docs = sorted({doc(t, p) for d in data for t, p in d["context"]})
            index = {c: i for i, c in enumerate(docs)}
            qas = [{"query": d["question"], "outputs": [d["answer"]],
                    "context": [index[doc(t, p)] for t, p in d["context"]], "more_context": []} for d in data]
    except (KeyError, TypeError, ValueError) as e:
        raise _bad_qa(Path(path), e) from e
    if not qas:
        raise _bad_qa(Path(path), ValueError("no answerable question"))
    return QAData(tuple(qas), tuple(docs))


def split_sentences(text: str) -> list[str]:
    """Sentences of a whitespace-normalised text (stand-in for NLTK's ``sent_tokenize``)."""
    return [s for s in _SENT_SPLIT.split(text.strip()) if s]


def zeta(s: float, terms: int = 1000) -> float:
    """Riemann zeta for s > 1 (Euler-Maclaurin tail), in place of ``scipy.special.zeta``."""
    n = terms
    head = math.fsum(k ** -s for k in range(1, n))
    return head + n ** (1 - s) / (s - 1) + 0.5 * n ** -s + s * n ** (-s - 1) / 12


_MARK = "\u2063\u2063KVBENCH-RULER\u2063\u2063"


def _chat_wrap(tokenizer) -> tuple[str, str]:
    """(head, tail) of one user turn plus the generation prompt in the model's chat template ('', '' without one)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return "", ""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], add_generation_prompt=True,
                                             tokenize=False)
    head, tail = rendered.split(_MARK, 1)
    return head, tail


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "words":
        adjs, nouns = _key_words()
        return f"{rng.choice(adjs)}-{rng.choice(nouns)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------------------
# generators: each returns the prompt pieces for one sample at haystack size n
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Draft:
    prefix: str  # the prompt up to the end of the haystack (compressed part)
    suffix: str  # the question
    answer_prefix: str  # after the generation prompt
    answers: list[str]
    meta: dict
    # Worked examples (user message, answer) before the task, each in its own chat turn (cwe); the answer
    # follows the answer prefix, and a newline each example, as RULER's prepare.py writes them.
    shots: list[tuple[str, str]] = field(default_factory=list)


def _split(template: str, **fmt) -> tuple[str, str]:
    cut = template.index("{context}") + len("{context}")
    return template[:cut].format(**fmt), template[cut:].format(**fmt)


def gen_niah(task: str, n: int, rng: random.Random, essay: tuple[str, ...] | None) -> Draft:
    cfg = NIAH_CONFIG[task]
    num_k = max(cfg["num_needle_k"], cfg["num_needle_q"])
    tk, tv = cfg["type_needle_k"], cfg["type_needle_v"]
    keys, values, needles = [], [], []
    for _ in range(num_k):
        keys.append(_random_value(rng, tk))
        vals = []
        for _ in range(cfg["num_needle_v"]):
            vals.append(_random_value(rng, tv))
            needles.append(NEEDLE.format(type_needle_v=tv, key=keys[-1], value=vals[-1]))
        values.append(vals)
    rng.shuffle(needles)
    indices = rng.sample(range(num_k), cfg["num_needle_q"])
    queries = [keys[i] for i in indices]
    answers = [a for i in indices for a in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]

    depths: list[float] = []
    if cfg["type_haystack"] == "essay":
        assert essay is not None
        words = essay[:n] if n <= len(essay) else (essay * (n // len(essay) + 1))[:n]
        sents = split_sentences(" ".join(words))
        chosen = sorted(rng.sample(DEPTHS, len(needles)))
        positions = [0] + [int(len(sents) * (d / 100)) for d in chosen] + [len(sents)]
        parts = []
        for i in range(1, len(positions)):
            parts.append(" ".join(sents[positions[i - 1]:positions[i]]))
            if i - 1 < len(needles):
                parts.append(needles[i - 1])
        context = " ".join(parts)
        depths = [float(d) for d in chosen]
        units = [(positions[k + 1], len(sents)) for k in range(len(needles))]  # sentences before, sentences
    else:
        if cfg["type_haystack"] == "noise":
            sentences = [NOISE] * n
        else:  # distractor needles with other random keys and values
            sentences = [NEEDLE.format(type_needle_v=tv, key=_random_value(rng, tk), value=_random_value(rng, tv))
                         for _ in range(n)]
        indexes = sorted(rng.sample(range(n), len(needles)), reverse=True)
        for index, needle in zip(indexes, needles):
            sentences.insert(index, needle)
        context = "\n".join(sentences)
        total = len(sentences)
        where = {id(s): i for i, s in enumerate(sentences)}
        depths = [100.0 * where[id(nd)] / total for nd in needles]
        finals = sorted(where[id(nd)] for nd in needles)
        # haystack lines before each needle (other needles not counted), haystack lines
        units = [(where[id(nd)] - finals.index(where[id(nd)]), n) for nd in needles]

    template, answer_prefix = TEMPLATES["niah"]["template"], TEMPLATES["niah"]["answer_prefix"]
    type_v = tv
    if cfg["num_needle_q"] * cfg["num_needle_v"] == 1:
        def singular(t: str) -> str:
            return (t.replace("Some", "A").replace("are all", "is").replace("are", "is")
                    .replace("answers", "answer"))
        template, answer_prefix = singular(template), singular(answer_prefix)
        type_v = tv[:-1]
    prefix, suffix = _split(template, type_needle_v=type_v, context=context, query=query)
    offset = prefix.index(context)
    placed = []
    for needle, depth, (before, total_units) in zip(needles, depths, units):
        start = prefix.index(needle, offset)
        placed.append({"text": needle, "char_start": start, "depth": depth, "units_before": before,
                       "units": total_units})
    return Draft(prefix, suffix, answer_prefix.format(type_needle_v=type_v, query=query), answers,
                 {"needles": placed, "haystack": cfg["type_haystack"], "context_chars": (offset, offset + len(context))})


def _vt_chains(rng: random.Random, num_chains: int, num_hops: int, is_icl: bool):
    k = 3 if is_icl else 5
    num_hops = min(10, num_hops) if is_icl else num_hops
    names = ["".join(rng.choices(string.ascii_uppercase, k=k)) for _ in range((num_hops + 1) * num_chains)]
    while len(set(names)) < num_chains * (num_hops + 1):
        names.append("".join(rng.choices(string.ascii_uppercase, k=k)))
    vars_ret, chains = [], []
    for i in range(0, len(names), num_hops + 1):
        these = names[i:i + num_hops + 1]
        vars_ret.append(these)
        value = "12345" if is_icl else str(rng.randint(10000, 99998))
        chain = [f"VAR {these[0]} = {value}"]
        chain += [f"VAR {these[j + 1]} = VAR {these[j]} " for j in range(num_hops)]
        chains.append(chain)
    return vars_ret, chains


def _vt_text(n: int, rng: random.Random, is_icl: bool) -> tuple[str, str, str, list[str], list[str]]:
    vars_, chains = _vt_chains(rng, VT_CONFIG["num_chains"], VT_CONFIG["num_hops"], is_icl)
    value = chains[0][0].split("=")[-1].strip()
    sentences = [NOISE] * n
    for chain in chains:
        positions = sorted(rng.sample(range(len(sentences)), len(chain)))
        for insert_at, j in zip(positions, range(len(chain))):
            sentences.insert(insert_at + j, chain[j])
    context = "\n".join(sentences).replace(". \n", ".\n")
    t = TEMPLATES["variable_tracking"]
    num_v = VT_CONFIG["num_hops"] + 1
    prefix, suffix = _split(t["template"], context=context, query=value)
    return prefix, suffix, t["answer_prefix"].format(num_v=num_v, query=value), vars_[0], chains[0]


def _vt_randomize_icl(icl: str, rng: random.Random) -> str:
    for item in icl.strip().split()[-VT_CONFIG["num_hops"] - 1:]:
        icl = icl.replace(item, "".join(rng.choices(string.ascii_uppercase, k=len(item))))
    return icl.replace("12345", str(rng.randint(10000, 99998)))


def gen_vt(n: int, rng: random.Random, icl: str) -> Draft:
    prefix, suffix, answer_prefix, answers, chain = _vt_text(n, rng, is_icl=False)
    shot = _vt_randomize_icl(icl, rng)
    return Draft(shot + "\n" + prefix, suffix, answer_prefix, answers, {"chain": chain})


def _cwe_example(rng: random.Random, words: tuple[str, ...], num_words: int, common_repeats: int,
                 uncommon_repeats: int, common_nums: int) -> tuple[str, list[str]]:
    if num_words > len(words):
        raise TaskError(f"RULER cwe: {num_words} distinct words needed, wonderwords has {len(words)} (RULER's extra "
                        f"word list is not shipped); use a shorter length")
    full = rng.sample(words, num_words)
    common, uncommon = full[:common_nums], full[common_nums:]
    word_list = common * int(common_repeats) + uncommon * int(uncommon_repeats)
    rng.shuffle(word_list)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(word_list)), common


def gen_cwe(n: int, rng: random.Random, length: int, seed: int) -> Draft:
    words = _cwe_words(seed)
    c = CWE_CONFIG
    if length < 4096:
        shots = [_cwe_example(rng, words, 20, 3, 1, c["num_cw"]) for _ in range(c["num_fewshot"])]
        context, answer = _cwe_example(rng, words, n, 6, 1, c["num_cw"])
    else:
        shots = [_cwe_example(rng, words, 40, 10, 3, c["num_cw"]) for _ in range(c["num_fewshot"])]
        context, answer = _cwe_example(rng, words, n, c["freq_cw"], c["freq_ucw"], c["num_cw"])
    t = TEMPLATES["common_words_extraction"]
    listed = [(t["template"].format(context=ctx), " ".join(f"{i + 1}. {w}" for i, w in enumerate(ans)))
              for ctx, ans in shots]
    prefix, suffix = _split(t["template"], context=context)
    return Draft(prefix, suffix, t["answer_prefix"], answer, {}, shots=listed)


def gen_fwe(n: int, rng: random.Random, length: int) -> Draft:
    t = TEMPLATES["freq_words_extraction"]
    vocab_size = max(4, (length - t["tokens_to_generate"]) // 50)
    wl = FWE_CONFIG["coded_wordlen"]
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=wl)) for _ in range(vocab_size)]
    while len(set(vocab)) < vocab_size:
        vocab.append("".join(rng.choices(string.ascii_lowercase, k=wl)))
    vocab = sorted(set(vocab))
    rng.shuffle(vocab)
    vocab[0] = "..."  # the top-ranked word is noise
    alpha = FWE_CONFIG["alpha"]
    z = zeta(alpha)
    words = []
    for k, w in enumerate(vocab, start=1):
        words += [w] * int(n * k ** -alpha / z)
    rng.shuffle(words)
    prefix, suffix = _split(t["template"], context=" ".join(words))
    return Draft(prefix, suffix, t["answer_prefix"], vocab[1:4], {"vocab_size": vocab_size})


def gen_qa(num_docs: int, index: int, rng: random.Random, data: QAData, seed: int) -> Draft:
    """RULER's qa.py generate_input_output: the question's documents plus others, shuffled with the fixed seed."""
    qa = data.qas[index % len(data.qas)]
    own, more = list(qa["context"]), list(qa["more_context"])
    if num_docs < len(data.docs):
        if num_docs - len(own) > len(more):
            taken = set(own + more)
            others = [i for i in range(len(data.docs)) if i not in taken]
            chosen = own + more + rng.sample(others, max(0, num_docs - len(own) - len(more)))
        else:
            chosen = own + rng.sample(more, max(0, num_docs - len(own)))
        docs = [data.docs[i] for i in chosen]
    else:
        docs = (list(data.docs) * (num_docs // len(data.docs) + 1))[:num_docs]
    random.Random(seed).shuffle(docs)
    context = "\n\n".join(DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(docs))
    t = TEMPLATES["qa"]
    prefix, suffix = _split(t["template"], context=context, query=qa["query"])
    return Draft(prefix, suffix, t["answer_prefix"], list(qa["outputs"]),
                 {"question_index": index % len(data.qas), "num_docs": len(docs)})


# ---------------------------------------------------------------------------------------------------------
# the task
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Ruler(Task):
    """RULER synthetic tasks at the given lengths (tokens, prompt + generation)."""

    name: ClassVar[str] = "ruler"

    tasks: tuple[str, ...] = RULER_TASKS  # which of the 13 tasks
    lengths: tuple[int, ...] = (4096,)  # total lengths L in tokens (prompt + tokens to generate)
    n_per_task: int = field(default=25, metadata=in_range(1))  # samples per task and length
    seed: int = 42  # RULER's default random seed

    def __post_init__(self):
        self.tasks = as_names(self.tasks)
        unknown = [t for t in self.tasks if t not in RULER_TASKS]
        if unknown:
            raise TaskError(f"unknown RULER task(s) {', '.join(unknown)}; known: {', '.join(RULER_TASKS)}")
        lengths = self.lengths
        if isinstance(lengths, (int, str)):
            lengths = [lengths] if isinstance(lengths, int) else as_names(lengths)
        self.lengths = tuple(int(x) for x in lengths)
        self.n_per_task, self.seed = int(self.n_per_task), int(self.seed)

    # -- measuring -----------------------------------------------------------------------------------------
    @staticmethod
    def _build(tokenizer, d: Draft) -> tuple[list[int], list[int]]:
        """(context_ids, question_ids) of a draft: chat template, answer prefix after the generation prompt."""
        answer_ids = tokenizer.encode(d.answer_prefix, add_special_tokens=False)
        if not d.shots:
            context_ids, question_ids = build_prompt(tokenizer, d.prefix, d.suffix, chat=True)
            return context_ids, question_ids + answer_ids
        head, tail = _chat_wrap(tokenizer)
        shots = "".join(head + user + tail + d.answer_prefix + " " + answer + "\n" for user, answer in d.shots)
        if not head and not tail:  # no chat template: the plain text, with the tokenizer's own BOS
            context_ids, question_ids = build_prompt(tokenizer, shots + d.prefix, d.suffix, chat=False)
            return context_ids, question_ids + answer_ids
        return (tokenizer.encode(shots + head + d.prefix, add_special_tokens=False),
                tokenizer.encode(d.suffix + tail, add_special_tokens=False) + answer_ids)

    @classmethod
    def _count(cls, tokenizer, d: Draft) -> int:
        context_ids, question_ids = cls._build(tokenizer, d)
        return len(context_ids) + len(question_ids)

    @staticmethod
    def _count_raw(tokenizer, d: Draft) -> int:
        return len(tokenizer.encode(d.prefix + d.suffix + d.answer_prefix, add_special_tokens=False))

    @staticmethod
    def _fit(make: Callable[[int], Draft], count: Callable[[Draft], int], budget: int, incremental: int,
             what: str = "") -> int:
        """The largest haystack size n whose prompt fits ``budget`` tokens (binary search, as RULER does)."""
        c1 = count(make(incremental))
        if c1 > budget:
            raise TaskError(f"RULER {what}: not even the smallest haystack fits {budget} prompt tokens")
        per_unit = max((count(make(2 * incremental)) - c1) / incremental, 1e-3)  # fixed parts excluded
        lo, hi = incremental, incremental + max(int((budget - c1) / per_unit * 2), incremental)
        while count(make(hi)) <= budget:  # the estimate was low: widen
            if count(make(hi)) <= c1:  # the haystack does not grow with n (an empty source)
                raise TaskError(f"RULER {what}: the haystack stays empty however large; check the data")
            lo, hi = hi, hi * 2
        best = None
        while lo <= hi:
            mid = (lo + hi) // 2
            if count(make(mid)) <= budget:
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        if best is None:
            raise TaskError(f"RULER {what}: not even the smallest haystack fits {budget} prompt tokens")
        return best

    def _vt_icl(self, tokenizer) -> str:
        """RULER's one-shot example for vt: an is_icl chain in noise, fitted to 500 tokens of raw text."""
        rng_seed = f"{self.seed}:vt:icl"

        def make(n: int) -> Draft:
            p, s, a, ans, _ = _vt_text(n, random.Random(rng_seed), is_icl=True)
            return Draft(p, s, a, ans, {})
        d = make(self._fit(make, lambda d: self._count_raw(tokenizer, d), 500, 5))
        return d.prefix + d.suffix + d.answer_prefix + " " + " ".join(d.answers) + "\n"

    @staticmethod
    def _incremental(task: str, L: int, budget: int) -> int:
        """RULER's haystack step per task type (also the step down when a sample comes out too long)."""
        kind = NIAH_CONFIG.get(task, {}).get("type_haystack", task)
        step = {"essay": 500, "noise": 25, "needle": 25, "vt": 10, "cwe": 10, "fwe": 10, "qa_1": 10, "qa_2": 10}[kind]
        if kind in ("noise", "needle", "vt") and L < 4096:
            step = 5
        return max(1, min(step, budget // 8))

    # -- the Task protocol ----------------------------------------------------------------------------------
    def samples(self, tokenizer, ctx: TaskContext) -> list[Sample]:
        essay_tasks = [t for t in self.tasks if NIAH_CONFIG.get(t, {}).get("type_haystack") == "essay"]
        essay = None
        if essay_tasks:
            path = find_essay(ctx.data)
            if path is None:
                raise TaskError(f"RULER {', '.join(essay_tasks)} use the Paul Graham essay haystack, which is not "
                                f"shipped: pass --data pointing at RULER's {ESSAY_FILE} (or a folder holding it), "
                                f"or choose the noise tasks (niah_single_1, niah_multikey_2/3, vt, cwe, fwe)")
            essay = _essay_words(str(path))
        qa_data: dict[str, QAData] = {}
        for task in self.tasks:
            if task in QA_DATASETS:
                dataset = QA_DATASETS[task]
                path = find_qa_file(ctx.data, dataset)
                if path is None:
                    raise TaskError(f"RULER {task} needs the {dataset} file, which is not shipped: pass --data with a "
                                    f"folder holding {' or '.join(QA_FILES[dataset])} (RULER's "
                                    f"download_qa_dataset.sh fetches it), or leave {task} out of tasks=")
                qa_data[task] = read_qa(str(path), dataset)
        n_samples = self.n_per_task if ctx.limit is None else min(self.n_per_task, ctx.limit)
        biggest_gen = max(TEMPLATES[CATEGORY[t]]["tokens_to_generate"] for t in self.tasks)
        lengths = [L for L in self.lengths if L - biggest_gen <= ctx.max_context_tokens]
        skipped = [L for L in self.lengths if L not in lengths]
        if not lengths:
            raise TaskError(f"no RULER length fits the model's window ({ctx.max_context_tokens} prompt tokens): "
                            f"{', '.join(map(str, self.lengths))}")
        if skipped:
            warnings.warn(f"RULER lengths {skipped} do not fit the model's window ({ctx.max_context_tokens} prompt "
                          f"tokens); skipped")
        icl = self._vt_icl(tokenizer) if "vt" in self.tasks else ""
        count = lambda d: self._count(tokenizer, d)  # noqa: E731
        out: list[Sample] = []
        for task in self.tasks:
            to_gen = TEMPLATES[CATEGORY[task]]["tokens_to_generate"]
            for L in lengths:
                budget = L - to_gen
                step = self._incremental(task, L, budget)
                make_for = self._maker(task, L, essay, icl, qa_data.get(task))
                n0 = self._fit(make_for(0), count, budget, step, f"{task} at length {L}")
                for i in range(n_samples):
                    make, n = make_for(i), n0
                    d = make(n)
                    while n > step and count(d) > budget:
                        n -= step
                        d = make(n)
                    out.append(self._to_sample(tokenizer, task, L, i, n, d, to_gen, skipped))
        return out

    def _maker(self, task: str, L: int, essay, icl: str,
               qa: QAData | None = None) -> Callable[[int], Callable[[int], Draft]]:
        def for_index(i: int) -> Callable[[int], Draft]:
            seed = f"{self.seed}:{task}:{L}:{i}"
            if qa is not None:
                return lambda n: gen_qa(n, i, random.Random(seed), qa, self.seed)
            if task in NIAH_CONFIG:
                return lambda n: gen_niah(task, n, random.Random(seed), essay)
            if task == "vt":
                return lambda n: gen_vt(n, random.Random(seed), icl)
            if task == "cwe":
                return lambda n: gen_cwe(n, random.Random(seed), L, self.seed)
            return lambda n: gen_fwe(n, random.Random(seed), L)
        return for_index

    def _to_sample(self, tokenizer, task: str, L: int, i: int, n: int, d: Draft, to_gen: int,
                   skipped: list[int]) -> Sample:
        context_ids, question_ids = self._build(tokenizer, d)
        meta: dict[str, Any] = {"task": task, "category": CATEGORY[task], "length": L, "haystack_size": n,
                                "input_tokens": len(context_ids) + len(question_ids), "seed": self.seed,
                                "skipped_lengths": skipped, **d.meta}
        if "needles" in d.meta:
            # token position of each needle in context_ids (the chat header comes first)
            head = len(context_ids) - len(tokenizer.encode(d.prefix, add_special_tokens=False))
            for nd in meta["needles"]:
                nd["token_start"] = head + len(tokenizer.encode(d.prefix[: nd["char_start"]], add_special_tokens=False))
        return Sample(id=f"{task}/{L}/{i}", context_ids=context_ids, question_ids=question_ids, answers=d.answers,
                      max_new_tokens=to_gen, meta=meta)

    def score(self, sample: Sample, prediction: str) -> dict[str, float]:
        match = string_match_part if sample.meta.get("category") == "qa" else string_match_all
        return {"score": 100.0 * match(prediction.strip(), sample.answers)}

    def summarize(self, records: list[dict]) -> dict:
        table: dict[str, dict[int, list[float]]] = {}
        for r in records:
            m = r.get("meta", {})
            table.setdefault(m.get("task"), {}).setdefault(m.get("length"), []).append(r["scores"]["score"])
        per_task = {t: {L: sum(v) / len(v) for L, v in sorted(by_len.items())}
                    for t, by_len in table.items() if t is not None}
        lengths = sorted({L for by_len in per_task.values() for L in by_len})
        per_length = {}
        for L in lengths:
            vals = [by_len[L] for by_len in per_task.values() if L in by_len]
            per_length[L] = sum(vals) / len(vals)
        skipped = sorted({L for r in records for L in r.get("meta", {}).get("skipped_lengths") or []})
        return {"n": len(records), "score": sum(per_length.values()) / len(per_length) if per_length else float("nan"),
                "per_length": per_length, "per_task": per_task, "skipped_lengths": skipped}

    def score_units(self, records: list[dict]) -> list[tuple[float, dict[str, float]]]:
        """As ``summarize`` scores: every length an equal share, split equally among the tasks run at it."""
        cells: dict[int, dict[str, dict[str, float]]] = {}
        for r in records:
            m = r.get("meta", {})
            if m.get("task") is not None:
                cells.setdefault(m.get("length"), {}).setdefault(m["task"], {})[r["id"]] = r["scores"]["score"]
        return [(1.0 / len(cells) / len(tasks), units) for tasks in cells.values() for units in tasks.values()]
