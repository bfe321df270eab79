"""Where does a KV-CAR codec lose a needle: in its keys or in its values?

On Qwen2.5-Coder-1.5B the trained codecs find Kamradt's needle at depth 0 and 1.0 and never in between
(results/kvcar/README.md). This measures, teacher-forced, the answer the full cache gives (its greedy answer, made
first) under four caches: nothing coded, keys coded, values coded, both. The prompt is prefilled exactly and the
answer's tokens read the coded prompt, as in a run (the engine prefills the whole prompt exactly and decodes over
the codes). Per depth and cache: the answer's mean log-probability, the share of its tokens that stay the top-1,
and the log-probability of the key phrase's first token.

    python scripts/kvcar_diagnose.py --model qwen2.5-coder-1.5b --artifact checkpoints/kvcar-qwen2.5-coder-1.5b-long \\
        --haystack ../shared/data/paul_graham_essays --length 4096 --depths 0,0.5,1.0
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from kvbench import artifact as artifacts
from kvbench import models, registry
from kvbench.cache import rope_inverse_factory
from kvbench.engine import Engine
from kvbench.methods.kvcar import NAME, codecs_from_artifact
from kvbench.methods.kvcar.train import head_major
from kvbench.task import TaskContext
from kvbench.tasks.niah import NIAH

CACHES = {"none": (False, False), "keys": (True, False), "values": (False, True), "both": (True, True)}


class PrefillExactAnswerCoded:
    """Rows before ``prompt_len`` attend exactly; the answer's rows attend over every key and value passed
    through the layer's autoencoders (those that ``code_k`` / ``code_v`` select), causally."""

    def __init__(self, codecs, rope, positions, prompt_len: int, code_k: bool, code_v: bool):
        self.codecs, self.rope, self.positions, self.P = codecs, rope, positions, prompt_len
        self.code_k, self.code_v = code_k, code_v

    def attention(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        exact = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        if not (self.code_k or self.code_v):
            return exact
        codec = self.codecs[str(layer)]
        if self.code_k:  # pre-RoPE codes, as the artifact was trained
            k = self.rope(head_major(codec.k, self.rope(k.float(), self.positions, inverse=True)), self.positions)
        if self.code_v:
            v = head_major(codec.v, v.float())
        T, P = q.shape[2], self.P
        mask = torch.arange(T, device=q.device)[None, :] <= torch.arange(P, T, device=q.device)[:, None]
        coded = F.scaled_dot_product_attention(q[:, :, P:], k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale,
                                               enable_gqa=True)
        return torch.cat([exact[:, :, :P], coded], dim=2)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--artifact", required=True, help="a kvcar artifact made for --model")
    ap.add_argument("--haystack", required=True, help="the essays directory")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--depths", default="0,0.5,1.0")
    ap.add_argument("--answer-tokens", type=int, default=24)
    args = ap.parse_args()
    meta, tensors = artifacts.load(args.artifact, NAME)  # refused here, before the model loads, if malformed
    lm = models.load(args.model)
    artifacts.check_model(meta, lm, args.artifact)
    cfg = lm.model.config
    sig = artifacts.model_signature(cfg)
    codecs = codecs_from_artifact(meta, tensors, sig["num_hidden_layers"], sig["num_key_value_heads"],
                                  sig["head_dim"]).eval()
    if meta["rope_keys"] != "pre":
        raise SystemExit(f"{args.artifact}: codes post-RoPE keys; this diagnosis assumes pre-RoPE codes")
    rope = rope_inverse_factory(lm.model.model.rotary_emb)
    task = NIAH(style="original", lengths=[args.length], depths=[float(d) for d in args.depths.split(",")],
                max_new_tokens=args.answer_tokens)
    samples = task.samples(lm.tokenizer, TaskContext(max_context_tokens=args.length + 64, data=args.haystack))
    full = Engine(lm, registry.build_method("full", 1.0), protocol="query-aware")  # the answer every cache is held to
    for sample in samples:
        prompt = torch.tensor([sample.context_ids + sample.question_ids])
        t0 = time.time()
        text = full.generate([sample], trace_every=0)[0]["prediction"]
        answer = torch.tensor(lm.tokenizer.encode(text, add_special_tokens=False)[: args.answer_tokens])
        key = lm.tokenizer.encode(" " + task.key_phrase, add_special_tokens=False)[0]
        ids = torch.cat([prompt[0], answer])[None]
        positions = torch.arange(ids.shape[1])[None]
        P = prompt.shape[1]
        row = {"depth": sample.meta["depth"], "length": args.length, "full_answer": text,
               "found_by_full": task.key_phrase.lower() in text.lower()}
        for name, (code_k, code_v) in CACHES.items():
            attn = PrefillExactAnswerCoded(codecs, rope, positions, P, code_k, code_v)
            logits = lm.model(input_ids=ids, position_ids=positions, use_cache=False, kvbench_cache=attn).logits[0]
            logp = F.log_softmax(logits[P - 1: -1].float(), dim=-1)
            tok = logp.gather(1, answer[:, None])[:, 0]
            at_key = (answer == key).nonzero()
            row[name] = {"mean_logprob": round(tok.mean().item(), 4),
                         "top1_kept": round((logp.argmax(-1) == answer).float().mean().item(), 3),
                         "key_token_logprob": round(tok[at_key[0, 0]].item(), 3) if len(at_key) else None}
        row["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
