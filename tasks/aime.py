"""AIME 2024 and 2025: 30 integer-answer problems each, scored by pass@1 over ``n_samples`` generations.

Prompt: one user message, the problem followed by the usual instruction
"Please reason step by step, and put your final answer within \\boxed{}." (Qwen2.5-Math / DeepSeek-R1 style),
in the model's chat template. Split for the query-agnostic protocol: ``context_ids`` holds the chat header and
the problem, ``question_ids`` the instruction and the generation prompt. The prompt is short (100-300 tokens):
what a KV-cache method meets on this task is the long generated reasoning, so the split matters little; putting
the problem in the context keeps ``context_ids`` non-empty for every tokenizer.

Answer check, as Qwen2.5-Math's evaluation (``evaluation/parser.py`` ``extract_answer``, then an equivalence
check): the answer is the content of the last ``\\boxed{...}`` (balanced braces); without one, what follows the
last "the answer is" (or "final answer is"); without that, the last number of the prediction. It is compared
with the reference as integers (leading zeros ignored: "025" == "25"), else by ``math-verify`` (a dependency),
which accepts ``\\boxed{x=25}``, ``25^\\circ``, ``\\dfrac{50}{2}``, ``25 \\text{ degrees}`` and the like.
The scores say where the answer came from (``boxed``, ``unboxed_answer``).

Sampling: ``temperature`` and the sample index are in ``Sample.meta`` (``temperature``, ``sample_index``);
with ``n_samples`` > 1 every problem appears n times (ids ``<problem>#<k>``), and pass@1 is the mean
correctness over all of them (= the mean over problems of c/n).

Data: ``--data`` pointing at a ``test.jsonl`` (fields problem, answer; AIME 2024 files also have id, solution,
url), or a folder holding one (directly or under ``aime24/`` / ``aime25/``); else the hub
(``HuggingFaceH4/aime_2024``; ``math-ai/aime25`` or ``yentinglin/aime_2025``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from kvbench.task import Sample, Task, TaskContext, TaskError, build_prompt, hub_dataset

from kvbench.io import find_file, read_records
from kvbench.method import in_range

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

HUB_SOURCES: dict[int, tuple[tuple[str, str], ...]] = {
    2024: (("HuggingFaceH4/aime_2024", "train"),),
    2025: (("math-ai/aime25", "test"), ("yentinglin/aime_2025", "train")),
}


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced; None if none."""
    starts = [m.start() for m in re.finditer(r"\\(?:boxed|fbox)", text)]
    for start in reversed(starts):
        i = text.index("{", start) if "{" in text[start:start + 8] else -1
        if i < 0:
            # "\boxed 25" without braces
            m = re.match(r"\\boxed\s+([^\s$]+)", text[start:])
            if m:
                return m.group(1)
            continue
        depth = 0
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1:j]
    return None


def to_int(answer: str | int | None) -> int | None:
    """An AIME answer as an integer: strips $, spaces, thousands separators, \\text{}, a trailing .0; else None."""
    if answer is None:
        return None
    if isinstance(answer, int):
        return answer
    s = str(answer).strip()
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = s.replace("$", "").replace("\\!", "").replace("\\,", "").replace(",", "").replace(" ", "")
    s = s.rstrip(".")
    m = re.fullmatch(r"([+-]?\d+)(?:\.0+)?", s)
    return int(m.group(1)) if m else None


_LAST_NUMBER = re.compile(r"-?\d*\.?\d+")


def extract_answer(prediction: str) -> tuple[str, str]:
    """(answer text, where it came from: "boxed", "answer is", "last number" or "none"), in Qwen2.5-Math's order."""
    boxed = last_boxed(prediction)
    if boxed is not None:
        return boxed, "boxed"
    for marker in ("he answer is", "final answer is"):
        if marker in prediction:
            return _clean(prediction.split(marker)[-1]), "answer is"
    numbers = _LAST_NUMBER.findall(prediction.replace(",", ""))
    return (numbers[-1], "last number") if numbers else ("", "none")


def _clean(text: str) -> str:
    """Qwen2.5-Math's clean-up of an extracted answer: newlines out, a leading ':' and a trailing '.' or '/' off."""
    text = re.sub(r"\n\s*", "", text.strip())
    if text.startswith(":"):
        text = text[1:]
    if text.endswith((".", "/")):
        text = text[:-1]
    return text.strip()


def _math_verify():
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise TaskError("AIME scoring needs math-verify: pip install 'math-verify[antlr4_13_2]'") from e
    return parse, verify


def is_correct(prediction: str, reference: str) -> bool:
    answer, source = extract_answer(prediction)
    if source == "none":
        return False
    pred_int, ref_int = to_int(answer), to_int(reference)
    if pred_int is not None and ref_int is not None:
        return pred_int == ref_int
    parse, verify = _math_verify()
    text = f"$\\boxed{{{answer}}}$" if source == "boxed" else (answer if "$" in answer else f"${answer}$")
    try:
        return bool(verify(parse(f"${reference}$"), parse(text)))
    except Exception:  # an answer math-verify cannot read is wrong, not a crash of the run
        return False


