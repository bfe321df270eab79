"""LongBench v1 (THUDM/LongBench): the 21 tasks, and LongBench-E (the length-balanced 13).

Official facts kept: the per-task prompt templates and max new tokens (embedded from the official config files
in ``longbench_config.json``, the current prompt file with its "asconcisely" typo), middle truncation of the
raw prompt (before any chat template) to the model's window, no chat template for trec, triviaqa, samsum, lsht,
lcc and repobench-p, first-line cutting of the prediction for trec, triviaqa, samsum and lsht, the per-task
metrics (``metrics.LONGBENCH_METRICS``, max over the references, x100), LongBench-E's 0-4k / 4-8k / 8k+ buckets
on the sample's ``length`` field.

The prompt is split for the query-agnostic protocol at the end of the context: the template text up to and
including ``{context}`` is the compressed part; the rest (with the question) is appended afterwards.

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
from typing import Any, ClassVar, Iterable

from kvbench.task import Sample, TaskContext, TaskError, build_prompt, hub_dataset

from .metrics import LONGBENCH_FIRST_LINE, longbench_score

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


def as_names(value: Any) -> tuple[str, ...]:
    """A task parameter given as a tuple, a list or a comma-separated string, as a tuple of names."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value)


# ---------------------------------------------------------------------------------------------------------
# reading data files (shared with the other task modules)
# ---------------------------------------------------------------------------------------------------------

SCHEMA = {"context": str, "input": str, "answers": list}  # the fields a prompt and its score are made of


def read_records(path: str | Path) -> list[dict]:
    """The rows of a ``.jsonl``, ``.json`` (a list) or ``.parquet`` file, as dicts."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except Exception as e:  # pyarrow's errors have no common base
            raise TaskError(f"{path} is not a readable parquet file ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:160]})") from None
        return [_plain(r) for r in frame.to_dict(orient="records")]
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".json":
                data = json.load(f)
                rows = list(data) if isinstance(data, list) else [data]
            else:
                rows = [_json_line(line, path, number) for number, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError as e:
        raise TaskError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise TaskError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise TaskError(f"{path}: record {bad + 1} is not a JSON object")
    return rows


def _json_line(line: str, path: Path, number: int) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise TaskError(f"{path} line {number} is not valid JSON ({e.msg}, column {e.colno}); fix or remove "
                        "that line") from None


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


def _plain(value: Any) -> Any:
    """numpy arrays/scalars from parquet rows as plain lists/numbers."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def find_file(root: Path, stem: str, exts: Iterable[str] = (".jsonl", ".parquet", ".json")) -> Path | None:
    """``root/stem.ext`` or ``root/data/stem.ext``, the first that exists."""
    for folder in (root, root / "data"):
        for ext in exts:
            p = folder / f"{stem}{ext}"
            if p.is_file():
                return p
    return None


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
class LongBench:
    """LongBench v1 (``e=False``, 21 tasks) or LongBench-E (``e=True``, the 13 ``_e`` subsets)."""

    name: ClassVar[str] = "longbench"

    subsets: tuple[str, ...] = LONGBENCH_TASKS  # which tasks; with e=True the default means the 13 E tasks
    e: bool = False  # LongBench-E: the <task>_e data, scored per length bucket too

    def __post_init__(self):
        self.subsets = as_names(self.subsets)
        if isinstance(self.e, str):
            self.e = self.e.strip().lower() in ("1", "true", "yes", "on")
        unknown = [s for s in self.subsets if s not in LONGBENCH_TASKS]
        if unknown:
            raise TaskError(f"unknown LongBench task(s) {', '.join(unknown)}; known: {', '.join(LONGBENCH_TASKS)}")
        if self.e:
            if self.subsets == LONGBENCH_TASKS:
                self.subsets = LONGBENCH_E_TASKS
            not_e = [s for s in self.subsets if s not in LONGBENCH_E_TASKS]
            if not_e:
                raise TaskError(f"LongBench-E has no {', '.join(not_e)}; its tasks: {', '.join(LONGBENCH_E_TASKS)}")

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

    # -- the Task protocol ----------------------------------------------------------------------------------
    def samples(self, tokenizer, ctx: TaskContext) -> list[Sample]:
        found, missing = self.load(ctx.data)
        templates, maxlens = prompts(), max_new_tokens()
        out: list[Sample] = []
        for task in self.subsets:
            rows = found.get(task)
            if rows is None:
                continue
            if ctx.limit is not None:
                rows = rows[: ctx.limit]  # the limit applies to each task
            prefix_t, suffix_t = split_template(templates[task])
            for i, row in enumerate(rows):
                fields = {"context": row.get("context", ""), "input": row.get("input", "")}
                context_ids, question_ids = build_prompt(
                    tokenizer, prefix_t.format(**fields), suffix_t.format(**fields),
                    chat=task not in NO_CHAT_TEMPLATE, max_len=ctx.max_context_tokens)
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
