"""Parity: every eviction method keeps the positions its reference code keeps.

The fixtures (tests/fixtures/parity/, recorded once by its ``record.py`` from kvpress 0.5.5 and from the
official codes' rules) hold, for a tiny Llama with fixed weights and fixed contexts of 96 and 127 tokens,
the kept positions per (layer, KV head) after a query-agnostic prefill at kept fractions 0.25 and 0.5.
Here kvbench runs the same model (CPU, float32) and must keep exactly the same sets.

``python tests/kvbench/test_parity.py`` prints the table of results/parity/README.md (``--lenient`` drops
parameters a method does not have, to measure code older than them).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from functools import lru_cache

import pytest
import torch

from kvbench import attention, registry
from kvbench.models import LoadedModel
from kvbench.engine import Engine
from kvbench.task import Sample

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "parity"  # also run as a script


@lru_cache(maxsize=1)
def fixture() -> dict:
    return json.loads((FIXTURES / "kept.json").read_text())


@lru_cache(maxsize=1)
def parity_model() -> LoadedModel:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    attention.register()
    cfg = json.loads((FIXTURES / "model.json").read_text())
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention.NAME, dtype=torch.float32)
    state = {k: v.float() for k, v in load_file(str(FIXTURES / "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    model.generation_config.eos_token_id = None
    return LoadedModel(model.eval(), None, "parity-tiny-llama", cfg["max_position_embeddings"])


def build(name: str, budget: float, params: dict, lenient: bool = False):
    params = dict(params)
    scorer = params.pop("scorer", None)
    if lenient:
        import dataclasses
        fields = {f.name for f in dataclasses.fields(registry.load(registry.METHODS, "method", name))}
        params = {k: v for k, v in params.items() if k in fields}
    method = registry.build_method(name, budget, params)
    if scorer is not None:
        scorer = dict(scorer)
        method.scorer = build(scorer.pop("name"), budget, scorer, lenient)
    return method


def kvbench_kept(case: dict, lenient: bool = False) -> list[list[list[int]]]:
    lm = parity_model()
    ids = fixture()["contexts"][str(case["context"])]
    engine = Engine(lm, build(case["method"], case["budget"], case["params"], lenient))
    cache, _, _ = engine.prefill(Sample("parity", ids, [], [], 0))
    kept = []
    for store in cache.stores:
        idx, valid = store.slot_index()
        kept.append([sorted(store.pos[idx[s][valid[s]]].tolist()) for s in range(store.B * store.H)])
    return kept


def case_id(case: dict) -> str:
    ref = case["reference"].split()[0]
    params = ",".join(f"{k}={v}" for k, v in case["params"].items() if k != "scorer")
    if "scorer" in case["params"]:
        params += ",scorer=" + "/".join(f"{k}={v}" for k, v in case["params"]["scorer"].items())
    return f"{case['method']}[{ref}|{params}]T{case['context']}b{case['budget']}"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread is an order of magnitude faster on a busy machine (the kept
    sets are the same with any count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scores_seen(monkeypatch) -> list[dict[int, dict[int, float]]]:
    """Every ``keep_top`` call's scores, per segment: {position: score} (one call a layer for these prompts)."""
    from kvbench import method as method_module
    seen, original = [], method_module.keep_top

    def recording(store, scores, counts, host_counts=None):
        idx, valid = store.slot_index()
        seen.append({s: {int(store.pos[i]): float(scores[i]) for i in idx[s][valid[s]]}
                     for s in range(store.B * store.H)})
        return original(store, scores, counts, host_counts)
    monkeypatch.setattr(method_module, "keep_top", recording)
    return seen


@pytest.mark.parametrize("case", fixture()["cases"], ids=case_id)
def test_kept_positions_match_reference(case, monkeypatch):
    """Equal up to ties: where the two keep different positions, those positions' scores are equal (kvbench
    breaks a tie to the earlier slot, kvpress's topk as its kernel happens to; repeated tokens have keys of
    one norm)."""
    seen = scores_seen(monkeypatch)
    got = kvbench_kept(case)
    want = case["kept"]
    assert len(got) == len(want)
    wrong = []
    for layer in range(len(want)):
        for h in range(len(want[layer])):
            only_got, only_want = sorted(set(got[layer][h]) - set(want[layer][h])), \
                sorted(set(want[layer][h]) - set(got[layer][h]))
            score = seen[layer][h] if layer < len(seen) else {}
            tied = len(only_got) == len(only_want) and all(p in score for p in only_got + only_want) and \
                sorted(score[p] for p in only_got) == sorted(score[p] for p in only_want)
            if (only_got or only_want) and not tied:
                wrong.append((layer, h, sorted(set(only_got) | set(only_want))))
    assert not wrong, f"{case['reference']}: (layer, head, positions kept by only one side): {wrong}"


