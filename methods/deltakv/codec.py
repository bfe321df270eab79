"""DeltaKV's codec: the per-layer compressor (SwiGLU down, linear up), the reference arithmetic (which
positions are references, nearest visible references, token <-> key/value layout) and the checkpoint files.

What the choices are and why: the package docstring (``kvbench.methods.deltakv``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kvbench import artifact
from kvbench.models import ModelError, weights_fingerprint
from kvbench.results import file_sha256

CHECKPOINT_FORMAT = "kvbench-deltakv/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "compressors.safetensors"
LATENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "int8": None, "int4": None}
INDEX_DTYPES = {"int16": torch.int16, "int32": torch.int32}

# ---------------------------------------------------------------------------------------------- compressor

class SwiGLUDown(nn.Module):
    """``D -> 2I``, ``silu(a) * b``, ``I -> r``, no biases (the paper's down-projection)."""

    def __init__(self, dim: int, intermediate: int, latent_dim: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * intermediate, bias=False)
        self.out = nn.Linear(intermediate, latent_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.gate_up(x).chunk(2, dim=-1)
        return self.out(F.silu(a) * b)


class LayerCompressor(nn.Module):
    """One compressed layer's codec: ``z = down(x) - down(ref)``, ``x_hat = up(z) + ref``.

    ``kind="linear"`` (a plain ``D -> r`` down-projection, also offered by the official code) exists so
    that an exact identity codec can be built (r = D, identity weights)."""

    def __init__(self, dim: int, latent_dim: int, intermediate: int, kind: str = "swiglu"):
        super().__init__()
        self.kind = kind
        self.down = SwiGLUDown(dim, intermediate, latent_dim) if kind == "swiglu" else \
            nn.Linear(dim, latent_dim, bias=False)
        self.up = nn.Linear(latent_dim, dim, bias=False)

    def encode(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return self.down(x) - self.down(ref)

    def decode(self, z: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return self.up(z) + ref


def build_compressors(layers: list[int], dim: int, latent_dim: int, intermediate: int, kind: str,
                      seed: int = 0) -> nn.ModuleDict:
    torch.manual_seed(seed)
    return nn.ModuleDict({str(layer): LayerCompressor(dim, latent_dim, intermediate, kind) for layer in layers})


# ---------------------------------------------------------------------------------------------- references

def is_reference(pos: torch.Tensor, sinks: int, stride: int) -> torch.Tensor:
    """Positions that are references: the sinks and every ``stride``-th position after them."""
    return (pos < sinks) | ((pos - sinks) % stride == 0)


def reference_row(pos: torch.Tensor, sinks: int, stride: int) -> torch.Tensor:
    """Row of a reference position in its sequence's reference table."""
    return torch.where(pos < sinks, pos, sinks + (pos - sinks) // stride)


def latent_row(pos: torch.Tensor, sinks: int, stride: int) -> torch.Tensor:
    """Row of a non-reference position in its sequence's latent table."""
    c = pos - sinks
    return c - c // stride - 1


def visible_references(pos: torch.Tensor, sinks: int, stride: int) -> torch.Tensor:
    """How many references lie before each (non-reference) position: rows ``[0, n)`` of its table."""
    c = pos - sinks
    return torch.where(pos <= sinks, torch.clamp(pos, max=sinks), sinks + (c - 1) // stride + 1)


def nearest_references(x: torch.Tensor, refs: torch.Tensor, n_visible: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of the ``k`` references nearest (L2) to each token among the first ``n_visible`` rows.

    ``x [..., n, D]``, ``refs [..., R, D]``, ``n_visible [..., n]`` (at least ``k``) -> ``[..., n, k]``."""
    x, refs = x.float(), refs.float()
    d = (x * x).sum(-1, keepdim=True) - 2 * x @ refs.transpose(-1, -2) + (refs * refs).sum(-1).unsqueeze(-2)
    hidden = torch.arange(refs.shape[-2], device=x.device) >= n_visible[..., None]
    d = d.masked_fill(hidden, float("inf"))
    return d.topk(k, dim=-1, largest=False).indices


def tokens_from_kv(k_pre: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, hd]`` pre-RoPE keys and values -> ``[B, T, 2*H*hd]`` (keys of all heads, then values)."""
    B, H, T, hd = k_pre.shape
    return torch.cat([k_pre.transpose(1, 2).reshape(B, T, H * hd), v.transpose(1, 2).reshape(B, T, H * hd)], -1)


def kv_from_tokens(x: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``tokens_from_kv``."""
    B, T, D = x.shape
    hd = D // (2 * heads)
    k = x[..., : heads * hd].reshape(B, T, heads, hd).transpose(1, 2)
    v = x[..., heads * hd:].reshape(B, T, heads, hd).transpose(1, 2)
    return k, v


# ---------------------------------------------------------------------------------------------- checkpoints

def model_signature(config) -> dict:
    """The artifacts' model signature (``kvbench.artifact``) less the query heads, which DeltaKV's
    checkpoints have never recorded (the checkpoints made so far stay valid)."""
    signature = artifact.model_signature(config)
    del signature["num_attention_heads"]
    return signature


model_fingerprint = weights_fingerprint  # the checkpoints' "model_fingerprint": the artifacts' one




def save_checkpoint(directory: str | Path, compressors: nn.ModuleDict, config: dict) -> Path:
    """Weights first, then the config that names their checksum, each written atomically: a save cut short
    leaves the old checkpoint whole, or new weights that the old config's checksum refuses."""
    from safetensors.torch import save_file

    from kvbench import results
    out = Path(directory)
    # bfloat16 on disk halves the checkpoint; inference computes in float32 from these values.
    tensors = {f"{layer}.{name}": p.detach().to("cpu", torch.bfloat16).contiguous()
               for layer, module in compressors.items() for name, p in module.named_parameters()}
    with results.atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
        digest = file_sha256(tmp)
    config = {"format": CHECKPOINT_FORMAT, **config, "weights_sha256": digest}
    results.write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return out


_CONFIG_KEYS = {"model": str, "model_signature": dict, "model_fingerprint": str, "full_layers": list,
                "compressed_layers": list, "dim": int, "latent_dim": int, "intermediate": int, "compressor": str,
                "stride": int, "neighbors": int, "weights_sha256": str}


def read_checkpoint_config(directory: str | Path) -> dict:
    """A checkpoint's config, checked (format, keys, dimensions, the weights' checksum) before any model is
    loaded; a ``ModelError`` in one line for anything wrong."""
    path = Path(directory).expanduser()
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        # an ArtifactError, as for every trained method: a sweep planned for the GPU machine, where the
        # checkpoint is trained first, lists its points as still to run instead of stopping
        raise artifact.ArtifactError(f"no DeltaKV checkpoint at {directory} (expected {CONFIG_FILE} and "
                                     f"{WEIGHTS_FILE}; make one with `kvbench train deltakv`)")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except ValueError as e:
        raise ModelError(f"{path / CONFIG_FILE} is not valid JSON ({e}): the checkpoint is corrupt") from None
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path / CONFIG_FILE} is not a {CHECKPOINT_FORMAT} checkpoint")
    for key, kind in _CONFIG_KEYS.items():
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool):
            raise ModelError(f"{path / CONFIG_FILE}: '{key}' is missing or not {kind.__name__}; the checkpoint is "
                             "corrupt or was not made by `kvbench train deltakv`")
    sig = config["model_signature"]
    want_dim = 2 * int(sig.get("num_key_value_heads", 0)) * int(sig.get("head_dim", 0))
    if config["dim"] != want_dim:
        raise ModelError(f"{path / CONFIG_FILE}: dim {config['dim']} does not match its model "
                         f"(2 x {sig.get('num_key_value_heads')} KV heads x head_dim {sig.get('head_dim')} = {want_dim})")
    actual = file_sha256(path / WEIGHTS_FILE)
    if actual != config["weights_sha256"]:
        raise ModelError(f"{path / WEIGHTS_FILE} does not match the checksum in its {CONFIG_FILE} (sha256 "
                         f"{actual[:12]}..., expected {config['weights_sha256'][:12]}...): the weights are corrupt "
                         "or half-written; train or copy the checkpoint again")
    return config


def load_checkpoint(directory: str | Path) -> tuple[dict, nn.ModuleDict]:
    from safetensors.torch import load_file
    config = read_checkpoint_config(directory)
    modules = build_compressors(config["compressed_layers"], config["dim"], config["latent_dim"],
                                config["intermediate"], config["compressor"])
    path = Path(directory).expanduser() / WEIGHTS_FILE
    try:
        state = load_file(str(path))
        modules.load_state_dict({k: v.float() for k, v in state.items()})
    except Exception as e:  # the checksum matched: the config's dimensions do not fit these weights
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ModelError(f"{path} does not fit the dimensions in its {CONFIG_FILE} ({type(e).__name__}: {first})") from e
    return config, modules


def default_full_layers(n_layers: int) -> list[int]:
    n_full = max(1, round(n_layers * 5 / 32))
    candidates = [0, 1, 2, n_layers // 4, n_layers // 2, 3 * n_layers // 4]
    chosen: list[int] = []
    for layer in candidates:
        if layer not in chosen and layer < n_layers and len(chosen) < n_full:
            chosen.append(layer)
    return sorted(chosen)
