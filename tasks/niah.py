"""Needle in a haystack: a fact hidden at a given depth of a long context, over a grid of lengths x depths.

The haystack is a directory (or file) of text, such as Paul Graham's essays (``--data DIR`` or the
``haystack`` parameter); with neither, a built-in filler of plain sentences is used so the task runs with
no data at all. Every (length, depth) cell is kept in the records' meta for a heatmap.

Two prompt styles:

- ``style="kvbench"`` (default): the needle goes in at the sentence boundary nearest below the requested
  depth; one user turn "Document: ... {question} Answer in one sentence, using the document above."
- ``style="original"``: as Kamradt's needle test (gkamradt/LLMTest_NeedleInAHaystack, the one most papers
  cite): the haystack files are read in order and repeated until long enough, cut to the length minus a
  200-token buffer, the needle "\nThe best thing ... day.\n" on its own line, inserted at ``depth`` of the
  context and moved back token by token to just after a '.' (depth 1.0 appends it), then a system prompt
  ("You are a helpful AI bot ... short and direct"), the context as one user turn and the question as
  another ("... Don't give information outside the document or repeat your findings").

Scored by ``found`` (the headline ``score``: 100 when the key phrase appears in the answer, case-insensitive,
else 0: a binary metric, so a wrong answer gets no partial credit) and, as a secondary column, ROUGE-1 recall
of the needle's answer (``rouge1``; it gives a wrong answer that shares words with the needle partial credit).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kvbench.io import load_texts, text_files
from kvbench.method import in_range
from kvbench.task import Sample, Task, TaskContext, TaskError, build_prompt, summarize_mean
from kvbench.tasks.metrics import rouge1_recall

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
          "Rivers run to the sea, and the sea returns as rain. A library keeps old books on tall shelves. ")


ORIGINAL_SYSTEM = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct"
ORIGINAL_QUESTION_TAIL = " Don't give information outside the document or repeat your findings"
ORIGINAL_BUFFER = 200  # tokens left free of haystack in the original test
_MARK = "\u2063\u2063KVBENCH-%s\u2063\u2063"


def chat_split(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a chat whose messages hold the markers CONTEXT and QUESTION: everything up to the end of
    the context, and the rest (the question's turn and the generation prompt)."""
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    head, rest = rendered.split(_MARK % "CONTEXT", 1)
    return (tokenizer.encode(head, add_special_tokens=False),
            tokenizer.encode(rest, add_special_tokens=False))


def _depth_id(depth: float) -> str:
    """Two decimals as before (stable ids for resumed runs), more where the depth has more (0.501)."""
    short = f"{depth:.2f}"
    return short if float(short) == depth else repr(float(depth))


@dataclass
class NIAH(Task):
    name: str = "niah"
    lengths: list[int] = field(default_factory=lambda: [1024, 2048], metadata=in_range(1))
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], metadata=in_range(0, 1))
    haystack: str | None = None
    needle: str = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
    question: str = "What is the best thing to do in San Francisco?"
    answer: str = "eat a sandwich and sit in Dolores Park on a sunny day"
    key_phrase: str = "Dolores Park"
    max_new_tokens: int = field(default=48, metadata=in_range(1))
    style: str = "kvbench"  # or "original" (Kamradt's test: see the module docstring)

    def samples(self, tokenizer, ctx: TaskContext) -> list[Sample]:
        if self.style not in ("kvbench", "original"):
            raise TaskError(f"NIAH style '{self.style}' is unknown: use kvbench or original")
        for length in self.lengths:
            if length > ctx.max_context_tokens:
                raise TaskError(f"NIAH length {length} exceeds the usable context of {ctx.max_context_tokens} tokens; "
                                "pick smaller lengths with --task-arg lengths=[...]")
        if self.style == "original":
            out = self._original_samples(tokenizer, self.haystack or ctx.data)
            return out[: ctx.limit] if ctx.limit else out
        source = self.haystack or ctx.data
        text = load_texts(source) if source else FILLER * 4000
        hay = tokenizer.encode(text, add_special_tokens=False)
        needle = tokenizer.encode(" " + self.needle.strip() + " ", add_special_tokens=False)
        suffix = f"\n\n{self.question} Answer in one sentence, using the document above."
        out = []
        for length in self.lengths:
            room = length - len(needle) - len(tokenizer.encode(suffix, add_special_tokens=False)) - 32
            if room <= 0:  # hay[:room] would take nearly the whole haystack, not an empty one
                raise TaskError(f"NIAH length {length} leaves no room for a haystack: the needle, question and prompt "
                                f"take {length - room} tokens; pick longer lengths with --task-arg lengths=[...]")
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

    def _original_samples(self, tokenizer, source: str | None) -> list[Sample]:
        texts = text_files(source) if source else [FILLER * 40]
        needle_text = "\n" + self.needle.strip() + "\n"
        needle = tokenizer.encode(needle_text, add_special_tokens=False)
        periods = set(tokenizer.encode(".", add_special_tokens=False))
        longest = max(self.lengths) - ORIGINAL_BUFFER
        joined = "".join(texts)  # the files in order (sorted: the original globs), then again and again
        reps = 1 + longest // max(len(tokenizer.encode(joined, add_special_tokens=False)), 1)
        haystack = tokenizer.encode(joined * reps, add_special_tokens=False)
        if not haystack:
            raise TaskError(f"NIAH: the haystack at {source or 'the built-in filler'} has no text")
        out = []
        for length in self.lengths:
            budget = length - ORIGINAL_BUFFER
            if budget <= len(needle):
                raise TaskError(f"NIAH length {length} leaves no room for a haystack after the {ORIGINAL_BUFFER}-token "
                                "buffer of the original test")
            context = haystack[:budget - len(needle)]
            messages = [{"role": "system", "content": ORIGINAL_SYSTEM},
                        {"role": "user", "content": _MARK % "CONTEXT"},
                        {"role": "user", "content": self.question + ORIGINAL_QUESTION_TAIL}]
            if getattr(tokenizer, "chat_template", None) is None:
                raise TaskError("NIAH style=original needs a model with a chat template")
            head, rest = chat_split(tokenizer, messages)
            for depth in self.depths:
                if depth >= 1.0:
                    at = len(context)
                else:
                    at = int(len(context) * depth)
                    while at > 0 and context[at - 1] not in periods:
                        at -= 1
                ids = context[:at] + needle + context[at:]
                body = tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False)
                out.append(Sample(id=f"niah-original-{length}-{_depth_id(depth)}", context_ids=head + body, question_ids=rest,
                                  answers=[self.answer], max_new_tokens=self.max_new_tokens,
                                  meta={"length": length, "depth": depth, "needle_token": len(head) + at}))
        return out

    @staticmethod
    def _boundary(tokenizer, ids: list[int], at: int) -> int:
        """Move back to just after the nearest sentence end ('.') at or before ``at``."""
        for i in range(min(at, len(ids)), 0, -1):
            if tokenizer.decode(ids[i - 1:i]).rstrip().endswith((".", "!", "?")):
                return i
        return 0

    def score(self, sample: Sample, prediction: str) -> dict[str, float]:
        found = 100.0 * float(self.key_phrase.lower() in prediction.lower())
        return {"score": found, "found": found, "rouge1": 100.0 * rouge1_recall(prediction, sample.answers[0])}

    def summarize(self, records: list[dict]) -> dict:
        out = summarize_mean(records, group_by="length")
        out["grid"] = [{"length": r["meta"]["length"], "depth": r["meta"]["depth"], **r["scores"]} for r in records]
        return out
