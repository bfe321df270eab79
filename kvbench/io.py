"""Readers every part of kvbench shares: training text (corpora of prose and manual pages) and
JSON / JSON-lines files with errors that name the file and line."""
from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

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
