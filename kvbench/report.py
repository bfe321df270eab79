"""``kvbench report``: one self-contained HTML page (the leaderboard, the bench tables and every plot).

The page has no external reference: plots are embedded as base64 PNG (``<img src="data:...">``) and the
style is inline, so it opens in any browser from anywhere (a mail attachment, a CI artifact). Each plot's
``<figure>`` carries ``data-plot="<file stem>"`` so tools (and the tests) can check that every plot is there.
"""
from __future__ import annotations

import base64
import html
import time
from pathlib import Path

from kvbench import bench, leaderboard, paired, plots, results


def _figure(png: Path) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    title = png.stem.replace("-", " ")
    return (f'<figure data-plot="{html.escape(png.stem)}"><img alt="{html.escape(title)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{html.escape(png.stem)} '
            f"(also {html.escape(png.stem)}.svg)</figcaption></figure>")


def _kept_fraction_tables(df) -> str:
    """Per model, protocol and task: methods x kept fractions, each cell the score [95% interval] n."""
    parts = []
    done = df[df["status"] == "complete"]
    groups = done.groupby(["model", "protocol", "task", "setting"], sort=True)
    for (model, protocol, task, setting), runs in groups:
        table = leaderboard.budget_table(df, task, model=model, protocol=protocol, setting=setting)
        if not table.empty:
            several = done[(done["model"] == model) & (done["protocol"] == protocol) & (done["task"] == task)][
                "setting"].nunique() > 1  # then say which: their task settings differ
            parts.append(f"<h3>{html.escape(task)}: {html.escape(model)}, {html.escape(protocol)} [{setting}] (methods "
                         "x kept fraction or tokens; score [95% bootstrap interval] n)</h3>"
                         + (f"<p>task settings: {html.escape(runs['task_params'].iloc[0])}</p>" if several else "")
                         + table.fillna("—").to_html(index=False, border=0, classes="board"))
    return ("<h2>Scores by kept fraction</h2>" + "\n".join(parts)) if parts else ""


def bench_files(paths) -> list[Path]:
    """``kvbench bench`` results: each path a bench.jsonl-like file, or a directory of ``*/bench.jsonl``."""
    out = []
    for path in map(Path, paths):
        if path.is_dir():
            out += sorted(path.glob("*/bench.jsonl"))
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such bench file or directory (kvbench bench --out writes them)")
    return out


def _bench_section(files: list[Path]) -> str:
    parts = []
    for jl in files:
        recs = results.read_jsonl(jl)
        env = next((r for r in recs if r.get("kind") == "env"), {})
        rows = bench.table_rows(recs)
        head = "".join(f"<th>{html.escape(c)}</th>" for c in bench.TABLE_COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        parts.append(f"<h2>kvbench bench: {html.escape(str(env.get('model')))} on "
                     f"{html.escape(str(env.get('device_name')))}</h2>"
                     f"<p>{html.escape(str(env.get('dtype')))}, {env.get('new_tokens')} new tokens; copy bandwidth "
                     f"{(env.get('copy_bandwidth') or 0) / 1e9:.0f} GB/s; source {html.escape(str(jl))}</p>"
                     f"<table class='board'><tr>{head}</tr>{body}</table>")
        tg = bench.comparison_rows(recs)
        if tg:
            trs = "".join(f"<tr><td style='text-align:left'>{html.escape(t['what'])}</td><td>{t['value']:.3g}</td>"
                          "</tr>" for t in tg)
            parts.append("<h3>Comparisons</h3><table class='board'><tr><th>comparison</th><th>ratio</th></tr>"
                         f"{trs}</table>")
    return "\n".join(parts)


def build(root: str | Path = "results", out: str | Path | None = None, plots_dir: str | Path | None = None,
          make_plots: bool = True, ratio: str = "prefill", bench_root: str | Path | None = None,
          drop: list[tuple[str, str]] | None = None, tables: tuple = (), bench: tuple = ()) -> Path:
    """Write the report; returns its path. ``make_plots`` draws the plots first (into ``plots_dir``); ``drop`` and
    ``tables`` (earlier leaderboard.json files) as ``leaderboard.collect`` takes them; ``bench``: the bench
    results to embed (files or directories, ``bench_files``; default: ``bench_root``'s)."""
    root = Path(root)
    out = Path(out) if out else root / "report.html"
    if out.is_dir():
        raise results.ResultsError(f"--out {out} is a directory: give the HTML file to write, e.g. {out / 'report.html'}")
    plots_dir = Path(plots_dir) if plots_dir else root / "plots"
    bench_root = Path(bench_root) if bench_root else root / "bench"
    benches = bench_files(bench or ([bench_root] if bench_root.is_dir() else []))  # a wrong path: before any work
    if not (root / "runs").is_dir() and not tables and not benches:  # a mistyped --root: not an empty page, exit 0
        raise results.ResultsError(f"no runs under {root / 'runs'} (nor --with tables or bench results): check --root")
    df = leaderboard.newest(leaderboard.collect(root, drop, tables))
    if make_plots:
        plots.make_all(root, plots_dir, ratio, df=df, bench_root=bench_root, drop=drop)
    pngs = sorted(plots_dir.glob("*.png")) if plots_dir.is_dir() else []
    runs = len(df)
    recorded = int(df["run_dir"].isna().sum())  # from earlier tables: no samples here, so no per-run plots
    where = f"{runs - recorded} under {html.escape(str(root))}" + (
        f", {recorded} as {html.escape(', '.join(map(str, tables)))} recorded them (their run folders are not "
        "kept: NIAH grids from the samples stored beside the table, where it has them; no memory traces)"
        if recorded else "")
    body = [f"<h1>kvbench report</h1><p>{runs} runs: {where}; made "
            f"{time.strftime('%Y-%m-%d %H:%M %Z')}. Scores are each task's headline metric; the KV ratio is "
            "measured from the cache's stores (bytes held over the bytes of a plain full cache). "
            f"{html.escape(leaderboard.drop_text(drop))}</p>",
            _kept_fraction_tables(df) if runs else "",
            leaderboard.render_html_tables(df, ratio) if runs else "<p>No runs yet.</p>",
            paired.to_html(paired.cells(df, drop=drop)[0]) if runs else "",
            paired.to_html(paired.cells(df, drop=drop, matched_memory=True)[0], matched_memory=True) if runs else "",
            _bench_section(benches)]
    if pngs:
        body.append("<h2>Plots</h2>" + "\n".join(_figure(p) for p in pngs))
    results.write_text(out, "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>kvbench report</title>"
                   f"<style>{leaderboard.PAGE_STYLE}</style></head><body>{''.join(body)}</body></html>\n")
    return out
