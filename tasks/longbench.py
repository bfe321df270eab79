"""LongBench v1 (THUDM/LongBench): the 21 tasks, and LongBench-E (the length-balanced 13).

Official facts kept: the per-task prompt templates and max new tokens (embedded from the official config files
in ``longbench_config.json``, the current prompt file with its "asconcisely" typo), the prompt built as the
official ``pred.py`` builds it (``official_prompt``: the whole raw prompt tokenized at once; when longer than
``max_length`` the first and last ``int(max_length/2)`` tokens are decoded and their texts joined, so an odd
``max_length`` keeps ``max_length - 1`` tokens; the chat template then wrapped around that text and the result
tokenized again), no chat template for trec, triviaqa, samsum, lsht, lcc and repobench-p, samsum's generation
(at least one new token, stop on the newline token), first-line cutting of the prediction for trec, triviaqa,
samsum and lsht, the per-task metrics (``metrics.LONGBENCH_METRICS``, max over the references, x100),
LongBench-E's 0-4k / 4-8k / 8k+ buckets on the sample's ``length`` field.

``max_length`` defaults to the official per-model table (``config/model2maxlen.json``: 3500 for the 4k model,
7500 for the 8k ones, 15500 for 16k, 31500 for 32k). Its rule, applied to every model: the window rounded down
to thousands, minus 500 (``official_max_length``). ``--max-context`` or the task parameter ``max_length`` wins.
Where pred.py leaves the tokenizer call to a model-specific ``build_chat``, kvbench uses the model's chat template
and tokenizes the rendered text without adding a second BOS when the template already wrote one.

The token ids are exactly the official ones; the query-agnostic protocol splits them (never re-tokenizes) at the
token where the context ended in the final text: what comes before is compressed, the rest (the question and
the template's tail) is appended afterwards.

Data: ``--data DIR`` with ``<task>.jsonl`` files (``<task>_e.jsonl`` for LongBench-E; a ``data/`` folder
inside DIR is also looked at) in the official schema (input, context, answers, length, dataset, language,
all_classes, _id); only the tasks whose file is there are run, the rest are recorded as missing. Without
``--data`` the hub copy ``THUDM/LongBench`` is used.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from kvbench.io import find_file, read_records
from kvbench.task import Sample, Task, TaskContext, TaskError, as_names, hub_dataset, macro_units

from .metrics import LONGBENCH_FIRST_LINE, longbench_score, missing_packages

HUB_REPO = "THUDM/LongBench"

LONGBENCH_TASKS: tuple[str, ...] = (
    "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique",
    "dureader", "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa", "samsum", "lsht",
    "passage_count", "passage_retrieval_en", "passage_retrieval_zh", "lcc", "repobench-p",
)
# The length-balanced LongBench-E subsets (official pred.py, --e).
LONGBENCH_E_TASKS: tuple[str, ...] = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
    "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)
# The 16 English and code tasks whose average KV-cache compression papers report (SnapKV, PyramidKV, ...).
ENGLISH_16: tuple[str, ...] = (
    "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "qmsum",
    "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)
# "chat models are better off without build prompts on these tasks" (official pred.py).
NO_CHAT_TEMPLATE: tuple[str, ...] = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")
BUCKETS: tuple[str, ...] = ("0-4k", "4-8k", "8k+")
# The official config/model2maxlen.json (prompt tokens kept before generation). ``official_max_length`` states
# its rule, which every row follows (chatglm2-6b has a 32k window).
MODEL2MAXLEN: dict[str, int] = {
    "llama2-7b-chat-4k": 3500, "longchat-v1.5-7b-32k": 31500, "xgen-7b-8k": 7500, "internlm-7b-8k": 7500,
    "chatglm2-6b": 31500, "chatglm2-6b-32k": 31500, "chatglm3-6b-32k": 31500, "vicuna-v1.5-7b-16k": 15500,
}
# Marks the end of the context inside the rendered chat template (never in real text).
_MARK = "\u2063\u2063KVBENCH-CONTEXT-END\u2063\u2063"


@lru_cache(maxsize=1)
def _config() -> dict:
    with open(Path(__file__).with_name("longbench_config.json"), encoding="utf-8") as f:
        return json.load(f)


def prompts() -> dict[str, str]:
    """The official prompt template of each of the 21 tasks."""
    return dict(_config()["dataset2prompt"])


def max_new_tokens() -> dict[str, int]:
    """The official max new tokens of each of the 21 tasks."""
    return dict(_config()["dataset2maxlen"])


def bucket(length: int | float | None) -> str | None:
    """LongBench-E's length bucket of a sample's ``length`` field (words, or characters for Chinese)."""
    if length is None:
        return None
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


def split_template(template: str) -> tuple[str, str]:
    """(prefix, suffix) of a template, cut right after ``{context}``."""
    cut = template.index("{context}") + len("{context}")
    return template[:cut], template[cut:]


def official_max_length(window: int) -> int:
    """The official table's rule: a model with a ``window``-token context keeps ``1000 * (window // 1000) - 500``
    prompt tokens (4096 -> 3500, 8192 -> 7500, 16384 -> 15500, 32768 -> 31500, as ``MODEL2MAXLEN``); a window
    under 2000 tokens (no such model in the table) keeps half of it."""
    return 1000 * (window // 1000) - 500 if window >= 2000 else window // 2


def _surviving_tail(text: str, suffix: str) -> int:
    """How many trailing characters of ``suffix`` end ``text`` (all of it unless truncation cut into it)."""
    for k in range(len(suffix), 0, -1):
        if text.endswith(suffix[-k:]):
            return k
    return 0


def official_prompt(tokenizer, template: str, fields: dict, max_length: int | None,
                    chat: bool) -> tuple[list[int], int, str]:
    """(token ids, number of context tokens, final text) of one prompt, built as the official pred.py does.

    The ids are what pred.py feeds the model; the first ``n`` of them end where the context ended (the token
    that straddles that point, if any, counts as context).
    """
    prompt = template.format(**fields)
    question = prompt[len(split_template(template)[0].format(**fields)):]
    ids = tokenizer(prompt, truncation=False).input_ids
    if max_length is not None and len(ids) > max_length:
        half = int(max_length / 2)
        prompt = (tokenizer.decode(ids[:half], skip_special_tokens=True)
                  + tokenizer.decode(ids[len(ids) - half:], skip_special_tokens=True))
    cut = len(prompt) - _surviving_tail(prompt, question)
    add_special = True
    if chat and getattr(tokenizer, "chat_template", None) is not None:
        def render(content: str) -> str:
            return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True)
        rendered = render(prompt)
        marked = render(prompt[:cut] + _MARK + prompt[cut:])
        at = marked.find(_MARK)
        if at >= 0 and marked.replace(_MARK, "", 1) == rendered:
            cut = at
        else:  # a template that rewrites its content (trims it, say): find the question part in the output
            tail = prompt[cut:]
            at = rendered.rfind(tail) if tail else -1
            cut = at if at >= 0 else len(rendered)
        prompt = rendered
        bos = getattr(tokenizer, "bos_token", None)
        add_special = not (bos and prompt.startswith(bos))  # the template wrote the BOS already
    enc = tokenizer(prompt, truncation=False, add_special_tokens=add_special,
                    return_offsets_mapping=bool(getattr(tokenizer, "is_fast", False)))
    ids = list(enc.input_ids)
    if "offset_mapping" in enc:  # the first token that starts at or after the cut (added specials have (0, 0))
        n = next((i for i, (start, end) in enumerate(enc["offset_mapping"]) if start >= cut and end > start),
                 len(ids))
    else:
        n = min(len(tokenizer(prompt[:cut], add_special_tokens=add_special).input_ids), len(ids))
    return ids, n, prompt


# ---------------------------------------------------------------------------------------------------------
# LongBench's data files (the readers: kvbench.io)
# ---------------------------------------------------------------------------------------------------------

SCHEMA = {"context": str, "input": str, "answers": list}  # the fields a prompt and its score are made of


def check_schema(path: Path, rows: list[dict], required: dict[str, type]) -> list[dict]:
    """The rows of a data file, refused with the file and record number when one lacks a field of the
    official schema (a wrong-schema row would become an empty prompt scored 0) or the file has none."""
    if not rows:
        raise TaskError(f"{path} has no records")
    for i, row in enumerate(rows, 1):
        for key, kind in required.items():
            if not isinstance(row.get(key), kind):
                raise TaskError(f"{path} record {i} has no '{key}' of type {kind.__name__} (LongBench's schema: "
                                f"{', '.join(required)}); is this LongBench data?")
    return rows


def _from_hub(config: str) -> list[dict]:
    """One LongBench config from the hub: the datasets loader, else the repository's data.zip."""
    errors = []
    try:
        return hub_dataset(HUB_REPO, config, "test")
    except ConnectionError as e:  # the hub is out of reach: the zip would not come either
        raise LookupError(f"{config}: {e}") from e
    except Exception as e:  # scripts are not supported by recent `datasets`
        errors.append(e)
    try:
        import zipfile

        from huggingface_hub import hf_hub_download

        archive = hf_hub_download(HUB_REPO, "data.zip", repo_type="dataset")
        with zipfile.ZipFile(archive) as z:
            member = next(n for n in z.namelist() if n.rsplit("/", 1)[-1] == f"{config}.jsonl")
            return [json.loads(line) for line in z.read(member).decode("utf-8").splitlines() if line.strip()]
    except Exception as e:
        errors.append(e)
    raise LookupError(f"{config}: {errors[-1]}")


