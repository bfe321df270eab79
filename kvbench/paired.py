"""Paired comparisons: which methods differ, compared on the samples both ran.

The leaderboard calls two methods tied when their 95% intervals overlap; each interval carries the spread of
the samples' difficulty, which both methods share when they ran the same samples. Here, per model, protocol,
task, task settings and kept fraction, every two methods are compared on the samples both ran: the mean of
their per-sample differences of the headline score and its 95% bootstrap interval
(``kvbench.stats.paired_difference``; per unit where the task's score averages over units of several samples:
AIME's problems, ``Task.score_units``); a pair is *separated* when that interval excludes 0. A cell compares
many pairs (21 for 7 methods), so at 95% a pair with no true difference shows as separated one time in 20:
each pair also says whether it stays separated at the Bonferroni level of its cell (``family``: 95% for all
its pairs together, each interval at 1 - 0.05 / pairs). Runs need their samples: a run folder, or a table's
stored samples (``leaderboard.row_samples``).

``matched_memory``: the cells are measured memory instead of kept fractions, as the leaderboard ranks: runs whose
measured KV ratios (``kv_ratio_prefill``) lie within ``MEMORY_TOLERANCE`` of each other (relative), whatever their
budgets; only the pairs of two different budgets are compared there (a token budget against a fraction, a
composition keeping more tokens coded against an evictor, a codec against an evictor at its bytes), the others
being the kept-fraction cells' own.
"""
from __future__ import annotations

import html
import itertools
import re
from collections import defaultdict
from dataclasses import dataclass, field

import pandas as pd

from kvbench import leaderboard, results
from kvbench.stats import paired_difference


@dataclass
class Pair:
    first: str
    second: str
    mean: float
    lo: float
    hi: float
    n: int
    separated: bool
    family: bool  # separated at the cell's Bonferroni level too


MEMORY_TOLERANCE = 0.05  # matched memory: measured ratios within 5% of each other (0.097 and 0.101 are; 0.075 and 0.1 not)


@dataclass
class Cell:
    model: str
    protocol: str
    task: str
    setting: str
    kept: str  # the kept fraction or budget; with matched memory, the measured ratios the cell spans
    methods: list[str]  # by score, best first
    pairs: list[Pair] = field(default_factory=list)
    matched_memory: bool = False

    @property
    def where(self) -> str:
        return self.kept if self.matched_memory else f"kept {self.kept}"


@dataclass
class _Run:
    name: str  # the method; with matched memory, method@kept
    kept: str
    ratio: float
    scores: list[tuple[float, dict[str, float]]]  # the task's score_units
    score: float


def _natural(value) -> tuple:
    """A sort key that puts numbers in their order inside labels: kept 128 before kept 1024, ~0.1 before ~0.25."""
    parts = re.split(r"(\d+(?:\.\d+)?)", str(value))
    return tuple((0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts))


def _memory_cells(runs: list[_Run]) -> dict[str, list[_Run]]:
    """Runs grouped by measured ratio: sorted, a new cell where a ratio passes the cell's smallest by more than
    the tolerance; cells of one budget only are left out (the kept-fraction cells have their pairs)."""
    out: dict[str, list[_Run]] = {}
    cell: list[_Run] = []
    for run in sorted(runs, key=lambda r: r.ratio) + [None]:
        if cell and (run is None or run.ratio > cell[0].ratio * (1 + MEMORY_TOLERANCE)):
            if len({r.kept for r in cell}) > 1:
                out[f"measured KV ratio {cell[0].ratio:.3g}-{cell[-1].ratio:.3g}"] = cell
            cell = []
        if run is not None:
            cell.append(run)
    return out


