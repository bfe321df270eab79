"""``compresskv``: tokens chosen by a layer's semantic retrieval heads, under error-aware layer budgets.

Paper: "CompressKV: Semantic Retrieval Heads Know What Tokens are Not Important Before Generation"
(arXiv 2508.02401). Reference code: github.com/TUDa-HWAI/CompressKV: ``methods/compresskv/snapkv_utils.py``
(selection), ``longbench/pred_compresskv.py`` (``error_aware_layer_budget_allocation``),
``Retrieval_Head_Identification/semantic_retrieval_head_detection.py`` (head scores) and
``longbench/model/modeling_llama_new.py`` + ``pred_get_importance_score.py`` (layer errors); the last two
are redone in ``calibrate.py``.

At prefill, each layer ranks the context by the attention of its last ``window`` queries, taken only from
the layer's ``first_k`` best semantic retrieval heads (SRH, query heads ranked per layer by calibration):
each chosen head's window rows attend to its KV group's keys (causal inside the window, softmax in fp32),
are summed over the window, average-pooled (``kernel``), and the chosen heads are averaged: one ranking per
layer, shared by all its KV heads. The layer keeps its top (layer budget - window) tokens plus the window;
decoding appends. Layer budgets come from calibrated layer errors: layer l gets
32 + round(score_l * (total - 32 * layers)), clipped to [32, 3 * budget], then +-1 on the most (or least)
important layers until the total is exact. A layer whose context fits its budget is left alone.

Calibration comes from ``artifact`` (``kvbench calibrate compresskv``; refused for another model) or from the
official repository's published files: ``head_idx`` (``scores/<model>_head_idx.json``: per layer, query heads
best first) and ``layer_scores`` (``scores/<model>_layer_score.jsonl``: JSON objects {dataset: [score per
layer]}; ``layer_score_key`` picks one, "avg_score" as the official script). With no layer scores, budgets
are uniform only when asked (``uniform=true``); without head rankings nothing runs.

Choices the paper and code leave open: kvbench's budget is tokens per KV head per layer (or a fraction of the
context), so the total is budget x layers as in the official script; when the per-layer budget is under 32
the floor drops to the budget (the official floor of 32 would keep more than asked); with chunked prefill each
chunk's own last queries are the window (the official code compresses one whole prompt); the pooled scores
skip the window exactly as the official pooling over the prefix only (the window scores count as padding).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kvbench import artifact as artifacts
from kvbench.artifact import ArtifactError
from kvbench.cache import LayerCall, ints_on
from kvbench.kernels.window_scores import window_scores
from kvbench.method import KEEP_ALWAYS, ScoredEviction, in_range

NAME = "compresskv"


class CompressKVError(ArtifactError):
    """A missing, malformed or mismatched CompressKV calibration (the message says what to do)."""


def allocate_layer_budgets(importance, total: int, min_tokens: int, max_tokens: int) -> list[int]:
    """Error-aware layer budgets as the official ``error_aware_layer_budget_allocation``: the floor for every
    layer, the rest shared by ``importance`` (sums to 1) with round-half-even, clipped, then +-1 one at a time
    on the most important layers (short) or the least important (over) until the sum is ``total`` or no layer
    can move."""
    imp = np.asarray(importance, dtype=np.float64)
    n = len(imp)
    budgets = np.clip(min_tokens + np.round(imp * (total - min_tokens * n)), min_tokens, max_tokens)
    diff = int(total - budgets.sum())
    while diff != 0:
        grow = diff > 0
        movable = np.where(budgets < max_tokens)[0] if grow else np.where(budgets > min_tokens)[0]
        if len(movable) == 0:
            break
        for i in movable[np.argsort(-imp[movable] if grow else imp[movable], kind="stable")]:
            budgets[i] += 1 if grow else -1
            diff += -1 if grow else 1
            if diff == 0:
                break
    return budgets.astype(int).tolist()


def _json_objects(text: str) -> list:
    """Every JSON value in ``text``: one per line (JSONL) or several pretty-printed one after another."""
    decoder, at, out = json.JSONDecoder(), 0, []
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at >= len(text):
            return out
        value, at = decoder.raw_decode(text, at)
        out.append(value)


def read_official_head_ranking(path: str | Path) -> list[list[int]]:
    """The official ``<model>_head_idx.json``: {"0": [query heads of layer 0, best first], "1": ...}."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise CompressKVError(f"no head-index file at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompressKVError(f"{path} is not valid JSON ({e}); expected the official {{layer: [heads]}} "
                              "file") from None
    if not isinstance(data, dict) or sorted(data, key=lambda k: int(k) if str(k).isdigit() else -1) != [
            str(i) for i in range(len(data))]:
        raise CompressKVError(f"{path}: expected an object with keys \"0\"..\"L-1\" (one per layer), "
                              "as the official scores/<model>_head_idx.json")
    return [_check_ranking(data[str(i)], f"{path}: layer {i}") for i in range(len(data))]


