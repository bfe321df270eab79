"""``kvbench train kvcar``: reuse calibration, then the two training stages, written as one artifact.

0. The autoencoders start (when ``hidden == 2 * latent``, the default) as the best affine code of the
   keys and values of the first calibration samples (their principal components; ``codec.pca_init_``),
   so even a short run starts from a sane cache; otherwise from PyTorch's default random init.
1. Reuse calibration: the base model runs on the first ``calib_samples`` training samples; for every
   (layer >= 1, KV head) the similarity to the same head of the previous layer is the lower of the mean
   token cosine of the keys and of the values. Heads at or above ``reuse_threshold`` are reused.
2. Stage 1, reconstruction: the base model runs (no gradient) and every layer's keys (pre-RoPE unless
   ``rope_keys="post"``) and values train their autoencoders, every head's, reused or not; loss: the mean
   over layers, keys and values of the MSE relative to the input's mean square; BatchNorm on batch
   statistics.
3. Stage 2, language modelling: every layer attends over reconstructed keys and values (reused heads read
   the owner layer's reconstruction), BatchNorm frozen to its running statistics, base model frozen;
   loss: next-token cross-entropy (the paper's), or with ``--lm-loss kl`` (not in the paper) the KL divergence
   from the full-cache model's next-token distributions: the cross-entropy trains the model-with-codec toward
   the corpus (its held-out perplexity fell below full's on Qwen while its KL to full rose,
   results/kvcar/README.md); the KL trains it toward the full model, which is what fidelity measures.

AdamW; each stage has linear warm-up and cosine decay over its steps or its share of ``--max-minutes``
(``recon_share`` for stage 1), whichever ends first. The last 2% of the corpus samples are held out and
reported (cross-entropy with the full and the decoded cache, their relative perplexity increase, and the KL
from the full cache's next-token distributions to the decoded cache's, on
at most ``HELDOUT_EVAL`` of them, so the report costs seconds). The
artifact (``kvbench.artifact``: safetensors + JSON, model fingerprint, checksum, atomic) holds the
unfolded autoencoders, the similarity matrix, the threshold and the chosen pairs, the corpus description,
the settings, the steps, the times and the losses.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import click
import torch
import torch.nn.functional as F

from kvbench import artifact as artifacts
from kvbench.cli import fail, user_errors
from kvbench.training import corpus_summary, distillation_loss, heldout_losses, next_token_loss, optimise, pack_corpus
from kvbench.methods.kvcar import NAME, ROPE_KEYS, LayerCodec, choose_reuse
from kvbench.methods.kvcar.codec import pca_init_
from kvbench.task import TaskError

HELDOUT_EVAL = 32  # held-out samples evaluated at the end
LM_LOSSES = ("ce", "kl")


class Exact:
    """Stands in for the kvbench cache (``kvbench_cache=``): exact causal attention, nothing kept."""

    def attention(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


class Capture(Exact):
    """Exact attention, and every layer's keys (pre- or post-RoPE) and values kept, ``[B, H, T, d]``."""

    def __init__(self, rope, positions, pre_rope: bool):
        self.rope, self.positions, self.pre = rope, positions, pre_rope
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def attention(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        self.k[layer] = (self.rope(k, self.positions, inverse=True) if self.pre else k).detach().float()
        self.v[layer] = v.detach().float()
        return super().attention(layer, q, k, v, scale)


class Reconstructed:
    """Every layer attends over its keys and values passed through its autoencoders (reused heads: the
    owner layer's reconstruction)."""

    def __init__(self, codecs, reuse: dict[int, dict[int, int]], rope, positions, pre_rope: bool):
        self.codecs, self.reuse, self.rope, self.positions, self.pre = codecs, reuse, rope, positions, pre_rope
        self.k_hat: dict[int, torch.Tensor] = {}
        self.v_hat: dict[int, torch.Tensor] = {}

    def attention(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        codec = self.codecs[str(layer)]
        x = self.rope(k.float(), self.positions, inverse=True) if self.pre else k.float()
        k_hat, v_hat = head_major(codec.k, x), head_major(codec.v, v.float())
        reused = self.reuse.get(layer, {})
        if reused:
            k_hat = torch.stack([self.k_hat[reused[h]][:, h] if h in reused else k_hat[:, h]
                                 for h in range(k_hat.shape[1])], dim=1)
            v_hat = torch.stack([self.v_hat[reused[h]][:, h] if h in reused else v_hat[:, h]
                                 for h in range(v_hat.shape[1])], dim=1)
        self.k_hat[layer], self.v_hat[layer] = k_hat, v_hat
        k_out = self.rope(k_hat, self.positions) if self.pre else k_hat
        return F.scaled_dot_product_attention(q, k_out.to(q.dtype), v_hat.to(q.dtype), is_causal=True, scale=scale,
                                              enable_gqa=True)


def head_major(ae, x: torch.Tensor) -> torch.Tensor:
    """An autoencoder's reconstruction of ``x [B, H, T, d]`` (tokens of each head as one batch)."""
    B, H, T, d = x.shape
    y = ae(x.transpose(0, 1).reshape(H, B * T, d))
    return y.reshape(H, B, T, d).transpose(0, 1)


@torch.no_grad()
def similarity(model, samples: torch.Tensor, rope, batch: int) -> list[list[float | None]]:
    """[layer][head]: min(mean key cosine, mean value cosine) against the same head of the layer before
    (None for layer 0)."""
    sums, n = None, 0
    for s in range(0, len(samples), batch):
        ids = samples[s: s + batch]
        positions = torch.arange(ids.shape[1], device=ids.device)[None].expand(len(ids), -1)
        cap = Capture(rope, positions, pre_rope=False)
        model(input_ids=ids, position_ids=positions, use_cache=False, kvbench_cache=cap)
        layers = sorted(cap.k)
        cos = torch.stack([torch.stack([F.cosine_similarity(t[layer], t[layer - 1], dim=-1).mean(dim=(0, 2))
                                        for t in (cap.k, cap.v)]) for layer in layers[1:]])  # [L-1, 2, H]
        sums = cos * len(ids) if sums is None else sums + cos * len(ids)
        n += len(ids)
    sim = (sums / n).min(dim=1).values  # [L-1, H]
    heads = sim.shape[1]
    return [[None] * heads] + [[round(float(x), 5) for x in row] for row in sim]


def _stage(name: str, codecs, loss_fn, train_set, batch: int, steps: int, lr: float, minutes: float | None,
           gen: torch.Generator, log) -> tuple[int, float, list[float]]:
    """One training stage over the codecs' trainable parameters; returns steps, seconds, losses."""
    def step_loss(x: torch.Tensor):
        loss = loss_fn(x)
        return loss, loss

    return optimise([p for p in codecs.parameters() if p.requires_grad], step_loss, train_set, batch, steps, lr,
                    minutes, max(1, min(steps // 20, 50)), gen, log,
                    stop_message=lambda s: f"{name}: stopping at step {s}: its {minutes:.2f} minutes are up",
                    report=lambda s, loss, secs: f"{name} step {s}: loss {loss:.4f} ({secs:.0f} s)")


def train(model: str, data: str, out: str, latent_dim: int | None = None, hidden: int | None = None,
          latent_dim_v: int | None = None,
          rope_keys: str = "pre", reuse_threshold: float | None = 0.9, recon_steps: int = 1000,
          lm_steps: int = 1000, batch: int = 8, seq_len: int = 512, lr: float = 1e-3, lm_lr: float = 2e-4,
          calib_samples: int = 16, max_minutes: float | None = None, recon_share: float = 0.4,
          lm_loss: str = "ce", device: str = "auto", dtype: str = "auto", seed: int = 0, log=print) -> Path:
    from kvbench import models
    from kvbench.cache import rope_inverse_factory
    from kvbench.engine import resolve_device, resolve_dtype
    from kvbench.io import read_corpus
    if rope_keys not in ROPE_KEYS:
        raise TaskError(f"--rope-keys must be pre or post, got {rope_keys}")
    if lm_loss not in LM_LOSSES:
        raise TaskError(f"--lm-loss must be ce or kl, got {lm_loss}")
    if min(recon_steps, lm_steps) < 0 or min(batch, seq_len, calib_samples) < 1 or not 0 < recon_share < 1:
        raise TaskError("steps must be >= 0, batch, seq-len and calib-samples >= 1, recon-share in (0, 1)")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    text, corpus = read_corpus(data)
    lm = models.load(model, torch_dtype, dev)
    if lm.tokenizer is None:
        raise models.ModelError("training needs a tokenizer: random-weight presets cannot train a codec")
    sig = artifacts.model_signature(lm.model.config)
    heads, head_dim, n_layers = sig["num_key_value_heads"], sig["head_dim"], sig["num_hidden_layers"]
    latent = latent_dim or head_dim // 2
    latent_v = latent_dim_v or latent
    width, width_v = hidden or 2 * latent, hidden or 2 * latent_v
    if not (1 <= latent <= head_dim and 1 <= latent_v <= head_dim) or (latent + latent_v) % 2:
        raise TaskError(f"--latent-dim and --latent-dim-v must lie in 1..{head_dim} (the head dimension) and sum to "
                        f"an even number, got {latent} and {latent_v}")
    lm.model.requires_grad_(False)
    rope = rope_inverse_factory(lm.model.model.rotary_emb)
    pre = rope_keys == "pre"
    positions = torch.arange(seq_len, device=dev)[None].expand(batch, -1)

    train_set, held = pack_corpus(lm.tokenizer, text, corpus, seq_len, min_train=max(batch, calib_samples))
    train_set, held = train_set.to(dev), held.to(dev)
    log(f"{corpus_summary(corpus)}; "
        f"{n_layers} layers x {heads} KV heads x {head_dim}; latents {latent} (keys, {rope_keys}-RoPE) and {latent_v} "
        f"(values), hidden {width}/{width_v}")

    t_all = time.perf_counter()
    sim = similarity(lm.model, train_set[:calib_samples], rope, batch)
    reuse = choose_reuse(sim, reuse_threshold)
    pairs = [{"layer": layer, "head": head, "owner": owner, "similarity": sim[layer][head]}
             for layer, row in sorted(reuse.items()) for head, owner in sorted(row.items())]
    log(f"reuse: {len(pairs)} of {(n_layers - 1) * heads} heads at threshold {reuse_threshold} "
        f"(similarity max {max(x for row in sim[1:] for x in row):.3f}); {calib_samples} calibration samples")

    torch.manual_seed(seed)
    codecs = torch.nn.ModuleDict({str(layer): LayerCodec(heads, head_dim, width, latent, width_v, latent_v)
                                  for layer in range(n_layers)}).to(dev).float()
    init = "pca" if width == 2 * latent and width_v == 2 * latent_v else "random"
    if init == "pca":  # every autoencoder starts as the best affine code of its calibration vectors
        x = train_set[:min(batch, calib_samples)]
        cap = Capture(rope, positions[: len(x)], pre)
        with torch.no_grad():
            lm.model(input_ids=x, position_ids=positions[: len(x)], use_cache=False, kvbench_cache=cap)
        for layer in range(n_layers):
            for ae, t in ((codecs[str(layer)].k, cap.k[layer]), (codecs[str(layer)].v, cap.v[layer])):
                pca_init_(ae, t.transpose(0, 1).reshape(heads, -1, head_dim))
        del cap
    log(f"autoencoders start {'from the calibration vectors principal components' if init == 'pca' else 'random'}")
    gen = torch.Generator().manual_seed(seed)
    minutes1 = max_minutes * recon_share if max_minutes else None
    minutes2 = max_minutes * (1 - recon_share) if max_minutes else None

    def recon_loss(x):
        cap = Capture(rope, positions[: len(x)], pre)
        with torch.no_grad():
            lm.model(input_ids=x, position_ids=positions[: len(x)], use_cache=False, kvbench_cache=cap)
        terms = []
        for layer in range(n_layers):
            for ae, t in ((codecs[str(layer)].k, cap.k[layer]), (codecs[str(layer)].v, cap.v[layer])):
                terms.append(F.mse_loss(head_major(ae, t), t) / t.pow(2).mean().clamp_min(1e-8))
        return torch.stack(terms).mean()

    codecs.train()
    steps1, secs1, losses1 = _stage("stage 1 (reconstruction)", codecs, recon_loss, train_set, batch, recon_steps, lr,
                                    minutes1, gen, log)

    def stage2_loss(x):
        attn = Reconstructed(codecs, reuse, rope, positions[: len(x)], pre)
        forward = {"position_ids": positions[: len(x)], "use_cache": False}
        if lm_loss == "kl":
            return distillation_loss(lm.model, x, {**forward, "kvbench_cache": Exact()}, kvbench_cache=attn, **forward)
        return next_token_loss(lm.model, x, kvbench_cache=attn, **forward)

    codecs.eval()  # BatchNorm on its running statistics from here on (what inference folds)
    stage2 = "stage 2 (LM loss)" if lm_loss == "ce" else "stage 2 (KL to full)"
    steps2, secs2, losses2 = _stage(stage2, codecs, stage2_loss, train_set, batch, lm_steps, lm_lr,
                                    minutes2, gen, log) if lm_steps else (0, 0.0, [])
    final = {"recon_rel_mse": _tail(losses1), f"lm_{lm_loss}": _tail(losses2)}
    final.update(evaluate_heldout(lm.model, codecs, reuse, rope, held[:HELDOUT_EVAL], min(batch, len(held)), pre))
    seconds = time.perf_counter() - t_all
    log(f"trained {steps1} + {steps2} steps in {seconds:.0f} s; {final}")
    meta = {"latent_dim": latent, "hidden": width, "latent_dim_v": latent_v, "hidden_v": width_v,
            "rope_keys": rope_keys, "head_dim": head_dim, "init": init,
            "reuse_threshold": reuse_threshold, "reuse_pairs": pairs, "similarity": sim,
            "calibration": {"samples": calib_samples, "seq_len": seq_len, "source": "first training samples"},
            "corpus": corpus, "steps": {"reconstruction": steps1, "lm": steps2},
            "train_seconds": {"reconstruction": round(secs1, 1), "lm": round(secs2, 1), "total": round(seconds, 1)},
            "final_losses": final,
            "training": {"batch": batch, "seq_len": seq_len, "lr": lr, "lm_lr": lm_lr, "optimizer": "AdamW(0.9, 0.95)",
                         "schedule": "per stage: linear warm-up, cosine to 10% over its steps or its share of "
                                     "--max-minutes", "recon_share": recon_share, "lm_loss": lm_loss,
                         "grad_clip": 1.0, "seed": seed,
                         "dtype": str(torch_dtype).replace("torch.", ""), "device": dev}}
    tensors = {k: v for k, v in codecs.state_dict().items()}
    return artifacts.save(out, NAME, artifacts.model_identity(lm), meta, tensors)


def _tail(losses: list[float]) -> float | None:
    tail = losses[-20:]
    return sum(tail) / len(tail) if tail else None


@torch.no_grad()
def evaluate_heldout(model, codecs, reuse, rope, held: torch.Tensor, batch: int, pre: bool) -> dict:
    """Held-out cross-entropy with the exact and the decoded cache, and the KL between them, over ``held`` in
    batches of ``batch`` (a remainder smaller than a batch is left out)."""
    positions = torch.arange(held.shape[1], device=held.device)[None].expand(batch, -1)
    sums = {"heldout_ce_full": 0.0, "heldout_ce_kvcar": 0.0, "heldout_kl": 0.0}
    n = 0
    for s in range(0, len(held) - batch + 1, batch):
        forward = {"position_ids": positions, "use_cache": False}
        losses = heldout_losses(model, held[s: s + batch], {**forward, "kvbench_cache": Exact()},
                                kvbench_cache=Reconstructed(codecs, reuse, rope, positions, pre), **forward)
        sums["heldout_ce_full"] += losses["ce_reference"]
        sums["heldout_ce_kvcar"] += losses["ce"]
        sums["heldout_kl"] += losses["kl"]
        n += 1
    out = {k: v / max(n, 1) for k, v in sums.items()}
    out["heldout_ppl_increase"] = math.exp(out["heldout_ce_kvcar"] - out["heldout_ce_full"]) - 1
    return out


# ---- the command line: `kvbench train kvcar` (declared in the method's artifact_commands) ----


@click.command("kvcar")
@click.option("--model", required=True, help="HF id, local dir, .gguf file or alias")
@click.option("--data", required=True, help="training text (general English, never evaluation text): a file or a directory")
@click.option("--out", required=True, help="artifact directory (safetensors + artifact.json)")
@click.option("--latent-dim", type=int, default=None, help="latent width per head (default head_dim/2)")
@click.option("--latent-dim-v", type=int, default=None, help="latent width of the values per head (default --latent-dim)")
@click.option("--hidden", type=int, default=None, help="hidden width of encoder and decoder (default 2 x latent: starts from PCA)")
@click.option("--rope-keys", default="pre", show_default=True, type=click.Choice(["pre", "post"]),
              help="code keys before or after RoPE")
@click.option("--reuse-threshold", default="0.9", show_default=True,
              help="heads at or above this similarity to the previous layer store nothing ('none': no reuse)")
@click.option("--recon-steps", type=int, default=1000, show_default=True, help="stage 1 (reconstruction) steps")
@click.option("--lm-steps", type=int, default=1000, show_default=True, help="stage 2 (LM loss, base frozen) steps")
@click.option("--batch", type=int, default=8, show_default=True, help="packed samples per step")
@click.option("--seq-len", type=int, default=512, show_default=True, help="tokens per packed sample")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="stage 1 learning rate")
@click.option("--lm-lr", type=float, default=2e-4, show_default=True, help="stage 2 learning rate")
@click.option("--calib-samples", type=int, default=16, show_default=True, help="samples for the reuse calibration")
@click.option("--max-minutes", type=float, default=None, help="stop training after this much time (both stages)")
@click.option("--recon-share", type=float, default=0.4, show_default=True, help="share of --max-minutes for stage 1")
@click.option("--lm-loss", default="ce", show_default=True, type=click.Choice(LM_LOSSES),
              help="stage 2's loss: ce (next-token cross-entropy, the paper's) or kl (to the full cache's distributions)")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--seed", type=int, default=0, show_default=True)
def command(model, data, out, latent_dim, latent_dim_v, hidden, rope_keys, reuse_threshold, recon_steps, lm_steps, batch,
            seq_len, lr, lm_lr, calib_samples, max_minutes, recon_share, lm_loss, device, dtype, seed):
    """Train KV-CAR's autoencoders and calibrate its reused heads (writes one artifact)."""
    if reuse_threshold.lower() == "none":
        threshold = None
    else:
        try:
            threshold = float(reuse_threshold)
        except ValueError:
            fail(f"--reuse-threshold takes a number or 'none', got '{reuse_threshold}'")
    try:
        path = train(model, data, out, latent_dim=latent_dim, latent_dim_v=latent_dim_v, hidden=hidden,
                           rope_keys=rope_keys,
                           reuse_threshold=threshold, recon_steps=recon_steps, lm_steps=lm_steps, batch=batch,
                           seq_len=seq_len, lr=lr, lm_lr=lm_lr, calib_samples=calib_samples, max_minutes=max_minutes,
                           recon_share=recon_share, lm_loss=lm_loss, device=device, dtype=dtype, seed=seed,
                           log=click.echo)
    except user_errors() as e:
        fail(str(e))
    click.echo(f"artifact: {path}")
