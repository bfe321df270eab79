"""``kvbench train deltakv``: train DeltaKV's per-layer compressors for one model.

The base model is frozen; only the compressors train. Every sample is a packed run of ``seq_len`` tokens
of the corpus. In the forward pass every compressed layer replaces its keys and values by their DeltaKV
reconstruction (references: the sinks and every ``s``-th token, exact; every other token: ``up(down(x) -
down(ref)) + ref`` with ``ref`` the mean of its ``k`` nearest earlier references), so later layers see
reconstructed attention, as at inference. Loss = next-token cross-entropy + the sum over compressed layers
of the MSE between reconstructed and true (pre-RoPE key ++ value) vectors, as the paper trains. AdamW,
linear warm-up then cosine decay (over the steps or the time limit, whichever ends first), gradient
clipping at 1.

Choices the paper leaves open: the up-projection starts at zero (the first reconstruction is the reference
mean, so training starts from a sane cache); the reference choice is not differentiated (a top-k);
latents are trained unquantised (int8/int4 storage is an inference option); the last 2% of the corpus
is held out and reported (cross-entropy with full and reconstructed KV). The checkpoint (safetensors + JSON)
records the model, its signature and fingerprint, the layers, r, I, s, k, the corpus (path, files, bytes,
sha256, tokens), the steps, the time and the final losses.

Corpora: a text file, or a directory of ``.txt``/``.md`` files and manual pages (``kvbench.io.read_corpus``).
"""
from __future__ import annotations

from pathlib import Path

import click
import torch
import torch.nn.functional as F

from kvbench.io import read_corpus
from kvbench.cli import fail, user_errors
from kvbench.methods.deltakv.codec import (is_reference, kv_from_tokens, model_fingerprint, model_signature,
                                          nearest_references, save_checkpoint, tokens_from_kv, visible_references)
from kvbench.methods.deltakv.method import DeltaKV
from kvbench.training import corpus_summary, next_token_loss, optimise, pack_corpus

