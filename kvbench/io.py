"""Readers every part of kvbench shares, each refusing bad input in one line that names the file (and line):
data records (``.jsonl``, ``.json``, ``.parquet``), texts (a file or a directory of ``.txt``/``.md``), and
training corpora (prose and manual pages)."""
from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable

from kvbench.task import TaskError

_MAN_PAGE = re.compile(r"\.[0-9][a-z0-9]*(\.gz)?$")
_ROFF_ESCAPES = [(re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\s[+-]?\d"), ""),
                 (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\\(em|\\\(en"), "-"),
                 (re.compile(r"\\\(.."), ""), (re.compile(r"\\[-]"), "-"), (re.compile(r"\\[&/,|^%]"), ""),
                 (re.compile(r"\\e"), "\\\\"), (re.compile(r"\\ "), " ")]


def roff_to_text(source: str) -> str:
    """Plain text of a manual page: comments and macro lines dropped, the words of headings and of font
    macros (``.B``, ``.I``, ``.BR`` ...) kept, inline escapes removed."""
    out = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\#')):
            continue
        if line.startswith((".", "'")):
            name, _, rest = line[1:].partition(" ")
            if name in ("SH", "SS", "B", "I", "BR", "BI", "IB", "IR", "RB", "RI", "IP", "TP", "Nm", "Nd"):
                line = rest.replace('"', "")
            else:
                continue
        for pattern, repl in _ROFF_ESCAPES:
            line = pattern.sub(repl, line)
        line = line.strip()
        if line:
            out.append(line)
    return "\n".join(out)


def _read_one(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    return roff_to_text(text) if _MAN_PAGE.search(path.name) else text


def read_corpus(spec: str) -> tuple[str, dict]:
    """The corpus text and its description (what the checkpoint records)."""
    path = Path(spec).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and not f.is_symlink() and
                       (f.suffix in (".txt", ".md") or _MAN_PAGE.search(f.name)))
    else:
        raise TaskError(f"no training text at {spec}: pass --data with a text file or a directory of text/man pages")
    parts = [_read_one(f) for f in files]
    text = "\n\n".join(p for p in parts if p.strip())
    if not text.strip():
        raise TaskError(f"no text found in {spec}")
    return text, {"path": str(path), "files": len(files), "chars": len(text),
                  "sha256": hashlib.sha256(text.encode()).hexdigest()}


def read_records(path: str | Path) -> list[dict]:
    """The rows of a ``.jsonl``, ``.json`` (a list) or ``.parquet`` file, as dicts."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except Exception as e:  # pyarrow's errors have no common base
            raise TaskError(f"{path} is not a readable parquet file ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:160]})") from None
        return [_plain(r) for r in frame.to_dict(orient="records")]
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".json":
                data = json.load(f)
                rows = list(data) if isinstance(data, list) else [data]
            else:
                rows = [_json_line(line, path, number) for number, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError as e:
        raise TaskError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise TaskError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise TaskError(f"{path}: record {bad + 1} is not a JSON object")
    return rows


def _json_line(line: str, path: Path, number: int) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise TaskError(f"{path} line {number} is not valid JSON ({e.msg}, column {e.colno}); fix or remove "
                        "that line") from None


def _plain(value: Any) -> Any:
    """numpy arrays/scalars from parquet rows as plain lists/numbers."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def find_file(root: Path, stem: str, exts: Iterable[str] = (".jsonl", ".parquet", ".json")) -> Path | None:
    """``root/stem.ext`` or ``root/data/stem.ext``, the first that exists."""
    for folder in (root, root / "data"):
        for ext in exts:
            p = folder / f"{stem}{ext}"
            if p.is_file():
                return p
    return None


def text_files(path: str | Path) -> list[str]:
    """The texts of a directory's ``.txt``/``.md`` files (sorted), or of one file."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p.read_text(errors="replace")]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".md") and f.is_file())
        if files:
            return [f.read_text(errors="replace") for f in files]
    raise TaskError(f"no text found at {path}: pass --data with a directory of .txt files or a text file")


def load_texts(path: str | Path) -> str:
    """All ``.txt``/``.md`` files of a directory (sorted), or one file, joined by blank lines."""
    return "\n\n".join(text_files(path))
