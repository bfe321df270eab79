"""KV-CAR diagnostics (issue 19): the same tokens through several paths, continuation ppl and KL against the
full cache: training's ``Reconstructed`` (every key and value decoded), the engine's teacher-forced fidelity
path (context decoded, the fed chunk exact), the same with the first 4 tokens exact, and token-by-token decoding
(what generation tasks go through); ``heldout`` adds the training's own metric on the same sequence.
Why held-out and fidelity disagree, measured with it on SmolLM2 (CPU): results/kvcar/README.md.

usage: MODEL=smollm2-135m DEVICE=cpu python scripts/kvcar_paths.py ARTIFACT TEXT CTX CONT DTYPE [offset] [bos|nobos] [quick] [heldout]
  TEXT: a .txt file, or ``stdlib`` (the fidelity task's default docstrings)
"""
import math
import sys

import torch
import torch.nn.functional as F

from kvbench import artifact as artifacts, models, registry
from kvbench.cache import rope_inverse_factory
from kvbench.engine import Engine
from kvbench.io import load_texts
from kvbench.methods.kvcar import codecs_from_artifact
from kvbench.methods.kvcar.train import Capture, Reconstructed, head_major
from kvbench.task import Sample

art, text_src, C, T, dt = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
offset = int(sys.argv[6]) if len(sys.argv) > 6 else 0
use_bos = (sys.argv[7] == "bos") if len(sys.argv) > 7 else True
dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dt]
torch.manual_seed(0)
import os
lm = models.load(os.environ.get("MODEL", "smollm2-135m"), dtype, os.environ.get("DEVICE", "cpu"))
model, tok = lm.model, lm.tokenizer
if text_src == "stdlib":
    from kvbench.tasks.fidelity import stdlib_prose
    text = stdlib_prose()
else:
    text = load_texts(text_src)
ids = tok.encode(text, add_special_tokens=False)[offset: offset + C + T]
bos = [tok.bos_token_id] if (use_bos and tok.bos_token_id is not None) else []
ctx, cont = bos + ids[:C], ids[C:]
dev = next(model.parameters()).device
seq = torch.tensor(ctx + cont, device=dev)[None]
n_ctx = len(ctx)
target = torch.tensor(cont, device=dev)  # row t predicts token t (the fidelity task's rows)

meta, tensors = artifacts.load(art, "kvcar")
sig = artifacts.model_signature(model.config)
L, H, D = sig["num_hidden_layers"], sig["num_key_value_heads"], sig["head_dim"]
codecs = codecs_from_artifact(meta, tensors, L, H, D).eval().to(dev)
rope = rope_inverse_factory(model.model.rotary_emb)
pos = torch.arange(seq.shape[1], device=dev)[None]
pre = meta["rope_keys"] == "pre"


class Hybrid:
    """What the engine computes (exact prefill): context queries attend exactly; continuation queries attend
    to decoded context keys and exact continuation keys (``cont_exact``) or decoded ones."""

    def __init__(self, cont_exact=True, ctx_exact=True, keep_first=0):
        self.cont_exact, self.ctx_exact, self.keep_first = cont_exact, ctx_exact, keep_first

    def attention(self, layer, q, k, v, scale):
        codec = codecs[str(layer)]
        x = rope(k.float(), pos, inverse=True) if pre else k.float()
        k_hat = head_major(codec.k, x)
        k_hat = rope(k_hat, pos) if pre else k_hat
        v_hat = head_major(codec.v, v.float())
        k_hat, v_hat = k_hat.to(q.dtype), v_hat.to(q.dtype)
        if self.keep_first:
            k_hat[:, :, :self.keep_first] = k[:, :, :self.keep_first]
            v_hat[:, :, :self.keep_first] = v[:, :, :self.keep_first]
        # keys seen by continuation queries
        kc, vc = k_hat.clone(), v_hat.clone()
        if self.cont_exact:
            kc[:, :, n_ctx:], vc[:, :, n_ctx:] = k[:, :, n_ctx:], v[:, :, n_ctx:]
        out_c = F.scaled_dot_product_attention(q, kc, vc, is_causal=True, scale=scale, enable_gqa=True)
        if self.ctx_exact:
            out_x = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            out_x = out_c
        out = out_c.clone()
        out[:, :, :n_ctx] = out_x[:, :, :n_ctx]
        return out


