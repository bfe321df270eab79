"""Names users type, mapped to method and task classes (plain dicts of import paths, loaded on use)."""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import types
import typing
from typing import Any

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
    "compresskv": "kvbench.methods.compresskv:CompressKV",
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


class ParameterError(ValueError):
    """A method or task parameter of the wrong type or outside its range; the CLI prints it as one line."""


def load(table: dict, kind: str, name: str):
    if name not in table:
        raise UnknownNameError(f"unknown {kind} '{name}'; run `kvbench list {kind}s` (known: {', '.join(sorted(table))})")
    module, attr = table[name].split(":")
    return getattr(importlib.import_module(module), attr)


# ---------------------------------------------------------------------------------------------------------
# parameter checking: every field of a method or task dataclass, against its declared type and range
# ---------------------------------------------------------------------------------------------------------
#
# A field declares its range next to it: ``window: int = field(default=32, metadata=in_range(1))`` or
# ``metadata=in_range(0.0, 1.0)`` (inclusive bounds, None for open; ``{"choices": (...)}`` for strings).
# Without a declaration a number must be finite and >= 0 (sizes, counts, fractions, weights, seeds): a
# field that may be negative says so with ``in_range(None, None)``. Numbers inside lists and tuples are
# held to the same range.

_DEFAULT_RANGE = (0, None)


def _parse_text(value: str, hint) -> Any:
    """A command-line string as the field's type: numbers, booleans and lists (JSON or comma-separated)."""
    if _accepts(hint, str):
        return value
    low = value.strip().lower()
    if low in ("true", "false") and _accepts(hint, bool):
        return low == "true"
    if low in ("none", "null") and _accepts(hint, type(None)):
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    item = _sequence_item(hint)
    if item is not None and value.strip().startswith("[") and value.strip().endswith("]"):
        # [a, b] as users type it, without JSON's quotes
        value = value.strip()[1:-1]
        return [_parse_text(v.strip().strip("'\""), item) for v in value.split(",") if v.strip()]
    if item is not None and "," in value:
        return [_parse_text(v.strip(), item) for v in value.split(",") if v.strip()]
    return value


def _options(hint) -> tuple:
    """The alternatives of a union hint (``int | None`` -> (int, NoneType)), else (hint,)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _accepts(hint, kind) -> bool:
    return any(opt is kind or typing.get_origin(opt) is kind for opt in _options(hint))


def _sequence_item(hint):
    for opt in _options(hint):
        if typing.get_origin(opt) in (list, tuple) and typing.get_args(opt):
            return typing.get_args(opt)[0]
    return None


_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "text", type(None): "none",
          dict: "a mapping"}


def _type_name(hint) -> str:
    parts = []
    for opt in _options(hint):
        item = _sequence_item(opt)
        if typing.get_origin(opt) in (list, tuple):
            parts.append({int: "a list of whole numbers", float: "a list of numbers"}.get(item, "a list"))
        else:
            parts.append(_NAMES.get(opt, getattr(opt, "__name__", str(opt))))
    return " or ".join(parts)


def _matches(value, hint) -> bool:
    """Whether ``value`` has the type ``hint`` declares (bool is not a number here; ints pass as floats)."""
    if hint is typing.Any or hint is object:
        return True
    for opt in _options(hint):
        origin = typing.get_origin(opt) or opt
        if opt is type(None):
            ok = value is None
        elif opt is bool:
            ok = isinstance(value, bool)
        elif opt in (int, float):
            ok = isinstance(value, int if opt is int else (int, float)) and not isinstance(value, bool)
        elif origin in (list, tuple):
            item = _sequence_item(opt)
            ok = isinstance(value, (list, tuple)) and (item is None or all(_matches(v, item) for v in value))
            ok = ok or (item is str and isinstance(value, str))  # "a,b": the class splits it itself
        elif origin is typing.Literal:
            ok = value in typing.get_args(opt)
        else:
            ok = isinstance(origin, type) and isinstance(value, origin)
        if ok:
            return True
    return False


def _numbers(value) -> list:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _numbers(v)]
    return []


def check_params(cls, params: dict, owner: str | None = None) -> dict:
    """``params`` (strings from the command line, or values from a sweep file) as the types of ``cls``'s
    fields, checked against each field's type and range; ``ParameterError`` names the first bad one."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    owner = owner or cls.__name__
    out = {}
    for key, value in params.items():
        if key not in fields:
            raise UnknownNameError(f"{cls.__name__} has no parameter '{key}' (it has: {', '.join(sorted(fields))})")
        hint = hints.get(key, typing.Any)
        if isinstance(value, str):
            value = _parse_text(value, hint)
        if isinstance(value, int) and not isinstance(value, bool) and _accepts(hint, float) \
                and not _accepts(hint, int):
            value = float(value)
        if isinstance(value, float) and value.is_integer() and _accepts(hint, int) and not _accepts(hint, float):
            value = int(value)
        if not _matches(value, hint):
            raise ParameterError(f"{owner} parameter {key}={value!r}: expected {_type_name(hint)}")
        meta = fields[key].metadata
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            raise ParameterError(f"{owner} parameter {key}={value!r}: use one of {', '.join(map(str, choices))}")
        lo, hi = meta.get("range", _DEFAULT_RANGE)
        for n in _numbers(value):
            if not math.isfinite(n) and (lo is not None or hi is not None):
                raise ParameterError(f"{owner} parameter {key}={value!r}: must be a finite number")
            if (lo is not None and n < lo) or (hi is not None and n > hi):
                span = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
                raise ParameterError(f"{owner} parameter {key}={value!r}: must be {span}")
        out[key] = value
    return out


