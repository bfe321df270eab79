"""Needle in a haystack: a fact hidden at a given depth of a long context, over a grid of lengths x depths.

The haystack is a directory (or file) of text, such as Paul Graham's essays (``--data DIR`` or the
``haystack`` parameter); with neither, a built-in filler of plain sentences is used so the task runs with
no data at all. The needle goes in at the sentence boundary nearest below the requested depth. Scored by
ROUGE-1 recall of the needle's answer (``score``, 0-100) and by exact containment of its key phrase.
Every (length, depth) cell is kept in the records' meta for a heatmap.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvbench.task import Sample, TaskContext, TaskError, build_prompt, summarize_mean
from kvbench.tasks.metrics import rouge1_recall

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
          "Rivers run to the sea, and the sea returns as rain. A library keeps old books on tall shelves. ")


def load_texts(path: str | Path) -> str:
    """All ``.txt``/``.md`` files of a directory (sorted), or one file, joined by blank lines."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.read_text(errors="replace")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".md") and f.is_file())
        if files:
            return "\n\n".join(f.read_text(errors="replace") for f in files)
    raise TaskError(f"no text found at {path}: pass --data with a directory of .txt files or a text file")


def _depth_id(depth: float) -> str:
    """Two decimals as before (stable ids for resumed runs), more where the depth has more (0.501)."""
    short = f"{depth:.2f}"
    return short if float(short) == depth else repr(float(depth))


@dataclass
class NIAH:
    name: str = "niah"
    lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    haystack: str | None = None
    needle: str = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
    question: str = "What is the best thing to do in San Francisco?"
    answer: str = "eat a sandwich and sit in Dolores Park on a sunny day"
    key_phrase: str = "Dolores Park"
    max_new_tokens: int = 48

    def samples(self, tokenizer, ctx: TaskContext) -> list[Sample]:
        source = self.haystack or ctx.data
        text = load_texts(source) if source else FILLER * 4000
        hay = tokenizer.encode(text, add_special_tokens=False)
        needle = tokenizer.encode(" " + self.needle.strip() + " ", add_special_tokens=False)
        suffix = f"\n\n{self.question} Answer in one sentence, using the document above."
        out = []
        for length in self.lengths:
            if length > ctx.max_context_tokens:
                raise TaskError(f"NIAH length {length} exceeds the usable context of {ctx.max_context_tokens} tokens; "
                                "pick smaller lengths with --task-arg lengths=[...]")
            room = length - len(needle) - len(tokenizer.encode(suffix, add_special_tokens=False)) - 32
            if room > len(hay):
                raise TaskError(f"haystack has only {len(hay)} tokens, too few for length {length}")
            body = hay[:room]
            for depth in self.depths:
                at = self._boundary(tokenizer, body, int(room * depth))
                ids = body[:at] + needle + body[at:]
                context, question = build_prompt(tokenizer, "Document:\n" + tokenizer.decode(ids), suffix, chat=True)
                out.append(Sample(id=f"niah-{length}-{_depth_id(depth)}", context_ids=context, question_ids=question,
                                  answers=[self.answer], max_new_tokens=self.max_new_tokens,
                                  meta={"length": length, "depth": depth, "needle_token": at}))
        return out[: ctx.limit] if ctx.limit else out

    @staticmethod
    def _boundary(tokenizer, ids: list[int], at: int) -> int:
        """Move back to just after the nearest sentence end ('.') at or before ``at``."""
        for i in range(min(at, len(ids)), 0, -1):
            if tokenizer.decode(ids[i - 1:i]).rstrip().endswith((".", "!", "?")):
                return i
        return 0

    def score(self, sample: Sample, prediction: str) -> dict[str, float]:
        return {"score": 100.0 * rouge1_recall(prediction, sample.answers[0]),
                "contains": 100.0 * float(self.key_phrase.lower() in prediction.lower())}

    def summarize(self, records: list[dict]) -> dict:
        out = summarize_mean(records, group_by="length")
        out["grid"] = [{"length": r["meta"]["length"], "depth": r["meta"]["depth"], **r["scores"]} for r in records]
        return out
