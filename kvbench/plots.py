"""``kvbench plot``: the figures of a results root, as PNG and SVG (matplotlib, Agg backend: no display).

- ``score-vs-kv-<model>-<protocol>-<task>``: the task's score against the measured KV ratio, a line per
  method through its budgets (the ``full`` reference as a star);
- ``niah-<model>-<protocol>-budget<b>``: needle-in-a-haystack score per (context length, depth), one
  heatmap per method at that budget;
- ``kv-steps-<model>-<task>``: the KV bytes the cache holds (all layers, as measured from the stores) at
  the end of prefill (step 0) and every traced decoding step, a line per method (runs decoded at batch 1);
- ``throughput-<model>``: decode tokens/s and peak device memory against context length, a line per
  method at its budget (from the runs' per-sample traces), and ``bench-<name>`` from ``kvbench bench``
  results: decode tokens/s and peak memory against context length per implementation and batch size.

Each figure is titled with what it shows and the model, protocol and task it shows it for; axes carry
their units; legends name methods with their budgets.
"""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from kvbench import leaderboard, results  # noqa: E402

GIB = 1024 ** 3
FORMATS = ("png", "svg")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-").lower()


def _save(fig, out: Path, name: str) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in FORMATS:
        path = out / f"{name}.{ext}"
        with results.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format=ext)
        paths.append(path)
    plt.close(fig)
    return paths


MARKERS = ("o", "s", "^", "D")
# tab20's ten dark colours, their light twins, then eight of hues tab20 lacks (navy, dark red, magenta, black,
# dark turquoise, olive, indigo, lime): 28 told apart
PALETTE = ([plt.get_cmap("tab20")(2 * k) for k in range(10)] + [plt.get_cmap("tab20")(2 * k + 1) for k in range(10)]
           + ["#000080", "#8b0000", "#ff00ff", "#000000", "#00ced1", "#808000", "#4b0082", "#7cfc00"])


