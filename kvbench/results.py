"""Where runs land: ``results/runs/<id>/`` with config.json, samples.jsonl, trace.jsonl, metrics.json.

Whole files are written atomically (a temporary file in the same directory, then a rename): a reader
sees the old file or the new one, never half of one. JSON lines are appended one complete line at a time
and flushed; on resume a torn *last* line (a run killed mid-write) is trimmed, so a rerun of the same
command repeats nothing and loses nothing. A corrupt line anywhere else is not a torn write: it is
reported with its file and line number and nothing is deleted.

A run directory is locked while a run works in it (``.lock``: an exclusive ``flock`` on a file that
names the owner's pid). The kernel drops the lock when its owner dies, even by ``kill -9``, so a stale
lock file never blocks a rerun; a second live run of the same configuration is refused.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

VOLATILE = ("versions", "git_commit", "created", "device_name", "out", "limit")
LOCK_FILE = ".lock"


class ResultsError(Exception):
    """A results file that cannot be used as it is (corrupt record, run directory in use); one line."""


class CorruptRecordError(ResultsError):
    pass


class RunLockedError(ResultsError):
    pass


class ResumeRefusedError(ResultsError):
    """A run directory this command would not cover whole (finished samples its metrics would leave out): nothing
    in it is touched."""


def run_id(config: dict) -> str:
    """Deterministic id: the same command on the same kind of device resumes the same run."""
    stable = {k: v for k, v in sorted(config.items()) if k not in VOLATILE}
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:10]
    budget = config.get("budget")
    return f"{config['task']}-{config['method']}-{budget}-{digest}"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path`` to write to; renamed over ``path`` when the block succeeds, removed
    when it fails. For writers that want a file name (matplotlib, safetensors, pandas)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=_jsonable))


def jsonl_line(record: dict) -> str:
    """A record as one line of a JSON-lines file (its newline included)."""
    return json.dumps(record, default=_jsonable, ensure_ascii=False) + "\n"


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    """A whole JSON-lines file, atomically (``append_jsonl``'s lines)."""
    write_text(path, "".join(map(jsonl_line, records)))


def append_jsonl(path: Path, record: dict) -> None:
    line = jsonl_line(record)
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


FULL = "full"  # the reference method: no compression, one point per configuration (its budget means nothing)


def is_full(method: str) -> bool:
    return method == FULL


def kept_label(method: str, budget) -> str:
    """What a run kept: ``full``, or the budget."""
    return FULL if is_full(method) else f"{float(budget):g}"


def point_label(method: str, budget) -> str:
    """A run as a plot legend names it: ``full``, or ``method @ budget``."""
    return FULL if is_full(method) else f"{method} @ {float(budget):g}"


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable (a run directory being written)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """The records of a JSON-lines file.

    A last line without its newline that does not parse is a write cut off by a kill: it is skipped (with
    ``repair``, trimmed off the file). Any other line that does not parse raises ``CorruptRecordError``
    naming the file and the line; nothing is deleted. With ``repair``, a complete last record whose newline
    was lost gets it back, so the next append starts on a line of its own.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    records = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        records.append(_parse(raw, path, number))
    if tail.strip():
        try:
            records.append(_record(tail))
        except ValueError:  # torn by a kill mid-append
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(len(data) - len(tail))
        else:
            if repair:
                with open(path, "ab") as f:
                    f.write(b"\n")
    return records


def _record(raw: bytes) -> dict:
    rec = json.loads(raw)
    if not isinstance(rec, dict):
        raise ValueError("not an object")
    return rec


def _parse(raw: bytes, path: Path, number: int) -> dict:
    try:
        return _record(raw)
    except ValueError:
        raise CorruptRecordError(f"{path} line {number} is not a JSON record (the lines after it are intact); "
                                 "fix or delete that line, then rerun") from None


@contextlib.contextmanager
def lock_run(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block; ``RunLockedError`` when a live process holds it."""
    import fcntl
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            f.seek(0)
            owner = f.read().strip() or "another process"
            raise RunLockedError(f"{run_dir} is in use by {owner}: the same run is already going; wait for it "
                                 "to finish (a rerun then resumes or skips it)") from None
        # The lock is ours; whatever the file says is a dead owner's (stale) and is replaced.
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the flock


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


def peak_bytes(peak: dict | None) -> int | None:
    """The peak of a phase record (``engine.PeakMemory.read``): device memory allocated on CUDA, resident
    memory on the CPU; None when the record has neither."""
    peak = peak or {}
    return peak.get("allocated", peak.get("rss"))


def short_artifact(identity: str | None) -> str | None:
    """How tables name the artifact a run read: the first 12 hex of its ``kvbench.artifact.identity`` (None
    without one)."""
    return identity[:12] if identity else None


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (model files are GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
