"""SCBench (microsoft/SCBench, "SharedContextBench"): 12 tasks of several queries on one shared long context.

Each example is ``{"id", "context", "multi_turns": [{"input", "answer", ...}, ...]}`` (``options`` for
choice_eng; ``name``/``lang``/``repo`` for repoqa; ``task`` per turn for the two mixed tasks; the context of
``scbench_mf`` is a list of integers, rendered as Python renders a list, as the official code does).

Two modes, as in the official ``run_scbench.py``:

- ``mode="multi-turn"`` (the default): one conversation. The first turn's prompt is the official
  ``multiturn_templates`` entry: the context and the first question in one prompt, prefilled (and so
  compressed) together as the official ``GreedySearch.test`` does, so a query-aware compressor sees turn 1's
  question (``Sample.context_ids`` holds the whole first prompt). ``query_agnostic=True`` compresses the
  context alone and appends the first question afterwards (then the run's protocol decides, ``kvbench run
  --query-aware`` or not, as for single-query tasks). Every follow-up is a new user message after the previous turn's GOLDEN answer
  as the assistant message (``{pre_ans}`` in the official follow-up templates). Here each follow-up's
  ``question_ids`` begins with the previous golden answer and the chat template's end-of-turn text, so the
  engine must drop what it generated for a turn before feeding the next turn (``Turn.answer_ids`` stays None:
  the first turn's golden answer has no such slot in ``Sample``). With ``own_answers=True`` (the official
  ``--disable_golden_context``) the follow-ups carry no answer and the engine keeps its own generation
  (``task.own_answers``, which the harness reads): an answer that ended on EOS stays as generated (EOS not fed),
  an answer cut at its token limit is followed by EOS, in place of its last token, which the official loop never feeds.
- ``mode="multi-request"`` (official ``--same_context_different_query``): every query is answered on the
  (compressed) shared context alone, with the official SCDQ templates (the query continues the context's user
  message, joined without a separator as the official code does).

Metrics (official ``compute_scores.py``), each turn scored 0-100:
kv, prefix_suffix: the answer is a substring of the prediction; vt: RULER's string_match_all (rounded to
2 decimals as the official); repoqa: the predicted code (first fenced block) is BLEU-closest (nltk's
sentence BLEU, smoothing method 4, whitespace tokens) to the right function among the example's functions,
with similarity >= 0.8 (pass@1 at threshold 0.8), the candidates being every function asked about in the run for
the same repository (``meta["repo_needles"]``) (the official ``needle_by_repo``, over all examples and turns); qa_eng: the answer,
uppercased, is a substring of the uppercased prediction; many_shot: the same, over the official label; qa_chn:
character-level F1 after Chinese normalisation, max over the official label; choice_eng:
InfiniteBench's multiple-choice matcher on [option text, letter]; mf: the first number of the prediction
equals the answer; summary: ROUGE-Lsum F; summary_with_needles: summary turns ROUGE-Lsum, passkey turns first
integer match; repoqa_and_kv: repoqa turns as repoqa, kv turns as kv.

qa_chn and many_shot: the official code iterates over a plain-string answer character by character (the label
is not wrapped in a list as qa_eng's is): qa_chn's F1 is the best over single characters of the answer, and
many_shot passes when any one character of the answer is in the prediction. That official metric is the default
(``official_metric=True``: scores compare with published ones); ``official_metric=False`` takes the answer as
one reference. Both are recorded for every sample (``score_official``, ``score_whole_answer``).

Deliberate deviations, all documented: Tree-sitter function extraction in repoqa is not used (the first fenced
code block is taken, the official fallback). With own answers, a follow-up starts with the chat template's text
between an assistant message and the next user message, less its end-of-turn token (the official renders the
user message alone and strips an empty system message, which for templates with a default system prompt puts
that prompt in the middle of the conversation). In chat mode the official mf follow-ups all reuse the LAST turn's "What is ...?" prefix
(a leaked loop variable); here each turn uses its own.

Context length: the context is middle-truncated so that the whole conversation (context, every query, and in
multi-turn mode every golden answer) fits ``ctx.max_context_tokens``. ``max_turns`` defaults to 5, as the
official ``--max_turns``.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from kvbench.io import find_file, read_records
from kvbench.task import (MULTI_TURN, Sample, Task, TaskContext, TaskError, Turn, as_names, build_prompt,
                          hub_dataset, macro_units)

from .metrics import f1_score, normalize_zh_answer, rouge_lsum_f, string_match_all

HUB_REPO = "microsoft/SCBench"

SCBENCH_TASKS: tuple[str, ...] = (
    "scbench_kv", "scbench_prefix_suffix", "scbench_vt", "scbench_repoqa", "scbench_qa_eng", "scbench_qa_chn",
    "scbench_choice_eng", "scbench_many_shot", "scbench_summary", "scbench_mf", "scbench_summary_with_needles",
    "scbench_repoqa_and_kv",
)

MAX_NEW_TOKENS: dict[str, int | dict[str, int]] = {
    "scbench_choice_eng": 40,
    "scbench_qa_eng": 40,
    "scbench_qa_chn": 40,
    "scbench_kv": 150,
    "scbench_mf": 5,
    "scbench_prefix_suffix": 150,
    "scbench_repoqa": 1024,
    "scbench_summary": 200,
    "scbench_vt": 30,
    "scbench_many_shot": 10,
    "scbench_summary_with_needles": {"scbench_summary": 800, "scbench_passkey": 15},
    "scbench_repoqa_and_kv": {"scbench_repoqa": 1024, "scbench_kv": 80},
}

_CHOICE_Q = ("Question: {question}\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\n"
             "The the correct answer is")
_REPOQA_HEAD = ("Based on the function description and code context, please retrieve and repeat the exact described "
                "function from the code context in a code block wrapped by ```:\n\n")

# First turn of multi-turn mode (official ``multiturn_templates``).
FIRST_TURN: dict[str, str] = {
    "scbench_kv": "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n{input}",
    "scbench_choice_eng": "Read the book and answer the question.\n\n{context}\n\n" + _CHOICE_Q,
    "scbench_qa_eng": "Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\n"
                      "Question: {question}\nAnswer:",
    "scbench_qa_chn": "阅读以下书籍然后回答问题。\n\n{context}\n\n问题：{question}\n答案：",
    "scbench_mf": "{prefix}\n\n{context}\n\n{input}",
    "scbench_repoqa": _REPOQA_HEAD + "{context}\n\n{input}",
    "scbench_summary": "{context}\n\n{input}",
    "scbench_vt": "{context}\n\n{input}",
    "scbench_many_shot": "{context}\n\n{input}",
    "scbench_summary_with_needles": "{context}\n\n{input}",
    "scbench_repoqa_and_kv": "{context}\n\n{input}",
    "scbench_prefix_suffix": "{context}\n\n{input}",
}
# Follow-ups without a chat template (official ``multiturn_follow_up_templates``; ``{pre_ans}`` is the
# previous golden answer).
FOLLOW_UP: dict[str, str] = {
    "scbench_kv": "{pre_ans}\n\n{input}",
    "scbench_choice_eng": "{pre_ans}\n\nQuestion: {question}\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\n"
                          "D. {OPTION_D}\n\nThe letter of the correct answer is",
    "scbench_qa_eng": "{pre_ans}\n\nQuestion: {question}\nAnswer:",
    "scbench_qa_chn": "{pre_ans}\n\n问题：{question}\n答案：",
    "scbench_mf": "{pre_ans}\n\n{prefix}\n\n{input}",
    "scbench_repoqa": "{pre_ans}\n\n{input}",
    "scbench_summary": "{pre_ans}\n\n{input}",
    "scbench_vt": "{pre_ans}\n\n{input}",
    "scbench_many_shot": "{pre_ans}\n\n{input}",
    "scbench_summary_with_needles": "{pre_ans}\n\n{input}",
    "scbench_repoqa_and_kv": "{pre_ans}\n\n{input}",
    "scbench_prefix_suffix": "{pre_ans}\n\n{input}",
}
# Follow-up user messages in a chat template (official ``multiturn_follow_up_templates_in_chat_tempate``);
# also the SCDQ query of the tasks that have no dedicated one.
FOLLOW_UP_CHAT: dict[str, str] = {
    "scbench_kv": "{input}",
    "scbench_choice_eng": _CHOICE_Q,
    "scbench_qa_eng": "Question: {question}\nAnswer:",
    "scbench_qa_chn": "问题：{question}\n答案：",
    "scbench_mf": "{prefix}\n\n{input}",
    "scbench_repoqa": "{input}",
    "scbench_summary": "{input}",
    "scbench_vt": "{input}",
    "scbench_many_shot": "{input}",
    "scbench_summary_with_needles": "{input}",
    "scbench_repoqa_and_kv": "{input}",
    "scbench_prefix_suffix": "{input}",
}
# Multi-request (SCDQ) shared-context prompt (official ``multiturn_templates_scdq``). The query of choice_eng,
# qa_eng and qa_chn is FOLLOW_UP_CHAT's; of mf FOLLOW_UP_CHAT's too; of the others the raw input.
SCDQ_CONTEXT: dict[str, str] = {
    "scbench_kv": "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}",
    "scbench_choice_eng": "Read the book and answer the question.\n\n{context}",
    "scbench_qa_eng": "Read the book and answer the question. Be very concise in your answer.\n\n{context}",
    "scbench_qa_chn": "阅读以下书籍然后回答问题。\n\n{context}",
    "scbench_mf": "{prefix}\n\n{context}",
    "scbench_repoqa": _REPOQA_HEAD + "{context}",
    "scbench_summary": "{context}",
    "scbench_vt": "{context}",
    "scbench_many_shot": "{context}",
    "scbench_summary_with_needles": "{context}",
    "scbench_repoqa_and_kv": "{context}",
    "scbench_prefix_suffix": "{context}",
}
_SCDQ_TEMPLATED_QUERY = ("scbench_choice_eng", "scbench_qa_eng", "scbench_qa_chn", "scbench_mf")

MODES = ("multi-turn", "multi-request")
_MODE_ALIASES = {"multi-turn": "multi-turn", "multi_turn": "multi-turn", "multiturn": "multi-turn",
                 "multi-request": "multi-request", "multi_request": "multi-request", "scdq": "multi-request"}


# ---------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------

def first_int(prediction: str) -> str:
    """The first run of digits in the prediction ('' if none)."""
    for item in re.split("[^0-9]", prediction):
        if item:
            return item
    return ""


def choice_match(prediction: str, labels: list[str]) -> bool:
    """InfiniteBench's longbook_choice_eng matcher; ``labels`` = [option text, option letter]."""
    pred = prediction.strip()
    if pred == "":
        return False
    if pred[0] in "ABCD":
        return pred[0] in labels
    if pred in labels:
        return True
    for c in ["\n", '"', "'", ".", ",", "?", "!", "{", "}"]:
        pred = pred.replace(c, " ")
    while "  " in pred:
        pred = pred.replace("  ", " ")
    for prefix in ["answer is:", "answer:", "answer is", "option is"]:
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return False
        after = pred[idx + len(prefix) + 1:]
        return any(after.startswith(s) for s in labels)
    for word in pred.split():
        if word in "ABCD":
            return word in labels
    return False


