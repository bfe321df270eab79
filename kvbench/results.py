"""Where runs land: ``results/runs/<id>/`` with config.json, samples.jsonl, trace.jsonl, metrics.json.

Whole files are written atomically (a temporary file, then a rename). JSON lines are appended one
complete line at a time and flushed; on resume a torn last line (a run killed mid-write) is dropped, so
a rerun of the same command repeats nothing and loses nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

VOLATILE = ("versions", "git_commit", "created", "device_name", "out", "limit")


def run_id(config: dict) -> str:
    """Deterministic id: the same command on the same kind of device resumes the same run."""
    stable = {k: v for k, v in sorted(config.items()) if k not in VOLATILE}
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:10]
    budget = config.get("budget")
    return f"{config['task']}-{config['method']}-{budget}-{digest}"


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=_jsonable)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_jsonl(path: Path, record: dict) -> None:
    line = json.dumps(record, default=_jsonable, ensure_ascii=False) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """Complete records of a JSON-lines file; with ``repair`` a torn tail is cut off the file."""
    if not path.exists():
        return []
    records, good_bytes = [], 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("torn line")
                records.append(json.loads(raw))
                good_bytes += len(raw)
            except ValueError:
                break
    if repair and good_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return records


def iter_runs(root: Path) -> Iterable[Path]:
    runs = Path(root) / "runs"
    if runs.is_dir():
        yield from sorted(p for p in runs.iterdir() if (p / "config.json").exists())


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)