class Reco(Reconstructed):
    def __init__(self, keep_first=0):
        super().__init__(codecs, {}, rope, pos, pre)
        self.keep_first = keep_first

    def attention(self, layer, q, k, v, scale):
        if not self.keep_first:
            return super().attention(layer, q, k, v, scale)
        h = Hybrid(cont_exact=False, ctx_exact=False, keep_first=self.keep_first)
        return h.attention(layer, q, k, v, scale)


@torch.no_grad()
def run_ref(attn):
    logits = model(input_ids=seq, position_ids=pos, use_cache=False, kvbench_cache=attn).logits[0]
    return F.log_softmax(logits[n_ctx - 1: -1].float(), -1)


@torch.no_grad()
def run_engine(method, stepwise=False, chunk=None):
    eng = Engine(lm, method, prefill_chunk=chunk)
    sample = Sample("s", ctx, [], [], 0, continuation_ids=cont)
    if not stepwise:
        return eng.continuation_logprobs(sample)[0]
    cache, first, _ = eng.prefill(Sample("s", ctx, [], [], 0))
    outs = [first[:, None]] + [eng.forward(cache, torch.tensor([[t]], device=dev), compress=False) for t in cont]
    return F.log_softmax(torch.cat(outs, 1)[0, :-1].float(), -1)


full = run_ref(Capture(rope, pos, pre))


@torch.no_grad()
def all_pos_ce(attn):
    logits = model(input_ids=seq, position_ids=pos, use_cache=False, kvbench_cache=attn).logits[0]
    return F.cross_entropy(logits[:-1].float(), seq[0, 1:]).item()


if "heldout" in sys.argv:  # _heldout's metric on this sequence: every position, everything reconstructed
    ce_f, ce_r = all_pos_ce(Capture(rope, pos, pre)), all_pos_ce(Reco())
    print(f"heldout-style (all positions): CE full {ce_f:.4f} kvcar {ce_r:.4f} ppl increase {math.exp(ce_r - ce_f) - 1:+.3f}")
rows = {}
kv = lambda: registry.build_method("kvcar", 1.0, {"artifact": art})
rows["full (Capture)"] = full
rows["full (engine)"] = run_engine(registry.build_method("full", 1.0))
rows["ref: Reconstructed (all decoded)"] = run_ref(Reco())
rows["ref: Hybrid exact prefill + exact cont"] = run_ref(Hybrid(True, True))
if "quick" not in sys.argv:
    rows["ref: Hybrid exact prefill + decoded cont"] = run_ref(Hybrid(False, True))
    rows["ref: Hybrid decoded prefill + exact cont"] = run_ref(Hybrid(True, False))
rows["ref: Reconstructed, first 4 exact"] = run_ref(Reco(keep_first=4))
rows["ref: Hybrid exact/exact, first 4 exact"] = run_ref(Hybrid(True, True, keep_first=4))
rows["engine: fidelity path"] = run_engine(kv())
if "quick" not in sys.argv:
    rows["engine: cont token by token"] = run_engine(kv(), stepwise=True)
if "chunk1" in sys.argv:
    rows["engine: prefill_chunk=1 (all decoded)"] = run_engine(kv(), chunk=1)

print(f"dtype {dt}, ctx {n_ctx} (bos {bool(bos)}), cont {len(cont)}, offset {offset}, text {text_src}")
for name, lp in rows.items():
    nll = -lp.gather(1, target[:, None]).mean().item()
    kl = (full.exp() * (full - lp)).sum(-1).mean().item()
    print(f"{name:45s} ppl {math.exp(nll):8.3f}  KL {kl:.4f}  max|dlogp| vs Reconstructed "
          f"{(lp - rows['ref: Reconstructed (all decoded)']).abs().max().item() if 'ref: Reconstructed (all decoded)' in rows else float('nan'):.2e}")
