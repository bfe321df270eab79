"""Prompt parity with the official LongBench pred.py (THUDM/LongBench, LongBench/pred.py of v1).

``reference_prompt`` restates pred.py's build step for one record (format, tokenize, middle-truncate by decoding
both halves and joining their text, chat template unless the task is one of the six without, tokenize again);
``parity`` counts the records on which kvbench's samples give the same token ids and the same text.

    python tests/tasks/longbench_parity.py DATA_DIR TOKENIZER_DIR 7500 3501   # counts per file and max_length
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

NO_CHAT = ["trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"]


def reference_prompt(tokenizer, prompt_format: str, json_obj: dict, max_length: int, dataset: str):
    """(input ids, prompt text) as pred.py's get_pred makes them, the model's chat template as build_chat."""
    prompt = prompt_format.format(**json_obj)
    tokenized_prompt = tokenizer(prompt, truncation=False).input_ids
    if len(tokenized_prompt) > max_length:
        half = int(max_length / 2)
        prompt = (tokenizer.decode(tokenized_prompt[:half], skip_special_tokens=True)
                  + tokenizer.decode(tokenized_prompt[-half:], skip_special_tokens=True))
    if dataset not in NO_CHAT and tokenizer.chat_template is not None:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    return tokenizer(prompt, truncation=False).input_ids, prompt


def parity(tokenizer, data_dir: str | Path, dataset: str, max_length: int, samples=None,
           limit: int | None = None) -> dict:
    """{'n', 'token_identical', 'text_identical'} of kvbench's prompts against ``reference_prompt``.

    ``samples``: kvbench's samples of the file (default: built now by the LongBench task)."""
    from kvbench.task import TaskContext
    from kvbench.tasks.longbench import LongBench, prompts

    rows = [json.loads(line) for line in (Path(data_dir) / f"{dataset}.jsonl").open(encoding="utf-8") if line.strip()]
    rows = rows[:limit]
    if samples is None:
        samples = LongBench(subsets=(dataset,)).samples(
            tokenizer, TaskContext(max_context_tokens=max_length, data=str(data_dir), limit=limit))
    tokens = texts = 0
    for row, s in zip(rows, samples, strict=True):
        ids, text = reference_prompt(tokenizer, prompts()[dataset], row, max_length, dataset)
        got = s.context_ids + s.question_ids
        tokens += got == ids
        texts += tokenizer.decode(got) == text
    return {"n": len(rows), "token_identical": tokens, "text_identical": texts}


if __name__ == "__main__":
    from transformers import AutoTokenizer

    data, tok_dir, *lengths = sys.argv[1:]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    for name in ("multi_news", "multifieldqa_zh"):
        for n in lengths:
            print(name, n, parity(tok, data, name, int(n)))
