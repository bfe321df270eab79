"""``kvbench sweep CONFIG.yaml``: the product of models x methods x budgets x tasks x protocols, one run each.

The config (YAML; see ``results/sweep-smollm2-niah.yaml``)::

    out: results                     # results root (runs land in OUT/runs/<id>/)
    models: [smollm2-135m]           # model specs, as ``kvbench run --model`` takes them
    methods: [full, snapkv, h2o]     # ``full`` (and the codecs, `uses_budget`) runs once, at 1.0, whatever the budgets
    budgets: [0.1, 0.25, 0.5]        # fractions kept, or token counts
    tasks: {niah: {lengths: [1024, 2048]}}   # a list of names, or names mapped to task parameters
    protocols: [query-agnostic]      # and/or query-aware
    method_params: {snapkv: {window: 32}}    # optional, per method; a list of mappings runs each (an ablation)
    data: {niah: ../shared/data/paul_graham_essays}   # optional, per task (or one path for all)
    batch_size: 1, limit: null, seed: 0, temperature: 0.0, device: auto, dtype: auto,
    prefill_chunk: null, max_context: null, trace_every: 64

A point whose run already finished (its ``metrics.json`` says complete, for the same configuration) is
skipped without loading anything; an unfinished one resumes where it stopped (the harness's resume). A point
that fails is recorded and the sweep goes on: an out-of-memory error as ``oom``, anything else as
``crash``, with its error, in ``error.json`` inside the run's directory (when the run got one) and in the
sweep's ledger ``OUT/sweeps/<config name>.jsonl``, which lists every point's outcome and directory.

``recorded``: earlier ``leaderboard.json`` tables (``kvbench sweep --recorded``); a point one of them lists as
complete is skipped too, so a sweep extends a committed leaderboard whose run folders are gone. A table row
matches a point on what the table keeps: model, task, protocol, method and its parameters, budget, task
parameters, batch size, limit, device, dtype, and from its ``settings`` text seed, temperature, context, prefill
chunk, data and tensor parallelism (``SETTINGS``).
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Callable

import yaml

from kvbench import registry, results
from kvbench.artifact import ArtifactError
from kvbench.engine import free_memory, resolve_device, resolve_dtype
from kvbench.harness import PROTOCOLS, RunConfig, check_config, failure
from kvbench.task import TaskError

_LISTS = ("models", "methods", "budgets", "tasks", "protocols")
_SCALARS = {f.name for f in fields(RunConfig)} - {"method", "task", "budget", "model", "method_params",
                                                    "task_params", "protocol", "data", "out"}


def load_config(path: str | Path, methods: tuple[str, ...] = (), plan: bool = False) -> dict:
    """The sweep config, checked: a ``TaskError`` names the first problem in one line. ``methods``: run only
    these of its methods (the others are not checked: an artifact one of them lacks does not stop the rest);
    ``plan``: for ``plan_sweep``, where an artifact not made yet is a point still to run, not an error."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no sweep config at {path}")
    try:
        cfg = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise TaskError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(cfg, dict):
        raise TaskError(f"{path} must be a mapping of keys (models, methods, budgets, tasks, ...)")
    known = set(_LISTS) | _SCALARS | {"out", "method_params", "data"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise TaskError(f"{path}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
    cfg.setdefault("models", ["smollm2-135m"])
    cfg.setdefault("budgets", [1.0])
    cfg.setdefault("protocols", ["query-agnostic"])
    for key in ("methods", "tasks"):
        if not cfg.get(key):
            raise TaskError(f"{path}: '{key}' is missing or empty")
    for key in _LISTS:
        if isinstance(cfg[key], (str, int, float)):
            cfg[key] = [cfg[key]]
    if isinstance(cfg["tasks"], list):
        cfg["tasks"] = {name: {} for name in cfg["tasks"]}
    method_params = cfg.get("method_params") or {}
    if not isinstance(method_params, dict):
        raise TaskError(f"{path}: 'method_params' maps method names to their parameters")
    # A misspelt name would be ignored: its method or task would run with the defaults (NIAH on the built-in
    # filler, not the essays). A known method or task the sweep does not run is kept (a config copied from
    # another, or methods left out by --methods).
    known = {"method_params": lambda k: all(part in registry.METHODS for part in str(k).split("+")),
             "data": lambda k: k in registry.TASKS}
    for key, names, what in (("method_params", cfg["methods"], "methods"), ("data", cfg["tasks"], "tasks")):
        given = cfg.get(key)
        stray = sorted(str(k) for k in given if k not in names and not known[key](k)) if isinstance(given, dict) else []
        if stray:
            raise TaskError(f"{path}: {key} names '{stray[0]}', which is neither one of its {what} "
                            f"({', '.join(map(str, names))}) nor a known one; fix the name or remove the entry")
    if methods:
        absent = [m for m in methods if m not in cfg["methods"]]
        if absent:
            raise TaskError(f"{path}: --methods {absent[0]} is not one of its methods ({', '.join(cfg['methods'])})")
        cfg["methods"] = [m for m in cfg["methods"] if m in methods]
    for proto in cfg["protocols"]:
        if proto not in PROTOCOLS:
            raise TaskError(f"{path}: unknown protocol '{proto}' (use {', '.join(PROTOCOLS)})")
    from kvbench.models import check_exists
    for spec in cfg["models"]:
        check_exists(str(spec))  # a path that is not there fails now, not once per point
    for m in cfg["methods"]:
        for params in _variants(method_params, m):
            if not isinstance(params, dict):
                raise TaskError(f"{path}: method_params.{m} is a mapping of parameters, or a list of them (one run each)")
            try:
                registry.build_method(m, 1.0, params)  # unknown names and parameters fail here
            except ArtifactError:
                if not plan:  # a plan for the GPU machine may name artifacts trained there first
                    raise
    for t, params in cfg["tasks"].items():
        registry.build_task(t, params or {})
    from kvbench.method import BudgetError, parse_budget
    try:
        cfg["budgets"] = [parse_budget(b) for b in cfg["budgets"]]
    except BudgetError as e:
        raise TaskError(f"{path}: {e}") from None
    cfg["name"] = p.stem
    for point in points(cfg):  # limit, batch size, temperature, ... of every point, before anything runs
        try:
            check_config(point)
        except TaskError as e:
            raise TaskError(f"{path}: {e}") from None
    return cfg


def _variants(method_params: dict, method: str) -> list:
    """A method's parameter sets: ``method_params[method]`` is one mapping, or a list of them (an ablation)."""
    given = method_params.get(method) or {}
    return given if isinstance(given, list) else [given]


def points(cfg: dict) -> list[RunConfig]:
    """Every run of the sweep, in order: per model, per task, per protocol, per method, per budget."""
    out = []
    scalars = {k: cfg[k] for k in _SCALARS if k in cfg}
    data = cfg.get("data")
    for model in cfg["models"]:
        for task, task_params in cfg["tasks"].items():
            for protocol in cfg["protocols"]:
                for method in cfg["methods"]:
                    for params, budget in itertools.product(_variants(cfg.get("method_params") or {}, method),
                                                            cfg["budgets"] if registry.uses_budget(method) else [1.0]):
                        out.append(RunConfig(
                            method=method, task=task, budget=budget, model=str(model), method_params=dict(params),
                            task_params=dict(task_params or {}), protocol=protocol,
                            data=data.get(task) if isinstance(data, dict) else data,
                            out=str(cfg.get("out", "results")), **scalars))
    return out


def _normal(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


_MATCH = ("model", "random_weights", "trust_remote_code", "method", "task", "budget", "protocol", "prefill_chunk", "batch_size", "seed",
          "temperature", "data", "limit", "max_context", "trace_every")


def identity(cfg: RunConfig) -> str:
    """What makes two runs the same run, computed without loading the model (the harness's id needs it)."""
    device = resolve_device(cfg.device)
    key = {k: getattr(cfg, k) for k in _MATCH}
    key.update(device=device.split(":")[0], dtype=str(resolve_dtype(cfg.dtype, device)).replace("torch.", ""),
               method_params=asdict(registry.build_method(cfg.method, cfg.budget, cfg.method_params)),
               task_params=asdict(registry.build_task(cfg.task, cfg.task_params)))
    return _normal(key)


def _config_identity(config: dict) -> str:
    key = {k: config.get(k) for k in _MATCH}
    key.update(device=config.get("device"), dtype=config.get("dtype"), method_params=config.get("method_params"),
               task_params=config.get("task_params"))
    if config.get("tensor_parallel"):  # a `run --tp` run is not the one-process point a sweep plans
        key["tensor_parallel"] = config["tensor_parallel"]
    return _normal(key)


def existing_runs(out: str | Path) -> dict[str, Path]:
    """identity -> run directory, for every run under ``out``."""
    found = {}
    for run_dir in results.iter_runs(Path(out)):
        config = results.read_json(run_dir / "config.json")
        if not isinstance(config, dict):
            continue
        found[_config_identity(config)] = run_dir
    return found


# Run settings that change a run's numbers and that a table keeps only in its ``settings`` text, with their
# defaults: that text leaves out a value that is 0, None or False (``leaderboard._setting_text``), so a key
# missing there is at its default, and a point that sets another value is not recorded by that row.
SETTINGS = {"seed": 0, "temperature": 0.0, "max_context": None, "prefill_chunk": None, "data": None,
            "tensor_parallel": None}


def settings_text(text) -> dict:
    """A table row's ``settings`` (``key=<json>, key=<json>, ...``) as a dict; {} for none. Read value by value
    with the JSON decoder: a value (a needle's text) may itself hold ``, key=``."""
    out, decode, i = {}, json.JSONDecoder().raw_decode, 0
    while isinstance(text, str) and i < len(text):
        key = text[i:text.index("=", i)]
        out[key], i = decode(text, i + len(key) + 1)
        i += len(", ")
    return out


def _recorded_key(model, task, protocol, method, budget, method_params: dict, task_params: dict, batch_size, limit,
                  device, dtype, artifact: str | None = None, settings: dict | None = None) -> str:
    """``artifact``: the first 12 hex of the artifact's identity (``kvbench.artifact.identity``), None without one:
    a codec retrained under the same directory name is another method, so its points are not recorded. The
    method's parameters count by what they change from its current defaults (its label), so a parameter added
    to a method later, at a default that keeps what the method did, leaves the recorded rows recorded.
    ``settings``: the run's values of ``SETTINGS``; one left out is at its default."""
    from kvbench.leaderboard import comparable_task_params, method_label, model_label
    settings = {k: (settings or {}).get(k, default) for k, default in SETTINGS.items()}
    settings["temperature"] = float(settings["temperature"])  # 1 and 1.0 are one temperature
    return _normal([model_label(model), task, protocol, method_label(method.split("(")[0], method_params),
                    float(budget), comparable_task_params(task, task_params), int(batch_size),
                    None if limit is None else int(limit), settings, device, dtype, artifact])


def point_key(cfg: RunConfig) -> str:
    """A point as a leaderboard table records it (see ``recorded``)."""
    from kvbench.models import ALIASES
    from kvbench.artifact import identity
    device = resolve_device(cfg.device)
    method = registry.build_method(cfg.method, cfg.budget, cfg.method_params)
    paths = method.artifact_paths()
    return _recorded_key(ALIASES.get(cfg.model, cfg.model), cfg.task, cfg.protocol, cfg.method, cfg.budget,
                         json.loads(_normal(asdict(method))),
                         json.loads(_normal(asdict(registry.build_task(cfg.task, cfg.task_params)))), cfg.batch_size,
                         cfg.limit, device.split(":")[0], str(resolve_dtype(cfg.dtype, device)).replace("torch.", ""),
                         results.short_artifact(identity(paths)) if paths else None,
                         {k: getattr(cfg, k, default) for k, default in SETTINGS.items()})


def recorded(tables) -> dict[str, str]:
    """point key -> the table that lists it as complete, over earlier ``leaderboard.json`` tables."""
    from kvbench import leaderboard
    out = {}
    for table in tables:
        rows = leaderboard.earlier(table, drop=None, any_drop=True)
        for row in rows[rows["status"] == "complete"].itertuples():
            limit = None if row.limit is None or row.limit != row.limit else row.limit  # NaN: none
            artifact = row.artifact if isinstance(row.artifact, str) else None  # NaN: a table from before the column
            out[_recorded_key(row.model, row.task, row.protocol, row.method, row.budget, json.loads(row.method_params),
                              json.loads(row.task_params), row.batch_size, limit, row.device, row.dtype,
                              artifact, settings_text(row.settings))] = str(table)
    return out


def is_finished(run_dir: Path | None) -> bool:
    if run_dir is None or not (run_dir / "metrics.json").exists():
        return False
    metrics = results.read_json(run_dir / "metrics.json")
    return isinstance(metrics, dict) and metrics.get("complete") is True


def _resumes(run_dir: Path | None) -> str:
    """`` (resumes after N samples)`` for a cut run whose folder holds N whole sample lines (what a GPU session
    has left to do depends on it), else nothing."""
    path = run_dir / "samples.jsonl" if run_dir is not None else None
    if path is None or not path.is_file():
        return ""
    with open(path, "rb") as f:
        n = sum(1 for line in f if line.endswith(b"\n") and line.strip())  # a torn last line is not a sample
    return f" (resumes after {n} samples)" if n else ""


def label(cfg: RunConfig) -> str:
    return f"{cfg.model} {cfg.task} {cfg.protocol} {cfg.method}@{cfg.budget}"


def _for_device(plan: list[RunConfig], device: str | None) -> list[RunConfig]:
    """The points with the config's ``auto`` device made ``device`` (none: this machine's)."""
    return [replace(p, device=device) if device and p.device == "auto" else p for p in plan]


def plan_sweep(path: str | Path, tables: tuple = (), device: str | None = None,
               echo: Callable[[str], None] = print, methods: tuple[str, ...] = ()) -> list[tuple[RunConfig, str]]:
    """What ``run_sweep`` would do now, without loading a model: each point with ``finished`` (its run folder
    under the config's out), ``recorded`` (an earlier table lists it) or ``to run``. ``device`` stands for the
    config's ``auto``: a plan made here for the GPU machine (its device and dtype are in the recorded keys)."""
    cfg = load_config(path, methods, plan=True)
    plan = _for_device(points(cfg), device)
    known, in_tables = existing_runs(Path(cfg.get("out", "results"))), recorded(tables)
    out = []
    for i, point in enumerate(plan, 1):
        try:
            run_dir = known.get(identity(point))
            status = ("finished" if is_finished(run_dir) else
                      "recorded" if point_key(point) in in_tables else "to run" + _resumes(run_dir))
        except ArtifactError as e:  # not here: it cannot be recorded (a table's run read another artifact)
            status = f"to run, once its artifact is made ({e})"
        echo(f"[{i}/{len(plan)}] {label(point)}: {status}")
        out.append((point, status))
    counts = {s: sum(st.startswith(s) for _, st in out) for s in ("to run", "recorded", "finished")}
    echo(f"plan {cfg['name']}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    here = {resolve_device(p.device).split(":")[0] for p in plan}
    elsewhere = sorted({json.loads(key)[-3] for key in in_tables} - here)  # the keys' device
    if elsewhere and not device:  # the table's runs cannot match points planned for this machine's device
        echo(f"note: the tables record runs on {', '.join(elsewhere)}; this plan is for {', '.join(sorted(here))} "
             f"(--device {elsewhere[0]} plans for that machine)")
    return out


def run_sweep(path: str | Path, echo: Callable[[str], None] = print, load_model: Callable | None = None,
              progress: bool = True, ranks=None, tables: tuple = (), device: str | None = None,
              methods: tuple[str, ...] = ()) -> list[dict]:
    """Run (or finish) a sweep; returns one outcome per point. Several processes may run the same sweep at once
    (lanes on one GPU): each skips the points another has finished or holds (``busy``: the run directory's lock),
    so together they run every point once. ``load_model(spec, dtype, device, seed)``
    defaults to ``kvbench.models.load``. ``ranks`` (``kvbench.distributed``): under torchrun, this rank runs
    every world-th point and rank 0 returns (and reports) every point's outcome. ``tables``: earlier
    leaderboard.json files whose complete runs are skipped (``recorded``); ``device``: for the config's ``auto``;
    ``methods``: only these of the config's."""
    from kvbench import distributed, models
    from kvbench.harness import run
    cfg = load_config(path, methods)
    plan = _for_device(points(cfg), device)
    out = Path(cfg.get("out", "results"))
    ledger = out / "sweeps" / f"{cfg['name']}.jsonl"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    ranks = ranks or distributed.SINGLE  # [distributed]
    # A line cut off by an earlier sweep that was killed is trimmed now: the next append would join it and corrupt
    # the ledger's middle. Rank 0 appends to the ledger itself too, at the end (merge_ledger). [distributed]
    for path in {distributed.ledger_path(ledger, ranks), *([ledger] if ranks.main else [])}:
        results.read_jsonl(path, repair=True)
    # The points' own model options: random weights and remote code are loaded as each point says.
    load_model = load_model or (lambda spec, dtype, device, seed, random_weights=False, trust_remote_code=False:
                                models.load(spec, dtype, device, random_weights, trust_remote_code, seed=seed))
    known = existing_runs(out)
    in_tables = recorded(tables)
    outcomes, loaded, sample_memo = [], {}, {}
    if ranks.main:  # [distributed]
        echo(f"sweep {cfg['name']}: {len(plan)} runs; results under {out / 'runs'}"
             + (f" ({ranks.world} processes)" if ranks.sharded else ""))
    for i, point in enumerate(plan, 1):
        if not distributed.owns(i - 1, ranks):  # [distributed] another rank's point
            continue
        ident = identity(point)
        prefix = f"[{i}/{len(plan)}] {label(point)}"
        if not is_finished(known.get(ident)):  # another process on the same sweep (a lane) may have finished it
            known = existing_runs(out)
        if is_finished(known.get(ident)):
            outcome = {"status": "skipped", "run_dir": str(known[ident]), "note": "already finished"}
            echo(f"{prefix}: already finished -> {known[ident]}")
        elif point_key(point) in in_tables:
            outcome = {"status": "skipped", "run_dir": None, "note": f"recorded in {in_tables[point_key(point)]}"}
            echo(f"{prefix}: {outcome['note']}")
        else:
            outcome = _run_point(point, ident, loaded, load_model, out, run, progress, sample_memo)
            where = outcome.get("run_dir") or "(no run directory)"
            detail = f" ({outcome['error']})" if outcome.get("error") else ""
            echo(f"{prefix}: {outcome['status']}{detail} -> {where}")
        record = {"point": {k: v for k, v in asdict(point).items() if k != "out"}, **outcome,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        results.append_jsonl(distributed.ledger_path(ledger, ranks), record)  # [distributed] one file per rank
        outcomes.append((i, record))
    outcomes = distributed.merge_ledger(ledger, outcomes, ranks)  # [distributed] rank 0: all, in plan order
    if not ranks.main:  # [distributed]
        return outcomes
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o["status"]] = counts.get(o["status"], 0) + 1
    echo("sweep done: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"; ledger {ledger}")
    return outcomes


def _run_point(point: RunConfig, ident: str, loaded: dict, load_model, out: Path, run, progress: bool,
               sample_memo: dict) -> dict:
    device = resolve_device(point.device)
    dtype = resolve_dtype(point.dtype, device)
    started = time.perf_counter()
    try:
        key = (point.model, str(dtype), device, point.random_weights, point.trust_remote_code, point.seed)
        if key not in loaded:
            loaded.clear()  # one model in memory at a time
            sample_memo.clear()
            free_memory()
            options = {k: v for k, v in (("random_weights", point.random_weights),
                                         ("trust_remote_code", point.trust_remote_code)) if v}
            loaded[key] = load_model(point.model, dtype, device, point.seed, **options)
            done = existing_runs(out).get(ident)
            if is_finished(done):  # another lane finished it while this one loaded
                return {"status": "skipped", "run_dir": str(done), "note": "already finished",
                        "seconds": time.perf_counter() - started}
        run_dir = run(point, lm=loaded[key], progress=progress, sample_memo=sample_memo)
    except results.RunLockedError as e:  # the same point is being run right now by another process
        return {"status": "busy", "error": str(e), "run_dir": None, "seconds": time.perf_counter() - started}
    except Exception as e:  # in the ledger (error.json is the harness's), and the sweep goes on; Ctrl-C stops it
        failed = failure(e)
    else:
        failed = None
    if failed:
        # Freed outside the handler, once the exception's frames (and the tensors they hold) are gone.
        free_memory()
        run_dir = existing_runs(out).get(ident)
        return {"status": failed["status"], "error": failed["error"], "run_dir": str(run_dir) if run_dir else None,
                "seconds": time.perf_counter() - started}
    status = "done" if is_finished(run_dir) else "incomplete"
    return {"status": status, "run_dir": str(run_dir), "seconds": time.perf_counter() - started}
