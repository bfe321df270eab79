"""Method artifacts: what a method learns or calibrates for one model (weights, head scores, layer budgets).

An artifact is a directory holding ``artifact.json`` and, when the method has tensors, ``tensors.safetensors``.
The JSON records the format, the method, the model it was made for (name, signature: the shapes that must
match, fingerprint: which weights), the sha256 of the tensor file and whatever the method adds (its settings,
the data it was made from, timings). ``save`` writes into a temporary sibling directory and renames it into
place, so a killed ``kvbench train``/``kvbench calibrate`` leaves the old artifact or none, never half of one;
``load`` checks the checksum before any tensor is used, and ``check_model`` refuses an artifact made for
another model with one line that says which.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from kvbench.models import head_dim, weights_fingerprint
from kvbench.results import file_sha256

FORMAT = "kvbench-artifact/1"
META_FILE = "artifact.json"
TENSOR_FILE = "tensors.safetensors"


class ArtifactError(ValueError):
    """An artifact that is missing, corrupt, or made for another method or model (the message says which)."""


def model_signature(config) -> dict:
    """The shapes an artifact depends on."""
    return {"model_type": config.model_type, "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size, "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads, "head_dim": head_dim(config),
            "vocab_size": config.vocab_size}


def model_identity(lm) -> dict:
    """What an artifact records of the model it was made for (``lm``: a loaded kvbench model)."""
    return {"model": lm.name, "model_signature": model_signature(lm.model.config),
            "model_fingerprint": weights_fingerprint(lm.model)}


def save(directory: str | Path, method: str, identity: dict, meta: dict,
         tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write an artifact atomically (a temporary sibling directory renamed over ``directory``)."""
    from safetensors.torch import save_file
    out = Path(directory).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        record = {"format": FORMAT, "method": method, **identity, **meta}
        if tensors:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(staging / TENSOR_FILE))
            record["tensors_sha256"] = file_sha256(staging / TENSOR_FILE)
        (staging / META_FILE).write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
        for path in staging.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def identity(paths: list[str]) -> str:
    """One checksum for the artifacts at ``paths``: of a file, its bytes; of a directory, its JSON files (the
    metadata, which records the checksum of the tensors beside it: no GBs re-read). Missing paths count as
    empty (the method refuses them itself, with the message that says what to do)."""
    h = hashlib.sha256()
    for path in (Path(p).expanduser() for p in paths):
        files = sorted(f for f in path.iterdir() if f.suffix in (".json", ".jsonl")) if path.is_dir() else \
            [path] if path.is_file() else []
        for f in files:
            h.update(f"{f.name}:{file_sha256(f)};".encode())
        h.update(b"|")
    return h.hexdigest()


def read_meta(directory: str | Path, method: str, verify: bool = False) -> dict:
    """The artifact's JSON, checked to be a ``method`` artifact (cheap: call it before loading a model);
    ``verify``: the tensor file's checksum too (one read of it, still before the model is loaded)."""
    path = Path(directory).expanduser()
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise ArtifactError(f"no {method} artifact at {directory} (expected {META_FILE}); "
                            f"make one with `kvbench train {method}` or `kvbench calibrate {method}`")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{meta_path} is not valid JSON ({e}); make the artifact again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{meta_path} is not a {FORMAT} file; make the artifact again")
    if meta.get("method") != method:
        raise ArtifactError(f"{directory} holds a {meta.get('method')} artifact, not a {method} one")
    if "tensors_sha256" in meta and not (path / TENSOR_FILE).is_file():
        raise ArtifactError(f"{path / TENSOR_FILE} is missing; make the artifact again")
    if verify and "tensors_sha256" in meta:
        _check_tensors(path / TENSOR_FILE, meta)
    return meta


def _check_tensors(tensor_path: Path, meta: dict) -> None:
    if file_sha256(tensor_path) != meta["tensors_sha256"]:
        raise ArtifactError(f"{tensor_path} does not match the checksum in {META_FILE} (corrupt or replaced); "
                            "make the artifact again")


def load(directory: str | Path, method: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The artifact's JSON and tensors, the tensor file's checksum verified first."""
    from safetensors.torch import load_file
    meta = read_meta(directory, method)
    if "tensors_sha256" not in meta:
        return meta, {}
    tensor_path = Path(directory).expanduser() / TENSOR_FILE
    _check_tensors(tensor_path, meta)
    return meta, load_file(str(tensor_path))


def describe(signature: dict) -> str:
    return (f"{signature.get('model_type')}, {signature.get('num_hidden_layers')} layers, "
            f"{signature.get('num_key_value_heads')} KV heads x {signature.get('head_dim')}")


def check_model(meta: dict, lm, directory: str | Path) -> None:
    """Refuse an artifact made for another model (other shapes, or other weights of the same shapes)."""
    identity = model_identity(lm)
    if (meta.get("model_signature") != identity["model_signature"]
            or meta.get("model_fingerprint") != identity["model_fingerprint"]):
        raise ArtifactError(
            f"{meta.get('method')} artifact {directory} was made for {meta.get('model')} "
            f"({describe(meta.get('model_signature') or {})}, fingerprint {meta.get('model_fingerprint')}); "
            f"this run uses {lm.name} ({describe(identity['model_signature'])}, fingerprint "
            f"{identity['model_fingerprint']}): make one for this model with `kvbench calibrate/train "
            f"{meta.get('method')} --model {lm.name}`")