@dataclass
class AIME(Task):
    """AIME problems of one year (``year`` 2024 or 2025)."""

    name: ClassVar[str] = "aime"

    year: int = 2024
    n_samples: int = 1  # generations per problem (pass@1 is averaged over them)
    temperature: float = 0.0  # 0 = greedy; > 0 the harness samples (task.temperature)
    max_new_tokens: int = field(default=8192, metadata=in_range(1))

    def __post_init__(self):
        self.year, self.n_samples = int(self.year), int(self.n_samples)
        self.temperature, self.max_new_tokens = float(self.temperature), int(self.max_new_tokens)
        if self.year not in HUB_SOURCES:
            raise TaskError(f"AIME year must be 2024 or 2025, not {self.year}")
        if self.n_samples < 1:
            raise TaskError("n_samples must be at least 1")
        _math_verify()  # the scorer's dependency, checked before any slow work

    @property
    def tag(self) -> str:
        return f"aime{self.year % 100}"

    def load(self, data: str | None) -> list[dict]:
        if data:
            root = Path(data)
            path = root if root.is_file() else None
            if path is None and root.is_dir():
                path = find_file(root, "test") or find_file(root / self.tag, "test")
            if path is None:
                raise TaskError(f"AIME data not found in {data}: expected a test.jsonl (or {self.tag}/test.jsonl) "
                                f"with problem and answer fields")
            return read_records(path)
        errors = []
        for repo, split in HUB_SOURCES[self.year]:
            try:
                return hub_dataset(repo, None, split)
            except Exception as e:
                errors.append(f"{repo}: {type(e).__name__}")
        sources = " or ".join(repo for repo, _ in HUB_SOURCES[self.year])
        raise TaskError(f"AIME {self.year} data not found: pass --data with a test.jsonl (problem, answer), or make "
                        f"the Hugging Face hub reachable for {sources}")

    def samples(self, tokenizer, ctx: TaskContext) -> list[Sample]:
        rows = self.load(ctx.data)
        if ctx.limit is not None:
            rows = rows[: ctx.limit]
        out: list[Sample] = []
        for i, row in enumerate(rows):
            problem = row.get("problem") or row.get("question") or row.get("Problem")
            answer = row.get("answer", row.get("Answer"))
            if problem is None or answer is None:
                raise TaskError(f"AIME row {i} has no problem/answer field (fields: {', '.join(sorted(row))})")
            pid = row.get("id", row.get("ID", i))
            context_ids, question_ids = build_prompt(tokenizer, str(problem), "\n" + INSTRUCTION, chat=True,
                                                     max_len=ctx.max_context_tokens)
            for k in range(self.n_samples):
                out.append(Sample(
                    id=f"{self.tag}/{pid}" + (f"#{k}" if self.n_samples > 1 else ""),
                    context_ids=list(context_ids),
                    question_ids=list(question_ids),
                    answers=[str(answer)],
                    max_new_tokens=self.max_new_tokens,
                    meta={"problem_id": str(pid), "problem_index": i, "sample_index": k,
                          "n_samples": self.n_samples, "temperature": self.temperature, "year": self.year},
                ))
        return out

    def score(self, sample: Sample, prediction: str) -> dict[str, float]:
        ok = is_correct(prediction, sample.answers[0])
        source = extract_answer(prediction)[1]
        return {"score": 100.0 if ok else 0.0, "correct": 1.0 if ok else 0.0,
                "boxed": 1.0 if source == "boxed" else 0.0,
                "unboxed_answer": 1.0 if source in ("answer is", "last number") else 0.0}

    def summarize(self, records: list[dict]) -> dict:
        rates = self.score_units(records)[0][1]
        pass1 = sum(rates.values()) / len(rates) if rates else float("nan")
        boxed = [r.get("scores", {}).get("boxed", 0.0) for r in records]
        return {"n": len(records), "n_problems": len(rates), "score": pass1, "pass@1": pass1,
                "boxed_rate": 100.0 * sum(boxed) / len(boxed) if boxed else float("nan")}

    def score_units(self, records: list[dict]) -> list[tuple[float, dict[str, float]]]:
        """The problems, each its % correct over its generations: a problem's generations are alike (mostly all
        right or all wrong), so the problems, not the generations, are what a bootstrap may draw."""
        per_problem: dict[str, list[float]] = {}
        for r in records:
            per_problem.setdefault(str(r.get("meta", {}).get("problem_id", r.get("id"))), []).append(
                r.get("scores", {}).get("correct", 0.0))
        return [(1.0, {p: 100.0 * sum(v) / len(v) for p, v in per_problem.items()})]


@dataclass
class AIME24(AIME):
    name: ClassVar[str] = "aime24"
    year: int = 2024


@dataclass
class AIME25(AIME):
    name: ClassVar[str] = "aime25"
    year: int = 2025
