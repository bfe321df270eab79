"""Every sweep config committed under results/ loads and plans with the code as it is now: a renamed parameter,
a task option that changed or a method that went would otherwise surface only on the GPU machine, after the
carry and the model load."""
import shutil
import subprocess
from pathlib import Path

import pytest

from kvbench import registry, sweep

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "results").rglob("*.yaml"))
# artifacts trained on the GPU machine in the session that uses them (too large to commit; .gitignore)
MADE_ON_GPU = {"checkpoints/kvcar-qwen2.5-coder-1.5b", "checkpoints/kvcar-qwen2.5-coder-1.5b-long",
               "checkpoints/kvcar-qwen2.5-coder-1.5b-kl", "checkpoints/kvcar-qwen2.5-coder-1.5b-l16v48",
               "checkpoints/kvcar-qwen2.5-coder-1.5b-l64v128",
               "checkpoints/kvcar-qwen2.5-coder-1.5b-l16v112", "checkpoints/deltakv-qwen2.5-coder-1.5b"}


def test_the_configs_are_found():
    assert len(CONFIGS) >= 20


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_committed_sweep_config_loads(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs name checkpoints/ relative to the repository root
    build = registry.build_method

    def without_gpu_artifacts(name, budget, params=None):
        params = dict(params or {})
        for key in ("artifact", "checkpoint"):
            if params.get(key) in MADE_ON_GPU:
                params.pop(key)
                if name == "deltakv":
                    params["random_init"] = True
        return build(name, budget, params)

    monkeypatch.setattr(registry, "build_method", without_gpu_artifacts)
    plan = sweep.points(sweep.load_config(path))
    assert plan and all(p.model and p.task and p.method for p in plan)


@pytest.mark.parametrize("path", sorted(MADE_ON_GPU))
def test_artifacts_made_on_the_gpu_are_ignored_by_git(path):
    """The device copy of the checkout mirrors every path git does not ignore, deleting there what this checkout
    lacks: a codec trained on the GPU into a folder git tracks would vanish before the sweeps that use it
    (2026-12-03: the long KV-CAR codec did)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    probe = f"{path}/tensors.safetensors"
    done = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT)
    assert done.returncode == 0, f"{path}/ is not in .gitignore: a device call would delete it"