def build_method(name: str, budget, params: dict | None = None):
    if "+" in name:  # an eviction method composed with a per-token codec (kvbench.compose)
        from kvbench import compose
        return compose.build(name.split("+"), budget, dict(params or {}), build_method)
    cls = load(METHODS, "method", name)
    params = dict(params or {})
    if "budget" in params:
        raise ParameterError(f"{name}: give the budget with --budget (or the sweep's budgets), not as a parameter")
    scorer = params.pop("scorer", None)
    params = check_params(cls, params, name)
    if isinstance(scorer, str):  # a method named by the user: built (and checked) like any other
        params["scorer"] = build_method(scorer, budget)
    elif scorer is not None:
        params["scorer"] = scorer
    return cls(budget=parse_budget(budget), **params)


def artifact_param(method: str) -> str:
    """The parameter of ``method`` that takes an artifact directory (``--artifact``); composed methods route
    ``artifact`` to the part that has it."""
    if "+" in method:
        return "artifact"
    return load(METHODS, "method", method).artifact_param


def uses_budget(method: str) -> bool:
    """Whether ``method``'s memory follows its budget (a composed method's is its eviction method's)."""
    return "+" in method or load(METHODS, "method", method).uses_budget


def methods_with_artifact_command(step: str) -> list[str]:
    """The methods that declare a ``step`` ("train" or "calibrate") command."""
    return [name for name in sorted(METHODS) if step in load(METHODS, "method", name).artifact_commands]


def artifact_command(method: str, step: str):
    """The click command of ``kvbench STEP METHOD`` (None: the method declares none)."""
    if method not in METHODS:
        return None
    spec = load(METHODS, "method", method).artifact_commands.get(step)
    if spec is None:
        return None
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


def build_task(name: str, params: dict | None = None):
    from kvbench.task import TASK_KINDS
    cls = load(TASKS, "task", name)
    if getattr(cls, "kind", None) not in TASK_KINDS:
        raise TypeError(f"task {name}: {cls.__name__} must subclass kvbench.task.Task and declare a kind "
                        f"({', '.join(TASK_KINDS)})")
    return cls(**check_params(cls, dict(params or {}), name))


def build_for_timing(name: str, budget, params: dict | None = None):
    """A method for speed and memory measurements only (``kvbench bench``): a method with trained parts
    runs on random ones there (its ``random_init``), since weights change no timing or byte count."""
    cls = load(METHODS, "method", name)
    extra = {"random_init": True} if "random_init" in {f.name for f in dataclasses.fields(cls)} else {}
    return build_method(name, budget, {**extra, **(params or {})})