def method_styles(methods) -> dict[str, dict]:
    """A colour and marker per method (``full`` aside: the black star), by its place among ``methods`` sorted: given
    every method the figures show, a method looks the same in each figure, whichever others ran that task.
    ``PALETTE``'s 28 colours, then the marker tells the 29th from the first: with ten colours the Qwen figures
    (23 methods) drew snapkv and compresskv, side by side at the top, in one orange."""
    names = sorted({str(m) for m in methods} - {results.FULL})
    return {m: {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i // len(PALETTE) % len(MARKERS)]}
            for i, m in enumerate(names)}


def _ratio_label(ratio: str) -> str:
    when = "when decoding starts" if ratio == "prefill" else "at the end of decoding"
    return f"measured KV ratio {when}\n(bytes held / bytes of a plain full cache)"


def score_vs_ratio(df: pd.DataFrame, out: Path, ratio: str = "prefill", styles: dict | None = None,
                   drop: list[tuple[str, str]] | None = None) -> list[Path]:
    """``drop``: the samples ``df`` was scored without (``leaderboard.collect``), said in each title."""
    col = f"kv_ratio_{ratio}"
    done = df[(df["status"] == "complete") & df["score"].notna() & df[col].notna()]
    styles = styles or method_styles(done["method"])  # one style per method across all the figures
    paths = []
    for (model, protocol, task), whole in done.groupby(["model", "protocol", "task"], sort=True):
        # runs of one task under different settings (e.g. fidelity teacher-forced and stepwise) are not one
        # curve: a figure per setting, named and titled by what sets it apart
        apart = _what_differs(whole)
        for setting, g in whole.groupby("setting", sort=True):
            paths += _score_figure(g, out, col, ratio, model, protocol, task,
                                   (setting, apart[setting]) if len(apart) > 1 else None, styles, drop)
    return paths


SETTING_FIELDS = ("limit", "batch_size", "dtype", "device", "data")


def _what_differs(runs: pd.DataFrame) -> dict[str, str]:
    """Per setting of one task's runs: the task parameters and run fields in which it differs from the others."""
    flat = {}
    for setting, g in runs.groupby("setting", sort=True):
        row = g.iloc[0]
        params = json.loads(row["task_params"]) if isinstance(row["task_params"], str) else {}
        flat[setting] = {**{k: json.dumps(v, sort_keys=True) for k, v in params.items()},
                         **{k: str(row.get(k)) for k in SETTING_FIELDS}}
    keys = sorted({k for f in flat.values() for k in f})
    differ = [k for k in keys if len({f.get(k) for f in flat.values()}) > 1]
    return {s: ", ".join(f"{k}={f.get(k)}" for k in differ) for s, f in flat.items()}


def _settings(runs: pd.DataFrame):
    """(setting, its runs, (setting, what sets it apart) or None when the runs have one setting): runs of other
    settings of a task measure different things, so no figure draws them together."""
    apart = _what_differs(runs)
    for setting, g in runs.groupby("setting", sort=True):
        yield setting, g, ((setting, apart[setting]) if len(apart) > 1 else None)


def _score_figure(g: pd.DataFrame, out: Path, col: str, ratio: str, model: str, protocol: str, task: str,
                  setting: tuple[str, str] | None, styles: dict | None = None,
                  drop: list[tuple[str, str]] | None = None) -> list[Path]:
    fig, ax = plt.subplots(figsize=(7.5, 5))
    styles = styles or method_styles(g["method"])
    for method, mg in g[g["method"] != results.FULL].groupby("method", sort=True):
        mg = mg.sort_values(col)
        x, lo, hi = mg[col].astype(float), mg["score_lo"].astype(float), mg["score_hi"].astype(float)
        line, = ax.plot(x, mg["score"], label=method, **styles[method])
        if len(mg) > 1 and lo.notna().all():  # the 95% bootstrap interval of each point, as a band
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.12, linewidth=0)
        else:  # a band through one point has no width: its interval as a bar
            known = lo.notna() & hi.notna()
            if known.any():
                ax.vlines(x[known], lo[known], hi[known], color=line.get_color(), alpha=0.5, linewidth=2)
        for _, r in mg.iterrows():
            ax.annotate(f"{r['budget']:g}", (r[col], r["score"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points", alpha=0.7)
    for _, r in g[g["method"] == results.FULL].iterrows():
        ax.plot([r[col]], [r["score"]], marker="*", markersize=14, color="black", linestyle="none",
                label=f"full (reference, ratio {r[col]:.2f})")
    ax.set_xlabel(_ratio_label(ratio))
    ax.set_ylabel(f"{task} score (task's headline metric, 0-100)")
    ax.set_title(f"{task}: score against measured KV memory\n{model}, {protocol} protocol "
                 "(labels: each point's budget; bands, or bars for\na method measured at one point: 95% intervals)"
                 + (f"\nsetting [{setting[0]}]: {setting[1]}" if setting else "")
                 + (f"\n{leaderboard.drop_text(drop)}" if drop else ""))
    ax.grid(alpha=0.3)
    # beside the axes, not on them: the best points sit at the top right, where a legend inside would go
    ax.legend(title="method", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, out, f"score-vs-kv-{slug(model)}-{slug(protocol)}-{slug(task)}"
                 + (f"-{setting[0]}" if setting else ""))


def _niah_grid(row, drop: list[tuple[str, str]] | None = None) -> list[dict]:
    """The run's cells (length, depth, score), less the samples ``drop`` leaves out of its score (the grid shows
    what the tables score)."""
    if not isinstance(row.get("run_dir"), str):  # an earlier table's run: its stored samples, if any
        grid = [{**r["meta"], **r["scores"]} for r in leaderboard.row_samples(row) or []]
    else:
        metrics = results.read_json(Path(row["run_dir"]) / "metrics.json")
        grid = ((metrics.get("summary") or {}).get("grid") or []) if isinstance(metrics, dict) else []
    return [c for c in grid if not any(str(c.get(k)) == v for k, v in drop or ())]


def niah_heatmaps(df: pd.DataFrame, out: Path, drop: list[tuple[str, str]] | None = None) -> list[Path]:
    done = df[(df["status"] == "complete") & (df["task"] == "niah")]
    paths = []
    for (model, protocol), whole in done.groupby(["model", "protocol"], sort=True):
        for _, g, setting in _settings(whole):
            paths += _niah_figures(g, out, drop, model, protocol, setting)
    return paths


def _niah_figures(g: pd.DataFrame, out: Path, drop, model: str, protocol: str,
                  setting: tuple[str, str] | None) -> list[Path]:
    paths = []
    budgets = sorted({float(b) for b in g[g["method"] != results.FULL]["budget"]}) or [1.0]
    ref = g[g["method"] == results.FULL]
    for budget in budgets:
        runs = [r for _, r in ref.iterrows()] + [r for _, r in g[(g["method"] != results.FULL) & (
            g["budget"].astype(float) == budget)].sort_values("method").iterrows()]
        grids = [(r, _niah_grid(r, drop)) for r in runs]
        grids = [(r, gr) for r, gr in grids if gr]
        if not grids:
            continue
        cols = min(4, len(grids))
        rows = -(-len(grids) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1, 3.0 * rows + 1), squeeze=False,
                                 layout="constrained")
        image = None
        for ax, (r, grid) in zip(axes.flat, grids):
            cells = pd.DataFrame(grid).pivot_table(index="depth", columns="length", values="score", aggfunc="mean")
            image = ax.imshow(cells.values, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
            ax.set_xticks(range(len(cells.columns)), [str(c) for c in cells.columns], fontsize=7)
            ax.set_yticks(range(len(cells.index)), [f"{d:.0%}" for d in cells.index], fontsize=7)
            ax.set_xlabel("context length (tokens)", fontsize=8)
            ax.set_ylabel("needle depth", fontsize=8)
            label = results.point_label(r["method"], r["budget"])
            # wrapped: a method with an artifact is named at length, and titles side by side would overlap
            ax.set_title(textwrap.fill(f"{label} (KV ratio {r['kv_ratio_prefill']:.2f})", 44), fontsize=8)
            for (i, j), v in pd.DataFrame(cells.values).stack().items():
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6)
        for ax in list(axes.flat)[len(grids):]:
            ax.axis("off")
        fig.suptitle(f"Needle in a haystack, budget {budget:g}: score per length x depth\n{model}, {protocol} "
                     "protocol (score: the run's headline metric, %; found: the needle's key phrase in the "
                     "answer)" + (f"\nsetting [{setting[0]}]: {setting[1]}" if setting else "")
                     + (f"\n{leaderboard.drop_text(drop)}" if drop else ""), fontsize=10)
        fig.colorbar(image, ax=axes, shrink=0.8, label="score (%)")
        paths += _save(fig, out, f"niah-{slug(model)}-{slug(protocol)}-budget{budget:g}"
                       + (f"-{setting[0]}" if setting else ""))
    return paths


def _trace_series(run_dir: Path) -> list[tuple[int, float]] | None:
    """(step, KV bytes held over all layers) of the run's first sample traced at batch size 1."""
    for rec in results.read_jsonl(Path(run_dir) / "trace.jsonl"):
        steps = rec.get("kv_layer_bytes_steps") or {}
        if rec.get("kv_layer_bytes_prefill") and steps:
            series = [(0, float(sum(rec["kv_layer_bytes_prefill"])))]
            series += sorted((int(k), float(sum(v))) for k, v in steps.items())
            return series
    return None


def kv_over_steps(df: pd.DataFrame, out: Path) -> list[Path]:
    done = df[df["status"] == "complete"]
    paths = []
    for (model, task, protocol), whole in done.groupby(["model", "task", "protocol"], sort=True):
        for _, g, setting in _settings(whole):
            series = [(r, _trace_series(r["run_dir"])) for _, r in g.sort_values(["method", "budget"]).iterrows()]
            series = [(r, s) for r, s in series if s]
            if not series:
                continue
            fig, ax = plt.subplots(figsize=(7.5, 5))
            for r, s in series:
                label = results.point_label(r["method"], r["budget"])
                ax.plot([x for x, _ in s], [y / 1024 ** 2 for _, y in s], marker=".", label=label)
            ax.set_xlabel("decoding step (0: end of prefill)")
            ax.set_ylabel("KV bytes held, all layers (MiB, measured from the stores)")
            ax.set_title(f"KV memory while decoding: {task}, one sample at batch size 1\n{model}, {protocol} protocol"
                         + (f"\nsetting [{setting[0]}]: {setting[1]}" if setting else ""))
            ax.grid(alpha=0.3)
            ax.legend(title="method @ budget", fontsize=8)
            paths += _save(fig, out, f"kv-steps-{slug(model)}-{slug(task)}-{slug(protocol)}"
                           + (f"-{setting[0]}" if setting else ""))
    return paths


def _per_context(run_dir: Path) -> pd.DataFrame:
    rows = []
    trace = {r["id"]: r for r in results.read_jsonl(Path(run_dir) / "trace.jsonl")}
    for s in results.read_jsonl(Path(run_dir) / "samples.jsonl"):
        t = trace.get(s["id"], {})
        peak = t.get("peak_decode") or {}
        rows.append({"length": (s.get("meta") or {}).get("length", s.get("context_tokens")),
                     "tokens_per_s": s.get("tokens_per_s"), "batch": s.get("batch_size"),
                     "peak": results.peak_bytes(peak)})
    return pd.DataFrame(rows)


def throughput(df: pd.DataFrame, out: Path, styles: dict | None = None) -> list[Path]:
    # a run without speed (timed on a shared device, or resumed under other conditions) has no throughput to draw
    done = df[(df["status"] == "complete") & (df["protocol"] == "query-agnostic") & df["tokens_per_s"].notna()]
    paths = []
    for model, g in done.groupby("model", sort=True):
        task = "niah" if (g["task"] == "niah").any() else sorted(g["task"])[0]
        for _, runs, setting in _settings(g[g["task"] == task]):
            paths += _throughput_figure(runs, out, styles, model, task, setting)
    return paths


def _throughput_figure(g: pd.DataFrame, out: Path, styles: dict | None, model: str, task: str,
                       setting: tuple[str, str] | None) -> list[Path]:
    lines = []
    for _, r in g.sort_values(["method", "budget"]).iterrows():
        pc = _per_context(r["run_dir"]).dropna(subset=["length", "tokens_per_s"])
        if pc["length"].nunique() >= 2:
            lines.append((r, pc.groupby("length").agg(tps=("tokens_per_s", "mean"), peak=("peak", "max"))))
    if not lines:
        return []
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 5), layout="constrained")
    batch = sorted({int(b) for b in g["batch_size"].dropna()})
    colours = styles or method_styles(r["method"] for r, _ in lines)
    budgets = sorted({float(r["budget"]) for r, _ in lines if r["method"] != results.FULL})
    dashes = ["-", "--", ":", "-."]
    for r, pc in lines:
        # One color per method (as in the score figures; full in black, as its star), one line style per
        # budget: a reader can follow a method across budgets.
        style = dict(color="black" if r["method"] == results.FULL else colours[r["method"]]["color"], marker="o",
                     linestyle="-" if r["method"] == results.FULL else dashes[budgets.index(float(r["budget"])) % 4])
        label = results.point_label(r["method"], r["budget"])
        a1.plot(pc.index, pc["tps"], label=label, **style)
        if pc["peak"].notna().any():
            a2.plot(pc.index, pc["peak"] / GIB, label=label, **style)
    a1.set_xlabel("context length (tokens)")
    a1.set_ylabel("decode tokens/s (all sequences of a batch)")
    a1.set_title("decode throughput")
    a2.set_xlabel("context length (tokens)")
    a2.set_ylabel("peak memory while decoding (GiB)")
    a2.set_title("peak memory (allocated on CUDA, resident on the CPU)")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend(title="method @ budget", fontsize=7, ncol=2)
    fig.suptitle(f"Throughput and memory against context length: {model}, {task} runs "
                 f"(query-agnostic, batch size {', '.join(map(str, batch))})"
                 + (f"\nsetting [{setting[0]}]: {setting[1]}" if setting else ""))
    return _save(fig, out, f"throughput-{slug(model)}" + (f"-{setting[0]}" if setting else ""))


