"""What a benchmark hands the harness, and the prompt building every task shares.

A task (one file in ``tasks/``) is a dataclass subclassing ``Task`` whose fields are its parameters. It
declares its ``kind``, which tells the harness how to run its samples:

- ``"generation"`` (the default): the samples are prefilled, decoded together in batches, and each
  prediction is scored by ``score(sample, prediction)``;
- ``"multi-turn"``: each sample is one compressed context with follow-up turns (``Sample.turns``), run one at
  a time through ``Engine.multi_turn``; ``score(sample, predictions)`` gets the list of per-turn predictions;
  ``own_answers`` says whether the model's own answers stay in the cache between turns;
- ``"logprobs"``: nothing is generated; ``score_logprobs(engine, sample)`` runs the engine on the sample
  (teacher-forced ``continuation_ids``) and returns the record with its scores.

Every task has ``samples(tokenizer, ctx) -> list[Sample]`` (a stable order, stable ids), ``score`` (the
per-sample metrics; the key ``"score"`` is the headline number, 0-100 for accuracy-like metrics) and
``summarize(records) -> dict`` (the aggregate over the finished records, each a JSON line of
``samples.jsonl``: ``id``, ``prediction``, ``scores``, ``meta``, ...; ``summarize_mean`` by default).
``temperature`` > 0 asks for sampling (AIME's pass@1 over n samples) unless the command line sets one.

A ``Sample`` splits its prompt in two token lists: ``context_ids`` (what is compressed in the
query-agnostic protocol, before the question is seen) and ``question_ids`` (appended after compression).
``build_prompt`` makes that split from a prefix/suffix pair of strings, with middle truncation and the
model's chat template.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

# A marker that never occurs in real text: the chat template is rendered once around it, then split.
_SPLIT = "\u2063\u2063KVBENCH-SPLIT\u2063\u2063"


# Field metadata for a task parameter added after runs were recorded, whose default is what those runs did:
# ``stepwise: bool = field(default=False, metadata=ADDED_LATER)``. At its default it is left out of the
# leaderboard's comparability key (``leaderboard.setting_of``), so a new run at the default ranks beside
# the runs made before the parameter existed, and one that sets it apart.
ADDED_LATER = {"added_later": True}


class TaskError(Exception):
    """A problem with a task's input that the user can fix; the CLI prints it as one line."""


@dataclass
class Turn:
    """One follow-up query on a shared compressed context (SCBench multi-turn / multi-request)."""

    question_ids: list[int]
    answers: list[str]
    max_new_tokens: int
    answer_ids: list[int] | None = None  # golden answer tokens, appended after the turn in multi-turn mode
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    id: str
    context_ids: list[int]
    question_ids: list[int]
    answers: list[str]
    max_new_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)
    # Follow-up turns after the first question (empty for single-query tasks).
    turns: list[Turn] = field(default_factory=list)
    # "multi-turn": each turn sees the earlier turns (and their answers) in the cache;
    # "multi-request": each turn is answered independently on the compressed context alone.
    turn_mode: str = "multi-turn"
    # Teacher-forced continuation for the fidelity task (scored on logits, no decoding).
    continuation_ids: list[int] | None = None
    stop_at_newline: bool = False  # keep only the first line of the answer (LongBench trec/triviaqa/...)
    # Token ids that end the answer like EOS (not kept), e.g. LongBench samsum's newline token.
    stop_token_ids: list[int] = field(default_factory=list)
    # New tokens generated before EOS or a stop token may end the answer (generate()'s min_length - prompt).
    min_new_tokens: int = 0


@dataclass
class TaskContext:
    """What the harness tells a task when asking for samples."""

    max_context_tokens: int  # the model window minus room for generation
    data: str | None = None  # --data PATH, if the user gave one
    limit: int | None = None  # first N samples only
    seed: int = 0
    window: int | None = None  # the model's context window, for tasks with their own default length rule
    max_context_set: bool = False  # max_context_tokens came from the user (--max-context), not the default


GENERATION, MULTI_TURN, LOGPROBS = "generation", "multi-turn", "logprobs"
TASK_KINDS = (GENERATION, MULTI_TURN, LOGPROBS)


class Task(ABC):
    """The base of every task: what the harness calls, with the defaults a task overrides by declaring them.
    ``samples`` and ``score`` are required (a task without them cannot be built)."""

    name: str
    kind: ClassVar[str] = GENERATION
    temperature: float = 0.0  # > 0: the task asks for sampling (a dataclass field where it is a parameter)
    own_answers: bool = False  # multi-turn: the model's answers, not golden ones, stay in the cache

    @abstractmethod
    def samples(self, tokenizer, ctx: TaskContext) -> list[Sample]:
        """The task's samples, in a stable order, with distinct ids."""

    @abstractmethod
    def score(self, sample: Sample, prediction: str | list[str]) -> dict[str, float]:
        """Scores of one prediction (``score`` is the headline), as the official metric computes them."""

    def score_logprobs(self, engine, sample: Sample) -> dict:
        """The record of one sample of a ``"logprobs"`` task (with its ``scores``), run on ``engine``."""
        raise NotImplementedError(f"{type(self).__name__} is a {self.kind} task: it has no log-probability score")

    def summarize(self, records: list[dict]) -> dict:
        return summarize_mean(records)

    def score_units(self, records: list[dict]) -> list[tuple[float, dict[str, float]]]:
        """``summarize``'s ``score`` as ``[(weight, {unit: value})]``: the sum over parts of weight x the mean of the
        part's values. The leaderboard's bootstrap resamples the units, each part within itself; a paired comparison
        pairs them by unit. A task whose score is not the plain mean of the samples' ``score`` (a macro average over
        subsets, a mean over problems) overrides both."""
        return mean_units(records)