def math_find_match(prediction: str, label: Any) -> bool:
    """The first number of the prediction (int or decimal) equals the integer/float label."""
    found = re.search(r"\d+\.\d+|\d+", prediction)
    if found is None:
        return False
    if isinstance(label, str):
        label = float(label) if "." in label else int(label)
    if isinstance(label, int):
        return int(float(found.group(0))) == label
    return float(found.group(0)) == float(label)


def qa_f1_zh_chars(prediction: str, ground_truth: str) -> float:
    """SCBench/InfiniteBench Chinese QA F1: one character one token, after ``normalize_zh_answer``."""
    return f1_score(list(normalize_zh_answer(prediction)), list(normalize_zh_answer(ground_truth)))


def _ngram_counts(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu4(reference: list[str], hypothesis: list[str], k: int = 5) -> float:
    """BLEU-4 of one hypothesis against one reference with Chen & Cherry's smoothing method 4, as
    ``nltk.translate.bleu_score.sentence_bleu(..., smoothing_function=SmoothingFunction().method4)``."""
    hyp_len, ref_len = len(hypothesis), len(reference)
    numerators, denominators = [], []
    for n in range(1, 5):
        hyp, ref = _ngram_counts(hypothesis, n), _ngram_counts(reference, n)
        numerators.append(sum(min(c, ref[g]) for g, c in hyp.items()))
        denominators.append(max(1, sum(hyp.values())))
    if numerators[0] == 0:
        return 0.0
    if hyp_len > ref_len:
        bp = 1.0
    elif hyp_len == 0:
        bp = 0.0
    else:
        bp = math.exp(1 - ref_len / hyp_len)
    precisions = []
    inc = 1
    for num, den in zip(numerators, denominators):
        if num == 0 and hyp_len > 1:
            precisions.append(1 / (2 ** inc * k / math.log(hyp_len)) / den)
            inc += 1
        else:
            precisions.append(num / den)
    # zero precisions (possible only for a one-token hypothesis) are left out of the sum, as nltk does
    return bp * math.exp(math.fsum(0.25 * math.log(p) for p in precisions if p > 0))


def code_similarity(candidate: str, reference: str) -> float:
    """RepoQA's function similarity: BLEU over whitespace-separated tokens."""
    return sentence_bleu4(re.split(r"\s+", reference.strip()), re.split(r"\s+", candidate.strip()))


def first_code_block(output: str) -> str:
    """The first fenced code block of a model output, or the whole (stripped) output when there is none."""
    output = output.strip()
    blocks = re.findall(r"^```(?:\w+)?\s*\n(.*?)(?=^```)```", output, re.DOTALL | re.MULTILINE)
    return blocks[0] if blocks else output


def repoqa_match(prediction: str, name: str, needles: list[tuple[str, str]], threshold: float = 0.8) -> bool:
    """Pass when the most similar needle (by BLEU) is the asked function and the similarity >= threshold."""
    code = first_code_block(prediction)
    best_name, best_sim = None, 0.0
    for needle_name, needle_code in needles:
        sim = code_similarity(code, needle_code)
        if sim > best_sim:
            best_name, best_sim = needle_name, sim
    return best_name == name and best_sim >= threshold


CHAR_LOOP_TASKS = ("scbench_qa_chn", "scbench_many_shot")


def official_labels(task: str, turn: dict) -> list[str]:
    """What the official scorer iterates over: a string answer of qa_chn or many_shot, character by character
    (``get_ground_truth`` leaves it unwrapped); otherwise the references as ``_refs`` gives them."""
    ans = turn.get("answer")
    if task in CHAR_LOOP_TASKS and isinstance(ans, str):
        return list(ans)
    return _refs(task, turn)


def turn_score(task: str, subtask: str, prediction: str, refs: list[str], name: str | None = None,
               needles: list[tuple[str, str]] | None = None) -> float:
    """One turn's score in 0-100. ``subtask`` is the turn's own task for the mixed tasks (else = task)."""
    kind = subtask if task in ("scbench_summary_with_needles", "scbench_repoqa_and_kv") else task
    if kind in ("scbench_kv", "scbench_prefix_suffix"):
        return 100.0 * (refs[0] in prediction)
    if kind == "scbench_vt":
        return 100.0 * round(string_match_all(prediction, refs), 2)
    if kind == "scbench_repoqa":
        return 100.0 * repoqa_match(prediction, name or "", needles or [])
    if kind in ("scbench_qa_eng", "scbench_many_shot"):
        pred = prediction.strip().upper()
        return 100.0 * any(r.upper() in pred for r in refs)
    if kind == "scbench_qa_chn":
        return 100.0 * max((qa_f1_zh_chars(prediction, r) for r in refs), default=0.0)
    if kind == "scbench_choice_eng":
        return 100.0 * choice_match(prediction, refs)
    if kind == "scbench_mf":
        return 100.0 * math_find_match(prediction, refs[0])
    if kind == "scbench_summary":
        return 100.0 * rouge_lsum_f(prediction, refs[0])
    if kind == "scbench_passkey":
        return 100.0 * (str(refs[0]) == first_int(prediction))
    raise ValueError(f"no SCBench metric for {kind}")


# ---------------------------------------------------------------------------------------------------------
# prompt pieces
# ---------------------------------------------------------------------------------------------------------

_U, _A, _Q = "\u2063KVB-U\u2063", "\u2063KVB-A\u2063", "\u2063KVB-Q\u2063"


@lru_cache(maxsize=16)
def _chat_turn_pieces(tokenizer) -> tuple[str, str, str] | None:
    """(before_answer, between, after) such that a conversation [user U, assistant A, user Q] + generation
    prompt renders as render([user U] + generation prompt) + before_answer + A + between + Q + after.
    None when the tokenizer has no chat template or it does not render that way."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    try:
        base = tokenizer.apply_chat_template([{"role": "user", "content": _U}], add_generation_prompt=True,
                                             tokenize=False)
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": _U}, {"role": "assistant", "content": _A},
             {"role": "user", "content": _Q}], add_generation_prompt=True, tokenize=False)
    except Exception:
        return None
    if not full.startswith(base) or _A not in full or _Q not in full:
        return None
    rest = full[len(base):]
    before, rest = rest.split(_A, 1)
    between, after = rest.split(_Q, 1)
    return before, between, after


def _fields(eg: dict, turn: dict) -> dict[str, Any]:
    """The values the templates format with, for one turn."""
    inp = str(turn.get("input", ""))
    out: dict[str, Any] = {"input": inp, "question": inp}
    options = turn.get("options")
    if options:
        for letter, opt in zip("ABCD", list(options) + [""] * 4):
            out[f"OPTION_{letter}"] = opt
    found = re.findall(r"The .+ is", inp)
    out["prefix"] = f"What is {found[0].lower()[:-3]}?" if found else inp
    return out


def _context_text(eg: dict) -> str:
    ctx = eg["context"] if "context" in eg else eg.get("input", "")
    return ctx if isinstance(ctx, str) else str(ctx)


def _refs(task: str, turn: dict) -> list[str]:
    ans = turn.get("answer")
    if task == "scbench_choice_eng":
        options = list(turn.get("options") or [])
        return [str(ans)] + (["ABCD"[options.index(ans)]] if ans in options[:4] else [])
    if isinstance(ans, (list, tuple)):
        return [str(a) for a in ans]
    return [str(ans)]


def _max_new(task: str, subtask: str) -> int:
    m = MAX_NEW_TOKENS[task]
    return m[subtask] if isinstance(m, dict) else m


# ---------------------------------------------------------------------------------------------------------
# the task
# ---------------------------------------------------------------------------------------------------------

@dataclass
class SCBench(Task):
    """SCBench tasks in multi-turn (golden answers between turns) or multi-request mode."""

    name: ClassVar[str] = "scbench"
    kind: ClassVar[str] = MULTI_TURN

    tasks: tuple[str, ...] = SCBENCH_TASKS  # which of the 12 tasks
    mode: str = "multi-turn"  # or "multi-request" (official --same_context_different_query)
    own_answers: bool = False  # multi-turn: the model's own answers stay in context instead of the golden ones
    max_turns: int | None = 5  # keep the first N turns of each example (official --max_turns, default 5); None: all
    # multi-turn: compress the context alone, before turn 1's question (the official prefills them together)
    query_agnostic: bool = False
    # qa_chn and many_shot: the official character-loop metric as the headline score (False: whole answer)
    official_metric: bool = True

    def __post_init__(self):
        self.tasks = as_names(self.tasks)
        unknown = [t for t in self.tasks if t not in SCBENCH_TASKS]
        if unknown:
            raise TaskError(f"unknown SCBench task(s) {', '.join(unknown)}; known: {', '.join(SCBENCH_TASKS)}")
        mode = _MODE_ALIASES.get(str(self.mode).strip().lower())
        if mode is None:
            raise TaskError(f"SCBench mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        self.mode = mode
        if isinstance(self.own_answers, str):
            self.own_answers = self.own_answers.strip().lower() in ("1", "true", "yes", "on")
        for flag in ("query_agnostic", "official_metric"):
            if isinstance(getattr(self, flag), str):
                setattr(self, flag, getattr(self, flag).strip().lower() in ("1", "true", "yes", "on"))
        if self.own_answers and self.mode == "multi-request":
            raise TaskError("own_answers applies to multi-turn mode only")
        if self.max_turns is not None:
            self.max_turns = int(self.max_turns)
            if self.max_turns < 1:
                raise TaskError(f"SCBench max_turns must be at least 1 (got {self.max_turns}); omit it for all turns")

    # -- data ---------------------------------------------------------------------------------------------
    def load(self, data: str | None) -> dict[str, list[dict]]:
        found: dict[str, list[dict]] = {}
        if data:
            root = Path(data)
            for task in self.tasks:
                path = None
                if root.is_file():
                    path = root if root.name.split(".")[0] == task else None
                elif root.is_dir():
                    path = find_file(root, task)
                    if path is None and (root / task).is_dir():  # the hub layout: <task>/test-*.parquet
                        parts = sorted((root / task).glob("*.parquet")) + sorted((root / task).glob("*.jsonl"))
                        path = parts[0] if parts else None
                if path is not None:
                    found[task] = read_records(path)
            if not found:
                raise TaskError(f"SCBench data not found in {data}: pass --data DIR with <task>.jsonl files "
                                f"(e.g. scbench_kv.jsonl), or make the Hugging Face hub reachable for {HUB_REPO}")
            return self._whole(found, data)
        for task in self.tasks:
            try:
                found[task] = hub_dataset(HUB_REPO, task, "test")
            except Exception:
                if not found:  # the first one failed: the hub is out of reach, do not try the others
                    break
        if not found:
            raise TaskError(f"SCBench data not found: pass --data DIR with <task>.jsonl files, or make the Hugging "
                            f"Face hub reachable for {HUB_REPO}")
        return self._whole(found, HUB_REPO)

    def _whole(self, found: dict[str, list[dict]], where: str) -> dict[str, list[dict]]:
        """All the tasks asked for, or a refusal: an average over some of them is not that average."""
        missing = [t for t in self.tasks if not found.get(t)]
        if missing:
            raise TaskError(f"SCBench data for {len(missing)} of the {len(self.tasks)} tasks asked for is missing or "
                            f"empty in {where} ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); "
                            f"add it, or run only what is there: -t tasks={','.join(t for t in self.tasks if found.get(t))}")
        return found

    # -- prompts ------------------------------------------------------------------------------------------
    def _queries(self, task: str, eg: dict, turns: list[dict], tokenizer, chat: bool) -> tuple[str, str, list[dict]]:
        """(context prefix text, first query text, follow-up pieces [{q, answer_text}]) as strings."""
        f0 = _fields(eg, turns[0])
        context = _context_text(eg)
        follow: list[dict] = []
        if self.mode == "multi-request":
            prefix = SCDQ_CONTEXT[task].format(context=context, prefix=turns[0].get("input", ""))
            queries = []
            for t in turns:
                f = _fields(eg, t)
                queries.append(FOLLOW_UP_CHAT[task].format(**f) if task in _SCDQ_TEMPLATED_QUERY else f["input"])
            return prefix, queries[0], [{"q": q} for q in queries[1:]]
        template = FIRST_TURN[task]
        cut = template.index("{context}") + len("{context}")
        prefix = template[:cut].format(context=context, **f0)
        first = template[cut:].format(**f0)
        for i in range(1, len(turns)):
            f = _fields(eg, turns[i])
            pre_ans = str(turns[i - 1].get("answer"))
            if chat:
                q = FOLLOW_UP_CHAT[task].format(**f)
            elif self.own_answers:
                q = FOLLOW_UP_CHAT[task].format(**f)  # the official disable_golden_context follow-up
            else:
                q = FOLLOW_UP[task][len("{pre_ans}"):].format(**f)
            follow.append({"q": q, "answer_text": None if self.own_answers else pre_ans})
        return prefix, first, follow

    def _encode_follow_up(self, tokenizer, task: str, q: str, answer_text: str | None,
                          pieces: tuple[str, str, str] | None) -> tuple[list[int], int]:
        """Token ids of one follow-up (golden answer first, when given) and how many of them are the answer."""
        enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        if pieces is None:  # no chat template: plain text, as the official non-chat templates
            ans_ids = enc(answer_text) if answer_text is not None else []
            return ans_ids + enc(q), len(ans_ids)
        before, between, after = pieces
        if answer_text is None:  # own answers: the engine keeps the model's answer (ending in EOS)
            eos = getattr(tokenizer, "eos_token", None)
            if eos and between.startswith(eos):
                between = between[len(eos):]
            return enc(between + q + after + ("This paper" if task == "scbench_summary" else "")), 0
        ans_ids = enc(before + answer_text)
        tail = between + q + after + ("This paper" if task == "scbench_summary" else "")
        return ans_ids + enc(tail), len(ans_ids)

    def _sample(self, task: str, index: int, eg: dict, tokenizer, ctx: TaskContext) -> Sample:
        turns = list(eg.get("multi_turns") or [])
        if not turns:
            raise TaskError(f"{task} example {index} has no multi_turns")
        if self.max_turns is not None:
            turns = turns[: self.max_turns]
        chat = getattr(tokenizer, "chat_template", None) is not None
        pieces = _chat_turn_pieces(tokenizer) if chat and self.mode == "multi-turn" else None
        if chat and self.mode == "multi-turn" and pieces is None:
            raise TaskError("this tokenizer's chat template does not render a user/assistant/user conversation "
                            "as one prefix plus a continuation; SCBench multi-turn mode needs that")
        prefix, first, follow = self._queries(task, eg, turns, tokenizer, chat)
        subtasks = [str(t.get("task", task)) for t in turns]

        follow_ids: list[tuple[list[int], int]] = []
        for piece in follow:
            if self.mode == "multi-request":
                follow_ids.append((build_prompt(tokenizer, "", piece["q"], chat=chat)[1], 0))
            else:
                follow_ids.append(self._encode_follow_up(tokenizer, task, piece["q"], piece["answer_text"], pieces))
        first_raw = tokenizer.encode(first, add_special_tokens=False)
        if self.mode == "multi-request":
            follow_len = max((len(ids) for ids, _ in follow_ids), default=0)
            extra = max(0, follow_len - len(first_raw))
        else:
            extra = sum(len(ids) for ids, _ in follow_ids)
        budget = ctx.max_context_tokens - extra
        if budget < len(first_raw) + 16:
            raise TaskError(f"{task}: the window ({ctx.max_context_tokens} tokens) cannot hold the queries "
                            f"and answers of one example ({extra + len(first_raw)} tokens)")
        context_ids, question_ids = build_prompt(tokenizer, prefix, first, chat=chat, max_len=budget)
        with_context = self.mode == "multi-turn" and not self.query_agnostic
        if with_context:  # the official first turn: context and question prefilled (compressed) as one prompt
            context_ids, question_ids = context_ids + question_ids, []

        sample_turns = []
        for k, (ids, n_answer) in enumerate(follow_ids, start=1):
            sub = subtasks[k]
            sample_turns.append(Turn(
                question_ids=ids, answers=_refs(task, turns[k]), max_new_tokens=_max_new(task, sub),
                answer_ids=None, meta={"turn": k, "task": sub, "golden_answer_tokens": n_answer}))
        names = [t.get("name") for t in turns]
        labels = [official_labels(task, t) for t in turns] if task in CHAR_LOOP_TASKS else None
        return Sample(
            id=f"{task}/{eg.get('id', index)}",
            context_ids=context_ids,
            question_ids=question_ids,
            answers=_refs(task, turns[0]),
            max_new_tokens=_max_new(task, subtasks[0]),
            meta={"task": task, "turn_tasks": subtasks, "turn_names": names, "n_turns": len(turns),
                  "mode": self.mode, "own_answers": self.own_answers, "golden_context": not self.own_answers
                  and self.mode == "multi-turn", "repo": eg.get("repo"), "lang": eg.get("lang"),
                  "first_question_with_context": with_context, "official_labels": labels},
            turns=sample_turns,
            turn_mode=self.mode,
        )

    # -- the Task protocol ----------------------------------------------------------------------------------
    def samples(self, tokenizer, ctx: TaskContext) -> list[Sample]:
        found = self.load(ctx.data)
        out = []
        for task in self.tasks:
            rows = found.get(task)
            if rows is None:
                continue
            if ctx.limit is not None:
                rows = rows[: ctx.limit]
            samples = [self._sample(task, i, eg, tokenizer, ctx) for i, eg in enumerate(rows)]
            if task in ("scbench_repoqa", "scbench_repoqa_and_kv"):
                _attach_repo_needles(samples)
            out.extend(samples)
        return out

    def score(self, sample: Sample, prediction: str | list[str]) -> dict[str, float]:
        """Scores of the turns answered so far: ``prediction`` is the list of per-turn predictions (first turn
        first), or one string for the first turn only. Keys: score (mean over the scored turns), turn_<k>,
        and for the mixed tasks the mean of each sub-task."""
        preds = [prediction] if isinstance(prediction, str) else list(prediction)
        task = sample.meta["task"]
        refs = [sample.answers] + [t.answers for t in sample.turns]
        subtasks = sample.meta.get("turn_tasks") or [task] * len(refs)
        names = sample.meta.get("turn_names") or [None] * len(refs)
        needles = [tuple(n) for n in sample.meta.get("repo_needles") or []] or _needles(sample)
        labels = sample.meta.get("official_labels")
        out: dict[str, float] = {}
        by_sub: dict[str, list[float]] = {}
        official, whole = [], []
        for k, pred in enumerate(preds[: len(refs)]):
            s = turn_score(task, subtasks[k], pred or "", refs[k], name=names[k], needles=needles)
            if labels is not None:
                whole.append(s)
                official.append(turn_score(task, subtasks[k], pred or "", labels[k]))
                s = official[-1] if self.official_metric else s
            out[f"turn_{k}"] = s
            by_sub.setdefault(subtasks[k], []).append(s)
        vals = [out[f"turn_{k}"] for k in range(min(len(preds), len(refs)))]
        out["score"] = sum(vals) / len(vals) if vals else 0.0
        if labels is not None and official:
            out["score_official"] = sum(official) / len(official)
            out["score_whole_answer"] = sum(whole) / len(whole)
        if task in ("scbench_summary_with_needles", "scbench_repoqa_and_kv"):
            for sub, v in by_sub.items():
                out[sub.replace("scbench_", "")] = sum(v) / len(v)
        return out

    def summarize(self, records: list[dict]) -> dict:
        from kvbench.task import summarize_mean

        by_task: dict[str, list[dict]] = {}
        for r in records:
            by_task.setdefault(r.get("meta", {}).get("task"), []).append(r)
        per_task = {t: summarize_mean(by_task[t]) for t in SCBENCH_TASKS if t in by_task}
        heads = [v["score"] for v in per_task.values() if "score" in v]
        return {"n": len(records), "mode": self.mode, "own_answers": self.own_answers,
                "score": sum(heads) / len(heads) if heads else float("nan"), "per_task": per_task}

    def score_units(self, records: list[dict]) -> list[tuple[float, dict[str, float]]]:
        return macro_units(records, "task", SCBENCH_TASKS)


def _needles(sample: Sample) -> list[tuple[str, str]]:
    """(function name, code) of every repoqa turn of one sample."""
    refs = [sample.answers] + [t.answers for t in sample.turns]
    subtasks = sample.meta.get("turn_tasks") or [sample.meta["task"]] * len(refs)
    names = sample.meta.get("turn_names") or [None] * len(refs)
    return [(names[k], refs[k][0]) for k in range(len(refs)) if subtasks[k] == "scbench_repoqa" and names[k]]


def _attach_repo_needles(samples: list[Sample]) -> None:
    """The official repoqa candidates: every function asked about in the run for the sample's repository."""
    by_repo: dict[Any, list[tuple[str, str]]] = {}
    for s in samples:
        by_repo.setdefault(s.meta.get("repo"), []).extend(_needles(s))
    for s in samples:
        repo = s.meta.get("repo")
        needles = by_repo[repo] if repo is not None else _needles(s)  # no repository named: its own turns
        s.meta["repo_needles"] = [list(n) for n in dict.fromkeys(needles)]


def _single(task: str) -> type:
    """A class running one SCBench task, registered under the task's own name."""
    cls = type(task.title().replace("_", ""), (SCBench,), {
        "name": task, "__annotations__": {"tasks": "tuple[str, ...]"}, "tasks": (task,),
        "__doc__": f"SCBench task {task} alone (parameters as SCBench)."})
    cls.__module__ = __name__
    return dataclass(cls)


ScbenchKv = _single("scbench_kv")
ScbenchPrefixSuffix = _single("scbench_prefix_suffix")
ScbenchVt = _single("scbench_vt")
ScbenchRepoqa = _single("scbench_repoqa")
ScbenchQaEng = _single("scbench_qa_eng")
ScbenchQaChn = _single("scbench_qa_chn")
ScbenchChoiceEng = _single("scbench_choice_eng")
ScbenchManyShot = _single("scbench_many_shot")
ScbenchSummary = _single("scbench_summary")
ScbenchMf = _single("scbench_mf")
ScbenchSummaryWithNeedles = _single("scbench_summary_with_needles")
ScbenchRepoqaAndKv = _single("scbench_repoqa_and_kv")
