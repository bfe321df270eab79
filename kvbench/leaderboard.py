"""``kvbench leaderboard``: every run under a results root, aggregated with pandas into one table.

Sources, per run directory ``ROOT/runs/<id>/``: ``config.json`` (what ran), ``metrics.json`` (the task's
summary and the run's mean measured KV ratio and throughput), ``samples.jsonl`` (finished samples: for a run
that has no metrics yet, the samples done so far), ``trace.jsonl`` (peak memory) and ``error.json`` (a
sweep point that failed: out of memory or a crash).

Two tables come out, per model and protocol (protocols are never mixed: the query-agnostic and query-aware
protocols measure different things, so no row, score or rank combines them):

- *runs*: methods (with their budget) as rows; per task the headline score (the task's ``score``), its 95%
  bootstrap interval (of that score: ``Task.score_units``; n counts what the score averages over, AIME's problems
  rather than their generations) and the measured KV ratio; decode tokens/s and peak memory where measured.
- *matched memory*: the methods ranked per task at the same measured memory, not at the same knob value
  (a budget of 0.25 means a different memory for each method: per-slot state, protected windows, the
  question appended after compression). Each method's scores are interpolated linearly along its own
  measured KV ratios, at memory levels that default to the median measured ratio of each method's runs at
  each budget (medians closer than the tolerance merged into one level); a level outside a method's measured
  range (beyond a tolerance of 0.02) is left empty, never extrapolated, and a level where fewer than two
  methods have a score ranks nothing. A method's rank is its mean rank over the (task, level) cells it has
  (none: listed last, unranked).

The measured ratio is ``kv_ratio_prefill`` by default: bytes the cache holds when decoding starts over the
bytes a plain full cache would hold for the same tokens (``--ratio end``: at the end of decoding). The
``full`` method's ratio is slightly above 1.0 (it also holds int32 positions and growth slack); it is the
reference row, outside the ranking.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import math
import re
from pathlib import Path

import pandas as pd

from kvbench import registry, results
from kvbench.stats import interval_ranks, stratified_interval
from kvbench.task import TaskError, mean_units, summarize_mean

TOLERANCE = 0.02
RATIOS = ("prefill", "end")
# Beside leaderboard.json: every run's samples (id, meta, scores; no prompts or outputs), so the table alone
# lets one redraw the breakdowns and NIAH grids and recompute intervals once the run folders are gone.
SAMPLES_FILE = "leaderboard-samples.jsonl.gz"


def model_label(name: str | None) -> str:
    """A short model name: the file or directory name of a path, the text before any parenthesis."""
    if not name:
        return "?"
    name = name.split(" (")[0]
    return Path(name).name if "/" in name and Path(name).suffix in (".gguf", "") and name.startswith(("/", ".")) \
        else name


def method_label(name: str | None, params: dict | None) -> str:
    """The method's name, with the parameters a run set away from the method's current defaults
    (``kvsculpt(adaptive=True)``), so variants of one method stay apart in every table. A composed method
    (``snapkv+kvcar``, whose parameters are ``{"evict": ..., "codec": ...}``) lists both parts' changes after the
    whole name, a key both parts changed written ``part.key`` as ``-m`` takes it."""
    if name and "+" in name and isinstance(params, dict) and {"evict", "codec"} <= params.keys():
        parts = name.split("+")
        changed = [_changed(part, params[role]) for part, role in zip(parts, ("evict", "codec"))]
        both = set(changed[0]) & set(changed[1])
        merged = {(f"{part}.{k}" if k in both else k): v for part, c in zip(parts, changed) for k, v in c.items()}
        return _labelled(name, merged)
    return _labelled(name or "?", _changed(name, params))


def _changed(name: str | None, params: dict | None) -> dict:
    from kvbench import registry
    try:
        fields = dataclasses.fields(registry.load(registry.METHODS, "method", name))
    except (registry.UnknownNameError, TypeError, ImportError):
        return {}
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in fields if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    changed = {}
    for k, v in (params or {}).items():
        if k == "budget" or k not in defaults:
            continue
        default, v = _as_recorded(defaults[k]), _as_recorded(v)
        if isinstance(default, dict) and isinstance(v, dict):  # a nested method (AdaKV's scorer): its changed keys
            changed.update({f"{k}.{sub}": x for sub, x in v.items()
                            if sub != "budget" and sub in default and default[sub] != x})
        elif default != v:
            changed[k] = v
    # artifacts are named by their directory (checkpoints/compresskv-qwen2.5-coder-1.5b -> its last part)
    return {k: Path(v).name if k in ("artifact", "checkpoint") and isinstance(v, str) else v
            for k, v in changed.items()}


def _as_recorded(value):
    """A parameter as a run's config.json holds it (``asdict`` of the method, then JSON): a default made by a
    factory (AdaKV's ``scorer``, a SnapKV) is a dataclass here and a dict there, a tuple a list."""
    return json.loads(json.dumps(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value, default=str))


def _labelled(name: str, changed: dict) -> str:
    return name + ("(" + ",".join(f"{k}={v}" for k, v in sorted(changed.items())) + ")" if changed else "")


def _peak_gib(trace: list[dict]) -> float | None:
    best = None
    for rec in trace:
        for key, val in rec.items():
            if key.startswith("peak_") and isinstance(val, dict):
                v = results.peak_bytes(val)
                if v is not None:
                    best = v if best is None else max(best, v)
    return best / 1024 ** 3 if best is not None else None


# What two runs may differ in and still be compared: the method and its parameters, and what does not
# change a number (when and where a run was made, where it was written). Everything else is the run's
# *setting*: the task and its parameters, --limit, the data, the model and the exact weights it read
# (provenance), the protocol, context, batching, seed, temperature, device and dtype.
NOT_SETTING = ("method", "method_params", "budget", "run_id", "created", "versions", "git_commit", "out",
               "device_name", "trace_every", "model", "model_name", "artifact_sha256")


def setting_of(config: dict) -> dict:
    """The comparability key of a run: its config without the method, its parameters and volatile fields."""
    key = {k: v for k, v in sorted(config.items()) if k not in NOT_SETTING}
    if isinstance(key.get("task_params"), dict):
        key["task_params"] = comparable_task_params(config.get("task"), key["task_params"])
    key["model"] = model_label(config.get("model_name") or config.get("model"))
    return key


def comparable_task_params(task: str | None, params: dict) -> dict:
    """A run's task parameters as they decide comparability: those marked ``ADDED_LATER`` left out at their
    default, so runs from before such a parameter existed and runs at its default are one setting."""
    later = _added_later(task)
    return {k: v for k, v in params.items() if not (k in later and later[k] == v)}


@functools.lru_cache(maxsize=None)
def _added_later(task: str | None) -> dict:
    """The task's parameters marked ``ADDED_LATER`` and their defaults (none for a task no longer known)."""
    try:
        cls = registry.load(registry.TASKS, "task", task)
    except (registry.UnknownNameError, TypeError):
        return {}
    return {f.name: f.default for f in dataclasses.fields(cls) if f.metadata.get("added_later")}


@functools.lru_cache(maxsize=None)
def scorer(task: str | None, task_params: str):
    """The task's ``summarize`` and ``score_units`` (``task_params``: JSON); a task no longer known, or parameters it
    no longer takes: the plain mean's."""
    try:
        built = registry.build_task(task, json.loads(task_params))
    except (TaskError, TypeError, ValueError, ImportError):
        return summarize_mean, mean_units
    return built.summarize, built.score_units


def _setting_text(key: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v, sort_keys=True, default=str)}" for k, v in key.items()
                     if v not in (None, {}, [], False) or k in ("limit",))