# ---------------------------------------------------------------------------------------------------------
# the task
# ---------------------------------------------------------------------------------------------------------

@dataclass
class LongBench(Task):
    """LongBench v1 (``e=False``, 21 tasks) or LongBench-E (``e=True``, the 13 ``_e`` subsets)."""

    name: ClassVar[str] = "longbench"

    subsets: tuple[str, ...] = LONGBENCH_TASKS  # which tasks; with e=True the default means the 13 E tasks
    e: bool = False  # LongBench-E: the <task>_e data, scored per length bucket too
    # prompt tokens kept (pred.py's max_length); None: --max-context if given, else the official table's rule
    max_length: int | None = None

    def __post_init__(self):
        self.subsets = as_names(self.subsets)
        if isinstance(self.e, str):
            self.e = self.e.strip().lower() in ("1", "true", "yes", "on")
        if self.max_length is not None and int(self.max_length) < 2:
            raise TaskError(f"LongBench max_length must be at least 2 tokens (got {self.max_length})")
        unknown = [s for s in self.subsets if s not in LONGBENCH_TASKS]
        if unknown:
            raise TaskError(f"unknown LongBench task(s) {', '.join(unknown)}; known: {', '.join(LONGBENCH_TASKS)}")
        if self.e:
            if self.subsets == LONGBENCH_TASKS:
                self.subsets = LONGBENCH_E_TASKS
            not_e = [s for s in self.subsets if s not in LONGBENCH_E_TASKS]
            if not_e:
                raise TaskError(f"LongBench-E has no {', '.join(not_e)}; its tasks: {', '.join(LONGBENCH_E_TASKS)}")
        lacking = missing_packages(self.subsets)
        if lacking:
            raise TaskError(f"the LongBench metrics of {', '.join(self.subsets)} need {', '.join(lacking)}: "
                            f"pip install {' '.join(lacking)} (kvbench's dependencies list them)")

    # -- data ---------------------------------------------------------------------------------------------
    def _config_name(self, subset: str) -> str:
        return f"{subset}_e" if self.e else subset

    def load(self, data: str | None) -> tuple[dict[str, list[dict]], list[str]]:
        """({task: rows}, [missing tasks]) from ``data`` (a directory, or one task's file) or the hub."""
        found: dict[str, list[dict]] = {}
        missing: list[str] = []
        if data:
            root = Path(data)
            if root.is_file():
                stem = root.name.split(".")[0]
                task = stem[:-2] if self.e and stem.endswith("_e") else stem
                if task in self.subsets and stem == self._config_name(task):
                    found[task] = check_schema(root, read_records(root), SCHEMA)
            elif root.is_dir():
                for task in self.subsets:
                    path = find_file(root, self._config_name(task))
                    if path is not None:
                        found[task] = check_schema(path, read_records(path), SCHEMA)
            missing = [t for t in self.subsets if t not in found]
            if not found:
                names = ", ".join(f"{self._config_name(t)}.jsonl" for t in self.subsets[:3])
                raise TaskError(f"LongBench data not found in {data}: expected files like {names}; pass --data DIR "
                                f"with <task>.jsonl files, or make the Hugging Face hub reachable for {HUB_REPO}")
            return found, missing
        for task in self.subsets:
            try:
                found[task] = _from_hub(self._config_name(task))
            except LookupError:
                if not found:  # the first one failed: the hub is out of reach, do not try the others
                    break
                missing.append(task)
        if not found:
            raise TaskError(f"LongBench data not found: pass --data DIR with <task>.jsonl files, or make the "
                            f"Hugging Face hub reachable for {HUB_REPO}")
        return found, missing

    def prompt_length(self, ctx: TaskContext) -> int:
        """pred.py's max_length: the task parameter, else --max-context, else the official rule for the window."""
        if self.max_length is not None:
            return int(self.max_length)
        if ctx.window is not None and not ctx.max_context_set:
            return official_max_length(ctx.window)
        return ctx.max_context_tokens

    # -- the Task protocol ----------------------------------------------------------------------------------
    def samples(self, tokenizer, ctx: TaskContext) -> list[Sample]:
        found, missing = self.load(ctx.data)
        templates, maxlens = prompts(), max_new_tokens()
        max_length = self.prompt_length(ctx)
        # pred.py on samsum: generate(min_length=prompt+1, eos_token_id=[eos, the "\n" token]) ("prevent illegal
        # output on samsum"): never an empty answer, and the answer ends at its first newline token.
        samsum_stop = {"stop_token_ids": tokenizer.encode("\n", add_special_tokens=False)[-1:], "min_new_tokens": 1}
        out: list[Sample] = []
        for task in self.subsets:
            rows = found.get(task)
            if rows is None:
                continue
            if ctx.limit is not None:
                rows = rows[: ctx.limit]  # the limit applies to each task
            for i, row in enumerate(rows):
                fields = {"context": row.get("context", ""), "input": row.get("input", "")}
                ids, n_context, _ = official_prompt(tokenizer, templates[task], fields, max_length,
                                                    chat=task not in NO_CHAT_TEMPLATE)
                context_ids, question_ids = ids[:n_context], ids[n_context:]
                length = row.get("length")
                out.append(Sample(
                    id=f"{self._config_name(task)}/{row.get('_id') or i}",
                    context_ids=context_ids,
                    question_ids=question_ids,
                    answers=[str(a) for a in (row.get("answers") or [])],
                    max_new_tokens=maxlens[task],
                    meta={
                        "dataset": task,
                        "length": length,
                        "all_classes": row.get("all_classes"),
                        "language": row.get("language"),
                        "bucket": bucket(length),
                        "longbench_e": self.e,
                        "missing_subsets": missing,
                    },
                    stop_at_newline=task in LONGBENCH_FIRST_LINE,
                    **(samsum_stop if task == "samsum" else {}),
                ))
        return out

    def score(self, sample: Sample, prediction: str) -> dict[str, float]:
        m = sample.meta
        return {"score": longbench_score(m["dataset"], prediction, sample.answers, m.get("all_classes"))}

    def summarize(self, records: list[dict]) -> dict:
        by_task: dict[str, list[dict]] = {}
        for r in records:
            by_task.setdefault(r.get("meta", {}).get("dataset"), []).append(r)
        order = [t for t in LONGBENCH_TASKS if t in by_task]

        def mean(rs):
            vals = [r["scores"]["score"] for r in rs if "score" in r.get("scores", {})]
            return sum(vals) / len(vals) if vals else float("nan")

        per_task = {t: mean(by_task[t]) for t in order}
        missing = sorted({m for r in records for m in r.get("meta", {}).get("missing_subsets") or []},
                         key=LONGBENCH_TASKS.index)
        out: dict[str, Any] = {
            "n": len(records),
            "score": sum(per_task.values()) / len(per_task) if per_task else float("nan"),  # macro average
            "per_task": per_task,
            "n_per_task": {t: len(by_task[t]) for t in order},
            "missing_subsets": missing,
        }
        if all(t in per_task for t in ENGLISH_16):
            out["avg_16_en_code"] = sum(per_task[t] for t in ENGLISH_16) / len(ENGLISH_16)
        if any(r.get("meta", {}).get("longbench_e") for r in records):
            per_bucket: dict[str, dict[str, float]] = {}
            for t in order:
                groups: dict[str, list[dict]] = {}
                for r in by_task[t]:
                    groups.setdefault(r["meta"].get("bucket"), []).append(r)
                per_bucket[t] = {b: mean(groups[b]) for b in BUCKETS if b in groups}
            out["per_task_bucket"] = per_bucket
            out["bucket"] = {}
            for b in BUCKETS:
                vals = [per_bucket[t][b] for t in order if b in per_bucket[t]]
                if vals:
                    out["bucket"][b] = sum(vals) / len(vals)
        return out

    def score_units(self, records: list[dict]) -> list[tuple[float, dict[str, float]]]:
        return macro_units(records, "dataset", LONGBENCH_TASKS)