class TrainingAttention:
    """Stands in for the kvbench cache during training (``kvbench_cache=``): full layers attend exactly;
    compressed layers attend over their DeltaKV reconstruction and record its MSE."""

    def __init__(self, method: DeltaKV, rope, positions: torch.Tensor):
        self.method, self.rope, self.positions = method, rope, positions
        self.mse: list[torch.Tensor] = []

    def attention(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        if layer in self.method.full_set:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        m = self.method
        heads = k.shape[1]
        x = tokens_from_kv(self.rope(k.float(), self.positions, inverse=True), v.float())  # [B, T, D]
        x_hat, mse = reconstruct_training(x, m.compressor_for(layer), m.sinks, m.stride_, m.neighbors_)
        self.mse.append(mse)
        k_pre, v_hat = kv_from_tokens(x_hat, heads)
        k_hat = self.rope(k_pre, self.positions)
        return F.scaled_dot_product_attention(q, k_hat.to(q.dtype), v_hat.to(q.dtype), is_causal=True, scale=scale,
                                              enable_gqa=True)


def reconstruct_training(x: torch.Tensor, compressor, sinks: int, stride: int, k: int):
    """Every non-reference token of ``x [B, T, D]`` replaced by its reconstruction; returns it and the MSE."""
    T = x.shape[1]
    pos = torch.arange(T, device=x.device)
    ref = is_reference(pos, sinks, stride)
    refs, lat = x[:, ref], x[:, ~ref]
    with torch.no_grad():
        nbr = nearest_references(lat, refs, visible_references(pos[~ref], sinks, stride), k)  # [B, n, k]
    mean = torch.gather(refs[:, None].expand(-1, lat.shape[1], -1, -1), 2,
                        nbr[..., None].expand(-1, -1, -1, x.shape[2])).mean(dim=2)
    lat_hat = compressor.decode(compressor.encode(lat, mean), mean)
    x_hat = x.clone()
    x_hat[:, ~ref] = lat_hat
    return x_hat, F.mse_loss(lat_hat, lat.detach())


def train(model: str, data: str, out: str, steps: int = 1000, batch: int = 8, seq_len: int = 1024,
          lr: float = 1e-3, latent_dim: int | None = None, intermediate: int | None = None, stride: int = 10,
          neighbors: int = 4, sinks: int = 8, full_layers: list[int] | None = None, compressor: str = "swiglu",
          device: str = "auto", dtype: str = "auto", seed: int = 0, max_minutes: float | None = None,
          log=print) -> Path:
    from kvbench import models
    from kvbench.cache import rope_inverse_factory
    from kvbench.engine import resolve_device, resolve_dtype
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    method = DeltaKV(latent_dim=latent_dim, intermediate=intermediate, stride=stride, neighbors=neighbors, sinks=sinks,
                     full_layers=full_layers, compressor=compressor, seed=seed,
                     random_init=True)  # validates before loading; training starts from random compressors
    text, corpus = read_corpus(data)
    lm = models.load(model, torch_dtype, dev)
    if lm.tokenizer is None:
        raise models.ModelError("training needs a tokenizer: random-weight presets cannot train a compressor")
    lm.model.requires_grad_(False)
    method.prepare(lm)
    comps = method.modules.float().requires_grad_(True).train()
    for module in comps.values():
        torch.nn.init.zeros_(module.up.weight)
    rope = rope_inverse_factory(lm.model.model.rotary_emb)

    train_set, held = pack_corpus(lm.tokenizer, text, corpus, seq_len, min_train=batch)
    log(f"{corpus_summary(corpus)}; compressed layers {sorted(int(x) for x in comps)}; "
        f"r={method.latent_dim_} I={method.intermediate_}")

    gen = torch.Generator().manual_seed(seed)
    positions = torch.arange(seq_len, device=dev)[None, :].expand(batch, seq_len)

    def loss_fn(x: torch.Tensor):
        ce, mse = _loss(lm.model, method, rope, x.to(dev), positions)
        return ce + mse, torch.stack([ce, mse])

    step, seconds, history = optimise(
        comps.parameters(), loss_fn, train_set, batch, steps, lr, max_minutes, max(1, steps // 20), gen, log,
        stop_message=lambda s: f"stopping at step {s}: --max-minutes {max_minutes} reached",
        report=lambda s, rec, secs: f"step {s}: ce {rec[0]:.4f} mse(sum over layers) {rec[1]:.4f} ({secs:.0f} s)")
    tail = history[-20:]
    final = {"train_ce": sum(c for c, _ in tail) / len(tail), "train_mse_sum": sum(m for _, m in tail) / len(tail)}
    final.update(_heldout(lm.model, method, rope, held.to(dev), min(batch, len(held))))
    log(f"trained {step} steps in {seconds:.0f} s; final {final}")
    comps.eval()
    config = {"model": lm.name, "model_signature": model_signature(lm.model.config),
              "model_fingerprint": model_fingerprint(lm.model), "full_layers": sorted(method.full_set),
              "compressed_layers": sorted(int(x) for x in comps), "dim": 2 * method.heads * method.signature["head_dim"],
              "latent_dim": method.latent_dim_, "intermediate": method.intermediate_, "compressor": method.kind_,
              "stride": method.stride_, "neighbors": method.neighbors_, "sinks": method.sinks, "corpus": corpus,
              "steps": step, "train_seconds": round(seconds, 1), "final_losses": final,
              "training": {"batch": batch, "seq_len": seq_len, "lr": lr, "optimizer": "AdamW(0.9, 0.95)",
                           "schedule": "linear warm-up over 5% of the steps or of --max-minutes (the shorter), "
                                       "cosine to 10% over the rest", "grad_clip": 1.0, "seed": seed,
                           "dtype": str(torch_dtype).replace("torch.", ""), "device": dev}}
    return save_checkpoint(out, comps, config)


def _loss(model, method, rope, ids: torch.Tensor, positions: torch.Tensor, full_kv: bool = False):
    attn = TrainingAttention(method, rope, positions[: ids.shape[0]])
    if full_kv:
        attn.method = _AllFull(method)
    ce = next_token_loss(model, ids, position_ids=positions[: ids.shape[0]], use_cache=False, kvbench_cache=attn)
    mse = torch.stack(attn.mse).sum() if attn.mse else ce.new_zeros(())
    return ce, mse


class _AllFull:
    """A view of the method with every layer full (the reference cross-entropy)."""

    def __init__(self, method):
        self.full_set = set(range(method.n_layers))


@torch.no_grad()
def _heldout(model, method, rope, held: torch.Tensor, batch: int) -> dict:
    positions = torch.arange(held.shape[1], device=held.device)[None, :].expand(batch, -1)
    sums = {"heldout_ce": 0.0, "heldout_mse_sum": 0.0, "heldout_ce_full_kv": 0.0}
    n = 0
    for s in range(0, len(held) - batch + 1, batch):
        ce, mse = _loss(model, method, rope, held[s: s + batch], positions)
        ce_full, _ = _loss(model, method, rope, held[s: s + batch], positions, full_kv=True)
        sums["heldout_ce"] += ce.item()
        sums["heldout_mse_sum"] += mse.item()
        sums["heldout_ce_full_kv"] += ce_full.item()
        n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}


# ---- the command line: `kvbench train deltakv` (declared in the method's artifact_commands) ----


@click.command("deltakv")
@click.option("--model", required=True, help="HF id, local dir, .gguf file or alias")
@click.option("--data", required=True, help="training text: a file, or a directory of .txt/.md files or man pages")
@click.option("--out", required=True, help="checkpoint directory (safetensors + config.json)")
@click.option("--steps", type=int, default=1000, show_default=True)
@click.option("--batch", type=int, default=8, show_default=True, help="packed samples per step")
@click.option("--seq-len", type=int, default=1024, show_default=True, help="tokens per packed sample")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--latent-dim", type=int, default=None, help="r (default D/4)")
@click.option("--intermediate", type=int, default=None, help="I of the SwiGLU down-projection (default 3D)")
@click.option("--stride", type=int, default=10, show_default=True, help="s: one reference every s tokens")
@click.option("--neighbors", type=int, default=4, show_default=True, help="k references per token")
@click.option("--sinks", type=int, default=8, show_default=True)
@click.option("--full-layers", default=None, help="comma-separated layers kept full (default: about 5 in 32)")
@click.option("--max-minutes", type=float, default=None, help="stop after this much training time")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--seed", type=int, default=0, show_default=True)
def command(model, data, out, steps, batch, seq_len, lr, latent_dim, intermediate, stride, neighbors, sinks,
            full_layers, max_minutes, device, dtype, seed):
    """Train DeltaKV's per-layer compressors (the base model stays frozen)."""
    if min(steps, batch, seq_len) < 1:
        fail("--steps, --batch and --seq-len must be at least 1")
    layers = None
    if full_layers is not None:
        try:
            layers = [int(x) for x in full_layers.split(",") if x.strip()]
        except ValueError:
            fail(f"--full-layers expects comma-separated layer numbers, got '{full_layers}'")
    try:
        path = train(model, data, out, steps=steps, batch=batch, seq_len=seq_len, lr=lr, latent_dim=latent_dim,
                     intermediate=intermediate, stride=stride, neighbors=neighbors, sinks=sinks,
                     full_layers=layers, device=device, dtype=dtype, seed=seed, max_minutes=max_minutes,
                     log=click.echo)
    except user_errors() as e:
        fail(str(e))
    click.echo(f"checkpoint: {path}")