def _unreadable(run_dir: Path, why: str) -> dict:
    return {"run_id": run_dir.name, "run_dir": str(run_dir), "status": "unreadable", "model": "?",
            "error": f"{run_dir.name}: {why}"}


def drop_text(drop: list[tuple[str, str]] | None) -> str:
    return ("Samples left out of every run: " + ", ".join(f"{k}={v}" for k, v in drop) + ".") if drop else ""


COLUMNS = ["run_id", "run_dir", "status", "model", "task", "method", "budget", "protocol", "n_samples", "score",
           "score_lo", "score_hi", "kv_ratio_prefill", "kv_ratio_end", "tokens_per_s", "tpot_s", "prefill_s", "peak_gib",
           "batch_size", "device", "dtype", "method_params", "task_params", "limit", "provenance", "created", "setting",
           "settings", "error", "artifact"]
# ``artifact``: the first 12 hex of the run's ``artifact_sha256`` (None: no artifact, or a table written before
# 2026-12-03 recorded it). Tables written before the column existed still load (``earlier``).
LATER_COLUMNS = ("artifact",)
EXTRA = ["samples_from"]  # not written: where an earlier table's run keeps its samples (``row_samples``)


def collect(root: str | Path = "results", drop: list[tuple[str, str]] | None = None,
            tables: tuple[str | Path, ...] = (), any_drop: bool = False) -> pd.DataFrame:
    """One row per run directory under ``root`` (complete, incomplete, failed, or unreadable: a corrupt
    config.json, metrics.json or JSON-lines record is listed as an error, never left out silently).

    ``drop``: (KEY, VALUE) pairs; samples whose ``meta[KEY]`` is VALUE are left out and each run touched is
    scored on the rest (a NIAH length the full cache itself fails cannot rank methods).

    ``tables``: earlier ``leaderboard.json`` files whose runs join these (``earlier``; ``any_drop`` for a caller
    that reads their samples, not their scores)."""
    rows = []
    for run_dir in results.iter_runs(Path(root)):
        config = results.read_json(run_dir / "config.json")
        if not isinstance(config, dict):
            rows.append(_unreadable(run_dir, "config.json is corrupt (not a JSON object); rerun it or delete the "
                                             "directory"))
            continue
        metrics = results.read_json(run_dir / "metrics.json")
        if (run_dir / "metrics.json").exists() and not isinstance(metrics, dict):
            rows.append(_unreadable(run_dir, "metrics.json is corrupt; delete it and rerun the same command "
                                             "(the finished samples are kept)"))
            continue
        error = results.read_json(run_dir / "error.json")
        try:
            samples = results.read_jsonl(run_dir / "samples.jsonl")
            trace = results.read_jsonl(run_dir / "trace.jsonl")
        except results.CorruptRecordError as e:
            rows.append(_unreadable(run_dir, str(e)))
            continue
        setting = setting_of(config)
        summarize, units = scorer(config.get("task"), json.dumps(config.get("task_params") or {}, sort_keys=True))
        try:  # the task's own statistic: records it cannot read make this run an error, not the whole table's
            if drop:
                kept = _kept(samples, drop)
                if len(kept) < len(samples):  # the run's aggregates covered the dropped samples: recompute them
                    ids = {r.get("id") for r in kept}
                    samples, trace = kept, [t for t in trace if "id" not in t or t["id"] in ids]
                    metrics = {"complete": metrics.get("complete")} if metrics else None
                    if metrics:
                        metrics["summary"] = summarize(samples) if samples else {}
            summary = (metrics or {}).get("summary") or {}
            if metrics is None and samples:  # unfinished: what its finished samples say
                summary = summarize(samples)
            parts = units(samples)  # the interval is of the score's own statistic, resampling what it averages over
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            rows.append(_unreadable(run_dir, f"samples.jsonl: the task cannot score its records ({type(e).__name__}: "
                                             f"{e}); rerun it"))
            continue
        score_lo, score_hi, n = _interval(parts)

        def mean(key):
            vals = [s[key] for s in samples if isinstance(s.get(key), (int, float))]
            return sum(vals) / len(vals) if vals else None

        if error:
            status = error.get("status", "crash")
        elif metrics and metrics.get("complete"):
            status = "complete"
        else:
            status = "incomplete"
        timed = not (config.get("versions") or {}).get("shared_device")  # timings under contention are not speed
        rows.append({
            "run_id": run_dir.name, "run_dir": str(run_dir), "status": status,
            "model": model_label(config.get("model_name") or config.get("model")),
            "task": config.get("task"), "method": method_label(config.get("method"), config.get("method_params")),
            "budget": config.get("budget"),
            "protocol": config.get("protocol"), "n_samples": n,
            "score": summary.get("score"), "score_lo": score_lo, "score_hi": score_hi,
            "kv_ratio_prefill": (metrics or {}).get("kv_ratio_prefill", mean("kv_ratio_prefill")),
            "kv_ratio_end": (metrics or {}).get("kv_ratio_end", mean("kv_ratio_end")),
            "tokens_per_s": (metrics or {}).get("tokens_per_s", mean("tokens_per_s")) if timed else None,
            "tpot_s": (metrics or {}).get("tpot_s", mean("tpot_s")) if timed else None,
            "prefill_s": (metrics or {}).get("prefill_s", mean("prefill_s")) if timed else None,
            "peak_gib": _peak_gib(trace), "batch_size": config.get("batch_size"),
            "device": config.get("device"), "dtype": config.get("dtype"),
            "method_params": json.dumps(config.get("method_params") or {}, sort_keys=True),
            "task_params": json.dumps(config.get("task_params") or {}, sort_keys=True),
            "limit": config.get("limit"), "provenance": config.get("model_provenance"),
            "created": config.get("created"),
            "setting": hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:8],
            "settings": _setting_text(setting),
            "error": (error or {}).get("error"),
            "artifact": results.short_artifact(config.get("artifact_sha256")),
        })
    frame = pd.DataFrame(rows, columns=COLUMNS).assign(samples_from=None)
    if tables:
        # a run both here and in a table (or in two tables) is one run: its folder's row, else the first table's
        both = pd.concat([frame, *(earlier(t, drop, any_drop) for t in tables)], ignore_index=True)
        frame = both[~both["run_id"].duplicated(keep="first")].reset_index(drop=True)
    return tell_artifacts_apart(frame)


