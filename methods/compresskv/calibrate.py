"""``kvbench calibrate compresskv``: semantic-retrieval-head scores and layer errors for one model.

Head scores (official ``Retrieval_Head_Identification/semantic_retrieval_head_detection.py``): three
needle/question pairs (the official ``haystack_for_detect/needles.jsonl``), each in its own haystack, on a grid
of context lengths (20 evenly spaced from 1000 to the model's window) x depths (10 from 0 to 100%). The context
is the haystack cut to the length less a 200-token buffer with the needle put in after the sentence end at or
before the depth; the prompt is the context followed by "Based on the content of the book, Question:
...\\nAnswer:" (no chat template, as the official script for Llama-3.1 and Mistral-v0.3). The model decodes
greedily up to 50 tokens (stopping at EOS or at the end of the answer's first line). At each step, the query
that predicts the token attends over the cache; for every needle-span position holding the predicted token,
every (layer, query head) adds its attention mass on the whole span (the probabilities are computed here from
the cached keys, the step's query and the log-sum-exp the attention returned). A test counts when the answer's
ROUGE-1 recall of the needle's answer is above 50; a head's score is its mean over counted tests, and heads are
ranked per layer.

Layer errors (official ``longbench/model/modeling_llama_new.py``, ``pred_get_importance_score.py``): on each
calibration prompt the model decodes with its full cache; at every decoding step each layer's attention
output after ``o_proj`` is compared with the output over CompressKV's selection at budget 32 (the top 4 heads
of the ranking just made, window 8, kernel 5): relative Frobenius error, summed over steps and prompts, then
normalised to sum 1. Prompts: LongBench files when given (``--longbench DIR``: the official prompts and
generation lengths, scores normalised per task and averaged, as the official "avg_score"), otherwise a
spread of the needle prompts of the grid (recorded in the artifact).

Choices: a step earns its heads' span mass once per needle-span position holding the predicted token (as the
official loop; a token that occurs twice in the span counts twice); the haystack and needle are encoded
without special tokens (the official encodes each with the tokenizer's BOS, which then lands inside the
context as text with Llama tokenizers), the whole prompt with them; ROUGE-1 recall is kvbench's (no stemming;
the official uses rouge_score with a stemmer); decoding stops at EOS and after the answer's first line (the
official stops at a newline token of Llama-2/Mistral's vocabulary, so with Llama-3's it always runs 50 tokens;
newlines before the answer are skipped here); a haystack directory with ``part1``..``part3`` subdirectories is
used as the three haystacks (the official layout), any other directory's files are dealt round-robin into
three. Progress is appended to a ``.progress.jsonl`` beside the output: a killed calibration resumes where it
stopped; the artifact is written atomically at the end.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import click
import torch

from kvbench import artifact as artifacts
from kvbench import results
from kvbench.cli import fail, user_errors
from kvbench.method import Method, segment_view
from kvbench.methods.compresskv.method import NAME, CompressKVError, selection_scores

# The official haystack_for_detect/needles.jsonl: (needle, question, real_needle).
NEEDLES = (
    ("A new report from the WMO shows that records were once again broken, and in some cases smashed, for "
     "greenhouse gas levels, surface temperatures, ocean heat and acidification.",
     "What does a new report from WMO shows ?",
     "records were once again broken, and in some cases smashed, for greenhouse gas levels, surface "
     "temperatures, ocean heat and acidification."),
    ("The best thing to do in Beijing is to take a walk in Chaoyang Park and have a cup of Espresso in the evening.",
     "What is the best thing to do in Beijing ?",
     "take a walk in Chaoyang Park and have a cup of Espresso in the evening"),
    ("Mr Green is disliked by everyone because he is a mean person and also he can't ride a horse or dive a car.",
     "Why does everyone dislikes Mr Green ?",
     "Because he is a mean person and also he can't ride a horse or dive a car."),
)
QUESTION = "Based on the content of the book, Question: {question}\nAnswer:"
SETTINGS = dict(buffer=200, max_new_tokens=50, recall_threshold=50.0, window=8, kernel=5, pooling="avg",
                first_k=4, probe_budget=32)


@dataclass
class Grid:
    lengths: list[int]
    depths: list[float]  # percent

    @classmethod
    def default(cls, window: int, n_lengths: int = 20, n_depths: int = 10, shortest: int = 1000) -> "Grid":
        lengths = np.round(np.linspace(shortest, window, n_lengths)).astype(int).tolist()
        return cls(sorted(set(lengths)), np.round(np.linspace(0, 100, n_depths)).tolist())

    @classmethod
    def parse(cls, text: str, window: int) -> "Grid":
        """``lengths=1000,2000,depths=0,50,100`` (either part may be left out: the default's)."""
        parts = dict(re.findall(r"(lengths|depths)=([^=]*?)(?=[,;]\s*(?:lengths|depths)=|$)", text.strip()))
        rest = re.sub(r"(lengths|depths)=([^=]*?)(?=[,;]\s*(?:lengths|depths)=|$)", "", text.strip()).strip(",; ")
        if not parts or rest:
            raise CompressKVError(f"--grid '{text}' is not 'lengths=N,N,...,depths=P,P,...' (tokens; percent 0-100)")
        grid = cls.default(window)
        try:
            if "lengths" in parts:
                grid.lengths = [int(x) for x in parts["lengths"].split(",") if x.strip()]
            if "depths" in parts:
                grid.depths = [float(x) for x in parts["depths"].split(",") if x.strip()]
        except ValueError:
            raise CompressKVError(f"--grid '{text}': lengths are whole token counts, depths percentages") from None
        if not grid.lengths or not grid.depths or any(not 0 <= d <= 100 for d in grid.depths):
            raise CompressKVError(f"--grid '{text}': give at least one length and depths within 0-100")
        return grid


def read_haystacks(path: str | None) -> tuple[list[str], str]:
    """Three haystack texts (one per needle) and a description of where they came from."""
    from kvbench.io import load_texts
    from kvbench.tasks.niah import FILLER
    if path is None:
        return [FILLER * 200] * 3, "built-in filler (kvbench niah)"
    root = Path(path).expanduser()
    if root.is_dir() and all((root / f"part{i}").is_dir() for i in (1, 2, 3)):
        return [load_texts(root / f"part{i}") for i in (1, 2, 3)], f"{root.name}/part1..3"
    if root.is_dir():
        files = sorted(f for f in root.rglob("*") if f.suffix in (".txt", ".md") and f.is_file())
        if len(files) >= 3:
            groups = [files[i::3] for i in range(3)]
            return ["\n\n".join(f.read_text(errors="replace") for f in g) for g in groups], \
                f"{root.name} ({len(files)} files dealt into 3)"
    text = load_texts(root)  # one file (or a directory of fewer than 3): its thirds
    third = len(text) // 3
    return [text[i * third:(i + 1) * third] for i in range(3)], f"{root.name} (thirds)"


def find_span(prompt: list[int], needle: list[int]) -> tuple[int, int] | None:
    """The first window of the prompt holding over 90% of the needle's distinct tokens (official rule)."""
    want = set(needle)
    for i in range(len(prompt)):
        if len(want & set(prompt[i:i + len(needle)])) / len(want) > 0.9:
            return i, i + len(needle)
    return None


def build_test(tok, hay: list[int], pair: tuple[str, str, str], length: int, depth: float, buffer: int):
    """Prompt ids and needle-answer span of one test (the official insert_needle on token ids)."""
    needle, question, answer = pair
    needle_ids = tok.encode(needle, add_special_tokens=False)
    room = length - buffer
    ctx = hay[:length]
    if len(ctx) + len(needle_ids) > room:
        ctx = ctx[:max(room - len(needle_ids), 0)]
    if depth >= 100:
        ids = ctx + needle_ids
    else:
        at = int(len(ctx) * depth / 100)
        periods = set(tok.encode(".", add_special_tokens=False))
        while at > 0 and ctx[at - 1] not in periods:
            at -= 1
        ids = ctx[:at] + needle_ids + ctx[at:]
    prompt = tok.encode(tok.decode(ids) + QUESTION.format(question=question))
    return prompt, find_span(prompt, tok.encode(answer, add_special_tokens=False))


@dataclass
class NeedleProbe(Method):
    """Keeps the full cache; at each decoding step records every (layer, query head)'s attention mass on a
    span of positions: ``mass[layer]`` [Hq]."""

    span: tuple[int, int] | None = None
    mass: dict = field(default_factory=dict)

    def on_decode(self, call) -> None:
        if self.span is None:
            return
        store = call.store
        s0, s1 = self.span
        slots = store.start[:, None] + torch.arange(s0, s1, device=store.start.device)[None, :]  # [H, n]
        if not bool((store.pos[slots] == torch.arange(s0, s1, device=slots.device, dtype=store.pos.dtype)).all()):
            raise RuntimeError("the needle probe needs a full cache in position order")
        H, Hq = store.H, call.queries.shape[1]
        q = call.queries[0, :, -1].float().view(H, Hq // H, -1)
        lse = call.lse[0, :, -1].float().view(H, Hq // H, 1)
        logits = torch.einsum("hgd,hnd->hgn", q, store.k[slots].float()) * call.scale
        self.mass[call.layer] = torch.exp(logits - lse).sum(-1).reshape(Hq).cpu()


@dataclass
class LayerErrorProbe(Method):
    """Keeps (and attends with) the full cache; marks the slots CompressKV would drop at ``probe_budget`` and
    sums, per layer and decoding step, the relative Frobenius error of the attention output after o_proj over
    the selection against the full one."""

    heads: list = field(default_factory=list)
    window: int = 8
    kernel: int = 5
    pooling: str = "avg"
    probe_budget: int = 32
    errors: list = field(default_factory=list)

    def prepare(self, lm) -> None:
        layers = getattr(getattr(lm.model, "model", None), "layers", None)
        if layers is None or not all(hasattr(getattr(l, "self_attn", None), "o_proj") for l in layers):
            raise CompressKVError(f"{lm.name}: layer errors need the decoder layers' self_attn.o_proj, not found")
        self.o_proj = [l.self_attn.o_proj for l in layers]
        self.errors = [0.0] * len(layers)

    def compress(self, call) -> None:
        if not call.final:
            return
        store = call.store
        dropped = torch.zeros(store.k.shape[0], dtype=torch.float32, device=store.k.device)
        if int(store.length.max()) > self.probe_budget:
            scores = selection_scores(call, self.heads[call.layer], self.window, self.kernel, self.pooling)
            vals, idx = segment_view(store, scores)
            kept = torch.gather(idx, 1, torch.topk(vals, self.probe_budget, dim=1).indices)
            dropped[idx[store.slot_index()[1]]] = 1.0
            dropped[kept.reshape(-1)] = 0.0
        store.extra["dropped"] = dropped  # decoding appends zeros: new tokens are kept

    def on_decode(self, call) -> None:
        store = call.store
        if "dropped" not in store.extra:
            return
        idx, _ = store.slot_index()  # one sequence: every head holds the same count
        H, Hq = store.H, call.queries.shape[1]
        q = call.queries[0, :, -1].float().view(H, Hq // H, -1)
        k, v = store.k[idx].float(), store.v[idx].float()  # [H, N, D]
        s = torch.einsum("hgd,hnd->hgn", q, k) * call.scale
        dropped = store.extra["dropped"][idx].bool()[:, None, :]
        full = torch.einsum("hgn,hnd->hgd", torch.softmax(s, -1), v)
        sel = torch.einsum("hgn,hnd->hgd", torch.softmax(s.masked_fill(dropped, float("-inf")), -1), v)
        proj = self.o_proj[call.layer]
        a_full = proj(full.reshape(1, -1).to(proj.weight.dtype)).float()
        a_sel = proj(sel.reshape(1, -1).to(proj.weight.dtype)).float()
        self.errors[call.layer] += float(torch.linalg.norm(a_sel - a_full) / (torch.linalg.norm(a_full) + 1e-5))


class Progress:
    """Finished tests, appended as JSON lines next to the artifact; a rerun with the same header resumes."""

    def __init__(self, out: Path, header: dict):
        self.path = out.with_name(f".{out.name}.progress.jsonl")
        # read_jsonl trims a last line cut by a kill and refuses (file and line) a corrupt one in the middle
        records = results.read_jsonl(self.path, repair=True) if self.path.exists() else []
        self.done: dict[str, dict] = {}
        if records and records[0] == header:
            self.done = {rec["key"]: rec for rec in records[1:]}
        else:  # new, or made for another grid or model: start over
            self.path.parent.mkdir(parents=True, exist_ok=True)
            results.write_text(self.path, json.dumps(header) + "\n")

    def add(self, rec: dict) -> None:
        self.done[rec["key"]] = rec
        results.append_jsonl(self.path, rec)

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)


def _greedy(engine, cache, first: int, max_new: int, on_step=None) -> list[int]:
    """Feed ``first`` and decode greedily; ``on_step(token)`` after each step's forward (its probes filled)."""
    tok, out = first, []
    for _ in range(max_new):
        logits = engine.forward(cache, torch.tensor([[tok]], device=engine.device), compress=False)
        tok = int(logits[0, -1].argmax())
        if on_step is not None:
            on_step(tok)
        if tok in engine.eos:
            break
        out.append(tok)
        if "\n" in engine.tok.decode(out).lstrip():  # the answer's first line (leading newlines skipped)
            break
    return out


def score_test(engine, probe: NeedleProbe, ids: list[int], span: tuple[int, int], max_new: int):
    """Greedy answer to one needle prompt and its head scores [layers, query heads]: at each step, for every
    needle-span position holding the predicted token, each head's attention mass on the span."""
    cfg = engine.model.config
    score = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads, dtype=torch.float64)
    needle_ids = ids[span[0]:span[1]]
    probe.span, probe.mass = span, {}
    cache = engine.new_cache(1)
    engine.feed(cache, ids[:-1], compress=False)

    def credit(token: int) -> None:
        hits = needle_ids.count(token)
        if hits:
            score.add_(hits * torch.stack([probe.mass[l] for l in range(cfg.num_hidden_layers)]).double())

    tokens = _greedy(engine, cache, ids[-1], max_new, credit)
    probe.span = None
    return tokens, score


def rank_heads(scores: torch.Tensor) -> list[list[int]]:
    """Query heads of each layer, best first (ties: lower head number)."""
    L, Hq = scores.shape
    return [sorted(range(Hq), key=lambda h: (-float(scores[l, h]), h)) for l in range(L)]


def head_scores(lm, grid: Grid, haystacks: list[str], progress: Progress, prefill_chunk, log) -> dict:
    from kvbench.engine import Engine
    from kvbench.tasks.metrics import rouge1_recall
    probe = NeedleProbe(budget=1.0)
    engine = Engine(lm, probe, prefill_chunk=prefill_chunk)
    tok = lm.tokenizer
    longest = max(grid.lengths)
    tests, counted = [], []
    for n, pair in enumerate(NEEDLES):
        hay = tok.encode(haystacks[n], add_special_tokens=False)
        if not hay:
            raise CompressKVError(f"haystack {n + 1} is empty")
        hay = (hay * (longest // len(hay) + 1))[:longest]  # repeated until long enough (official)
        for length in grid.lengths:
            for depth in grid.depths:
                key = f"{n}/{length}/{depth:g}"
                rec = progress.done.get(key)
                if rec is None:
                    t0 = time.perf_counter()
                    ids, span = build_test(tok, hay, pair, length, depth, SETTINGS["buffer"])
                    rec = {"key": key, "needle": n, "length": length, "depth": depth, "tokens": len(ids)}
                    if span is None:
                        rec.update(recall=0.0, counted=False, skipped="needle answer not found in the prompt")
                    else:
                        tokens, score = score_test(engine, probe, ids, span, SETTINGS["max_new_tokens"])
                        answer = tok.decode(tokens, skip_special_tokens=True).strip()
                        recall = 100.0 * rouge1_recall(answer, pair[2])
                        rec.update(recall=recall, counted=recall > SETTINGS["recall_threshold"], answer=answer[:200])
                        if rec["counted"]:
                            rec["score"] = score.tolist()
                    rec["seconds"] = round(time.perf_counter() - t0, 3)
                    progress.add(rec)
                    log(f"needle {n + 1} length {length} depth {depth:g}: recall {rec['recall']:.0f}"
                        f"{' (counted)' if rec['counted'] else ''} [{rec['seconds']:.1f}s]")
                tests.append(rec)
                if rec["counted"]:
                    counted.append(torch.tensor(rec["score"], dtype=torch.float64))
    if not counted:
        raise CompressKVError("no needle test was answered (ROUGE-1 recall > 50), so no head has a score: try shorter "
                              "lengths (--grid lengths=...) or a real haystack (--haystack DIR)")
    scores = torch.stack(counted).mean(0)  # [L, Hq]
    return {"scores": scores, "ranking": rank_heads(scores), "tests": tests, "counted": len(counted)}


def layer_prompts(lm, tests: list[dict], grid: Grid, haystacks: list[str], longbench: str | None,
                  n_samples: int) -> list[tuple[str, list[int], int]]:
    """(group, prompt ids, new tokens) for the layer errors."""
    tok = lm.tokenizer
    if longbench:
        from kvbench.task import TaskContext
        from kvbench.tasks.longbench import LongBench
        task = LongBench()
        samples = task.samples(tok, TaskContext(max_context_tokens=lm.window - 512, data=longbench, limit=n_samples))
        return [(s.meta["dataset"], s.context_ids + s.question_ids, s.max_new_tokens) for s in samples]
    picks = sorted({int(i) for i in np.round(np.linspace(0, len(tests) - 1, min(n_samples, len(tests))))})
    out = []
    longest = max(grid.lengths)
    for i in picks:
        t = tests[i]
        hay = tok.encode(haystacks[t["needle"]], add_special_tokens=False)
        hay = (hay * (longest // len(hay) + 1))[:longest]
        ids, _ = build_test(tok, hay, NEEDLES[t["needle"]], t["length"], t["depth"], SETTINGS["buffer"])
        out.append(("niah", ids, SETTINGS["max_new_tokens"]))
    return out


def layer_errors(lm, ranking: list[list[int]], prompts, prefill_chunk, log) -> dict[str, list[float]]:
    from kvbench.engine import Engine
    heads = [torch.tensor(r[: SETTINGS["first_k"]]) for r in ranking]
    probe = LayerErrorProbe(budget=1.0, heads=heads, window=SETTINGS["window"], kernel=SETTINGS["kernel"],
                            pooling=SETTINGS["pooling"], probe_budget=SETTINGS["probe_budget"])
    engine = Engine(lm, probe, prefill_chunk=prefill_chunk)
    by_group: dict[str, np.ndarray] = {}
    for i, (group, ids, new) in enumerate(prompts):
        t0 = time.perf_counter()
        probe.errors = [0.0] * len(probe.errors)
        cache = engine.new_cache(1)
        logits = engine.feed(cache, ids, compress=True)
        first = int(logits[0, -1].argmax())
        if first not in engine.eos:
            _greedy(engine, cache, first, new - 1)
        by_group[group] = by_group.get(group, 0) + np.array(probe.errors)
        log(f"layer errors {i + 1}/{len(prompts)} ({group}, {len(ids)} tokens) [{time.perf_counter() - t0:.1f}s]")
        del cache
    return {g: (e / e.sum()).tolist() if e.sum() > 0 else None for g, e in by_group.items()}


def calibrate(model: str, out: str, grid: str | None = None, haystack: str | None = None,
              longbench: str | None = None, layer_samples: int = 8, device: str = "auto", dtype: str = "auto",
              prefill_chunk: int | None = None, trust_remote_code: bool = False, log=print) -> Path:
    """Make a CompressKV artifact for ``model`` at ``out``; returns its directory."""
    from kvbench import models
    from kvbench.engine import resolve_device, resolve_dtype
    if layer_samples < 1:
        raise CompressKVError("--layer-samples must be at least 1")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise CompressKVError("--prefill-chunk must be at least 1")
    if haystack is not None and not Path(haystack).expanduser().exists():
        raise CompressKVError(f"no haystack at {haystack}: pass a directory of .txt files (or part1..3 folders)")
    if longbench is not None and not Path(longbench).expanduser().exists():
        raise CompressKVError(f"no LongBench data at {longbench}: pass a directory of <task>.jsonl files")
    if grid:
        Grid.parse(grid, 1 << 30)  # the syntax, before the model loads (lengths are checked against its window below)
    dev = resolve_device(device)
    lm = models.load(model, resolve_dtype(dtype, dev), dev, trust_remote_code=trust_remote_code)
    return calibrate_model(lm, out, grid, haystack, longbench, layer_samples, prefill_chunk, log)


def progress_header(identity: dict, g: "Grid", texts: list[str], source: str) -> dict:
    """What a progress file must match to be resumed: the model, the grid, the settings and the haystacks' text
    (its sha256: ``source`` names only the folder, and another folder of that name is other text)."""
    import hashlib
    digest = hashlib.sha256("\0".join(texts).encode("utf-8", errors="replace")).hexdigest()
    return {"identity": identity, "grid": [g.lengths, g.depths], "haystack": source, "haystack_sha256": digest,
            "settings": SETTINGS}


def calibrate_model(lm, out: str, grid: str | None = None, haystack: str | None = None, longbench: str | None = None,
                    layer_samples: int = 8, prefill_chunk: int | None = None, log=print) -> Path:
    """``calibrate`` on a loaded model."""
    from kvbench.harness import git_commit
    g = Grid.parse(grid, lm.window) if grid else Grid.default(lm.window)
    too_long = [n for n in g.lengths if n > lm.window]
    too_short = [n for n in g.lengths if n < SETTINGS["buffer"] + 64]
    if too_long or too_short:
        raise CompressKVError(f"grid lengths must lie in [{SETTINGS['buffer'] + 64}, {lm.window}] (the model's window) "
                              f"for {lm.name}; got {', '.join(map(str, too_long + too_short))}")
    texts, source = read_haystacks(haystack)
    identity = artifacts.model_identity(lm)
    out_dir = Path(out).expanduser()
    header = progress_header(identity, g, texts, source)
    progress = Progress(out_dir, header)
    log(f"compresskv calibration of {lm.name}: {len(NEEDLES)} needles x {len(g.lengths)} lengths x "
        f"{len(g.depths)} depths, haystack {source}"
        + (f", resuming {len(progress.done)} done" if progress.done else ""))
    t0 = time.perf_counter()
    heads = head_scores(lm, g, texts, progress, prefill_chunk, log)
    t_heads = time.perf_counter() - t0
    prompts = layer_prompts(lm, heads["tests"], g, texts, longbench, layer_samples)
    t1 = time.perf_counter()
    groups = layer_errors(lm, heads["ranking"], prompts, prefill_chunk, log)
    valid = [v for v in groups.values() if v is not None]
    layer_scores = (np.mean(valid, axis=0) / np.sum(np.mean(valid, axis=0))).tolist() if valid else None
    t_layers = time.perf_counter() - t1
    meta = {
        "settings": SETTINGS,
        "grid": {"needles": len(NEEDLES), "lengths": g.lengths, "depths": g.depths,
                 "default": grid is None},
        "haystack": source,
        "counted_tests": heads["counted"],
        "tests": [{k: r[k] for k in ("needle", "length", "depth", "tokens", "recall", "counted")}
                  for r in heads["tests"]],
        "head_ranking": heads["ranking"],
        "head_scores": [[round(float(x), 6) for x in row] for row in heads["scores"]],
        "layer_data": (f"longbench:{Path(longbench).name} ({layer_samples} per task)" if longbench
                       else f"niah grid prompts ({len(prompts)})"),
        "layer_scores_by_data": groups,
        "layer_scores": layer_scores,
        "seconds": {"head_scores": round(t_heads, 1), "layer_errors": round(t_layers, 1)},
        "device": str(lm.model.device), "dtype": str(next(lm.model.parameters()).dtype),
        "commit": git_commit(),
    }
    if layer_scores is None:
        log("no prompt was longer than the probe budget: no layer scores (the artifact runs with -m uniform=true)")
    path = artifacts.save(out_dir, NAME, identity, meta)
    progress.finish()
    log(f"counted tests: {heads['counted']}/{len(heads['tests'])}; head scores {t_heads:.0f}s, layer errors "
        f"{t_layers:.0f}s")
    return path


# ---- the command line: `kvbench calibrate compresskv` (declared in the method's artifact_commands) ----


@click.command("compresskv")
@click.option("--model", required=True, help="HF id, local dir, .gguf file or alias")
@click.option("--out", required=True, help="artifact directory (use it with `kvbench run --method compresskv --artifact DIR`)")
@click.option("--grid", default=None,
              help="lengths=N,N,...,depths=P,P,... (tokens; percent). Default: 20 lengths from 1000 to the window x 10 depths")
@click.option("--haystack", default=None, help="haystack texts: a directory of .txt files (or part1..3 folders), or a file")
@click.option("--longbench", default=None, help="LongBench <task>.jsonl directory for the layer errors (default: needle prompts)")
@click.option("--layer-samples", type=int, default=8, show_default=True, help="layer-error prompts (per LongBench task)")
@click.option("--prefill-chunk", type=int, default=None, help="prefill N tokens at a time (bounds memory)")
@click.option("--trust-remote-code", is_flag=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
def command(model, out, grid, haystack, longbench, layer_samples, prefill_chunk, trust_remote_code,
            device, dtype):
    """CompressKV: semantic-retrieval-head scores (needle tests) and error-aware layer scores."""
    try:
        path = calibrate(model, out, grid=grid, haystack=haystack, longbench=longbench,
                                    layer_samples=layer_samples, device=device, dtype=dtype, prefill_chunk=prefill_chunk,
                                    trust_remote_code=trust_remote_code, log=click.echo)
    except user_errors() as e:
        fail(str(e))
    click.echo(f"artifact: {path}")