def bench_plots(bench_root: Path, out: Path) -> list[Path]:
    """From ``kvbench bench`` results: tokens/s and peak memory against context length (and batch)."""
    paths = []
    for jl in sorted(Path(bench_root).glob("*/bench.jsonl")):
        recs = results.read_jsonl(jl)
        env = next((r for r in recs if r.get("kind") == "env"), {})
        pts = pd.DataFrame([r for r in recs if r.get("kind") in ("point", "largest_batch_result")
                            and r.get("status") == "ok"])
        if pts.empty:
            continue
        pts["peak_gib"] = pts["peak"].map(lambda p: (results.peak_bytes(p) or 0) / GIB)
        pts["series"] = pts.apply(lambda r: f"{r['impl']} {r['method']}" + (
            "" if r["method"] == results.FULL else f"@{r['budget']:g}"), axis=1)
        x_is_context = pts["context"].nunique() > 1
        xcol, xlabel = ("context", "context length (tokens)") if x_is_context else ("batch", "batch size (sequences)")
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 5), layout="constrained")
        for (series, other), g in pts.groupby(["series", "batch" if x_is_context else "context"], sort=True):
            g = g.sort_values(xcol)
            label = f"{series}, " + (f"batch {other}" if x_is_context else f"context {other}")
            a1.plot(g[xcol], g["decode_tok_s"], marker="o", label=label)
            a2.plot(g[xcol], g["peak_gib"], marker="o", label=label)
        a1.set_xlabel(xlabel)
        a1.set_ylabel("decode tokens/s (all sequences)")
        a1.set_title("decode throughput")
        a2.set_xlabel(xlabel)
        a2.set_ylabel("peak memory (GiB; allocated on CUDA, resident on CPU)")
        a2.set_title("peak memory")
        for ax in (a1, a2):
            ax.grid(alpha=0.3)
        a1.legend(fontsize=7)
        fig.suptitle(f"kvbench bench: {env.get('model', '?')} ({env.get('dtype', '?')}) on {env.get('device_name', '?')}, "
                     f"{env.get('new_tokens', '?')} new tokens")
        paths += _save(fig, out, f"bench-{slug(jl.parent.name)}")
    return paths