def tell_artifacts_apart(df: pd.DataFrame) -> pd.DataFrame:
    """Runs of one method label made with different artifacts (a codec retrained under the same directory name,
    or one run that recorded its artifact's checksum beside one that did not) are different methods: their
    labels get the artifact's checksum (``#3fa2c1d07be4``; ``#unrecorded`` for a run whose table did not keep it),
    so no table averages, ranks or replaces one with the other under one name."""
    if df.empty:
        return df
    # None, not NaN, for "none recorded" (NaN != NaN would make every such run an artifact of its own)
    artifact = pd.Series([a if isinstance(a, str) else None for a in df["artifact"]], index=df.index, dtype=object)
    labels = df["method"].copy()
    for (_, method), group in df.groupby(["model", "method"], dropna=False, sort=False):
        if len(set(artifact[group.index])) > 1:
            labels[group.index] = [f"{method}#{a or 'unrecorded'}" for a in artifact[group.index]]
    return df.assign(method=labels, artifact=artifact)


def without_artifact(label: str) -> str:
    """A method label as a table printed it before ``tell_artifacts_apart`` gave it its artifact's checksum: the
    row an earlier printed table (``scripts/breakdown.py --with``) holds for a run that now has the longer label."""
    return re.sub(r"#(?:[0-9a-f]{12}|unrecorded)(?= |$)", "", label)


