"""Engine and protocol promises found broken by the engine audit: each test failed before its fix."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvbench import attention, models


def _tiny_model(family: str, **overrides):
    attention.register()
    cfg = dict(models.PRESETS[f"tiny-{family}"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg, **overrides)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attention.NAME)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_sliding_window_layers_are_refused(family):
    """A Qwen model whose layers attend within a window ran with full attention: another model's outputs."""
    with pytest.raises(models.ModelError, match="sliding-window"):
        models.check_drivable(_tiny_model(family, use_sliding_window=True, sliding_window=8, max_window_layers=0))
    # use_sliding_window with every layer below max_window_layers: no layer slides, the model is drivable
    models.check_drivable(_tiny_model(family, use_sliding_window=True, sliding_window=8, max_window_layers=2))
    with pytest.raises(models.ModelError, match="sliding-window"):
        models.check_drivable(_tiny_model("mistral", sliding_window=8))
