"""KV-CAR diagnostic (issue 19): where the loss of a linear code of the K/V sits, layer by layer. The
autoencoders start at the principal components of the first calibration samples (``kvbench train kvcar``'s
start, no training step); then the held-out cross-entropy with every layer coded, with keys only or values
only, and with one layer's keys or values coded at a time (the rest exact). Measured on SmolLM2 (CPU):
results/kvcar/README.md.

usage: python scripts/kvcar_layers.py MODEL CORPUS K:V [seq_len 512] [calib 8] [heldout 8]
  e.g. python scripts/kvcar_layers.py smollm2-135m .carry/data/corpus/general-english.txt.gz 24:40
"""
import math
import sys

import torch
import torch.nn.functional as F

from kvbench import models
from kvbench.cache import rope_inverse_factory
from kvbench.io import read_corpus
from kvbench.methods.kvcar.codec import LayerCodec, pca_init_
from kvbench.methods.kvcar.train import Capture, head_major
from kvbench.training import pack_corpus

if len(sys.argv) < 4:
    raise SystemExit(__doc__.split("usage: ")[1].split("\n")[0])
model_spec, corpus_path, widths = sys.argv[1:4]
seq, n_cal, n_held = (int(x) for x in (sys.argv[4:] + ["512", "8", "8"][len(sys.argv) - 4:]))
k_lat, v_lat = (int(x) for x in widths.split(":"))
torch.manual_seed(0)
lm = models.load(model_spec, torch.float32, "cpu")
model = lm.model.requires_grad_(False)
text, corpus = read_corpus(corpus_path)
train_set, held = pack_corpus(lm.tokenizer, text, corpus, seq, min_train=n_cal)
held = held[:n_held]
cfg = model.config
H, L = cfg.num_key_value_heads, cfg.num_hidden_layers
d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
rope = rope_inverse_factory(model.model.rotary_emb)

positions = torch.arange(seq)[None].expand(n_cal, -1)
cap = Capture(rope, positions, pre_rope=True)
with torch.no_grad():
    model(input_ids=train_set[:n_cal], position_ids=positions, use_cache=False, kvbench_cache=cap)
codecs = torch.nn.ModuleDict({str(layer): LayerCodec(H, d, 2 * k_lat, k_lat, 2 * v_lat, v_lat) for layer in range(L)})
for layer in range(L):
    pca_init_(codecs[str(layer)].k, cap.k[layer].transpose(0, 1).reshape(H, -1, d))
    pca_init_(codecs[str(layer)].v, cap.v[layer].transpose(0, 1).reshape(H, -1, d))
codecs.eval()
held_positions = torch.arange(seq)[None].expand(len(held), -1)


class Coded:
    """Exact attention, but the keys (pre-RoPE) and/or values of ``layers`` pass through their autoencoders."""

    def __init__(self, layers: set[int], parts: str):
        self.layers, self.parts = layers, parts

    def attention(self, layer, q, k, v, scale):
        if layer in self.layers:
            codec = codecs[str(layer)]
            if "k" in self.parts:
                pre = rope(k.float(), held_positions, inverse=True)
                k = rope(head_major(codec.k, pre), held_positions).to(q.dtype)
            if "v" in self.parts:
                v = head_major(codec.v, v.float()).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


@torch.no_grad()
def cross_entropy(layers: set[int], parts: str) -> float:
    logits = model(input_ids=held, position_ids=held_positions, use_cache=False,
                   kvbench_cache=Coded(layers, parts)).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), held[:, 1:].reshape(-1)).item()


full = cross_entropy(set(), "")
increase = lambda layers, parts: f"{100 * (math.exp(cross_entropy(layers, parts) - full) - 1):+.2f}%"
print(f"{model_spec}, latents {k_lat}:{v_lat} of {d}, PCA start on {n_cal} x {seq} tokens, held-out {n_held} x {seq}; "
      f"full cross-entropy {full:.4f}")
every = set(range(L))
print(f"perplexity increase, every layer coded: {increase(every, 'kv')}; keys only {increase(every, 'k')}; "
      f"values only {increase(every, 'v')}")
print("| layer | keys alone | values alone |\n|---|---|---|")
for layer in range(L):
    print(f"| {layer} | {increase({layer}, 'k')} | {increase({layer}, 'v')} |", flush=True)