def _check_ranking(heads, where: str) -> list[int]:
    if (not isinstance(heads, list) or not heads or not all(isinstance(h, int) and h >= 0 for h in heads)
            or len(set(heads)) != len(heads)):
        raise CompressKVError(f"{where}: expected a list of distinct query-head numbers, best first")
    return heads


def read_official_layer_scores(path: str | Path, key: str = "avg_score") -> list[float]:
    """One list of per-layer error scores from the official ``<model>_layer_score.jsonl`` (JSON objects
    {dataset: [score per layer]}, several lines or pretty-printed), normalised to sum 1."""
    p = Path(path).expanduser()
    try:
        objects = _json_objects(p.read_text())
    except FileNotFoundError:
        raise CompressKVError(f"no layer-score file at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompressKVError(f"{path} is not JSON lines ({e}); expected the official layer_score file") from None
    merged: dict = {}
    for obj in objects:
        if not isinstance(obj, dict):
            raise CompressKVError(f"{path}: expected JSON objects {{dataset: [score per layer]}}")
        merged.update(obj)
    if key not in merged:
        raise CompressKVError(f"{path} has no '{key}' scores (it has: {', '.join(merged) or 'none'}); "
                              "pick one with -m layer_score_key=NAME")
    return _check_layer_scores(merged[key], f"{path}: '{key}'")


def _check_layer_scores(scores, where: str) -> list[float]:
    if (not isinstance(scores, list) or not scores
            or not all(isinstance(s, (int, float)) and np.isfinite(s) and s >= 0 for s in scores) or sum(scores) <= 0):
        raise CompressKVError(f"{where}: expected a list of non-negative layer scores with a positive sum")
    total = float(sum(scores))
    return [float(s) / total for s in scores]


def selection_scores(call: LayerCall, heads: torch.Tensor, window: int, kernel: int, pooling: str = "avg"):
    """[S] CompressKV's ranking of this layer's slots, the same for every KV head of a sequence: the window's
    attention from the chosen query ``heads`` (summed over the window rows, pooled over the context before
    the window, averaged over the heads); the window's own slots score ``KEEP_ALWAYS``."""
    store = call.store
    B, H = store.B, store.H
    Hq = call.queries.shape[1]
    G = Hq // H
    w = min(window, call.queries.shape[2])
    per_head = window_scores(call.queries[:, :, -w:], call.positions[:, -w:], store.k, store.pos, store.start,
                             store.length, call.scale, reduce="none")  # [S, G]
    host = getattr(store, "host_length", None)  # known on the host in a prefill: then nothing here waits for the GPU
    idx, valid = store.slot_index(None if host is None else max(host, default=0))  # [B*H, L]
    if host is not None:
        same = all(len(set(host[b * H:(b + 1) * H])) == 1 for b in range(B))
    else:
        lengths = store.length.view(B, H)
        same = not bool((lengths != lengths[:, :1]).any())
    if not same:
        raise RuntimeError("compresskv expects every KV head of a layer to hold the same tokens")
    L = idx.shape[1]
    per_query_head = per_head[idx].view(B, H, L, G).permute(0, 1, 3, 2).reshape(B, Hq, L)
    chosen = per_query_head[:, heads]  # [B, first_k, L]
    ok = valid.view(B, H, L)[:, 0]
    pos = store.pos[idx].view(B, H, L)[:, 0].long()
    in_window = ok & (pos > call.positions[:, -1:].long() - w)
    chosen = chosen.masked_fill((in_window | ~ok)[:, None], 0.0)
    if kernel > 1:  # pooled per head, then averaged over the heads (the reference's order)
        pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
        chosen = pool(chosen, kernel_size=kernel, stride=1, padding=kernel // 2)[:, :, :L]
    layer = chosen.mean(dim=1)  # [B, L]
    layer = torch.where(in_window, torch.full_like(layer, KEEP_ALWAYS), layer)
    layer = torch.where(ok, layer, torch.full_like(layer, float("-inf")))
    # back per slot with fixed shapes (a boolean index would read its count back): padding goes to a spare slot
    out = torch.full((store.k.shape[0] + 1,), float("-inf"), dtype=torch.float32, device=store.k.device)
    out[torch.where(valid, idx, torch.full_like(idx, store.k.shape[0]))] = \
        layer[:, None, :].expand(B, H, L).reshape(B * H, L)
    return out[:-1]


@dataclass
class CompressKV(ScoredEviction):
    artifact_commands: ClassVar[dict[str, str]] = {"calibrate": "kvbench.methods.compresskv.calibrate:command"}

    window: int = field(default=8, metadata=in_range(1))
    kernel: int = field(default=5, metadata=in_range(1))
    pooling: str = "avg"
    first_k: int = field(default=4, metadata=in_range(1))
    artifact: str | None = None  # a `kvbench calibrate compresskv` directory
    head_idx: str | None = None  # the official scores/<model>_head_idx.json
    layer_scores: str | None = None  # the official scores/<model>_layer_score.jsonl
    layer_score_key: str = "avg_score"
    uniform: bool = False  # uniform layer budgets (needed explicitly when the calibration has no layer scores)
    min_layer_tokens: int = 32
    max_layer_factor: float = 3.0

    def __post_init__(self):
        if self.window < 1 or self.kernel < 1 or self.first_k < 1:
            raise CompressKVError("compresskv needs window >= 1, kernel >= 1 and first_k >= 1")
        if self.pooling not in ("avg", "max"):
            raise CompressKVError(f"compresskv pooling must be 'avg' or 'max', got '{self.pooling}'")
        if isinstance(self.budget, int) and self.budget <= self.window:
            raise CompressKVError(f"compresskv budget {self.budget} leaves no room beside its window of "
                                  f"{self.window} tokens: give a budget above {self.window}")
        self._meta, self._heads, self._scores = self._read_calibration()
        self._budgets: dict[tuple[int, int], list[int]] = {}

    def _read_calibration(self):
        if self.artifact and (self.head_idx or self.layer_scores):
            raise CompressKVError("give either artifact=DIR or the official head_idx/layer_scores files, not both")
        if self.artifact:
            meta = artifacts.read_meta(self.artifact, NAME)
            heads = meta.get("head_ranking")
            if not isinstance(heads, list) or not heads:
                raise CompressKVError(f"{self.artifact} has no head_ranking; make it again with "
                                      "`kvbench calibrate compresskv`")
            heads = [_check_ranking(h, f"{self.artifact}: layer {i}") for i, h in enumerate(heads)]
            scores = meta.get("layer_scores")
            scores = None if scores is None else _check_layer_scores(scores, f"{self.artifact}: layer_scores")
        elif self.head_idx:
            meta, heads = None, read_official_head_ranking(self.head_idx)
            scores = read_official_layer_scores(self.layer_scores, self.layer_score_key) if self.layer_scores else None
        else:
            if self.layer_scores:
                raise CompressKVError("layer_scores alone is not enough: compresskv also needs the head ranking "
                                      "(-m head_idx=FILE.json, or --artifact DIR)")
            raise CompressKVError("compresskv needs its calibration: --artifact DIR (make one with `kvbench calibrate "
                                  "compresskv --model M --out DIR`) or the official files (-m head_idx=FILE.json "
                                  "-m layer_scores=FILE.jsonl)")
        if scores is None and not self.uniform:
            raise CompressKVError(f"{self.artifact or self.layer_scores or self.head_idx}: no layer scores, so no "
                                  "error-aware budgets; pass -m uniform=true to run with uniform layer budgets")
        if scores is not None and len(scores) != len(heads):
            raise CompressKVError(f"the calibration ranks heads of {len(heads)} layers but scores {len(scores)} layers")
        if any(len(h) < self.first_k for h in heads):
            raise CompressKVError(f"first_k={self.first_k} but the calibration ranks only "
                                  f"{min(len(h) for h in heads)} heads in some layer")
        return meta, heads, scores

    def artifact_paths(self) -> list[str]:
        """The calibration read, whichever form: the artifact or the official files (their bytes go into the
        run's id, so files replaced at the same paths never resume a run made with the old ones)."""
        return [str(p) for p in (self.artifact, self.head_idx, self.layer_scores) if p]

    def prepare(self, lm) -> None:
        cfg = lm.model.config
        where = self.artifact or self.head_idx
        if len(self._heads) != cfg.num_hidden_layers or any(max(h) >= cfg.num_attention_heads for h in self._heads):
            raise CompressKVError(
                f"compresskv calibration {where} is for {len(self._heads)} layers x {max(map(max, self._heads)) + 1}+ "
                f"query heads; {lm.name} has {cfg.num_hidden_layers} x {cfg.num_attention_heads}: "
                f"calibrate this model with `kvbench calibrate compresskv --model {lm.name}`")
        if self._meta is not None:
            artifacts.check_model(self._meta, lm, self.artifact)
        device = next(lm.model.parameters()).device  # there once, not copied over at every layer's selection
        self._head_tensors = [torch.tensor(h[: self.first_k], device=device) for h in self._heads]

    def layer_budgets(self, per_layer: int, n_layers: int) -> list[int]:
        """Tokens per KV head of each layer for an average of ``per_layer``."""
        key = (per_layer, n_layers)
        if key not in self._budgets:
            if self.uniform or self._scores is None:
                self._budgets[key] = [per_layer] * n_layers
            else:
                floor = min(self.min_layer_tokens, per_layer)
                cap = max(int(self.max_layer_factor * per_layer), floor)
                self._budgets[key] = allocate_layer_budgets(self._scores, per_layer * n_layers, floor, cap)
        return self._budgets[key]

    def layer_target(self, call: LayerCall, target: torch.Tensor) -> torch.Tensor:
        return ints_on(self.host_layer_target(call, target.tolist()), target.device)

    def host_layer_target(self, call: LayerCall, per_seq: list[int]) -> list[int]:
        # A token budget is shared out as given (``per_seq`` is already cut to the prompt): a layer is then left
        # alone when the prompt fits its own budget, as the official code does.
        per_seq = [self.budget] * len(per_seq) if isinstance(self.budget, int) else per_seq
        return [min(self.layer_budgets(int(t), call.n_layers)[call.layer], seen)
                for t, seen in zip(per_seq, call.cache.seen_host)]

    def score(self, call: LayerCall) -> torch.Tensor:
        heads = getattr(self, "_head_tensors", None)
        if heads is None:
            raise RuntimeError("compresskv.prepare(lm) was not called")
        return selection_scores(call, heads[call.layer], self.window, self.kernel, self.pooling)
