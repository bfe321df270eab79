"""Answer-scoring metrics shared by the tasks.

LongBench v1 metrics follow the definitions of the official ``metrics.py`` of THUDM/LongBench; every
function here returns a value in [0, 1] for ONE prediction against ONE reference, as the official ones do.
``longbench_score`` applies the official per-sample rule (max over the references, times 100).

RULER's ``string_match_all`` / ``string_match_part`` are given per sample (a fraction in [0, 1]); RULER's
task score is their mean over samples, times 100.

Known quirks of the official code that are kept on purpose, because the published numbers include them:

- ``classification_score``: the official code removes items from the list it is iterating over (so an
  item right after a removed one is never checked), and its "no exact class in the prediction" fallback is
  unreachable (it tests ``em_match_list != 0``, always true): a prediction naming no class scores 0.
- ``code_sim_score``: ``fuzzywuzzy.fuzz.ratio``; without ``python-Levenshtein`` installed fuzzywuzzy uses
  difflib's SequenceMatcher, which can differ from the C implementation by a point or so on some pairs.
"""
from __future__ import annotations

import re
import string
import warnings
from collections import Counter
from typing import Callable, Iterable

_CN_PUNCTUATION = ("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟"
                   "〰〾〿–—‘’‛“”„‟…‧﹏.")
_EN_PUNCT = frozenset(string.punctuation)
_ALL_PUNCT = frozenset(string.punctuation + _CN_PUNCTUATION)


def _jieba_cut(text: str) -> list[str]:
    import jieba  # imported lazily: it prints a banner and builds its dictionary on first use

    jieba.setLogLevel(60)
    return list(jieba.cut(text, cut_all=False))


# ---------------------------------------------------------------------------------------------------------
# normalisation and token F1
# ---------------------------------------------------------------------------------------------------------

def normalize_answer(s: str) -> str:
    """Lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (SQuAD style)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _EN_PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Lowercase, drop ASCII and Chinese punctuation, remove all whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _ALL_PUNCT)
    return "".join(s.split())


def f1_score(prediction: list, ground_truth: list) -> float:
    """Bag-of-tokens F1 between two token lists (0 when nothing is shared)."""
    common = Counter(prediction) & Counter(ground_truth)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction)
    recall = num_same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """F1 over jieba words, each word normalised with ``normalize_zh_answer`` and empty ones dropped."""
    pred = [t for t in (normalize_zh_answer(w) for w in _jieba_cut(prediction)) if t]
    ref = [t for t in (normalize_zh_answer(w) for w in _jieba_cut(ground_truth)) if t]
    return f1_score(pred, ref)


# ---------------------------------------------------------------------------------------------------------
# ROUGE
# ---------------------------------------------------------------------------------------------------------

def rouge_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """ROUGE-L F from the ``rouge`` package; any error it raises (empty text, ...) counts as 0."""
    from rouge import Rouge

    try:
        scores = Rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # the official code catches everything here
        return 0.0
    return float(scores["rouge-l"]["f"])


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return rouge_score(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(ground_truth)))


def _rouge_tokens(text: str) -> list[str]:
    """The default tokenizer of Google's ``rouge_score``: lowercase, non-alphanumerics become spaces."""
    return [t for t in re.sub(r"[^a-z0-9]+", " ", text.lower()).split() if t]


def rouge1_recall(prediction: str, reference: str) -> float:
    """ROUGE-1 recall: the share of reference unigrams (with multiplicity) found in the prediction.

    Tokenised like ``rouge_score`` without stemming. An empty reference scores 0. Used by needle tests where
    the answer is a sentence and the question is how much of it came back.
    """
    ref = _rouge_tokens(reference)
    if not ref:
        return 0.0
    overlap = Counter(ref) & Counter(_rouge_tokens(prediction))
    return sum(overlap.values()) / len(ref)


def _lcs_indices(ref: list[str], can: list[str]) -> list[int]:
    """Indices into ``ref`` of one longest common subsequence (the backtracking ``rouge_score`` uses)."""
    rows, cols = len(ref), len(can)
    table = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        ri = ref[i - 1]
        prev, cur = table[i - 1], table[i]
        for j in range(1, cols + 1):
            cur[j] = prev[j - 1] + 1 if ri == can[j - 1] else max(prev[j], cur[j - 1])
    out: list[int] = []
    i, j = rows, cols
    while i > 0 and j > 0:
        if ref[i - 1] == can[j - 1]:
            out.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return out[::-1]


