"""Held-out perplexity and KL of KV-CAR codecs, measured on the same windows.

Each training reports its codec's held-out numbers on the corpus's tail cut at its own training window
(``final_losses`` in the artifact), so two codecs trained on windows of different length were measured on
different text: on Qwen2.5-Coder-1.5B the LM-loss codec's -0.49% came from 1024-token windows, the KL codec's
+13.5% from 4096-token ones (results/kvcar/README.md). This evaluates every codec given on the same held-out
windows (``pack_corpus``'s tail at ``--seq-len``, the first ``--samples``), every key and value decoded, as the
trainer's check does, and prints one JSON line per codec.

    python scripts/kvcar_heldout.py --model qwen2.5-coder-1.5b --data .carry/data/corpus/general-english.txt.gz \\
        --artifact checkpoints/kvcar-qwen2.5-coder-1.5b-long --artifact checkpoints/kvcar-qwen2.5-coder-1.5b-kl \\
        --seq-len 1024 --samples 16
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from kvbench import artifact as artifacts
from kvbench import models
from kvbench.cache import rope_inverse_factory
from kvbench.io import read_corpus
from kvbench.methods.kvcar import NAME, choose_reuse, codecs_from_artifact
from kvbench.methods.kvcar.train import evaluate_heldout
from kvbench.training import pack_corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="the training corpus (its tail is the held-out text)")
    ap.add_argument("--artifact", action="append", required=True, help="a kvcar artifact made for --model (repeat)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=16, help="held-out windows evaluated (the first of the tail)")
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    if args.samples < args.batch or min(args.seq_len, args.batch) < 1:
        raise SystemExit("--seq-len and --batch must be >= 1 and --samples at least --batch")
    loaded = [(path, *artifacts.load(path, NAME)) for path in args.artifact]  # refused before the model loads
    text, corpus = read_corpus(args.data)
    lm = models.load(args.model)
    _, held = pack_corpus(lm.tokenizer, text, corpus, args.seq_len, min_train=1)
    held = held[: args.samples].to(next(lm.model.parameters()).device)
    sig = artifacts.model_signature(lm.model.config)
    rope = rope_inverse_factory(lm.model.model.rotary_emb)
    for path, meta, tensors in loaded:
        artifacts.check_model(meta, lm, path)
        codecs = codecs_from_artifact(meta, tensors, sig["num_hidden_layers"], sig["num_key_value_heads"],
                                      sig["head_dim"]).to(held.device).eval()
        reuse = choose_reuse(meta["similarity"], meta["reuse_threshold"])  # the artifact's pairs, as the method reads them
        t0 = time.time()
        result = evaluate_heldout(lm.model, codecs, reuse, rope, held, args.batch, meta["rope_keys"] == "pre")
        print(json.dumps({"artifact": path.rstrip("/").split("/")[-1], "seq_len": args.seq_len,
                          "samples": len(held) // args.batch * args.batch, "trained_on": meta["training"]["seq_len"],
                          "stage2": meta["training"].get("lm_loss", "ce"),
                          **{k: round(v, 5) for k, v in result.items()}, "seconds": round(time.time() - t0, 1)}),
              flush=True)


if __name__ == "__main__":
    main()