def mean_units(records: list[dict]) -> list[tuple[float, dict[str, float]]]:
    """The plain mean of the samples' ``score`` (``summarize_mean``) as one part, the samples its units."""
    return [(1.0, {r["id"]: r["scores"]["score"] for r in records if _scored(r)})]


def macro_units(records: list[dict], key: str, order) -> list[tuple[float, dict[str, float]]]:
    """A macro average (LongBench's, SCBench's): the mean over the groups ``meta[key]`` named in ``order`` of their
    samples' mean ``score``; each group an equal part, its samples the units."""
    groups: dict[str, dict[str, float]] = {}
    for r in records:
        if _scored(r):
            groups.setdefault(r.get("meta", {}).get(key), {})[r["id"]] = r["scores"]["score"]
    parts = [groups[g] for g in order if g in groups]
    return [(1.0 / len(parts), p) for p in parts]


def _scored(record: dict) -> bool:
    return isinstance(record.get("scores", {}).get("score"), (int, float))


def summarize_mean(records: list[dict], group_by: str | None = None) -> dict:
    """Mean of every score key over the records, optionally also per value of ``meta[group_by]``."""
    out: dict[str, Any] = {"n": len(records)}
    keys = sorted({k for r in records for k in r.get("scores", {})})
    for k in keys:
        vals = [r["scores"][k] for r in records if k in r.get("scores", {})]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    if group_by:
        groups: dict[str, list[dict]] = {}
        for r in records:
            groups.setdefault(str(r.get("meta", {}).get(group_by)), []).append(r)
        out["by_" + group_by] = {g: summarize_mean(rs) for g, rs in sorted(groups.items())}
    return out


def as_names(value: Any) -> tuple[str, ...]:
    """A task parameter given as a tuple, a list or a comma-separated string, as a tuple of names."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value)


def hub_dataset(repo: str, config: str | None = None, split: str = "test") -> list[dict]:
    """Rows of a Hugging Face dataset; fails at once (ConnectionError) when the hub is out of reach,
    instead of waiting out the client's retries."""
    from kvbench.models import hub_reachable
    if not hub_reachable():
        raise ConnectionError("the Hugging Face hub is not reachable")
    import datasets
    return [dict(r) for r in datasets.load_dataset(repo, config, split=split)]


def middle_truncate(ids: list[int], max_len: int) -> list[int]:
    """LongBench's truncation: keep the first and the last halves when a prompt is too long."""
    if len(ids) <= max_len:
        return ids
    half = max_len // 2
    return ids[:half] + ids[len(ids) - (max_len - half):]


def leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer itself puts before a text (its BOS, if it adds one), as ``tokenizer(text)`` gives them.
    Asked of the tokenizer, not of ``add_bos_token``: a Llama-3 tokenizer adds its BOS in the post-processor and
    says add_bos_token=False."""
    bare = tokenizer.encode("x", add_special_tokens=False)
    full = tokenizer.encode("x")
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return full[:k]
    return []


def build_prompt(tokenizer, prefix: str, suffix: str, chat: bool, max_len: int | None = None,
                 system: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of ``prefix`` (the context part) and ``suffix`` (the question part) of one prompt.

    The raw prompt ``prefix + suffix`` is middle-truncated to ``max_len`` tokens first (as LongBench does,
    before any template), then wrapped in the chat template when ``chat`` is set. The split between the two
    returned lists is where ``prefix`` ended; if truncation cut into the suffix, the split moves with it.
    """
    p_ids = tokenizer.encode(prefix, add_special_tokens=False)
    s_ids = tokenizer.encode(suffix, add_special_tokens=False)
    if max_len is not None and len(p_ids) + len(s_ids) > max_len:
        ids = middle_truncate(p_ids + s_ids, max_len)
        # The suffix survives whole as long as it fits inside the kept tail.
        n_suffix = min(len(s_ids), max_len - max_len // 2)
        p_ids, s_ids = ids[: len(ids) - n_suffix], ids[len(ids) - n_suffix:]
    if not chat or getattr(tokenizer, "chat_template", None) is None:
        return leading_special_ids(tokenizer) + p_ids, s_ids
    # The template is rendered around a marker and tokenized apart from the prompt, so truncation stays
    # exact in tokens (no decode/re-encode round trip).
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": _SPLIT}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    head, tail = rendered.split(_SPLIT, 1)
    return (tokenizer.encode(head, add_special_tokens=False) + p_ids,
            s_ids + tokenizer.encode(tail, add_special_tokens=False))
