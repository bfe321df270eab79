"""Fidelity: how far the compressed cache moves the model's next-token distribution.

Teacher-forced: the context is prefilled (and compressed), then a held-out continuation of the same text
is fed; at every continuation position (the first token's, predicted from the context alone, included) we
compare the log-probabilities with those under the full cache.
The continuation goes in as one chunk by default (kvpress's and KVSculpt's setting: its own keys and values
exact, as a prefill chunk's are); ``stepwise=true`` feeds it token by token through the decoding steps, so
each token reads the cache as the method keeps it while decoding: the methods that evict while decoding
(h2o, tova, streamingllm) stay at their budget, and a codec's generated tokens are coded (KV-CAR).
Reported: KL(full || compressed) in nats per token (``kl``, lower is better), perplexity of the
continuation under both caches, and top-1 agreement (``score``, 0-100). Needs no labels, so it works on
any text: ``--data`` (a file or a directory of .txt files); with none, the docstrings of Python's
standard library (plain English prose, on every machine).
"""
from __future__ import annotations

import ast
import math
import sysconfig
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import torch

from kvbench.task import ADDED_LATER, LOGPROBS, Sample, Task, TaskContext, TaskError
from kvbench.io import load_texts
from kvbench.method import in_range


def stdlib_prose(max_chars: int = 2_000_000) -> str:
    """Module, class and function docstrings of the standard library, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for f in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(f.read_text(errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    parts.append(doc)
                    total += len(doc)
        if total > max_chars:
            break
    return "\n\n".join(parts)


@dataclass
class Fidelity(Task):
    name: str = "fidelity"
    kind: ClassVar[str] = LOGPROBS
    context_len: int = field(default=2048, metadata=in_range(1))
    continuation_len: int = field(default=256, metadata=in_range(1))
    n_samples: int = field(default=8, metadata=in_range(1))
    source: str | None = None
    stepwise: bool = field(default=False, metadata=ADDED_LATER)  # runs before it existed were teacher-forced
    # Runs before 2026-12-04 (commit 0e497c7) scored tokens 2..T, leaving out the first, whose prediction is the
    # prefill's last logits. Not ADDED_LATER on purpose: new runs rank apart from those, and False scores as
    # they did (``-t first_token=false``), to extend them comparably.
    first_token: bool = True

    def samples(self, tokenizer, ctx: TaskContext) -> list[Sample]:
        src = self.source or ctx.data
        text = load_texts(src) if src else stdlib_prose()
        ids = tokenizer.encode(text, add_special_tokens=False)
        span = self.context_len + self.continuation_len
        if self.context_len > ctx.max_context_tokens:
            raise TaskError(f"fidelity context_len {self.context_len} exceeds the usable context "
                            f"({ctx.max_context_tokens} tokens)")
        n = min(self.n_samples if not ctx.limit else min(self.n_samples, ctx.limit), len(ids) // span)
        if n == 0:
            raise TaskError(f"text too short: {len(ids)} tokens, need {span} per sample")
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        stride = len(ids) // n
        return [Sample(id=f"fidelity-{i}", context_ids=bos + ids[i * stride: i * stride + self.context_len],
                       question_ids=[], answers=[], max_new_tokens=0,
                       continuation_ids=ids[i * stride + self.context_len: i * stride + span],
                       meta={"offset": i * stride}) for i in range(n)]

    def score_logprobs(self, engine, sample: Sample) -> dict:
        """Run the compressed engine and its full-cache reference on the same sample."""
        logp, info = engine.continuation_logprobs(sample, self.stepwise)
        ref, _ = engine.full_reference().continuation_logprobs(sample, self.stepwise)
        target = torch.tensor(sample.continuation_ids, device=logp.device)  # row t predicts token t
        if not self.first_token:
            logp, ref, target = logp[1:], ref[1:], target[1:]
        kl = (ref.exp() * (ref - logp)).sum(-1).mean().item()
        nll = -logp.gather(1, target[:, None]).mean().item()
        nll_full = -ref.gather(1, target[:, None]).mean().item()
        agree = (logp.argmax(-1) == ref.argmax(-1)).float().mean().item()
        return {**info, "prediction": "", "new_tokens": 0,
                "scores": {"score": 100 * agree, "kl": kl, "ppl": math.exp(nll), "ppl_full": math.exp(nll_full)}}

    def score(self, sample: Sample, prediction: str) -> dict[str, float]:
        raise TaskError("fidelity is scored on log-probabilities, not on generated text")