def earlier(table: str | Path, drop: list[tuple[str, str]] | None = None, any_drop: bool = False) -> pd.DataFrame:
    """The runs an earlier ``leaderboard.json`` recorded (``--with``), one row each as that table has it (score,
    95% interval, n, measured ratios, speed, settings, created) and no run directory: the run folders are not
    kept (the committed table is the record), so what needs a run's samples (breakdowns, NIAH grids, paired
    tests) reads them from the samples file beside the table (``row_samples``) or leaves the row out, and no
    memory trace is kept. Joined with the runs under a root, ``newest`` keeps the newest of each configuration.
    The table must have left out the same samples (``drop``) as this call, or its scores would mean another thing
    (``any_drop``: whatever it left out, for a caller that reads which runs it holds, not their scores)."""
    path = Path(table)
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise results.ResultsError(f"{path}: not JSON ({e}); pass a leaderboard.json that `kvbench leaderboard` "
                                   "wrote") from None
    runs = payload.get("runs") if isinstance(payload, dict) else None
    needed = set(COLUMNS) - {"run_dir", *LATER_COLUMNS}
    if not isinstance(runs, list) or not all(isinstance(r, dict) and needed <= r.keys() for r in runs):
        raise results.ResultsError(f"{path}: not a kvbench leaderboard.json (a 'runs' list whose rows have "
                                   f"{', '.join(sorted(needed))}); pass one that `kvbench leaderboard` wrote")
    theirs = sorted(map(tuple, payload.get("drop") or []))
    if theirs != sorted(drop or []) and not any_drop:
        said = lambda d: ", ".join(f"{k}={v}" for k, v in d) or "nothing"
        raise results.ResultsError(f"{path} left out {said(theirs)}, this call {said(sorted(drop or []))}: pass "
                                   "the same --drop, or its scores and these would not measure the same samples")
    stored = path.with_name(SAMPLES_FILE)
    if stored.exists():
        _stored_samples(str(stored))  # read (and checked) now, before any slow work
    frame = pd.DataFrame(runs, columns=COLUMNS)
    # named as this version names a run from its folder, so a table written before a naming rule changed (composed
    # methods carried no parameters until 2026-12-03) names its runs as their re-runs are named
    frame["method"] = [method_label(m.split("(")[0].split("#")[0], json.loads(p))
                       for m, p in zip(frame["method"], frame["method_params"])]
    if stored.exists() and not any_drop:
        frame = _rescored(frame, _stored_samples(str(stored)), drop)
    return frame.assign(run_dir=None, samples_from=str(stored) if stored.exists() else None)


def _rescored(frame: pd.DataFrame, stored: dict[str, list[dict]], drop) -> pd.DataFrame:
    """A recorded run whose samples are stored gets its score, n and interval as a run folder gets them now
    (the task's own statistic and its stratified bootstrap, ``collect``), not as the table that recorded it
    computed them: a table folded before a statistic changed would otherwise rank runs by two rules at once."""
    frame = frame.copy()
    for i, row in frame.iterrows():
        samples = stored.get(row["run_id"])
        if not samples or row["status"] != "complete":
            continue
        samples = _kept(samples, drop)
        summarize, units = scorer(row["task"], row["task_params"])
        try:
            score, parts = summarize(samples).get("score"), units(samples)
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            continue  # as the table recorded it: its samples file lacks what this task's statistic reads
        frame.loc[i, ["score", "score_lo", "score_hi", "n_samples"]] = [score, *_interval(parts)]
    return frame