def test_fixtures_cover_every_eviction_method_at_both_roundings():
    from tests.conftest import EVICTION
    cases = fixture()["cases"]
    assert {c["method"] for c in cases} == set(EVICTION)
    for method in EVICTION:
        mine = [c for c in cases if c["method"] == method]
        assert any(int(c["context"] * c["budget"]) != -(-c["context"] * c["budget"] // 1) for c in mine)
        assert all(len(c["kept"]) == 4 and all(len(h) == 2 for h in c["kept"]) for c in mine)


@pytest.mark.parametrize("pin", [False, True])
def test_tova_keeps_one_set_per_layer_while_decoding(pin):
    lm = parity_model()
    engine = Engine(lm, registry.build_method("tova", 24, {"pin_newest": pin}))
    ids = fixture()["contexts"]["96"]
    cache, first, _ = engine.prefill(Sample("tova", ids, [], [], 0))
    engine.decode(cache, first, [12], [False])
    for store in cache.stores:
        idx, valid = store.slot_index()
        heads = [store.pos[idx[s][valid[s]]].tolist() for s in range(store.H)]
        assert all(h == heads[0] for h in heads) and len(heads[0]) == 24
        if pin:
            assert 96 + 11 - 1 in heads[0]  # the newest token fed to the model is held


@pytest.mark.parametrize("name,params", [("h2o", {"recent_ratio": 0.0, "mean_over_queries": True}),
                                         ("pyramidkv", {"schedule": "kvpress", "window": 8, "beta": 2}),
                                         ("adakv", {"allocation": "kvpress"})])
def test_kvpress_options_hold_the_budget(name, params):
    lm = parity_model()
    engine = Engine(lm, registry.build_method(name, 0.25, params), prefill_chunk=48)
    cache, first, _ = engine.prefill(Sample("opt", fixture()["contexts"]["127"], [], [], 0))
    counts = cache.token_counts()  # [layers, B, H]
    assert abs(counts.float().mean().item() - int(0.25 * 127)) <= 1
    tokens, _ = engine.decode(cache, first, [6], [False])
    assert len(tokens[0]) == 6


@pytest.mark.parametrize("name,params", [("pyramidkv", {"schedule": "paper"}), ("adakv", {"allocation": "x"})])
def test_unknown_option_is_one_clear_error(name, params):
    with pytest.raises(registry.UnknownNameError, match="use 'official' or 'kvpress'"):
        registry.build_method(name, 0.5, params)


def identical_fraction(case: dict, lenient: bool = False) -> float:
    got, want = kvbench_kept(case, lenient), case["kept"]
    pairs = [(g, w) for gl, wl in zip(got, want) for g, w in zip(gl, wl)]
    return sum(g == w for g, w in pairs) / len(pairs)


def table(lenient: bool = False) -> str:
    """Markdown: per method, reference and parameters, the fraction of (layer, KV head) with identical kept
    sets at each (context, kept fraction)."""
    rows: dict[tuple, dict] = {}
    for case in fixture()["cases"]:
        params = json.dumps(case["params"], separators=(",", ":"))
        rows.setdefault((case["method"], case["reference"], params), {})[(case["context"], case["budget"])] = \
            identical_fraction(case, lenient)
    cols = sorted({c for r in rows.values() for c in r})
    out = ["| method | reference | kvbench parameters | " + " | ".join(f"T={t} b={b}" for t, b in cols) + " |",
           "|" + "---|" * (3 + len(cols))]
    for (method, ref, params), vals in rows.items():
        out.append(f"| {method} | {ref} | `{params}` | " + " | ".join(f"{vals[c]:.3f}" for c in cols) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(table(lenient="--lenient" in sys.argv))
