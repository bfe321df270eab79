"""The ``kvbench`` command line."""
from __future__ import annotations

import dataclasses
import sys

import click

from kvbench import registry

USER_ERRORS: tuple[type[BaseException], ...] = ()


def _user_errors() -> tuple[type[BaseException], ...]:
    from kvbench.method import BudgetError
    from kvbench.models import ModelError
    from kvbench.registry import UnknownNameError
    from kvbench.task import TaskError
    return (BudgetError, ModelError, UnknownNameError, TaskError, FileNotFoundError)


def _kv_pairs(items: tuple[str, ...], what: str) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"expected key=value, got '{item}'", param_hint=what)
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


@click.group()
def main():
    """kvbench: compare KV-cache compression methods on one harness."""


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
                    fields = [f"{f.name}={f.default!r}" for f in dataclasses.fields(cls)
                              if f.name not in ("budget", "name") and f.default is not dataclasses.MISSING]
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
@click.option("--random-weights", is_flag=True, help="untrained model of a preset's shape (kvbench list presets)")
@click.option("--method-arg", "-m", multiple=True, help="method parameter key=value (repeatable)")
@click.option("--task-arg", "-t", multiple=True, help="task parameter key=value (repeatable)")
@click.option("--query-aware", is_flag=True, help="compress context and question together")
@click.option("--prefill-chunk", type=int, default=None, help="prefill (and compress) the context N tokens at a time")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--data", default=None, help="local data path for the task (official schema)")
@click.option("--limit", type=int, default=None, help="first N samples only")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--max-context", type=int, default=None, help="truncate prompts to this many tokens")
@click.option("--out", default="results", show_default=True, help="results root")
def run(method, task, budget, model, random_weights, method_arg, task_arg, query_aware, prefill_chunk, batch_size,
        data, limit, seed, temperature, device, dtype, max_context, out):
    """Run one method on one task; resumes if the same run was started before."""
    from kvbench.runner import RunConfig, run as run_one
    if batch_size < 1:
        _fail("--batch-size must be at least 1")
    if prefill_chunk is not None and prefill_chunk < 1:
        _fail("--prefill-chunk must be at least 1")
    cfg = RunConfig(method=method, task=task, budget=_budget(budget), model=model, random_weights=random_weights,
                    method_params=_kv_pairs(method_arg, "--method-arg"), task_params=_kv_pairs(task_arg, "--task-arg"),
                    protocol="query-aware" if query_aware else "query-agnostic", prefill_chunk=prefill_chunk,
                    batch_size=batch_size, seed=seed, temperature=temperature, dtype=dtype, device=device,
                    data=data, limit=limit, max_context=max_context, out=out)
    try:
        registry.build_method(method, cfg.budget, cfg.method_params)  # validate before loading a model
        registry.build_task(task, cfg.task_params)
        run_dir = run_one(cfg)
    except _user_errors() as e:
        _fail(str(e))
    import json
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = {k: v for k, v in metrics["summary"].items() if isinstance(v, (int, float))}
    click.echo(f"{method} budget={budget} on {task}: " + ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))
    click.echo(f"measured KV ratio: prefill {metrics['kv_ratio_prefill']:.3f}, end {metrics['kv_ratio_end']:.3f}")
    click.echo(f"results: {run_dir}")


def _budget(text: str):
    from kvbench.method import BudgetError, parse_budget
    try:
        return parse_budget(text)
    except (BudgetError, ValueError) as e:
        _fail(str(e) if isinstance(e, BudgetError) else f"budget '{text}' is not a number: give e.g. 0.25 or 512")


def _fail(message: str):
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