def _kept(samples: list[dict], drop) -> list[dict]:
    """The samples ``drop`` leaves (none of its (KEY, VALUE) pairs in their meta)."""
    return [r for r in samples if not any(str((r.get("meta") or {}).get(k)) == v for k, v in drop or [])]


def _interval(parts) -> tuple[float, float, int]:
    """The 95% interval of the score's own statistic from the task's ``score_units``, and its n."""
    lo, hi = stratified_interval([(w, list(u.values())) for w, u in parts])
    return lo, hi, sum(len(u) for _, u in parts)


@functools.lru_cache(maxsize=4)
def _stored_samples(path: str) -> dict[str, list[dict]]:
    out = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
                out[rec["run_id"]] = rec["samples"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise results.ResultsError(f"{path}, line {n}: not a record of `kvbench leaderboard`'s samples "
                                           "file; write the table again") from None
    return out


def row_samples(row) -> list[dict] | None:
    """A run's samples (id, meta, scores): from its folder, else from the samples file of the table that
    recorded it; None when neither has them (a table written before the samples file existed)."""
    if isinstance(row.get("run_dir"), str):
        return [{k: s.get(k) for k in ("id", "meta", "scores")}
                for s in results.read_jsonl(Path(row["run_dir"]) / "samples.jsonl")]
    if isinstance(row.get("samples_from"), str):
        return _stored_samples(row["samples_from"]).get(row["run_id"])
    return None


def newest(df: pd.DataFrame) -> pd.DataFrame:
    """One run per configuration (setting, method and its parameters, budget): the newest by ``created`` (none
    recorded: the oldest)."""
    if df.empty:
        return df
    # ``method`` is the label: the parameters that differ from the method's defaults, as every table tells runs
    # apart (a parameter one run recorded at its default and another did not leaves one configuration)
    key = ["model", "protocol", "setting", "task", "method", "budget"]
    # the same run read from its folder and from an earlier table (--with): the folder's row (it has the samples);
    # times compared as times: ``created`` carries the device's UTC offset (%z)
    created = pd.to_datetime(df["created"], utc=True, errors="coerce", format="ISO8601")
    ordered = df.assign(_created=created, _folder=df["run_dir"].notna()).sort_values(
        ["_created", "_folder"], kind="stable", na_position="first")
    return ordered.drop_duplicates(subset=key, keep="last").drop(columns=["_created", "_folder"]).sort_index()


def select(df: pd.DataFrame, model: str | None = None, task: str | None = None, protocol: str | None = None,
           budget: list[float] | None = None) -> pd.DataFrame:
    """Filter by model (substring of its label), task, protocol and budgets (the full reference stays)."""
    out = df
    if model:
        out = out[out["model"].str.contains(model, case=False, regex=False)]
    if task:
        out = out[out["task"] == task]
    if protocol:
        out = out[out["protocol"] == protocol]
    if budget:
        out = out[out["budget"].apply(lambda b: any(math.isclose(float(b), x) for x in budget))
                  | (out["method"] == results.FULL)]
    return out


def _complete(df: pd.DataFrame) -> pd.DataFrame:
    """What the tables show: the newest run of each configuration (an older one is replaced, never averaged with
    it), if complete."""
    df = newest(df)
    return df[(df["status"] == "complete") & df["score"].notna()]


def runs_table(df: pd.DataFrame, ratio: str = "prefill") -> pd.DataFrame:
    """Per (model, protocol): methods x budgets as rows; per task score and measured KV ratio; throughput."""
    col = f"kv_ratio_{ratio}"
    done = _complete(df)
    if done.empty:
        return pd.DataFrame()
    keys = ["model", "protocol", "setting", "method", "budget"]
    scores = done.pivot_table(index=keys, columns="task", values="score", aggfunc="first")
    done = done.assign(ci=[_interval_text(lo, hi, n) for lo, hi, n in
                           zip(done["score_lo"], done["score_hi"], done["n_samples"])])
    intervals = done.pivot_table(index=keys, columns="task", values="ci", aggfunc="first")
    ratios = done.pivot_table(index=keys, columns="task", values=col, aggfunc="first")
    table = pd.concat({"score": scores, "score 95% CI": intervals, "kv ratio": ratios},
                      axis=1).swaplevel(0, 1, axis=1).sort_index(axis=1)
    table.columns = [f"{task} {what}" for task, what in table.columns]
    extra = done.groupby(keys).agg(tokens_per_s=("tokens_per_s", "mean"), peak_gib=("peak_gib", "max"))
    table = table.join(extra.rename(columns={"tokens_per_s": "decode tok/s", "peak_gib": "peak GiB"}))
    return table.reset_index().sort_values(["model", "protocol", "setting", "method", "budget"], kind="stable")


def _interval_text(lo, hi, n) -> str:
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
        return "—"
    return f"[{lo:.3g}, {hi:.3g}] n={int(n)}"


def budget_table(df: pd.DataFrame, task: str, model: str | None = None, protocol: str | None = None,
                 setting: str | None = None) -> pd.DataFrame:
    """Methods x kept fractions for one task (the layout of kvpress's leaderboard): each cell the score with
    its 95% bootstrap interval and n; the newest complete run of each configuration. ``setting``: only the runs
    of that setting (``collect``'s hash of everything but the method and budget: runs of different settings
    never share a table). Columns: kept fractions, then token counts, in increasing order, then full."""
    done = _complete(select(df, model=model, task=task, protocol=protocol))
    if setting is not None:
        done = done[done["setting"] == setting]
    if done.empty:
        return pd.DataFrame()
    done = done.assign(cell=[f"{s:.3g} [{lo:.3g}, {hi:.3g}] n={int(n)}" if not math.isnan(lo) else f"{s:.3g}"
                             for s, lo, hi, n in zip(done["score"], done["score_lo"].astype(float),
                                                     done["score_hi"].astype(float), done["n_samples"])])
    done = done.assign(kept=[results.kept_label(m, b) for m, b in zip(done["method"], done["budget"])])
    table = done.pivot_table(index="method", columns="kept", values="cell", aggfunc="last")
    table = table.reindex(columns=sorted(table.columns, key=lambda c: (c == results.FULL, 0.0 if c == results.FULL
                                                                       else float(c))))
    table.columns.name = None
    return table.reset_index()


def default_levels(group: pd.DataFrame, col: str) -> list[float]:
    """The median measured ratio of each method's runs at each budget (full excluded), rounded to 3 decimals,
    each distinct value once; values within the tolerance of each other are one level (their mean): a run then
    fills one column, not two, and counts once in the mean rank (a token budget of 512 and a fraction of 0.1
    both hold about a tenth of the KV). Per method, not per budget: codecs all run at budget 1.0 and hold
    different memory, and a median between them would be a level no run is near."""
    comp = group[group["method"] != results.FULL]
    medians = sorted({round(float(v), 3) for v in comp.groupby(["budget", "method"])[col].median().dropna()})
    clusters: list[list[float]] = []
    for m in medians:
        if clusters and m - clusters[-1][0] <= TOLERANCE:
            clusters[-1].append(m)
        else:
            clusters.append([m])
    return sorted({round(sum(c) / len(c), 3) for c in clusters})


def interpolate(points: list[tuple[float, float]], level: float, tolerance: float = TOLERANCE) -> float | None:
    """Score at a measured ratio, linear between a method's own points; None outside their range."""
    pts = sorted(points)
    xs = [p[0] for p in pts]
    if not pts or level < xs[0] - tolerance or level > xs[-1] + tolerance:
        return None
    if level <= xs[0]:
        return pts[0][1]
    if level >= xs[-1]:
        return pts[-1][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= level <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (level - x0) / (x1 - x0)
    return None


def ranking(df: pd.DataFrame, ratio: str = "prefill", levels: list[float] | None = None) -> pd.DataFrame:
    """Methods ranked at matched measured memory, separately for every setting (model, protocol, task and
    everything else but the method: ``setting_of``); a level where fewer than two methods have a score ranks
    nothing and gets no column (a method with no ranked cell keeps its row: 0 cells ranked, no mean rank)."""
    col = f"kv_ratio_{ratio}"
    done = _complete(df).dropna(subset=[col])
    rows, order = [], []
    for (model, protocol, setting), group in done.groupby(["model", "protocol", "setting"], sort=True):
        cells: dict[str, dict] = {}
        for task, tgroup in group.groupby("task", sort=True):
            lv = levels or default_levels(tgroup, col)
            comp = tgroup[tgroup["method"] != results.FULL]
            curves = {m: {what: list(zip(g[col].astype(float), g[what].astype(float)))
                          for what in ("score", "score_lo", "score_hi")} for m, g in comp.groupby("method")}
            for level in lv:
                found = {m: tuple(interpolate(c[what], level) for what in ("score", "score_lo", "score_hi"))
                         for m, c in curves.items()}
                found = {m: v for m, v in found.items() if v[0] is not None}
                if len(found) < 2:  # alone at a memory level: "rank 1 of 1" would lift its mean rank for nothing
                    continue
                order += [c for c in (f"{task} score@{level:g}", f"{task} rank@{level:g}") if c not in order]
                # a rank counts the methods whose interval lies wholly above (interval_ranks), not separations
                ranks = interval_ranks({m: (v[0], v[1] if v[1] is not None else v[0],
                                            v[2] if v[2] is not None else v[0]) for m, v in found.items()})
                for m, (s, lo, hi) in found.items():
                    cells.setdefault(m, {})[f"{task} score@{level:g}"] = s
                    cells[m][f"{task} rank@{level:g}"] = ("=" if list(ranks.values()).count(ranks[m]) > 1 else "") \
                        + str(ranks[m]) + (f" [{lo:.3g}, {hi:.3g}]" if lo is not None and not math.isnan(lo) else "")
                    cells[m].setdefault("_ranks", []).append(float(ranks[m]))
            order += [c for c in [f"{task} full (ratio, score)"] if c not in order]
            for _, ref in tgroup[tgroup["method"] == results.FULL].iterrows():
                cells.setdefault("full", {})[f"{task} full (ratio, score)"] = f"{ref[col]:.3g}, {ref['score']:.3g}"
        for method in sorted(set(group["method"]) - {results.FULL}):  # alone at its memory: listed, not ranked
            cells.setdefault(method, {})
        for method, vals in cells.items():
            ranks = vals.pop("_ranks", [])
            rows.append({"model": model, "protocol": protocol, "setting": setting, "method": method,
                         "mean rank": sum(ranks) / len(ranks) if ranks else None, "cells ranked": len(ranks), **vals})
    if not rows:
        return pd.DataFrame()
    out = pd.DataFrame(rows)
    ranked = sorted((c for c in order if "score@" in c or "rank@" in c),
                    key=lambda c: (c.rsplit(" ", 1)[0], float(c.split("@")[1]), "rank@" in c))
    refs = [c for c in order if "@" not in c and c in out.columns]  # a task may have no full run
    out = out[["model", "protocol", "setting", "method", "mean rank", "cells ranked"] + ranked + refs]
    out["_ref"] = out["method"] == results.FULL
    out = out.sort_values(["model", "protocol", "setting", "_ref", "mean rank", "method"], kind="stable",
                          na_position="last").drop(columns="_ref")
    return out.reset_index(drop=True)


def failures(df: pd.DataFrame) -> pd.DataFrame:
    """Failed points and unreadable run directories (corrupt files), as errors."""
    return df[df["status"].isin(["oom", "crash", "unreadable"])][["model", "task", "protocol", "method", "budget",
                                                                   "status", "error", "run_dir"]]


def _fmt_frame(frame: pd.DataFrame) -> pd.DataFrame:
    def fmt(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "—"
        if isinstance(v, float):
            # 3 significant digits; from 999.5 up, .3g would round to 1e+03: whole numbers
            return f"{v:.3g}" if abs(v) < 999.5 else f"{v:.0f}"
        return str(v)
    return frame.apply(lambda col: col.map(fmt))


def to_markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(none)"
    f = _fmt_frame(frame)
    header = "| " + " | ".join(map(str, f.columns)) + " |"
    sep = "|" + "|".join("---" for _ in f.columns) + "|"
    body = ["| " + " | ".join(v.replace("|", "/") for v in row) + " |" for row in f.astype(str).values.tolist()]
    return "\n".join([header, sep, *body])


def _sections(df: pd.DataFrame, ratio: str, levels):
    """(title, shared settings, ranking, runs) per setting: only runs that differ in nothing but the method
    and its parameters share a table."""
    rank, runs = ranking(df, ratio, levels), runs_table(df, ratio)
    for (model, protocol, setting), g in _complete(df).groupby(["model", "protocol", "setting"], sort=True):
        def part(frame):
            if frame.empty:
                return frame
            mine = frame[(frame["model"] == model) & (frame["protocol"] == protocol) & (frame["setting"] == setting)]
            return mine.drop(columns=["model", "protocol", "setting"]).dropna(axis=1, how="all")
        tasks = ", ".join(sorted(set(g["task"].astype(str))))
        yield f"{model}, {protocol}, {tasks} [{setting}]", g["settings"].iloc[0], part(rank), part(runs)


def legend(ratio: str = "prefill") -> str:
    """What the matched-memory tables' columns mean (markdown: `code` in backticks), above them in every rendering."""
    return (f"Ranked at matched measured memory (KV ratio at {'the start of decoding' if ratio == 'prefill' else 'the end'}"
            "; see `kvbench/leaderboard.py`): `score@r` is a method's score interpolated along its own measured "
            "ratios at ratio r; `—` where r is outside what the method was measured at. `rank@r` is 1 + the "
            "number of methods whose 95% interval at r lies wholly above the method's (`=`: a rank shared), as "
            "LMSYS's arena ranks: two methods of one rank have overlapping intervals, but two of different ranks may "
            "overlap too (a rank is no verdict on a pair: the pairs tables, `kvbench pairs`, say which two differ). "
            "`full` is the reference "
            "(its ratio is slightly above 1: positions and growth slack). Protocols are never mixed.")


def unfinished_text(df: pd.DataFrame) -> str:
    """The runs the tables leave out because they did not finish ('' when none)."""
    incomplete = df[df["status"] == "incomplete"]
    return (f"{len(incomplete)} unfinished run(s) are left out of the tables: " + ", ".join(incomplete["run_id"])
            if not incomplete.empty else "")


def render_markdown(df: pd.DataFrame, ratio: str = "prefill", levels=None, note: str = "") -> str:
    parts = ["# kvbench leaderboard", "", legend(ratio) + (f" {note}" if note else "")]
    for title, shared, r, t in _sections(df, ratio, levels):
        parts += ["", f"## {title}", "", f"Shared settings: {shared}", "", "### Matched memory", "", to_markdown(r),
                  "", "### Runs", "", to_markdown(t)]
    fails = failures(df)
    if not fails.empty:
        parts += ["", "## Failed points and unreadable runs", "", to_markdown(fails)]
    if unfinished_text(df):
        parts += ["", unfinished_text(df)]
    return "\n".join(parts) + "\n"


def render_html_tables(df: pd.DataFrame, ratio: str = "prefill", levels=None) -> str:
    """The leaderboard as HTML fragments (no page around them): used by the report too. The legend and the note on
    unfinished runs as the markdown has them: without them `=2 [..]` and the run count do not read."""
    parts = [f"<p>{_code(_esc(legend(ratio)))}</p>"]
    for title, shared, r, t in _sections(df, ratio, levels):
        parts.append(f"<h2>{_esc(title)}</h2><p>Shared settings: {_esc(shared)}</p><h3>Matched memory</h3>")
        parts.append(_fmt_frame(r).to_html(index=False, border=0, classes="board") if not r.empty else "<p>(none)</p>")
        parts.append("<h3>Runs</h3>")
        parts.append(_fmt_frame(t).to_html(index=False, border=0, classes="board") if not t.empty else "<p>(none)</p>")
    fails = failures(df)
    if not fails.empty:
        parts.append("<h2>Failed points and unreadable runs</h2>" + _fmt_frame(fails).to_html(index=False, border=0, classes="board"))
    if unfinished_text(df):
        parts.append(f"<p>{_esc(unfinished_text(df))}</p>")
    return "\n".join(parts)


def _esc(text: str) -> str:
    import html
    return html.escape(str(text))


def _code(escaped: str) -> str:
    """Markdown's `code` spans of an escaped text as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


PAGE_STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
              "table.board{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}"
              "table.board th,table.board td{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}"
              "table.board th{background:#f4f4f4}figure{margin:1em 0}img{max-width:100%}")


def write(df: pd.DataFrame, out: str | Path = "results", ratio: str = "prefill", levels=None,
          note: str = "", drop: list[tuple[str, str]] | None = None) -> list[Path]:
    """leaderboard.md, .csv (one row per run), .json (runs, ranking), .html and the runs' samples
    (``SAMPLES_FILE``) under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "leaderboard.md", out / "leaderboard.csv", out / "leaderboard.json", out / "leaderboard.html",
             out / SAMPLES_FILE]
    results.write_text(paths[0], render_markdown(df, ratio, levels, note))
    table = df.drop(columns=["run_dir", *(c for c in EXTRA if c in df.columns)])
    results.write_text(paths[1], table.to_csv(index=False))
    rank = ranking(df, ratio, levels)
    payload = {"ratio": ratio, "drop": [list(d) for d in drop or []], "runs": json.loads(table.to_json(orient="records")),
               "ranking": json.loads(rank.to_json(orient="records")) if not rank.empty else []}
    results.write_text(paths[2], json.dumps(payload, indent=1))
    results.write_text(paths[3], f"<!doctype html><html><head><meta charset='utf-8'><title>kvbench leaderboard</title>"
                        f"<style>{PAGE_STYLE}</style></head><body><h1>kvbench leaderboard</h1>"
                        + (f"<p>{_esc(note)}</p>" if note else "")
                        + f"{render_html_tables(df, ratio, levels)}</body></html>\n")
    # the same rows, the same bytes: no time and no (temporary) file name in the gzip header
    with results.atomic_path(paths[4]) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        for _, row in df[df["status"] != "unreadable"].iterrows():
            samples = row_samples(row)
            if samples is not None:
                f.write(results.jsonl_line({"run_id": row["run_id"], "samples": samples}).encode("utf-8"))
    return paths
