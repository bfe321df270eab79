"""The ``kvbench`` command line."""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import click

from kvbench import registry


def user_errors() -> tuple[type[BaseException], ...]:
    from kvbench.artifact import ArtifactError
    from kvbench.distributed import DistributedError
    from kvbench.method import BudgetError
    from kvbench.models import ModelError
    from kvbench.registry import ParameterError, UnknownNameError
    from kvbench.results import ResultsError
    from kvbench.task import TaskError
    return (BudgetError, ModelError, UnknownNameError, ParameterError, TaskError, ResultsError, ArtifactError,
            DistributedError, FileNotFoundError)


def _kv_pairs(items: tuple[str, ...], what: str) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"expected key=value, got '{item}'", param_hint=what)
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


class _OneLineErrors(click.Group):
    """Usage mistakes (a missing option, a value of the wrong type) as one ``error:`` line, exit 2, like every
    other mistake kvbench reports; ``--help`` says the rest."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "kvbench"
            fail(f"{e.format_message()} (see `{where} --help`)")
        except click.ClickException as e:
            fail(e.format_message())
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)


@click.group(cls=_OneLineErrors)
def main():
    """kvbench: compare KV-cache compression methods on one harness."""
    # Stores are rebuilt at many sizes (compression, growth, batching): without expandable segments the
    # CUDA caching allocator strands gigabytes between them. Set before CUDA starts; the user's value wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


@main.command("list")
@click.argument("what", required=False, type=click.Choice(["methods", "tasks", "models", "presets"]))
def list_cmd(what):
    """List methods, tasks, model aliases and random-weight presets."""
    from kvbench.models import ALIASES, PRESETS
    sections = {
        "methods": registry.METHODS, "tasks": registry.TASKS,
        "models": ALIASES, "presets": {k: v["model_type"] for k, v in PRESETS.items()},
    }
    for name, table in sections.items():
        if what and what != name:
            continue
        click.echo(f"{name}:")
        for key in sorted(table):
            detail = ""
            if name in ("methods", "tasks"):
                try:
                    cls = registry.load(table, name[:-1], key)
                    fields = []
                    for f in dataclasses.fields(cls):
                        if f.name in ("budget", "name"):
                            continue
                        if f.default is not dataclasses.MISSING:
                            fields.append(f"{f.name}={f.default!r}")
                        elif f.default_factory is not dataclasses.MISSING:  # adakv's scorer, NIAH's lengths
                            fields.append(f"{f.name}={f.default_factory()!r}")
                    if what is None:  # the overview: one short line each, cut between fields, never inside a value
                        shown = []
                        for field in fields:
                            if len(field) > 60:  # a long value (a needle, a list of subsets): its name only
                                field = field.split("=", 1)[0] + "=..."
                            if len(f"  {key}  " + ", ".join(shown + [field]) + ", ...") > 160:
                                shown.append("...")
                                break
                            shown.append(field)
                        fields = shown
                    detail = "  " + ", ".join(fields)
                except Exception as e:  # a broken entry is shown, not hidden
                    detail = f"  (cannot load: {e})"
            else:
                detail = f"  {table[key]}"
            click.echo(f"  {key}{detail}")


@main.command()
@click.option("--method", required=True, help="compression method (kvbench list methods)")
@click.option("--task", required=True, help="benchmark task (kvbench list tasks)")
@click.option("--budget", default="1.0", show_default=True, help="fraction of the KV kept (0-1], or tokens per head")
@click.option("--model", default="smollm2-135m", show_default=True, help="HF id, local dir, .gguf file or alias")
@click.option("--random-weights", is_flag=True, help="refused: a preset's untrained model has no tokenizer, so no task runs "
              "on it (random-weight shapes: kvbench bench --preset, kvbench list presets)")
@click.option("--trust-remote-code", is_flag=True, help="allow a model's own Python code from the hub (off by default)")
@click.option("--method-arg", "-m", multiple=True, help="method parameter key=value (repeatable)")
@click.option("--task-arg", "-t", multiple=True, help="task parameter key=value (repeatable)")
@click.option("--query-aware", is_flag=True, help="compress context and question together")
@click.option("--prefill-chunk", type=int, default=None, help="prefill (and compress) the context N tokens at a time")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--data", default=None, help="local data path for the task (official schema)")
@click.option("--limit", type=int, default=None, help="first N samples only (of each part of a multi-part task: LongBench subsets, RULER tasks)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--max-context", type=int, default=None, help="truncate prompts to this many tokens")
@click.option("--out", default="results", show_default=True, help="results root")
@click.option("--artifact", "--checkpoint", "artifact", default=None,
              help="what `kvbench train/calibrate METHOD` made for this model (--checkpoint: the same option)")
@click.option("--tp", is_flag=True, help="under torchrun: split the model's heads over the processes (tensor "
              "parallel) instead of sharing out the samples")
def run(method, task, budget, model, random_weights, trust_remote_code, method_arg, task_arg, query_aware, prefill_chunk, batch_size,
        data, limit, seed, temperature, device, dtype, max_context, out, artifact, tp):
    """Run one method on one task; resumes if the same run was started before."""
    from kvbench.engine import is_oom
    from kvbench.harness import RunConfig, check_config, run as run_one
    if artifact is not None:
        try:
            method_arg = method_arg + (f"{registry.artifact_param(method)}={artifact}",)
        except user_errors() as e:
            fail(str(e))
    for option, value in (("--batch-size", batch_size), ("--prefill-chunk", prefill_chunk), ("--limit", limit),
                          ("--max-context", max_context)):
        if value is not None and value < 1:
            fail(f"{option} must be at least 1, got {value}")
    if not 0 <= temperature < float("inf"):
        fail(f"--temperature must be a finite number >= 0, got {temperature}")
    cfg = RunConfig(method=method, task=task, budget=_budget(budget), model=model, random_weights=random_weights,
                    trust_remote_code=trust_remote_code,
                    method_params=_kv_pairs(method_arg, "--method-arg"), task_params=_kv_pairs(task_arg, "--task-arg"),
                    protocol="query-aware" if query_aware else "query-agnostic", prefill_chunk=prefill_chunk,
                    batch_size=batch_size, seed=seed, temperature=temperature, dtype=dtype, device=device,
                    data=data, limit=limit, max_context=max_context, out=out)
    from kvbench import distributed
    try:
        check_config(cfg)
        registry.build_method(method, cfg.budget, cfg.method_params)  # validate before loading a model
        registry.build_task(task, cfg.task_params)
        with distributed.session(tensor_parallel=tp) as ranks:  # [distributed] torchrun's ranks, if any
            run_dir = run_one(cfg, ranks=ranks)
    except user_errors() as e:
        fail(str(e))
    except Exception as e:  # out of memory is the user's to fix; anything else is a bug and shows its traceback
        if not is_oom(e):
            raise
        fail(f"out of memory ({str(e).splitlines()[0][:120]}); the finished samples are kept: rerun with a smaller "
              "--batch-size or --max-context, or on a larger device")
    if not ranks.main:  # [distributed] rank 0 reports
        return
    import json
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = {k: v for k, v in metrics["summary"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    click.echo(f"{method} budget={budget} on {task}: " + ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))
    click.echo(f"measured KV ratio: prefill {metrics['kv_ratio_prefill']:.3f}, end {metrics['kv_ratio_end']:.3f}")
    click.echo(f"results: {run_dir}")


def _csv(text: str, kind=str, what: str = "") -> list:
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{what} expects a comma-separated list of {kind.__name__}s, got '{text}'")


_DROP = click.option("--drop", multiple=True, metavar="KEY=VALUE",
                     help="leave out samples whose meta KEY is VALUE (e.g. length=31744, a NIAH length the full "
                          "cache fails); repeatable")


def _pairs(items, flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            fail(f"{flag} takes KEY=VALUE (e.g. length=31744), got '{item}'")
        out.append((key, value))
    return out


_WITH = click.option("--with", "tables", multiple=True, type=click.Path(), metavar="LEADERBOARD.json",
                     help="also the runs an earlier table recorded (its run folders gone); the newest run of each "
                          "configuration counts; repeatable")


_RATIO = click.option("--ratio", default="prefill", show_default=True, type=click.Choice(["prefill", "end"]),
                      help="measured KV ratio: when decoding starts, or at its end")


@main.command()
@click.option("--root", default="results", show_default=True, help="results root (runs under ROOT/runs)")
@click.option("--out", default=None, help="where leaderboard.{md,csv,json,html} go (default: ROOT)")
@click.option("--model", default=None, help="only models whose name contains this")
@click.option("--task", default=None)
@click.option("--protocol", default=None, type=click.Choice(["query-agnostic", "query-aware"]))
@click.option("--budget", default=None, help="only these budgets, comma-separated (full always stays)")
@click.option("--at", "levels", default=None, help="memory levels to rank at, comma-separated measured ratios")
@_DROP
@_WITH
@_RATIO
def leaderboard(root, out, model, task, protocol, budget, levels, drop, tables, ratio):
    """Aggregate every run into one table, methods ranked at matched measured memory."""
    from kvbench import leaderboard as lb
    budgets = _csv(budget, float, "--budget") if budget else None
    at = _csv(levels, float, "--at") if levels else None
    drop = _pairs(drop, "--drop")
    try:
        everything = lb.collect(root, drop, tables)
    except user_errors() as e:
        fail(str(e))
    df = lb.select(everything, model, task, protocol, budgets)
    for _, bad in everything[everything["status"] == "unreadable"].iterrows():
        click.echo(f"warning: {bad['error']}", err=True)
    if df.empty:
        fail(f"no runs under {root}/runs" + (" or in " + ", ".join(tables) if tables else "") + " match")
    for table in tables:  # the new samples file would silently lack those runs' samples
        if not (Path(table).parent / lb.SAMPLES_FILE).exists():
            click.echo(f"warning: no {lb.SAMPLES_FILE} beside {table}: the tables written now keep its runs' scores "
                       "but not their samples (paired tests, breakdowns); copy that file next to it first", err=True)
    paths = lb.write(df, out or root, ratio, at, lb.drop_text(drop), drop)
    click.echo(lb.render_markdown(df, ratio, at, lb.drop_text(drop)))
    click.echo("written: " + ", ".join(map(str, paths)))


@main.command()
@click.option("--root", default="results", show_default=True, help="results root (runs under ROOT/runs)")
@click.option("--task", default=None, help="only this task")
@click.option("--out", default=None, help="also write the tables to this markdown file")
@click.option("--matched-memory", is_flag=True,
              help="compare runs of different budgets whose measured KV ratios are within 5% of each other "
                   "(a composition against an evictor at its bytes), instead of methods at one kept fraction")
@_DROP
@_WITH
def pairs(root, task, out, matched_memory, drop, tables):
    """Which methods differ, compared on the samples both ran (paired bootstrap; kvbench/paired.py)."""
    from kvbench import leaderboard as lb
    from kvbench import paired, results
    try:
        found, missing = paired.cells(lb.collect(root, tables=tables, any_drop=True), task, _pairs(drop, "--drop"),
                                      matched_memory)
    except user_errors() as e:
        fail(str(e))
    if not found:
        fail(f"no two methods with samples share a cell under {root}" + (f" for {task}" if task else ""))
    kinds = sorted({run_id.rsplit("-", 1)[0] for run_id in missing})  # task-method-budget, without the run's hash
    text = paired.to_markdown(found) + (f"\nLeft out, their samples not stored (recorded before the samples file): "
                                        f"{len(missing)} runs of {', '.join(kinds)}\n" if missing else "")
    if out:
        results.write_text(out, text)
    click.echo(text)


@main.command()
@click.option("--root", default="results", show_default=True)
@click.option("--out", default=None, help="plot directory (default: ROOT/plots)")
@click.option("--bench-root", default=None, help="kvbench bench results (default: ROOT/bench)")
@click.option("--only", default=None, help="some of: score,niah,kv-steps,throughput,bench (default: all)")
@_DROP
@_WITH
@_RATIO
def plot(root, out, bench_root, only, drop, tables, ratio):
    """Score vs measured KV, NIAH heatmaps, KV bytes over steps, throughput and memory (PNG and SVG)."""
    from kvbench.plots import KINDS, make_all
    kinds = tuple(_csv(only, str, "--only")) if only else KINDS
    if set(kinds) - set(KINDS):
        fail(f"--only takes some of {','.join(KINDS)}")
    from kvbench import leaderboard as lb
    try:
        dropped = _pairs(drop, "--drop")
        df = lb.collect(root, dropped, tables)
    except user_errors() as e:
        fail(str(e))
    paths = make_all(root, out, ratio, df=df, bench_root=bench_root, kinds=kinds, drop=dropped)
    if not paths:
        fail(f"nothing to plot under {root}")
    click.echo(f"{len(paths)} files: " + ", ".join(str(p) for p in paths))


@main.command()
@click.option("--root", default="results", show_default=True)
@click.option("--out", default=None, help="the HTML file (default: ROOT/report.html)")
@click.option("--bench-root", default=None, help="kvbench bench results (default: ROOT/bench)")
@click.option("--plots", "plots_dir", default=None, help="embed the plots already in this directory (no redrawing)")
@click.option("--bench", multiple=True, type=click.Path(), metavar="FILE|DIR",
              help="bench results to embed: a bench .jsonl or a directory of */bench.jsonl (default: --bench-root's); "
                   "repeatable")
@_DROP
@_WITH
@_RATIO
def report(root, out, bench_root, plots_dir, bench, drop, tables, ratio):
    """One self-contained HTML page: leaderboard, bench tables and every plot, embedded."""
    from kvbench.report import build
    draw_into = plots_dir
    if plots_dir is None and out is not None:  # a report elsewhere draws its plots beside it, not into ROOT/plots
        draw_into = str(Path(out).with_name(Path(out).stem + "-plots"))
    try:
        path = build(root, out, plots_dir=draw_into, make_plots=plots_dir is None, ratio=ratio, bench_root=bench_root,
                     drop=_pairs(drop, "--drop"), tables=tables, bench=bench)
    except user_errors() as e:
        fail(str(e))
    click.echo(f"report: {path}")


@main.command()
@click.argument("config", type=click.Path())
@click.option("--recorded", "tables", multiple=True, type=click.Path(), metavar="LEADERBOARD.json",
              help="also skip the points this earlier table lists as complete (its run folders gone); repeatable")
@click.option("--plan", is_flag=True, help="list each point as to run, recorded or finished, and stop (no model loaded)")
@click.option("--device", default=None, help="the device for the config's `auto` (default: this machine's; with "
              "--plan, plan here for the machine that will run it, e.g. cuda)")
@click.option("--methods", default="", help="only these of the config's methods, comma-separated")
def sweep(config, tables, plan, device, methods):
    """Run models x methods x budgets x tasks x protocols from a YAML file, skipping finished runs."""
    from kvbench import distributed
    from kvbench.sweep import plan_sweep, run_sweep
    if plan:
        try:
            plan_sweep(config, tables, device, echo=click.echo, methods=tuple(_csv(methods)))
        except user_errors() as e:
            fail(str(e))
        return
    try:
        with distributed.session() as ranks:  # [distributed] under torchrun: points shared out over the ranks
            outcomes = run_sweep(config, echo=click.echo, ranks=ranks, tables=tables, device=device,
                                 methods=tuple(_csv(methods)))
    except user_errors() as e:
        fail(str(e))
    if any(o["status"] in ("oom", "crash", "busy") for o in outcomes):
        sys.exit(1)


@main.command()
@click.option("--preset", default=None, help="random-weight architecture (default: llama-3.1-8b on CUDA, tiny-llama on CPU)")
@click.option("--model", default=None, help="a real model instead of a preset (HF id, directory, .gguf, alias)")
@click.option("--contexts", default="32768", show_default=True, help="context lengths, comma-separated")
@click.option("--batches", default="1,8", show_default=True, help="batch sizes, comma-separated")
@click.option("--methods", default="full,snapkv", show_default=True)
@click.option("--budgets", default="0.25", show_default=True, help="budgets of the compressing methods")
@click.option("--new-tokens", type=int, default=256, show_default=True)
@click.option("--largest-batch/--no-largest-batch", default=True, show_default=True,
              help="find the largest batch that fits (CUDA)")
@click.option("--compile/--no-compile", "compile_decode", default=False, show_default=True,
              help="kvbench's decoding step through torch.compile (its small operations fused)")
@click.option("--skinny-gemm/--no-skinny-gemm", default=False, show_default=True,
              help="the model's linear layers of at most 16 rows (decoding at batch <= 16) through kvbench's Triton "
                   "kernel instead of cuBLAS (kvbench.kernels.skinny_gemm)")
@click.option("--freeze-weights/--no-freeze-weights", default=False, show_default=True,
              help="with --compile: the weights as constants of the compiled decoding step, so that inductor fuses "
                   "the linear layers that share an input where its patterns match (more memory: the fused copies; "
                   "what it fused and gained: kernels/NOTES.md)")
@click.option("--pdl/--no-pdl", default=False, show_default=True,
              help="programmatic dependent launch (Hopper or newer): each kernel of the decoding step may start "
                   "while the one before it ends (kvbench's kernels, and inductor's with --compile); the same as "
                   "KVBENCH_PDL=1")
@click.option("--peers", default="hf,kvpress", show_default=True, help="peers to run beside kvbench ('' for none)")
@click.option("--kvpress-path", default=None, help="PYTHONPATH entry holding kvpress and transformers<5.3 "
              "(default: $KVBENCH_KVPRESS_PATH)")
@click.option("--chunked-prefill", type=int, default=None, help="also compare prefill peak memory at N tokens")
@click.option("--prefill-chunk", type=int, default=4096, show_default=True)
@click.option("--chunk-method", default="snapkv", show_default=True)
@click.option("--chunk-budget", type=float, default=0.25, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--time-limit", type=float, default=None, help="seconds; later points are recorded as skipped")
@click.option("--out", default=None, help="output directory (default results/bench/<model>-<device>)")
def bench(preset, model, contexts, batches, methods, budgets, new_tokens, largest_batch, compile_decode, skinny_gemm,
          freeze_weights, pdl, peers, kvpress_path,
          chunked_prefill, prefill_chunk, chunk_method, chunk_budget, device, dtype, seed, time_limit, out):
    """Throughput and memory: contexts x batches x methods x budgets, beside transformers and kvpress."""
    from kvbench.bench import BenchConfig, BenchError, run_bench
    if preset and model:
        fail("give either --preset (random weights) or --model (real weights), not both")
    cfg = BenchConfig(model=model, preset=preset, contexts=_csv(contexts, int, "--contexts"),
                      batches=_csv(batches, int, "--batches"), methods=_csv(methods, str, "--methods"),
                      budgets=_csv(budgets, float, "--budgets"), new_tokens=new_tokens, largest_batch=largest_batch,
                      compile_decode=compile_decode, skinny_gemm=skinny_gemm, freeze_weights=freeze_weights, pdl=pdl, peers=_csv(peers, str, "--peers"), kvpress_path=kvpress_path, chunked_prefill=chunked_prefill,
                      prefill_chunk=prefill_chunk, chunk_method=chunk_method, chunk_budget=chunk_budget, device=device,
                      dtype=dtype, seed=seed, time_limit=time_limit, out=out)
    try:
        out_dir, _records = run_bench(cfg, echo=click.echo)
    except user_errors() + (BenchError,) as e:
        fail(str(e))
    click.echo((out_dir / "bench.md").read_text())
    click.echo(f"results: {out_dir / 'bench.jsonl'}, {out_dir / 'bench.md'}")


def _budget(text: str):
    from kvbench.method import BudgetError, parse_budget
    try:
        budget = parse_budget(text)
        if isinstance(budget, int) and any(c in str(text) for c in ".eE"):  # 2.0: a fraction mistyped, not 2 tokens
            raise BudgetError(f"budget {text} is above 1 as a fraction: give a fraction in (0, 1] such as 0.25, or a "
                              f"token count as a whole number without a decimal point, such as {budget}")
        return budget
    except (BudgetError, ValueError) as e:
        fail(str(e) if isinstance(e, BudgetError) else f"budget '{text}' is not a number: give e.g. 0.25 or 512")


def fail(message: str):
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


class MethodCommands(click.Group):
    """``kvbench train METHOD`` / ``kvbench calibrate METHOD``: the command the method declares in its
    ``artifact_commands`` (the registry names the methods; cli.py knows none of them)."""

    def __init__(self, step: str, **kwargs):
        super().__init__(**kwargs)
        self.step = step

    def list_commands(self, ctx) -> list[str]:
        return registry.methods_with_artifact_command(self.step)

    def get_command(self, ctx, name: str):
        return registry.artifact_command(name, self.step)


@main.group(cls=MethodCommands, step="train")
def train():
    """Train the learned parts of a method for one model (writes an artifact for `--artifact DIR`)."""


@main.group(cls=MethodCommands, step="calibrate")
def calibrate():
    """Measure what a method calibrates for one model (head scores, layer budgets); writes an artifact."""


if __name__ == "__main__":
    main()