def cells(df: pd.DataFrame, task: str | None = None, drop: list[tuple[str, str]] | None = None,
          matched_memory: bool = False) -> tuple[list[Cell], list[str]]:
    """The cells of ``df`` (the newest complete runs with samples), and the run ids left out for want of them.
    ``drop``: samples whose ``meta[KEY]`` is VALUE are left out (as ``leaderboard.collect`` does);
    ``matched_memory``: cells by measured memory, pairs of different budgets only (see the module's docstring)."""
    runs = leaderboard.newest(df)
    runs = runs[(runs["status"] == "complete") & ((runs["task"] == task) if task else True)]
    settings: dict[tuple, list[_Run]] = defaultdict(list)
    missing = []
    for _, row in runs.iterrows():
        samples = leaderboard.row_samples(row)
        if samples is None:
            missing.append(row["run_id"])
            continue
        kept = results.kept_label(row["method"].split("(")[0], row["budget"])
        samples = [s for s in samples if not any(str((s.get("meta") or {}).get(k)) == v for k, v in drop or [])]
        # paired by the units the task's score averages over (AIME's problems, not their correlated generations),
        # each part of a macro average (RULER's task x length, LongBench's datasets) resampled within itself
        scores = leaderboard.scorer(row["task"], row["task_params"])[1](samples)
        name = f"{row['method']} @{kept}" if matched_memory else row["method"]
        settings[(row["model"], row["protocol"], row["task"], row["setting"])].append(
            _Run(name, kept, float(row["kv_ratio_prefill"]), scores, row["score"]))
    groups: dict[tuple, list[_Run]] = {}
    for key, found in settings.items():
        if matched_memory:
            groups.update({key + (label,): cell for label, cell in _memory_cells(found).items()})
        else:
            for run in found:
                groups.setdefault(key + (run.kept,), []).append(run)
    out = []
    for key, cell_runs in sorted(groups.items(), key=lambda kv: tuple(map(_natural, kv[0]))):
        methods = {r.name: (r.scores, r.score, r.kept) for r in cell_runs}
        if len(methods) < 2:
            continue
        order = sorted(methods, key=lambda m: -methods[m][1])
        pairs = [(a, b) for a, b in itertools.combinations(order, 2) if methods[a][2] != methods[b][2]
                 or not matched_memory]
        cell = Cell(*key, methods=order, matched_memory=matched_memory)
        for a, b in pairs:
            mean, lo, hi, n = paired_difference(methods[a][0], methods[b][0])
            if n == 0:
                continue
            apart = lo > 0 or hi < 0
            strict = False
            if apart:
                _, flo, fhi, _ = paired_difference(methods[a][0], methods[b][0], 1 - 0.05 / len(pairs), 20000)
                strict = flo > 0 or fhi < 0
            cell.pairs.append(Pair(a, b, mean, lo, hi, n, apart, strict))
        out.append(cell)
    return out, sorted(missing)


def _verdict(p: Pair) -> str:
    return "separated, family" if p.family else "separated" if p.separated else "not separated"


def to_markdown(found: list[Cell]) -> str:
    parts = ["Paired differences of the headline score (first method minus second) over the samples both ran, 95% "
             "paired bootstrap interval; *separated* when it excludes 0, *family* when it does so at the Bonferroni "
             "level of its table too (`kvbench pairs`; kvbench/paired.py).\n"]
    for c in found:
        rows = [f"| {p.first} | {p.second} | {p.mean:+.1f} [{p.lo:+.1f}, {p.hi:+.1f}] | {p.n} | {_verdict(p)} |"
                for p in c.pairs]
        counts = (sum(p.separated for p in c.pairs), sum(p.family for p in c.pairs), len(c.pairs))
        parts.append(f"### {c.task}: {c.model}, {c.protocol} [{c.setting}], {c.where}\n\n"
                     "| first | second | difference | n | verdict |\n|---|---|---|---|---|\n" + "\n".join(rows)
                     + f"\n\n{counts[0]} of {counts[2]} pairs separated at 95% ({counts[1]} at the family level).\n")
    return "\n".join(parts)


def to_html(found: list[Cell], matched_memory: bool = False) -> str:
    """Per cell, a methods x methods matrix: row minus column, [95% interval]; bold when separated."""
    parts = []
    for c in found:
        by = {(p.first, p.second): p for p in c.pairs}
        # only rows and columns with a pair in them (with matched memory, two runs of one budget have none)
        rows = [m for m in c.methods if any(p.first == m for p in c.pairs)]
        columns = [m for m in c.methods if any(p.second == m for p in c.pairs)]
        head = "".join(f"<th>{html.escape(m)}</th>" for m in columns)
        body = []
        for a in rows:
            tds = []
            for b in columns:
                p = by.get((a, b))
                text = f"{p.mean:+.1f} [{p.lo:+.1f}, {p.hi:+.1f}]" if p else ""
                tds.append(f"<td>{'<b>' + text + ('*' if p.family else '') + '</b>' if p and p.separated else text}</td>")
            body.append(f"<tr><th>{html.escape(a)}</th>{''.join(tds)}</tr>")
        parts.append(f"<h3>{html.escape(c.task)}: {html.escape(c.model)}, {html.escape(c.protocol)} "
                     f"[{c.setting}], {html.escape(c.where)}</h3><table class='board'><tr><th></th>{head}"
                     f"</tr>{''.join(body)}</table>")
    if not parts:
        return ""
    if matched_memory:
        return ("<h2>Paired comparisons at matched memory (different budgets)</h2><p>As above, between runs of "
                f"different budgets whose measured KV ratios lie within {MEMORY_TOLERANCE:.0%} of each other (a "
                "composition, a codec or a "
                "token budget against the evictors at its bytes); same-budget cells are left blank (above).</p>"
                + "\n".join(parts))
    return ("<h2>Paired comparisons (same samples)</h2><p>Row method minus column method: the difference of their "
            "headline scores over the samples both ran, as the score averages them (per problem, or per part of a "
            "macro average such as RULER's task x length, weighted as the score weighs it) [95% paired bootstrap "
            "interval]; bold: the interval excludes 0; *: also at the "
            "Bonferroni level of the table. Only runs whose samples are at hand (run folders, or stored beside an "
            "earlier table).</p>" + "\n".join(parts))
