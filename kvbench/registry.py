"""Names users type, mapped to method and task classes (plain dicts of import paths, loaded on use)."""
from __future__ import annotations

import dataclasses
import importlib
import json
import typing

from kvbench.method import parse_budget

METHODS = {
    "full": "kvbench.methods.full:Full",
    "random": "kvbench.methods.random:Random",
    "knorm": "kvbench.methods.knorm:KNorm",
    "streamingllm": "kvbench.methods.streamingllm:StreamingLLM",
    "snapkv": "kvbench.methods.snapkv:SnapKV",
    "pyramidkv": "kvbench.methods.pyramidkv:PyramidKV",
    "h2o": "kvbench.methods.h2o:H2O",
    "tova": "kvbench.methods.tova:TOVA",
    "adakv": "kvbench.methods.adakv:AdaKV",
    "deltakv": "kvbench.methods.deltakv:DeltaKV",
    "selectfit": "kvbench.methods.selectfit:SelectFit",
    "kvsculpt": "kvbench.methods.kvsculpt:KVSculpt",
    "kvcar": "kvbench.methods.kvcar:KVCAR",
}

TASKS = {
    "niah": "kvbench.tasks.niah:NIAH",
    "fidelity": "kvbench.tasks.fidelity:Fidelity",
    "longbench": "kvbench.tasks.longbench:LongBench",
    "scbench": "kvbench.tasks.scbench:SCBench",
    "scbench_kv": "kvbench.tasks.scbench:ScbenchKv",
    "scbench_prefix_suffix": "kvbench.tasks.scbench:ScbenchPrefixSuffix",
    "scbench_vt": "kvbench.tasks.scbench:ScbenchVt",
    "scbench_repoqa": "kvbench.tasks.scbench:ScbenchRepoqa",
    "scbench_qa_eng": "kvbench.tasks.scbench:ScbenchQaEng",
    "scbench_qa_chn": "kvbench.tasks.scbench:ScbenchQaChn",
    "scbench_choice_eng": "kvbench.tasks.scbench:ScbenchChoiceEng",
    "scbench_many_shot": "kvbench.tasks.scbench:ScbenchManyShot",
    "scbench_summary": "kvbench.tasks.scbench:ScbenchSummary",
    "scbench_mf": "kvbench.tasks.scbench:ScbenchMf",
    "scbench_summary_with_needles": "kvbench.tasks.scbench:ScbenchSummaryWithNeedles",
    "scbench_repoqa_and_kv": "kvbench.tasks.scbench:ScbenchRepoqaAndKv",
    "ruler": "kvbench.tasks.ruler:Ruler",
    "aime24": "kvbench.tasks.aime:AIME24",
    "aime25": "kvbench.tasks.aime:AIME25",
}


class UnknownNameError(ValueError):
    pass


def load(table: dict, kind: str, name: str):
    if name not in table:
        raise UnknownNameError(f"unknown {kind} '{name}'; run `kvbench list {kind}s` (known: {', '.join(sorted(table))})")
    module, attr = table[name].split(":")
    return getattr(importlib.import_module(module), attr)


def _coerce(cls, params: dict) -> dict:
    """Turn CLI strings into the types of the dataclass fields (numbers, booleans, lists as JSON)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in params.items():
        if key not in fields:
            raise UnknownNameError(f"{cls.__name__} has no parameter '{key}' (it has: {', '.join(sorted(fields))})")
        if isinstance(value, str):
            hint = str(hints.get(key, ""))
            if hint == "<class 'str'>" or hint == "str":
                pass
            elif value.lower() in ("true", "false"):
                value = value.lower() == "true"
            else:
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
        out[key] = value
    return out


def build_method(name: str, budget, params: dict | None = None):
    if "+" in name:  # an eviction method composed with a per-token codec (kvbench.compose)
        from kvbench import compose
        return compose.build(name.split("+"), budget, dict(params or {}), build_method)
    cls = load(METHODS, "method", name)
    params = _coerce(cls, dict(params or {}))
    if "scorer" in params and isinstance(params["scorer"], str):
        params["scorer"] = build_method(params["scorer"], budget)
    return cls(budget=parse_budget(budget), **params)


def build_task(name: str, params: dict | None = None):
    cls = load(TASKS, "task", name)
    return cls(**_coerce(cls, dict(params or {})))