def rouge_lsum_f(prediction: str, reference: str) -> float:
    """Summary-level ROUGE-L F ("rougeLsum" of ``rouge_score``/``evaluate``): sentences split on newlines,
    union LCS of each reference sentence against all prediction sentences, no stemming."""
    ref_sents = [_rouge_tokens(s) for s in reference.split("\n") if s]
    can_sents = [_rouge_tokens(s) for s in prediction.split("\n") if s]
    m = sum(map(len, ref_sents))
    n = sum(map(len, can_sents))
    if not m or not n:
        return 0.0
    cnt_r: Counter = Counter()
    cnt_c: Counter = Counter()
    for s in ref_sents:
        cnt_r.update(s)
    for s in can_sents:
        cnt_c.update(s)
    hits = 0
    for r in ref_sents:
        union: set[int] = set()
        for c in can_sents:
            union.update(_lcs_indices(r, c))
        for t in (r[i] for i in sorted(union)):
            if cnt_c[t] > 0 and cnt_r[t] > 0:
                hits += 1
                cnt_c[t] -= 1
                cnt_r[t] -= 1
    recall, precision = hits / m, hits / n
    return 0.0 if recall + precision == 0 else 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------------------------------
# classification, retrieval, counting, code
# ---------------------------------------------------------------------------------------------------------

def classification_score(prediction: str, ground_truth: str, all_classes: Iterable[str] | None = None,
                         **kwargs) -> float:
    """LongBench trec/lsht: 1/k when the true class is among the k classes named in the prediction.

    Classes that are a strict substring of the true class do not count against it. The list pruning walks
    the list while removing from it, exactly like the official loop (the element after a removed one is
    skipped); see the module docstring.
    """
    matches = [c for c in (all_classes or []) if c in prediction]
    i = 0
    while i < len(matches):  # same visiting order as ``for term in matches: ... matches.remove(term)``
        term = matches[i]
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
        i += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _number_hit_rate(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(1 for n in numbers if n == str(target)) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """passage_retrieval_en: the share of numbers in the prediction equal to the paragraph number."""
    found = re.findall(r"Paragraph (\d+)", ground_truth)
    return _number_hit_rate(prediction, found[0]) if found else 0.0


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    found = re.findall(r"段落(\d+)", ground_truth)
    return _number_hit_rate(prediction, found[0]) if found else 0.0


def count_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """passage_count: the share of numbers in the prediction equal to the true count."""
    return _number_hit_rate(prediction, str(ground_truth))


def code_sim_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """lcc/repobench-p: fuzzy ratio of the first predicted line that is not a comment or a code fence."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fuzzywuzzy import fuzz

    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return fuzz.ratio(line, ground_truth) / 100


# ---------------------------------------------------------------------------------------------------------
# RULER
# ---------------------------------------------------------------------------------------------------------

def string_match_all(prediction: str, references: Iterable[str]) -> float:
    """RULER (niah, vt, cwe, fwe): the share of references found in the prediction, case-insensitive."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        return 0.0
    pred = prediction.lower()
    return sum(1.0 for r in refs if str(r).lower() in pred) / len(refs)


def string_match_part(prediction: str, references: Iterable[str]) -> float:
    """RULER (qa): 1 when any reference is found in the prediction, case-insensitive."""
    refs = [references] if isinstance(references, str) else list(references)
    pred = prediction.lower()
    return max((1.0 if str(r).lower() in pred else 0.0 for r in refs), default=0.0)


# ---------------------------------------------------------------------------------------------------------
# LongBench per-dataset table
# ---------------------------------------------------------------------------------------------------------

LONGBENCH_METRICS: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "lsht": classification_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}

# The packages each metric imports when it first scores (lazily: jieba prints a banner and builds a dictionary);
# ``missing_packages`` names those absent, so a run says so before it loads a model, not at its first score.
METRIC_PACKAGES: dict[Callable[..., float], tuple[str, ...]] = {
    qa_f1_zh_score: ("jieba",), rouge_score: ("rouge",), rouge_zh_score: ("rouge", "jieba"),
    code_sim_score: ("fuzzywuzzy",),
}


def missing_packages(datasets: Iterable[str]) -> list[str]:
    """The packages the LongBench metrics of ``datasets`` need and this Python lacks."""
    from importlib.util import find_spec
    needed = {pkg for d in datasets for pkg in METRIC_PACKAGES.get(LONGBENCH_METRICS[d], ())}
    return sorted(pkg for pkg in needed if find_spec(pkg) is None)


# The datasets whose prediction is cut to its first line before scoring (official eval.py).
LONGBENCH_FIRST_LINE = ("trec", "triviaqa", "samsum", "lsht")


def first_line(prediction: str) -> str:
    return prediction.lstrip("\n").split("\n")[0]


def longbench_score(dataset: str, prediction: str, answers: Iterable[str],
                    all_classes: Iterable[str] | None = None) -> float:
    """One sample's LongBench score in 0-100: the dataset's metric, max over the references, times 100."""
    metric = LONGBENCH_METRICS[dataset]
    if dataset in LONGBENCH_FIRST_LINE:
        prediction = first_line(prediction)
    best = 0.0
    for ref in answers:
        best = max(best, metric(prediction, ref, all_classes=all_classes))
    return 100.0 * best