KINDS = ("score", "niah", "kv-steps", "throughput", "bench")


def make_all(root: str | Path = "results", out: str | Path | None = None, ratio: str = "prefill",
             df: pd.DataFrame | None = None, bench_root: str | Path | None = None,
             kinds: tuple[str, ...] = KINDS, drop: list[tuple[str, str]] | None = None) -> list[Path]:
    """Every figure of ``kinds`` the results allow; returns the files written (PNG and SVG of each). ``drop``:
    the samples ``df`` was scored without (``leaderboard.collect``), left out of the NIAH grids too."""
    root = Path(root)
    out = Path(out) if out else root / "plots"
    df = leaderboard.newest(leaderboard.collect(root) if df is None else df)
    folders = df[df["run_dir"].notna()]  # rows from earlier tables have no traces (their samples may be stored)
    styles = method_styles(df[df["status"] == "complete"]["method"])  # a method's colour in every figure
    makers = {"score": lambda: score_vs_ratio(df, out, ratio, styles, drop), "niah": lambda: niah_heatmaps(df, out, drop),
              "kv-steps": lambda: kv_over_steps(folders, out), "throughput": lambda: throughput(folders, out, styles)}
    paths = []
    for kind in kinds:
        if kind == "bench":
            paths += bench_plots(Path(bench_root) if bench_root else root / "bench", out)
        elif not df.empty:
            paths += makers[kind]()
    return paths
